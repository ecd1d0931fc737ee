"""`sb2 miniworld bench --quick`: every row of the paper's tables is trained (the library's train()), merged and scored
on the committed mini-world; the table, the λ-sweep plot and the sample grid are written, and every number is finite."""

import json
import math

import pytest

from typer.testing import CliRunner

from sb2.miniworld.bench import ROWS, STUDENTS
from sb2.miniworld.cli import app


def test_quick_bench_writes_every_row_the_sweep_and_the_grid(tmp_path):
    out = tmp_path / "results"
    result = CliRunner().invoke(app, ["bench", "--quick", "--device", "cpu", "--out", str(out),
                                      "--work", str(tmp_path / "work")])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "results.json").read_text())
    assert [label for _, label in record["tables"]] == [label for _, label, _ in ROWS]
    # A and B once per training seed (quick: 0 and 1), every other student once
    assert set(record["students"]) == set(STUDENTS) | {"A@1", "B@1"}
    assert record["students"]["A@1"]["overrides"] == ["train.seed=1"] and record["train_seeds"] == [0, 1]
    assert [r["lambda"] for r in record["sweep"]] == [0.0, 0.5, 1.0]
    for row in [*record["rows"].values(), *record["sweep"]]:
        for key in ("fid", "precision", "recall", "clip_score", "alignment", "count"):
            assert math.isfinite(row[key]["mean"]) and math.isfinite(row[key]["std"]), key
        # every statement presupposes the right number of objects: an image that matches its caption has it
        assert all(0 <= a <= c <= 1 for a, c in zip(row["alignment"]["runs"], row["count"]["runs"]))
    assert "right count ↑" in (out / "results.md").read_text()
    # One model in two tables is one set of scores; a merge at λ = 1 is model A (training seed 0) exactly — scored
    # here on the validation captions, as the sweep is: so A is scored there too, from the student the run saved.
    rows = record["rows"]
    assert rows["SwiftBrush (VSD, Turbo init) = A"]["fid"] == rows["A: full, VSD"]["fid"]
    assert record["sweep_split"] == "validation"
    from sb2.miniworld.bench import Bench, Plan
    from sb2.miniworld.judges import world_root

    b = Bench(out, tmp_path / "work", Plan.quick(), "cpu", world_root().resolve())
    b.students["A"] = tmp_path / "work" / "students" / "A" / "student"
    a_val = b.score(b.generator("student:A"), (0,), "validation")
    assert record["sweep"][-1]["fid"]["runs"][0] == a_val["fid"]["runs"][0]
    assert a_val["fid"]["runs"][0] != rows["A: full, VSD"]["per_train_seed"]["0"]["fid"]["runs"][0]
    # The seeded rows are mean ± std over the training seeds of each seed's mean over the noise seeds; the seeds
    # trained different students.
    for label in ("A: full, VSD", "B: LoRA, clamped + schedule (B)", "merged A+B, λ = 0.5",
                  "merged A+B, λ* (best sweep FID)"):
        row = rows[label]
        per = [row["per_train_seed"][str(s)]["fid"]["mean"] for s in (0, 1)]
        assert row["train_seeds"] == [0, 1] and row["fid"]["runs"] == per
        assert math.isclose(row["fid"]["mean"], sum(per) / 2)
        assert math.isclose(row["fid"]["std"], abs(per[0] - per[1]) / 2)
    assert rows["A: full, VSD"]["per_train_seed"]["0"]["fid"] != rows["A: full, VSD"]["per_train_seed"]["1"]["fid"]
    assert "train_seeds" not in rows["B: LoRA, no CLIP loss"]
    assert "train_seeds" not in rows["merged A+B with regularization, λ = 0.5"]
    # the VSD guidance and CLIP-loss τ the students trained with are recorded (the profile's; none without a CLIP loss)
    from sb2.config import load_config

    prof = load_config("miniworld")
    assert record["vsd_guidance"] == prof.vsd.guidance_scale and record["clip_tau"] == prof.clip_loss.tau
    assert record["students"]["B_no_clip"]["clip_tau"] is None and record["students"]["A"]["clip_tau"] is None
    md = (out / "results.md").read_text()
    assert f"VSD guidance {prof.vsd.guidance_scale}, CLIP-loss τ {prof.clip_loss.tau}" in md
    assert "QUICK" in md and "## Target" in md and all(label in md for _, label, _ in ROWS)
    assert "| A: full, VSD ‡ |" in md and "trained once per training seed [0, 1]" in md
    assert "| B: LoRA, no CLIP loss |" in md  # trained once: no mark
    assert "Scored on the 16 validation captions" in md and "is scored on the evaluation captions" in md
    assert (out / "lambda_sweep.png").stat().st_size > 0 and (out / "samples.png").stat().st_size > 0


