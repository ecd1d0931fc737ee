"""Hostile inputs: config values, model files that are not what they claim, stages that fail halfway."""

import shutil
import string

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sb2.config import ConfigError, load_config
from sb2.models.loading import ModelLoadError, load_one_step_unet, load_unet, resolve

KEYS = ["train.steps", "merge.lam", "clip_loss.tau", "lora_teacher.rank", "vsd.t_min", "optim.student_lr",
        "models.teacher", "train", "nope", "clip_loss", "generate.dtype", "vsd.weighting", ""]
values = st.one_of(st.text(), st.integers(), st.floats(allow_nan=True), st.booleans(), st.none(),
                   st.lists(st.integers(), max_size=3), st.text(alphabet=string.printable, max_size=20))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.one_of(st.sampled_from(KEYS), st.text(max_size=30)), value=values)
def test_config_loader_never_crashes(key, value):
    try:
        cfg = load_config("tiny", [f"{key}={value}"])
    except ConfigError as e:
        msg = str(e)
        assert msg and "\n" not in msg  # one line, naming the problem
    else:
        assert 0.0 <= cfg.merge.lam <= 1.0 and -1.0 <= cfg.clip_loss.tau <= 1.0 and cfg.lora_teacher.rank > 0


@pytest.mark.parametrize("text", ["\x00\x01", "a.b.c.d=1", "=5", "train.steps=[", "train.steps=\ud800"])
def test_odd_overrides(text):
    try:
        load_config("tiny", [text])
    except ConfigError as e:
        assert "\n" not in str(e)


def test_a_file_that_is_not_safetensors_is_a_clear_error(tmp_path):
    folder = tmp_path / "student"
    shutil.copytree(resolve("tiny:student"), folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"this is not a safetensors file")
    with pytest.raises(ModelLoadError, match="cannot load UNet2DConditionModel"):
        load_unet(str(folder))


def test_pickled_weights_are_refused(tmp_path):
    folder = tmp_path / "student"
    shutil.copytree(resolve("tiny:student"), folder)
    unet = folder / "unet"
    sd = load_unet(str(folder)).state_dict()
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(sd, unet / "diffusion_pytorch_model.bin")  # a pickle: could run code when loaded
    with pytest.raises(ModelLoadError):
        load_unet(str(folder))


def test_missing_model_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_one_step_unet(tmp_path / "nothing-here")


def test_a_failed_merge_leaves_no_output(tmp_path):
    from sb2.merge import merge_students

    from sb2.models.tiny import tiny_unet

    other = tiny_unet(0)
    other.register_to_config(block_out_channels=(32, 64))
    from diffusers import UNet2DConditionModel

    small = UNet2DConditionModel(sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
                                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                 attention_head_dim=8, norm_num_groups=16)
    small.save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match="shape"):
        merge_students(resolve("tiny:student"), tmp_path / "small", 0.5, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]
