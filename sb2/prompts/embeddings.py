"""A cache of the teacher's text embeddings for a built prompt set (SwiftBrush precomputes them to save the text
encoder's forward pass at every step).

Layout: ``emb-00000.npy``... (rows × 77 × hidden, float16 or float32, memory-mapped when read), ``index.parquet``
(the prompt id of each row, its shard and row) and ``embeddings.json``. Mind the size: SD2.1's encoder gives
77 × 1024 values a prompt, 158 KB in float16, so 3.3M prompts take about 520 GB.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sb2.atomic import atomic_dir
from sb2.prompts.process import prompt_id

FORMAT = "sb2-prompt-embeddings"


def _built_prompt_files(prompts_dir: Path) -> tuple[dict, list[Path]]:
    manifest_path = prompts_dir / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{prompts_dir}: no manifest.json (not a folder written by `sb2 prompts build`)")
    manifest = json.loads(manifest_path.read_text())
    files = [prompts_dir / s["file"] for split in ("train", "val") for s in manifest["shards"][split]]
    return manifest, files


def precompute_embeddings(prompts_dir: str | Path, out_dir: str | Path, models_cfg, emb_cfg,
                          device: str | None = None) -> dict:
    """Encode every prompt of a built prompt set (both splits) with the teacher's text encoder, exactly as training
    does (:func:`sb2.student.encode_prompts`), into ``out_dir``. Returns the metadata written."""
    from sb2.models.loading import load_text_encoder
    from sb2.student import encode_prompts

    prompts_dir = Path(prompts_dir)
    manifest, files = _built_prompt_files(prompts_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoder, tokenizer = load_text_encoder(models_cfg.teacher, models_cfg, device=device)
    dtype = np.dtype(emb_cfg.dtype)
    total = manifest["total"]["kept"]
    ids: list[int] = []
    shards: list[dict] = []
    shard_of, row_of = [], []
    with atomic_dir(out_dir) as tmp:
        array, filled = None, 0
        for f in files:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=emb_cfg.batch_size, columns=["prompt"]):
                prompts = batch.column(0).to_pylist()
                emb = encode_prompts(encoder, tokenizer, prompts, device).float().cpu().numpy().astype(dtype)
                for k in range(len(prompts)):
                    if array is None or filled == len(array):
                        array = _new_shard(tmp, len(shards), min(emb_cfg.shard_rows, total - len(ids) - k),
                                           emb.shape[1:], dtype)
                        shards.append({"file": f"emb-{len(shards):05d}.npy", "rows": len(array)})
                        filled = 0
                    array[filled] = emb[k]
                    shard_of.append(len(shards) - 1)
                    row_of.append(filled)
                    filled += 1
                ids.extend(prompt_id(p) for p in prompts)
        if array is not None:
            array.flush()
        pq.write_table(pa.table({"id": pa.array(ids, pa.uint64()), "shard": pa.array(shard_of, pa.int32()),
                                 "row": pa.array(row_of, pa.int32())}), tmp / "index.parquet")
        meta = {"format": FORMAT, "teacher": models_cfg.teacher, "count": len(ids),
                "shape": list(emb.shape[1:]) if ids else [], "dtype": dtype.name,
                "prompts_content_sha256": manifest["content_sha256"], "shards": shards}
        (tmp / "embeddings.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _new_shard(folder: Path, index: int, rows: int, shape: tuple, dtype) -> np.ndarray:
    return np.lib.format.open_memmap(folder / f"emb-{index:05d}.npy", mode="w+", dtype=dtype, shape=(rows, *shape))


class EmbeddingCache:
    """Cached text embeddings by prompt: ``cache.lookup(prompts)`` is what ``encode_prompts`` would return."""

    def __init__(self, folder: str | Path, teacher: str | None = None, prompts: str | Path | None = None):
        """``teacher`` and ``prompts`` (a built prompt folder), when given, must be what the cache was made from."""
        folder = Path(folder)
        meta_path = folder / "embeddings.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{folder}: no embeddings.json (not a folder written by `sb2 prompts embed`)")
        self.meta = json.loads(meta_path.read_text())
        if teacher is not None and self.meta["teacher"] != teacher:
            raise ValueError(f"{folder}: embeddings of {self.meta['teacher']!r}, but the teacher is {teacher!r}")
        manifest = Path(prompts) / "manifest.json" if prompts is not None else None
        if manifest is not None and manifest.is_file():
            if json.loads(manifest.read_text())["content_sha256"] != self.meta["prompts_content_sha256"]:
                raise ValueError(f"{folder}: embeddings of another prompt set than {prompts}")
        index = pq.read_table(folder / "index.parquet")
        ids = index.column("id").to_numpy()
        order = np.argsort(ids, kind="stable")
        self._ids = ids[order]
        self._shard = index.column("shard").to_numpy()[order]
        self._row = index.column("row").to_numpy()[order]
        self._arrays = [np.load(folder / s["file"], mmap_mode="r") for s in self.meta["shards"]]
        self.folder = folder

    def __len__(self) -> int:
        return len(self._ids)

    def lookup(self, prompts: list[str]) -> torch.Tensor:
        wanted = np.fromiter((prompt_id(p) for p in prompts), dtype=np.uint64, count=len(prompts))
        pos = np.minimum(np.searchsorted(self._ids, wanted), max(len(self._ids) - 1, 0))
        missing = np.flatnonzero(self._ids[pos] != wanted) if len(self._ids) else np.arange(len(prompts))
        if missing.size:
            raise ValueError(f"prompt not in the embedding cache {self.folder}: {prompts[missing[0]]!r}")
        rows = [self._arrays[s][r] for s, r in zip(self._shard[pos], self._row[pos])]
        return torch.from_numpy(np.stack(rows))
