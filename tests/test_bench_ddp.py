"""bench/train_ddp.py on CPU (--tiny: tiny models, 2 processes over gloo): the script's protocol, not its figures."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_rounds_alternate_one_and_many_processes_and_each_efficiency_is_against_its_own_round(tmp_path):
    out = tmp_path / "out"  # not there yet: the script makes it
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "train_ddp.py"), "--tiny", "--rounds", "2",
                        "--work", str(tmp_path / "work")], cwd=ROOT, env={**os.environ, "OUT": str(out)},
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rec = json.loads((out / "train_ddp.json").read_text())
    assert rec["rounds"] == 2
    one = {x["round"]: x for x in rec["runs"] if x["processes"] == 1}
    many = [x for x in rec["runs"] if x["processes"] == 2]
    assert sorted(one) == [0, 1] and [x["round"] for x in many] == [0, 1]
    for x in many:
        assert x["scaling_efficiency"] == pytest.approx(x["samples_per_s"] / (2 * one[x["round"]]["samples_per_s"]))
    effs = rec["scaling_efficiency_by_round"]["default"]
    assert effs == {str(x["round"]): x["scaling_efficiency"] for x in many}
    assert rec["scaling_efficiency"]["default"] == pytest.approx(statistics.median(effs.values()))
    assert rec["rounds_done"] == 2
    # the two rounds' runs are separate runs (their own output folders and logs), in the order 1, 2, 2, 1
    assert len({tuple(x["windows"]) for x in rec["runs"]}) == 4
    lines = [ln for ln in r.stdout.splitlines() if "samples/s (windows" in ln]
    assert [ln.split(":")[0] for ln in lines] == ["1 process (round 1 of 2)", "2 processes [default] (round 1 of 2)",
                                                  "2 processes [default] (round 2 of 2)", "1 process (round 2 of 2)"]


def test_rounds_need_a_one_process_run_of_their_own(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "train_ddp.py"), "--tiny", "--rounds", "2",
                        "--baseline", str(tmp_path / "earlier.json")], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 2 and "not with --baseline" in r.stderr


def test_a_round_without_its_one_process_run_is_recorded_and_not_counted_done(tmp_path):
    """Past the budget from the start: the 1-process run is recorded as skipped (also in the summary), the 2-process
    runs too, no efficiency is reported, and no round counts as done."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "train_ddp.py"), "--tiny", "--rounds", "2",
                        "--budget-s", "0", "--work", str(tmp_path / "work")], cwd=ROOT,
                       env={**os.environ, "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=600,
                       check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rec = json.loads((tmp_path / "train_ddp.json").read_text())
    assert rec["rounds_done"] == 0 and rec["scaling_efficiency"] == {}
    assert [(x["processes"], x.get("skipped")) for x in rec["runs"]] == [(1, "budget"), (2, "budget")]
    assert "1 process, round 1: skipped (budget)" in r.stdout


def test_a_round_is_done_only_when_it_gave_its_figure():
    """The GPU run's case among them: round 2's N-process runs measured, its 1-process run skipped (no efficiency)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from train_ddp import round_done

    measured = {"variant": "default", "samples_per_s": 52.3}
    assert not round_done([measured])  # no 1-process run of its own: no efficiency
    assert round_done([measured, {**measured, "scaling_efficiency": 0.97}])
    assert not round_done([{"variant": "default", "skipped": "budget"}, {"variant": "x", "error": "exit 1"}])
    assert not round_done([])
    assert round_done([measured], only_many=True) and not round_done([{"skipped": "budget"}], only_many=True)
