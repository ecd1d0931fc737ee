"""bench/miniworld_clip_probe.py: its counterfactual captions make exactly one statement false, and the script runs
on the committed CLIP models."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from sb2.miniworld import world

ROOT = Path(__file__).resolve().parents[1]


def _probe_module():
    spec = importlib.util.spec_from_file_location("miniworld_clip_probe", ROOT / "bench" / "miniworld_clip_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_each_counterfactual_changes_its_kind_only_and_the_caption_says_so():
    probe = _probe_module()
    scenes = world.sample_scenes(0, "eval", 256)
    true = world.captions(scenes)
    for kind in probe.KINDS:
        cf, ok = probe.counterfactual(scenes, kind, np.random.default_rng(0))
        assert ok.any(), kind
        caps = world.captions(cf)
        assert all(caps[i] != true[i] for i in np.flatnonzero(ok)), kind  # the statement is in the caption
        assert all(caps[i] == true[i] for i in np.flatnonzero(~ok)), kind  # scenes left out are unchanged
        i = int(np.flatnonzero(ok)[0])
        if kind == "count - 1":
            assert cf.count[i] == scenes.count[i] - 1
        elif kind == "count + 1":
            assert cf.count[i] == scenes.count[i] + 1 and cf.shape[i, scenes.count[i]] >= 0
        else:
            field = {"shape": "shape", "color": "color", "position": "cell", "size": "size",
                     "background": "background"}[kind]
            assert not np.array_equal(getattr(cf, field)[i], getattr(scenes, field)[i])
            assert cf.count[i] == scenes.count[i]
        assert np.array_equal(scenes.count, world.sample_scenes(0, "eval", 256).count)  # the input is not changed
        # nothing else of a scene changes: only the fields of its kind, and nothing in the scenes left out
        allowed = {"count - 1": {"count", "shape"},
                   "count + 1": {"count", "shape", "says_color", "says_size", "says_position"},
                   "shape": {"shape"}, "color": {"color"}, "position": {"cell"}, "size": {"size"},
                   "background": {"background"}}[kind]
        fields = [f.name for f in dataclasses.fields(world.Scenes) if f.name != "split"]
        for j in range(len(scenes)):
            changed = {f for f in fields if not np.array_equal(getattr(cf, f)[j], getattr(scenes, f)[j])}
            assert changed <= (allowed if ok[j] else set()), (kind, j, changed)
            assert not ok[j] or changed & ({"count"} if kind.startswith("count") else allowed), (kind, j)


def test_the_probe_runs_on_the_committed_clip_models(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "miniworld_clip_probe.py"), "--scenes", "64"], cwd=ROOT,
                       env={**os.environ, "OUT": str(tmp_path / "out")}, capture_output=True, text=True, timeout=600,
                       check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rec = json.loads((tmp_path / "out" / "clip_probe.json").read_text())
    for res in rec["results"].values():
        assert all(0.0 <= res[k]["true_above"] <= 1.0 and res[k]["scenes"] > 0 for k in rec["kinds"])
        assert res["count - 1"]["true_above"] > 0.8  # both CLIPs tell one object fewer on real images


def test_the_ascent_moves_the_latents_and_judges_them_at_the_asked_steps(tmp_path):
    """bench/miniworld_clip_ascent.py on the committed world, 8 captions, 3 steps through each decoder: the rows
    come at the asked steps, step 0 is the Turbo analog itself (no change), the latents move after it, and the
    cosine the loss pushes rises."""
    for decoder, key in (("tiny_vae", "cos_loss_tiny"), ("vae", "cos_loss_vae")):
        out = tmp_path / decoder
        r = subprocess.run([sys.executable, str(ROOT / "bench" / "miniworld_clip_ascent.py"), "--captions", "8",
                            "--steps", "3", "--at", "0", "3", "--decoder", decoder], cwd=ROOT,
                           env={**os.environ, "OUT": str(out)}, capture_output=True, text=True, timeout=600,
                           check=False)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        rec = json.loads((out / "clip_ascent.json").read_text())
        first, last = rec["rows"]
        assert (first["step"], last["step"]) == (0, 3) and rec["decoder"] == decoder
        assert first["latent_change"] == 0.0 and first["wrong_to_right"] == 0.0 and last["latent_change"] > 0
        assert last[key] > first[key]
