"""`sb2 student-from-checkpoint`: the student of any checkpoint of a run, saved as the run saves its final student."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WEIGHTS = {"full": "diffusion_pytorch_model.safetensors", "lora": "adapter_model.safetensors"}


def _train(out: Path, scheme: str, steps: int, *sets: str) -> Path:
    from sb2.config import load_config
    from sb2.train.loop import train

    cfg = load_config("tiny", [f"train.steps={steps}", "checkpoint.every=1", "checkpoint.keep_last=10",
                               "tracking.enabled=false", "tracking.image_every=0", *sets])
    return train(cfg, scheme, out)


def _tensors(folder: Path, scheme: str) -> dict[str, torch.Tensor]:
    return load_file(str(folder / WEIGHTS[scheme]))


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) > 4
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("scheme", ["full", "lora"])
def test_a_checkpoints_student_is_the_student_of_a_run_that_stopped_there(tmp_path, scheme):
    from sb2.train.student_export import PROVENANCE, student_from_checkpoint

    final = _train(tmp_path / "run", scheme, 2)
    short = _train(tmp_path / "short", scheme, 1)  # the same seed: its one step is the longer run's first
    last = student_from_checkpoint(tmp_path / "run", tmp_path / "at2")  # the newest: step 2
    _assert_equal(_tensors(last, scheme), _tensors(final, scheme))
    first = student_from_checkpoint(tmp_path / "run", tmp_path / "at1", step=1)
    _assert_equal(_tensors(first, scheme), _tensors(short, scheme))
    assert not all(torch.equal(v, _tensors(last, scheme)[k]) for k, v in _tensors(first, scheme).items())
    info = json.loads((first / PROVENANCE).read_text())
    assert (info["step"], info["scheme"], info["ema"]) == (1, scheme, False)
    if scheme == "full":
        assert json.loads((first / "config.json").read_text()) == json.loads((final / "config.json").read_text())
    else:
        assert (first / "sb2_lora.json").read_text() == (final / "sb2_lora.json").read_text()
    # and it generates as the final student does
    from sb2.config import load_config
    from sb2.generation.generator import OneStepGenerator

    cfg = load_config("tiny")
    a = OneStepGenerator.load(last, cfg, device="cpu")(["a red cube"], seeds=[0])
    b = OneStepGenerator.load(final, cfg, device="cpu")(["a red cube"], seeds=[0])
    assert torch.equal(a, b)


@pytest.mark.parametrize("scheme", ["full", "lora"])
def test_with_an_ema_the_ema_weights_are_saved_unless_asked_otherwise(tmp_path, scheme):
    from sb2.train.student_export import PROVENANCE, student_from_checkpoint

    ema_sets = ("ema.enabled=true", "ema.decay=0.5")
    final = _train(tmp_path / "run", scheme, 2, *ema_sets)
    short = _train(tmp_path / "short", scheme, 1, *ema_sets)
    ema = student_from_checkpoint(tmp_path / "run", tmp_path / "ema")
    _assert_equal(_tensors(ema, scheme), _tensors(final, scheme))  # the run's end saves the EMA weights too
    at1 = student_from_checkpoint(tmp_path / "run", tmp_path / "ema1", step=1)
    _assert_equal(_tensors(at1, scheme), _tensors(short, scheme))  # the EMA as it stood at step 1
    raw = student_from_checkpoint(tmp_path / "run", tmp_path / "raw", ema=False)
    assert json.loads((raw / PROVENANCE).read_text())["ema"] is False
    assert json.loads((ema / PROVENANCE).read_text())["ema"] is True
    assert any(not torch.equal(v, _tensors(ema, scheme)[k]) for k, v in _tensors(raw, scheme).items())


def test_nothing_is_overwritten_and_a_corrupt_newest_checkpoint_is_passed_over(tmp_path, capsys):
    from sb2.train import checkpoint as ckpt
    from sb2.train.student_export import PROVENANCE, student_from_checkpoint

    run = tmp_path / "run"
    _train(run, "lora", 2)
    for out, msg in ((run, "would replace the run"), (tmp_path, "would replace the run"),
                     (run / "student", "exists and is not empty")):
        with pytest.raises(ValueError, match=msg):
            student_from_checkpoint(run, out)
    assert (run / "student" / "adapter_model.safetensors").is_file() and ckpt.list_checkpoints(run)
    state = run / ckpt.CKPT_DIR / ckpt.checkpoint_name(2) / "state.pt"
    state.write_bytes(state.read_bytes()[:-10] + b"0123456789")
    out = student_from_checkpoint(run, tmp_path / "newest")  # the newest good one: step 1
    assert json.loads((out / PROVENANCE).read_text())["step"] == 1
    assert "unusable" in capsys.readouterr().err


def test_the_command_names_a_missing_step_and_refuses_a_corrupt_checkpoint(tmp_path):
    _train(tmp_path / "run", "lora", 2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "sb2.cli", "student-from-checkpoint", *args], env=env,
                              capture_output=True, text=True, timeout=300, check=False)

    r = cli(str(tmp_path / "run"), "--out", str(tmp_path / "s7"), "--step", "7")
    assert r.returncode == 2 and "no checkpoint at step 7" in r.stderr and "[1, 2]" in r.stderr
    from sb2.train import checkpoint as ckpt

    state = tmp_path / "run" / ckpt.CKPT_DIR / ckpt.checkpoint_name(1) / "state.pt"
    assert state.is_file()
    state.write_bytes(state.read_bytes()[:-10] + b"0123456789")  # same size, other bytes
    r = cli(str(tmp_path / "run"), "--out", str(tmp_path / "s1"), "--step", "1")
    assert r.returncode == 2 and "unusable" in r.stderr and "checksum" in r.stderr, r.stderr
    assert not (tmp_path / "s1").exists()
    r = cli(str(tmp_path / "run"), "--out", str(tmp_path / "s2"))
    assert r.returncode == 0 and "at step 2" in r.stdout, r.stderr
    assert (tmp_path / "s2" / "adapter_model.safetensors").is_file()
    r = cli(str(tmp_path / "nothing"), "--out", str(tmp_path / "s0"))
    assert r.returncode == 2 and "no checkpoints under" in r.stderr


def test_the_checkpoint_is_mapped_so_the_optimizers_state_is_not_read(tmp_path):
    """``student-from-checkpoint`` loads ``state.pt`` mapped: the student's tensors are read, the optimizers'
    moments (most of the file for the full SD2.1 scheme) are not. Peak memory of a process that loads a checkpoint
    with 400 MB of optimizer state and touches only the student, mapped and not."""
    state = tmp_path / "state.pt"
    torch.save({"student": {"w": torch.arange(1000.0)}, "optimizer": {"m": torch.ones(100_000_000)}}, state)
    # VmHWM, this process's own peak resident memory (ru_maxrss would carry the parent's peak over the exec)
    code = ("import sys; from pathlib import Path; from sb2.train.checkpoint import _load; "
            "s = _load(Path(sys.argv[1]), mmap=sys.argv[2] == '1'); assert float(s['student']['w'].sum()) == 499500.0; "
            "print([int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    root = Path(__file__).resolve().parents[1]
    peak = {m: int(subprocess.run([sys.executable, "-c", code, str(state), m], cwd=root, capture_output=True,
                                  text=True, check=True, timeout=300).stdout.split()[-1]) for m in ("0", "1")}
    assert peak["0"] - peak["1"] > 300_000  # KiB: the 400 MB of moments were read only without the map
    src = (root / "sb2" / "train" / "student_export.py").read_text()
    assert "load_checkpoint(path, 0, mmap=True)" in src  # and the command loads it that way
