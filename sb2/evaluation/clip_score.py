"""CLIP score as the authors' evaluation (GigaGAN's, used for the paper's Table 3): open_clip ViT-g-14
(laion2b_s12b_b42k), the caption prefixed with "A photo depicts ", the cosine of image and text embeddings averaged
over images (0.32 in Table 3, not ×100).

GigaGAN inserts the tokens of "a photo depicts" after the start token and truncates to 77 with the end token last;
tokenizing ``prefix + caption`` with truncation gives the same tokens (the BPE works word by word and lower-cases).
The image goes through open_clip's own validation transform (shortest side resized with its interpolation, center
crop, normalization), here on the tensor with Pillow's arithmetic (:mod:`sb2.evaluation.preprocess`).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from sb2.evaluation.preprocess import crop_center, resize_uint8

CLIP_PREFIX = "A photo depicts "


class ImageTextJudge(Protocol):
    """What a CLIP-like judge offers: uint8 images (B, 3, H, W) → (B, D); captions → (B, D)."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, captions: list[str]) -> torch.Tensor: ...


def with_prefix(captions: list[str], prefix: str) -> list[str]:
    return [prefix + c for c in captions]


def pair_cosines(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Cosine of each image with its own caption, in float32."""
    return F.cosine_similarity(image_emb.float(), text_emb.float(), dim=1)


def clip_cosines(judge: ImageTextJudge, images: torch.Tensor, captions: list[str],
                 prefix: str = CLIP_PREFIX) -> torch.Tensor:
    return pair_cosines(judge.encode_image(images), judge.encode_text(with_prefix(captions, prefix)))


class OpenClipJudge:
    """An open_clip model (:class:`sb2.models.loading.ClipScorer`) as a judge, with its validation preprocessing."""

    def __init__(self, scorer, device, dtype: torch.dtype = torch.float32):
        self.scorer = scorer
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = scorer.model.to(self.device, dtype)
        cfg = getattr(scorer.model.visual, "preprocess_cfg", {}) or {}
        self.size = scorer.image_size
        self.interpolation = cfg.get("interpolation", "bicubic")
        if cfg.get("resize_mode", "shortest") != "shortest":
            raise ValueError(f"open_clip resize_mode {cfg.get('resize_mode')!r} is not supported (only 'shortest')")
        self.mean = torch.tensor(scorer.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(scorer.std, device=self.device).view(1, 3, 1, 1)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """open_clip's val transform: Resize(size) of the shortest side, CenterCrop(size), ToTensor, Normalize."""
        h, w = images.shape[-2:]
        if min(h, w) != self.size:  # torchvision: the long side becomes int(size * long / short)
            nh, nw = (self.size, int(self.size * w / h)) if h <= w else (int(self.size * h / w), self.size)
            images = resize_uint8(images, (nh, nw), self.interpolation)
        images = crop_center(images, self.size)
        return ((images.to(self.device).float() / 255.0 - self.mean) / self.std).to(self.dtype)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(self.pixels(images.to(self.device)))

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.scorer.tokenizer(captions).to(self.device))