def _row(fid, recall, alignment):
    def m(v):
        return {"mean": v, "std": 0.0}

    return {"fid": m(fid), "precision": m(0.9), "recall": m(recall), "clip_score": m(0.3), "alignment": m(alignment)}


def test_the_lambda_star_row_and_its_students_are_planned_only_with_the_sweep():
    from sb2.miniworld.bench import Plan, planned

    plan = Plan.quick()
    assert planned("merged A+B, λ* (best sweep FID)", plan) and planned("sweep", plan)
    plan.sweep = False
    assert not planned("merged A+B, λ* (best sweep FID)", plan) and not planned("sweep", plan)
    assert planned("merged A+B, λ = 0.5", plan)
    plan.rows = ["A: full, VSD"]
    assert not planned("merged A+B, λ = 0.5", plan) and planned("A: full, VSD", plan)


def test_the_target_says_which_merged_rows_are_one_training_seed():
    from sb2.miniworld.report import target_section

    rows = {"teacher, cfg 2": _row(100.0, 0.5, 0.10), "merged A+B, λ = 0.5": {**_row(99.0, 0.6, 0.2),
                                                                             "train_seeds": [0, 1, 2]},
            "merged A+B with regularization, λ = 0.5": _row(98.0, 0.6, 0.2)}
    text = "\n".join(target_section(rows))
    assert "FID 98 (training seed 0 only) <" in text and "FID 99 <" in text
    del rows["merged A+B, λ = 0.5"]["train_seeds"]
    assert "training seed 0 only" not in "\n".join(target_section(rows))  # nothing seeded: nothing to tell apart


def test_target_compares_with_the_best_teacher_fid_the_cfg_4_5_alignment_and_the_turbo_recall():
    from sb2.miniworld.report import target_section

    rows = {"teacher, cfg 2": _row(100.0, 0.5, 0.10), "teacher, cfg 4.5": _row(120.0, 0.4, 0.20),
            "Turbo analog (1 step)": _row(150.0, 0.3, 0.15),
            "merged A+B, λ = 0.5": _row(99.0, 0.31, 0.20),  # beats cfg 2's FID, ties cfg 4.5's alignment
            "merged A+B with regularization, λ = 0.5": _row(101.0, 0.6, 0.9)}  # FID between the teachers': no
    text = "\n".join(target_section(rows))
    assert "**merged A+B, λ = 0.5: met**" in text and "(teacher, cfg 2)" in text
    assert "**merged A+B with regularization, λ = 0.5: NOT met** — no: FID 101" in text


def test_students_trained_in_worker_processes_score_exactly_as_those_trained_in_process(tmp_path):
    """``--workers``: the students train in spawned processes (the library's train(), the same seeds) while the main
    process scores the rest; every number equals the one-process run's, and the regularization folder the two
    regularized students share is complete (the main process writes it before the workers start)."""
    from sb2.miniworld.bench import Plan, run

    rows = ["A: full, VSD", "B: LoRA, clamped + schedule (B)", "merged A+B with regularization, λ = 0.5"]
    records = {}
    for workers in (1, 2):
        plan = Plan.quick()
        plan.rows, plan.sweep, plan.workers, plan.seeds = list(rows), False, workers, (0,)
        records[workers] = run(tmp_path / f"out{workers}", plan, device="cpu", work=tmp_path / f"work{workers}")
    one, two = records[1], records[2]
    assert set(two["students"]) == {"A", "B", "A@1", "B@1", "A_reg", "B_reg"}
    assert all(i["worker"] for i in two["students"].values())
    assert not two["failed"] and not two["skipped"]
    for label in rows:
        for key in ("fid", "precision", "recall", "clip_score", "alignment"):
            assert two["rows"][label][key]["runs"] == one["rows"][label][key]["runs"], (label, key)
    assert len(list((tmp_path / "work2" / "regularization_8").glob("*.png"))) == 8


