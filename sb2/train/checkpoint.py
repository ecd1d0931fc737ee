"""Training checkpoints that survive preemption: everything needed to continue identically, written atomically.

Layout: ``<run>/checkpoints/step-00000120/`` holding ``state.pt`` (models, optimizers, EMA, step; written once, by the
main process), ``rank-<k>.pt`` (RNG states and prompt-sampler position of each of the ``world_size`` processes) and
``MANIFEST.json`` (world size, size and sha256 of each file, written last, once every process has written its file).
The folder is assembled under a temporary name, fsynced and renamed, so a crash leaves either a whole checkpoint or
none; a checkpoint whose files do not match its manifest, lacks a process's file, or does not load, is reported and
skipped in favour of the previous one.
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
_STAGING = ".tmp-step-"


class CorruptCheckpoint(RuntimeError):
    pass


class WorldSizeChanged(ValueError):
    """The checkpoint was written by a different number of processes than this run has (a one-line user error)."""


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
    return run_dir / CKPT_DIR / f"{_STAGING}{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank-{rank}.pt"


def write_rank_state(run_dir: Path, step: int, rank: int, state: dict[str, Any]) -> None:
    """Each process writes its own RNG and sampler state into the staging folder (made by the main process)."""
    stage = staging_dir(run_dir, step)
    _fsync_write(stage / rank_file(rank), lambda f: torch.save(state, f))


def begin_checkpoint(run_dir: Path, step: int) -> Path:
    """Main process, while the others wait: a fresh staging folder. Staging folders left by a write that was cut
    short (SIGKILL, the grace period running out) are removed here; no one else is writing at this point."""
    root = run_dir / CKPT_DIR
    if root.is_dir():
        for stale in root.glob(f"{_STAGING}*"):
            shutil.rmtree(stale, ignore_errors=True)
    stage = staging_dir(run_dir, step)
    stage.mkdir(parents=True)
    return stage


def finish_checkpoint(run_dir: Path, step: int, shared: dict[str, Any], keep_last: int,
                      world_size: int = 1) -> Path:
    """Main process, once every process has written its ``rank-<k>.pt``: write the shared state and the manifest,
    rename into place, prune old checkpoints."""
    stage = staging_dir(run_dir, step)
    missing = [rank_file(k) for k in range(world_size) if not (stage / rank_file(k)).is_file()]
    if missing:
        raise CorruptCheckpoint(f"checkpoint at step {step}: {', '.join(missing)} not written")
    _fsync_write(stage / "state.pt", lambda f: torch.save(shared, f))
    files = sorted(p.name for p in stage.iterdir())
    manifest = {"step": step, "world_size": world_size,
                "files": {n: {"bytes": (stage / n).stat().st_size, "sha256": _sha256(stage / n)} for n in files}}
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




def verify(ckpt: Path) -> dict[str, Any]:
    mpath = ckpt / "MANIFEST.json"
    if not mpath.is_file():
        raise CorruptCheckpoint("no MANIFEST.json (the write did not finish)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise CorruptCheckpoint(f"MANIFEST.json is not valid JSON ({e.msg})") from None
    ranks = [n for n in manifest["files"] if n.startswith("rank-")]
    world_size = int(manifest.get("world_size", len(ranks)))  # older manifests: count the files
    missing = [rank_file(k) for k in range(world_size) if rank_file(k) not in manifest["files"]]
    if "state.pt" not in manifest["files"] or missing:
        raise CorruptCheckpoint(f"the manifest lacks {', '.join(missing or ['state.pt'])}")
    manifest["world_size"] = world_size
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
    rank: dict[str, Any] | None  # None: a process the checkpoint has no state for (the world size grew)
    world_size: int = 1


def _load(path: Path, mmap: bool = False) -> dict[str, Any]:
    """``mmap``: the tensors stay mapped from the file and are paged in only when touched (a tool that needs the
    student alone does not load the optimizers' moments into memory: for the full SD2.1 scheme most of ``state.pt``)."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def find_latest_good(run_dir: str | Path, warn: Callable[[str], None] = print) -> Loaded | None:
    """The newest checkpoint whose files all verify (every process's included) and whose shared state loads
    (``weights_only``: never unpickle arbitrary objects); each bad one on the way is reported through ``warn``.
    Under DDP only the main process calls this; the others load the checkpoint it chose (:func:`load_checkpoint`)."""
    for step, path in reversed(list_checkpoints(run_dir)):
        try:
            manifest = verify(path)
            return Loaded(step, path, _load(path / "state.pt"), None, manifest["world_size"])
        except (CorruptCheckpoint, RuntimeError, OSError, EOFError, ValueError, KeyError) as e:
            warn(f"checkpoint {path} is unusable ({str(e).splitlines()[0]}); trying the previous one")
    return None


def check_world_size(found: Loaded, world_size: int, policy: str) -> str | None:
    """Refuse (``policy="refuse"``) a checkpoint written by a different number of processes, or return the warning
    to print when resuming from it anyway (``"resume"``)."""
    if found.world_size == world_size:
        return None
    what = (f"checkpoint {found.path.name} was written by {found.world_size} process(es), this run has "
            f"{world_size}")
    if policy == "refuse":
        raise WorldSizeChanged(
            f"{what}: run with {found.world_size} processes to resume it exactly, or set "
            f"checkpoint.world_size_change=resume to continue from it (models, optimizers and step kept; data order "
            f"and random streams of the processes not in it start afresh, so the run is not bitwise reproducible)")
    return (f"{what}: resuming its models, optimizers and step (checkpoint.world_size_change=resume); processes "
            f"without a saved state start fresh data order and random streams, and the global batch is now "
            f"{world_size} × train.batch_size")


def load_checkpoint(path: Path, rank: int, shared: dict[str, Any] | None = None, mmap: bool = False) -> Loaded:
    """The shared state (unless already loaded; ``mmap``: mapped, see :func:`_load`) and process ``rank``'s state of a
    checkpoint that was verified."""
    rank_path = path / rank_file(rank)
    shared = shared if shared is not None else _load(path / "state.pt", mmap)
    return Loaded(int(shared["step"]), path, shared, _load(rank_path) if rank_path.is_file() else None)


def load_latest_good(run_dir: str | Path, rank: int = 0, warn: Callable[[str], None] = print) -> Loaded | None:
    """One process's view of the newest good checkpoint (tools and tests; training uses the two steps above)."""
    found = find_latest_good(run_dir, warn)
    if found is None:
        return None
    loaded = load_checkpoint(found.path, rank, found.shared)
    loaded.world_size = found.world_size
    return loaded
