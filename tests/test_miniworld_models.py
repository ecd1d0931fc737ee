"""`sb2 miniworld pretrain --quick`: every model is produced in its real format and the standard loaders read it."""

import json

import pytest
import torch

from sb2.config import ModelsConfig


@pytest.fixture(scope="module")
def quick_world(tmp_path_factory):
    from sb2.miniworld.pretrain import PretrainConfig, pretrain

    out = tmp_path_factory.mktemp("miniworld")
    pretrain(out, PretrainConfig.quick(), device="cpu")
    return out


def test_everything_is_produced_with_a_card(quick_world):
    card = json.loads((quick_world / "card.json").read_text())
    assert set(card["models"]) == {"judges/features", "judges/attributes", "clip", "judges/clip", "teacher/vae",
                                   "tiny_vae", "teacher", "turbo"}
    assert "cfg4.5" in card["models"]["teacher"]["metrics"]
    assert (quick_world / "CARD.md").read_text().startswith("# The mini-world")


def test_standard_loaders_read_the_world(quick_world):
    from sb2.models.loading import load_clip, load_teacher, load_tiny_vae, load_unet

    models = ModelsConfig(teacher=str(quick_world / "teacher"), student=str(quick_world / "turbo"),
                          tiny_vae=str(quick_world / "tiny_vae"), clip=str(quick_world / "clip"))
    teacher = load_teacher(models)
    assert teacher.unet.dtype == torch.float32 and teacher.vae.dtype == torch.float32  # saved in fp16, upcast
    assert teacher.text_encoder.dtype == torch.float32
    assert teacher.num_train_timesteps == 1000 and teacher.scheduler.config.beta_schedule == "scaled_linear"
    turbo = load_unet(models.student)
    assert turbo.config.cross_attention_dim == teacher.text_encoder.config.hidden_size
    tiny = load_tiny_vae(models.tiny_vae)
    assert tiny.decode(torch.zeros(1, 4, 8, 8)).sample.shape == (1, 3, 64, 64)
    clip = load_clip(models.clip)
    assert clip.image_size == 64
    # The teacher's text encoder is the CLIP's text tower: the same hidden states on the same tokens.
    from sb2.miniworld.clip import open_clip_token_states

    prompts = ["a red circle in the top left", "there is a small blue ring and a green square"]
    ids = clip.tokenizer(prompts)
    assert torch.equal(ids, teacher.tokenizer(prompts, padding="max_length", max_length=77,
                                              return_tensors="pt").input_ids)
    with torch.no_grad():
        ours = teacher.text_encoder(ids).last_hidden_state
        theirs = open_clip_token_states(clip.model.float(), ids)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_stock_diffusers_pipeline_runs_the_teacher(quick_world):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(quick_world / "teacher"))
    images = pipe(["a red circle"], num_inference_steps=2, guidance_scale=4.5, height=64, width=64,
                  output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3)


def test_judges_plug_into_the_evaluation(quick_world, monkeypatch):
    from sb2.config import ExtractorConfig
    from sb2.evaluation.features import build_clip_judge, build_extractor
    from sb2.miniworld.judges import alignment, attribute_judge
    from sb2.miniworld.world import make_pairs

    monkeypatch.setenv("SB2_MINIWORLD", str(quick_world))
    images, captions, scenes = make_pairs(0, "eval", 4)
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    feats = build_extractor(ExtractorConfig(kind="module", source="sb2.miniworld.judges:fid_features"), "cpu")(x)
    assert feats.shape == (4, 256)
    assert 0.0 <= alignment(attribute_judge(), x, scenes) <= 1.0
    judge = build_clip_judge(str(quick_world / "judges" / "clip"), "cpu")
    assert judge.encode_text(captions).shape[0] == 4 and judge.encode_image(x).shape[0] == 4


def test_judge_degradation_is_the_identity_at_zero_strength_and_a_blur_keeps_colors():
    from sb2.miniworld.judges import degrade
    from sb2.miniworld.world import make_pairs

    x = torch.from_numpy(make_pairs(0, "eval", 8)[0]).permute(0, 3, 1, 2)
    gen = torch.Generator().manual_seed(0)
    torch.testing.assert_close(degrade(x, gen, max_blur=0, max_noise=0, gain=0, offset=0), x.float())
    blurred = degrade(x, gen, max_blur=1.2, max_noise=0, gain=0, offset=0)
    assert (blurred.mean((2, 3)) - x.float().mean((2, 3))).abs().max() < 1.0
    edges = [torch.diff(a, dim=-1).pow(2).sum((1, 2, 3)) for a in (blurred, x.float())]
    assert (edges[0] <= edges[1] + 1e-3).all() and edges[0].sum() < 0.8 * edges[1].sum()


def test_teacher_text_states_are_computed_once_per_distinct_caption(tmp_path):
    import open_clip

    from sb2.miniworld.clip import clip_config, text_encoder_from_open_clip
    from sb2.miniworld.teacher import caption_states
    from sb2.miniworld.tokenizer import load_tokenizer, save_tokenizer, tokenize

    torch.manual_seed(0)
    enc = text_encoder_from_open_clip(open_clip.CLIP(**clip_config(32, 1, 32, 1, 32)))
    save_tokenizer(tmp_path)
    ids = tokenize(load_tokenizer(tmp_path), ["a red circle", "a blue ring", "a red circle", ""])
    table, which = caption_states(enc, ids)
    assert len(table) == 3 and which[0] == which[2] != which[1]
    with torch.no_grad():
        torch.testing.assert_close(table[which], enc(ids)[0])


