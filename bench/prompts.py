"""Prompt builder at the paper's scale: 3.3M synthetic prompts (1.3M JourneyDB-like JSON lines in a .tgz, 2M
LAION-like Parquet rows) with planted exact and near duplicates.

Prints the wall time and peak memory (RSS of the builder and its workers, summed) of the full `sb2 prompts build`,
and the deduplication's precision and recall on the planted duplicates. A benchmark, not a test:

    python bench/prompts.py [--records 3300000] [--workdir DIR] [--set prompts.dedup.threshold=0.8]

Planted duplicates come after their original, in the same or the other source. Exact ones change what
normalization removes: case, punctuation, Midjourney parameters, whitespace, an HTML entity. Near ones make one
edit: substitute, insert or delete a word, misspell a word, swap two adjacent tags, or append a tag.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ORIGINAL, EXACT, NEAR = 0, 1, 2
NEAR_EDITS = ("substitute", "insert", "delete", "misspell", "swap_tags", "append_tag")
COMMON = ("a", "the", "of", "in", "with", "and", "on", "at", "by", "portrait", "photo", "painting", "city", "woman",
          "man", "girl", "cat", "dog", "forest", "night", "light", "house", "river", "mountain", "sky", "robot",
          "dragon", "flowers", "ocean", "street", "old", "little", "beautiful", "dark", "red", "blue", "golden")
TAGS = ("highly detailed", "8k", "4k", "trending on artstation", "octane render", "unreal engine", "cinematic lighting",
        "digital art", "concept art", "oil on canvas", "studio lighting", "volumetric light", "sharp focus",
        "matte painting", "hyperrealistic", "35mm film", "bokeh", "soft shadows", "wide angle", "dramatic",
        "watercolor", "ink drawing", "pastel colors", "vaporwave", "art nouveau", "low poly", "isometric",
        "golden hour", "by greg rutkowski", "by alphonse mucha", "photorealistic", "ultra wide shot", "macro")
MJ_PARAMS = (" --ar 16:9", " --v 5", " --ar 2:3 --q 2", " --v 5.2 --style raw", " --niji 5", " --s 750", "")


def make_vocabulary(rng: random.Random, size: int = 30_000) -> list[str]:
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ar", "en", "or")]
    words = set()
    while len(words) < size:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))))
    return list(COMMON) + sorted(words)


class Generator:
    """Originals are distinct by construction (random words from a large vocabulary, Zipf-distributed)."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.vocab = make_vocabulary(self.rng)
        weights = 1.0 / np.arange(1, len(self.vocab) + 1) ** 0.9
        self.cum = np.cumsum(weights / weights.sum()).tolist()

    def words(self, k: int) -> list[str]:
        return self.rng.choices(self.vocab, cum_weights=self.cum, k=k)

    def original(self, long: bool) -> str:
        rng = self.rng
        subject = " ".join(self.words(rng.randint(6, 14) if not long else rng.randint(50, 70)))
        tags = rng.sample(TAGS, rng.randint(0, 5))
        return ", ".join([subject, *tags])

    def exact_variant(self, text: str) -> str:
        rng, out = self.rng, text
        k = rng.randrange(5)
        if k == 0:
            out = out[0].upper() + out[1:]
        elif k == 1:
            out = out.replace(", ", " ; ") + "."
        elif k == 2:
            out = out + rng.choice(MJ_PARAMS[:-1])
        elif k == 3:
            out = "  " + out.replace(" ", "   ", 2) + " \t"
        else:
            out = out.replace(", ", " &amp; ", 1) if ", " in out else out.title()
        return out

    def near_variant(self, text: str) -> tuple[str, int]:
        rng = self.rng
        parts = text.split(", ")
        words = parts[0].split()
        kind = rng.randrange(len(NEAR_EDITS))
        if NEAR_EDITS[kind] == "swap_tags" and len(parts) < 3:
            kind = NEAR_EDITS.index("append_tag")
        edit = NEAR_EDITS[kind]
        i = rng.randrange(len(words))
        if edit == "substitute":
            words[i] = self.words(1)[0]
        elif edit == "insert":
            words.insert(i, self.words(1)[0])
        elif edit == "delete":
            del words[i]
        elif edit == "misspell":
            j = max(range(len(words)), key=lambda k: len(words[k]))
            w = words[j]
            p = rng.randrange(len(w))
            words[j] = w[:p] + rng.choice("aeiouxyz") + w[p + 1:]
        elif edit == "swap_tags":
            t = rng.randrange(1, len(parts) - 1)
            parts[t], parts[t + 1] = parts[t + 1], parts[t]
        else:
            parts.append(rng.choice(TAGS))
        return ", ".join([" ".join(words), *parts[1:]]), kind


