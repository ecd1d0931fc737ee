"""`dvc repro` on the tiny profile in a temporary copy of the repository: the whole DAG runs, a second run does
nothing, and a changed parameter reruns only the stages that depend on it."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _dvc(cwd: Path, *args: str) -> str:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    r = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"dvc {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def _ran(log: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", log))


def test_dvc_repro_end_to_end_and_incremental(tmp_path):
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    repo = tmp_path / "repo"
    for f in files:
        if (ROOT / f).is_file():
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, repo / f)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    stages = set(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])

    first = _dvc(repo, "repro")
    assert _ran(first) == stages
    assert (repo / "outputs/images/grid.png").is_file()
    assert (repo / "outputs/registry/registration.json").is_file()
    for run in ("outputs/full", "outputs/lora", "outputs/eval"):  # each stage points at its MLflow run
        assert (repo / run / "mlflow_run.json").is_file()
    shown = _dvc(repo, "metrics", "show", "--json")
    assert "fid" in shown and "clip_score" in shown

    assert _ran(_dvc(repo, "repro")) == set()

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["merge"]["lam"] = 0.25
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    again = _dvc(repo, "repro")
    assert _ran(again) == {"merge", "evaluate", "generate", "register"}
    assert '"lambda": 0.25' in (repo / "outputs/merged/merge.json").read_text()
