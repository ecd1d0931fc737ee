"""`vsd.shared_lora_pass`: the LoRA teacher's update trains on the pass that gave the VSD estimate.

The switch must leave the student's loss and gradient exactly as they are, give the LoRA teacher the diffusion loss of
that very pass (same x_t, t, noise and text), and save one UNet forward a step in the real training loop."""

import json
import math
from collections import Counter
from contextlib import nullcontext

import pytest
import torch


def _models(tiny_cfg):
    from sb2.student import encode_prompts
    from sb2.train.steps import build_models

    torch.manual_seed(0)
    m = build_models(tiny_cfg, "full", "cpu")
    with torch.no_grad():  # a LoRA teacher that differs from the teacher (a fresh adapter's B is zero)
        for p in m.lora_params:
            p.add_(0.2 * torch.randn_like(p))
    prompts = ["a corgi puppy, bokeh", "a sailboat at night", "a red cube"]
    emb = encode_prompts(m.text_encoder, m.tokenizer, prompts, "cpu")
    null = encode_prompts(m.text_encoder, m.tokenizer, [""], "cpu")
    return m, prompts, emb, null


def _cfg(tiny_cfg, shared: bool):
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.vsd.shared_lora_pass = shared
    return cfg


def _grads(params):
    return [None if p.grad is None else p.grad.detach().clone() for p in params]


def test_the_student_loss_and_gradient_do_not_change(tiny_cfg):
    from sb2.train.steps import student_step

    m, prompts, emb, null = _models(tiny_cfg)
    outs, grads = [], []
    for shared in (False, True):
        torch.manual_seed(7)
        out = student_step(m, _cfg(tiny_cfg, shared), emb, null, prompts, 0, nullcontext)
        out.loss.backward()
        assert all(p.grad is None for p in m.lora_params), "VSD must not train the LoRA teacher"
        outs.append(out)
        grads.append(_grads(m.student_params))
        for p in m.student_params:
            p.grad = None
    assert outs[0].lora_loss is None and outs[1].lora_loss is not None
    torch.testing.assert_close(outs[1].loss, outs[0].loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(outs[1].x0, outs[0].x0, rtol=0, atol=0)
    assert any(g is not None and g.abs().sum() > 0 for g in grads[0])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-9)


def test_the_lora_teacher_learns_from_the_vsd_pass(tiny_cfg):
    """Its loss and gradient are ‖ε̂_ψ(x_t, t, y) − ε‖² at the x_t, t and ε the VSD estimate drew, recomputed by hand."""
    from sb2.distill.vsd import add_noise, sample_timesteps
    from sb2.train.steps import student_step

    m, prompts, emb, null = _models(tiny_cfg)
    cfg = _cfg(tiny_cfg, True)
    torch.manual_seed(7)
    out = student_step(m, cfg, emb, null, prompts, 0, nullcontext)
    out.lora_loss.backward()
    assert all(p.grad is None for p in m.student_params), "the LoRA-teacher loss must not reach the student"
    got = _grads(m.lora_params)
    for p in m.lora_params:
        p.grad = None

    torch.manual_seed(7)  # the step's draws, in its order: the student's noise, t, then ε
    b = emb.shape[0]
    torch.randn((b, *m.latent_shape))
    t = sample_timesteps(b, m.num_train_timesteps, cfg.vsd.t_min, cfg.vsd.t_max)
    noise = torch.randn_like(out.x0, dtype=torch.float32)
    x_t = add_noise(out.x0.float(), noise, m.alphas_cumprod, t)
    eps = m.teacher_unet(x_t, t, encoder_hidden_states=emb).sample
    want_loss = ((eps - noise) ** 2).mean()
    want_loss.backward()
    torch.testing.assert_close(out.lora_loss, want_loss, rtol=1e-6, atol=0)
    assert sum(g.abs().sum() for g in got) > 0
    for g, p in zip(got, m.lora_params, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("sets, message", [
    (["vsd.shared_lora_pass=true", "vsd.lora_guidance_scale=2"], "lora_guidance_scale=1"),
    (["vsd.shared_lora_pass=true", "vsd.single_teacher_call=true"], "cannot both be on"),
    (["vsd.shared_lora_pass=true", "train.mixed_precision=fp16"], "does not support train.mixed_precision=fp16"),
])
def test_settings_it_cannot_serve_are_refused(sets, message):
    from sb2.config import load_config

    with pytest.raises(Exception, match=message):
        load_config("tiny", sets)


@pytest.mark.parametrize("shared, updates, calls_a_step", [(False, 1, 3), (True, 1, 2), (True, 2, 3)])
def test_the_loop_runs_one_teacher_forward_fewer_a_step(tiny_cfg, tmp_path, shared, updates, calls_a_step):
    """`sb2.train.loop.train` on the tiny profile: three teacher calls a step (cond+uncond, LoRA estimate, LoRA
    update) without the switch, two with it, and one more for a second LoRA-teacher update; the LoRA teacher is
    trained either way and every logged loss is finite."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from sb2.train.loop import train

    calls: Counter = Counter()
    teachers = {}

    def count(module, args, output):
        if isinstance(module, UNet2DConditionModel) and hasattr(module, "peft_config"):
            calls[id(module)] += 1
            teachers[id(module)] = module

    cfg = _cfg(tiny_cfg, shared)
    cfg.train.steps, cfg.tracking.enabled, cfg.tracking.image_every = 2, False, 0
    cfg.lora_teacher.updates_per_student_update = updates
    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        train(cfg, "full", tmp_path / "run", progress=False)
    finally:
        handle.remove()
    assert len(calls) == 1 and list(calls.values()) == [calls_a_step * cfg.train.steps]
    final = json.loads((tmp_path / "run" / "train.json").read_text())["final"]
    assert "loss/lora_teacher" in final and all(math.isfinite(v) for v in final.values())
    adapter = load_file(str(tmp_path / "run" / "lora_teacher" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items()), "B starts at zero"


def test_a_skipped_step_drops_the_shared_pass_gradients(tiny_cfg, tmp_path, monkeypatch):
    """A non-finite student loss skips the step: the LoRA teacher is not updated by its shared pass either, and that
    pass's gradients do not reach the next step's update."""
    import sb2.train.loop as loop

    real, seen = loop.student_step, {}

    def spy(m, cfg, emb, null, prompts, step, autocast, reg=None):
        seen[step] = ([p.detach().clone() for p in m.lora_params], [p.grad is None for p in m.lora_params])
        out = real(m, cfg, emb, null, prompts, step, autocast, reg=reg)
        return out._replace(loss=out.loss * float("nan")) if step == 1 else out

    monkeypatch.setattr(loop, "student_step", spy)
    cfg = _cfg(tiny_cfg, True)
    cfg.train.steps, cfg.tracking.enabled, cfg.tracking.image_every = 3, False, 0
    loop.train(cfg, "full", tmp_path / "run", progress=False)
    assert json.loads((tmp_path / "run" / "train.json").read_text())["nonfinite_skips"] == 1
    assert all(all(none) for _, none in seen.values()), "gradients carried over into a step"
    assert any(not torch.equal(a, b) for a, b in zip(seen[0][0], seen[1][0], strict=True))  # step 0 updated it
    assert all(torch.equal(a, b) for a, b in zip(seen[1][0], seen[2][0], strict=True))  # step 1 did not
