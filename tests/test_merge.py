"""Weight merging (paper eq. 6) and LoRA folding."""

import pytest
import torch

from sb2.merge import fold_lora, merge_weights


def _sd(seed):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(4, generator=g), "n": torch.tensor(7)}


def test_merge_endpoints_and_midpoint():
    a, b = _sd(0), _sd(1)
    m1, m0 = merge_weights(a, b, 1.0), merge_weights(a, b, 0.0)
    for k in a:
        assert torch.equal(m1[k], a[k])
        assert torch.equal(m0[k], b[k])
    m = merge_weights(a, b, 0.3)
    torch.testing.assert_close(m["w"], 0.3 * a["w"] + 0.7 * b["w"])
    assert m["w"][1, 2].item() == pytest.approx(0.3 * a["w"][1, 2].item() + 0.7 * b["w"][1, 2].item(), rel=1e-6)


def test_merge_rejects_mismatched_models():
    a, b = _sd(0), _sd(1)
    with pytest.raises(ValueError, match="lambda"):
        merge_weights(a, b, 1.5)
    with pytest.raises(ValueError, match="shape"):
        merge_weights(a, {**b, "w": torch.zeros(3, 4)}, 0.5)
    with pytest.raises(ValueError, match="differ"):
        merge_weights(a, {"w": b["w"]}, 0.5)


def test_fold_lora_formula():
    base = {"layer.weight": torch.randn(5, 3)}
    A, B = torch.randn(2, 3), torch.randn(5, 2)
    folded = fold_lora(base, {"layer.lora_A.weight": A, "layer.lora_B.weight": B}, scale=4.0)
    torch.testing.assert_close(folded["layer.weight"], base["layer.weight"] + 4.0 * B @ A)


def test_folded_lora_student_equals_peft_forward(tiny_world, tmp_path):
    """The LoRA student saved by sb2 and folded back gives the same UNet output as peft's live adapter."""
    from sb2.models.loading import load_one_step_unet, load_unet
    from sb2.models.lora import add_lora, save_lora

    unet = load_unet("tiny:student")
    params = add_lora(unet, rank=4, alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    save_lora(unet, tmp_path / "lora", "tiny:student")
    folded = load_one_step_unet(tmp_path / "lora")
    x, t, e = torch.randn(2, 4, 8, 8), torch.tensor([999, 999]), torch.randn(2, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x, t, encoder_hidden_states=e).sample,
                                   unet(x, t, encoder_hidden_states=e).sample, atol=1e-5, rtol=1e-4)


def test_merge_students_of_a_full_and_a_lora_branch(tiny_world, tmp_path):
    """merge(A, B-with-LoRA, λ): every parameter equals λ·θ_A + (1−λ)·fold(θ_B); λ = 0 is B folded exactly."""
    from sb2.merge import merge_students
    from sb2.models.loading import load_one_step_unet, load_unet
    from sb2.models.lora import add_lora, save_lora

    a = load_unet("tiny:teacher")  # any one-step UNet of the same architecture (paper Fig. 3)
    a.save_pretrained(tmp_path / "a")
    b = load_unet("tiny:student")
    params = add_lora(b, rank=4, alpha=8, target_modules=["to_q", "to_v"])
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    save_lora(b, tmp_path / "b", "tiny:student")
    b_folded = load_one_step_unet(tmp_path / "b").state_dict()
    merged = load_one_step_unet(merge_students(tmp_path / "a", tmp_path / "b", 0.25, tmp_path / "m")).state_dict()
    sa = a.state_dict()
    for k in sa:
        torch.testing.assert_close(merged[k], 0.25 * sa[k] + 0.75 * b_folded[k])
    m0 = load_one_step_unet(merge_students(tmp_path / "a", tmp_path / "b", 0.0, tmp_path / "m0")).state_dict()
    assert all(torch.equal(m0[k], b_folded[k]) for k in sa)
    key = next(k for k in sa if "attn1.to_q" in k)
    assert not torch.equal(b_folded[key], load_unet("tiny:student").state_dict()[key])  # the LoRA was folded
