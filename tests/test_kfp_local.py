"""The whole Kubeflow pipeline, run by kfp.local's SubprocessRunner on the tiny profile: every component executes
in a subprocess of this interpreter, artifacts flow from task to task (through the dsl.OneOf of the volume and of
the training branches), training checkpoints stay on the "volume" (work_root), and the registry ends as after
`dvc repro`: version 1, champion and challenger."""

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _one(root: Path, pattern: str) -> Path:
    (hit,) = root.glob(pattern)
    return hit


@pytest.mark.timeout(480)
def test_pipeline_runs_end_to_end_locally(tmp_path, monkeypatch):
    from kfp import local
    from mlflow import MlflowClient

    repo = tmp_path / "repo"  # the image's working directory: the sample data at relative paths
    shutil.copytree(ROOT / "data" / "samples", repo / "data" / "samples")
    monkeypatch.chdir(repo)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}:{__import__('os').environ.get('PYTHONPATH', '')}")
    monkeypatch.syspath_prepend(str(ROOT))
    sys.modules.pop("pipelines.sb2_pipeline", None)
    from pipelines.sb2_pipeline import sb2_pipeline

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"),
               raise_on_error=True)
    work = tmp_path / "pvc"
    sb2_pipeline(profile="tiny", gpus_per_train=1, work_root=str(work), mlflow_tracking_uri=uri, lam=0.5)

    out = _one(tmp_path / "root", "sb2-swiftbrush-v2-*")
    ran = {p.name for p in out.iterdir() if (p / "executor_output.json").is_file()
           or p.name in ("named-volume", "resolve-config")}  # parameter outputs only: no file
    # the named volume (pvc_name's default), one training task a branch (train_nodes=1); the sweep is off by default
    assert ran == {"named-volume", "resolve-config", "build-prompts", "train-branch", "train-branch-2", "merge",
                   "evaluate", "generate", "register"}
    assert json.loads((out / "build-prompts/prompts/manifest.json").read_text())["total"]["train"] > 0
    for branch, scheme in (("train-branch", "full"), ("train-branch-2", "lora")):
        student = out / branch / "student"
        assert json.loads((student / "train.json").read_text())["scheme"] == scheme
        assert (student / "student").is_dir() and not (student / "checkpoints").exists()
        # the checkpoints stay on the volume, where a retried task resumes from them
        assert any(_one(work, f"runs/*/{scheme}").joinpath("checkpoints").iterdir())
    assert json.loads((out / "merge/merged/merge.json").read_text())["lambda"] == 0.5
    assert (out / "generate/grid").is_file() and (out / "generate/images/grid.png").is_file()
    scores = json.loads((out / "evaluate/evaluation/scores.json").read_text())
    assert {"fid", "clip_score"} <= set(scores)
    assert list(work.glob("reference/tiny/*"))  # the reference features, cached on the volume

    rec = json.loads((out / "register/registration/registration.json").read_text())
    assert (rec["version"], rec["promoted"], rec["metrics"]["fid"]) == (1, True, scores["fid"])
    client = MlflowClient(uri)
    assert str(client.get_model_version_by_alias("sb2-swiftbrush-v2", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("sb2-swiftbrush-v2", "challenger").version) == "1"
    assert client.get_model_version("sb2-swiftbrush-v2", "1").tags["gate.promoted"] == "true"
