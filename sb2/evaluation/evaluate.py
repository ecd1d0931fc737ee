"""The evaluate stage: the zero-shot COCO-2014 protocol of paper 5.1 on one one-step model.

The first N captions (:mod:`captions`) → one image per caption from seed + i, in batches (:mod:`stream`) → center
crop and LANCZOS 256 on the device (:mod:`preprocess`) → Inception, VGG16 and CLIP features, straight from memory →
FID against the reference statistics, precision/recall (k = 3) against the reference features (:mod:`reference`),
mean CLIP score; HPSv2 on its own prompts (:mod:`hps`). Everything lands in ``metrics.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from sb2.evaluation.captions import CAPTION_RULE, read_captions
from sb2.evaluation.clip_score import clip_cosines
from sb2.evaluation.features import build_clip_judge, build_extractor
from sb2.evaluation.fid import MomentAccumulator, frechet_distance
from sb2.evaluation.hps import hps_scores, read_hps_prompts
from sb2.evaluation.precision_recall import precision_recall
from sb2.evaluation.preprocess import center_crop_resize
from sb2.evaluation.reference import Reference, reference_for
from sb2.evaluation.stream import ImageWriter, generate_uint8, prepare_for_speed
from sb2.evaluation.timing import PhaseTimer, device_name

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
REFERENCE_PARTS = ("fid", "precision_recall")


@dataclass
class Judges:
    fid: nn.Module | None = None
    precision_recall: nn.Module | None = None
    clip: Any = None
    hps: Any = None


def default_device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _dtype(name: str, device) -> torch.dtype:
    return DTYPES[name] if torch.device(device).type == "cuda" else torch.float32  # CPUs run float32


def load_judges(ecfg, device, local_only: bool = False, metrics: list[str] | None = None) -> Judges:
    metrics = ecfg.metrics if metrics is None else metrics
    judges = Judges()
    if "fid" in metrics:
        judges.fid = build_extractor(ecfg.fid, device, local_only)
    if "precision_recall" in metrics:
        judges.precision_recall = build_extractor(ecfg.precision_recall, device, local_only)
    if "clip_score" in metrics:
        judges.clip = build_clip_judge(ecfg.clip_score.model, device, _dtype(ecfg.clip_score.dtype, device),
                                       local_only=local_only)
    if "hps" in metrics:
        judges.hps = build_clip_judge(ecfg.hps.model, device, _dtype(ecfg.hps.dtype, device),
                                      checkpoint=ecfg.hps.checkpoint, local_only=local_only)
    return judges


def load_generator(model, cfg, device):
    from sb2.generation.generator import OneStepGenerator

    ecfg = cfg.evaluate
    dtype = ecfg.dtype if torch.device(device).type == "cuda" else "float32"
    gen = OneStepGenerator.load(model, cfg, device=device, dtype=dtype, decoder="vae")
    prepare_for_speed(gen, ecfg.channels_last, ecfg.compile)
    return gen


@torch.no_grad()
def protocol_metrics(gen, captions: list[str], judges: Judges, reference: Reference, ecfg, timer: PhaseTimer,
                     writer: ImageWriter | None = None, progress: bool = True) -> dict[str, float]:
    """FID, precision, recall and CLIP score of ``gen`` on ``captions`` (image i from seed ecfg.seed + i)."""
    seeds = [ecfg.seed + i for i in range(len(captions))]
    fid_acc, pr_feats, cosines = None, [], []
    batches = generate_uint8(gen, captions, seeds, ecfg.batch_size, timer)
    total = -(-len(captions) // ecfg.batch_size)
    for start, batch, images in tqdm(batches, total=total, desc="evaluate", unit="batch", disable=not progress):
        if writer is not None:
            with timer("write_images"):
                writer.write(start, batch, images)
        with timer("preprocess"):
            small = center_crop_resize(images, ecfg.image_size)
        if judges.fid is not None:
            with timer("fid_features"):
                f = judges.fid(small)
                if fid_acc is None:
                    fid_acc = MomentAccumulator(f.shape[1], f.device)
                fid_acc.update(f)
        if judges.precision_recall is not None:
            with timer("pr_features"):
                pr_feats.append(judges.precision_recall(small).float())
        if judges.clip is not None:
            with timer("clip_score"):
                cosines.append(clip_cosines(judges.clip, small, batch, ecfg.clip_score.prefix).float())
    out: dict[str, float] = {}
    if fid_acc is not None:
        with timer("fid"):
            out["fid"] = frechet_distance(fid_acc.mean, fid_acc.cov, reference.mu, reference.sigma)
    if pr_feats:
        with timer("precision_recall"):
            out["precision"], out["recall"] = precision_recall(reference.pr_features, torch.cat(pr_feats),
                                                               ecfg.pr_k, reference.pr_radii)
    if cosines:
        out["clip_score"] = torch.cat(cosines).mean().item()
    return out


def write_json(path: Path, record: dict) -> Path:
    """Write through a temporary file, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)
    return path


