"""`train.checkpoint_blocks`: selective gradient checkpointing of the student — the named blocks recompute their
forward in the backward, no other block does, and the gradient is the one without checkpointing."""

from collections import Counter

import pytest
import torch


def _student(tiny_cfg, sets):
    from sb2.config import load_config
    from sb2.train.steps import build_models

    cfg = load_config("tiny", sets)
    torch.manual_seed(0)
    return build_models(cfg, "full", "cpu").student


def _forward_backward(unet, calls: Counter):
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    names = {id(m): n for n, m in unet.named_modules()}

    def hook(module, args):  # a pre-hook: checkpoint's recompute stops early, before a block's forward returns
        if isinstance(module, (ResnetBlock2D, BasicTransformerBlock)) and id(module) in names:
            parts = names[id(module)].split(".")
            block = "mid_block" if parts[0] == "mid_block" else ".".join(parts[:2])
            calls[(block, type(module).__name__)] += 1

    torch.manual_seed(1)
    x, t, emb = torch.randn(2, 4, 8, 8), torch.tensor([999, 999]), torch.randn(2, 77, 32)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        unet(x, t, encoder_hidden_states=emb).sample.square().mean().backward()
    finally:
        handle.remove()
    return [p.grad.clone() for p in unet.parameters()]


def test_only_the_named_blocks_are_recomputed_and_the_gradient_is_unchanged(tiny_cfg):
    plain, plain_calls = _student(tiny_cfg, ["train.gradient_checkpointing=false"]), Counter()
    want = _forward_backward(plain, plain_calls)
    sel, sel_calls = _student(tiny_cfg, ["train.gradient_checkpointing=false",
                                         "train.checkpoint_blocks=[up_blocks.1]"]), Counter()
    got = _forward_backward(sel, sel_calls)
    assert {("up_blocks.1", "ResnetBlock2D"), ("up_blocks.1", "BasicTransformerBlock")} < set(plain_calls)
    assert len(plain_calls) > 4
    assert sel_calls == Counter({k: (2 * v if k[0] == "up_blocks.1" else v) for k, v in plain_calls.items()})
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_an_unknown_block_is_refused_with_the_blocks_there_are(tiny_cfg):
    with pytest.raises(ValueError, match=r"no block up_blocks\.9 .* up_blocks\.0, up_blocks\.1"):
        _student(tiny_cfg, ["train.gradient_checkpointing=false", "train.checkpoint_blocks=[up_blocks.9]"])


def test_it_asks_for_gradient_checkpointing_off():
    from sb2.config import load_config

    with pytest.raises(Exception, match="gradient_checkpointing=false"):
        load_config("tiny", ["train.gradient_checkpointing=true", "train.checkpoint_blocks=[up_blocks.1]"])
