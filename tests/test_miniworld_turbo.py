"""The Turbo analog's loss terms (sb2.miniworld.turbo): ADD's score distillation against hand-computed values, and its
settings on the command line."""

import json

import pytest
import torch


def _tiny_unet(seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8).eval()


def test_score_distillation_loss_value_and_gradient_by_hand():
    from sb2.miniworld.turbo import score_distillation_loss

    x0 = torch.tensor([[[[1.0, 2.0]]], [[[0.0, -1.0]]]], requires_grad=True)  # (2, 1, 1, 2)
    target = torch.tensor([[[[0.0, 0.0]]], [[[1.0, 1.0]]]], requires_grad=True)
    c = torch.tensor([0.5, 2.0])
    loss = score_distillation_loss(x0, target, c)
    # sample 0: mean(1, 4) = 2.5, × 0.5 = 1.25; sample 1: mean(1, 4) = 2.5, × 2 = 5; mean over the batch: 3.125
    assert loss.item() == pytest.approx(3.125)
    loss.backward()
    # d/dx0 = c · 2(x0 − x̂ψ) / (elements per sample) / batch
    expected = torch.tensor([[[[0.25, 0.5]]], [[[-1.0, -2.0]]]])
    torch.testing.assert_close(x0.grad, expected)
    assert target.grad is None  # the teacher's estimate is a target: no gradient reaches it


