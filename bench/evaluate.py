"""Benchmark of `sb2 evaluate` on one GPU: the zero-shot COCO-2014 protocol end to end (one-step generation, FID
features, precision/recall, CLIP score) on 30K captions, through the same code as the command
(:func:`sb2.evaluation.evaluate.protocol_metrics`).

Every network has its real architecture and random weights (speed does not depend on the weights, and nothing is
downloaded): the SD2.1-base UNet (866M), the OpenCLIP-H text encoder of SD2.x, the SD VAE, torch-fidelity's
Inception-v3, torchvision's VGG16 and open_clip's ViT-g-14. The reference is synthetic features of the size of COCO
val2014 (40,504 images); its k-NN radii are computed once, as `sb2 evaluate --ref-stats` does, and timed apart.

Prints a breakdown (seconds and ms per image per phase, the card named) and writes ``$OUT/evaluate_bench.json`` when
OUT is set. A benchmark, not a test:

    python bench/evaluate.py [--captions 30000] [--batch-size 64] [--compile] [--no-channels-last]
    python bench/evaluate.py --tiny             # CPU, tiny models, a few captions: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sb2.config import EvalConfig, ExtractorConfig, load_config  # noqa: E402
from sb2.evaluation.evaluate import Judges, protocol_metrics  # noqa: E402
from sb2.evaluation.features import build_clip_judge, build_extractor  # noqa: E402
from sb2.evaluation.precision_recall import knn_radii  # noqa: E402
from sb2.evaluation.reference import Reference  # noqa: E402
from sb2.evaluation.stream import prepare_for_speed  # noqa: E402
from sb2.evaluation.timing import PhaseTimer, device_name, synchronize  # noqa: E402

COCO_VAL2014_IMAGES = 40_504
SUBJECTS = ("man", "woman", "dog", "cat", "train", "bus", "plate of food", "giraffe", "bicycle", "kitchen",
            "skier", "surfer", "clock tower", "pizza", "teddy bear", "laptop", "horse", "boat", "kite", "elephant")
DOING = ("sitting on", "standing next to", "riding", "looking at", "parked near", "flying over", "lying on",
         "holding", "walking along", "covered in")
PLACES = ("a wooden bench", "a busy street", "a sandy beach", "a snowy hill", "a kitchen counter", "a green field",
          "an old building", "a river bank", "a table", "a city park", "a runway", "a living room")
PHASES = (("generation", "generation (text encoder + UNet + VAE)"), ("preprocess", "crop + LANCZOS 256"),
          ("fid_features", "FID features (Inception)"), ("pr_features", "P/R features (VGG16)"),
          ("clip_score", "CLIP score (ViT-g-14; tiny CLIP with --tiny)"), ("fid", "Fréchet distance"),
          ("precision_recall", "precision/recall (k-NN vs reference)"))


def coco_like_captions(n: int) -> list[str]:
    """COCO-length captions, all distinct for n ≤ 48,000."""
    out = []
    for i in range(n):
        s, d, p = SUBJECTS[i % 20], DOING[(i // 20) % 10], PLACES[(i // 200) % 12]
        out.append(f"A {s} {d} {p} in photo number {i // 2400}.")
    return out


def sd21_base_generator(device, dtype):
    """SD2.1-base's UNet, text encoder and VAE, built from their configs with random weights."""
    from sb2.generation.generator import OneStepGenerator
    from sb2.models.architectures import sd21_parts

    p = sd21_parts(device, dtype, tiny_vae=False)
    print(f"UNet parameters: {sum(x.numel() for x in p['unet'].parameters()) / 1e6:.1f}M")
    return OneStepGenerator(p["unet"], p["text_encoder"], p["tokenizer"], p["vae"], p["scheduler"].alphas_cumprod)


def tiny_generator(device):
    from sb2.generation.generator import OneStepGenerator
    from sb2.models.loading import resolve

    return OneStepGenerator.load(resolve("tiny:student") + "/unet", load_config("tiny"), device=device)


