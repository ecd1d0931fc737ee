"""Images in [-1, 1] → PNG files and grids."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in to_uint8(images)]


def save_grid(images: torch.Tensor, path: str | Path, cols: int = 4, pad: int = 2) -> Path:
    from torchvision.utils import make_grid

    grid = make_grid(to_uint8(images), nrow=min(cols, len(images)), padding=pad, pad_value=255)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    return path
