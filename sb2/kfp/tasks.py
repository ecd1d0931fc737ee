"""The glue between KFP artifacts and the stage functions, shared by every component in ``components/``.

A pipeline run resolves and validates its config once (:func:`pipeline_config`); every task receives that YAML text and
adds only the paths of its artifacts (:func:`config_from_yaml`). Training writes its checkpoints to the PVC
(``work_dir``), so a retried task resumes, and copies only the finished student into its Model artifact.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

from sb2.config import Config, load_config
from sb2.kfp.launcher import accelerate_command


def pipeline_config(profile: str, overrides: list[str], models: dict[str, str] | None = None, steps: int = 0,
                    lam: float | None = None, prompt_sources: str = "", tracking_uri: str = "",
                    work_root: str = "") -> str:
    """The validated config of one pipeline run as YAML: the profile; the pipeline's parameters (model ids or paths,
    an empty one keeps the profile's; steps, 0 keeps the profile's; λ; the prompt sources, a YAML list, empty keeps
    the profile's; the MLflow server; the reference features on the volume); then free ``key=value`` overrides."""
    sets = [f"models.{k}={v}" for k, v in (models or {}).items() if v]
    sets += [f"train.steps={steps}"] if steps else []
    sets += [f"merge.lam={lam}"] if lam is not None else []
    if tracking_uri:
        sets.append(f"tracking.uri={tracking_uri}")
    if work_root:
        sets.append(f"evaluate.reference_dir={Path(work_root) / 'reference' / profile}")
    cfg = load_config(profile, sets + list(overrides))
    tree = cfg.model_dump(mode="json")
    if prompt_sources.strip():
        tree["prompts"]["sources"] = yaml.safe_load(prompt_sources)
        cfg = Config.model_validate(tree)  # a bad source is a config error here, before any GPU starts
        tree = cfg.model_dump(mode="json")
    return yaml.safe_dump(tree, sort_keys=False)


def config_from_yaml(text: str, overrides: list[str] | None = None) -> Config:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.yaml"
        path.write_text(text)
        return load_config(None, overrides or [], path)


def write_train_config(config: str, prompts: str | Path, work_dir: str | Path) -> Path:
    """The run's config with this branch's prompt set, next to the branch's folder on the volume: what `sb2 train -c`
    reads, in this task or on every node of a multi-node job."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    cfg_file = work.parent / f"{work.name}.config.yaml"
    cfg = config_from_yaml(config, [f"train.prompts={prompts}"])
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return cfg_file


def copy_student(work_dir: str | Path, student_dir: str | Path, steps: int | None = None) -> Path:
    """The finished branch (student, LoRA teacher, logs), not its checkpoints, into the task's Model artifact. A
    training process that exits without a student, or before ``steps`` (stopped by SIGTERM after a checkpoint: `sb2
    train` exits 0 then), fails the task, so KFP retries it and the retry resumes from the checkpoint on the volume."""
    from sb2.train.checkpoint import CKPT_DIR

    work = Path(work_dir)
    info = work / "train.json"
    if steps is not None and (not info.is_file() or json.loads(info.read_text()).get("steps") != steps):
        raise RuntimeError(f"training in {work} stopped before step {steps} (preempted?); its checkpoint stays on the "
                           f"volume and the retried task resumes from it")
    if not (work / "student").is_dir():
        raise RuntimeError(f"training left no student in {work} (interrupted?); a retry resumes from its checkpoints")
    shutil.copytree(work, student_dir, ignore=shutil.ignore_patterns(CKPT_DIR), dirs_exist_ok=True)
    return Path(student_dir) / "student"


def run_forwarding_signals(cmd: list[str], env: dict[str, str]) -> None:
    """Run the training command and pass SIGTERM/SIGINT on to it: Kubernetes signals only the container's main
    process (this task), and `sb2 train` must see the preemption to checkpoint before the grace period ends."""
    import signal
    import threading

    proc = subprocess.Popen(cmd, env=env)
    old = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, lambda signum, frame: proc.send_signal(signum))
    try:
        code = proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if code != 0:
        raise subprocess.CalledProcessError(code, cmd)


def train_branch(config: str, scheme: str, prompts_dir: str, work_dir: str, student_dir: str,
                 gpus_per_node: int, env: dict[str, str] | None = None) -> Path:
    """Train one branch into ``work_dir`` (on the PVC; resumed from its newest checkpoint when the task is retried)
    through :func:`accelerate_command`, then copy the student and its logs, not the checkpoints, to ``student_dir``."""
    cfg_file = write_train_config(config, prompts_dir, work_dir)
    env = dict(os.environ if env is None else env)
    cmd = accelerate_command(env, gpus_per_node, ["--scheme", scheme, "-c", str(cfg_file), "--out", str(work_dir)])
    run_forwarding_signals(cmd, env)
    return copy_student(work_dir, student_dir, steps=yaml.safe_load(cfg_file.read_text())["train"]["steps"])
