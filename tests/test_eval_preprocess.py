"""The protocol's preprocessing: the tensor path reproduces Pillow's resampling bit for bit, the crop is torchvision's
center crop, and the result has the protocol's size."""

import numpy as np
import pytest
import torch
from PIL import Image

from sb2.evaluation.preprocess import (PIL_FILTERS, center_crop_box, center_crop_resize, pil_center_crop_resize,
                                       pil_to_tensor, resize_float, resize_uint8, to_uint8)


def _random_uint8(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("src,dst,filt", [
    ((512, 512), (256, 256), "lanczos"),  # generated image → FID size
    ((480, 480), (256, 256), "lanczos"),  # a cropped 640×480 COCO image
    ((37, 53), (16, 20), "lanczos"),      # odd sizes, both axes
    ((20, 30), (41, 17), "lanczos"),      # upsampling one axis
    ((256, 256), (224, 224), "bicubic"),  # CLIP's validation resize
])
def test_uint8_resize_is_pillow_bit_for_bit(src, dst, filt):
    a = _random_uint8(*src)
    ref = np.array(Image.fromarray(a).resize(dst[::-1], PIL_FILTERS[filt]))
    out = resize_uint8(torch.from_numpy(a).permute(2, 0, 1)[None], dst, filt)[0].permute(1, 2, 0).numpy()
    assert np.array_equal(out, ref)


def test_float_resize_is_pillow_mode_F_as_clean_fid():
    a = np.random.default_rng(1).random((256, 256)).astype(np.float32) * 255
    ref = np.array(Image.fromarray(a, mode="F").resize((299, 299), Image.BICUBIC))
    out = resize_float(torch.from_numpy(a)[None, None], (299, 299), "bicubic")[0, 0].numpy()
    np.testing.assert_allclose(out, ref, atol=1e-4)


def test_center_crop_matches_torchvision_and_both_paths_agree():
    import torchvision.transforms.functional as TF

    for w, h in [(640, 480), (480, 640), (641, 480), (300, 301)]:
        left, top, side = center_crop_box(w, h)
        img = Image.new("RGB", (w, h))
        expected = TF.center_crop(img, min(w, h))
        assert expected.size == (side, side)
        # torchvision's offsets: int(round((h - side) / 2)), the same for the width
        assert (left, top) == (int(round((w - side) / 2.0)), int(round((h - side) / 2.0)))
    a = _random_uint8(45, 61, seed=2)
    pil = pil_center_crop_resize(Image.fromarray(a), 32)
    assert pil.size == (32, 32)
    tensor = center_crop_resize(torch.from_numpy(a).permute(2, 0, 1)[None], 32)[0]
    assert torch.equal(tensor, pil_to_tensor(pil))


def test_uint8_conversion_rounds_like_diffusers():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 1.5])
    expected = np.round((np.clip(x.numpy(), -1, 1) / 2 + 0.5) * 255).astype(np.uint8)
    assert to_uint8(x).numpy().tolist() == expected.tolist()
