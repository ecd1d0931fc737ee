"""The clamped CLIP loss (paper eq. 5), its schedule, and its gradient path into the LoRA student."""

import pytest
import torch

from sb2.distill.clip_loss import clamped_clip_loss, clip_preprocess, scheduled_weight


def test_clamped_clip_loss_by_hand():
    img = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # cos = 1 and 1/√2 ≈ 0.7071
    assert clamped_clip_loss(img, txt, tau=0.9).item() == pytest.approx((0 + (0.9 - 0.5 ** 0.5)) / 2, rel=1e-6)
    assert clamped_clip_loss(img, txt, tau=0.35).item() == 0.0
    assert clamped_clip_loss(img, txt, clamp=False).item() == pytest.approx((0 + 1 - 0.5 ** 0.5) / 2, rel=1e-6)


def test_schedule_start_middle_end():
    assert scheduled_weight(0, 101, 0.1) == pytest.approx(0.1)
    assert scheduled_weight(50, 101, 0.1) == pytest.approx(0.05)
    assert scheduled_weight(100, 101, 0.1) == pytest.approx(0.0)
    assert scheduled_weight(50, 101, 0.1, kind="constant") == pytest.approx(0.1)
    assert scheduled_weight(0, 101, 0.1, kind="cosine") == pytest.approx(0.1)
    assert scheduled_weight(50, 101, 0.1, kind="cosine") == pytest.approx(0.05)
    assert scheduled_weight(100, 101, 0.1, kind="cosine") == pytest.approx(0.0, abs=1e-12)


def test_clip_preprocess_is_differentiable_and_normalizes():
    x = torch.zeros(1, 3, 64, 64, requires_grad=True)
    y = clip_preprocess(x, 32)
    assert y.shape == (1, 3, 32, 32)
    assert y[0, 0, 0, 0].item() == pytest.approx((0.5 - 0.48145466) / 0.26862954, rel=1e-5)
    y.sum().backward()
    assert x.grad.abs().sum() > 0


def _lora_models(cfg):
    """The lora scheme's models (seed 0), two prompts, their embeddings and the null embedding."""
    from sb2.student import encode_prompts
    from sb2.train.steps import build_models

    torch.manual_seed(0)
    m = build_models(cfg, "lora", "cpu")
    prompts = ["a red fox at sunset", "a lighthouse in the rain"]
    emb = encode_prompts(m.text_encoder, m.tokenizer, prompts, "cpu")
    null = encode_prompts(m.text_encoder, m.tokenizer, [""], "cpu")
    return m, prompts, emb, null


def _student_lora_grads(tiny_cfg, clip_weight: float, tau: float):
    """Gradient of the student's LoRA for one student step with a fixed seed, CLIP weight and threshold."""
    from contextlib import nullcontext

    from sb2.train.steps import student_step

    cfg = tiny_cfg.model_copy(deep=True)
    cfg.clip_loss.weight = clip_weight
    cfg.clip_loss.tau = tau
    cfg.clip_loss.schedule = "constant"
    m, prompts, emb, null = _lora_models(cfg)
    torch.manual_seed(1)
    loss, _, logs, _ = student_step(m, cfg, emb, null, prompts, 0, nullcontext)
    loss.backward()
    grads = [p.grad.clone() for p in m.student_params]
    # only the student LoRA learns: no gradient reaches the frozen CLIP, TinyVAE, teacher or LoRA teacher
    for mod in (m.clip.model, m.tiny_vae, m.text_encoder):
        assert all(p.grad is None for p in mod.parameters())
    assert all(p.grad is None for p in m.teacher_unet.parameters())
    base = [p for n, p in m.student.named_parameters() if "lora_" not in n]
    assert all(p.grad is None and not p.requires_grad for p in base)
    return grads, logs


def test_clip_gradient_reaches_the_student_lora_through_tinyvae_and_clip(tiny_cfg):
    g0, logs = _student_lora_grads(tiny_cfg, 0.0, tau=1.0)
    g1, _ = _student_lora_grads(tiny_cfg, 0.5, tau=1.0)
    assert logs["clip/cos"] < 1.0  # clamp active: τ = 1 is above every cosine
    diff = sum((a - b).abs().sum().item() for a, b in zip(g0, g1))
    assert diff > 1e-6, "changing the CLIP weight must change the student's gradient"


def test_inactive_clamp_passes_no_gradient(tiny_cfg):
    g0, logs = _student_lora_grads(tiny_cfg, 0.0, tau=-1.0)
    g1, logs1 = _student_lora_grads(tiny_cfg, 0.5, tau=-1.0)
    assert logs1["loss/clip"] == 0.0  # cos > τ for every sample
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_clip_loss_through_the_full_vae_decoder(tiny_cfg):
    """clip_loss.decoder=vae: no TinyVAE is loaded; the logged cosine and loss are those of the CLIP on the full VAE's
    decoding of x̂0, computed here by hand from the same x̂0; the gradient reaches the student's LoRA and no VAE,
    CLIP or teacher weight."""
    from contextlib import nullcontext

    from sb2.distill.clip_loss import clip_preprocess
    from sb2.student import decode
    from sb2.train.steps import student_step

    cfg = tiny_cfg.model_copy(deep=True)
    cfg.clip_loss.decoder = "vae"
    cfg.clip_loss.tau, cfg.clip_loss.weight, cfg.clip_loss.schedule = 1.0, 0.5, "constant"
    m, prompts, emb, null = _lora_models(cfg)
    assert m.tiny_vae is None and m.vae is not None
    torch.manual_seed(1)
    loss, x0, logs, _ = student_step(m, cfg, emb, null, prompts, 0, nullcontext)
    loss.backward()
    with torch.no_grad():
        s = m.clip
        img = torch.nn.functional.normalize(s.encode_image(clip_preprocess(decode(m.vae, x0), s.image_size, s.mean,
                                                                           s.std)), dim=-1)
        txt = torch.nn.functional.normalize(s.encode_text(prompts, "cpu"), dim=-1)
        cos = (img * txt).sum(-1)
    torch.testing.assert_close(logs["clip/cos"], cos.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs["loss/clip"], torch.relu(1.0 - cos).mean(), rtol=1e-5, atol=1e-6)
    grads = [p.grad.clone() for p in m.student_params]
    for mod in (m.vae, m.clip.model, m.text_encoder, m.teacher_unet):
        assert all(p.grad is None for p in mod.parameters())
    # the CLIP term's gradient reaches the student through the VAE decode: without it (weight 0) the gradient differs
    cfg.clip_loss.weight = 0.0
    m.student.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    student_step(m, cfg, emb, null, prompts, 0, nullcontext).loss.backward()
    assert sum((a - p.grad).abs().sum().item() for a, p in zip(grads, m.student_params)) > 1e-6
