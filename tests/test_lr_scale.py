"""`optim.student_lr_scale`: per-layer learning rates of the student (e.g. the cross-attention layers, where the text
enters, at a multiple of the rest)."""

from contextlib import nullcontext

import pytest
import torch


def test_groups_take_the_first_matching_key_and_keep_the_base_group_first():
    from sb2.train.steps import lr_param_groups

    p = {n: torch.nn.Parameter(torch.zeros(1)) for n in ("a.attn1.w", "a.attn2.w", "b.attn2.conv.w", "c.conv.w")}
    groups = lr_param_groups(list(p.items()), 1e-6, {"attn2": 10.0, "conv": 0.5})
    assert [g["lr"] for g in groups] == pytest.approx([1e-6, 1e-5, 5e-7], rel=1e-12)
    ids = {id(v): k for k, v in p.items()}
    assert [[ids[id(q)] for q in g["params"]] for g in groups] == [["a.attn1.w"], ["a.attn2.w", "b.attn2.conv.w"],
                                                                   ["c.conv.w"]]
    # the order of the keys decides: "conv" first takes b.attn2.conv.w
    groups = lr_param_groups(list(p.items()), 1e-6, {"conv": 0.5, "attn2": 10.0})
    assert [[ids[id(q)] for q in g["params"]] for g in groups] == [["a.attn1.w"], ["b.attn2.conv.w", "c.conv.w"],
                                                                   ["a.attn2.w"]]
    with pytest.raises(ValueError, match=r"\['attn3'\]: no parameter's name contains it"):
        lr_param_groups(list(p.items()), 1e-6, {"attn2": 10.0, "attn3": 2.0})
    # every parameter scaled: the (empty) base group stays first, so the logged rate is still student_lr
    assert [g["lr"] for g in lr_param_groups(list(p.items()), 1e-6, {".": 3.0})] == pytest.approx([1e-6, 3e-6])


def test_the_config_refuses_bad_factors_and_empty_keys():
    from sb2.config import load_config

    assert load_config("tiny", ["optim.student_lr_scale={attn2: 10}"]).optim.student_lr_scale == {"attn2": 10.0}
    for bad, msg in (("{attn2: 0}", "positive and finite"), ("{attn2: -1}", "positive and finite"),
                     ("{attn2: .inf}", "positive and finite"), ("{'': 2}", "empty key")):
        with pytest.raises(ValueError, match=msg):
            load_config("tiny", [f"optim.student_lr_scale={bad}"])


@pytest.mark.parametrize("scheme", ["full", "lora"])
def test_one_step_moves_the_scaled_layers_by_their_own_rate(tiny_cfg, scheme):
    """AdamW's first step moves every weight by lr·sign(grad) (less weight decay): the cross-attention weights by ten
    times the student lr, the others by the student lr."""
    from sb2.student import encode_prompts
    from sb2.train.steps import build_models, student_optimizer, student_step

    cfg = tiny_cfg.model_copy(deep=True)
    cfg.optim.student_lr = 1e-4 if scheme == "full" else 1e-3
    cfg.optim.weight_decay = 0.0
    cfg.optim.student_lr_scale = {"attn2": 10.0}
    torch.manual_seed(0)
    m = build_models(cfg, scheme, "cpu")
    ids = {id(p) for p in m.student_params}
    named = [(n, p) for n, p in m.student.named_parameters() if id(p) in ids]
    before = {n: p.detach().clone() for n, p in named}
    opt = student_optimizer(m, cfg, "cpu")
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([cfg.optim.student_lr, 10 * cfg.optim.student_lr])
    prompts = ["a red cube", "a blue ball"]
    emb = encode_prompts(m.text_encoder, m.tokenizer, prompts, "cpu")
    null = encode_prompts(m.text_encoder, m.tokenizer, [""], "cpu")
    student_step(m, cfg, emb, null, prompts, 0, nullcontext).loss.backward()
    opt.step()
    moved = {n: (p.detach() - before[n]).abs() for n, p in named}
    grads = {n: p.grad.abs() for n, p in named}
    cross = [n for n in moved if "attn2" in n]
    rest = [n for n in moved if "attn2" not in n]
    assert cross and rest
    for names, lr in ((cross, 10 * cfg.optim.student_lr), (rest, cfg.optim.student_lr)):
        steps = torch.cat([moved[n][grads[n] > 1e-6] for n in names])  # Adam's ε matters only for tiny gradients
        assert steps.numel() > 0
        torch.testing.assert_close(steps, torch.full_like(steps, lr), rtol=2e-2, atol=0)


