"""The committed mini-world (data/miniworld): the loader sees its models exactly as it sees real ones, and the judges
score real images near the accuracy the card reports."""

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1] / "data" / "miniworld"
pytestmark = pytest.mark.skipif(not (ROOT / "card.json").is_file(), reason="no committed mini-world")


def test_the_profile_loads_every_model_through_the_standard_loader():
    from sb2.config import load_config
    from sb2.models.loading import load_clip, load_teacher, load_tiny_vae, load_unet

    models = load_config("miniworld").models.model_copy(
        update={k: str(ROOT / k.replace("student", "turbo")) for k in ("teacher", "student", "tiny_vae", "clip")})
    teacher = load_teacher(models)
    assert teacher.unet.config.sample_size == 8 and teacher.text_encoder.dtype == torch.float32
    assert load_unet(models.student).config.cross_attention_dim == teacher.text_encoder.config.hidden_size
    assert load_tiny_vae(models.tiny_vae).config.latent_channels == 4
    clip = load_clip(models.clip)
    ids = clip.tokenizer(["there is a red triangle in the top left"])
    with torch.no_grad():  # the teacher's text encoder is the CLIP's text tower
        from sb2.miniworld.clip import open_clip_token_states

        torch.testing.assert_close(teacher.text_encoder(ids).last_hidden_state,
                                   open_clip_token_states(clip.model.float(), ids), atol=1e-4, rtol=1e-4)


def test_judges_score_real_images_near_their_reported_accuracy(monkeypatch):
    from sb2.miniworld.judges import attribute_accuracy, attribute_judge
    from sb2.miniworld.world import make_pairs

    monkeypatch.setenv("SB2_MINIWORLD", str(ROOT))
    card = json.loads((ROOT / "card.json").read_text())["models"]["judges/attributes"]["metrics"]
    images, _, scenes = make_pairs(0, "eval", 256)
    acc = attribute_accuracy(attribute_judge(), torch.from_numpy(images), scenes)
    for key in ("shape_or_empty", "color", "size", "alignment_real"):
        assert acc[key] >= card[key] - 0.03, key


def test_alignment_breakdown_of_real_images_and_of_images_of_other_captions():
    """Real eval images match their captions whatever is left unchecked; images shown against the wrong captions fail,
    and leaving a kind of statement unchecked can only raise the share."""
    import numpy as np

    from sb2.miniworld import world
    from sb2.miniworld.judges import STATEMENTS, alignment_breakdown, load_judge, world_root

    net = load_judge(world_root() / "judges" / "attributes")
    images, _, scenes = world.make_pairs(0, "eval", 256)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    real = alignment_breakdown(net, x, scenes)
    assert real["alignment"] > 0.95 and real["count"] > 0.97
    shuffled = alignment_breakdown(net, x.roll(1, dims=0), scenes)
    assert shuffled["alignment"] < 0.2
    for r in (real, shuffled):
        assert all(r["alignment"] <= r[f"without_{k}"] <= 1.0 for k in STATEMENTS)
    # each kind left unchecked is honoured: real images fail only on shapes the judge misreads, a shuffle on positions too
    assert real["without_shape"] > real["alignment"]
    assert shuffled["without_position"] > shuffled["alignment"] and shuffled["without_shape"] > shuffled["alignment"]
