"""Sub-pixel upsampling convolutions: nearest 2× upsampling + a 3×3 convolution computed on the input's 2×2 windows
gives the same tensor, in both forms, and the models' upsamplers are swapped only where that holds."""

import json

import pytest
import torch
import torch.nn.functional as F

from sb2.generation.subpixel import (SubpixelUpsample2D, eligible, phase_kernel, subpixel_upsamplers, to_subpixel,
                                     transposed_kernel, upsample_conv)

MODES = ("transposed", "phases")


def reference(x, w, b):
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, b, padding=1)


def kernel_for(mode, w):
    return transposed_kernel(w) if mode == "transposed" else phase_kernel(w)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 4, 1, 1), (3, 2, 4, 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_equals_upsampling_then_the_3x3_convolution(mode, shape, bias):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    w = torch.randn(6, shape[1], 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64) if bias else None
    out = upsample_conv(x, kernel_for(mode, w), b, mode)
    assert out.shape == (shape[0], 6, 2 * shape[2], 2 * shape[3])
    torch.testing.assert_close(out, reference(x, w, b), atol=1e-12, rtol=1e-12)


def test_a_corner_pixel_by_hand():
    """One channel, input [[1, 2], [3, 4]], a kernel of 1…9: output pixel (0, 0) sees the upsampled 3×3 window
    [[0, 0, 0], [0, 1, 1], [0, 1, 1]] → 5 + 6 + 8 + 9 = 28; pixel (1, 1) sees [[1, 1, 2], [1, 1, 2], [3, 3, 4]]
    → 1+2+6 + 4+5+12 + 21+24+36 = 111."""
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64).view(1, 1, 2, 2)
    w = torch.arange(1.0, 10.0, dtype=torch.float64).view(1, 1, 3, 3)
    for mode in MODES:
        out = upsample_conv(x, kernel_for(mode, w), None, mode)
        assert out[0, 0, 0, 0].item() == 28.0 and out[0, 0, 1, 1].item() == 111.0
    # the transposed kernel's rows: k = 0 ← row 2, k = 1 ← rows 1 + 2, k = 2 ← rows 0 + 1, k = 3 ← row 0
    t = transposed_kernel(w)[0, 0]
    assert t[0, 0].item() == 9.0 and t[1, 1].item() == 5 + 6 + 8 + 9 and t[3, 3].item() == 1.0


@pytest.mark.parametrize("mode", MODES)
def test_channels_last_and_half_precision(mode):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 6, 6, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(8, 8, 3, 3, generator=g) * 0.1, torch.randn(8, generator=g)
    out = upsample_conv(x, kernel_for(mode, w), b, mode)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, reference(x, w, b), atol=1e-5, rtol=1e-5)
    k16 = kernel_for(mode, w.to(torch.bfloat16))
    assert k16.dtype == torch.bfloat16  # summed in fp32, returned in the weight's dtype
    exact = kernel_for(mode, w.to(torch.bfloat16).double())
    torch.testing.assert_close(k16.double(), exact, atol=0, rtol=2 ** -8)  # one rounding of the exact sums


def test_rejects_what_is_not_a_3x3_kernel():
    with pytest.raises(ValueError, match="3×3"):
        transposed_kernel(torch.zeros(2, 2, 1, 1))
    with pytest.raises(ValueError, match="mode"):
        upsample_conv(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 4, 4), None, "bilinear")


def test_only_plain_nearest_3x3_upsamplers_are_eligible():
    from diffusers.models.upsampling import Upsample2D

    assert eligible(Upsample2D(4, use_conv=True))
    assert eligible(Upsample2D(4, use_conv=True, name="Conv2d_0", bias=False))
    for other in (Upsample2D(4, use_conv=False), Upsample2D(4, use_conv_transpose=True),
                  Upsample2D(4, use_conv=True, kernel_size=5, padding=2),
                  Upsample2D(4, use_conv=True, norm_type="ln_norm", eps=1e-5, elementwise_affine=True),
                  Upsample2D(4, use_conv=True, interpolate=False), torch.nn.Conv2d(4, 4, 3, padding=1)):
        assert not eligible(other)
    with pytest.raises(ValueError, match="Upsample2D"):
        to_subpixel(Upsample2D(4, use_conv_transpose=True))
    converted = to_subpixel(Upsample2D(4, use_conv=True), "phases")
    assert not eligible(converted) and to_subpixel(converted, "phases") is converted  # once only
    with pytest.raises(ValueError, match="already converted"):
        to_subpixel(converted, "transposed")
    with pytest.raises(ValueError, match="mode"):
        to_subpixel(Upsample2D(4, use_conv=True), "bilinear")


