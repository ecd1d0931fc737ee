"""A KFP retry of a training task resumes from the checkpoints on the volume instead of starting over.

The component function itself (components/stages.py:train_branch) runs twice against the same work_root and run id,
as a retried task does on the PVC: the first attempt is killed with its whole process group after a checkpoint (a
preempted or evicted pod), the second finishes the run from that checkpoint and hands on the student.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sb2.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
STEPS, KILL_AFTER = 6, 2
# One attempt of the task: the component's Python function with its artifacts at local paths, as kfp.local and the
# KFP launcher call it.
ATTEMPT = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from kfp import dsl
from components.stages import train_branch
config, prompts, work_root, student = sys.argv[2:6]
train_branch.python_func(config=Path(config).read_text(), scheme="lora", prompts=dsl.Dataset(uri=prompts),
                         gpus_per_node=1, work_root=work_root, run_id="run-1", student=dsl.Model(uri=student))
"""


def _attempt(tmp_path: Path) -> list[str]:
    return [sys.executable, "-c", ATTEMPT, str(ROOT), str(tmp_path / "config.yaml"),
            str(ROOT / "data" / "samples" / "prompts.txt"), str(tmp_path / "pvc"), str(tmp_path / "student")]


def _steps(work: Path) -> list[int]:
    lines = (work / "logs" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if "loss/vsd" in line]


def test_a_retried_training_task_resumes_from_the_volume(tmp_path):
    from sb2.kfp.tasks import pipeline_config

    (tmp_path / "config.yaml").write_text(pipeline_config("tiny", [f"train.steps={STEPS}", "checkpoint.every=1",
                                                                   "checkpoint.keep_last=2", "tracking.enabled=false"]))
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    work = tmp_path / "pvc" / "runs" / "run-1" / "lora"

    first = subprocess.Popen(_attempt(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    deadline = time.monotonic() + 300
    while not (work / "checkpoints" / ckpt.checkpoint_name(KILL_AFTER)).exists():
        assert first.poll() is None, f"the first attempt ended (rc {first.returncode}): {first.stderr.read()}"
        assert time.monotonic() < deadline, "no checkpoint in 300 s"
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)  # the pod goes: the task's process and its training process with it
    first.wait()
    assert not (work / "student").exists() and not (tmp_path / "student").exists()
    killed_at = max(step for step, _ in ckpt.list_checkpoints(work))
    assert killed_at < STEPS, "the first attempt finished before it was killed"
    logged_before = len(_steps(work))

    retry = subprocess.run(_attempt(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert retry.returncode == 0, retry.stderr
    assert "resuming from" in retry.stderr and f"(step {killed_at})" in retry.stderr
    # the retry trained the remaining steps only
    assert _steps(work)[logged_before:] == list(range(killed_at + 1, STEPS + 1))
    assert json.loads((tmp_path / "student" / "train.json").read_text())["scheme"] == "lora"
    assert (tmp_path / "student" / "student").is_dir() and not (tmp_path / "student" / "checkpoints").exists()


def test_a_training_task_that_stopped_without_a_student_fails(tmp_path):
    """`sb2 train` exits 0 after a SIGTERM checkpoint (preemption): the task must fail, not pass an empty artifact
    on, so that KFP retries it."""
    import pytest

    from sb2.kfp.tasks import copy_student

    (tmp_path / "work" / "checkpoints" / ckpt.checkpoint_name(3)).mkdir(parents=True)
    with pytest.raises(RuntimeError, match="no student .* a retry resumes"):
        copy_student(tmp_path / "work", tmp_path / "artifact")
    assert not (tmp_path / "artifact").exists()
