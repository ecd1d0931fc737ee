"""Prompt sources for image-free training: a text file (one prompt a line), Parquet/CSV/TSV with a prompt column
(a file or a folder of shards), or a folder written by the prompt builder (its train split)."""

from __future__ import annotations

from pathlib import Path

import torch


def read_prompts(source: str | Path, column: str = "prompt") -> list[str]:
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"prompt source {str(path)!r} does not exist")
    if (path / "manifest.json").is_file() and (path / "train").is_dir():
        path = path / "train"  # a folder written by `sb2 prompts build`: its train split
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in {".parquet", ".txt", ".csv", ".tsv"}) \
        if path.is_dir() else [path]
    prompts: list[str] = []
    for f in files:
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(f, columns=[column])
            prompts.extend(str(p) for p in table.column(column).to_pylist() if p)
        elif f.suffix in {".csv", ".tsv"}:
            import csv

            with open(f, newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh, delimiter="\t" if f.suffix == ".tsv" else ",")
                if reader.fieldnames is None or column not in reader.fieldnames:
                    raise ValueError(f"{f}: no column {column!r} (columns: {reader.fieldnames})")
                prompts.extend(row[column] for row in reader if row[column])
        else:
            prompts.extend(line.strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip())
    if not prompts:
        raise ValueError(f"prompt source {str(path)!r} holds no prompts")
    return prompts


class PromptSampler:
    """Endless shuffled batches of prompts; the position (epoch, index) is part of the training state."""

    def __init__(self, prompts: list[str], batch_size: int, seed: int):
        self.prompts, self.batch_size, self.seed = prompts, batch_size, seed
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.prompts), generator=g).tolist()

    def next_batch(self) -> list[str]:
        batch = []
        while len(batch) < self.batch_size:
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation()
            batch.append(self.prompts[self._order[self.index]])
            self.index += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation()
