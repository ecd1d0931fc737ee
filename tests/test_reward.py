"""Auxiliary reward losses (paper 8.1): the clamped form, the CLIP loss as one instance, a plug-in scorer."""

import sys
import types
from contextlib import nullcontext

import pytest
import torch

from sb2.distill.reward import ClipReward, clamped_reward_loss


def test_clamped_reward_loss_by_hand():
    r = torch.tensor([0.1, 0.5, 0.2])
    assert clamped_reward_loss(r, 0.3).item() == pytest.approx((0.2 + 0 + 0.1) / 3)
    assert clamped_reward_loss(r, 0.3, clamp=False).item() == pytest.approx((0.2 - 0.2 + 0.1) / 3)


def test_reward_with_the_clip_scorer_is_the_clamped_clip_loss(tiny_world):
    from sb2.distill.clip_loss import clamped_clip_loss, clip_preprocess
    from sb2.models.loading import load_clip

    clip = load_clip(tiny_world["clip"])
    prompts = ["a red fox at sunset", "a lighthouse in the rain", "a bowl of ramen"]
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for tau, clamp in ((1.0, True), (0.02, True), (0.35, False)):
        a = images.clone().requires_grad_(True)
        expected = clamped_clip_loss(clip.encode_image(clip_preprocess(a, clip.image_size, clip.mean, clip.std)),
                                     clip.encode_text(prompts, "cpu"), tau, clamp)
        expected.backward()
        b = images.clone().requires_grad_(True)
        got = clamped_reward_loss(ClipReward(clip)(b, prompts), tau if clamp else 1.0, clamp)
        got.backward()
        assert got.item() == expected.item()
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0)


def _step(cfg, prompts):
    from sb2.student import encode_prompts
    from sb2.train.steps import build_models, student_step

    torch.manual_seed(0)
    m = build_models(cfg, "lora", "cpu")
    emb = encode_prompts(m.text_encoder, m.tokenizer, prompts, "cpu")
    null = encode_prompts(m.text_encoder, m.tokenizer, [""], "cpu")
    torch.manual_seed(1)
    loss, _, logs, _ = student_step(m, cfg, emb, null, prompts, 1, nullcontext)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in m.student_params], logs


def test_a_clip_reward_term_reproduces_the_clip_loss_and_module_rewards_plug_in(tiny_cfg, monkeypatch):
    from sb2.config import RewardConfig

    prompts = ["a red fox at sunset", "a lighthouse in the rain"]
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.train.steps = 5
    cfg.clip_loss.tau, cfg.clip_loss.weight = 1.0, 0.5  # linear 0.5 → 0: 0.375 at step 1
    loss_a, grads_a, logs_a = _step(cfg, prompts)
    cfg.clip_loss.enabled = False
    cfg.rewards = [RewardConfig(name="clip", kind="clip", tau=1.0, weight=0.5, schedule="linear")]
    loss_b, grads_b, logs_b = _step(cfg, prompts)
    assert logs_a["clip/weight"] == logs_b["reward/clip/weight"] == 0.375
    assert logs_a["loss/clip"] == logs_b["loss/reward/clip"] > 0 and loss_a == loss_b
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    # a judge's differentiable score plugs in as package.module:factory (here: mean brightness)
    judge = types.ModuleType("sb2_test_judge")
    judge.brightness = lambda: (lambda images, prompts: images.mean(dim=(1, 2, 3)))
    monkeypatch.setitem(sys.modules, "sb2_test_judge", judge)
    cfg.rewards = [RewardConfig(name="bright", kind="module", model="sb2_test_judge:brightness", tau=1.0, weight=1.0)]
    _, grads_c, logs_c = _step(cfg, prompts)
    assert logs_c["loss/reward/bright"] == pytest.approx(1.0 - logs_c["reward/bright/mean"])
    assert any(g.abs().sum() > 0 for g in grads_c)
