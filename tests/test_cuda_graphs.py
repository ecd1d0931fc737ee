"""`train.cuda_graphs`: the compiled blocks replayed as CUDA graphs (torch.compile's reduce-overhead mode).

CUDA graphs need a GPU; here the switch's wiring is checked: the speed switches hand it to both UNets, every
compiled block gets the mode, every training iteration marks a new step for CUDA graph trees before the student's
first block runs, the switch is refused without compile or with checkpointing, and the GPU check script runs."""

import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch


def test_it_needs_compile_and_no_checkpointing():
    from sb2.config import load_config

    with pytest.raises(ValueError, match="train.cuda_graphs .* set train.compile=true"):
        load_config("tiny", ["train.cuda_graphs=true"])
    on = ["train.compile=true", "train.cuda_graphs=true"]
    assert load_config("tiny", on).train.cuda_graphs
    for ckpt in (["train.gradient_checkpointing=true"], ["train.checkpoint_blocks=[up_blocks.1]"]):
        with pytest.raises(ValueError, match="without gradient checkpointing only"):
            load_config("tiny", on + ckpt)


@pytest.mark.parametrize("graphs", [False, True])
def test_the_speed_switches_hand_the_mode_to_both_unets(tiny_cfg, monkeypatch, graphs):
    import sb2.train.steps as steps

    calls = []
    monkeypatch.setattr(steps, "compile_unet", lambda unet, mode, cuda_graphs=False: calls.append(
        (unet, mode, cuda_graphs)))
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.train.compile, cfg.train.cuda_graphs, cfg.train.channels_last = True, graphs, False
    m = steps.build_models(cfg, "full", "cpu")
    steps.apply_speed_switches(m, cfg, "cuda")  # the CUDA path (nothing in it moves the models)
    assert calls == [(m.student, "blocks", graphs), (m.teacher_unet, "blocks", graphs)]


@pytest.mark.parametrize("graphs", [False, True])
def test_every_block_is_compiled_in_the_mode_of_the_switch(tiny_cfg, monkeypatch, graphs):
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    from sb2.train.steps import build_models, compile_unet

    real, seen = torch.compile, []

    def spy(fn, *args, **kwargs):  # records what nn.Module.compile asks for, and compiles as asked
        seen.append((getattr(fn, "__self__", None), kwargs))
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    unet = build_models(tiny_cfg, "full", "cpu").student
    compile_unet(unet, "blocks", cuda_graphs=graphs)
    blocks = [mod for mod in unet.modules() if isinstance(mod, (ResnetBlock2D, BasicTransformerBlock))]
    assert len(blocks) > 4 and [s for s, _ in seen] == blocks
    want = {"dynamic": False, **({"mode": "reduce-overhead"} if graphs else {})}
    assert all(kw == want for _, kw in seen)
    seen.clear()
    compile_unet(unet, "full", cuda_graphs=graphs)
    assert seen == [(unet, {"mode": "reduce-overhead"} if graphs else {})]


def test_regions_compile_whole_transformers_resnets_and_samplers_none_nested(tiny_cfg, monkeypatch):
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from diffusers.models.upsampling import Upsample2D

    from sb2.train.steps import build_models, compile_unet, compiled_regions

    real, seen = torch.compile, []

    def spy(fn, *args, **kwargs):
        seen.append((getattr(fn, "__self__", None), kwargs))
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    unet = build_models(tiny_cfg, "full", "cpu").student
    compile_unet(unet, "regions", cuda_graphs=True)
    regions = [s for s, _ in seen]
    kinds = {type(r) for r in regions}
    assert kinds == {Transformer2DModel, ResnetBlock2D, Downsample2D, Upsample2D}
    want = [mod for mod in unet.modules() if isinstance(mod, tuple(kinds))]
    assert regions == want == compiled_regions(unet, "regions")
    inner = {id(sub) for r in regions for sub in list(r.modules())[1:]}
    assert not any(id(r) in inner for r in regions)  # no region inside another: each module compiled once
    assert all(kw == {"dynamic": False, "mode": "reduce-overhead"} for _, kw in seen)
    with pytest.raises(ValueError, match="no regional compile mode"):
        compiled_regions(unet, "everything")


def test_a_region_nested_in_another_is_not_compiled_again():
    from diffusers.models.resnet import ResnetBlock2D

    from sb2.train.steps import compiled_regions

    outer = torch.nn.Module()
    outer.block = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=None, groups=4, down=True)
    assert outer.block.downsample is not None  # a Downsample2D inside the ResNet block
    assert compiled_regions(outer, "regions") == [outer.block]


