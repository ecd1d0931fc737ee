"""Training checkpoints that survive preemption: everything needed to continue identically, written atomically.

Layout: ``<run>/checkpoints/step-00000120/`` holding ``state.pt`` (models, optimizers, EMA, step; written by the main
process), ``rank-<k>.pt`` (RNG states and prompt-sampler position of each process) and ``MANIFEST.json`` (size and
sha256 of each file, written last). The folder is assembled under a temporary name, fsynced and renamed, so a crash
leaves either a whole checkpoint or none; a checkpoint whose files do not match its manifest, or do not load, is
reported and skipped in favour of the previous one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

CKPT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})$")


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_write(path: Path, write: Callable[[Any], None]) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def staging_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CKPT_DIR / f".tmp-{checkpoint_name(step)}"


def write_rank_state(run_dir: Path, step: int, rank: int, state: dict[str, Any]) -> None:
    """Each process writes its own RNG and sampler state into the staging folder (made by the main process)."""
    stage = staging_dir(run_dir, step)
    _fsync_write(stage / f"rank-{rank}.pt", lambda f: torch.save(state, f))


def begin_checkpoint(run_dir: Path, step: int) -> Path:
    stage = staging_dir(run_dir, step)
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    return stage


def finish_checkpoint(run_dir: Path, step: int, shared: dict[str, Any], keep_last: int) -> Path:
    """Main process: write the shared state and the manifest, rename into place, prune old checkpoints."""
    stage = staging_dir(run_dir, step)
    _fsync_write(stage / "state.pt", lambda f: torch.save(shared, f))
    files = sorted(p.name for p in stage.iterdir())
    manifest = {"step": step, "files": {n: {"bytes": (stage / n).stat().st_size, "sha256": _sha256(stage / n)}
                                        for n in files}}
    _fsync_write(stage / "MANIFEST.json", lambda f: f.write(json.dumps(manifest, indent=2).encode()))
    _fsync_dir(stage)
    final = run_dir / CKPT_DIR / checkpoint_name(step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(stage, final)
    _fsync_dir(final.parent)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old[1], ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found)


class CorruptCheckpoint(RuntimeError):
    pass


def verify(ckpt: Path) -> dict[str, Any]:
    mpath = ckpt / "MANIFEST.json"
    if not mpath.is_file():
        raise CorruptCheckpoint("no MANIFEST.json (the write did not finish)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise CorruptCheckpoint(f"MANIFEST.json is not valid JSON ({e.msg})") from None
    for name, meta in manifest["files"].items():
        p = ckpt / name
        if not p.is_file():
            raise CorruptCheckpoint(f"{name} is missing")
        if p.stat().st_size != meta["bytes"]:
            raise CorruptCheckpoint(f"{name} has {p.stat().st_size} bytes, the manifest says {meta['bytes']}")
        if _sha256(p) != meta["sha256"]:
            raise CorruptCheckpoint(f"{name} does not match its checksum")
    return manifest


@dataclass
class Loaded:
    step: int
    path: Path
    shared: dict[str, Any]
    rank: dict[str, Any]


def load_latest_good(run_dir: str | Path, rank: int = 0, warn: Callable[[str], None] = print) -> Loaded | None:
    """The newest checkpoint that verifies and loads (``weights_only``: never unpickle arbitrary objects);
    each bad one on the way is reported through ``warn``."""
    for step, path in reversed(list_checkpoints(run_dir)):
        try:
            verify(path)
            shared = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
            rank_file = path / f"rank-{rank}.pt"
            if not rank_file.is_file():
                raise CorruptCheckpoint(f"no state for process {rank} (was it written by fewer processes?)")
            rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)
            return Loaded(step, path, shared, rank_state)
        except (CorruptCheckpoint, RuntimeError, OSError, EOFError, ValueError) as e:
            warn(f"checkpoint {path} is unusable ({str(e).splitlines()[0]}); trying the previous one")
    return None
