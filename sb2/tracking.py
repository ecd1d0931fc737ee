"""One logger interface for training, evaluation and registration.

Stages talk to a :class:`Logger`; the console/JSONL logger here is the default, and the MLflow logger plugs in
behind the same methods.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Protocol


class Logger(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, path: str | Path, name: str | None = None, step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, folder: str | None = None) -> None: ...
    def close(self) -> None: ...


SECRET_WORDS = ("token", "secret", "password", "api_key", "apikey", "credential")


def redact(params: dict[str, Any]) -> dict[str, Any]:
    """Never log a value under a secret-looking key, nor any value containing a secret from the environment."""
    env_secrets = {v for k, v in os.environ.items() if any(w in k.lower() for w in SECRET_WORDS) and len(v) >= 8}
    out = {}
    for k, v in params.items():
        hit = any(w in k.lower() for w in SECRET_WORDS) or (isinstance(v, str) and any(s in v for s in env_secrets))
        out[k] = "***" if hit else v
    return out


def safe_config(cfg) -> dict[str, Any]:
    """The resolved config, flattened and redacted: what logs, checkpoints and MLflow params may hold."""
    return redact(flatten(cfg.model_dump(mode="json")))


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
        (self.folder / "params.json").write_text(json.dumps(redact(flatten(params)), indent=2, default=str))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._metrics.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")

    def log_image(self, path: str | Path, name: str | None = None, step: int | None = None) -> None:
        pass  # the image is already on disk in the run folder

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        pass

    def close(self) -> None:
        """Also writes ``history.json`` (one object per logged step, "/" in names as "."), which DVC plots."""
        self._metrics.close()
        rows = []
        for line in (self.folder / "metrics.jsonl").read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            rows.append({k.replace("/", "."): v for k, v in row.items() if k != "time"})
        (self.folder / "history.json").write_text(json.dumps(rows, indent=1))


class MultiLogger:
    """Fan out to several loggers (the run folder's JSONL and MLflow)."""

    def __init__(self, *loggers: Logger):
        self.loggers = [lg for lg in loggers if lg is not None]
        self.run_id = next((getattr(lg, "run_id", None) for lg in self.loggers if getattr(lg, "run_id", None)), None)

    def log_params(self, params):
        for lg in self.loggers:
            lg.log_params(params)

    def log_metrics(self, metrics, step):
        for lg in self.loggers:
            lg.log_metrics(metrics, step)

    def log_image(self, path, name=None, step=None):
        for lg in self.loggers:
            lg.log_image(path, name, step)

    def log_artifact(self, path, folder=None):
        for lg in self.loggers:
            lg.log_artifact(path, folder)

    def close(self):
        for lg in self.loggers:
            lg.close()


def stage_logger(cfg, stage: str, run_dir: str | Path) -> MultiLogger:
    """The logger of a stage: ``run_dir/logs`` always, plus an MLflow run when ``tracking.enabled``; the MLflow run id
    is written to ``run_dir/mlflow_run.json`` so the stage output and the run point at each other."""
    run_dir = Path(run_dir)
    loggers: list[Logger] = [JsonlLogger(run_dir / "logs")]
    if cfg.tracking.enabled:
        from sb2.mlflow_logger import MlflowLogger

        ml = MlflowLogger(cfg.tracking, stage)
        loggers.append(ml)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "mlflow_run.json").write_text(json.dumps(
            {"run_id": ml.run_id, "experiment": cfg.tracking.experiment, "tracking_uri": ml.tracking_uri,
             "stage": stage}, indent=2))
    return MultiLogger(*loggers)
