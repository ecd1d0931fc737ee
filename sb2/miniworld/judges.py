"""The mini-world's judges, never used in training: small CNNs that read a scene off its pixels.

An :class:`AttributeNet` predicts, for each of the 9 grid cells, the shape there (or none), its color and its size,
and the background. Two are trained, of different widths and seeds:

- ``features``: its penultimate vector is the feature space of FID and precision/recall (the Inception/VGG of the
  mini-world): ``ExtractorConfig(kind="module", source="sb2.miniworld.judges:fid_features")``;
- ``attributes``: scores text alignment exactly (:func:`alignment`): an image matches its caption when it holds as
  many objects as the caption names and each named object, with every attribute the caption states, is found.

Both learn from degraded images (:func:`degrade`: blur, color shift, noise) and, for a share, from VAE reconstructions,
so that a decoded image is judged by what it shows and not rejected for its blur.

A third judge, the CLIP-score model, is a second mini-world CLIP (:mod:`sb2.miniworld.clip`, other seed and size).
Each is saved as ``config.json`` + ``model.safetensors``; nothing is pickled.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sb2.miniworld.fitting import Progress, WorldData, autocast, optimizer, step
from sb2.miniworld.world import BACKGROUNDS, COLORS, SHAPES, SIZES, Scenes

CELLS = 9
HEADS = {"shape": len(SHAPES) + 1, "color": len(COLORS), "size": len(SIZES)}  # shape class len(SHAPES) = empty
PER_CELL = sum(HEADS.values())


class AttributeNet(nn.Module):
    def __init__(self, width: int = 32, feature_dim: int = 256):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(), nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1),
            nn.SiLU(), nn.Conv2d(4 * w, 4 * w, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(4 * w, 4 * w, 3, stride=2, padding=1), nn.SiLU(), nn.Flatten(),
            nn.Linear(4 * w * 16, feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, CELLS * PER_CELL + len(BACKGROUNDS))

    def features(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, 64, 64) → penultimate features (B, feature_dim)."""
        if images_uint8.shape[-1] != 64:
            images_uint8 = F.interpolate(images_uint8.float(), size=(64, 64), mode="bilinear", antialias=True)
        return self.body(images_uint8.float() / 127.5 - 1)

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return self.features(images_uint8)

    def logits(self, images_uint8: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.head(self.features(images_uint8))
        cells = out[:, : CELLS * PER_CELL].view(-1, CELLS, PER_CELL)
        parts, a = {}, 0
        for name, k in HEADS.items():
            parts[name], a = cells[..., a : a + k], a + k
        parts["background"] = out[:, CELLS * PER_CELL :]
        return parts


def cell_targets(scenes: Scenes, idx: np.ndarray) -> dict[str, torch.Tensor]:
    """Per-cell labels of scenes ``idx``: shape (empty = len(SHAPES)), color and size (-100 where empty)."""
    n = len(idx)
    shape = np.full((n, CELLS), len(SHAPES))
    color = np.full((n, CELLS), -100)
    size = np.full((n, CELLS), -100)
    rows = np.arange(n)[:, None]
    present = scenes.shape[idx] >= 0
    cell = np.where(present, scenes.cell[idx], 0)
    for arr, src in ((shape, scenes.shape), (color, scenes.color), (size, scenes.size)):
        vals = src[idx]
        arr[np.broadcast_to(rows, cell.shape)[present], cell[present]] = vals[present]
    return {"shape": torch.from_numpy(shape), "color": torch.from_numpy(color), "size": torch.from_numpy(size),
            "background": torch.from_numpy(scenes.background[idx])}


def degrade(images_nchw: torch.Tensor, gen: torch.Generator, max_blur: float = 1.2, max_noise: float = 6.0,
            gain: float = 0.06, offset: float = 6.0) -> torch.Tensor:
    """What a decoder does to an image, at random per image (0–255 floats in and out): Gaussian blur of σ in
    [0, max_blur] px, a per-channel gain and offset (slight color shift), Gaussian noise of std in [0, max_noise]."""
    x = images_nchw.float()
    b, c, h, w = x.shape
    u = torch.rand(b, 4, generator=gen).to(x.device)
    sigma = (u[:, 0] * max_blur).clamp(min=1e-2)
    r = torch.arange(-3, 4, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (r[None] / sigma[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (b·c, 7): one kernel per image, for each channel
    y = F.pad(x.reshape(1, b * c, h, w), (3, 3, 3, 3), mode="replicate")
    y = F.conv2d(F.conv2d(y, k[:, None, None, :], groups=b * c), k[:, None, :, None], groups=b * c).view(b, c, h, w)
    jitter = torch.rand(b, 2 * c, generator=gen).to(x.device) * 2 - 1
    y = y * (1 + gain * jitter[:, :c, None, None]) + offset * jitter[:, c:, None, None]
    y = y + torch.randn_like(y) * (u[:, 1] * max_noise)[:, None, None, None]  # on the device: 6M values a batch
    return y.clamp(0, 255)


def train_attribute_net(data: WorldData, steps: int, batch: int, lr: float, seed: int, device, width: int,
                        feature_dim: int, max_seconds: float | None = None, decoded: torch.Tensor | None = None,
                        p_decoded: float = 0.3):
    """Cross-entropy on the scenes' cell labels, on degraded images (:func:`degrade`) so that a judge does not
    reject every image that went through a decoder; ``decoded``: VAE reconstructions of ``data``'s first images
    (uint8 NHWC), shown instead of the image for a share ``p_decoded`` of the batch where there is one."""
    torch.manual_seed(seed)
    net = AttributeNet(width, feature_dim).to(device).train()
    progress = Progress(f"judge{seed}", steps, max_seconds)
    opt, sched = optimizer(net.parameters(), lr, progress, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    for i in range(steps):
        images, _, idx = data.batch(gen, batch)
        if decoded is not None:
            swap = (idx < len(decoded)) & (torch.rand(batch, generator=gen) < p_decoded)
            dev_swap = swap.to(images.device)[:, None, None, None]
            images = torch.where(dev_swap, decoded[idx.clamp(max=len(decoded) - 1).to(decoded.device)], images)
        target = {k: v.to(device) for k, v in cell_targets(data.scenes, idx.numpy()).items()}
        x = degrade(images.permute(0, 3, 1, 2), gen)
        with autocast(device):
            parts = net.logits(x)
        loss = sum(F.cross_entropy(parts[k].float().flatten(0, -2), target[k].flatten(), ignore_index=-100)
                   for k in parts)
        step(opt, sched, loss, net.parameters())
        if progress(i, loss=loss.item()):
            break
    return net.eval().requires_grad_(False), progress.summary()


@torch.no_grad()
def predict(net: AttributeNet, images_uint8_nchw: torch.Tensor, batch: int = 1024) -> dict[str, np.ndarray]:
    """Arg-max attributes per cell (shape == len(SHAPES): no object there)."""
    out: dict[str, list] = {k: [] for k in (*HEADS, "background")}
    device = next(net.parameters()).device
    for a in range(0, len(images_uint8_nchw), batch):
        parts = net.logits(images_uint8_nchw[a : a + batch].to(device))
        for k, v in parts.items():
            out[k].append(v.argmax(-1).cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def _matches(pred: dict, i: int, scenes: Scenes, j: int, ignore: frozenset[str] = frozenset()) -> bool:
    """Image i shows scene j's caption: as many objects, the stated background, and an assignment of the found objects
    to the named ones with every stated attribute right. ``ignore`` drops kinds of statement (background, shape,
    color, size, position) from the check; the count is always checked."""
    present = np.nonzero(pred["shape"][i] < len(SHAPES))[0]
    n = int(scenes.count[j])
    if len(present) != n:
        return False
    if ("background" not in ignore and scenes.says_background[j]
            and pred["background"][i] != scenes.background[j]):
        return False
    for perm in itertools.permutations(present.tolist()):
        ok = True
        for k, c in enumerate(perm):
            if (("shape" not in ignore and pred["shape"][i][c] != scenes.shape[j, k])
                    or ("color" not in ignore and scenes.says_color[j, k] and pred["color"][i][c] != scenes.color[j, k])
                    or ("size" not in ignore and scenes.says_size[j, k] and pred["size"][i][c] != scenes.size[j, k])
                    or ("position" not in ignore and scenes.says_position[j, k] and c != scenes.cell[j, k])):
                ok = False
                break
        if ok:
            return True
    return False


STATEMENTS = ("background", "shape", "color", "size", "position")


def right_count(pred: dict, scenes: Scenes) -> np.ndarray:
    """Per predicted image (:func:`predict`), whether it shows as many objects as its scene's caption names."""
    return (pred["shape"] < len(SHAPES)).sum(axis=1) == scenes.count[:len(pred["shape"])]


def matches_caption(pred: dict, scenes: Scenes) -> float:
    """Share of the predicted images (:func:`predict`) that show what their captions state: the alignment."""
    return _share(pred, scenes)


def alignment_breakdown(net: AttributeNet, images_uint8_nchw: torch.Tensor, scenes: Scenes) -> dict[str, float]:
    """What the alignment accuracy loses to each kind of statement: ``alignment`` as :func:`alignment` scores it,
    ``count`` the share with as many objects as the caption names, ``without_<kind>`` the alignment with that kind of
    statement not checked (so ``without_<kind> − alignment`` is the share failed by that kind alone or with others)."""
    pred = predict(net, images_uint8_nchw)
    out = {"alignment": _share(pred, scenes), "count": float(np.mean(right_count(pred, scenes)))}
    out.update({f"without_{k}": _share(pred, scenes, frozenset({k})) for k in STATEMENTS})
    return out


def _share(pred: dict, scenes: Scenes, ignore: frozenset[str] = frozenset()) -> float:
    """Share of the predicted images that match their own scenes' captions."""
    return float(np.mean([_matches(pred, i, scenes, i, ignore) for i in range(len(pred["shape"]))]))


def alignment(net: AttributeNet, images_uint8_nchw: torch.Tensor, scenes: Scenes) -> float:
    """Share of images that show what their captions (scenes' ``says_*``) state: alignment accuracy."""
    return _share(predict(net, images_uint8_nchw), scenes)


@torch.no_grad()
def attribute_accuracy(net: AttributeNet, images_uint8: torch.Tensor, scenes: Scenes) -> dict[str, float]:
    """Per-cell accuracy of each head on real images (color/size over occupied cells), and alignment with the
    images' own captions (the judge's ceiling)."""
    x = images_uint8.permute(0, 3, 1, 2)
    pred = predict(net, x)
    target = {k: v.numpy() for k, v in cell_targets(scenes, np.arange(len(scenes))).items()}
    acc = {"shape_or_empty": float((pred["shape"] == target["shape"]).mean()),
           "background": float((pred["background"] == target["background"]).mean())}
    for k in ("color", "size"):
        m = target[k] != -100
        acc[k] = float((pred[k][m] == target[k][m]).mean())
    acc["alignment_real"] = float(np.mean([_matches(pred, i, scenes, i) for i in range(len(scenes))]))
    return acc


def save_judge(net: AttributeNet, folder: str | Path) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    width = net.body[0].out_channels
    (folder / "config.json").write_text(json.dumps(
        {"class": "AttributeNet", "width": width, "feature_dim": net.head.in_features, "shapes": list(SHAPES),
         "colors": list(COLORS), "sizes": list(SIZES), "backgrounds": list(BACKGROUNDS)}, indent=2))
    save_file({k: v.detach().cpu().half().contiguous() for k, v in net.state_dict().items()},
              str(folder / "model.safetensors"))


def load_judge(folder: str | Path) -> AttributeNet:
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    net = AttributeNet(cfg["width"], cfg["feature_dim"])
    net.load_state_dict({k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()})
    return net.eval().requires_grad_(False)


def world_root() -> Path:
    """The committed mini-world (``data/miniworld``), or the folder in ``SB2_MINIWORLD``."""
    return Path(os.environ.get("SB2_MINIWORLD", Path(__file__).resolve().parents[2] / "data" / "miniworld"))


def fid_features() -> AttributeNet:
    """The FID / precision-recall feature network (``kind: module``, no arguments)."""
    return load_judge(world_root() / "judges" / "features")


def attribute_judge() -> AttributeNet:
    return load_judge(world_root() / "judges" / "attributes")