@pytest.mark.parametrize("graphs", [False, True])
def test_each_iteration_marks_a_new_step_before_the_student_runs(tiny_cfg, monkeypatch, graphs):
    from sb2.student import encode_prompts
    from sb2.train.steps import build_models, student_step

    events = []
    real = torch.compiler.cudagraph_mark_step_begin

    def mark():
        events.append("mark")
        real()

    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", mark)
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.train.compile, cfg.train.cuda_graphs = graphs, graphs
    torch.manual_seed(0)
    m = build_models(cfg, "full", "cpu")
    m.student.register_forward_pre_hook(lambda *_: events.append("student"))
    emb = encode_prompts(m.text_encoder, m.tokenizer, ["a red cube", "a blue ball"], "cpu")
    null = encode_prompts(m.text_encoder, m.tokenizer, [""], "cpu")
    for step in range(3):
        student_step(m, cfg, emb, null, ["a red cube", "a blue ball"], step, nullcontext)
    assert events == (["mark", "student"] * 3 if graphs else ["student"] * 3)



def run_check(tmp_path, *args) -> dict:
    """bench/cuda_graphs_check.py on the tiny profile with ``args``, its JSON in ``tmp_path``."""
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "bench" / "cuda_graphs_check.py"), "--profile", "tiny", *args,
                        "--work", str(tmp_path / "work")],
                       cwd=root, env={**os.environ, "OUT": str(tmp_path)}, capture_output=True, text=True,
                       timeout=600, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return json.loads((tmp_path / "cuda_graphs_check.json").read_text())


def test_the_gpu_check_script_runs(tmp_path):
    """bench/cuda_graphs_check.py on CPU, where compile and graphs are off (the switch only marks steps there): the
    loop accepts the switch end to end and the script compares the graphs run's student and losses with the eager
    run's."""
    rec = run_check(tmp_path, "--schemes", "full", "--steps", "2", "--batch", "2")
    assert [(run["scheme"], run["compile"], run["cuda_graphs"]) for run in rec["runs"]] == [("full", False, False),
                                                                                          ("full", True, True)]
    cmp = rec["comparisons"]["full"]["graphs vs eager"]
    assert cmp["identical"] and cmp["tensors"] > 10
    assert cmp["rel_err_of_update"] == 0.0 and cmp["update_norm_rel"] > 0  # the students moved, identically
    assert rec["runs"][0]["final"]["loss/vsd"] == rec["runs"][1]["final"]["loss/vsd"]


def test_the_check_compares_updates_from_the_init():
    """What the full scheme's check reports: the relative error of the updates, not only of the weights."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from cuda_graphs_check import compare

    init = {"w": torch.tensor([10.0, 10.0])}
    a = {"unet.safetensors:w": torch.tensor([10.0, 11.0])}   # update (0, 1)
    b = {"unet.safetensors:w": torch.tensor([10.0, 12.0])}   # update (0, 2)
    c = compare(a, b, init)
    assert c["rel_err"] == pytest.approx(1 / (100 + 144) ** 0.5)
    assert c["rel_err_of_update"] == pytest.approx(0.5) and c["update_norm_rel"] == pytest.approx(2 / 244 ** 0.5)
    assert "rel_err_of_update" not in compare(a, b)
    with pytest.raises(ValueError, match="init has no tensor"):
        compare(a, b, {"v": torch.zeros(2)})


def test_the_gpu_check_script_compares_graphs_with_compiled_when_asked(tmp_path):
    rec = run_check(tmp_path, "--schemes", "lora", "--steps", "1", "--batch", "2", "--with-compiled", "--noise-floor")
    assert [run["run"] for run in rec["runs"]] == ["eager", "eager_reordered", "compiled", "graphs"]
    assert set(rec["comparisons"]["lora"]) == {"graphs vs eager", "eager_reordered vs eager", "compiled vs eager",
                                                "graphs vs compiled"}
    assert "kernels" in rec["runs"][1] and not rec["runs"][1]["compile"]
    # On CPU the two flags choose nothing: the floor run gives the eager student exactly
    assert rec["comparisons"]["lora"]["eager_reordered vs eager"]["identical"]


def test_the_noise_floor_run_flips_the_kernel_choices_and_restores_them():
    """--noise-floor's second eager run: cuDNN autotuning on and the bf16 GEMMs' reduced-precision reduction flipped
    inside, both flags as they were after (also after an error in the run)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from cuda_graphs_check import pairs_of, reordered, runs_of

    m = torch.backends.cuda.matmul
    before = (torch.backends.cudnn.benchmark, m.allow_bf16_reduced_precision_reduction)
    with reordered():
        assert torch.backends.cudnn.benchmark is True
        assert m.allow_bf16_reduced_precision_reduction is (not before[1])
    assert (torch.backends.cudnn.benchmark, m.allow_bf16_reduced_precision_reduction) == before
    with pytest.raises(RuntimeError), reordered():
        raise RuntimeError("a run that fails")
    assert (torch.backends.cudnn.benchmark, m.allow_bf16_reduced_precision_reduction) == before
    assert [r[0] for r in runs_of(False, True)] == ["eager", "eager_reordered", "graphs"]
    assert [r[0] for r in runs_of(False, False)] == ["eager", "graphs"]
    assert pairs_of(["eager", "eager_reordered", "graphs"]) == [("graphs", "eager"), ("eager_reordered", "eager")]


