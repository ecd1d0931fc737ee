"""Exact CLIP token counts for millions of prompts.

The tokenizers library takes about 80 µs for a 180-character prompt here, too slow for 3.3M prompts on two cores.
CLIP's BPE runs on each pre-token separately (the pieces of its split regex), so a prompt's count is the sum of its
pieces' counts: for ASCII prompts we split with the same regex in Python and look the pieces up in a cache filled
by the real tokenizer, which gives the same number at a tenth of the cost. Other prompts go through the tokenizer.
"""

from __future__ import annotations

import json
import re

# CLIP's pre-tokenizer pattern (transformers' CLIPTokenizerFast), and its ASCII form for lowercased ASCII text.
CLIP_SPLIT = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
_ASCII_PIECES = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")
_CACHE_LIMIT = 1_000_000


def _split_pattern(spec: dict) -> str | None:
    pre = spec.get("pre_tokenizer") or {}
    for p in pre.get("pretokenizers", [pre]):
        if p.get("type") == "Split":
            return p.get("pattern", {}).get("Regex")
    return None


class TokenCounter:
    """Token counts (BOS/EOS excluded) and truncation to ``max_tokens`` at a pre-token boundary."""

    def __init__(self, tokenizer_json: str, max_tokens: int):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.max_tokens = max_tokens
        spec = json.loads(tokenizer_json)
        norm = json.dumps(spec.get("normalizer"))
        # The fast path holds only for CLIP's lowercasing normalizer and split pattern.
        self.fast = _split_pattern(spec) == CLIP_SPLIT and "Lowercase" in norm
        added = sorted((t.content for t in self.tokenizer.get_added_tokens_decoder().values()), key=len, reverse=True)
        self._added = re.compile("|".join(map(re.escape, added))) if added else None
        self._cache: dict[str, int] = {}

    def _piece_len(self, piece: str) -> int:
        n = self._cache.get(piece)
        if n is None:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            n = self._cache[piece] = len(self.tokenizer.encode(piece, add_special_tokens=False).ids)
        return n

    def _fast_ok(self, text: str) -> bool:
        return self.fast and text.isascii() and text.isprintable() and "<|" not in text

    def _count_ascii(self, text: str) -> int:
        n_added = 0
        if self._added is not None and self._added.search(text):
            text, n_added = self._added.subn(" ", text)
        pieces = _ASCII_PIECES.findall(text.lower())
        cache = self._cache
        try:
            return n_added + sum([cache[p] for p in pieces])
        except KeyError:
            return n_added + sum(self._piece_len(p) for p in pieces)

    def count(self, texts: list[str]) -> list[int]:
        counts = [-1] * len(texts)
        slow = []
        for i, t in enumerate(texts):
            if self._fast_ok(t):
                counts[i] = self._count_ascii(t)
            else:
                slow.append(i)
        if slow:
            for i, enc in zip(slow, self.tokenizer.encode_batch([texts[i] for i in slow], add_special_tokens=False)):
                counts[i] = len(enc.ids)
        return counts

    def cut(self, text: str) -> int:
        """Where to cut ``text`` so that it keeps at most ``max_tokens`` tokens, dropping the pre-token that
        overflows whole (cutting inside one would re-tokenize it differently)."""
        if self._fast_ok(text):
            return self._cut_ascii(text)
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        if len(enc.ids) <= self.max_tokens:
            return len(text)
        word = enc.word_ids[self.max_tokens]
        if word is None:
            return enc.offsets[self.max_tokens][0]
        return min(off[0] for off, w in zip(enc.offsets, enc.word_ids) if w == word)

    def _cut_ascii(self, text: str) -> int:
        low, total, pos = text.lower(), 0, 0
        added = list(self._added.finditer(text)) if self._added is not None else []
        for m in added + [None]:
            end = m.start() if m is not None else len(text)
            for p in _ASCII_PIECES.finditer(low, pos, end):
                n = self._piece_len(p.group())
                if total + n > self.max_tokens:
                    return p.start()
                total += n
            if m is None:
                return len(text)
            if total + 1 > self.max_tokens:
                return m.start()
            total, pos = total + 1, m.end()
        return len(text)

    def truncate(self, text: str) -> str:
        return text[: self.cut(text)].rstrip(" ,;|")
