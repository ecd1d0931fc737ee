"""VSD (paper eq. 4), x̂0 recovery and the LoRA teacher, against hand-computed values."""

import math

import pytest
import torch

from sb2.distill.vsd import (add_noise, diffusion_loss, dmd_weight, guided, predict_x0, sample_timesteps, vsd_loss,
                             vsd_weight)


def sd_alphas_cumprod():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def test_alpha_bar_at_999_comes_from_the_scheduler(tiny_world):
    from diffusers import DDPMScheduler

    from sb2.models.loading import load_noise_scheduler

    sched = load_noise_scheduler(tiny_world["teacher"])
    a_bar = sched.alphas_cumprod
    assert a_bar[999].item() == pytest.approx(sd_alphas_cumprod()[999].item(), rel=1e-6)
    assert a_bar[999].item() == pytest.approx(0.00466, abs=1e-5)
    # another schedule gives another ᾱ: nothing may assume 0.0047
    other = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02).alphas_cumprod
    z, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([999, 999])
    assert not torch.allclose(predict_x0(eps, z, a_bar, t), predict_x0(eps, z, other, t))


def test_predict_x0_inverts_add_noise():
    ac = sd_alphas_cumprod()
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([999, 500, 20])
    xt = add_noise(x0, eps, ac, t)
    a, s = ac[t].sqrt().view(-1, 1, 1, 1), (1 - ac[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(xt, a * x0 + s * eps)
    torch.testing.assert_close(predict_x0(eps, xt, ac, t), x0, atol=2e-4, rtol=1e-4)
    v = a * eps - s * x0
    torch.testing.assert_close(predict_x0(v, xt, ac, t, "v_prediction"), x0, atol=1e-4, rtol=1e-4)


def test_student_x0_at_t999_by_hand():
    from sb2.student import student_x0

    ac = sd_alphas_cumprod()

    class Const(torch.nn.Module):
        def forward(self, z, t, encoder_hidden_states):
            assert (t == 999).all()
            return type("O", (), {"sample": torch.full_like(z, 0.5)})()

    z = torch.ones(1, 4, 2, 2)
    x0 = student_x0(Const(), z, torch.zeros(1, 3, 8), ac)
    expected = (1 - math.sqrt(1 - ac[999].item()) * 0.5) / math.sqrt(ac[999].item())
    assert x0.flatten()[0].item() == pytest.approx(expected, rel=1e-5)


def test_weights_guidance_and_timesteps():
    ac = sd_alphas_cumprod()
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(vsd_weight(ac, t), 1 - ac[t])
    torch.testing.assert_close(vsd_weight(ac, t, "constant"), torch.ones(3))
    eu, ec = torch.tensor([1.0]), torch.tensor([3.0])
    assert guided(eu, ec, 4.5).item() == pytest.approx(1 + 4.5 * 2)
    assert guided(eu, ec, 1.0).item() == 3.0
    ts = sample_timesteps(10000, 1000, 0.02, 0.98, torch.Generator().manual_seed(0))
    assert ts.min().item() == 20 and ts.max().item() == 979


def test_vsd_gradient_on_x0_is_w_times_score_difference():
    ac = sd_alphas_cumprod()
    x0 = torch.randn(2, 4, 8, 8, requires_grad=True)
    et, el = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 900])
    w = vsd_weight(ac, t)
    loss, g = vsd_loss(x0, et, el, w, reduction="sum")
    loss.backward()
    expected = w.view(-1, 1, 1, 1) * (et - el)
    torch.testing.assert_close(g, expected)
    torch.testing.assert_close(x0.grad, expected / 2)  # averaged over the batch of 2
    # the loss value: 0.5‖g‖² per sample, averaged
    assert loss.item() == pytest.approx(0.5 * (expected ** 2).flatten(1).sum(1).mean().item(), rel=1e-5)
    x0.grad = None
    loss, _ = vsd_loss(x0, et, el, w, reduction="mean")
    loss.backward()
    torch.testing.assert_close(x0.grad, expected / 2 / (4 * 8 * 8))