@pytest.mark.parametrize("mode", MODES)
def test_an_upsampler_replaced_keeps_its_output_and_its_output_size_fallback(mode):
    from diffusers.models.upsampling import Upsample2D

    import copy

    torch.manual_seed(0)
    up = Upsample2D(3, use_conv=True, out_channels=5).double()
    sub = to_subpixel(copy.deepcopy(up), mode)
    assert isinstance(sub, SubpixelUpsample2D) and isinstance(sub, Upsample2D)
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    torch.testing.assert_close(sub(x), up(x), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(sub(x, (8, 12)), up(x), atol=1e-12, rtol=1e-12)  # output_size twice the input
    odd = sub(x, (9, 12))  # another size (latents not divisible by the UNet's downsampling): the original path
    torch.testing.assert_close(odd, up(x, (9, 12)), atol=0, rtol=0)
    assert odd.shape[-2:] == (9, 12)


@pytest.mark.parametrize("mode", MODES)
def test_the_tiny_unet_and_vae_keep_their_images_with_every_upsampler_replaced(tiny_cfg, mode):
    from diffusers.models.upsampling import Upsample2D

    from sb2.generation.generator import OneStepGenerator

    gen = OneStepGenerator.load("tiny:student", tiny_cfg)
    prompts = ["a red fox", "two blue rings on grass"]
    z = gen.noise([0, 1])
    before = gen(prompts, noise=z)
    counts = {name: sum(isinstance(m, Upsample2D) for m in model.modules())
              for name, model in (("unet", gen.unet), ("vae", gen.decoder))}
    assert counts["unet"] > 0 and counts["vae"] > 0
    assert subpixel_upsamplers(gen.unet, mode) == counts["unet"]
    assert subpixel_upsamplers(gen.decoder, mode) == counts["vae"]
    assert subpixel_upsamplers(gen.unet, mode) == 0  # a second call finds nothing left to replace
    assert sum(isinstance(m, SubpixelUpsample2D) for m in gen.unet.modules()) == counts["unet"]
    after = gen(prompts, noise=z)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)
    assert not torch.equal(after, torch.zeros_like(after))
    with pytest.raises(ValueError, match="already converted"):
        subpixel_upsamplers(gen.unet, "phases" if mode == "transposed" else "transposed")


def test_the_state_dict_is_unchanged_so_saving_and_loading_see_plain_upsamplers(tiny_cfg, tmp_path):
    from diffusers import UNet2DConditionModel

    from sb2.models.loading import load_unet

    unet = load_unet(tiny_cfg.models.student, tiny_cfg.models)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    assert subpixel_upsamplers(unet, "transposed") > 0
    after = unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    unet.load_state_dict(before, strict=True)
    unet.save_pretrained(tmp_path / "unet")
    again = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert not any(isinstance(m, SubpixelUpsample2D) for m in again.modules())  # a stock diffusers model


def test_converted_models_in_half_precision_and_channels_last(tiny_cfg):
    """The fast path casts and re-lays the models after converting them: the kernels follow."""
    from sb2.models.loading import load_vae

    vae = load_vae(tiny_cfg.models.teacher, tiny_cfg.models)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, vae.config.latent_channels, 8, 8, generator=g)
    with torch.no_grad():
        ref = vae.decode(z).sample  # fp32, plain upsamplers
        plain = vae.to(torch.bfloat16).decode(z.to(torch.bfloat16)).sample.float()
        subpixel_upsamplers(vae, "phases")
        vae.to(memory_format=torch.channels_last)
        ups = [m for m in vae.modules() if isinstance(m, SubpixelUpsample2D)]
        assert ups and all(m.subpixel_kernel.dtype == torch.bfloat16 for m in ups)
        out = vae.decode(z.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)).sample.float()

    def err(x):
        return ((x - ref).norm() / ref.norm()).item()

    assert err(plain) < 0.05 and err(out) < 2 * err(plain) + 1e-3  # bf16 rounding, as the plain model's


def test_a_latent_not_divisible_by_the_unet_downsampling_uses_the_fallback(tiny_cfg):
    from sb2.models.loading import load_unet

    unet = load_unet(tiny_cfg.models.student, tiny_cfg.models).double()
    g = torch.Generator().manual_seed(0)
    n_down = len(unet.config.down_block_types) - 1
    side = 2 ** n_down * 2 + 1  # odd: diffusers passes each upsampler an output size other than twice its input
    x = torch.randn(1, unet.config.in_channels, side, side, generator=g, dtype=torch.float64)
    emb = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g, dtype=torch.float64)
    t = torch.tensor([999])
    ref = unet(x, t, emb).sample
    assert subpixel_upsamplers(unet, "transposed") > 0
    torch.testing.assert_close(unet(x, t, emb).sample, ref, atol=1e-10, rtol=1e-10)


def test_generate_with_the_switch_writes_the_same_images_and_says_so(tiny_cfg, tmp_path):
    import numpy as np
    from PIL import Image

    from sb2.generation.generator import generate

    prompts = ["a red fox", "a snowy owl"]
    plain = generate("tiny:student", prompts, tmp_path / "plain", tiny_cfg, device="cpu")
    cfg = tiny_cfg.model_copy(update={"generate": tiny_cfg.generate.model_copy(
        update={"subpixel_upsample": "phases"})})
    sub = generate("tiny:student", prompts, tmp_path / "sub", cfg, device="cpu")
    assert "subpixel_upsample" not in plain
    assert sub["subpixel_upsample"]["mode"] == "phases" and sub["subpixel_upsample"]["upsamplers"] > 0
    assert json.loads((tmp_path / "sub" / "generate.json").read_text())["subpixel_upsample"] == sub["subpixel_upsample"]
    for i in range(2):
        a = np.array(Image.open(tmp_path / "plain" / f"{i:04d}.png")).astype(int)
        b = np.array(Image.open(tmp_path / "sub" / f"{i:04d}.png")).astype(int)
        assert np.abs(a - b).max() <= 1


def test_the_config_refuses_an_unknown_mode():
    from sb2.config import load_config

    from typing import get_args

    from sb2.config import GenerateConfig
    from sb2.generation.subpixel import MODES

    assert load_config("tiny").generate.subpixel_upsample == "off"
    assert get_args(GenerateConfig.model_fields["subpixel_upsample"].annotation) == ("off", *MODES)  # one list
    with pytest.raises(Exception, match="subpixel_upsample"):
        load_config("tiny", ["generate.subpixel_upsample=bilinear"])
