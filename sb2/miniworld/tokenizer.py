"""The mini-world's CLIP tokenizer: the CLIP byte-level BPE scheme with merges learned on the world's words only.

The full CLIP vocabulary (49,408 tokens) would make every text embedding table 49,408 rows long, most of the
committed models' bytes. This vocabulary has CLIP's 512 byte tokens (every string still tokenizes), one merge chain
per world word, and the two special tokens last — so ``<|endoftext|>`` is the largest id, as open_clip's argmax
pooling assumes. It is saved as ``vocab.json``/``merges.txt`` of a transformers ``CLIPTokenizer``: the teacher's
``tokenizer/`` folder, and inside the open_clip folder, whose config names it (``hf_tokenizer_name``), so that
``open_clip.get_tokenizer("local-dir:…")`` and ``CLIPTokenizer.from_pretrained`` give the same ids.
"""

from __future__ import annotations

import json
from collections import Counter
from itertools import pairwise
from pathlib import Path

from sb2.miniworld.world import vocabulary
from sb2.models.tiny import _bytes_to_unicode

CONTEXT_LENGTH = 77


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges (most frequent pair first, ties by the pair) until every word is one token."""
    words_sym = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in words]
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(p for w in words_sym for p in pairwise(w))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = []
        for w in words_sym:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged.append(tuple(out))
        words_sym = merged


def build_vocab(words: list[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    merges = learn_merges(words or vocabulary())
    tokens = list(_bytes_to_unicode().values())
    tokens = tokens + [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def vocab_size() -> int:
    return len(build_vocab()[0])


def save_tokenizer(folder: str | Path) -> None:
    """A transformers CLIPTokenizer folder (pad "!" = id 0, as SD2's tokenizer and open_clip pad with 0)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!",
                        model_max_length=CONTEXT_LENGTH)
    tok.save_pretrained(folder)


def load_tokenizer(folder: str | Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))


def tokenize(tokenizer, texts: list[str]):
    return tokenizer(texts, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True,
                     return_tensors="pt").input_ids
