"""Nearest-neighbour 2× upsampling followed by a 3×3 convolution, computed without the upsampled tensor.

Every upsampler of the SD UNet and VAE decoder (diffusers' ``Upsample2D``) repeats each pixel 2×2 and convolves the
result with a 3×3 kernel. Each output pixel then sees only a 2×2 window of the *input*, with a kernel that sums rows
and columns of the 3×3 one: the same image at 4 multiply-adds per output pixel and channel pair instead of 9 (16
instead of 36 per input pixel). In the SD VAE decoder at 512 px the three upsampling convolutions are about 0.7 of its
2.5 TFLOP, so this removes about 15% of its arithmetic, exactly in real arithmetic; in fp16 the sums run in another
order and the summed kernel is rounded once to the weights' dtype.

Two equivalent forms:

- ``"transposed"``: one transposed convolution, stride 2, padding 1, with a 4×4 kernel ``T = M W Mᵀ`` (per channel
  pair; ``M`` is :data:`TRANSPOSED_ROWS`);
- ``"phases"``: one 2×2 convolution of the zero-padded input giving the four output phases as 4× the channels, then
  interleaved: output pixel ``(2i + a, 2j + b)`` is phase ``(a, b)`` at ``(i + a, j + b)`` of that convolution, whose
  kernel is ``A_a W A_bᵀ`` (:data:`PHASE_ROWS`). It computes (h + 1)(w + 1) positions for h·w used: 1–3% more
  work on the VAE decoder's maps (64² and up), 6–27% more on the UNet's small ones (32² down to 8²).

Which is faster depends on cuDNN's kernels for each (strided transposed convolutions are its data-gradient path);
``bench/inference.py`` measures both.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from diffusers.models.upsampling import Upsample2D
from torch import nn

SubpixelMode = Literal["transposed", "phases"]
MODES: tuple[str, ...] = get_args(SubpixelMode)

# Row k of the transposed kernel sums these rows of the 3×3 kernel: output row 2i + a takes input row x with weight
# T[2(i − x) + a + 1] (padding 1), i.e. k = 0: (a = 1, x = i + 1) ← row 2; k = 1: (a = 0, x = i) ← rows 1 + 2;
# k = 2: (a = 1, x = i) ← rows 0 + 1; k = 3: (a = 0, x = i − 1) ← row 0.
TRANSPOSED_ROWS = ((0, 0, 1), (0, 1, 1), (1, 1, 0), (1, 0, 0))
# Phase a's 2×2 window over the input padded by 1: a = 0 covers input rows i − 1 (← row 0) and i (← rows 1 + 2);
# a = 1 covers rows i (← rows 0 + 1) and i + 1 (← row 2).
PHASE_ROWS = (((1, 0, 0), (0, 1, 1)), ((1, 1, 0), (0, 0, 1)))


def transposed_kernel(weight: torch.Tensor) -> torch.Tensor:
    """The 4×4 kernel of ``conv_transpose2d(x, ·, stride=2, padding=1)`` equal to nearest 2× upsampling then
    ``conv2d(·, weight, padding=1)``; ``weight`` is ``[out, in, 3, 3]``, the result ``[in, out, 4, 4]``, summed in fp32
    (or the weight's own wider dtype) and returned in the weight's dtype."""
    _check(weight)
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))
    m = torch.tensor(TRANSPOSED_ROWS, dtype=w.dtype, device=w.device)
    return torch.einsum("kr,ls,oirs->iokl", m, m, w).to(weight.dtype).contiguous()


def phase_kernel(weight: torch.Tensor) -> torch.Tensor:
    """The ``[4·out, in, 2, 2]`` kernel of the four output phases, phase ``(a, b)`` in output channels
    ``(2a + b)·out … (2a + b + 1)·out − 1`` (see the module's docstring)."""
    _check(weight)
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))
    a = torch.tensor(PHASE_ROWS, dtype=w.dtype, device=w.device)  # [phase, window row, kernel row]
    k = torch.einsum("akr,bls,oirs->aboikl", a, a, w)  # [a, b, out, in, 2, 2]
    return k.reshape(4 * w.shape[0], w.shape[1], 2, 2).to(weight.dtype).contiguous()


def _check(weight: torch.Tensor) -> None:
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"a 3×3 convolution's weight [out, in, 3, 3] is needed, got shape {tuple(weight.shape)}")