def test_dmd_weight_by_hand_and_as_dmds_x0_space_gradient():
    """One sample by hand: ᾱ = 0.64 (α 0.8, σ 0.6), x0 = (1, 3), x_t = (2, 2), ε̂_teacher = (1, −1): x̂0_real =
    ((2 − 0.6)/0.8, (2 + 0.6)/0.8) = (1.75, 3.25), mean|x0 − x̂0_real| = 0.5, w = (0.6/0.8)/0.5 = 1.5. Then, on random
    tensors, the VSD gradient with it is DMD's (x̂0_fake − x̂0_real)/mean|x0 − x̂0_real|, computed from the two x̂0."""
    ac = torch.tensor([0.64], dtype=torch.float64)
    t = torch.tensor([0])
    w = dmd_weight(ac, t, torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0, 2.0]]), torch.tensor([[1.0, -1.0]]))
    assert w.shape == (1,) and w.item() == pytest.approx(1.5)
    ac = sd_alphas_cumprod()
    t = torch.tensor([30, 500, 970])
    x0 = torch.randn(3, 4, 8, 8, requires_grad=True)
    x_t = add_noise(x0.detach(), torch.randn(3, 4, 8, 8), ac, t)
    et, el = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    w = dmd_weight(ac, t, x0, x_t, et)
    assert not w.requires_grad  # a weight, not a path for gradients
    _, g = vsd_loss(x0, et, el, w, reduction="sum")
    real, fake = predict_x0(et, x_t, ac, t), predict_x0(el, x_t, ac, t)
    dmd = (fake - real) / (x0.detach() - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(g, dmd, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="use dmd_weight"):
        vsd_weight(ac, t, "dmd")


def test_the_dmd_weighting_is_what_the_student_step_uses(tiny_cfg):
    """vsd.weighting=dmd reaches the training step: one step's VSD loss differs from the default weighting's on the
    same draws (and is finite)."""
    from contextlib import nullcontext

    from sb2.student import encode_prompts
    from sb2.train.steps import build_models, student_step

    torch.manual_seed(0)
    m = build_models(tiny_cfg, "full", "cpu")
    prompts = ["a corgi puppy, bokeh", "a sailboat at night"]
    emb = encode_prompts(m.text_encoder, m.tokenizer, prompts, "cpu")
    null = encode_prompts(m.text_encoder, m.tokenizer, [""], "cpu")
    losses = {}
    for kind in ("one_minus_alpha_bar", "dmd"):
        cfg = tiny_cfg.model_copy(deep=True)
        cfg.vsd.weighting = kind
        torch.manual_seed(1)  # the same z, t and noise for both
        losses[kind] = student_step(m, cfg, emb, null, prompts, 0, nullcontext).logs["loss/vsd"].item()
    assert math.isfinite(losses["dmd"]) and losses["dmd"] != pytest.approx(losses["one_minus_alpha_bar"], rel=1e-3)
    # the weight the step used is dmd_weight of that step's own x̂0, x_t, t and the guided teacher's ε̂ (not the LoRA
    # teacher's): the step's VSD inputs and x_t recorded on the way
    import sb2.train.steps as steps

    seen = {}
    real_add_noise, real_vsd_loss = steps.add_noise, steps.vsd_loss

    def add_noise(x0, noise, ac, t):
        seen["x_t"], seen["t"] = real_add_noise(x0, noise, ac, t), t
        return seen["x_t"]

    def vsd_loss(x0, eps_teacher, eps_lora, weight, reduction):
        seen.update(x0=x0, eps_teacher=eps_teacher, eps_lora=eps_lora, weight=weight)
        return real_vsd_loss(x0, eps_teacher, eps_lora, weight, reduction)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(steps, "add_noise", add_noise)
        mp.setattr(steps, "vsd_loss", vsd_loss)
        torch.manual_seed(1)
        student_step(m, cfg, emb, null, prompts, 0, nullcontext)
    expected = dmd_weight(m.alphas_cumprod, seen["t"], seen["x0"], seen["x_t"], seen["eps_teacher"])
    torch.testing.assert_close(seen["weight"], expected)
    assert not torch.allclose(expected, dmd_weight(m.alphas_cumprod, seen["t"], seen["x0"], seen["x_t"],
                                                   seen["eps_lora"]))


def test_vsd_gradient_reaches_student_parameters_as_vector_jacobian_product(tiny_world):
    """On a tiny UNet: ∂L/∂θ = (∂x̂0/∂θ)ᵀ w(t)(ε_t − ε_l) / B, computed independently by autograd."""
    from sb2.models.loading import load_unet
    from sb2.student import student_x0

    unet = load_unet(tiny_world["student"]).double()
    ac = sd_alphas_cumprod().double()
    z, emb = torch.randn(2, 4, 8, 8).double(), torch.randn(2, 77, 32).double()
    et, el = torch.randn(2, 4, 8, 8).double(), torch.randn(2, 4, 8, 8).double()
    w = vsd_weight(ac, torch.tensor([300, 700]))
    params = [p for p in unet.parameters()]
    x0 = student_x0(unet, z, emb, ac)
    loss, g = vsd_loss(x0, et, el, w, reduction="sum")
    grads = torch.autograd.grad(loss, params)
    x0 = student_x0(unet, z, emb, ac)
    vjp = torch.autograd.grad((x0 * g).sum() / 2, params)
    for a, b in zip(grads, vjp):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    assert any(a.abs().sum() > 0 for a in grads)


def test_diffusion_loss_value():
    eps, noise = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])
    assert diffusion_loss(eps, noise).item() == pytest.approx(2.5)


