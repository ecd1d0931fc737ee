"""Pair sources of the image regularization: folder, manifest (with the prompt builder's filter) and WebDataset shards
read the same pairs; bad input is skipped and counted or stops; the sampler resumes; `sb2 regpairs` writes teacher
pairs that the dmd_pairs option reads back."""

import io
import json
import shutil
import sys
import tarfile
import types
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from sb2.config import load_config
from sb2.train.paired import PairedInputError, PairSampler, detect_format, load_image, open_image_captions

SAMPLES = Path(__file__).parent.parent / "data" / "samples"
SIZE = (32, 48)


def _rc(source, *sets):
    return load_config("tiny", [f"regularization.source={source}", *sets]).regularization


def _pairs(source) -> dict[str, torch.Tensor]:
    return {(p := source.load(i)).caption: p.image for i in range(len(source))}


def _write_shard(path: Path, names: list[str], json_captions: bool) -> None:
    scores = {r[1]: float(r[2]) for r in (line.split(",") for line in
                                          (SAMPLES / "reg_manifest.csv").read_text().splitlines()[1:])}
    with tarfile.open(path, "w") as tar:
        for name in names:
            caption = (SAMPLES / "reg_pairs" / f"{name}.txt").read_text().strip()
            files = {f"{name}.png": (SAMPLES / "reg_pairs" / f"{name}.png").read_bytes()}
            meta = {"AESTHETIC_SCORE": scores[caption]}
            if json_captions:
                meta["caption"] = caption
            else:
                files[f"{name}.txt"] = caption.encode()
            files[f"{name}.json"] = json.dumps(meta).encode()
            for member, data in files.items():
                info = tarfile.TarInfo(f"shard/{member}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_folder_manifest_and_tar_shards_read_the_same_pairs(tmp_path):
    folder = open_image_captions(_rc(SAMPLES / "reg_pairs"), SIZE)
    assert len(folder) == 6
    image = folder.load(0).image
    assert image.shape == (3, *SIZE) and image.min() >= -1 and image.max() <= 1
    filt = ("regularization.filter_column=AESTHETIC_SCORE", "regularization.filter_min=6.25")
    manifest = open_image_captions(_rc(SAMPLES / "reg_manifest.csv", *filt), SIZE)
    assert len(manifest) == 5  # the orange box (5.9) is below the filter; 6.25 itself passes
    names = sorted(p.stem for p in (SAMPLES / "reg_pairs").glob("*.png"))
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    shutil.copytree(SAMPLES / "reg_pairs", tmp_path / "reg_pairs")
    pq.write_table(pcsv.read_csv(SAMPLES / "reg_manifest.csv"), tmp_path / "manifest.parquet")
    parquet = open_image_captions(_rc(tmp_path / "manifest.parquet", *filt), SIZE)
    (tmp_path / "shards").mkdir()
    _write_shard(tmp_path / "shards" / "000.tar", names[:3], json_captions=False)
    _write_shard(tmp_path / "shards" / "001.tar", names[3:], json_captions=True)
    assert detect_format(str(tmp_path / "shards")) == "webdataset"
    shards = open_image_captions(_rc(tmp_path / "shards", *filt), SIZE)
    expected = _pairs(manifest)
    assert "an orange box on a grey background" in _pairs(folder)
    for source in (parquet, shards):
        got = _pairs(source)
        assert got.keys() == expected.keys()
        for caption in got:
            assert torch.equal(got[caption], expected[caption]), caption


def test_center_crop_and_resize():
    from PIL import Image

    im = Image.new("RGB", (60, 20), (0, 0, 0))
    im.paste((255, 255, 255), (20, 0, 40, 20))  # white center square: what a square crop keeps
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    buf.seek(0)
    x = load_image(buf, (8, 8))
    assert x.shape == (3, 8, 8) and torch.allclose(x, torch.ones_like(x))


def test_bad_input_is_skipped_and_counted_or_stops(tmp_path, capsys):
    with pytest.raises(PairedInputError, match="does not exist"):
        open_image_captions(_rc(tmp_path / "nope"), SIZE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PairedInputError, match="holds no image–caption pairs"):
        open_image_captions(_rc(tmp_path / "empty"), SIZE)
    pairs = tmp_path / "pairs"
    shutil.copytree(SAMPLES / "reg_pairs", pairs)
    (pairs / "blue_square.png").write_bytes(b"not a png")
    (pairs / "orphan.png").write_bytes((SAMPLES / "reg_pairs" / "red_circle.png").read_bytes())  # no caption
    with pytest.raises(PairedInputError, match="orphan.png: no caption file orphan.txt") as e:
        open_image_captions(_rc(pairs, "regularization.bad_input.on_error=stop"), SIZE)
    assert "\n" not in str(e.value)
    source = open_image_captions(_rc(pairs, "regularization.bad_input.max_bad_fraction=0.5"), SIZE)
    assert len(source) == 6 and "orphan.png: no caption file" in capsys.readouterr().err
    sampler = PairSampler(source, 4, seed=0, policy=_rc(pairs, "regularization.bad_input.max_bad_fraction=0.5").bad_input)
    batches = [sampler.next_batch() for _ in range(3)]  # two epochs: the bad image is met, skipped, remembered
    assert all(len(b) == 4 for b in batches)
    assert "blue_square" not in " ".join(p.caption for b in batches for p in b)
    assert len(sampler.bad) == 1 and "blue_square.png: unreadable image" in capsys.readouterr().err
    stopping = PairSampler(source, 6, seed=0, policy=_rc(pairs, "regularization.bad_input.on_error=stop").bad_input)
    with pytest.raises(PairedInputError, match="blue_square.png: unreadable image"):
        stopping.next_batch()


def test_pair_sampler_resumes_where_it_stopped():
    source = open_image_captions(_rc(SAMPLES / "reg_pairs"), (8, 8))
    a = PairSampler(source, 4, seed=3)
    a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    b = PairSampler(source, 4, seed=3)
    b.load_state_dict(state)
    for _ in range(3):
        assert [p.caption for p in a.next_batch()] == [p.caption for p in b.next_batch()]


def test_regpairs_writes_teacher_pairs_that_dmd_pairs_reads_back(tiny_cfg, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from sb2.cli import app
    from sb2.models.loading import load_teacher
    from sb2.student import encode_prompts, seeded_noise
    from sb2.train.paired import RegularizationFeed
    from sb2.train.regpairs import ddim_sample
    from sb2.train.steps import build_models, regularization_batch, student_step

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na snowy owl\na dragon\n")
    out = tmp_path / "pairs"
    r = CliRunner().invoke(app, ["regpairs", "-p", "tiny", "--prompts", str(prompts), "--out", str(out), "-n", "3",
                                 "--device", "cpu", "--set", "regularization.pairs.shard_rows=2",
                                 "--set", "regularization.pairs.batch_size=2", "--set", "regularization.pairs.steps=2"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 3 and [s["rows"] for s in manifest["shards"]] == [2, 1]
    assert manifest["guidance_scale"] == tiny_cfg.vsd.guidance_scale and detect_format(str(out)) == "regpairs"

    # DMD's own form: LPIPS between decoded images; any perceptual net plugs in as package.module:factory
    perceptual = types.ModuleType("sb2_test_perceptual")
    perceptual.l1 = lambda: torch.nn.L1Loss(reduction="none")
    monkeypatch.setitem(sys.modules, "sb2_test_perceptual", perceptual)
    cfg = load_config("tiny", ["regularization.enabled=true", "regularization.kind=dmd_pairs",
                               f"regularization.source={out}", "regularization.share=1", "regularization.batch_size=3",
                               "regularization.distance=lpips", "regularization.perceptual_net=module:sb2_test_perceptual:l1"])
    m = build_models(cfg, "full", "cpu")
    assert m.tiny_vae is not None  # the decoder of the perceptual distance
    feed = RegularizationFeed(cfg).fit(m.latent_shape, 8)
    pairs = feed.batch_for(0)
    assert sorted(p.caption for p in pairs) == ["a dragon", "a red fox", "a snowy owl"]
    # the stored noise is pair i's seed, rounded to float16; the target is the teacher's DDIM sample from it
    last = next(p for p in pairs if p.caption == "a dragon")
    z = seeded_noise([2], m.latent_shape).half().float()
    torch.testing.assert_close(last.noise, z[0], rtol=0, atol=0)
    teacher = load_teacher(cfg.models)
    emb = encode_prompts(teacher.text_encoder, teacher.tokenizer, ["a dragon"], "cpu")
    null = encode_prompts(teacher.text_encoder, teacher.tokenizer, [""], "cpu")
    x = ddim_sample(teacher.unet, teacher.scheduler.config, z, emb, null, cfg.vsd.guidance_scale, 2)
    torch.testing.assert_close(last.target, x[0].half().float(), rtol=0, atol=0)

    reg = regularization_batch(m, cfg, pairs, "cpu", nullcontext)
    assert reg.target_images.shape == (3, 3, 64, 64)
    loss, _, logs, _ = student_step(m, cfg, emb.expand(2, -1, -1), null, ["a dragon"] * 2, 0, nullcontext, reg=reg)
    loss.backward()
    assert logs["loss/reg"] > 0 and torch.isfinite(loss)
    assert any(p.grad.abs().sum() > 0 for p in m.student_params)

    bad = load_config("tiny", ["regularization.enabled=true", f"regularization.source={SAMPLES / 'reg_pairs'}",
                               "regularization.kind=dmd_pairs"])
    with pytest.raises(PairedInputError, match="needs a folder written by `sb2 regpairs`"):
        RegularizationFeed(bad)
    with pytest.raises(PairedInputError, match=r"pairs of latents \(4, 8, 8\), the student makes \(4, 16, 16\)"):
        RegularizationFeed(cfg).fit((4, 16, 16), 8)


def test_lpips_without_its_package_is_a_one_line_error(monkeypatch):
    from sb2.models.loading import ModelLoadError, load_perceptual_net

    monkeypatch.setitem(sys.modules, "lpips", None)  # as if not installed
    with pytest.raises(ModelLoadError, match=r"needs the lpips package \(pip install lpips\)"):
        load_perceptual_net("lpips:vgg")
