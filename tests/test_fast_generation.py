"""The GPU fast path's model changes that can be checked on CPU: fused attention projections give the same images."""

import pytest
import torch


def test_fused_projections_give_the_same_images_and_fuse_once(tiny_cfg):
    from sb2.generation.fast import COORDINATE_DESCENT, TUNED_INDUCTOR, fuse_projections
    from sb2.generation.generator import OneStepGenerator
    from sb2.models.loading import load_tiny_vae

    gen = OneStepGenerator.load("tiny:student", tiny_cfg)
    prompts = ["a red fox", "two blue rings on grass"]
    z = gen.noise([0, 1])
    before = gen(prompts, noise=z)
    attn = [m for m in gen.unet.modules() if type(m).__name__ == "Attention"]
    assert attn and not any(getattr(m, "fused_projections", False) for m in attn)
    fuse_projections(gen.unet, gen.decoder)
    fused = [m for m in gen.unet.modules() if type(m).__name__ == "Attention"]
    assert all(m.fused_projections for m in fused)  # every attention of the UNet now runs one projection GEMM
    assert all(m.fused_projections for m in gen.decoder.modules() if type(m).__name__ == "Attention")
    torch.testing.assert_close(gen(prompts, noise=z), before, atol=1e-5, rtol=1e-4)
    processors = dict(gen.unet.attn_processors)
    fuse_projections(gen.unet, gen.decoder)  # a second call changes nothing
    assert dict(gen.unet.attn_processors) == processors
    torch.testing.assert_close(gen(prompts, noise=z), before, atol=1e-5, rtol=1e-4)
    tiny = load_tiny_vae(tiny_cfg.models.tiny_vae)
    fuse_projections(tiny)  # AutoencoderTiny has no attention: left as it is
    assert all(hasattr(torch._inductor.config, k) for k in {**TUNED_INDUCTOR, **COORDINATE_DESCENT})  # in this torch


def test_the_fast_path_refuses_a_cpu_generator(tiny_cfg):
    from sb2.generation.fast import GraphedOneStep
    from sb2.generation.generator import OneStepGenerator

    with pytest.raises(ValueError, match="CUDA"):
        GraphedOneStep(OneStepGenerator.load("tiny:student", tiny_cfg), compile=True, tuned=True)
