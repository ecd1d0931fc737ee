"""The evaluation on the tiny profile, offline: reference features, `sb2 evaluate` writing metrics.json, repeatable
seeds, the merge-λ sweep with its table, plot and recorded choice, and inference timing on CPU."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner


@pytest.fixture(scope="module")
def eval_setup(tiny_cfg, tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.evaluate.reference_dir = str(root / "reference")
    return root, cfg, tiny_world["student"] + "/unet", tiny_world["teacher"]


def _cli(*args):
    from sb2.cli import app

    return CliRunner().invoke(app, ["evaluate", "-p", "tiny", *args])


def test_evaluate_cli_writes_finite_metrics_and_reuses_the_reference(eval_setup):
    root, cfg, student, _ = eval_setup
    ref = root / "reference"
    res = _cli("--ref-stats", "--out", str(ref))
    assert res.exit_code == 0, res.output
    info = json.loads((ref / "reference.json").read_text())
    assert info["num_images"] == 12 and (ref / "fid_stats.npz").is_file() and (ref / "pr_features.npz").is_file()
    out = root / "run"
    res = _cli("--model", student, "--out", str(out), "--set", f"evaluate.reference_dir={ref}",
               "--set", "evaluate.save_images=true")
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_images"] == 8 and m["reference"]["num_images"] == 12
    for key in ("fid", "precision", "recall", "clip_score"):
        assert math.isfinite(m[key]), key
    assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1 and m["fid"] >= 0
    assert set(m["hps"]) == {"anime", "concept-art", "paintings", "photo"} and m["hps"]["photo"]["n"] == 3
    assert {"generation", "fid_features", "pr_features", "clip_score"} <= set(m["seconds"])
    assert len(list((out / "images").glob("*.png"))) == 8
    assert (out / "images" / "captions.txt").read_text().splitlines()[0] == "A brown puppy curled up on a sofa"
    # a reference made by other judges is refused, not silently compared
    res = _cli("--model", student, "--out", str(root / "bad"), "--set", f"evaluate.reference_dir={ref}",
               "--set", "evaluate.fid.seed=7")
    assert res.exit_code == 2 and "rebuild" in res.output


def test_images_depend_on_their_seed_only(eval_setup):
    from sb2.evaluation.evaluate import load_generator
    from sb2.evaluation.stream import generate_uint8

    _, cfg, student, _ = eval_setup
    gen = load_generator(student, cfg, "cpu")
    captions = ["a red fox", "a snowy owl", "a dragon", "a boat"]
    by2 = torch.cat([im for _, _, im in generate_uint8(gen, captions, [5, 6, 7, 8], 2)])
    by4 = torch.cat([im for _, _, im in generate_uint8(gen, captions, [5, 6, 7, 8], 4)])
    assert (by2.int() - by4.int()).abs().max() <= 1  # float rounding across batch sizes only


def test_sweep_writes_table_plot_and_records_chosen_lambda(eval_setup):
    root, cfg, student, teacher = eval_setup
    out = root / "sweep"
    res = _cli("--sweep-lambda", "--a", student, "--b", teacher, "--out", str(out),
               "--set", f"evaluate.reference_dir={root / 'reference'}", "--set", "evaluate.sweep.lambdas=[0.0,1.0]",
               "--set", "evaluate.metrics=[fid,precision_recall,clip_score]", "-n", "6")
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "sweep.json").read_text())
    assert [r["lambda"] for r in rec["rows"]] == [0.0, 1.0] and rec["num_captions"] == 6
    assert (out / "sweep.csv").read_text().splitlines()[0] == "lambda,fid,clip_score,precision,recall"
    assert (out / "sweep.md").is_file() and (out / "lambda_sweep.png").stat().st_size > 0
    best = min(rec["rows"], key=lambda r: r["fid"])
    merge = json.loads((out / "merged" / "merge.json").read_text())
    assert merge["lambda"] == best["lambda"] == rec["chosen"]["lambda"]
    assert merge["selected_by"]["criterion"] == "lowest FID"
    assert (out / "merged" / "unet" / "config.json").is_file()


def test_pick_lambda_respects_the_clip_floor():
    from sb2.evaluation.sweep import pick_lambda

    rows = [{"lambda": 0.0, "fid": 9.0, "clip_score": 0.33}, {"lambda": 0.5, "fid": 8.0, "clip_score": 0.31},
            {"lambda": 1.0, "fid": 8.5, "clip_score": 0.32}]
    assert pick_lambda(rows)["lambda"] == 0.5
    assert pick_lambda(rows, clip_floor=0.315)["lambda"] == 1.0
    with pytest.raises(ValueError, match="floor"):
        pick_lambda(rows, clip_floor=0.4)


def test_timing_on_cpu_with_tiny_counts(eval_setup):
    root, _, student, _ = eval_setup
    res = _cli("--timing", "--model", student, "--out", str(root / "timing"))
    assert res.exit_code == 0, res.output
    t = json.loads((root / "timing" / "timing.json").read_text())
    assert (t["warmup"], t["calls"], t["repeats"]) == (1, 2, 2) and len(t["per_repeat_s"]) == 2
    assert t["mean_s"] > 0 and t["std_s"] >= 0 and t["device"].startswith("cpu")


def test_reference_signature_names_weights_by_file():
    from sb2.config import EvalConfig
    from sb2.evaluation.reference import signature

    by_url = EvalConfig()
    by_path = EvalConfig(fid={"kind": "inception", "source": "/models/weights-inception-2015-12-05-6726825d.pth"})
    assert signature(by_url, ["fid"]) == signature(by_path, ["fid"])  # the same file fetched or copied
    assert signature(by_url, ["fid"]) != signature(EvalConfig(fid={"kind": "inception", "source": "random"}), ["fid"])
    assert signature(by_url, ["fid", "precision_recall"])["pr_k"] == 3
