"""bench/miniworld_tiny_vae.py: a TinyVAE distilled again beside the committed world, for models.tiny_vae."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def test_the_tiny_vae_is_distilled_saved_loadable_and_measured_beside_the_committed_one(tmp_path, monkeypatch):
    """Two steps on 256 pairs: the step cap holds, the saved folder loads through the loader training uses (as
    ``models.tiny_vae=`` names it) and decodes the world's latents to 64×64 images, and the committed TinyVAE is
    measured as its card measured it (same images, same figure)."""
    from miniworld_tiny_vae import main

    from sb2.config import load_config
    from sb2.models.loading import load_tiny_vae

    monkeypatch.setenv("OUT", str(tmp_path))
    rec = main(["--to", str(tmp_path / "tv"), "--seconds", "600", "--steps", "2", "--pairs", "256",
                "--workers", "1", "--device", "cpu"])
    assert rec["train"]["steps"] == 2 and rec["pairs"] == 256
    assert json.loads((tmp_path / "tiny_vae.json").read_text()) == rec
    card = json.loads((ROOT / "data" / "miniworld" / "card.json").read_text())["models"]["tiny_vae"]["metrics"]
    assert rec["committed"]["psnr_db"] == pytest.approx(card["psnr_db"], abs=1e-3)
    assert 0 < rec["new"]["psnr_db"] < rec["committed"]["psnr_db"]  # two steps: far worse than the committed one
    cfg = load_config("miniworld", [f"models.tiny_vae={tmp_path / 'tv'}"])
    tiny = load_tiny_vae(cfg.models.tiny_vae, cfg.models)
    with torch.no_grad():
        img = tiny.decode(torch.zeros(1, 4, 8, 8)).sample
    assert img.shape == (1, 3, 64, 64) and torch.isfinite(img).all()


@pytest.mark.parametrize("args, message", [(["--seconds", "0"], "--seconds must be positive"),
                                           (["--steps", "0"], "must be positive"),
                                           (["--world", "/tmp"], "not a mini-world folder")])
def test_bad_arguments_are_refused(tmp_path, capsys, args, message):
    from miniworld_tiny_vae import main

    with pytest.raises(SystemExit):
        main(["--to", str(tmp_path / "tv"), *args])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "tv").exists()


def test_it_never_writes_into_the_world_folder(capsys):
    from miniworld_tiny_vae import main

    with pytest.raises(SystemExit):
        main(["--to", str(ROOT / "data" / "miniworld" / "tiny_vae")])
    assert "inside the world folder" in capsys.readouterr().err
