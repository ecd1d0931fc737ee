"""LoRA adapters on diffusers UNets through peft: the LoRA teacher (on the frozen teacher's own weights, switched
on and off rather than copied) and the LoRA student (saved as a peft adapter plus the id of its base)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

LORA_META = "sb2_lora.json"


def add_lora(unet, rank: int, alpha: float, target_modules: list[str], dropout: float = 0.0,
             adapter_name: str = "default") -> list[torch.nn.Parameter]:
    """Attach a LoRA adapter to ``unet`` in place; only its parameters train. Returns them."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout,
                     init_lora_weights="gaussian")
    unet.add_adapter(cfg, adapter_name=adapter_name)
    params = []
    for name, p in unet.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
            params.append(p)
    if not params:
        raise ValueError(f"no LoRA layer matched target_modules={target_modules}")
    return params


def lora_state_dict(unet, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet, adapter_name=adapter_name).items()}


def save_lora(unet, folder: str | Path, base_id: str, adapter_name: str = "default") -> Path:
    """peft's adapter format (``adapter_config.json`` + ``adapter_model.safetensors``) and ``sb2_lora.json``
    naming the base UNet, so the pair is a complete student."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet.peft_config[adapter_name].save_pretrained(str(folder))
    save_file(lora_state_dict(unet, adapter_name), str(folder / "adapter_model.safetensors"))
    (folder / LORA_META).write_text(json.dumps({"base": base_id}, indent=2))
    return folder


def load_lora_scale_and_weights(folder: str | Path) -> tuple[float, dict[str, torch.Tensor]]:
    from peft import LoraConfig
    from safetensors.torch import load_file

    from sb2.models.loading import ModelLoadError

    folder = Path(folder)
    try:
        cfg = LoraConfig.from_pretrained(str(folder))
        weights = load_file(str(folder / "adapter_model.safetensors"))
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"{folder} is not a usable LoRA adapter: {str(e).strip().splitlines()[0]}") from e
    scale = cfg.lora_alpha / (cfg.r ** 0.5 if cfg.use_rslora else cfg.r)
    return scale, weights


def load_folded_lora_unet(folder: str | Path, models_cfg=None, dtype=None, device="cpu"):
    """Base UNet with the adapter folded in (W + (α/r)·B·A): a plain UNet of the base architecture."""
    from sb2.merge import fold_lora
    from sb2.models.loading import load_unet

    folder = Path(folder)
    base_id = json.loads((folder / LORA_META).read_text())["base"]
    unet = load_unet(base_id, models_cfg, dtype=None, device="cpu")
    scale, lora = load_lora_scale_and_weights(folder)
    unet.load_state_dict(fold_lora(unet.state_dict(), lora, scale))
    return unet.to(device=device, dtype=dtype) if dtype is not None else unet.to(device)