def test_pretrain_time_caps_are_checked_before_anything_runs(tmp_path):
    from typer.testing import CliRunner

    from sb2.miniworld.cli import app

    for bad, says in (("bogus=3", "NAME one of"), ("teacher=", "NAME one of"), ("teacher=soon", "not a number")):
        result = CliRunner().invoke(app, ["pretrain", "--quick", "--device", "cpu", "--out", str(tmp_path / "w"),
                                          "--seconds", bad])
        assert result.exit_code == 2, result.output
        assert says in " ".join(result.output.replace("│", " ").split())  # rich wraps the message in a box
    assert not (tmp_path / "w").exists()  # refused before rendering or training


def test_keeping_every_other_model_retrains_the_turbo_analog_alone(quick_world, tmp_path, monkeypatch):
    import hashlib
    import shutil

    import sb2.miniworld.clip
    import sb2.miniworld.judges
    import sb2.miniworld.teacher
    import sb2.miniworld.vae
    from sb2.miniworld.pretrain import KEEPABLE, PretrainConfig, pretrain

    out = tmp_path / "w"
    shutil.copytree(quick_world, out)

    def digests(folder):
        return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    def must_not_train(*args, **kwargs):
        raise AssertionError("a kept model was trained again")

    for module, name in ((sb2.miniworld.vae, "train_vae"), (sb2.miniworld.vae, "train_tiny_vae"),
                         (sb2.miniworld.clip, "train_clip"), (sb2.miniworld.judges, "train_attribute_net"),
                         (sb2.miniworld.teacher, "train_teacher")):
        monkeypatch.setattr(module, name, must_not_train)
    before = {k: digests(out / v) for k, v in KEEPABLE.items()}
    turbo_before = digests(out / "turbo")
    old = json.loads((out / "card.json").read_text())["models"]
    cfg = PretrainConfig.quick()
    cfg.turbo_steps = 3
    card = pretrain(out, cfg, device="cpu", keep=tuple(KEEPABLE))
    assert {k: digests(out / v) for k, v in KEEPABLE.items()} == before  # kept models untouched on disk
    assert digests(out / "turbo") != turbo_before  # the Turbo analog was trained again
    for name, entry in old.items():
        if name != "turbo":  # the card carries the kept entries over, marked once
            assert card["models"][name]["metrics"] == entry["metrics"]
            assert card["models"][name]["how"].count("kept from an earlier run") == 1
    assert card["models"]["turbo"]["steps"] == 3 and card["kept"] == sorted(KEEPABLE)
    assert "reused" in (out / "CARD.md").read_text()
    again = pretrain(out, cfg, device="cpu", keep=tuple(KEEPABLE))
    assert again["models"]["teacher"]["how"].count("kept from an earlier run") == 1


def test_keep_lists_kept_models_from_the_start_and_fills_missing_teacher_metrics(quick_world, tmp_path,
                                                                                  monkeypatch):
    """A run killed before it reached a kept model still leaves that model's card entry (so the next --keep works);
    a kept teacher whose earlier run died before its cfg 2 / 7.5 metrics gets them."""
    import shutil

    import sb2.miniworld.turbo
    from sb2.miniworld.pretrain import KEEPABLE, PretrainConfig, pretrain

    out = tmp_path / "w"
    shutil.copytree(quick_world, out)
    card = json.loads((out / "card.json").read_text())
    del card["models"]["teacher"]["metrics"]["cfg2.0"]
    (out / "card.json").write_text(json.dumps(card))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sb2.miniworld.turbo, "train_turbo", killed)
    with pytest.raises(KeyboardInterrupt):
        pretrain(out, PretrainConfig.quick(), device="cpu", keep=tuple(KEEPABLE))
    left = json.loads((out / "card.json").read_text())["models"]
    assert {"teacher", "teacher/vae", "clip", "judges/features"} <= set(left)
    monkeypatch.undo()
    card = pretrain(out, PretrainConfig.quick(), device="cpu", keep=tuple(KEEPABLE))
    assert set(card["models"]["teacher"]["metrics"]["cfg2.0"]) == {"fid", "precision", "recall", "alignment"}


def test_keep_refuses_unknown_missing_or_inconsistent_models(tmp_path):
    from typer.testing import CliRunner

    from sb2.miniworld.cli import app
    from sb2.miniworld.pretrain import PretrainConfig, check_keep, pretrain

    def refused(*args):
        result = CliRunner().invoke(app, ["pretrain", "--quick", "--device", "cpu", "--out", str(tmp_path / "w"),
                                          *args])
        assert result.exit_code == 2, result.output
        return " ".join(result.output.replace("│", " ").split())

    assert "keepable are" in refused("--keep", "unet")
    assert "needs keeping vae, clip, judges too" in refused("--keep", "teacher")  # its VAE, text encoder, judges
    assert "needs keeping vae" in refused("--keep", "tiny_vae")
    assert "pick one" in refused("--keep", "vae", "--keep", "clip", "--keep", "judges", "--keep", "teacher",
                                 "--continue-teacher")
    check_keep(("vae", "tiny_vae", "clip", "judges", "teacher"))  # consistent: accepted
    with pytest.raises(FileNotFoundError, match="no earlier run's teacher/vae"):
        pretrain(tmp_path / "empty", PretrainConfig.quick(), device="cpu", keep=("vae",))
    assert not (tmp_path / "w").exists()
