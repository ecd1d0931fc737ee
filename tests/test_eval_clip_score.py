"""CLIP score: the prefix tokenization equals GigaGAN's token insertion, the judge preprocesses as open_clip's
validation transform, matched captions score above shuffled ones; HPSv2's chunked score and checkpoint loading."""

import numpy as np
import pytest
import torch
from PIL import Image

from sb2.evaluation.clip_score import CLIP_PREFIX, clip_cosines
from sb2.evaluation.features import build_clip_judge
from sb2.evaluation.hps import hps_summary


def test_prefix_tokens_equal_gigagan_insertion():
    from open_clip.tokenizer import tokenize

    captions = ["A small dog sleeping on a blue couch.", " ".join(f"word{i}" for i in range(120)),
                " ".join(["cat"] * 74)]  # short, truncated, and one at the edge of 77 tokens
    tokens = tokenize(captions)
    prefix = tokenize(CLIP_PREFIX)[:, 1:4]  # "a photo depicts"
    inserted = torch.cat([tokens[:, :1], prefix.expand(len(captions), -1), tokens[:, 1:]], 1)[:, :77]
    last = inserted[:, 76:77].clone()
    last[last > 0] = 49407  # GigaGAN forces the end token into the last column
    inserted = torch.cat([inserted[:, :76], last], 1)
    assert torch.equal(tokenize([CLIP_PREFIX + c for c in captions]), inserted)


def test_judge_pixels_equal_open_clip_validation_transform(tiny_world):
    import open_clip

    judge = build_clip_judge("tiny:clip", "cpu")
    model = judge.model
    transform = open_clip.image_transform(judge.size, is_train=False, mean=judge.scorer.mean, std=judge.scorer.std,
                                          interpolation="bicubic", resize_mode="shortest")
    a = np.random.default_rng(0).integers(0, 256, (56, 40, 3), dtype=np.uint8)  # non-square: resize + crop
    expected = transform(Image.fromarray(a))[None]
    got = judge.pixels(torch.from_numpy(a).permute(2, 0, 1)[None])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    emb = judge.encode_image(torch.from_numpy(a).permute(2, 0, 1)[None])
    assert emb.shape == (1, model.text_projection.shape[1]) and torch.isfinite(emb).all()


class ColorJudge:
    """A judge that matches by construction: an image's embedding is its mean colour, a caption's the colour it names.
    It checks the plumbing (pairing, prefix, mean cosine), not CLIP; a tiny random CLIP could not rank anything."""

    colors = {"red": (1.0, 0.05, 0.05), "green": (0.05, 1.0, 0.05), "blue": (0.05, 0.05, 1.0)}

    def __init__(self):
        self.seen = []

    def encode_image(self, images):
        return images.float().mean((2, 3))

    def encode_text(self, captions):
        self.seen += captions
        return torch.tensor([next(v for k, v in self.colors.items() if k in c) for c in captions])


def test_matched_pairs_score_above_shuffled():
    names = ["red", "green", "blue"] * 4
    gen = torch.Generator().manual_seed(0)
    images = torch.stack([torch.tensor(ColorJudge.colors[n]).view(3, 1, 1).expand(3, 16, 16) * 200
                          + torch.rand(3, 16, 16, generator=gen) * 50 for n in names]).to(torch.uint8)
    captions = [f"a {n} square" for n in names]
    judge = ColorJudge()
    matched = clip_cosines(judge, images, captions).mean()
    shuffled = clip_cosines(judge, images, captions[1:] + captions[:1]).mean()  # every caption names another colour
    assert matched > 0.95 and shuffled < 0.5
    assert judge.seen[0] == "A photo depicts a red square"


def test_hps_summary_is_hpsv2_chunked_mean():
    cos = np.concatenate([np.full(80, 0.25), np.full(80, 0.27)])
    s = hps_summary(cos)
    assert s["mean"] == pytest.approx(26.0) and s["std"] == pytest.approx(1.0) and s["n"] == 160


def test_hps_checkpoint_loads_over_both_towers(tiny_world, tmp_path):
    from sb2.models.loading import load_clip

    model = load_clip("tiny:clip").model
    state = {k: v + 0.01 for k, v in model.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "hps.pt")
    judge = build_clip_judge("tiny:clip", "cpu", checkpoint=str(tmp_path / "hps.pt"))
    for k, v in judge.model.state_dict().items():
        torch.testing.assert_close(v, state[k])