def generate(n_records: int, n_jdb: int, seed: int, exact_share: float, near_share: float, long_share: float):
    """Records in reading order with, for each, its kind, its original's index and its near-edit kind."""
    g = Generator(seed)
    rng = np.random.default_rng(seed)
    n_exact, n_near = int(n_records * exact_share), int(n_records * near_share)
    n_orig = n_records - n_exact - n_near
    originals = [g.original(long=g.rng.random() < long_share) for _ in range(n_orig)]
    # Each duplicate lands at a random place after its original.
    orig_pos = np.sort(rng.random(n_orig))
    dup_of = rng.integers(0, n_orig, n_exact + n_near)
    dup_pos = orig_pos[dup_of] + rng.random(len(dup_of)) * (1 - orig_pos[dup_of]) + 1e-12
    order = np.argsort(np.concatenate([orig_pos, dup_pos]), kind="stable")
    texts, kind, of, edit = [], np.zeros(n_records, np.int8), np.zeros(n_records, np.int64), np.full(n_records, -1)
    index_of_orig = np.empty(n_orig, np.int64)
    for pos, j in enumerate(order.tolist()):
        if j < n_orig:
            texts.append(originals[j])
            index_of_orig[j] = pos
            of[pos] = pos
        else:
            d = j - n_orig
            o = int(dup_of[d])
            of[pos] = index_of_orig[o]
            if d < n_exact:
                kind[pos] = EXACT
                texts.append(g.exact_variant(originals[o]))
            else:
                kind[pos] = NEAR
                t, edit[pos] = g.near_variant(originals[o])
                texts.append(t)
    return texts, kind, of, edit