def test_without_scales_the_student_has_one_group(tiny_cfg):
    from sb2.train.steps import build_models, student_optimizer

    m = build_models(tiny_cfg, "full", "cpu")
    opt = student_optimizer(m, tiny_cfg, "cpu")
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["lr"] == tiny_cfg.optim.student_lr
    assert len(opt.param_groups[0]["params"]) == len(m.student_params)


def _train(out, steps, *sets):
    from sb2.config import load_config
    from sb2.train.loop import train

    cfg = load_config("tiny", [f"train.steps={steps}", "checkpoint.every=1", "tracking.enabled=false",
                               "tracking.image_every=0", *sets])
    train(cfg, "full", out)
    import json

    return json.loads((out / "train.json").read_text())["final"]


def test_sb2_train_uses_the_scaled_rates_and_a_resume_takes_this_runs_factors(tmp_path):
    lr = 1e-4
    final = _train(tmp_path / "run", 1, f"optim.student_lr={lr}", "optim.student_lr_scale={attn2: 10}")
    assert final["lr/student"] == pytest.approx(lr) and final["lr/student/attn2"] == pytest.approx(10 * lr)
    # resumed with another factor (and another base rate): this run's rates, not the checkpoint's
    final = _train(tmp_path / "run", 2, f"optim.student_lr={2 * lr}", "optim.student_lr_scale={attn2: 30}")
    assert final["lr/student"] == pytest.approx(2 * lr) and final["lr/student/attn2"] == pytest.approx(60 * lr)
    # other keys would put Adam's moments on other parameters: refused, naming the setting
    with pytest.raises(ValueError, match=r"optim.student_lr_scale has the keys \['attn1'\] here \(in this order\) "
                                         r"and the keys \['attn2'\] in the checkpoint"):
        _train(tmp_path / "run", 3, "optim.student_lr_scale={attn1: 10}")
    with pytest.raises(ValueError, match=r"keys \[\] here \(in this order\) and the keys \['attn2'\]"):
        _train(tmp_path / "run", 3)


def test_a_key_shadowed_by_an_earlier_one_is_named_as_such():
    from sb2.train.steps import lr_param_groups

    p = [(n, torch.nn.Parameter(torch.zeros(1))) for n in ("a.attn1.w", "a.attn2.w")]
    with pytest.raises(ValueError, match=r"\['attn2'\]: every parameter whose name contains it is taken by an "
                                         r"earlier key"):
        lr_param_groups(p, 1e-6, {"attn": 2.0, "attn2": 10.0})
    with pytest.raises(ValueError, match=r"\['conv'\]: no parameter's name contains it"):
        lr_param_groups(p, 1e-6, {"attn": 2.0, "conv": 10.0})


def test_a_checkpoint_from_before_the_scale_was_recorded_resumes_with_its_groups_names_and_this_runs_rates(tiny_cfg):
    """Checkpoints written before ``student_lr_scale`` was saved beside the optimizer: the group count decides."""
    from sb2.train.loop import _load_student_optimizer
    from sb2.train.steps import build_models, student_optimizer

    cfg = tiny_cfg.model_copy(deep=True)
    cfg.optim.student_lr_scale = {"attn2": 10.0}
    m = build_models(cfg, "full", "cpu")
    old = student_optimizer(m, cfg, "cpu").state_dict()
    for g in old["param_groups"]:  # as an older checkpoint has them: no names, other rates
        g.pop("name")
        g["lr"] = 0.5
    opt = student_optimizer(m, cfg, "cpu")
    _load_student_optimizer(opt, {"opt_student": old}, cfg)  # no "student_lr_scale" key
    assert [g["name"] for g in opt.param_groups] == ["base", "attn2"]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([cfg.optim.student_lr, 10 * cfg.optim.student_lr])
    cfg.optim.student_lr_scale = {}
    with pytest.raises(ValueError, match=r"keys \[\] here \(in this order\) and 2 parameter group\(s\)"):
        _load_student_optimizer(student_optimizer(m, cfg, "cpu"), {"opt_student": old}, cfg)
