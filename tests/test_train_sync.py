"""The training step without host syncs before its backward: a non-finite loss turns every gradient into NaN (which
DDP's all-reduce then carries to every process), a finite one leaves the gradients bit for bit as they were; log
values stay on the device until they are logged; ``train.ddp`` reaches accelerate's DDP handler."""

import math

import pytest
import torch

from sb2.config import DDPConfig
from sb2.train.loop import _on_host, backward_seed, ddp_kwargs


def _model_and_loss(scale: float = 1.0):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    x = torch.randn(16, 4)
    return model, (model(x) ** 2).mean() * scale


def test_a_finite_loss_gives_the_same_gradients_bit_for_bit():
    a, loss_a = _model_and_loss()
    loss_a.backward()
    b, loss_b = _model_and_loss()
    seed = backward_seed(loss_b)
    assert seed.item() == 1.0 and seed.dtype == loss_b.dtype and seed.shape == loss_b.shape
    loss_b.backward(gradient=seed)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa.grad, pb.grad)


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf])
def test_a_non_finite_loss_makes_every_gradient_nan(scale):
    model, loss = _model_and_loss(scale)
    loss.backward(gradient=backward_seed(loss))
    # behind the ReLU some units get no gradient from a finite loss; a NaN seed still reaches the norm
    assert all(torch.isnan(p.grad).any() for p in model.parameters())
    assert math.isnan(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))


def test_log_values_are_read_back_only_when_logged():
    logs = {"loss/vsd": torch.tensor(0.25), "loss/clip": torch.tensor(0.5, dtype=torch.bfloat16),
            "clip/weight": 0.1, "train/nonfinite_skips": 2}
    host = _on_host(logs)
    assert host == {"loss/vsd": 0.25, "loss/clip": 0.5, "clip/weight": 0.1, "train/nonfinite_skips": 2}
    assert all(not isinstance(v, torch.Tensor) for v in host.values())
    assert isinstance(logs["loss/vsd"], torch.Tensor)  # the caller's dict is left as it was
    assert _on_host({"lr/student": 1e-6}) == {"lr/student": 1e-6}


def test_the_default_ddp_settings_change_nothing_and_each_setting_reaches_the_handler():
    from accelerate.utils import DDPCommunicationHookType

    default = ddp_kwargs(DDPConfig())
    assert default.to_kwargs() == {} and default.comm_hook == DDPCommunicationHookType.NO  # torch's own defaults
    h = ddp_kwargs(DDPConfig(bucket_cap_mb=100, gradient_as_bucket_view=True, static_graph=True, comm_hook="bf16"))
    assert h.to_kwargs() == {"bucket_cap_mb": 100, "gradient_as_bucket_view": True, "static_graph": True}
    assert h.comm_hook == DDPCommunicationHookType.BF16
    assert ddp_kwargs(DDPConfig(comm_hook="fp16")).comm_hook == DDPCommunicationHookType.FP16


def test_frozen_teacher_passes_run_without_autocast_in_the_teachers_dtype_when_switched_off():
    """``train.frozen_autocast=false``: the frozen teacher's no-grad passes get bf16 inputs and no autocast (norms stay
    bf16); on (the default) they run under autocast with the inputs as they are. Same loss within bf16 rounding."""
    from sb2.config import load_config
    from sb2.student import encode_prompts
    from sb2.train.steps import build_models, student_step

    prompts = ["a red square", "two blue rings"]
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    losses, seen = {}, {}
    for on in (True, False):
        cfg = load_config("tiny", [f"train.frozen_autocast={str(on).lower()}"])
        m = build_models(cfg, "full", "cpu", weight_dtype=torch.bfloat16)
        calls = []
        m.teacher_unet.register_forward_pre_hook(
            lambda mod, args, kw: calls.append((args[0].dtype, torch.is_autocast_enabled("cpu"))), with_kwargs=True)
        emb = encode_prompts(m.text_encoder, m.tokenizer, prompts, "cpu")
        null = encode_prompts(m.text_encoder, m.tokenizer, [""], "cpu")
        torch.manual_seed(0)
        loss, _, _, _ = student_step(m, cfg, emb, null, prompts, 0, autocast)
        losses[on], seen[on] = loss.item(), calls
    assert seen[True] and all(c == (torch.float32, True) for c in seen[True])
    assert seen[False] and all(c == (torch.bfloat16, False) for c in seen[False])
    assert math.isfinite(losses[False]) and abs(losses[False] - losses[True]) <= 0.05 * abs(losses[True])


def test_a_skipped_fp16_update_lets_the_loss_scaler_lower_its_scale_and_go_on():
    """fp16 loss scaling: a step whose unscaled gradients are non-finite is skipped by the loop, not by the scaler's
    own step; without an update the next step's unscale raises, and the scale never comes down."""
    from types import SimpleNamespace

    from sb2.train.loop import after_skipped_update

    model, _ = _model_and_loss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    x = torch.randn(16, 4)
    scaler.scale(model(x).sum() * math.inf).backward()
    scaler.unscale_(opt)
    assert not math.isfinite(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
    after_skipped_update(SimpleNamespace(scaler=scaler))
    opt.zero_grad(set_to_none=True)
    assert scaler.get_scale() == 2.0 ** 15
    scaler.scale(model(x).sum()).backward()
    scaler.unscale_(opt)  # raised "unscale_() has already been called" before the update
    assert math.isfinite(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
    after_skipped_update(SimpleNamespace(scaler=None))  # bf16 / fp32: nothing to do
