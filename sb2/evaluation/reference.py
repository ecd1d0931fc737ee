"""The reference set: features of every image of a folder (COCO val2014: 40,504 images), computed once and reused.

``<reference_dir>/fid_stats.npz``: ``mu``, ``sigma`` (clean-fid/pytorch-fid layout) and ``n``;
``<reference_dir>/pr_features.npz``: ``features`` (N, D) and their k-NN ``radii``;
``<reference_dir>/reference.json``: what made them (folder, image count, size, judges), checked before every use so
that a metric never compares features of two different networks or preprocessings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from sb2.atomic import atomic_dir
from sb2.evaluation.fid import MomentAccumulator, load_stats, save_stats
from sb2.evaluation.precision_recall import knn_radii
from sb2.evaluation.preprocess import pil_center_crop_resize, pil_to_tensor

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


@dataclass
class Reference:
    mu: np.ndarray | None
    sigma: np.ndarray | None
    pr_features: torch.Tensor | None
    pr_radii: torch.Tensor | None
    info: dict


def _judge_signature(extractor) -> dict:
    """A feature network by what it computes: a weights file by its name (the same file under another path or URL is
    the same network), a plug-in by its import path, a random CNN by its size and seed."""
    sig = extractor.model_dump()
    if extractor.kind in ("inception", "vgg16"):
        sig["source"] = sig["source"].rstrip("/").rsplit("/", 1)[-1]
    return sig


def signature(ecfg, parts: list[str]) -> dict:
    """What the reference features depend on; two references with different signatures are not comparable."""
    sig: dict = {"image_size": ecfg.image_size, "preprocess": "center square crop, PIL LANCZOS"}
    if "fid" in parts:
        sig["fid"] = _judge_signature(ecfg.fid)
    if "precision_recall" in parts:
        sig["precision_recall"] = _judge_signature(ecfg.precision_recall)
        sig["pr_k"] = ecfg.pr_k
    return sig


def image_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"reference image folder {str(folder)!r} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"reference image folder {str(folder)!r} has no images")
    return files


class _Images(torch.utils.data.Dataset):
    def __init__(self, files: list[Path], size: int):
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i]) as im:
            return pil_to_tensor(pil_center_crop_resize(im, self.size))


@torch.no_grad()
def build_reference(images_dir: str | Path, judges, ecfg, out_dir: str | Path, device, batch_size: int = 64,
                    progress: bool = True) -> Reference:
    """Features of every image under ``images_dir`` for the judges given (FID and/or precision/recall), saved."""
    files = image_files(images_dir)
    parts = [p for p in ("fid", "precision_recall") if getattr(judges, p) is not None]
    loader = torch.utils.data.DataLoader(_Images(files, ecfg.image_size), batch_size=batch_size,
                                         num_workers=ecfg.num_workers)
    acc, feats = None, []
    for images in tqdm(loader, desc="reference", unit="batch", disable=not progress):
        images = images.to(device)
        if judges.fid is not None:
            f = judges.fid(images)
            if acc is None:
                acc = MomentAccumulator(f.shape[1], device)
            acc.update(f)
        if judges.precision_recall is not None:
            feats.append(judges.precision_recall(images).float())
    info = {"images": str(images_dir), "num_images": len(files), "signature": signature(ecfg, parts)}
    pr = torch.cat(feats) if feats else None
    radii = knn_radii(pr, ecfg.pr_k) if pr is not None else None
    with atomic_dir(out_dir) as tmp:
        if acc is not None:
            save_stats(tmp / "fid_stats.npz", acc.mean, acc.cov, acc.n)
        if pr is not None:
            np.savez(tmp / "pr_features.npz", features=pr.cpu().numpy(), radii=radii.cpu().numpy())
        (tmp / "reference.json").write_text(json.dumps(info, indent=2))
    return load_reference(out_dir, ecfg, parts, device)


def load_reference(ref_dir: str | Path, ecfg, parts: list[str], device) -> Reference:
    """The saved reference, after checking it was made for these judges and this preprocessing."""
    ref_dir = Path(ref_dir)
    meta = ref_dir / "reference.json"
    if not meta.is_file():
        raise FileNotFoundError(f"no reference in {str(ref_dir)!r} (build it with `sb2 evaluate --ref-stats`)")
    info = json.loads(meta.read_text())
    want, have = signature(ecfg, parts), info["signature"]
    for key, value in want.items():
        if have.get(key) != value:
            raise ValueError(f"reference {str(ref_dir)!r} was built with {key}={have.get(key)!r}, the config says "
                             f"{value!r}: rebuild it with `sb2 evaluate --ref-stats`")
    mu = sigma = pr = radii = None
    if "fid" in parts:
        mu, sigma = load_stats(ref_dir / "fid_stats.npz")
    if "precision_recall" in parts:
        with np.load(ref_dir / "pr_features.npz") as f:
            pr, radii = torch.from_numpy(f["features"]).to(device), torch.from_numpy(f["radii"]).to(device)
    return Reference(mu, sigma, pr, radii, info)


def reference_for(ecfg, judges, device, parts: list[str]) -> Reference:
    """The reference in ``ecfg.reference_dir``, built there from ``ecfg.reference_images`` on first use."""
    ref_dir = Path(ecfg.reference_dir)
    if not parts:
        return Reference(None, None, None, None, {})
    if not (ref_dir / "reference.json").is_file():
        return build_reference(ecfg.reference_images, judges, ecfg, ref_dir, device)
    return load_reference(ref_dir, ecfg, parts, device)
