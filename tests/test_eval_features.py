"""The judges: the FID Inception runs torch-fidelity's network layer by layer on clean-fid's input, the VGG16 and
random-weight paths build offline, plug-in modules load from a dotted path, weight files resolve locally."""

import pytest
import torch
from torch import nn

from sb2.config import ExtractorConfig
from sb2.evaluation.features import FIDInception, RandomConvFeatures, VGG16Features, build_extractor, weights_file
from sb2.models.loading import ModelLoadError


def test_fid_inception_walks_torch_fidelity_layers():
    ours = FIDInception("random")
    x = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8)
    # at 299 px torch-fidelity's TF-style resize is the identity, so both must see the same input
    expected = ours.net(x)[0]
    got = ours(x)
    assert got.shape == (2, 2048)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_fid_inception_reads_clean_fid_torchscript_layers(tmp_path):
    class Stand(nn.Module):  # the shape of clean-fid's inception-2015-12-05.pt: a scripted module with .layers
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1))

        def forward(self, x):
            return self.layers(x)

    stand = Stand()
    with pytest.warns(FutureWarning):
        torch.jit.script(stand).save(str(tmp_path / "inception-2015-12-05.pt"))
    with pytest.warns(FutureWarning):
        net = FIDInception(str(tmp_path / "inception-2015-12-05.pt"))
    x = torch.full((1, 3, 32, 32), 200, dtype=torch.uint8)
    from sb2.evaluation.preprocess import resize_float

    expected = stand.layers((resize_float(x, (299, 299)).clamp(0, 255) - 128) / 128).flatten(1)
    torch.testing.assert_close(net(x), expected)


def test_vgg16_random_weights_build_offline():
    out = VGG16Features("random")(torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8))
    assert out.shape == (1, 4096) and (out >= 0).all()  # fc2 after ReLU


def test_random_conv_is_deterministic_and_plugins_load():
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(RandomConvFeatures(8, 1)(x), RandomConvFeatures(8, 1)(x))
    assert not torch.equal(RandomConvFeatures(8, 1)(x), RandomConvFeatures(8, 2)(x))
    flat = build_extractor(ExtractorConfig(kind="module", source="torch.nn:Flatten"), "cpu")
    assert flat(x).dtype == torch.float32 and flat(x).shape == (3, 3 * 32 * 32)
    with pytest.raises(ModelLoadError):
        build_extractor(ExtractorConfig(kind="module", source="torch.nn:NoSuchThing"), "cpu")
    with pytest.raises(ValueError, match="needs a source"):
        ExtractorConfig(kind="inception")


def test_weights_resolve_locally_or_fail_in_one_line(tmp_path):
    (tmp_path / "w.pth").write_bytes(b"x")
    assert weights_file(str(tmp_path / "w.pth")) == str(tmp_path / "w.pth")
    with pytest.raises(ModelLoadError, match="does not exist"):
        weights_file(str(tmp_path / "missing.pth"))
    with pytest.raises(ModelLoadError, match="local_files_only"):
        weights_file("https://example.invalid/never-downloaded.pth", local_only=True)
