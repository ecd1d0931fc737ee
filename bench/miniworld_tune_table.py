"""The tuning rounds' tables, computed from their JSONs: one row per variant over its training seeds.

    python bench/miniworld_tune_table.py results/miniworld/tuning/tune8_shared_lora_pass.json \\
        results/miniworld/tuning/tune14_decoder_dmd_tiny_vae.json --against A B

Reads the files ``bench/miniworld_tune.py`` writes and groups their students by variant with ``train.seed=N`` taken
out (a variant without it is seed 0). A (variant, seed) met again in a later file is a repeat (a card check): the
first is kept, and the repeat's FID is printed beside it. Each row gives every metric's mean ± sample std over the
seeds, FID per seed, and, against the reference row of its branch (``--against``: variants whose rows are compared
with; a variant is compared with the reference of its first letter, A with A, B with B), Welch's t of the FID means
and, over the seeds both have, the paired mean difference and its t. Prints a markdown table; ``--json`` prints the
rows instead (a variant's "|" is written "\\|" in the table, as markdown needs). Computing the tables here keeps
the figures in the docs equal to the files.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

METRICS = ("fid", "precision", "recall", "alignment", "count")
_SEED = re.compile(r"^train\.seed=(\d+)$")


def split_seed(variant: str) -> tuple[str, int]:
    """``"B|x=1|train.seed=2"`` → ``("B|x=1", 2)``; no ``train.seed`` → seed 0."""
    parts, seed = [], 0
    for p in variant.split("|"):
        m = _SEED.match(p)
        if m:
            seed = int(m.group(1))
        else:
            parts.append(p)
    return "|".join(parts), seed


def group(records: list[dict]) -> tuple[dict[str, dict[int, dict]], list[dict]]:
    """Students by variant and seed (first wins) and the repeats met later, each with the kept FID beside it.
    Students without a FID (failed or skipped) are left out."""
    groups: dict[str, dict[int, dict]] = {}
    repeats = []
    for rec in records:
        if "fid" not in rec:
            continue
        key, seed = split_seed(rec["variant"])
        seeds = groups.setdefault(key, {})
        if seed in seeds:
            repeats.append({"variant": key, "seed": seed, "kept_fid": seeds[seed]["fid"], "repeat_fid": rec["fid"]})
        else:
            seeds[seed] = rec
    return groups, repeats


def welch_t(a: list[float], b: list[float]) -> float | None:
    """Welch's t of mean(a) − mean(b); None with fewer than two values on a side or no spread at all."""
    if len(a) < 2 or len(b) < 2:
        return None
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return (statistics.mean(a) - statistics.mean(b)) / se if se else None


def paired(a: dict[int, float], b: dict[int, float]) -> dict | None:
    """Mean of a − b over the seeds both have, the differences and their t; None with fewer than two common seeds."""
    common = sorted(set(a) & set(b))
    if len(common) < 2:
        return None
    d = [a[s] - b[s] for s in common]
    sd = statistics.stdev(d)
    return {"seeds": common, "diffs": d, "mean": statistics.mean(d),
            "t": statistics.mean(d) / (sd / math.sqrt(len(d))) if sd else None}


def rows(records: list[dict], against: tuple[str, ...] = ()) -> list[dict]:
    """One row per variant, in first-seen order: n, seeds, FID by seed, mean/std per metric, and the comparison with
    the reference of the same branch (first letter) when it is another variant."""
    groups, _ = group(records)
    missing = [a for a in against if a not in groups]
    if missing:
        raise ValueError(f"no students of reference variant(s) {', '.join(missing)}; variants: {', '.join(groups)}")
    refs = {a.split("|")[0]: a for a in against}
    out = []
    for key, seeds in groups.items():
        row: dict = {"variant": key, "n": len(seeds), "seeds": sorted(seeds),
                     "fid_by_seed": {s: seeds[s]["fid"] for s in sorted(seeds)}}
        for m in METRICS:
            vals = [seeds[s][m] for s in sorted(seeds) if m in seeds[s]]
            if vals:
                row[m] = {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None,
                          "n": len(vals)}
        ref = refs.get(key.split("|")[0])
        if ref and ref != key:
            fid_ref = {s: groups[ref][s]["fid"] for s in groups[ref]}
            row["against"] = {"variant": ref, "fid_change": row["fid"]["mean"] / statistics.mean(fid_ref.values()) - 1,
                              "welch_t": welch_t(list(row["fid_by_seed"].values()), list(fid_ref.values())),
                              "paired": paired(row["fid_by_seed"], fid_ref)}
        out.append(row)
    return out


def _md(text: str) -> str:
    return text.replace("|", "\\|")  # a table cell's own bar


def markdown(table: list[dict], repeats: list[dict]) -> str:
    def cell(row, m, digits):
        if m not in row:
            return "—"
        v = row[m]
        s = f"{v['mean']:.{digits}f}"
        if v["std"] is not None and m == "fid":
            s += f" ± {v['std']:.0f}"
        return s + (f" ({v['n']} of {row['n']})" if v["n"] != row["n"] else "")

    lines = ["| variant | seeds | FID ↓ mean ± std (by seed) | precision ↑ | recall ↑ | alignment ↑ | right count ↑ "
             "| against | ΔFID | Welch t | paired t |", "| --- " * 11 + "|"]
    for r in table:
        by_seed = " / ".join(f"{v:.0f}" for v in r["fid_by_seed"].values())
        a = r.get("against")
        cmp = ("— | — | — | —" if not a else
               f"{_md(a['variant'])} | {a['fid_change']:+.0%} | "
               + (f"{a['welch_t']:.1f}" if a["welch_t"] is not None else "—") + " | "
               + (f"{a['paired']['t']:.1f} ({len(a['paired']['seeds'])} seeds)"
                  if a["paired"] and a["paired"]["t"] is not None else "—"))
        lines.append(f"| {_md(r['variant'])} | {','.join(map(str, r['seeds']))} | {cell(r, 'fid', 0)} ({by_seed}) | "
                     f"{cell(r, 'precision', 3)} | {cell(r, 'recall', 3)} | {cell(r, 'alignment', 3)} | "
                     f"{cell(r, 'count', 3)} | {cmp} |")
    for rep in repeats:
        lines.append(f"\nRepeated: {rep['variant']} at seed {rep['seed']}: FID {rep['repeat_fid']:.3f} against "
                     f"{rep['kept_fid']:.3f} kept.")
    return "\n".join(lines)


def load(paths) -> list[dict]:
    """The students of every file, in order (a file is {"variants": [...]} from --parallel, or a bare list)."""
    out = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        out += data["variants"] if isinstance(data, dict) else data
    return out


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--against", nargs="*", default=[], help="reference variants, e.g. A B")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    records = load(args.files)
    try:
        table = rows(records, tuple(args.against))
    except ValueError as e:
        ap.error(str(e))
    text = json.dumps(table, indent=1) if args.json else markdown(table, group(records)[1])
    print(text)
    return text


if __name__ == "__main__":
    main()
