"""MLflow behind the :class:`sb2.tracking.Logger` interface.

With no ``MLFLOW_TRACKING_URI`` (and no ``tracking.uri``), runs go to a SQLite store in the project
(``sqlite:///mlflow.db``, MLflow 3's own default); with one, to that server. Runs are tagged with the git commit
and the DVC lock hash, so a run points back at the code and data that made it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

from sb2.tracking import flatten, redact

def tracking_uri(cfg_tracking) -> str:
    return cfg_tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def revision_tags(stage: str) -> dict[str, str]:
    tags = {"sb2.stage": stage}
    commit = _git_commit()
    if commit:
        tags["git.commit"] = commit
    lock = Path("dvc.lock")
    if lock.is_file():
        tags["dvc.lock_sha256"] = hashlib.sha256(lock.read_bytes()).hexdigest()
    return tags


class MlflowLogger:
    def __init__(self, cfg_tracking, stage: str, run_name: str | None = None):
        import mlflow

        self.tracking_uri = tracking_uri(cfg_tracking)
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_experiment(cfg_tracking.experiment)
        self._mlflow = mlflow
        self.run = mlflow.start_run(run_name=run_name or stage, tags=revision_tags(stage),
                                    log_system_metrics=cfg_tracking.system_metrics)
        self.run_id = self.run.info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        flat = redact(flatten(params))
        self._mlflow.log_params({k: str(v)[:6000] for k, v in flat.items()}, run_id=self.run_id)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        clean = {k.replace("/", "."): float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self._mlflow.log_metrics(clean, step=step, run_id=self.run_id)

    def log_image(self, path: str | Path, name: str | None = None, step: int | None = None) -> None:
        from PIL import Image

        if step is None:
            self._mlflow.log_artifact(str(path), "images", run_id=self.run_id)
        else:  # a step-indexed image series, browsable in the MLflow UI
            self._mlflow.log_image(Image.open(path), key=name or Path(path).stem, step=step)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self._mlflow.log_artifacts(str(p), folder, run_id=self.run_id)
        else:
            self._mlflow.log_artifact(str(p), folder, run_id=self.run_id)

    def close(self) -> None:
        if self._mlflow.active_run() is not None and self._mlflow.active_run().info.run_id == self.run_id:
            self._mlflow.end_run()
        else:
            self._mlflow.MlflowClient().set_terminated(self.run_id)

