"""The prompt dataset stage (``sb2 prompts build``): sources → normalized, filtered, deduplicated, split, sharded.

Two streaming passes keep memory to a few numbers per prompt. Pass 1 reads every source in order, has worker
processes normalize, filter, count tokens and hash each chunk, and spills the surviving prompts to a scratch Arrow
file. The deduplication then runs on the hashes and MinHash signatures alone, and pass 2 streams the scratch file
into the train/validation shards. All of it happens in a temporary folder renamed into place at the end.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sb2.atomic import atomic_dir
from sb2.config import ModelsConfig, PromptsConfig
from sb2.prompts.dedup import exact_duplicates, exact_jaccard, shingle_sets, similar_pairs
from sb2.prompts.normalize import NormalizeRules, dedup_key
from sb2.prompts.process import (
    REASONS,
    ChunkProcessor,
    ChunkResult,
    ProcessSettings,
    init_worker,
    is_validation,
    process_in_worker,
)
from sb2.prompts.report import BadInputPolicy, SourceCounts, write_stats_plot
from sb2.prompts.sources import FileChunk, PromptInputError, expand_paths, read_source

FORMAT = "sb2-prompts"
FORMAT_VERSION = 1
SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("source", pa.string())])
# Candidates need an estimate within this of the threshold: with 64 permutations a pair at the threshold falls
# short of it by that much in fewer than 1% of cases.
ESTIMATE_MARGIN = 0.15


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_prompts(cfg: PromptsConfig, out_dir: str | Path, models_cfg: ModelsConfig | None = None,
                  log: Callable[[str], None] = _stderr) -> dict:
    """Build the prompt dataset into ``out_dir``: ``train/`` and ``val/`` Parquet shards (id, prompt, source),
    ``manifest.json``, ``stats.png`` and ``bad_input.txt``. Returns the manifest."""
    t0 = time.perf_counter()
    if not cfg.sources:
        raise PromptInputError("prompts.sources: no source configured")
    for src in cfg.sources:
        expand_paths(src)  # a missing path stops the build before any work
    tokenizer_id = cfg.tokenizer or (models_cfg.teacher if models_cfg is not None else None)
    settings = _settings(cfg)
    tokenizer_json = None
    if tokenizer_id is not None:
        from sb2.models.loading import load_tokenizer

        tokenizer_json = load_tokenizer(tokenizer_id, models_cfg).backend_tokenizer.to_str()
    counts = {s.name: SourceCounts() for s in cfg.sources}
    workers = cfg.workers or os.cpu_count() or 1
    with atomic_dir(out_dir) as tmp:
        work = tmp / "_work"
        work.mkdir()
        with open(tmp / "bad_input.txt", "w", encoding="utf-8") as bad_out:
            policy = BadInputPolicy(cfg.bad_input, counts, bad_out, log)
            spilled = _pass1(cfg, settings, tokenizer_json, workers, policy, counts, work, log)
        log(f"read {sum(c.records for c in counts.values()):,} records, {spilled.n:,} pass the filters "
            f"({time.perf_counter() - t0:.0f} s)")
        keep = _deduplicate(cfg, spilled, counts, work)
        log(f"{int(keep.sum()):,} left after deduplication ({time.perf_counter() - t0:.0f} s)")
        if not keep.any():
            dropped = {r: sum(c.dropped[r] for c in counts.values()) for r in REASONS[1:] + ("filtered",)}
            raise PromptInputError(f"no prompt left: {sum(c.records for c in counts.values())} records read, "
                                   f"dropped {dropped}, bad {sum(c.bad_input for c in counts.values())}")
        shards, content, lengths = _pass2(cfg, spilled, keep, counts, tmp, work)
        shutil.rmtree(work)
        manifest = _manifest(cfg, counts, shards, content, tokenizer_id)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        label = "CLIP tokens" if tokenizer_json else "characters"
        write_stats_plot(tmp / "stats.png", lengths, label, counts)
    t = manifest["total"]
    log(f"{t['kept']:,} prompts (train {t['train']:,}, val {t['val']:,}) written to {out_dir} "
        f"in {time.perf_counter() - t0:.0f} s")
    return manifest


def _settings(cfg: PromptsConfig) -> ProcessSettings:
    n, f, d = cfg.normalize, cfg.filters, cfg.dedup
    blocklist = tuple(n.blocklist)
    if n.blocklist_file is not None:
        path = Path(n.blocklist_file)
        if not path.is_file():
            raise PromptInputError(f"prompts.normalize.blocklist_file: {str(path)!r} not found")
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        blocklist += tuple(w.strip() for w in lines if w.strip() and not w.lstrip().startswith("#"))
    rules = NormalizeRules(n.strip_midjourney_params, n.strip_urls, n.strip_html_tags, blocklist)
    return ProcessSettings(rules, f.min_chars, f.min_words, f.min_letter_fraction, f.max_tokens, f.long_prompts,
                           d.near, d.shingle_words, d.num_perm)


def _chunks(cfg: PromptsConfig, policy: BadInputPolicy, log) -> Iterator[tuple[int, FileChunk]]:
    for s, src in enumerate(cfg.sources):
        log(f"source {src.name}: {len(expand_paths(src))} file(s)")
        for chunk in read_source(src, cfg.chunk_rows):
            policy.check(chunk)
            yield s, chunk


def _processed(chunks: Iterator, settings: ProcessSettings, tokenizer_json: str | None,
               workers: int) -> Iterator[tuple[int, FileChunk, ChunkResult | None]]:
    """Results in input order; at most two chunks a worker in flight, so reading never runs far ahead."""
    if workers <= 1:
        proc = ChunkProcessor(settings, tokenizer_json)
        for s, c in chunks:
            yield s, c, proc(c.texts) if c.texts else None
        return
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")  # no fork of a parent holding threads and big arrays
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker,
                             initargs=(settings, tokenizer_json)) as pool:
        pending: deque = deque()
        try:
            for s, c in chunks:
                pending.append((s, c, pool.submit(process_in_worker, c.texts) if c.texts else None))
                while len(pending) > 2 * workers:
                    s0, c0, f = pending.popleft()
                    yield s0, c0, f.result() if f is not None else None
            while pending:
                s0, c0, f = pending.popleft()
                yield s0, c0, f.result() if f is not None else None
        except BaseException:
            for *_, f in pending:
                if f is not None:
                    f.cancel()
            raise


@dataclass
class _Spilled:
    """Pass 1's output: the surviving prompts in a scratch file, and per prompt its hashes and numbers."""

    n: int
    source: np.ndarray  # uint8 index into cfg.sources
    key_hashes: np.ndarray
    ids: np.ndarray
    tokens: np.ndarray
    signatures: Path


