"""Deduplication: exact on a normalization key, and near duplicates by MinHash over word shingles with LSH banding.

Everything is vectorized over numpy arrays so that 3.3M prompts fit in seconds and a few hundred MB: a signature is
``num_perm`` 16-bit minimums (b-bit MinHash: equal 16-bit values estimate the Jaccard similarity with a bias of
(1 − J)/65536, negligible), and a prompt is a near duplicate when its estimated similarity to an *earlier* prompt that
shares an LSH band with it reaches the threshold. The earliest prompt of a group always stays, so the result depends
on the input order only.
"""

from __future__ import annotations

from zlib import crc32

import numpy as np

_PERM_SEED = 20240717


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection of uint64 that spreads every input bit over the output."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def word_hashes(keys: list[str], min_words: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """CRC32 of each word of each key, flattened, and the number of words of each key; a key with fewer than
    ``min_words`` words is padded with zeros so that it still makes one shingle."""
    words = [[crc32(w) for w in k.encode().split()] for k in keys]
    for ws in words:
        if len(ws) < min_words:
            ws.extend([0] * (min_words - len(ws)))
    counts = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    flat = np.fromiter((w for ws in words for w in ws), dtype=np.uint64, count=int(counts.sum()))
    return flat, counts


def shingle_hashes(flat: np.ndarray, counts: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of the n-word shingles of each key (every key has at least n words, see ``word_hashes``),
    flattened, and where each key's shingles start."""
    h = mix64(flat)
    with np.errstate(over="ignore"):
        for k in range(1, n):
            h[:-k] = mix64(h[:-k] * np.uint64(0x9E3779B97F4A7C15) + flat[k:])
    # A shingle is valid where it does not run past its key's last word.
    last_valid = np.repeat(np.cumsum(counts) - n, counts)
    h = h[np.arange(len(flat)) <= last_valid]
    per_doc = counts - n + 1
    return h, np.cumsum(per_doc) - per_doc


def permutations(num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    """Multiply-add hash functions over uint64 (odd multipliers), fixed by a seed so that runs agree."""
    rng = np.random.default_rng(_PERM_SEED)
    a = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    return a, b


def minhash_signatures(keys: list[str], shingle_words: int, num_perm: int) -> np.ndarray:
    """(len(keys), num_perm) uint16: the top 16 bits of each permutation's minimum over a key's shingles."""
    if not keys:
        return np.zeros((0, num_perm), dtype=np.uint16)
    flat, counts = word_hashes(keys, shingle_words)
    sh, starts = shingle_hashes(flat, counts, shingle_words)
    a, b = permutations(num_perm)
    sig = np.empty((len(keys), num_perm), dtype=np.uint16)
    with np.errstate(over="ignore"):
        for p in range(num_perm):
            sig[:, p] = np.minimum.reduceat(sh * a[p] + b[p], starts) >> np.uint64(48)
    return sig


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    return (sig_a == sig_b).mean(axis=-1)


def band_keys(sig: np.ndarray, band: int, bands: int) -> np.ndarray:
    rows = sig.shape[1] // bands
    key = np.zeros(sig.shape[0], dtype=np.uint64)
    with np.errstate(over="ignore"):
        for c in range(band * rows, (band + 1) * rows):
            key = mix64(key * np.uint64(0x100000001B3) + sig[:, c].astype(np.uint64))
    return key


def candidate_pairs(keys: np.ndarray) -> np.ndarray:
    """Pairs (earlier, later) sharing a band key, encoded as ``earlier << 32 | later``: each prompt is paired with
    the first and the previous prompt of its group, which keeps a group of m prompts at 2m pairs."""
    order = np.argsort(keys, kind="stable")
    ks = keys[order]
    same = ks[1:] == ks[:-1]
    if not same.any():
        return np.zeros(0, dtype=np.uint64)
    group_start = np.flatnonzero(np.concatenate([[True], ~same]))
    group_of = np.cumsum(np.concatenate([[True], ~same])) - 1
    later = order[1:][same]
    prev = order[:-1][same]
    first = order[group_start[group_of[1:][same]]]
    pairs = np.concatenate([first.astype(np.uint64) << np.uint64(32) | later.astype(np.uint64),
                            prev.astype(np.uint64) << np.uint64(32) | later.astype(np.uint64)])
    return pairs


def near_duplicates(sig: np.ndarray, bands: int, threshold: float, batch: int = 200_000) -> np.ndarray:
    """Boolean mask: True where a prompt's estimated similarity to an earlier one sharing a band is >= threshold."""
    n = sig.shape[0]
    if n >= 2**32:
        raise ValueError("near deduplication handles fewer than 2**32 prompts")
    dup = np.zeros(n, dtype=bool)
    found = []
    for band in range(bands):
        found.append(candidate_pairs(band_keys(sig, band, bands)))
    pairs = np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=np.uint64)
    del found
    for s in range(0, len(pairs), batch):
        p = pairs[s : s + batch]
        earlier = (p >> np.uint64(32)).astype(np.int64)
        later = (p & np.uint64(0xFFFFFFFF)).astype(np.int64)
        hit = estimated_jaccard(sig[earlier], sig[later]) >= threshold - 1e-9
        dup[later[hit]] = True
    return dup


def exact_duplicates(key_hashes: np.ndarray) -> np.ndarray:
    """Boolean mask: True for every prompt whose key hash appeared earlier."""
    _, first = np.unique(key_hashes, return_index=True)
    dup = np.ones(len(key_hashes), dtype=bool)
    dup[first] = False
    return dup
