"""bench/train_step.py on tiny models (CPU): its fast variant computes the library's loss, the naive one the same math.

The numerical check of the benchmark is only worth something if both variants compute one loss: a fast variant that
dropped a term (as the lora scheme's CLIP loss once was) would time less work and still pass its gradient check."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_lora_variants_compute_the_same_losses_and_gradients(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train_step.py"), "--tiny", "--scheme", "lora",
                           "--quick", "--steps", "1"], env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "train_step.json").read_text())["rows"]
    fast = [r for r in rows if r["variant"] != "naive"]
    assert fast
    for r in fast:  # fp32 on the CPU: only the order of operations differs
        assert r["rel_err_loss_vsd"] < 1e-4, r
        assert r["rel_err_grad_student"] < 1e-2, r
        assert r["rel_err_loss_lora"] < 1e-4, r