def _pass1(cfg, settings, tokenizer_json, workers, policy, counts, work: Path, log) -> _Spilled:
    names = [s.name for s in cfg.sources]
    source, keys, ids, tokens = [], [], [], []
    n = 0
    with pa.OSFile(str(work / "prompts.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, pa.schema([("prompt", pa.string())])) as spill, \
            open(work / "signatures.u16", "wb") as sig_out:
        for s, chunk, res in _processed(_chunks(cfg, policy, log), settings, tokenizer_json, workers):
            if res is None:
                continue
            c = counts[names[s]]
            for code, k in enumerate(np.bincount(res.status, minlength=len(REASONS))[1:], start=1):
                c.dropped[REASONS[code]] += int(k)
            c.truncated += res.truncated
            if not res.prompts:
                continue
            spill.write_batch(pa.record_batch([pa.array(res.prompts, pa.string())], names=["prompt"]))
            if res.signatures is not None:
                sig_out.write(np.ascontiguousarray(res.signatures).tobytes())
            source.append(np.full(len(res.prompts), s, dtype=np.uint8))
            keys.append(res.key_hashes)
            ids.append(res.ids)
            tokens.append(res.tokens)
            n += len(res.prompts)

    def cat(parts, dtype):
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

    return _Spilled(n, cat(source, np.uint8), cat(keys, np.uint64), cat(ids, np.uint64), cat(tokens, np.int16),
                    work / "signatures.u16")


def _deduplicate(cfg: PromptsConfig, sp: _Spilled, counts: dict[str, SourceCounts], work: Path) -> np.ndarray:
    names = [s.name for s in cfg.sources]
    exact = exact_duplicates(sp.key_hashes)
    near = np.zeros(sp.n, dtype=bool)
    if cfg.dedup.near and sp.n:
        d = cfg.dedup
        unique = np.flatnonzero(~exact)
        sig = _read_rows(sp.signatures, unique, d.num_perm)
        earlier, later = similar_pairs(sig, d.bands, max(d.threshold - ESTIMATE_MARGIN, 0.0))
        del sig
        # The estimate only nominates; the exact similarity of the prompts' shingle sets decides.
        need = np.unique(np.concatenate([earlier, later]))
        flat, offsets = shingle_sets(_read_keys(work / "prompts.arrow", unique[need]), d.shingle_words)
        e, l_ = np.searchsorted(need, earlier), np.searchsorted(need, later)
        step = 1 << 17
        for s in range(0, len(e), step):
            hit = exact_jaccard(flat, offsets, e[s : s + step], l_[s : s + step]) >= d.threshold - 1e-9
            near[unique[later[s : s + step][hit]]] = True
    for s, name in enumerate(names):
        mine = sp.source == s
        counts[name].exact_duplicate = int((exact & mine).sum())
        counts[name].near_duplicate = int((near & mine).sum())
    return ~(exact | near)


def _read_keys(spill: Path, rows: np.ndarray) -> list[str]:
    """The dedup keys of the given (sorted) rows of the scratch file."""
    keys: list[str] = []
    offset = 0
    with pa.OSFile(str(spill)) as source, pa.ipc.open_stream(source) as reader:
        for batch in reader:
            lo, hi = np.searchsorted(rows, [offset, offset + batch.num_rows])
            if hi > lo:
                prompts = batch.column(0).take(pa.array(rows[lo:hi] - offset)).to_pylist()
                keys.extend(dedup_key(p) for p in prompts)
            offset += batch.num_rows
    return keys


def _read_rows(path: Path, rows: np.ndarray, width: int, block: int = 1 << 18) -> np.ndarray:
    """The given rows of the signature file, read a block at a time (the file holds every prompt, rows only some)."""
    out = np.empty((len(rows), width), dtype=np.uint16)
    row_bytes = width * 2
    with open(path, "rb") as f:
        done = 0
        for start in range(0, int(rows[-1]) + 1 if len(rows) else 0, block):
            f.seek(start * row_bytes)
            data = np.frombuffer(f.read(block * row_bytes), dtype=np.uint16).reshape(-1, width)
            hi = np.searchsorted(rows, start + len(data), side="left")
            mine = rows[done:hi]
            out[done:hi] = data[mine - start]
            done = hi
    return out


class _ShardWriter:
    """Parquet shards of at most ``rows`` rows: ``folder/part-00000.parquet``, ... (one empty shard if no rows)."""

    def __init__(self, folder: Path, rows: int):
        self.folder, self.rows = folder, rows
        folder.mkdir(parents=True)
        self.shards: list[dict] = []
        self._writer = None

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self._writer is None:
                name = f"part-{len(self.shards):05d}.parquet"
                self._writer = pq.ParquetWriter(self.folder / name, SCHEMA, compression="zstd")
                self.shards.append({"file": f"{self.folder.name}/{name}", "rows": 0})
            take = min(self.rows - self.shards[-1]["rows"], table.num_rows)
            self._writer.write_table(table.slice(0, take))
            self.shards[-1]["rows"] += take
            table = table.slice(take)
            if self.shards[-1]["rows"] == self.rows:
                self._writer.close()
                self._writer = None

    def close(self) -> list[dict]:
        if self._writer is None and not self.shards:
            pq.write_table(SCHEMA.empty_table(), self.folder / "part-00000.parquet", compression="zstd")
            self.shards.append({"file": f"{self.folder.name}/part-00000.parquet", "rows": 0})
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return self.shards


def _pass2(cfg: PromptsConfig, sp: _Spilled, keep: np.ndarray, counts: dict[str, SourceCounts], tmp: Path,
           work: Path) -> tuple[dict, str, np.ndarray]:
    """Stream the kept prompts into the shards, in input order; the content hash covers every row and its split,
    so it does not depend on the shard size."""
    names = [s.name for s in cfg.sources]
    name_array = pa.array(names, pa.string())
    writers = {"train": _ShardWriter(tmp / "train", cfg.shard_rows), "val": _ShardWriter(tmp / "val", cfg.shard_rows)}
    digest = sha256()
    lengths = []
    offset = 0
    # Plain reads, not a memory map: mapped pages would stay resident and count against the memory budget.
    with pa.OSFile(str(work / "prompts.arrow")) as source, pa.ipc.open_stream(source) as reader:
        for batch in reader:
            rows = slice(offset, offset + batch.num_rows)
            offset += batch.num_rows
            mask = keep[rows]
            if not mask.any():
                continue
            prompts = batch.column(0).filter(pa.array(mask))
            ids, src = sp.ids[rows][mask], sp.source[rows][mask]
            val = is_validation(ids, cfg.val_fraction)
            id_text = [f"{i:016x}" for i in ids.tolist()]
            table = pa.table([pa.array(id_text, pa.string()), prompts, name_array.take(pa.array(src))],
                             schema=SCHEMA)
            split_names = np.where(val, "val", "train")
            digest.update("".join(f"{sp_}\t{i}\t{names[s]}\t{p}\n" for sp_, i, s, p in zip(
                split_names.tolist(), id_text, src.tolist(), prompts.to_pylist())).encode())
            writers["train"].write(table.filter(pa.array(~val)))
            writers["val"].write(table.filter(pa.array(val)))
            for s in np.unique(src):
                mine = src == s
                counts[names[s]].kept += int(mine.sum())
                counts[names[s]].val += int((mine & val).sum())
                counts[names[s]].train += int((mine & ~val).sum())
            tok = sp.tokens[rows][mask]
            lengths.append(tok if (tok >= 0).all() else pc.utf8_length(prompts).to_numpy(zero_copy_only=False))
    shards = {split: w.close() for split, w in writers.items()}
    return shards, digest.hexdigest(), np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int32)


def _manifest(cfg: PromptsConfig, counts: dict[str, SourceCounts], shards: dict, content: str,
              tokenizer_id: str | None) -> dict:
    from sb2 import __version__

    per_source = {name: c.as_dict() for name, c in counts.items()}
    dropped: dict[str, int] = {}
    for c in counts.values():
        for reason, k in c.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + k
    total = {k: sum(getattr(c, k) for c in counts.values()) for k in
             ("records", "bad_input", "truncated", "exact_duplicate", "near_duplicate", "kept", "train", "val")}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": f"sb2 {__version__}",
        "content_sha256": content,
        "total": total,
        "dropped": dict(sorted(dropped.items())),
        "sources": per_source,
        "dedup": {"exact_key": "case-folded words without punctuation", "near": cfg.dedup.near,
                  "threshold": cfg.dedup.threshold, "shingle_words": cfg.dedup.shingle_words,
                  "num_perm": cfg.dedup.num_perm, "bands": cfg.dedup.bands},
        "tokenizer": tokenizer_id,
        "max_tokens": cfg.filters.max_tokens,
        "val_fraction": cfg.val_fraction,
        "shards": shards,
        "config": cfg.model_dump(mode="json"),
    }