def upsample_conv(x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None, mode: SubpixelMode) -> torch.Tensor:
    """Nearest 2× upsampling + the 3×3 convolution, from the kernel :func:`transposed_kernel` or :func:`phase_kernel`
    made for ``mode``."""
    if mode == "transposed":
        return F.conv_transpose2d(x, kernel, bias, stride=2, padding=1)
    if mode != "phases":
        raise ValueError(f"unknown mode {mode!r}: one of {MODES}")
    n, _, h, w = x.shape
    out_ch = kernel.shape[0] // 4
    y = F.conv2d(F.pad(x, (1, 1, 1, 1)), kernel, None if bias is None else bias.repeat(4))  # [n, 4·out, h+1, w+1]
    y = y.view(n, 2, 2, out_ch, h + 1, w + 1)
    rows = [torch.stack([y[:, a, b, :, a:a + h, b:b + w] for b in (0, 1)], dim=-1) for a in (0, 1)]  # [n,out,h,w,2]
    out = torch.stack(rows, dim=3)  # [n, out, h, 2 (a), w, 2 (b)]
    return out.reshape(n, out_ch, 2 * h, 2 * w).contiguous(memory_format=_memory_format(x))


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1 \
        else torch.contiguous_format


class SubpixelUpsample2D(Upsample2D):
    """A diffusers ``Upsample2D`` (nearest 2×, then a 3×3 convolution) computed by :func:`upsample_conv`. Made by
    :func:`to_subpixel`, which changes an upsampler's class in place: its parameters, their names and the model's
    ``state_dict`` stay as they were (saving, loading and exporting see a plain ``Upsample2D``); the kernel is a
    buffer outside the ``state_dict``, made from the weights when the upsampler is converted — for inference:
    weights changed later are not seen. A call with an ``output_size`` other than twice the input (diffusers passes
    one for latents not divisible by the UNet's downsampling) runs the upsampler as diffusers does."""

    subpixel_mode: SubpixelMode

    def forward(self, hidden_states: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
        h, w = hidden_states.shape[-2:]
        if output_size is not None and tuple(output_size) != (2 * h, 2 * w):
            return super().forward(hidden_states, output_size, *args, **kwargs)
        kernel = self.subpixel_kernel.to(hidden_states.dtype)  # a no-op once the model is in its inference dtype
        bias = None if self.subpixel_bias is None else self.subpixel_bias.to(hidden_states.dtype)
        return upsample_conv(hidden_states, kernel, bias, self.subpixel_mode)


def to_subpixel(upsample: nn.Module, mode: SubpixelMode = "transposed") -> SubpixelUpsample2D:
    """Convert one eligible upsampler (see :func:`eligible`) in place and return it."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: one of {MODES}")
    if isinstance(upsample, SubpixelUpsample2D):
        if upsample.subpixel_mode != mode:
            raise ValueError(f"this upsampler is already converted to {upsample.subpixel_mode!r}, not {mode!r}")
        return upsample
    if not eligible(upsample):
        raise ValueError("only a diffusers Upsample2D with nearest interpolation, no norm and a 3×3 convolution "
                         "(stride 1, padding 1) can be converted")
    conv = _conv(upsample)
    with torch.no_grad():
        kernel = (transposed_kernel if mode == "transposed" else phase_kernel)(conv.weight.detach())
        bias = None if conv.bias is None else conv.bias.detach().clone()
    upsample.__class__ = SubpixelUpsample2D
    upsample.subpixel_mode = mode
    upsample.register_buffer("subpixel_kernel", kernel, persistent=False)
    upsample.register_buffer("subpixel_bias", bias, persistent=False)
    return upsample


def _conv(upsample: nn.Module) -> nn.Module | None:
    return getattr(upsample, "conv", None) if getattr(upsample, "name", "conv") == "conv" \
        else getattr(upsample, "Conv2d_0", None)


def eligible(module: nn.Module) -> bool:
    """A diffusers ``Upsample2D`` that this module computes exactly: nearest interpolation, no norm, a plain 3×3
    convolution with stride 1 and padding 1 (every upsampler of the SD UNet and VAE decoder)."""
    if not isinstance(module, Upsample2D) or isinstance(module, SubpixelUpsample2D) or not module.use_conv \
            or module.use_conv_transpose:
        return False
    conv = _conv(module)
    return (module.interpolate and module.norm is None and isinstance(conv, nn.Conv2d)
            and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


def subpixel_upsamplers(model: nn.Module, mode: SubpixelMode = "transposed") -> int:
    """Convert, in place, every eligible upsampler of ``model`` (see :func:`eligible`) with :func:`to_subpixel`;
    returns how many were converted now (0 when called again with the same mode; another mode is refused). Models
    without any (AutoencoderTiny) are left as they are."""
    done = [m for m in model.modules() if isinstance(m, SubpixelUpsample2D)]
    if any(m.subpixel_mode != mode for m in done):
        raise ValueError(f"the model's upsamplers are already converted to {done[0].subpixel_mode!r}, not {mode!r}")
    targets = [m for m in model.modules() if eligible(m)]
    for m in targets:
        to_subpixel(m, mode)
    return len(targets)
