"""The per-chunk work of the builder, run in worker processes: normalize, filter, count tokens, hash, sign.

Kept light on imports (no torch) so that spawned workers start in a fraction of a second.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from hashlib import blake2b

import numpy as np

from sb2.prompts.dedup import minhash_signatures
from sb2.prompts.normalize import NormalizeRules, blocklist_pattern, dedup_key, drop_reason, normalize_prompt

# Why a record is not kept; index 0 is "kept". Stored per record as int8.
REASONS = ("kept", "empty", "too_short", "non_text", "blocked", "too_long")
_CODE = {r: i for i, r in enumerate(REASONS)}


def prompt_id(prompt: str) -> int:
    """A prompt's 64-bit id: BLAKE2b of its UTF-8 text. The train/validation split derives from it too."""
    return int.from_bytes(blake2b(prompt.encode(), digest_size=8).digest(), "little")


def key_hash(key: str) -> int:
    return int.from_bytes(blake2b(key.encode(), digest_size=8, person=b"sb2-dedup-key").digest(), "little")


def is_validation(ids: np.ndarray, val_fraction: float) -> np.ndarray:
    """The split: a prompt is in validation when its id falls in the first ``val_fraction`` of 10,000 buckets, so it
    never moves when other prompts are added or removed."""
    return (ids % np.uint64(10_000)) < np.uint64(round(val_fraction * 10_000))


@dataclass(frozen=True)
class ProcessSettings:
    rules: NormalizeRules
    min_chars: int
    min_words: int
    min_letter_fraction: float
    max_tokens: int
    long_prompts: str  # "truncate" or "drop"
    near: bool
    shingle_words: int
    num_perm: int


@dataclass
class ChunkResult:
    status: np.ndarray  # int8 per input text, an index into REASONS
    prompts: list[str]  # the kept ones, normalized (and truncated)
    key_hashes: np.ndarray  # uint64 per kept prompt
    ids: np.ndarray  # uint64 per kept prompt
    tokens: np.ndarray  # int16 per kept prompt (-1: not counted)
    truncated: int
    signatures: np.ndarray | None  # (kept, num_perm) uint16


class ChunkProcessor:
    def __init__(self, settings: ProcessSettings, tokenizer_json: str | None):
        from sb2.prompts.tokens import TokenCounter

        self.s = settings
        self.blocked = blocklist_pattern(settings.rules.blocklist)
        self.counter = TokenCounter(tokenizer_json, settings.max_tokens) if tokenizer_json else None

    def __call__(self, texts: list[str]) -> ChunkResult:
        s = self.s
        status = np.zeros(len(texts), dtype=np.int8)
        prompts, where = [], []
        for i, text in enumerate(texts):
            p = normalize_prompt(text, s.rules)
            reason = drop_reason(p, s.min_chars, s.min_words, s.min_letter_fraction, self.blocked)
            if reason is None:
                prompts.append(p)
                where.append(i)
            else:
                status[i] = _CODE[reason]
        truncated = 0
        tokens = [-1] * len(prompts)
        if self.counter is not None:
            tokens = self.counter.count(prompts)
            keep = []
            for j, n in enumerate(tokens):
                if n > s.max_tokens:
                    cut = self.counter.truncate(prompts[j]) if s.long_prompts == "truncate" else ""
                    if len(cut) < s.min_chars:  # dropped, or nothing left of it
                        status[where[j]] = _CODE["too_long"]
                        continue
                    prompts[j], tokens[j] = cut, self.counter.count([cut])[0]
                    truncated += 1
                keep.append(j)
            if len(keep) < len(prompts):
                prompts, tokens = [prompts[j] for j in keep], [tokens[j] for j in keep]
        keys = [dedup_key(p) for p in prompts]
        n = len(prompts)
        return ChunkResult(
            status=status,
            prompts=prompts,
            key_hashes=np.fromiter(map(key_hash, keys), dtype=np.uint64, count=n),
            ids=np.fromiter(map(prompt_id, prompts), dtype=np.uint64, count=n),
            tokens=np.asarray(tokens, dtype=np.int16).reshape(n),
            truncated=truncated,
            signatures=minhash_signatures(keys, s.shingle_words, s.num_perm) if s.near else None,
        )


_worker: ChunkProcessor | None = None


def init_worker(settings: ProcessSettings, tokenizer_json: str | None) -> None:
    # Each worker is one of `workers` processes on as many cores: the tokenizer's own threads would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _worker
    _worker = ChunkProcessor(settings, tokenizer_json)


def process_in_worker(texts: list[str]) -> ChunkResult:
    return _worker(texts)
