"""bench/miniworld_tune_table.py: the tuning rounds' tables from their JSONs, checked against hand-computed figures."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from miniworld_tune_table import group, main, paired, rows, split_seed, welch_t  # noqa: E402


def rec(variant, fid, **kw):
    return {"variant": variant, "fid": fid, "precision": 0.5, "recall": 0.5, "alignment": 0.1, **kw}


RECORDS = [rec("A|train.seed=0", 10.0), rec("A|train.seed=1", 14.0), rec("A|train.seed=2", 12.0),
           rec("A|x=1|train.seed=0", 20.0, count=0.7), rec("A|x=1|train.seed=1", 16.0, count=0.5),
           rec("A|x=1|train.seed=2", 18.0, count=0.6),
           rec("A", 10.5),  # seed 0 again: a repeat, not a fourth student
           {"variant": "B|train.seed=0", "status": "killed after 5 s"}]  # no score: left out


def test_variants_are_grouped_by_their_overrides_with_the_seed_taken_out():
    assert split_seed("B|x=1|train.seed=12") == ("B|x=1", 12)
    assert split_seed("A|vsd.t_min=0.3") == ("A|vsd.t_min=0.3", 0)
    groups, repeats = group(RECORDS)
    assert list(groups) == ["A", "A|x=1"] and sorted(groups["A"]) == [0, 1, 2]
    assert groups["A"][0]["fid"] == 10.0  # the first kept
    assert repeats == [{"variant": "A", "seed": 0, "kept_fid": 10.0, "repeat_fid": 10.5}]


def test_the_statistics_against_hand_computed_values():
    # a = 20, 16, 18 (mean 18, var 4); b = 10, 14, 12 (mean 12, var 4): t = 6 / sqrt(4/3 + 4/3)
    assert welch_t([20, 16, 18], [10, 14, 12]) == pytest.approx(6 / math.sqrt(8 / 3))
    assert welch_t([1.0], [2.0, 3.0]) is None and welch_t([1, 1], [1, 1]) is None
    p = paired({0: 20, 1: 16, 2: 18, 5: 0}, {0: 10, 1: 14, 2: 12})
    # differences 10, 2, 6: mean 6, sd 4, t = 6 / (4 / sqrt 3)
    assert p["seeds"] == [0, 1, 2] and p["diffs"] == [10, 2, 6]
    assert p["mean"] == 6 and p["t"] == pytest.approx(6 / (4 / math.sqrt(3)))
    assert paired({0: 1.0}, {0: 2.0}) is None


def test_rows_compare_each_variant_with_its_branch_reference():
    table = {r["variant"]: r for r in rows(RECORDS, ("A",))}
    x = table["A|x=1"]
    assert x["fid"]["mean"] == 18 and x["fid"]["std"] == pytest.approx(2.0)
    assert x["fid_by_seed"] == {0: 20, 1: 16, 2: 18}
    assert x["count"] == {"mean": pytest.approx(0.6), "std": pytest.approx(0.1), "n": 3}
    assert x["against"]["variant"] == "A" and x["against"]["fid_change"] == pytest.approx(0.5)
    assert x["against"]["welch_t"] == pytest.approx(6 / math.sqrt(8 / 3))
    assert "against" not in table["A"] and "count" not in table["A"]
    with pytest.raises(ValueError, match="no students of reference"):
        rows(RECORDS, ("B",))


def test_the_command_prints_the_table_from_files(tmp_path, capsys):
    f1, f2 = tmp_path / "one.json", tmp_path / "two.json"
    f1.write_text(json.dumps({"variants": RECORDS[:3]}))
    f2.write_text(json.dumps(RECORDS[3:]))  # a bare list, as the sequential mode writes
    text = main([str(f1), str(f2), "--against", "A"])
    # paired: differences 10, 2, 6 → t = 6 / (4 / √3) ≈ 2.6; Welch 6 / √(8/3) ≈ 3.7; the variant's | escaped
    assert "| A\\|x=1 | 0,1,2 | 18 ± 2 (20 / 16 / 18) |" in text and "| A | +50% | 3.7 | 2.6 (3 seeds) |" in text
    assert "Repeated: A at seed 0: FID 10.500 against 10.000 kept." in text
    with pytest.raises(SystemExit):
        main([str(f1), "--against", "B"])
    assert "no students of reference" in capsys.readouterr().err
