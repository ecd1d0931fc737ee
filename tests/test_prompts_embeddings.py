"""The text-embedding cache: written from a built prompt set, read back by prompt, used by training."""

import json

import numpy as np
import pytest
import torch

from sb2.config import load_config


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from sb2.prompts.build import build_prompts
    from sb2.prompts.embeddings import precompute_embeddings

    cfg = load_config("tiny", ["prompts.embeddings.shard_rows=40", "prompts.embeddings.batch_size=16"])
    root = tmp_path_factory.mktemp("emb")
    build_prompts(cfg.prompts, root / "prompts", cfg.models, log=lambda m: None)
    meta = precompute_embeddings(root / "prompts", root / "emb", cfg.models, cfg.prompts.embeddings, device="cpu")
    return root, cfg, meta


def test_cache_round_trip(built):
    from sb2.models.loading import load_text_encoder
    from sb2.prompts.embeddings import EmbeddingCache
    from sb2.student import encode_prompts
    from sb2.train.data import read_prompts

    root, _, meta = built
    manifest = json.loads((root / "prompts" / "manifest.json").read_text())
    assert meta["count"] == manifest["total"]["kept"] == 96
    assert [s["rows"] for s in meta["shards"]] == [40, 40, 16] and meta["shape"] == [77, 32]
    assert meta["prompts_content_sha256"] == manifest["content_sha256"]
    cache = EmbeddingCache(root / "emb", teacher="tiny:teacher")
    assert len(cache) == 96
    prompts = read_prompts(root / "prompts")[::7] + read_prompts(root / "prompts" / "val")[:2]
    encoder, tokenizer = load_text_encoder("tiny:teacher")
    got = cache.lookup(prompts)
    assert got.dtype == torch.float32 and got.shape == (len(prompts), 77, 32)
    torch.testing.assert_close(got, encode_prompts(encoder, tokenizer, prompts, "cpu"), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not in the embedding cache"):
        cache.lookup(["a prompt that was never built"])
    with pytest.raises(ValueError, match="but the teacher is 'other'"):
        EmbeddingCache(root / "emb", teacher="other")
    EmbeddingCache(root / "emb", prompts=root / "prompts")
    other = root / "other_prompts"
    other.mkdir(exist_ok=True)
    (other / "manifest.json").write_text(json.dumps({"content_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="another prompt set"):
        EmbeddingCache(root / "emb", prompts=other)


def test_cache_float16(built, tmp_path):
    from sb2.prompts.embeddings import EmbeddingCache, precompute_embeddings

    root, cfg, _ = built
    emb_cfg = cfg.prompts.embeddings.model_copy(update={"dtype": "float16"})
    precompute_embeddings(root / "prompts", tmp_path / "e16", cfg.models, emb_cfg, device="cpu")
    a, b = EmbeddingCache(root / "emb"), EmbeddingCache(tmp_path / "e16")
    p = ["a bowl of ramen, bokeh"]
    assert b.lookup(p).dtype == torch.float16
    assert np.allclose(a.lookup(p).numpy(), b.lookup(p).float().numpy(), atol=2e-3)


def test_training_reads_the_cache(built, monkeypatch):
    from sb2.prompts import embeddings
    from sb2.train.loop import train

    root, cfg, _ = built
    calls = []
    real = embeddings.EmbeddingCache.lookup
    monkeypatch.setattr(embeddings.EmbeddingCache, "lookup", lambda self, ps: calls.append(ps) or real(self, ps))
    cfg = cfg.model_copy(deep=True)
    cfg.train.steps = 2
    cfg.train.prompts = str(root / "prompts")
    cfg.train.prompt_embeddings = str(root / "emb")
    train(cfg, "full", root / "run", progress=False)
    assert len(calls) == 2 and all(len(c) == cfg.train.batch_size for c in calls)
    assert json.loads((root / "run" / "train.json").read_text())["steps"] == 2


def test_embed_cli(built, tmp_path):
    from typer.testing import CliRunner

    from sb2.cli import app

    root, _, _ = built
    r = CliRunner().invoke(app, ["prompts", "embed", "-p", "tiny", "--prompts", str(root / "prompts"),
                                 "--out", str(tmp_path / "e"), "--device", "cpu"])
    assert r.exit_code == 0 and "96 embeddings (77, 32) (float32)" in r.output
    r = CliRunner().invoke(app, ["prompts", "embed", "-p", "tiny", "--prompts", str(tmp_path), "--out",
                                 str(tmp_path / "f")])
    assert r.exit_code == 2 and "no manifest.json" in r.output and not (tmp_path / "f").exists()
