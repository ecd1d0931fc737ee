"""Deduplication: exact on a normalization key, and near duplicates by MinHash over word shingles with LSH banding.

Everything is vectorized over numpy arrays so that 3.3M prompts fit in seconds and a few hundred MB: a signature is
``num_perm`` 16-bit minimums (b-bit MinHash: equal 16-bit values estimate the Jaccard similarity with a bias of
(1 − J)/65536, negligible). Prompts that share an LSH band and whose estimate comes near the threshold are candidates;
their exact Jaccard similarity decides, since with 64 permutations the estimate has a standard deviation of about
0.06 and short templated prompts ("a dragon, digital art" / "a lighthouse, digital art") would cross the threshold
by chance. A prompt is a near duplicate when it is similar enough to an *earlier* one: the earliest always stays, so
the result depends on the input order only.
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


def candidate_pairs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (earlier, later) of prompts sharing a band key: each prompt is paired with the first and the previous
    prompt of its group, which keeps a group of m prompts at under 2m pairs (a band made of common words can hold
    a large share of all prompts)."""
    order = np.argsort(keys, kind="stable")
    ks = keys[order]
    starts = np.concatenate([[True], ks[1:] != ks[:-1]])
    same = ~starts[1:]
    later = order[1:][same]
    prev = order[:-1][same]
    first = order[np.flatnonzero(starts)[np.cumsum(starts) - 1]][1:][same]
    not_first = prev != first  # the second of a group has first == previous: one pair, not two
    return np.concatenate([first, prev[not_first]]), np.concatenate([later, later[not_first]])


def similar_pairs(sig: np.ndarray, bands: int, min_estimate: float, batch: int = 1 << 18
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Distinct pairs (earlier, later) that share an LSH band and whose estimated similarity is >= min_estimate.
    Band by band, so that only one band's raw candidates are ever in memory."""
    found = [np.zeros(0, dtype=np.uint64)]
    for band in range(bands):
        earlier, later = candidate_pairs(band_keys(sig, band, bands))
        for s in range(0, len(later), batch):
            e, l_ = earlier[s : s + batch], later[s : s + batch]
            hit = estimated_jaccard(sig[e], sig[l_]) >= min_estimate - 1e-9
            found.append(e[hit].astype(np.uint64) << np.uint64(32) | l_[hit].astype(np.uint64))
    codes = np.unique(np.concatenate(found))
    return (codes >> np.uint64(32)).astype(np.int64), (codes & np.uint64(0xFFFFFFFF)).astype(np.int64)


def near_duplicates(sig: np.ndarray, bands: int, threshold: float) -> np.ndarray:
    """Boolean mask: True where a prompt's *estimated* similarity to an earlier one sharing a band is >= threshold
    (the builder verifies the estimate with :func:`exact_jaccard` instead)."""
    if sig.shape[0] >= 2**32:
        raise ValueError("near deduplication handles fewer than 2**32 prompts")
    dup = np.zeros(sig.shape[0], dtype=bool)
    dup[similar_pairs(sig, bands, threshold)[1]] = True
    return dup


def shingle_sets(keys: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Each key's distinct shingle hashes, sorted, flattened; key i's are ``flat[offsets[i]:offsets[i + 1]]``."""
    if not keys:
        return np.zeros(0, dtype=np.uint64), np.zeros(1, dtype=np.int64)
    flat, counts = word_hashes(keys, n)
    sh, starts = shingle_hashes(flat, counts, n)
    doc = np.repeat(np.arange(len(keys)), np.diff(np.append(starts, len(sh))))
    order = np.lexsort((sh, doc))
    sh, doc = sh[order], doc[order]
    first = np.concatenate([[True], (sh[1:] != sh[:-1]) | (doc[1:] != doc[:-1])])
    sh, doc = sh[first], doc[first]
    return sh, np.concatenate([[0], np.cumsum(np.bincount(doc, minlength=len(keys)))])


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    return np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(int(lengths.sum()))


def exact_jaccard(flat: np.ndarray, offsets: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Jaccard similarity of the shingle sets of keys a[k] and b[k] (from :func:`shingle_sets`), for every k."""
    la, lb = offsets[a + 1] - offsets[a], offsets[b + 1] - offsets[b]
    pair = np.concatenate([np.repeat(np.arange(len(a)), la), np.repeat(np.arange(len(b)), lb)])
    h = np.concatenate([flat[_ranges(offsets[a], la)], flat[_ranges(offsets[b], lb)]])
    order = np.lexsort((h, pair))
    pair, h = pair[order], h[order]
    both = (pair[1:] == pair[:-1]) & (h[1:] == h[:-1])  # each side is a set: a repeat is in both
    inter = np.bincount(pair[1:][both], minlength=len(a))
    return inter / np.maximum(la + lb - inter, 1)


def exact_duplicates(key_hashes: np.ndarray) -> np.ndarray:
    """Boolean mask: True for every prompt whose key hash appeared earlier."""
    _, first = np.unique(key_hashes, return_index=True)
    dup = np.ones(len(key_hashes), dtype=bool)
    dup[first] = False
    return dup
