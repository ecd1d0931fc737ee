"""The validated config: profiles, overrides, and one-line errors."""

import subprocess
import sys

import pytest

from sb2.config import ConfigError, load_config


def test_profiles_resolve():
    sd = load_config("sd21")
    assert sd.models.teacher == "stabilityai/stable-diffusion-2-1-base"
    assert sd.models.student == "stabilityai/sd-turbo"
    assert (sd.vsd.guidance_scale, sd.lora_teacher.rank, sd.lora_teacher.alpha) == (4.5, 64, 128)
    assert (sd.student_lora.rank, sd.student_lora.alpha, sd.clip_loss.tau, sd.clip_loss.weight) == (256, 512, 0.35, 0.1)
    assert (sd.optim.student_lr, sd.lora_teacher.lr, sd.merge.lam) == (1e-6, 1e-3, 0.5)
    assert load_config("tiny").models.teacher == "tiny:teacher"


def test_overrides_are_typed():
    cfg = load_config("tiny", ["train.steps=7", "clip_loss.clamp=false", "optim.student_lr=3e-4"])
    assert cfg.train.steps == 7 and cfg.clip_loss.clamp is False and cfg.optim.student_lr == 3e-4


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.stepz=3", "train.stepz: unknown key"),
        ("merge.lam=1.5", "merge.lam"),
        ("clip_loss.tau=2", "clip_loss.tau"),
        ("lora_teacher.rank=0", "lora_teacher.rank"),
        ("train.steps=-1", "train.steps"),
        ("train.steps=many", "train.steps"),
        ("vsd.t_min=0.99", "t_min must be below t_max"),
        ("nonsense", "expected key=value"),
        ("models.teacher=/no/such/folder", "models.teacher: local model path '/no/such/folder' does not exist"),
        ("train.ddp.comm_hook=int8", "train.ddp.comm_hook: Input should be 'none', 'fp16' or 'bf16'"),
        ("train.ddp.bucket_cap_mb=0", "train.ddp.bucket_cap_mb"),
        ("train.ddp.static_graph=maybe", "train.ddp.static_graph"),
        ("train.ddp.find_unused_parameters=true", "train.ddp.find_unused_parameters: unknown key"),
    ],
)
def test_bad_values_are_one_line_errors(override, words):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    assert words in str(e.value) and "\n" not in str(e.value)


def test_unknown_profile():
    with pytest.raises(ConfigError, match="unknown profile"):
        load_config("nope")


def test_cli_bad_config_exits_2_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sb2.cli", "train", "--scheme", "full", "--out", str(tmp_path / "o"),
                        "-p", "tiny", "--set", "merge.lam=3"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: merge.lam") and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_cli_help_lists_commands():
    r = subprocess.run([sys.executable, "-m", "sb2.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for cmd in ("train", "merge", "generate", "export"):
        assert cmd in r.stdout


def test_a_home_directory_of_no_such_user_is_a_clear_error():
    """Found by tests/test_safety.py's random inputs: "~0" made pathlib raise RuntimeError instead of a config error."""
    from sb2.config import load_config

    with pytest.raises(ValueError, match="no such user's home directory"):
        load_config("tiny", ["models.teacher=~no_such_user_sb2"])