def test_lora_teacher_shares_the_teacher_weights(tiny_cfg):
    """One UNet in memory: the LoRA teacher is an adapter on the frozen teacher, switched off for the teacher."""
    from sb2.models.loading import load_teacher, load_unet
    from sb2.models.lora import add_lora

    teacher = load_teacher(tiny_cfg.models)
    unet = teacher.unet
    base_ptrs = {n: p.data_ptr() for n, p in unet.named_parameters()}
    n_base = sum(p.numel() for p in unet.parameters())
    x, t, emb = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=emb).sample
    lora = add_lora(unet, rank=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    with torch.no_grad():
        for p in lora:  # make the adapter non-trivial
            p.add_(0.1 * torch.randn_like(p))
    # base weights still the same tensors, and only the LoRA parameters were added
    for n, p in unet.named_parameters():
        if "lora_" not in n:
            key = n.replace(".base_layer", "")
            assert p.data_ptr() == base_ptrs[key]
            assert not p.requires_grad
    assert sum(p.numel() for p in unet.parameters()) == n_base + sum(p.numel() for p in lora)
    with torch.no_grad():
        unet.disable_adapters()
        off = unet(x, t, encoder_hidden_states=emb).sample
        unet.enable_adapters()
        on = unet(x, t, encoder_hidden_states=emb).sample
    torch.testing.assert_close(off, ref)
    assert (on - ref).abs().max() > 1e-4
    del load_unet


@pytest.mark.parametrize("lora_scale", [1.0, 3.0])
def test_single_teacher_call_equals_separate_calls(tiny_cfg, lora_scale):
    """Teacher cond/uncond and LoRA teacher in one call (per-sample adapters) give the separate calls' predictions."""
    from sb2.models.loading import load_teacher
    from sb2.models.lora import add_lora
    from sb2.train.steps import teacher_predictions

    teacher = load_teacher(tiny_cfg.models).unet
    for p in add_lora(teacher, rank=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]):
        with torch.no_grad():
            p.add_(0.2 * torch.randn_like(p))
    x, t, emb, null = torch.randn(3, 4, 8, 8), torch.tensor([5, 500, 900]), torch.randn(3, 77, 32), torch.randn(1, 77, 32)
    outs = []
    for single in (True, False):
        cfg = tiny_cfg.model_copy(deep=True)
        cfg.vsd.single_teacher_call, cfg.vsd.lora_guidance_scale = single, lora_scale
        with torch.no_grad():
            outs.append(teacher_predictions(teacher, x, t, emb, null, cfg))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert (outs[0][0] - outs[0][1]).abs().max() > 1e-3  # teacher and LoRA teacher do differ