def write_sources(texts: list[str], n_jdb: int, folder: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    for i, t in enumerate(texts[:n_jdb]):
        rec = {"img_path": f"./{i // 1000:04d}/{i:08x}.jpg", "prompt": t, "Task1": {"Style": [], "Content": []},
               "Task2": {"Caption": "a synthetic record"}}
        buf.write(json.dumps(rec).encode() + b"\n")
    data = buf.getvalue()
    with tarfile.open(folder / "train_anno.jsonl.tgz", "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("train_anno.jsonl")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    laion = texts[n_jdb:]
    per = 500_000
    for s in range(0, len(laion), per):
        part = laion[s : s + per]
        pq.write_table(pa.table({"URL": [f"https://example.com/{s + k}.jpg" for k in range(len(part))],
                                 "TEXT": part, "AESTHETIC_SCORE": np.full(len(part), 6.5)}),
                       folder / f"laion-{s // per:03d}.parquet")
    return [
        {"name": "journeydb", "format": "jsonl", "paths": [str(folder / "*.jsonl.tgz")]},
        {"name": "laion", "format": "parquet", "paths": [str(folder / "laion-*.parquet")]},
    ]


def run_measured(cmd: list[str], env: dict) -> tuple[float, float, int]:
    """Wall time, peak summed RSS (GiB) of the process tree, and the exit code."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    peak = 0
    done = threading.Event()

    def poll():
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root] + root.children(recursive=True)
                peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.1)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    rc = proc.wait()
    done.set()
    th.join()
    return time.perf_counter() - t0, peak / 2**30, rc


def expected_texts(texts: list[str], cfg) -> list[str | None]:
    """What the builder's normalization, filters and truncation make of each record (None: dropped)."""
    from dataclasses import replace

    from sb2.models.loading import load_tokenizer
    from sb2.prompts.build import _settings
    from sb2.prompts.process import ChunkProcessor

    settings = replace(_settings(cfg.prompts), near=False)
    tokenizer = load_tokenizer(cfg.prompts.tokenizer or cfg.models.teacher)
    proc = ChunkProcessor(settings, tokenizer.backend_tokenizer.to_str())
    out: list[str | None] = []
    for s in range(0, len(texts), 50_000):
        res = proc(texts[s : s + 50_000])
        it = iter(res.prompts)
        out.extend(next(it) if st == 0 else None for st in res.status.tolist())
    return out


def jaccard(a: str, b: str, n: int) -> float:
    from sb2.prompts.normalize import dedup_key

    def sh(t):
        w = dedup_key(t).split()
        return {tuple(w[i : i + n]) for i in range(max(len(w) - n + 1, 1))}

    x, y = sh(a), sh(b)
    return len(x & y) / len(x | y) if x | y else 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=3_300_000)
    ap.add_argument("--jdb", type=int, default=None, help="JourneyDB records (default 13/33 of --records)")
    ap.add_argument("--exact-share", type=float, default=0.10)
    ap.add_argument("--near-share", type=float, default=0.10)
    ap.add_argument("--long-share", type=float, default=0.05, help="share of originals above 75 CLIP tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override for the build")
    args = ap.parse_args()
    n_jdb = args.jdb if args.jdb is not None else args.records * 13 // 33
    work = args.workdir or Path(tempfile.mkdtemp(prefix="sb2-bench-prompts-"))
    work.mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    texts, kind, of, edit = generate(args.records, n_jdb, args.seed, args.exact_share, args.near_share,
                                     args.long_share)
    sources = write_sources(texts, n_jdb, work / "input")
    print(f"generated {len(texts):,} records ({(kind == EXACT).sum():,} exact and {(kind == NEAR).sum():,} near "
          f"duplicates planted) in {time.perf_counter() - t:.0f} s", flush=True)

    cfg_file = work / "bench.yaml"
    # The tiny profile for its offline tokenizer, with the default sizes of a real build.
    cfg_file.write_text(json.dumps({"prompts": {"sources": sources, "workers": 0, "shard_rows": 500_000,
                                                "val_fraction": 0.01, "chunk_rows": 20_000}}))
    out = work / "prompts"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "sb2.cli", "prompts", "build", "-p", "tiny", "-c", str(cfg_file), "--out", str(out)]
    for s in args.sets:
        cmd += ["--set", s]
    # The tiny profile's tokenizer is CLIP's BPE (the same vocabulary and merges as SD2.1's). Build it first and
    # give the builder its folder, as one would SD2.1's (a `tiny:` id would import torch to build the tiny world).
    code = "from sb2.models.loading import resolve; print(resolve('tiny:teacher'))"
    teacher = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                             text=True).stdout.strip()
    cmd += ["--set", f"prompts.tokenizer={teacher}"]
    wall, peak, rc = run_measured(cmd, env)
    if rc != 0:
        sys.exit(f"build failed with exit code {rc}")
    manifest = json.loads((out / "manifest.json").read_text())

    import pyarrow.parquet as pq

    from sb2.config import load_config

    cfg = load_config("tiny", args.sets, cfg_file)
    kept = set()
    for split in ("train", "val"):
        for s in manifest["shards"][split]:
            kept.update(pq.read_table(out / s["file"], columns=["prompt"]).column(0).to_pylist())
    expected = expected_texts(texts, cfg)
    first: dict[str, int] = {}
    removed = np.zeros(len(texts), dtype=bool)
    considered = np.zeros(len(texts), dtype=bool)
    for i, e in enumerate(expected):
        if e is None:
            continue
        considered[i] = True
        if e not in kept or first.setdefault(e, i) != i:
            removed[i] = True
    planted = kind != ORIGINAL
    tp = int((removed & planted & considered).sum())
    precision = tp / max(int((removed & considered).sum()), 1)
    recall = {k: float((removed & (kind == code) & considered).sum() / max((kind == code)[considered].sum(), 1))
              for k, code in (("exact", EXACT), ("near", NEAR))}
    by_edit = {name: float(removed[(edit == e) & considered].mean()) for e, name in enumerate(NEAR_EDITS)
               if ((edit == e) & considered).any()}
    near_idx = np.flatnonzero((kind == NEAR) & considered)
    n = cfg.prompts.dedup.shingle_words
    js = np.array([jaccard(expected[i], expected[of[i]], n) for i in near_idx])
    thr = cfg.prompts.dedup.threshold
    above = js >= thr
    result = {
        "records": len(texts), "machine_cores": os.cpu_count(), "load_average_1min_after": os.getloadavg()[0],
        "wall_s": round(wall, 1), "peak_rss_gib": round(peak, 2),
        "kept": manifest["total"]["kept"], "exact_duplicate": manifest["total"]["exact_duplicate"],
        "near_duplicate": manifest["total"]["near_duplicate"], "truncated": manifest["total"]["truncated"],
        "precision": round(precision, 4), "recall_exact": round(recall["exact"], 4),
        "recall_near": round(recall["near"], 4), "recall_near_by_edit": {k: round(v, 4) for k, v in by_edit.items()},
        "near_planted_with_true_jaccard_at_or_above_threshold": round(float(above.mean()), 4),
        "recall_near_true_jaccard_at_or_above_threshold": round(float(removed[near_idx][above].mean()), 4)
        if above.any() else None,
        "removed_near_planted_below_threshold": round(float(removed[near_idx][~above].mean()), 4)
        if (~above).any() else None,
        "originals_removed": int((removed & ~planted & considered).sum()),
        "dedup": manifest["dedup"],
    }
    print(json.dumps(result, indent=2))
    (work / "result.json").write_text(json.dumps(result, indent=2))
    print(f"(inputs and output in {work})")


if __name__ == "__main__":
    main()
