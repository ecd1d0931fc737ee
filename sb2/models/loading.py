"""Every model is loaded here, from a Hub id, a local folder in its library's own format, or ``tiny:<name>`` (built
once into a cache folder by :mod:`sb2.models.tiny`, then read back through the same ``from_pretrained`` calls).

No module below the training loop knows whether a model is SD2.1, a mini-world model or a tiny test model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch only annotates here; importing it costs the prompt builder half a GiB
    import torch

TINY_PREFIX = "tiny:"


class ModelLoadError(RuntimeError):
    """A model could not be found or is not what it claims to be (one-line message naming it)."""


def cache_root() -> Path:
    return Path(os.environ.get("SB2_CACHE", Path.home() / ".cache" / "sb2"))


def resolve(model_id: str) -> str:
    """A Hub id or local path as given; ``tiny:<component>`` → the local folder of that tiny model."""
    if model_id.startswith(TINY_PREFIX):
        from sb2.models.tiny import TINY_COMPONENTS, build_tiny_world

        name = model_id[len(TINY_PREFIX):]
        if name not in TINY_COMPONENTS:
            raise ModelLoadError(f"unknown tiny model {model_id!r} (known: {', '.join(TINY_COMPONENTS)})")
        return str(build_tiny_world(cache_root() / "tiny") / name)
    return model_id


def _is_local(path: str) -> bool:
    return Path(path).exists() or path.startswith((".", "/", "~"))


def _subfolder(path: str, name: str) -> str | None:
    """Pipeline folders and Hub repos keep each model in a subfolder; a bare model folder has config.json at the top."""
    if _is_local(path):
        p = Path(path).expanduser()
        if not p.exists():
            raise ModelLoadError(f"model folder {path!r} does not exist")
        files = ("config.json", "scheduler_config.json")
        if any((p / name / f).is_file() for f in files):
            return name
        if any((p / f).is_file() for f in files):
            return None
        raise ModelLoadError(f"{path!r} is neither a diffusers model folder nor a pipeline folder with {name}/")
    return name


def _hub_kwargs(models_cfg: Any | None) -> dict[str, Any]:
    if models_cfg is None:
        return {}
    kw: dict[str, Any] = {}
    if models_cfg.revision:
        kw["revision"] = models_cfg.revision
    if models_cfg.local_files_only:
        kw["local_files_only"] = True
    return kw


def _from_pretrained(cls, model_id: str, name: str, models_cfg=None, dtype=None, **extra):
    path = resolve(model_id)
    sub = _subfolder(path, name)
    kw = dict(_hub_kwargs(models_cfg), **extra)
    if cls.__name__ != "DDPMScheduler":
        kw["use_safetensors"] = True  # never unpickle: a pickled .bin is refused, not loaded
    if sub:
        kw["subfolder"] = sub
    if dtype is not None:
        kw["torch_dtype"] = dtype
    try:
        return cls.from_pretrained(os.path.expanduser(path), **kw)
    except Exception as e:  # noqa: BLE001 — safetensors, hub and config errors all mean "not a usable model"
        raise ModelLoadError(f"cannot load {cls.__name__} from {model_id!r}: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else e.__class__.__name__


def load_unet(model_id: str, models_cfg=None, dtype=None, device="cpu"):
    from diffusers import UNet2DConditionModel

    return _from_pretrained(UNet2DConditionModel, model_id, "unet", models_cfg, dtype).to(device)


@dataclass
class TeacherParts:
    """The frozen teacher and what the whole system takes from it: text encoder, tokenizer, VAE and noise schedule."""

    unet: Any
    text_encoder: Any
    tokenizer: Any
    vae: Any
    scheduler: Any

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)


def load_noise_scheduler(model_id: str, models_cfg=None):
    from diffusers import DDPMScheduler

    return _from_pretrained(DDPMScheduler, model_id, "scheduler", models_cfg)


def load_text_encoder(model_id: str, models_cfg=None, dtype=None, device="cpu"):
    from transformers import CLIPTextModel, CLIPTokenizer

    path = resolve(model_id)
    kw = _hub_kwargs(models_cfg)
    try:
        tok = CLIPTokenizer.from_pretrained(os.path.expanduser(path), subfolder="tokenizer", **kw)
        enc = CLIPTextModel.from_pretrained(os.path.expanduser(path), subfolder="text_encoder",
                                            dtype=dtype, use_safetensors=True, **kw).to(device)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the text encoder of {model_id!r}: {_first_line(e)}") from e
    return enc.eval().requires_grad_(False), tok


def load_tokenizer(model_id: str, models_cfg=None):
    """The text encoder's tokenizer alone (the ``tokenizer`` subfolder of a pipeline), as a fast tokenizer."""
    from transformers import CLIPTokenizerFast

    path = resolve(model_id)
    p = Path(path).expanduser()
    sub = "tokenizer" if not _is_local(path) or (p / "tokenizer").is_dir() else None
    kw = _hub_kwargs(models_cfg)
    if sub:
        kw["subfolder"] = sub
    try:
        return CLIPTokenizerFast.from_pretrained(str(p) if _is_local(path) else path, **kw)
    except (OSError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise ModelLoadError(f"cannot load the tokenizer of {model_id!r}: {first}") from e


def load_vae(model_id: str, models_cfg=None, dtype=None, device="cpu"):
    from diffusers import AutoencoderKL

    return _from_pretrained(AutoencoderKL, model_id, "vae", models_cfg, dtype).to(device).eval().requires_grad_(False)


def load_tiny_vae(model_id: str, models_cfg=None, dtype=None, device="cpu"):
    """TinyVAE (TAESD, diffusers ``AutoencoderTiny``): a folder with config.json at the top, as ``madebyollin/taesd``."""
    from diffusers import AutoencoderTiny

    path = resolve(model_id)
    kw = _hub_kwargs(models_cfg)
    if dtype is not None:
        kw["torch_dtype"] = dtype
    try:
        vae = AutoencoderTiny.from_pretrained(os.path.expanduser(path), use_safetensors=True, **kw)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"cannot load AutoencoderTiny from {model_id!r}: {_first_line(e)}") from e
    return vae.to(device).eval().requires_grad_(False)