def evaluate(model: str | Path, cfg, out_dir: str | Path, device: str | None = None,
             progress: bool = True) -> dict[str, Any]:
    """The evaluate stage: ``out_dir/metrics.json`` (and ``out_dir/images/`` with ``evaluate.save_images``)."""
    ecfg, device, out = cfg.evaluate, default_device(device), Path(out_dir)
    timer = PhaseTimer(device)
    with timer("load"):
        captions = read_captions(ecfg.captions, ecfg.num_captions)
        hps_prompts = (read_hps_prompts(ecfg.hps.prompts, ecfg.hps.styles, ecfg.hps.prompts_per_style)
                       if "hps" in ecfg.metrics else None)
        gen = load_generator(model, cfg, device)
        judges = load_judges(ecfg, device, cfg.models.local_files_only)
    with timer("reference"):
        reference = reference_for(ecfg, judges, device, [p for p in REFERENCE_PARTS if p in ecfg.metrics])
    writer = ImageWriter(out / "images") if ecfg.save_images else None
    metrics: dict[str, Any] = {}
    if any(m in ecfg.metrics for m in ("fid", "precision_recall", "clip_score")) or writer is not None:
        metrics = protocol_metrics(gen, captions, judges, reference, ecfg, timer, writer, progress)
    if writer is not None:
        with timer("write_images"):
            writer.close()
    if judges.hps is not None:
        metrics["hps"] = hps_scores(gen, judges.hps, hps_prompts, ecfg.seed, ecfg.batch_size, timer)
    record = {
        "model": str(model), **metrics,
        "num_images": len(captions), "captions": ecfg.captions, "caption_rule": CAPTION_RULE, "seed": ecfg.seed,
        "image_size": ecfg.image_size, "reference": reference.info, "device": device_name(device),
        "seconds": timer.summary(), "evaluate_config": ecfg.model_dump(mode="json"),
    }
    write_json(out / "metrics.json", record)
    # The headline numbers alone, for `dvc metrics show/diff` and the registry gate.
    headline = {k: v for k, v in numeric_metrics(record).items()
                if k.split(".")[0] in ("fid", "clip_score", "precision", "recall", "hps") and not k.endswith(".n")}
    write_json(out / "scores.json", headline)
    log_to_tracking(cfg, "evaluate", out, record, [out / "metrics.json"])
    return record


def numeric_metrics(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in record.items():
        if isinstance(v, dict) and k not in ("seconds", "evaluate_config", "reference"):
            out.update(numeric_metrics(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def log_to_tracking(cfg, stage: str, out: Path, record: dict[str, Any], artifacts: list[Path]) -> None:
    """The stage's MLflow run (``out/mlflow_run.json`` points at it): its config, its numbers and its files."""
    from sb2.tracking import safe_config, stage_logger

    logger = stage_logger(cfg, stage, out)
    try:
        logger.log_params(safe_config(cfg))
        logger.log_metrics(numeric_metrics(record), step=0)
        for path in artifacts:
            if Path(path).exists():
                logger.log_artifact(path)
    finally:
        logger.close()
