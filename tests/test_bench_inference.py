"""bench/inference.py's stage timing (``--stages``) on CPU: the script's code path, not its figures (those need the
GPU, where each stage is compiled and captured in a CUDA graph of its own)."""

import json
import os
import subprocess
import sys
from pathlib import Path


def test_stages_times_each_stage_per_batch(tmp_path):
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "bench" / "inference.py"), "--tiny", "--stages", "--batches", "1",
                        "2", "--iters", "2"], cwd=root, env={**os.environ, "OUT": str(tmp_path)},
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rec = json.loads((tmp_path / "inference_stages.json").read_text())
    got = [(row["batch"], row["stage"]) for row in rec["stages"]]
    stages = ["text encoder", "UNet (x0)", "VAE decoder", "TAESD decoder"]
    assert got == [(b, s) for b in (1, 2) for s in stages]  # on CPU no "whole" rows: the fast path needs CUDA
    assert all(row["median_ms"] > 0 for row in rec["stages"])


def test_stages_with_the_subpixel_upsamplers(tmp_path):
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "bench" / "inference.py"), "--tiny", "--batches", "1", "--iters", "1"]
    r = subprocess.run(cmd + ["--stages", "--subpixel", "phases"], cwd=root, env={**os.environ, "OUT": str(tmp_path)},
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rec = json.loads((tmp_path / "inference_stages.json").read_text())
    assert rec["subpixel"] == "phases" and len(rec["stages"]) == 4
    bad = subprocess.run(cmd + ["--subpixel", "phases"], cwd=root, capture_output=True, text=True, timeout=600,
                         check=False)
    assert bad.returncode == 2 and "--subpixel is for --stages" in bad.stderr
    unknown = subprocess.run(cmd + ["--only", "sb2 fast + tuned compile + subpixel bilinear"], cwd=root,
                             capture_output=True, text=True, timeout=600, check=False)
    assert unknown.returncode == 2 and "subpixel transposed" in unknown.stderr  # the known names are listed
    untuned = subprocess.run(cmd + ["--only", "sb2 fast + tuned compile + subpixel phases"], cwd=root,
                             capture_output=True, text=True, timeout=600, check=False)
    assert untuned.returncode == 2 and "run with --tuned" in untuned.stderr  # not left out silently
    # The CUDA graph without compile, with each form (the GPU round found them ranked the other way round there):
    # known names, not refused by --no-compile; on CPU no fast variant is built, so only the baseline's row is left
    # (building them needs CUDA, GraphedOneStep: that path is exercised only on the GPU).
    assert "sb2 fast + subpixel transposed" in unknown.stderr
    out = tmp_path / "uncompiled"
    out.mkdir()
    names = ["sb2 fast + subpixel phases", "sb2 fast + subpixel transposed"]
    plain = subprocess.run(cmd + ["--no-compile", "--only", *names], cwd=root, env={**os.environ, "OUT": str(out)},
                           capture_output=True, text=True, timeout=600, check=False)
    assert plain.returncode == 0, plain.stdout[-2000:] + plain.stderr[-2000:]
    assert [r["variant"] for r in json.loads((out / "inference.json").read_text())["rows"]] == ["diffusers pipeline"]