def load_teacher(models_cfg, dtype=None, device="cpu") -> TeacherParts:
    mid = models_cfg.teacher
    unet = load_unet(mid, models_cfg, dtype, device).eval().requires_grad_(False)
    text_encoder, tokenizer = load_text_encoder(mid, models_cfg, dtype, device)
    return TeacherParts(
        unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
        vae=load_vae(mid, models_cfg, dtype, device), scheduler=load_noise_scheduler(mid, models_cfg),
    )


@dataclass
class ClipScorer:
    """open_clip model used by the CLIP loss: frozen image and text towers, plus its tokenizer and input size."""

    model: Any
    tokenizer: Any
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def encode_text(self, prompts: list[str], device) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(prompts).to(device))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)


def load_clip(model_id: str, device="cpu", dtype=None) -> ClipScorer:
    """open_clip model from ``name:pretrained`` (a tag or a checkpoint file), ``hf-hub:org/repo``, or a local
    open_clip folder (``open_clip_config.json`` + weights)."""
    import open_clip

    path = resolve(model_id)
    if _is_local(path) and Path(path).expanduser().is_dir():
        name, pretrained = f"local-dir:{Path(path).expanduser()}", None
    elif path.startswith("hf-hub:"):
        name, pretrained = path, None
    elif ":" in path:
        name, pretrained = path.split(":", 1)
    else:
        name, pretrained = path, None
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as e:  # noqa: BLE001 — open_clip loads checkpoints with weights_only=True
        raise ModelLoadError(f"cannot load open_clip model {model_id!r}: {_first_line(e)}") from e
    if dtype is not None:
        model = model.to(dtype)
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    mean = tuple(getattr(model.visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073))
    std = tuple(getattr(model.visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711))
    return ClipScorer(model.eval().requires_grad_(False), tokenizer, size, mean, std)


def load_perceptual_net(spec: str, device="cpu"):
    """A perceptual distance between images in [-1, 1], one value per sample: LPIPS (``lpips:alex|vgg|squeeze``, from
    the ``lpips`` package, which fetches its torchvision backbone once) or ``module:package.module:factory`` returning
    an ``nn.Module`` (images, images) → distances."""
    import torch

    if spec.startswith("module:"):
        from sb2.evaluation.features import import_factory

        net = import_factory(spec.removeprefix("module:"))()
    else:
        try:
            import lpips
        except ImportError:
            raise ModelLoadError(f"perceptual net {spec!r} needs the lpips package (pip install lpips)") from None
        net = lpips.LPIPS(net=spec.split(":", 1)[1], verbose=False)
    if not isinstance(net, torch.nn.Module):
        raise ModelLoadError(f"perceptual net {spec!r} is not an nn.Module")
    return net.to(device).eval().requires_grad_(False)


def load_one_step_unet(path: str | Path, models_cfg=None, dtype=None, device="cpu"):
    """A trained one-step student as a plain UNet: a UNet folder, a pipeline folder, or a LoRA adapter folder
    (``sb2_lora.json`` naming its base), whose LoRA is folded into the base weights."""
    from sb2.models.lora import LORA_META, load_folded_lora_unet

    p = Path(str(path)).expanduser()
    if (p / LORA_META).is_file():
        return load_folded_lora_unet(p, models_cfg, dtype=dtype, device=device)
    return load_unet(str(path), models_cfg, dtype, device)
