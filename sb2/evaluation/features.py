"""The judges: feature networks for FID and precision/recall, and the CLIP-like image–text models.

A feature network is any ``nn.Module`` mapping uint8 images (B, 3, H, W), already center-cropped and resized to the
protocol's size, to vectors (B, D); it does its own resizing and normalization. Built from the config
(:class:`sb2.config.ExtractorConfig`):

- ``inception``: Inception-v3 pool3 (2048-d), fed as clean-fid feeds it (GigaGAN's FID);
- ``vgg16``: torch-fidelity's VGG16 fc2 after ReLU (4096-d), the features of improved precision/recall;
- ``random_conv``: a fixed random CNN, so that the protocol runs offline on tiny models (it judges nothing);
- ``module``: ``package.module:factory``, a callable returning the network (how the mini-world judges plug in).

Weight files come from a local path or a URL fetched once into the cache (``models.local_files_only`` forbids the
fetch); ``random`` gives random weights of the real architecture, for speed benchmarks.
"""

from __future__ import annotations

import importlib
import zipfile
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from sb2.evaluation.clip_score import OpenClipJudge
from sb2.evaluation.preprocess import resize_float
from sb2.models.loading import ModelLoadError, cache_root

RANDOM = "random"
INCEPTION_LAYERS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                    "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                    "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool")


def weights_file(source: str, local_only: bool = False) -> str:
    """A local weights file for ``source``: the path itself, or a URL downloaded once to ``<cache>/weights/``."""
    if source.startswith(("http://", "https://")):
        target = cache_root() / "weights" / source.rsplit("/", 1)[-1]
        if not target.is_file():
            if local_only:
                raise ModelLoadError(f"{source!r} is not in the cache {str(target)!r} and models.local_files_only "
                                     f"is set: download it there or give a local path")
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(source, str(target), progress=False)
        return str(target)
    path = Path(source).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"weights file {source!r} does not exist")
    return str(path)


class FIDInception(nn.Module):
    """Inception-v3 pool3 features the clean-fid way: each channel resized to 299 as a float image with PIL bicubic,
    clipped to [0, 255], then (x − 128) / 128 into the TF-ported network (torch-fidelity's layers, or the layers of
    clean-fid's TorchScript ``inception-2015-12-05.pt``)."""

    size = 299

    def __init__(self, weights: str):
        super().__init__()
        self.torchscript = weights != RANDOM and zipfile.is_zipfile(weights) and _is_torchscript(weights)
        if self.torchscript:
            self.net = torch.jit.load(weights, map_location="cpu").layers
        else:
            self.net = _fidelity_inception(weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = resize_float(images, (self.size, self.size), "bicubic").clamp_(0, 255)
        x = ((x - 128) / 128).to(next(self.net.parameters()).dtype)
        if self.torchscript:
            return self.net.forward(x).flatten(1).float()
        for name in INCEPTION_LAYERS:
            x = getattr(self.net, name)(x)
        return x.flatten(1).float()


def _is_torchscript(path: str) -> bool:
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def _fidelity_inception(weights: str) -> nn.Module:
    from torch_fidelity import feature_extractor_inceptionv3 as fi

    with ExitStack() as stack:
        if weights == RANDOM:  # torch-fidelity has no switch for random weights: skip its download and load
            stack.enter_context(mock.patch.object(fi, "load_state_dict_from_url", lambda *a, **k: None))
            stack.enter_context(mock.patch.object(fi.FeatureExtractorInceptionV3, "load_state_dict",
                                                  lambda self, *a, **k: None))
        return fi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                              feature_extractor_weights_path=None if weights == RANDOM else weights)


class VGG16Features(nn.Module):
    """torch-fidelity's VGG16 (torchvision weights, TF-style bilinear resize to 224, ImageNet normalization), fc2
    after ReLU: the 4096-d features of improved precision/recall."""

    def __init__(self, weights: str):
        super().__init__()
        import torchvision
        from torch_fidelity import feature_extractor_vgg16 as fv

        with ExitStack() as stack:
            if weights == RANDOM:
                stack.enter_context(mock.patch.object(fv, "torchvision_load_pretrained_vgg16",
                                                      lambda **k: torchvision.models.vgg16()))
            self.net = fv.FeatureExtractorVGG16("vgg16", ["fc2_relu"],
                                                feature_extractor_weights_path=None if weights == RANDOM else weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)[0]


class RandomConvFeatures(nn.Module):
    """A fixed random CNN (seeded): uint8 images → ``dim`` vectors. It has no notion of image quality; it lets the
    protocol run end to end on tiny models, offline."""

    def __init__(self, dim: int = 16, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, dim, 3, stride=2), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())
        for p in self.net.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.3

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.float() / 127.5 - 1)


def import_factory(spec: str):
    """``package.module:attribute`` → the attribute."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"expected 'package.module:factory', got {spec!r}")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ModelLoadError(f"cannot import {spec!r}: {e}") from e


class _Float32Vectors(nn.Module):
    """Any extractor's output as float32 (B, D), so plug-ins may return other dtypes or shapes."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).reshape(images.shape[0], -1).float()


def build_extractor(cfg, device, local_only: bool = False) -> nn.Module:
    """The feature network an :class:`sb2.config.ExtractorConfig` names, in eval mode on ``device``."""
    if cfg.kind == "inception":
        net = FIDInception(cfg.source if cfg.source == RANDOM else weights_file(cfg.source, local_only))
    elif cfg.kind == "vgg16":
        net = VGG16Features(cfg.source if cfg.source == RANDOM else weights_file(cfg.source, local_only))
    elif cfg.kind == "random_conv":
        net = RandomConvFeatures(cfg.dim, cfg.seed)
    else:
        net = import_factory(cfg.source)()
        if not isinstance(net, nn.Module):
            raise ModelLoadError(f"{cfg.source!r} did not return an nn.Module")
    return _Float32Vectors(net).to(device).eval().requires_grad_(False)


def build_clip_judge(source: str, device, dtype=torch.float32, checkpoint: str | None = None, local_only=False):
    """An image–text judge: an open_clip model id as ``models.clip`` accepts (optionally with a full state-dict
    checkpoint on top, as HPSv2's), or ``module:package.module:factory`` returning an object with ``encode_image``
    (uint8 images) and ``encode_text`` (captions)."""
    if source.startswith("module:"):
        return import_factory(source.removeprefix("module:"))()
    return OpenClipJudge(load_clip_with_checkpoint(source, device, checkpoint, local_only), device, dtype)


def load_clip_with_checkpoint(source: str, device, checkpoint: str | None = None, local_only: bool = False):
    """An open_clip model (:class:`sb2.models.loading.ClipScorer`) with an optional full state-dict checkpoint loaded
    over both towers (HPSv2's ``HPS_v2_compressed.pt``): the HPS judge of the evaluation and the HPS reward."""
    from sb2.models.loading import load_clip

    scorer = load_clip(source, device=device)
    if checkpoint:
        state = torch.load(weights_file(checkpoint, local_only), map_location="cpu", weights_only=True)
        try:
            scorer.model.load_state_dict(state.get("state_dict", state))
        except RuntimeError as e:
            raise ModelLoadError(f"checkpoint {checkpoint!r} does not fit {source!r}: {str(e).splitlines()[0]}") from e
    return scorer