def test_training_seeds_name_their_students_and_rows():
    from sb2.miniworld.bench import STUDENTS, seeded, spec_of, students_of, train_seeded

    assert spec_of("A") == ("full", STUDENTS["A"][2])
    assert spec_of("B@2") == ("lora", [*STUDENTS["B"][2], "train.seed=2"])
    assert seeded("merge:A:B:0.5", 2) == "merge:A@2:B@2:0.5" and seeded("student:A", 0) == "student:A"
    seeds = (0, 1)
    assert train_seeded("merge:A:B:best", seeds) and train_seeded("student:B", seeds)
    assert not train_seeded("student:B", (0,))  # one training seed: scored as any other row
    assert not train_seeded("merge:A_reg:B_reg:0.5", seeds) and not train_seeded("student:B_no_clip", seeds)
    assert not train_seeded("turbo", seeds) and not train_seeded("sweep", seeds)
    assert students_of("merge:A:B:0.5", (0, 1, 2)) == ["A", "B", "A@1", "B@1", "A@2", "B@2"]
    assert students_of("student:B_naive", (0, 1, 2)) == ["B_naive"] and students_of("sweep", (0, 1)) == ["A", "B"]


@pytest.mark.timeout(240)  # a pool that lost the task would hang: fail in minutes, not the suite's 600 s
def test_a_worker_that_dies_fails_its_students_instead_of_hanging_the_bench(tmp_path):
    """A worker process killed mid-training (as the kernel's OOM killer would) breaks the pool: every student still
    pending fails with BrokenProcessPool within seconds, is recorded as failed, and stopping the workers returns."""
    import os
    import signal
    import time
    from concurrent.futures.process import BrokenProcessPool

    from sb2.miniworld.bench import Bench, Plan
    from sb2.miniworld.judges import world_root

    plan = Plan.quick()
    plan.workers, plan.train_seeds = 2, (0,)
    b = Bench(tmp_path / "out", tmp_path / "work", plan, "cpu", world_root().resolve())
    b.start_workers(["A", "B"])
    t0 = time.monotonic()
    while not b.pool._processes and time.monotonic() - t0 < 60:  # spawned on submit; wait until one exists
        time.sleep(0.05)
    victim = next(iter(b.pool._processes))
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    for name in ("A", "B"):
        with pytest.raises(BrokenProcessPool):
            b.student(name)
        assert "BrokenProcessPool" in b.failed_students[name]
        with pytest.raises(RuntimeError, match="failed to train"):  # asked again: the recorded failure, at once
            b.student(name)
    assert time.monotonic() - t0 < 60 and not b.students
    b.stop_workers()
    assert b.pool is None and not b.pending


