"""Preemption safety: exact resume after SIGKILL, a clean exit on SIGTERM, fallback from a corrupt checkpoint, and
non-finite steps skipped and counted."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sb2.train import checkpoint as ckpt


def _train_cmd(out: Path, *sets: str) -> list[str]:
    cmd = [sys.executable, "-m", "sb2.cli", "train", "--scheme", "lora", "-p", "tiny", "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _env():
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def _weights(run: Path) -> dict[str, torch.Tensor]:
    out = {f"student.{k}": v for k, v in load_file(str(run / "student" / "adapter_model.safetensors")).items()}
    out.update({f"lora_teacher.{k}": v for k, v in load_file(str(run / "lora_teacher" / "adapter_model.safetensors")).items()})
    return out


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc {proc.returncode}) before {path} appeared: {proc.stderr.read()}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{path} did not appear in {timeout}s")
        time.sleep(0.02)


def test_sigkill_then_resume_is_bitwise_equal_to_an_unbroken_run(tmp_path):
    sets = ("train.steps=6", "checkpoint.every=1", "checkpoint.keep_last=2")
    subprocess.run(_train_cmd(tmp_path / "unbroken", *sets), check=True, env=_env(), capture_output=True)

    kill_after = random.randint(1, 4)
    broken = tmp_path / "broken"
    proc = subprocess.Popen(_train_cmd(broken, *sets), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for(broken / "checkpoints" / ckpt.checkpoint_name(kill_after), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (broken / "student").exists(), f"the run finished before SIGKILL (after step {kill_after})"
    r = subprocess.run(_train_cmd(broken, *sets), env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stderr
    a, b = _weights(tmp_path / "unbroken"), _weights(broken)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after SIGKILL at step {kill_after} and resume"


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(run, "train.steps=100000", "checkpoint.every=100000", "train.log_every=1"),
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(run / "logs" / "metrics.jsonl", proc)
    while not (run / "logs" / "metrics.jsonl").read_text().strip():
        time.sleep(0.02)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert time.monotonic() - t0 < 30
    assert "SIGTERM: checkpoint at step" in err
    step, path = ckpt.list_checkpoints(run)[-1]  # (the first step of a run checkpoints too)
    assert f"SIGTERM: checkpoint at step {step} saved" in err
    ckpt.verify(path)
    # and the run goes on from there
    r = subprocess.run(_train_cmd(run, f"train.steps={step + 1}"), env=_env(), capture_output=True, text=True)
    assert r.returncode == 0 and f"(step {step})" in r.stderr, r.stderr


def test_a_checkpoint_that_cannot_fit_in_the_grace_period_stops_at_the_deadline(tmp_path):
    """A grace period shorter than one step: warned about at start, with the numbers; then on SIGINT (handled as
    SIGTERM) the watchdog exits at the deadline, mid-step, with code 75, and the previous checkpoint stays good."""
    from sb2.train.loop import EXIT_GRACE_EXPIRED

    run, log = tmp_path / "run", tmp_path / "run.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(_train_cmd(run, "train.steps=100000", "checkpoint.every=100000",
                                           "checkpoint.grace_period_s=0.05", "tracking.enabled=false"),
                                env=_env(), stdout=f, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    while "more than fits in checkpoint.grace_period_s = 0.05 s" not in log.read_text():
        assert proc.poll() is None and time.monotonic() - t0 < 120, log.read_text()[-3000:]
        time.sleep(0.02)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == EXIT_GRACE_EXPIRED == 75, log.read_text()[-3000:]
    assert time.monotonic() - t0 < 5  # the deadline is 45 ms after the signal; this bound is generous
    text = log.read_text()
    assert ("SIGINT: the checkpoint could not be completed within the grace period (checkpoint.grace_period_s = "
            "0.05 s); exiting with code 75") in text
    assert "The newest complete checkpoint is step 1" in text
    assert ckpt.load_latest_good(run).step == 1


def test_truncated_latest_checkpoint_falls_back_to_the_previous(tiny_cfg, tmp_path):
    from sb2.train.loop import train

    cfg = tiny_cfg.model_copy(deep=True)
    cfg.train.steps, cfg.checkpoint.every, cfg.checkpoint.keep_last = 4, 1, 3
    train(cfg, "full", tmp_path, progress=False)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3, 4]
    latest = tmp_path / "checkpoints" / ckpt.checkpoint_name(4) / "state.pt"
    with open(latest, "r+b") as f:
        f.truncate(latest.stat().st_size // 2)
    warnings = []
    found = ckpt.load_latest_good(tmp_path, warn=warnings.append)
    assert found.step == 3
    assert len(warnings) == 1 and "step-00000004" in warnings[0] and "bytes" in warnings[0]
    # a checkpoint whose write never finished (no manifest) is skipped too
    (tmp_path / "checkpoints" / ckpt.checkpoint_name(3) / "MANIFEST.json").unlink()
    assert ckpt.load_latest_good(tmp_path, warn=warnings.append).step == 2
    cfg.train.steps = 5
    train(cfg, "full", tmp_path, progress=False)
    assert json.loads((tmp_path / "train.json").read_text())["steps"] == 5


def test_checkpoints_keep_the_last_k_and_hold_everything(tiny_cfg, tmp_path):
    from sb2.train.loop import train

    cfg = tiny_cfg.model_copy(deep=True)
    cfg.train.steps, cfg.checkpoint.every, cfg.checkpoint.keep_last = 5, 1, 2
    cfg.ema.enabled = True
    train(cfg, "lora", tmp_path, progress=False)
    saved = ckpt.list_checkpoints(tmp_path)
    assert [s for s, _ in saved] == [4, 5]
    found = ckpt.load_latest_good(tmp_path)
    assert set(found.shared) >= {"student", "lora_teacher", "opt_student", "opt_lora_teacher", "ema", "step",
                                 "config", "nonfinite_skips"}
    assert set(found.rank) == {"rng", "sampler"} and set(found.rank["rng"]) >= {"torch", "numpy", "python"}
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_nonfinite_steps_are_skipped_and_counted(tiny_cfg, tmp_path, monkeypatch):
    import sb2.train.loop as loop

    real = loop.student_step
    calls = {"n": 0}

    def flaky(m, cfg, emb, null, prompts, step, autocast):
        out = real(m, cfg, emb, null, prompts, step, autocast)
        calls["n"] += 1
        return out._replace(loss=out.loss * float("nan")) if step == 1 else out

    monkeypatch.setattr(loop, "student_step", flaky)
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.train.steps = 3
    loop.train(cfg, "full", tmp_path, progress=False)
    info = json.loads((tmp_path / "train.json").read_text())
    assert info["nonfinite_skips"] == 1
    lines = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert any(x.get("train/nonfinite_skips") == 1 for x in lines)


def test_too_many_nonfinite_steps_stop_with_the_last_good_checkpoint(tiny_cfg, tmp_path, monkeypatch):
    import sb2.train.loop as loop

    real = loop.student_step

    def diverging(m, cfg, emb, null, prompts, step, autocast):
        out = real(m, cfg, emb, null, prompts, step, autocast)
        return out._replace(loss=out.loss * float("inf")) if step >= 2 else out

    monkeypatch.setattr(loop, "student_step", diverging)
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.train.steps, cfg.checkpoint.every, cfg.train.max_consecutive_nonfinite = 20, 2, 3
    with pytest.raises(loop.TrainingDiverged, match="3 consecutive non-finite steps.*last good checkpoint \\(step 2\\)"):
        loop.train(cfg, "full", tmp_path, progress=False)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1, 2]  # the first step of a run checkpoints too
    assert not (tmp_path / "student").exists()


def test_a_cut_write_leaves_only_staging_which_the_next_checkpoint_clears(tmp_path):
    ckpt.begin_checkpoint(tmp_path, 1)
    ckpt.write_rank_state(tmp_path, 1, 0, {"x": torch.zeros(2)})
    ckpt.finish_checkpoint(tmp_path, 1, {"step": 1}, keep_last=3)
    ckpt.begin_checkpoint(tmp_path, 2)
    ckpt.write_rank_state(tmp_path, 2, 0, {"x": torch.ones(2)})  # ... and the process is gone
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1] and ckpt.load_latest_good(tmp_path).step == 1
    ckpt.begin_checkpoint(tmp_path, 3)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")] == [".tmp-step-00000003"]
    with pytest.raises(ckpt.CorruptCheckpoint, match="rank-1.pt not written"):  # a process did not write its state
        ckpt.write_rank_state(tmp_path, 3, 0, {}) or ckpt.finish_checkpoint(tmp_path, 3, {"step": 3}, 3, world_size=2)
