"""Image preprocessing of the protocol: center-crop to a square, LANCZOS resize to 256 (as the paper, GigaGAN and
clean-fid do), and the resizes the judges apply after it.

Two paths give the same pixels. The PIL path reads reference images from disk. The tensor path resizes generated
images on the GPU with Pillow's own resampling arithmetic: the same filter weights (``precompute_coeffs`` in Pillow's
``Resample.c``), the horizontal pass before the vertical one, and for 8-bit images the same 22-bit fixed-point
coefficients and rounding, so it reproduces ``PIL.Image.resize`` bit for bit on uint8 images (float images: to float32
rounding). That keeps the protocol exact without sending 30K images through the CPU.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

# Pillow's 8-bit resampling keeps coefficients as ints with this many fractional bits (Resample.c).
PRECISION_BITS = 32 - 8 - 2


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3.0) if -3.0 <= x < 3.0 else 0.0


def _bicubic(x: float) -> float:
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _bilinear(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


FILTERS = {"lanczos": (_lanczos, 3.0), "bicubic": (_bicubic, 2.0), "bilinear": (_bilinear, 1.0)}
PIL_FILTERS = {"lanczos": Image.LANCZOS, "bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


@lru_cache(maxsize=64)
def resize_weights(in_size: int, out_size: int, filter: str) -> np.ndarray:
    """The (out_size, in_size) float64 matrix of Pillow's resampling weights along one axis (``precompute_coeffs``)."""
    fn, support = FILTERS[filter]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    w = np.zeros((out_size, in_size), dtype=np.float64)
    ss = 1.0 / filterscale
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        k = [fn((x - center + 0.5) * ss) for x in range(xmin, xmax)]
        total = 0.0
        for v in k:  # plain left-to-right sum, as the C loop (Python's sum() may compensate)
            total += v
        w[xx, xmin:xmax] = [v / total for v in k] if total != 0.0 else k
    return w


@lru_cache(maxsize=64)
def _fixed_point_weights(in_size: int, out_size: int, filter: str) -> np.ndarray:
    """Pillow's 8-bit coefficients: round half away from zero to 22 fractional bits (``normalize_coeffs_8bpc``)."""
    w = resize_weights(in_size, out_size, filter) * (1 << PRECISION_BITS)
    return np.where(w < 0, np.ceil(w - 0.5), np.floor(w + 0.5))


@lru_cache(maxsize=64)
def _weights_on(device: torch.device, in_size: int, out_size: int, filter: str, fixed: bool) -> torch.Tensor:
    w = (_fixed_point_weights if fixed else resize_weights)(in_size, out_size, filter)
    return torch.from_numpy(w).to(device)


def _resize_axis(x: torch.Tensor, size: int, axis: int, filter: str, fixed: bool) -> torch.Tensor:
    """One pass along ``axis`` (-1 width, -2 height) in float64, which holds Pillow's integer sums exactly."""
    in_size = x.shape[axis]
    if in_size == size:  # Pillow skips a pass whose size does not change
        return x
    w = _weights_on(x.device, in_size, size, filter, fixed)
    y = torch.matmul(x, w.T) if axis == -1 else torch.matmul(w, x)
    if fixed:  # (sum + 2^21) >> 22, clipped to a byte, as Pillow's clip8
        return torch.floor((y + (1 << (PRECISION_BITS - 1))) / (1 << PRECISION_BITS)).clamp_(0, 255)
    return y.float().double()  # mode "F" stores each pass as float32


def resize_uint8(images: torch.Tensor, size: tuple[int, int], filter: str = "lanczos") -> torch.Tensor:
    """``PIL.Image.resize`` of each uint8 image (B, C, H, W) to ``size`` = (H', W'), bit for bit."""
    x = images.double()
    x = _resize_axis(x, size[1], -1, filter, fixed=True)
    x = _resize_axis(x, size[0], -2, filter, fixed=True)
    return x.to(torch.uint8)


def resize_float(images: torch.Tensor, size: tuple[int, int], filter: str = "bicubic") -> torch.Tensor:
    """``PIL.Image.resize`` of each channel as a mode-"F" (float32) image, as clean-fid resizes to 299."""
    x = images.double()
    x = _resize_axis(x, size[1], -1, filter, fixed=False)
    x = _resize_axis(x, size[0], -2, filter, fixed=False)
    return x.float()


def center_crop_box(width: int, height: int) -> tuple[int, int, int]:
    """(left, top, side) of the largest centered square, rounded as torchvision's ``center_crop`` (GigaGAN's
    ``CenterCropLongEdge``)."""
    side = min(width, height)
    return int(round((width - side) / 2.0)), int(round((height - side) / 2.0)), side


def crop_center(images: torch.Tensor, size: int) -> torch.Tensor:
    """A centered ``size`` × ``size`` crop of (…, H, W), offsets rounded as torchvision's ``center_crop``."""
    top, left = int(round((images.shape[-2] - size) / 2.0)), int(round((images.shape[-1] - size) / 2.0))
    return images[..., top:top + size, left:left + size]


def pil_center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """The protocol on a PIL image (reference images): RGB, center square, LANCZOS to ``size``."""
    image = image.convert("RGB")
    left, top, side = center_crop_box(*image.size)
    image = image.crop((left, top, left + side, top + side))
    return image if side == size else image.resize((size, size), Image.LANCZOS)


def center_crop_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """The protocol on uint8 tensors (B, 3, H, W) on any device; the same pixels as :func:`pil_center_crop_resize`."""
    side = min(images.shape[-2:])
    images = crop_center(images, side)
    return images if side == size else resize_uint8(images, (size, size), "lanczos")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] → uint8 on their device, rounded as diffusers' PIL output (what a saved PNG holds)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).contiguous()
