"""Weight merging (paper eq. 6) and LoRA folding, as pure functions over state dicts, and the `merge` stage."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch


def fold_lora(
    base: Mapping[str, torch.Tensor], lora: Mapping[str, torch.Tensor], scale: float
) -> dict[str, torch.Tensor]:
    """W' = W + scale · B A for every LoRA pair in ``lora`` (peft key names ``<module>.lora_A.weight`` and
    ``<module>.lora_B.weight``, adapter name stripped); scale = alpha / rank. Linear and 1×1-conv weights."""
    out = {k: v.clone() for k, v in base.items()}
    modules = sorted({k.rsplit(".lora_A.", 1)[0] for k in lora if ".lora_A." in k})
    if not modules and lora:
        raise ValueError("LoRA state dict has no lora_A weights")
    for mod in modules:
        a, b = lora[f"{mod}.lora_A.weight"].float(), lora[f"{mod}.lora_B.weight"].float()
        key = f"{mod}.weight" if f"{mod}.weight" in out else f"{mod}.base_layer.weight"
        if key not in out:
            raise KeyError(f"LoRA module {mod!r} has no base weight in the base state dict")
        w = out[key]
        delta = scale * (b.flatten(1) @ a.flatten(1))
        out[key] = (w.float() + delta.reshape(w.shape)).to(w.dtype)
    return out


def merge_weights(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], lam: float
) -> dict[str, torch.Tensor]:
    """θ = λ·θ_A + (1 − λ)·θ_B (eq. 6) for two models of the same architecture.

    λ = 1 returns A and λ = 0 returns B exactly (no rounding through the formula). Non-float buffers must agree.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b))[:3], sorted(set(b) - set(a))[:3]
        raise ValueError(f"models differ in parameters: only in A {only_a}, only in B {only_b}")
    out: dict[str, torch.Tensor] = {}
    for k, ta in a.items():
        tb = b[k]
        if ta.shape != tb.shape:
            raise ValueError(f"{k}: shape {tuple(ta.shape)} in A vs {tuple(tb.shape)} in B")
        if not ta.is_floating_point():
            if not torch.equal(ta, tb):
                raise ValueError(f"{k}: non-float tensors differ between A and B")
            out[k] = ta.clone()
        elif lam == 1.0:
            out[k] = ta.clone()
        elif lam == 0.0:
            out[k] = tb.clone().to(ta.dtype)
        else:
            out[k] = (lam * ta.double() + (1.0 - lam) * tb.double()).to(ta.dtype)
    return out


def merge_students(path_a: str | Path, path_b: str | Path, lam: float, out_dir: str | Path, models_cfg=None,
                   extra: dict | None = None) -> Path:
    """The merge stage: load two one-step students (UNet folders, LoRA adapters or pipelines), fold any LoRA,
    interpolate, and save a diffusers UNet folder to ``out_dir/unet`` with ``merge.json`` recording λ (and ``extra``,
    e.g. how the λ sweep chose it)."""
    import json

    from sb2.models.loading import load_one_step_unet
    from sb2.atomic import atomic_dir

    unet_a = load_one_step_unet(path_a, models_cfg)
    unet_b = load_one_step_unet(path_b, models_cfg)
    merged = merge_weights(unet_a.state_dict(), unet_b.state_dict(), lam)
    unet_a.load_state_dict(merged)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        unet_a.save_pretrained(tmp / "unet")
        (tmp / "merge.json").write_text(json.dumps({"a": str(path_a), "b": str(path_b), "lambda": lam, **(extra or {})},
                                                    indent=2))
    return out_dir / "unet"
