"""One logger interface for training, evaluation and registration.

Stages talk to a :class:`Logger`; the console/JSONL logger here is the default, and the MLflow logger plugs in
behind the same methods.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Protocol


class Logger(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, path: str | Path, name: str | None = None) -> None: ...
    def close(self) -> None: ...


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


class JsonlLogger:
    """Writes ``params.json`` and one JSON line per ``log_metrics`` call to ``metrics.jsonl`` in ``folder``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.folder / "metrics.jsonl", "a", buffering=1)

    def log_params(self, params: dict[str, Any]) -> None:
        (self.folder / "params.json").write_text(json.dumps(flatten(params), indent=2, default=str))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._metrics.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")

    def log_image(self, path: str | Path, name: str | None = None) -> None:
        pass  # the image is already on disk in the run folder

    def close(self) -> None:
        self._metrics.close()