def test_the_perturbed_floor_starts_from_a_one_rounding_perturbation_and_is_compared(tmp_path):
    """--perturb-floor: the init's weights each move by about one fp32 rounding (never more than a few), some move,
    and the run from it is trained and compared with eager; --eager-only leaves out compile and graphs."""
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "bench"))
    from cuda_graphs_check import PERTURB_REL, pairs_of, perturbed_student, runs_of

    from sb2.config import load_config
    from sb2.models.loading import load_unet

    assert [r[0] for r in runs_of(True, False, True, eager_only=True)] == ["eager", "eager_perturbed"]
    assert [r[0] for r in runs_of(True, True, True)] == ["eager", "eager_reordered", "eager_perturbed", "compiled",
                                                         "graphs"]
    assert pairs_of(["eager", "eager_perturbed"]) == [("eager_perturbed", "eager")]
    assert pairs_of(["eager", "compiled"]) == [("compiled", "eager")]
    cfg = load_config("tiny", [])
    before = load_unet(cfg.models.student, cfg.models, dtype=torch.float32).state_dict()
    after = load_unet(perturbed_student(cfg, tmp_path / "p"), cfg.models, dtype=torch.float32).state_dict()
    assert before.keys() == after.keys()
    rels = {k: ((after[k] - before[k]) / before[k])[before[k] != 0] for k in before}
    rel = torch.cat([v.flatten() for v in rels.values()])
    assert 0 < rel.abs().max() < 8 * PERTURB_REL  # z beyond 6σ is never drawn at this size; the rounding adds ≤ 1 ulp
    for k, v in rels.items():  # every tensor is perturbed, each weight by w·2⁻²⁴·z rounded: |z| ≳ 0.5–1 moves it
        if v.numel() >= 32:
            assert 0.15 < (v != 0).float().mean() < 0.85, k
    # up and down alike (w·(1 + rel·z) would round every small positive z away: a skewed perturbation)
    assert (rel > 0).sum() == pytest.approx(int((rel < 0).sum()), rel=0.1)
    another = load_unet(perturbed_student(cfg, tmp_path / "q", seed=2), cfg.models, dtype=torch.float32).state_dict()
    assert any(not torch.equal(another[k], after[k]) for k in before)  # --perturb-seed draws another perturbation

    rec = run_check(tmp_path, "--schemes", "full", "--steps", "2", "--batch", "2", "--perturb-floor", "--eager-only")
    assert [run["run"] for run in rec["runs"]] == ["eager", "eager_perturbed"]
    assert str(tmp_path / "work" / "full_perturbed_init") in rec["runs"][1]["init"]  # trained from the perturbed init
    cmp = rec["comparisons"]["full"]["eager_perturbed vs eager"]
    assert not cmp["identical"] and 0 < cmp["rel_err"] < 1e-5  # the perturbation reached the student, and stayed small
    # updates are measured from the unperturbed init, the tiny profile's student
    assert rec["updates_from"]["full"] == load_config("tiny", []).models.student
    r = subprocess.run([sys.executable, str(root / "bench" / "cuda_graphs_check.py"), "--eager-only",
                        "--with-compiled"], cwd=root, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and "not with --with-compiled" in r.stderr