def synthetic_reference(n: int, fid_dim: int, pr_dim: int, k: int, device, timer: PhaseTimer) -> Reference:
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(512, fid_dim, device=device, generator=gen, dtype=torch.float64)
    features = torch.randn(n, pr_dim, device=device, generator=gen).relu_()  # fc2 features are post-ReLU
    with timer("reference_radii"):
        radii = knn_radii(features, k)
    return Reference(x.mean(0).cpu().numpy(), torch.cov(x.T).cpu().numpy(), features, radii,
                     {"synthetic": True, "num_images": n})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--captions", type=int, default=30_000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--reference-images", type=int, default=COCO_VAL2014_IMAGES)
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet and the VAE decoder")
    ap.add_argument("--no-channels-last", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="CPU, tiny generator and CLIP, 16 captions, 64 references")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    if args.tiny:
        args.captions, args.reference_images, args.batch_size = min(args.captions, 16), 64, min(args.batch_size, 8)
    device = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    on_gpu = torch.device(device).type == "cuda"
    if on_gpu:
        torch.backends.cudnn.benchmark = True

    ecfg = EvalConfig(num_captions=args.captions, batch_size=args.batch_size, channels_last=not args.no_channels_last,
                      compile=args.compile, metrics=["fid", "precision_recall", "clip_score"],
                      fid=ExtractorConfig(kind="inception", source="random"),
                      precision_recall=ExtractorConfig(kind="vgg16", source="random"))
    timer = PhaseTimer(device)
    with timer("load"):
        gen = tiny_generator(device) if args.tiny else sd21_base_generator(device, torch.float16)
        prepare_for_speed(gen, ecfg.channels_last, ecfg.compile)
        with torch.device(device):
            judges = Judges(
                fid=build_extractor(ecfg.fid, device), precision_recall=build_extractor(ecfg.precision_recall, device),
                clip=build_clip_judge("tiny:clip" if args.tiny else "ViT-g-14", device,
                                      torch.float16 if on_gpu else torch.float32))
    reference = synthetic_reference(args.reference_images, 2048, 4096, ecfg.pr_k, device, timer)
    captions = coco_like_captions(args.captions)

    with timer("warmup"):  # cudnn autotuning (and compilation) on two batches, outside the measured run
        protocol_metrics(gen, captions[:2 * args.batch_size], judges, reference, ecfg, PhaseTimer(device),
                         progress=False)
    run = PhaseTimer(device)
    synchronize(device)
    start = time.perf_counter()
    metrics = protocol_metrics(gen, captions, judges, reference, ecfg, run, progress=True)
    synchronize(device)
    total = time.perf_counter() - start

    n = len(captions)
    card = device_name(device)
    print(f"\n{n} captions, batch {args.batch_size}, channels_last={ecfg.channels_last}, compile={ecfg.compile}, "
          f"on {card}")
    print(f"{'phase':<48}{'seconds':>10}{'ms/image':>10}")
    for key, label in PHASES:
        s = run.seconds.get(key, 0.0)
        print(f"{label:<48}{s:>10.1f}{1000 * s / n:>10.2f}")
    print(f"{'total (wall, the measured run)':<48}{total:>10.1f}{1000 * total / n:>10.2f}")
    print(f"{'not in the total: load / warm-up / reference radii':<48}"
          f"{timer.seconds['load']:>6.0f} / {timer.seconds['warmup']:.0f} / {timer.seconds['reference_radii']:.1f}")
    if on_gpu:
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    result = {
        "card": card, "captions": n, "batch_size": args.batch_size, "reference_images": args.reference_images,
        "channels_last": ecfg.channels_last, "compile": ecfg.compile, "tiny": args.tiny, "total_s": total,
        "phases_s": run.summary(), "outside_total_s": timer.summary(), "metrics_on_random_weights": metrics,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None,
        "torch": torch.__version__,
    }
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "evaluate_bench.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        print(f"written {path}")


if __name__ == "__main__":
    main()
