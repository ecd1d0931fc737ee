"""The register stage: log the merged student as an MLflow pyfunc, register a new version as ``challenger``, and move
``champion`` to it only when its metrics beat the current champion's.

The gate is a pure function. Concurrent registrations are serialized by a lock that is itself a registered model
(``<name>.sb2-lock``): creating it is atomic on every MLflow backend (a unique name), so two registrations can never
both read the old champion and both promote.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass
class Decision:
    promote: bool
    reason: str


def _num(metrics: dict[str, Any] | None, key: str) -> float | None:
    if not metrics or key not in metrics:
        return None
    try:
        v = float(metrics[key])
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def promotion_decision(candidate: dict[str, Any] | None, champion: dict[str, Any] | None,
                       clip_margin: float) -> Decision:
    """Promote iff the candidate has a finite FID, and either there is no champion or the FID is lower and the CLIP
    score is not worse than the champion's by more than ``clip_margin``. Missing or NaN metrics never promote."""
    fid = _num(candidate, "fid")
    if fid is None:
        return Decision(False, "candidate has no finite FID")
    if champion is None:
        return Decision(True, f"first model with metrics (FID {fid:.4g})")
    champ_fid, champ_clip = _num(champion, "fid"), _num(champion, "clip_score")
    if champ_fid is None:
        return Decision(True, f"current champion has no finite FID; candidate FID {fid:.4g}")
    if fid >= champ_fid:
        return Decision(False, f"FID {fid:.4g} does not beat the champion's {champ_fid:.4g}")
    clip = _num(candidate, "clip_score")
    if champ_clip is not None:
        if clip is None:
            return Decision(False, "candidate has no finite CLIP score to compare with the champion's")
        if clip < champ_clip - clip_margin:
            return Decision(False, f"CLIP {clip:.4g} is worse than the champion's {champ_clip:.4g} by more than "
                                   f"{clip_margin}")
    return Decision(True, f"FID {fid:.4g} beats the champion's {champ_fid:.4g}")


@contextmanager
def registry_lock(client, name: str, timeout_s: float, stale_s: float):
    import uuid

    from mlflow.exceptions import MlflowException

    lock, owner = f"{name}.sb2-lock", uuid.uuid4().hex
    t0 = time.monotonic()
    while True:
        try:
            client.create_registered_model(lock, tags={"acquired_at": str(time.time()), "owner": owner})
            break
        except MlflowException as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code) and "already exists" not in str(e).lower():
                raise
            try:
                tags = client.get_registered_model(lock).tags
            except MlflowException:
                continue  # released in between: try again
            # The client retries a request that timed out; the retry of our own successful create then reports
            # "already exists": the owner tag tells that the lock is ours.
            if tags.get("owner") == owner:
                break
            if time.time() - float(tags.get("acquired_at", "0")) > stale_s:  # its holder died: break the lock
                try:
                    client.delete_registered_model(lock)
                except MlflowException:
                    pass
                continue
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"registry lock {lock!r} held for more than {timeout_s:.0f}s") from None
            time.sleep(0.2)
    try:
        yield
    finally:
        try:
            client.delete_registered_model(lock)
        except MlflowException:
            pass


def _version_metrics(version) -> dict[str, Any]:
    return {k.removeprefix("metric."): v for k, v in version.tags.items() if k.startswith("metric.")}


def read_metrics(path: str | Path | None) -> dict[str, Any] | None:
    if path is None or not Path(path).is_file():
        return None
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def register(model: str | Path, metrics_path: str | Path | None, cfg, out_dir: str | Path) -> dict[str, Any]:
    """Register ``model`` (a merged UNet folder, LoRA student or exported pipeline) with its metrics; write
    ``out_dir/registration.json`` (version, decision, numbers, run id) and return it."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from sb2.atomic import atomic_dir
    from sb2.generation.export import export_pipeline
    from sb2.mlflow_logger import MlflowLogger
    from sb2.serving import OneStepImageModel

    rc = cfg.registry
    metrics = read_metrics(metrics_path)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model_path = Path(str(model))
        pipeline = model_path if (model_path / "model_index.json").is_file() else export_pipeline(
            model_path, cfg, tmp / "pipeline")
        logger = MlflowLogger(cfg.tracking, "register")
        try:
            signature = ModelSignature(
                inputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "seed", required=False)]),
                outputs=Schema([ColSpec("string", "image_png_base64")]),
            )
            info = mlflow.pyfunc.log_model(
                name="model", python_model=OneStepImageModel(), artifacts={"pipeline": str(pipeline)},
                signature=signature, pip_requirements=["sb2", "torch", "diffusers", "transformers", "pillow", "pandas"],
            )
            for k, v in (metrics or {}).items():
                if isinstance(v, (int, float)) and math.isfinite(float(v)):
                    mlflow.log_metric(k, float(v), run_id=logger.run_id)
            client = MlflowClient(logger.tracking_uri)
            tags = {f"metric.{k}": str(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
            tags["source"] = str(model)
            mv = mlflow.register_model(info.model_uri, rc.model_name, tags=tags, await_registration_for=60)
            client.set_registered_model_alias(rc.model_name, CHALLENGER, mv.version)
            with registry_lock(client, rc.model_name, rc.lock_timeout_s, rc.stale_lock_s):
                try:
                    champ = client.get_model_version_by_alias(rc.model_name, CHAMPION)
                except Exception:  # noqa: BLE001 — no champion yet
                    champ = None
                champ_metrics = _version_metrics(champ) if champ is not None else None
                decision = promotion_decision(metrics, champ_metrics, rc.clip_margin)
                if decision.promote:
                    client.set_registered_model_alias(rc.model_name, CHAMPION, mv.version)
            client.set_model_version_tag(rc.model_name, mv.version, "gate.promoted", str(decision.promote).lower())
            client.set_model_version_tag(rc.model_name, mv.version, "gate.reason", decision.reason)
            client.set_model_version_tag(rc.model_name, mv.version, "gate.champion_before",
                                         str(champ.version) if champ is not None else "none")
        finally:
            logger.close()
        record = {
            "model_name": rc.model_name, "version": int(mv.version), "promoted": decision.promote,
            "reason": decision.reason, "metrics": metrics, "champion_before": int(champ.version) if champ else None,
            "champion_metrics_before": champ_metrics, "run_id": logger.run_id, "model_uri": info.model_uri,
            "tracking_uri": logger.tracking_uri,
        }
        (tmp / "registration.json").write_text(json.dumps(record, indent=2))
    return record