def test_the_tuning_script_runs_variants_side_by_side_and_records_the_device(tmp_path):
    """--parallel: each variant in a process of its own, gathered into one JSON with the device, the status of each
    variant and its scores (the GPU rounds' path; here two teacher variants on CPU)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    name = f"tune_par_{os.getpid()}"
    r = subprocess.run([sys.executable, str(root / "bench" / "miniworld_tune.py"), "--variants", "T|1.5", "T|2|steps=2",
                        "--parallel", "2", "--captions", "16", "--device", "cpu", "--name", name],
                       cwd=tmp_path, env={**os.environ, "OUT": str(tmp_path)}, capture_output=True, text=True,
                       timeout=900, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rec = json.loads((tmp_path / f"{name}.json").read_text())
    assert rec["device"] == "cpu" and rec["parallel"] == 2 and rec["seconds"] > 0
    assert [v["variant"] for v in rec["variants"]] == ["T|1.5", "T|2|steps=2"]
    assert all(v["status"].startswith("exit 0") and v["fid"] > 0 for v in rec["variants"])
    assert rec["variants"][0]["fid"] != rec["variants"][1]["fid"]  # two teachers, two scores
    # each variant's bench sampled the teacher at its own step count (the child of variant i is named NAME_i)
    steps = [json.loads(Path(f"/tmp/{name}_{i}/out0/results.json").read_text())["teacher_steps"] for i in (0, 1)]
    assert steps == [25, 2]


def test_the_tuning_script_trains_one_student_per_variant(tmp_path):
    """bench/miniworld_tune.py: a variant is one student (the bench's own training and scoring) with the variant's
    overrides — not the bench's three training seeds of A."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    # an override may carry a YAML mapping: its braces are not the bench's {teacher}/{reg} placeholders
    r = subprocess.run([sys.executable, str(root / "bench" / "miniworld_tune.py"), "--variants",
                        "A|train.seed=1|optim.student_lr_scale={attn2: 2}", "T|1.5", "--steps", "1", "--batch", "2",
                        "--captions", "16", "--device", "cpu",
                        "--name", f"tune_test_{os.getpid()}"],
                       cwd=tmp_path, env={**os.environ, "OUT": str(tmp_path)}, capture_output=True, text=True,
                       timeout=900, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    variant, teacher = json.loads((tmp_path / f"tune_test_{os.getpid()}.json").read_text())
    assert variant["variant"] == "A|train.seed=1|optim.student_lr_scale={attn2: 2}"
    assert variant["train"]["overrides"] == ["train.seed=1", "optim.student_lr_scale={attn2: 2}"]
    assert "trained A@1" not in r.stdout and r.stdout.count("trained A ") == 1
    # a teacher variant scores the teacher at its guidance and trains nothing
    assert teacher["variant"] == "T|1.5" and teacher["train"] is None and teacher["fid"] > 0
    assert "teacher, cfg 1.5:" in r.stdout and r.stdout.count("trained ") == 1


def test_the_validation_captions_are_other_scenes_of_the_evaluation_split(tmp_path, monkeypatch):
    """The sweep's validation captions: the evaluation split's next scenes (its templates), none of the evaluation
    captions' scenes, with reference images rendered from exactly those scenes."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from sb2.miniworld import world
    from sb2.miniworld.bench import Bench, Plan
    from sb2.miniworld.judges import world_root

    b = Bench(tmp_path / "out", tmp_path / "work", Plan.quick(), "cpu", world_root().resolve())
    scenes, captions, reference = b.validation()
    n = Plan.quick().num_captions
    assert len(captions) == n and captions == world.captions(world.sample_scenes(0, "eval", 2 * n))[n:]
    assert not set(captions) & set(b.captions)
    first = np.asarray(Image.open(tmp_path / "work" / f"reference_val_{n}" / "000000.png"))
    assert np.array_equal(first, world.render(scenes)[0])
    assert reference.pr_features.shape[0] == n and Path(reference.info["images"]).name == f"reference_val_{n}"
    from sb2.miniworld import judges

    real, judged = judges.alignment_breakdown, []

    returned = []

    def alignment_breakdown(net, images, scenes_judged):  # the real judge, noting which scenes it judged against
        judged.append(scenes_judged)
        returned.append(real(net, images, scenes_judged))
        return returned[-1]

    monkeypatch.setattr(judges, "alignment_breakdown", alignment_breakdown)
    gen = b.generator("turbo")
    assert b.score(gen, (0,), "validation")["fid"]["runs"] != b.score(gen, (0,))["fid"]["runs"]
    scored = b.score(gen, (0,))  # its alignment and count are the breakdown's, not another of its shares
    assert scored["count"]["runs"] == [returned[-1]["count"]] and scored["alignment"]["runs"] == [
        returned[-1]["alignment"]]
    judged.pop()  # the extra call above
    assert [world.captions(sc) for sc in judged] == [captions, b.captions]
    with pytest.raises(ValueError, match="split is eval or validation"):
        b.score(gen, (0,), "test")


def test_tuning_variants_name_their_rows(monkeypatch):
    import importlib.util
    from pathlib import Path

    from sb2.miniworld import bench

    monkeypatch.setattr(bench, "ROWS", list(bench.ROWS))  # the teacher rows a variant adds stay in this test
    monkeypatch.setattr(bench, "ORDER", list(bench.ORDER))
    spec = importlib.util.spec_from_file_location(
        "miniworld_tune", Path(__file__).resolve().parents[1] / "bench" / "miniworld_tune.py")
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    assert tune.variant_rows("A", ["train.seed=1"]) == ["A: full, VSD"]
    assert tune.variant_rows("M", []) == ["A: full, VSD", "B: LoRA, clamped + schedule (B)", "merged A+B, λ = 0.5"]
    rows = len(bench.ROWS)
    for _ in range(2):  # once, however often it is asked for
        assert tune.variant_rows("T", ["1.5"]) == ["teacher, cfg 1.5"]
    assert len(bench.ROWS) == rows + 1 and bench.ROWS[-1][2] == "teacher:1.5" and bench.ORDER[0] == "teacher, cfg 1.5"
    assert set(bench.ORDER) == {label for _, label, _ in bench.ROWS} | {"sweep"}
    for row, overrides in (("T", []), ("T", ["1.5", "x=1"]), ("T", ["abc"]), ("C", []), ("T", ["1.5", "steps=0"]),
                           ("T", ["1.5", "steps=2", "steps=4"]), ("T", ["steps=4"])):
        with pytest.raises(SystemExit):
            tune.variant_rows(row, overrides)
    # T|CFG|steps=N: the teacher at N DDIM steps, its own row; the bench's 25 steps otherwise
    assert tune.variant_rows("T", ["2", "steps=4"]) == ["teacher, cfg 2, 4 steps"]
    assert bench.ROWS[-1][1:] == ("teacher, cfg 2, 4 steps", "teacher:2.0")
    assert tune.teacher_steps("T", ["2", "steps=4"]) == 4 and tune.teacher_steps("T", ["2"]) is None
    assert tune.teacher_steps("A", ["steps=4"]) is None  # a student's overrides are config keys, never steps
    # whose training the overrides change: M trains both branches with them, a teacher row trains nothing
    assert [tune.variant_students(r) for r in ("A", "B", "M", "T")] == [("A",), ("B",), ("A", "B"), ()]


def test_a_training_seed_whose_student_failed_is_left_out_of_its_rows(tmp_path):
    from sb2.miniworld.bench import Bench, Plan
    from sb2.miniworld.judges import world_root
    from sb2.miniworld.report import results_markdown

    plan = Plan.quick()
    plan.seeds = (0,)
    b = Bench(tmp_path / "out", tmp_path / "work", plan, "cpu", world_root().resolve())
    b.failed_students["B@1"] = "OutOfMemoryError: as a dead worker would leave it"
    b.run_row("A: full, VSD")
    b.run_row("merged A+B, λ = 0.5")
    a, merged = b.rows["A: full, VSD"], b.rows["merged A+B, λ = 0.5"]
    assert a["train_seeds"] == [0, 1] and "failed_train_seeds" not in a  # A@1 trained: both seeds
    assert merged["train_seeds"] == [0] and list(merged["failed_train_seeds"]) == ["1"]
    assert "failed to train" in merged["failed_train_seeds"]["1"] and merged["fid"]["std"] == 0.0
    assert merged["fid"]["runs"] == [merged["per_train_seed"]["0"]["fid"]["mean"]]
    md = results_markdown(b.record())
    assert "| merged A+B, λ = 0.5 ‡ (training seeds [0] only; 1 failed to train) |" in md


def test_placeholders_are_filled_and_other_braces_kept():
    from pathlib import Path

    from sb2.miniworld.bench import fill_placeholders

    paths = {"teacher": Path("/w/teacher"), "reg": Path("/w/reg")}
    assert fill_placeholders("models.student={teacher}/unet", **paths) == "models.student=/w/teacher/unet"
    assert fill_placeholders("regularization.source={reg}", **paths) == "regularization.source=/w/reg"
    assert fill_placeholders("optim.student_lr_scale={attn2: 10}", **paths) == "optim.student_lr_scale={attn2: 10}"
    with pytest.raises(ValueError, match=r"unknown placeholder\(s\) \['\{teacer\}'\]"):
        fill_placeholders("models.student={teacer}/unet", **paths)


def test_checkpoint_selection_keeps_the_candidate_with_the_best_validation_fid(tmp_path, monkeypatch):
    """With select_steps, every student is saved at those steps too; each candidate is scored on the validation
    captions and the lowest FID is the student its rows use (here the A row: its generator's weights are the picked
    checkpoint's student)."""
    from sb2.miniworld.bench import Bench, Plan, candidate_steps
    from sb2.miniworld.judges import world_root
    from pathlib import Path

    from sb2.miniworld.report import results_markdown

    plan = Plan.quick()
    plan.train_steps, plan.select_steps, plan.train_seeds = 2, (1,), (0,)
    plan.rows, plan.sweep = ["A: full, VSD"], False
    assert candidate_steps(plan) == [1, 2]
    monkeypatch.chdir(tmp_path)  # a relative work folder, as the bench's default: recorded as given, not resolved
    b = Bench(tmp_path / "out", Path("work"), plan, "cpu", world_root().resolve())
    path = b.student("A")
    sel = b.train_info["A"]["selection"]
    cands = b.train_info["A"]["candidates"]
    assert Path(cands["1"]).parent == Path(cands["2"]).parent and not Path(cands["1"]).is_absolute()
    assert set(sel["validation_fid"]) == {"1", "2"}
    best = min(sel["validation_fid"], key=sel["validation_fid"].get)
    assert sel["step"] == int(best) and path == Path(b.train_info["A"]["candidates"][best])
    from sb2.generation.generator import OneStepGenerator

    for step, cand in b.train_info["A"]["candidates"].items():  # each candidate scores as selection recorded
        got = b.score(OneStepGenerator.load(cand, b.cfg, device="cpu"), (0,), "validation")["fid"]["mean"]
        assert got == sel["validation_fid"][step]
    assert sel["validation_fid"]["1"] != sel["validation_fid"]["2"]  # two different students
    b.run_row("A: full, VSD")
    rec = b.record()
    assert rec["select_steps"] == [1] and rec["students"]["A"]["selection"]["step"] == sel["step"]
    assert f"Steps picked: A {sel['step']}." in results_markdown(rec)
    plan.select_steps = (3,)
    with pytest.raises(ValueError, match=r"select_steps \[3\]"):
        candidate_steps(plan)
    plan.train_steps, plan.select_steps = 500, (250, 100)
    assert candidate_steps(plan) == [100, 250, 500]  # a checkpoint every 50 steps: 10 a student
    plan.select_steps = (333,)  # every step: 500 checkpoints a student
    with pytest.raises(ValueError, match=r"a checkpoint every 1 steps, 500 a student \(at most 20\)"):
        candidate_steps(plan)


def test_an_mps_daemon_that_does_not_quit_is_reported_not_raised(tmp_path, monkeypatch, capsys):
    """The H200 round's script exited 1 after writing every result: the daemon's ``quit`` hung past the timeout and
    raised. A control program that hangs (a stand-in on PATH: the real one needs a GPU) is now reported."""
    import importlib.util
    import os
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "miniworld_tune", Path(__file__).resolve().parents[1] / "bench" / "miniworld_tune.py")
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    fake = tmp_path / "nvidia-cuda-mps-control"
    fake.write_text("#!/bin/sh\nexec sleep 30\n")  # exec: the process the timeout kills is the sleep itself
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert tune.stop_mps(timeout=0.5) == "not stopped: TimeoutExpired"
    assert "did not quit" in capsys.readouterr().out
    fake.write_text("#!/bin/sh\ncat > /dev/null\n")  # one that reads the quit and exits
    assert tune.stop_mps(timeout=5) == "stopped"


def test_a_record_written_before_the_count_score_still_renders(tmp_path):
    """results.json files of earlier runs have no "count": their table shows "—" there, their plot leaves the panel
    out, and the rows that have it show it."""
    from sb2.miniworld.report import keys_of, plot_sweep

    old, new = _row(1000, 0.7, 0.2), {**_row(900, 0.8, 0.3), "count": {"mean": 0.75, "std": 0.01}}
    assert [k for k, _ in keys_of([old, new])] == ["fid", "precision", "recall", "clip_score", "alignment"]
    assert [k for k, _ in keys_of([new])][-1] == "count"
    sweep = [{"lambda": lam, **old} for lam in (0.0, 1.0)]
    assert plot_sweep(sweep, tmp_path / "sweep.png", {"teacher, cfg 4.5": new}).is_file()
    from sb2.miniworld import report

    assert report._cell(None) == "—" and report._cell(new["count"]) == "0.75 ± 0.01"


def test_a_terminated_tuning_run_takes_its_children_with_it(tmp_path):
    """SIGTERM (what `timeout` and schedulers send) to a --parallel run: its variant processes are killed too, not
    left training."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    name = f"tune_term_{os.getpid()}"
    parent = subprocess.Popen([sys.executable, str(root / "bench" / "miniworld_tune.py"), "--variants", "A", "A",
                               "--parallel", "2", "--steps", "100000", "--batch", "2", "--captions", "16",
                               "--device", "cpu", "--name", name],
                              cwd=tmp_path, env={**os.environ, "OUT": str(tmp_path)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)

    def children() -> list[int]:
        r = subprocess.run(["pgrep", "-f", "--", f"--name {name}_"], capture_output=True, text=True, check=False)
        return [int(p) for p in r.stdout.split()]

    try:
        deadline = time.time() + 120
        while len(children()) < 2 and time.time() < deadline:
            time.sleep(0.5)
        assert len(children()) == 2, "the two variant processes never started"
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.time() + 30
        while children() and time.time() < deadline:
            time.sleep(0.5)
        assert children() == []
    finally:  # whatever failed, nothing of this test keeps running
        parent.kill()
        subprocess.run(["pkill", "-9", "-f", "--", f"--name {name}_"], check=False)