def test_teacher_x0_is_the_guided_one_step_estimate():
    from sb2.miniworld.teacher import train_scheduler
    from sb2.miniworld.turbo import add_weighting, teacher_x0

    unet = _tiny_unet()
    abar = train_scheduler().alphas_cumprod
    torch.manual_seed(1)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    cond, uncond = torch.randn(3, 5, 16), torch.randn(1, 5, 16)
    t = torch.tensor([20, 500, 979])
    got = teacher_x0(unet, x0, cond, uncond, 3.0, t, noise, abar)
    a = abar[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    with torch.no_grad():
        e_c = unet(x_t, t, encoder_hidden_states=cond).sample
        e_u = unet(x_t, t, encoder_hidden_states=uncond.expand(3, -1, -1)).sample
    eps = e_u + 3.0 * (e_c - e_u)
    torch.testing.assert_close(got, (x_t - (1 - a).sqrt() * eps) / a.sqrt(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(add_weighting(abar, t), abar[t].sqrt())
    assert add_weighting(abar, torch.tensor([20]))[0] > add_weighting(abar, torch.tensor([979]))[0]


def _turbo_inputs(n=8):
    from sb2.miniworld.teacher import train_scheduler

    g = torch.Generator().manual_seed(0)
    return {"noise": torch.randn(n, 4, 8, 8, generator=g), "cond": torch.randn(n, 5, 16, generator=g),
            "real_latents": torch.randn(n, 4, 8, 8, generator=g), "real_cond_pooled": torch.randn(n, 16, generator=g),
            "cond_pooled": torch.randn(n, 16, generator=g), "abar_t": train_scheduler().alphas_cumprod[999],
            "steps": 2, "batch": 4, "lr": 1e-3, "seed": 0, "device": "cpu"}


def test_the_score_term_alone_trains_the_student_with_adds_weighting_and_guidance(monkeypatch):
    """With only the score term on, the student moves; each step's term gets the teacher's estimate at the configured
    guidance and uncond, at s in SCORE_T_RANGE, weighted √ᾱ_s; the teacher is frozen and left unchanged."""
    import sb2.miniworld.turbo as turbo
    from sb2.miniworld.teacher import train_scheduler

    seen = []
    real_x0, real_loss = turbo.teacher_x0, turbo.score_distillation_loss

    def spy_x0(unet, x0, cond, uncond, guidance, t, noise, abar):
        seen.append({"t": t.clone(), "guidance": guidance, "uncond": uncond, "frozen": not any(
            p.requires_grad for p in unet.parameters()), "x0_grad": x0.requires_grad})
        return real_x0(unet, x0, cond, uncond, guidance, t, noise, abar)

    def spy_loss(x0, x0_teacher, weight):
        seen[-1]["weight"] = weight.clone()
        return real_loss(x0, x0_teacher, weight)

    monkeypatch.setattr(turbo, "teacher_x0", spy_x0)
    monkeypatch.setattr(turbo, "score_distillation_loss", spy_loss)
    teacher = _tiny_unet()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    abar = train_scheduler().alphas_cumprod
    uncond = torch.zeros(1, 5, 16)
    student, info = turbo.train_turbo(teacher, targets=None, regression_weight=0.0, score_weight=1.0, adv_weight=0.0,
                                      uncond=uncond, guidance=3.5, alphas_cumprod=abar, **_turbo_inputs())
    assert len(seen) == 2 and info["steps"] == 2
    lo, hi = turbo.SCORE_T_RANGE
    for call in seen:
        assert call["guidance"] == 3.5 and call["uncond"] is uncond and call["frozen"] and not call["x0_grad"]
        assert ((call["t"] >= lo) & (call["t"] < hi)).all()
        torch.testing.assert_close(call["weight"], abar[call["t"]].sqrt())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    moved = [k for k, v in student.state_dict().items() if not torch.equal(v.float(), before[k].float())]
    assert moved and any("attn2" in k for k in moved)  # text-conditioned layers got a gradient


def test_turbo_loss_settings_are_checked():
    from sb2.miniworld.turbo import train_turbo

    with pytest.raises(ValueError, match="needs the teacher's samples"):
        train_turbo(_tiny_unet(), targets=None, **_turbo_inputs())
    with pytest.raises(ValueError, match="needs uncond and alphas_cumprod"):
        train_turbo(_tiny_unet(), targets=torch.zeros(8, 4, 8, 8), score_weight=1.0, **_turbo_inputs())
    with pytest.raises(ValueError, match="weight 0"):
        train_turbo(_tiny_unet(), targets=None, regression_weight=0.0, adv_weight=0.0, **_turbo_inputs())


def test_set_turbo_parses_and_refuses(tmp_path):
    from typer.testing import CliRunner

    from sb2.miniworld.cli import app
    from sb2.miniworld.pretrain import PretrainConfig, set_turbo

    cfg = set_turbo(PretrainConfig(), ["score_weight=1", "regression_weight=0", "steps=50", "score_guidance=7.5"])
    assert (cfg.turbo_score_weight, cfg.turbo_regression_weight, cfg.turbo_steps, cfg.turbo_score_guidance) == (
        1.0, 0.0, 50, 7.5)
    assert isinstance(cfg.turbo_steps, int)
    for bad, says in (("bogus=1", "NAME one of"), ("lr=", "NAME one of"), ("steps=1.5", "not an integer"),
                      ("lr=fast", "not a number"), ("adv_weight=-1", "≥ 0"), ("steps=0", "positive"),
                      ("lr=0", "positive"), ("score_weight=nan", "finite"), ("adv_weight=inf", "finite"),
                      ("regression_weight=0", None)):
        if says is None:  # 0 alone is fine; the whole loss at 0 is not
            set_turbo(PretrainConfig(), [bad])
            with pytest.raises(ValueError, match="would be empty"):
                set_turbo(PretrainConfig(), [bad, "adv_weight=0"])
            continue
        result = CliRunner().invoke(app, ["pretrain", "--quick", "--device", "cpu", "--out", str(tmp_path / "w"),
                                          "--turbo", bad])
        assert result.exit_code == 2, result.output
        assert says in " ".join(result.output.replace("│", " ").split())
    assert not (tmp_path / "w").exists()  # refused before rendering or training


def test_pretrain_builds_an_add_turbo_analog_and_its_card_says_how(tmp_path):
    """The whole pretrain path with ADD's term on and the regression off (no teacher samples made), keeping every
    other model of a quick world: the card names only the terms that have a weight."""
    from typer.testing import CliRunner

    from sb2.miniworld.cli import app
    from sb2.miniworld.pretrain import KEEPABLE, PretrainConfig, pretrain

    out = tmp_path / "w"
    pretrain(out, PretrainConfig.quick(), device="cpu")
    first = json.loads((out / "card.json").read_text())["models"]["turbo"]["how"]
    assert "MSE to the teacher's" in first and "score distillation" not in first
    keep = [a for k in KEEPABLE for a in ("--keep", k)]
    result = CliRunner().invoke(app, ["pretrain", "--quick", "--device", "cpu", "--out", str(out), *keep,
                                      "--turbo", "score_weight=0.5", "--turbo", "regression_weight=0",
                                      "--turbo", "score_guidance=2"])
    assert result.exit_code == 0, result.output
    how = json.loads((out / "card.json").read_text())["models"]["turbo"]["how"]
    assert "0.5 × ADD's score distillation" in how and "cfg-2 teacher" in how
    assert "MSE" not in how and "0.02 × hinge GAN" in how
