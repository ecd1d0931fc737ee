"""`sb2 miniworld pretrain`: every pretrained model of the mini-world, trained by our code and saved in its real
format, with a card (``card.json`` + ``CARD.md``) stating how each was trained and how good it is.

Output layout (what ``sb2/profiles/miniworld.yaml`` points at):

    teacher/         StableDiffusionPipeline folder (unet, vae, text_encoder, tokenizer, scheduler): the SD2.1
    turbo/           UNet folder: the one-step SD-Turbo analog (a student init)
    tiny_vae/        AutoencoderTiny folder: the TAESD analog
    clip/            open_clip folder: the CLIP of the clamped CLIP loss; its text tower is teacher/text_encoder
    judges/features  FID / precision-recall feature network;  judges/attributes  alignment judge
    judges/clip      open_clip folder: the CLIP-score judge (another seed and size)
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sb2.miniworld import world


@dataclass
class PretrainConfig:
    seed: int = 0
    train_pairs: int = 120_000
    eval_pairs: int = 2_048  # evaluation captions and their reference images
    batch: int = 512
    vae_width: int = 32
    vae_batch: int = 256  # the VAE is bound by optimizer steps more than by batch size
    vae_steps: int = 30_000  # the time cap binds first
    tiny_vae_steps: int = 2000
    clip: dict = dataclasses.field(default_factory=lambda: {"width": 128, "layers": 4, "vision_width": 128,
                                                            "vision_layers": 4, "embed_dim": 128})
    clip_steps: int = 2500
    judge_clip: dict = dataclasses.field(default_factory=lambda: {"width": 64, "layers": 3, "vision_width": 64,
                                                                  "vision_layers": 3, "embed_dim": 64})
    judge_clip_steps: int = 1500
    judge_steps: int = 2500
    judge_pairs: int = 60_000
    unet_width: int = 64
    teacher_steps: int = 20_000
    teacher_batch: int = 1024
    teacher_lr: float = 4e-4
    turbo_pairs: int = 16_384
    turbo_steps: int = 3000
    turbo_batch: int = 512
    turbo_lr: float = 1e-4
    # The Turbo analog's loss: regression to the teacher's samples, ADD's score-distillation term with the guided
    # teacher (guidance None = the sampling guidance below) and the GAN term (sb2.miniworld.turbo).
    turbo_regression_weight: float = 1.0
    turbo_score_weight: float = 0.0
    turbo_score_guidance: float | None = None
    turbo_adv_weight: float = 0.02
    judge_decoded: int = 16_384  # judge images also shown as VAE reconstructions (a share of each judge batch)
    sample_steps: int = 25
    guidance: float = 4.5
    # Time caps (seconds) per trainer, so that the whole build fits ~8 minutes on one H100 (≈ 60 s more go to
    # rendering, CUDA start-up, encoding, sampling and metrics): a trainer stops at its step count or its cap,
    # whichever comes first, and its learning rate anneals over whichever it is. The first build gave the VAE 50 s and
    # it bounded everything after it (its reconstructions lost small shapes): the VAE and the teacher share the bulk.
    seconds: dict = dataclasses.field(default_factory=lambda: {
        "judge": 14, "clip": 28, "judge_clip": 12, "vae": 150, "tiny_vae": 12, "teacher": 150, "turbo": 30})

    @classmethod
    def quick(cls) -> PretrainConfig:
        """Tiny sizes and step counts for CPU tests: everything is produced, nothing is any good."""
        small = {"width": 32, "layers": 1, "vision_width": 32, "vision_layers": 1, "embed_dim": 32}
        return cls(train_pairs=256, eval_pairs=64, batch=8, vae_batch=8, vae_width=16, vae_steps=2, tiny_vae_steps=2,
                   clip=small, clip_steps=2, judge_clip=small, judge_clip_steps=2, judge_steps=2, unet_width=32,
                   teacher_steps=2, teacher_batch=8, turbo_pairs=16, turbo_steps=2, turbo_batch=8, sample_steps=2,
                   judge_pairs=128, judge_decoded=64, seconds={})


# What ``keep`` can reuse from an earlier run: the folder it lives in, the card entries (each also a folder) it
# carries over, and the models it was trained against, which must then be kept too — a teacher kept beside a new VAE
# or text encoder would no longer match its pipeline, its metrics were measured by the earlier judges, and the
# TinyVAE and the judges learned the earlier VAE's latents and reconstructions.
KEEPABLE = {"vae": "teacher/vae", "tiny_vae": "tiny_vae", "clip": "clip", "judges/clip": "judges/clip",
            "judges": "judges", "teacher": "teacher/unet"}
_CARD_ENTRIES = {"vae": ("teacher/vae",), "tiny_vae": ("tiny_vae",), "clip": ("clip",),
                 "judges/clip": ("judges/clip",), "judges": ("judges/features", "judges/attributes"),
                 "teacher": ("teacher",)}
KEEP_NEEDS = {"tiny_vae": ("vae",), "judges": ("vae",), "teacher": ("vae", "clip", "judges")}
KEPT = " (kept from an earlier run)"


TURBO_SETTINGS = ("steps", "batch", "lr", "regression_weight", "score_weight", "score_guidance", "adv_weight")


def set_turbo(cfg: PretrainConfig, items) -> PretrainConfig:
    """Apply ``NAME=VALUE`` settings of the Turbo analog (``TURBO_SETTINGS``, i.e. ``cfg.turbo_<NAME>``) in place;
    ValueError on an unknown name, a value that is not a number, or a loss with every weight 0."""
    for item in items:
        name, _, value = item.partition("=")
        if name not in TURBO_SETTINGS or not value:
            raise ValueError(f"{item!r}: expected NAME=VALUE with NAME one of {', '.join(TURBO_SETTINGS)}")
        kind = int if name in ("steps", "batch") else float
        try:
            number = kind(value)
        except ValueError:
            raise ValueError(f"{item!r}: {value!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(number):
            raise ValueError(f"{item!r}: must be a finite number")
        positive = kind is int or name == "lr"
        if number < 0 or (positive and number == 0):
            raise ValueError(f"{item!r}: must be {'positive' if positive else '≥ 0'}")
        setattr(cfg, f"turbo_{name}", number)
    if not (cfg.turbo_regression_weight or cfg.turbo_score_weight or cfg.turbo_adv_weight):
        raise ValueError("the Turbo analog's loss would be empty: regression_weight, score_weight and adv_weight "
                         "are all 0")
    return cfg


def check_keep(keep, continue_teacher: bool = False) -> None:
    """Refuse keep sets that would leave the world inconsistent (ValueError), before anything runs."""
    unknown = sorted(set(keep) - set(KEEPABLE))
    if unknown:
        raise ValueError(f"cannot keep {', '.join(unknown)}: keepable are {', '.join(KEEPABLE)}")
    for k in keep:
        lacking = [n for n in KEEP_NEEDS.get(k, ()) if n not in keep]
        if lacking:
            raise ValueError(f"keeping {k} needs keeping {', '.join(lacking)} too: it was trained or measured "
                             f"against them")
    if continue_teacher and "teacher" in keep:
        raise ValueError("--continue-teacher trains the teacher on, --keep teacher keeps it as it is: pick one")


def _render(args) -> np.ndarray:
    seed, split, start, n = args
    return world.render(world.sample_scenes(seed, split, n, start))


def render_pairs(seed: int, split: str, n: int, workers: int = 1):
    """Images (parallel over processes), captions and scenes of scenes 0..n of ``split``."""
    chunks = [(seed, split, a, min(world.BLOCK, n - a)) for a in range(0, n, world.BLOCK)]
    if workers > 1 and len(chunks) > 1:
        with ProcessPoolExecutor(workers) as pool:
            images = np.concatenate(list(pool.map(_render, chunks)))
    else:
        images = np.concatenate([_render(c) for c in chunks])
    scenes = world.sample_scenes(seed, split, n)
    return images, world.captions(scenes), scenes


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def decode(vae, latents_scaled: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    from sb2.miniworld.fitting import autocast

    out = []
    for a in range(0, len(latents_scaled), batch):
        with autocast(latents_scaled.device):
            out.append(_to_uint8(vae.decode(latents_scaled[a : a + batch] / vae.config.scaling_factor).sample))
    return torch.cat(out)


@torch.no_grad()
def fid_vs(features_net, images_nchw: torch.Tensor, reference_nchw: torch.Tensor) -> dict:
    """FID and precision/recall (k = 3) of images against reference images, in the judge's feature space."""
    from sb2.evaluation.fid import MomentAccumulator, frechet_distance
    from sb2.evaluation.precision_recall import precision_recall

    device = next(features_net.parameters()).device
    feats = []
    for x in (images_nchw, reference_nchw):
        feats.append(torch.cat([features_net(x[a : a + 1024].to(device)).float() for a in range(0, len(x), 1024)]))
    moments = []
    for f in feats:
        acc = MomentAccumulator(f.shape[1], f.device)
        acc.update(f)
        moments.append((acc.mean, acc.cov))
    fid = frechet_distance(moments[0][0], moments[0][1], moments[1][0], moments[1][1])
    precision, recall = precision_recall(feats[1], feats[0], 3)
    return {"fid": float(fid), "precision": float(precision), "recall": float(recall)}


def tokenize_all(tokenizer, captions: list[str], device) -> torch.Tensor:
    """Token ids of every caption, tokenizing each distinct caption once (captions repeat: a third are short)."""
    from sb2.miniworld.tokenizer import tokenize

    unique, inverse = np.unique(np.array(captions, dtype=object), return_inverse=True)
    return tokenize(tokenizer, unique.tolist()).to(device)[torch.from_numpy(inverse).to(device)]


def pretrain(out: str | Path, cfg: PretrainConfig | None = None, device: str | None = None, workers: int = 1,
             keep: tuple[str, ...] = (), continue_teacher: bool = False) -> dict:
    """Train every mini-world model into ``out``; returns the card.

    ``keep``: models of an earlier run in ``out`` to reuse instead of retraining (any of ``KEEPABLE``; the card
    keeps their entries) — keeping all of them retrains the Turbo analog alone against the same teacher, judges
    and metrics; ``continue_teacher``: start the teacher from ``out/teacher``'s UNet.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTokenizerFast

    from sb2.miniworld.clip import (
        clip_config,
        retrieval_accuracy,
        save_open_clip_model,
        text_encoder_from_open_clip,
        train_clip,
    )
    from sb2.miniworld.fitting import WorldData
    from sb2.miniworld.judges import (
        alignment,
        attribute_accuracy,
        load_judge,
        save_judge,
        train_attribute_net,
    )
    from sb2.miniworld.teacher import (
        embed,
        pooled_embed,
        sample,
        save_pipeline,
        train_scheduler,
        train_teacher,
    )
    from sb2.miniworld.tokenizer import load_tokenizer, save_tokenizer
    from sb2.miniworld.turbo import STUDENT_T, one_step_x0, train_turbo
    from sb2.miniworld.vae import encode_all, reconstruction_error, save_half, train_tiny_vae, train_vae
    from sb2.models.loading import load_clip

    cfg = cfg or PretrainConfig()
    out = Path(out)
    keep = tuple(sorted(set(keep)))
    check_keep(keep, continue_teacher)
    out.mkdir(parents=True, exist_ok=True)
    earlier = json.loads((out / "card.json").read_text())["models"] if (out / "card.json").is_file() else {}
    missing = [k for k in keep if not (out / KEEPABLE[k]).is_dir()
               or not all((out / m).is_dir() and m in earlier for m in _CARD_ENTRIES[k])]
    if missing:
        raise FileNotFoundError(f"cannot keep {', '.join(missing)}: {out} holds no earlier run's "
                                f"{', '.join(m for k in missing for m in _CARD_ENTRIES[k])} with its card entry")
    t = time.perf_counter()  # rendering forks workers: before anything touches CUDA
    images, captions, scenes = render_pairs(cfg.seed, "train", cfg.train_pairs, workers)
    ev_images, ev_captions, ev_scenes = render_pairs(cfg.seed, "eval", cfg.eval_pairs, workers)
    # The judges learn from scenes of every combination (as Inception was not trained on the generator's data):
    # eval-split scenes of another seed, so never the evaluation scenes themselves.
    jd_images, jd_captions, jd_scenes = render_pairs(cfg.seed + 1, "eval", cfg.judge_pairs, workers)
    render_seconds = time.perf_counter() - t
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    n_rendered = len(images) + len(ev_images) + len(jd_images)
    card: dict = {"world": {"seed": cfg.seed, "train_pairs": cfg.train_pairs, "eval_pairs": cfg.eval_pairs,
                            "judge_pairs": cfg.judge_pairs, "held_out_pairs": [list(p) for p in world.HELD_OUT],
                            "render_seconds": round(render_seconds, 1), "render_workers": workers,
                            "rendered": n_rendered},
                  "config": dataclasses.asdict(cfg), "kept": list(keep),
                  "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "models": {}}
    t_all = time.perf_counter()
    print(f"rendered {n_rendered} pairs in {render_seconds:.1f}s ({workers} processes)", flush=True)

    def record(name: str, how: str, info: dict, **metrics) -> None:
        card["models"][name] = {"how": how, **info, "metrics": metrics}
        print(f"== {name} (at {time.perf_counter() - t_all + render_seconds:.0f}s): {json.dumps(info)} "
              f"{json.dumps(metrics)}", flush=True)
        write_card()  # partial cards survive a killed run

    def write_card() -> None:
        card["total_seconds"] = round(time.perf_counter() - t_all + render_seconds, 1)
        (out / "card.json").write_text(json.dumps(card, indent=2))
        (out / "CARD.md").write_text(card_markdown(card))

    def kept(name: str) -> None:
        how = earlier[name]["how"]
        card["models"][name] = dict(earlier[name], how=how if how.endswith(KEPT) else how + KEPT)
        write_card()

    for k in keep:  # the card carries every kept model from the start: a run killed early still lists them
        for name in _CARD_ENTRIES[k]:
            kept(name)
    data = WorldData(torch.from_numpy(images).to(device), captions, scenes)
    jdata = WorldData(torch.from_numpy(jd_images).to(device), jd_captions, jd_scenes)
    ev = torch.from_numpy(ev_images).to(device)
    ev_nchw = ev.permute(0, 3, 1, 2).contiguous()
    tok_dir = out / "_tokenizer"
    save_tokenizer(tok_dir)
    tokenizer = CLIPTokenizerFast.from_pretrained(str(tok_dir))  # the same ids as the saved slow one, faster
    t = time.perf_counter()
    ids, jd_ids = tokenize_all(tokenizer, captions, device), tokenize_all(tokenizer, jd_captions, device)
    print(f"tokenized in {time.perf_counter() - t:.1f}s", flush=True)

    if "vae" in keep:
        vae = AutoencoderKL.from_pretrained(str(out / "teacher" / "vae")).to(device).eval().requires_grad_(False)
    else:
        vae, info = train_vae(data, cfg.vae_steps, cfg.vae_batch, 1e-3, cfg.seed + 2, device, cfg.vae_width,
                              max_seconds=cfg.seconds.get("vae"))
        save_half(vae, out / "teacher" / "vae")  # now, so that a run killed later still leaves it
        record("teacher/vae", f"AutoencoderKL 64×64 → 4×8×8 (width {cfg.vae_width}), L1 + MSE + L1 of the image "
               f"gradients + L1 of the 4×4-pooled image + 1e-6 KL on posterior samples, batches of {cfg.vae_batch}; "
               f"scaling_factor = 1/std of the latent means = {vae.config.scaling_factor}; error on eval images",
               info, **reconstruction_error(vae, ev_nchw.permute(0, 2, 3, 1)[:1024]))
    # The judges next: they score every later model. They see their images degraded as a decoder would and, for a
    # share, through this VAE, so that they judge decoded images by what they show, not by their blur.
    judges = {}
    if "judges" in keep:
        for name in ("features", "attributes"):
            judges[name] = load_judge(out / "judges" / name).to(device)
    else:
        jd_decoded = decode(vae, encode_all(vae, jdata.images[: cfg.judge_decoded]) * vae.config.scaling_factor)
        jd_decoded = jd_decoded.permute(0, 2, 3, 1).contiguous()
        ev_decoded = decode(vae, encode_all(vae, ev) * vae.config.scaling_factor)
    for name, width, dim, seed in (("features", 24, 256, 101), ("attributes", 32, 256, 102)):
        if "judges" in keep:
            break
        net, info = train_attribute_net(jdata, cfg.judge_steps, cfg.batch, 2e-3, seed, device, width, dim,
                                        cfg.seconds.get("judge"), decoded=jd_decoded)
        save_judge(net, out / "judges" / name)
        judges[name] = net
        record(f"judges/{name}", f"CNN, per-cell shape/color/size + background cross-entropy on {len(jdata)} judge "
               f"scenes (all attribute combinations, not the evaluation scenes), batches of {cfg.batch}, each image "
               f"blurred (σ ≤ 1.2 px), color-shifted and noised at random, 30% of the first {len(jd_decoded)} "
               f"shown as VAE reconstructions; width {width}, {dim}-d penultimate features; accuracy on the "
               f"evaluation scenes, alignment of the real ones and of their VAE reconstructions", info,
               **attribute_accuracy(net, ev, ev_scenes),
               alignment_vae_reconstruction=alignment(net, ev_decoded, ev_scenes))

    clips = {}
    for name, mcfg_kw, steps, seed, cap, d, d_ids in (
            ("clip", cfg.clip, cfg.clip_steps, cfg.seed + 1, cfg.seconds.get("clip"), data, ids),
            ("judges/clip", cfg.judge_clip, cfg.judge_clip_steps, cfg.seed + 103, cfg.seconds.get("judge_clip"),
             jdata, jd_ids)):
        group = min(64, len(ev_captions))
        if name in keep:
            clips[name] = load_clip(str(out / name), device=device).model
            continue
        mcfg = clip_config(**mcfg_kw)
        model, info = train_clip(d, d_ids, mcfg, steps, max(cfg.batch, min(1024, 2 * cfg.batch)), 1e-3, seed,
                                 device, cap)
        save_open_clip_model(model, mcfg, out / name)
        clips[name] = model
        source = ("the training pairs" if d is data
                  else "the judge pairs (eval frames, all combinations, another seed)")
        record(name, f"open_clip CLIP (ViT {mcfg_kw['vision_layers']}×{mcfg_kw['vision_width']}, text "
               f"{mcfg_kw['layers']}×{mcfg_kw['width']}), contrastive on {source} "
               f"(equal captions in a batch are positives), seed {seed}; retrieval top-1 within groups of {group}",
               info, eval=retrieval_accuracy(model.float(), tokenizer, ev, ev_captions, group),
               train=retrieval_accuracy(model.float(), tokenizer, d.images[:len(ev)], d.captions[:len(ev)], group))

    # Every training latent for the TinyVAE and the teacher; when both are kept, only those the Turbo analog's
    # discriminator sees (the first turbo_pairs).
    needed = len(data) if {"tiny_vae", "teacher"} - set(keep) else min(cfg.turbo_pairs, len(data))
    latents = encode_all(vae, data.images[:needed]) * vae.config.scaling_factor
    if "tiny_vae" not in keep:
        tiny, info = train_tiny_vae(vae, data, latents / vae.config.scaling_factor, cfg.tiny_vae_steps, cfg.batch,
                                    1e-3, cfg.seed + 3, device, cfg.vae_width, cfg.seconds.get("tiny_vae"))
        save_half(tiny, out / "tiny_vae")
        record("tiny_vae", "AutoencoderTiny distilled from the VAE: encoder → scaled latents (L1), decoder(scaled "
               "latents) → image (L1 + MSE)", info,
               **reconstruction_error(tiny, ev_nchw.permute(0, 2, 3, 1)[:1024], tiny=True))

    # Converted from the saved folder, so that the teacher's text encoder is exactly clip/'s text tower.
    text_encoder = text_encoder_from_open_clip(load_clip(str(out / "clip")).model.float()).to(device)
    init, before = None, {"steps": 0, "seconds": 0.0}
    if "teacher" in keep:
        unet = UNet2DConditionModel.from_pretrained(str(out / "teacher" / "unet")).float().to(device).eval()
        unet.requires_grad_(False)
    else:
        if continue_teacher and (out / "teacher" / "unet").is_dir():
            init = UNet2DConditionModel.from_pretrained(str(out / "teacher" / "unet"))
            before = {k: earlier.get("teacher", {}).get(k, 0) for k in ("steps", "seconds")}
        null_ids = tokenize_all(tokenizer, [""], device)
        unet, info = train_teacher(latents, ids, null_ids, text_encoder, cfg.teacher_steps, cfg.teacher_batch,
                                   cfg.teacher_lr, cfg.seed + 4, device, cfg.unet_width,
                                   max_seconds=cfg.seconds.get("teacher"), init=init)
        if init is not None:
            info = {"steps": info["steps"] + before["steps"],
                    "seconds": round(info["seconds"] + before["seconds"], 1), "continued_from_steps": before["steps"]}
        save_pipeline(unet, vae, text_encoder, load_tokenizer(tok_dir), out / "teacher")
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 5)
    ev_cond = embed(text_encoder, tokenizer, ev_captions, device)
    uncond = embed(text_encoder, tokenizer, [""], device)
    ev_noise = torch.randn(len(ev_captions), 4, 8, 8, generator=gen).to(device)

    def teacher_at(g: float) -> dict:
        imgs = decode(vae, sample(unet, ev_cond, uncond, ev_noise, cfg.sample_steps, g))
        if g == cfg.guidance:
            _save_grid(imgs[:16], out / "teacher_samples.png")
        return {**fid_vs(judges["features"], imgs, ev_nchw), "alignment": alignment(judges["attributes"], imgs,
                                                                                    ev_scenes)}

    if "teacher" not in keep:
        ev_latents = encode_all(vae, ev) * vae.config.scaling_factor
        metrics = {"vae_reconstruction_floor": {**fid_vs(judges["features"], decode(vae, ev_latents), ev_nchw),
                                                "alignment": alignment(judges["attributes"], decode(vae, ev_latents),
                                                                       ev_scenes)},
                   "real_images_alignment": alignment(judges["attributes"], ev_nchw, ev_scenes)}
        metrics[f"cfg{cfg.guidance}"] = teacher_at(cfg.guidance)  # the other scales once every model is saved
        record("teacher", f"UNet2DConditionModel (width {cfg.unet_width}, SD2-style linear-projection "
               f"attention), ε-prediction on the scaled VAE latent means of the training pairs, SD scaled-linear β "
               f"1000 steps, 10% null text, EMA 0.998, bf16, batches of {cfg.teacher_batch} at lr {cfg.teacher_lr}; "
               f"sampled with DDIM {cfg.sample_steps} steps; FID/precision/recall in judges/features space vs the "
               f"{len(ev)} reference images of the eval captions", info, **metrics)

    # The Turbo analog: distillation targets are the teacher's own 25-step samples for training captions (not made
    # when the regression term is off).
    t = time.perf_counter()
    n = min(cfg.turbo_pairs, len(captions))
    tr_caps = captions[:n]
    tr_cond = embed(text_encoder, tokenizer, tr_caps, device)
    tr_noise = torch.randn(n, 4, 8, 8, generator=gen).to(device)
    targets = (sample(unet, tr_cond, uncond, tr_noise, cfg.sample_steps, cfg.guidance)
               if cfg.turbo_regression_weight else None)
    target_seconds = time.perf_counter() - t
    score_guidance = cfg.guidance if cfg.turbo_score_guidance is None else cfg.turbo_score_guidance
    tr_pooled = torch.cat([pooled_embed(text_encoder, tokenizer, tr_caps[a : a + 4096], device)
                           for a in range(0, n, 4096)])
    alphas_cumprod = train_scheduler().alphas_cumprod.to(device)
    abar = alphas_cumprod[STUDENT_T]
    # The real latents the discriminator sees are those of the same training pairs.
    turbo, info = train_turbo(unet, tr_noise, tr_cond, targets, latents[:n].to(device), tr_pooled, tr_pooled,
                              abar, cfg.turbo_steps, cfg.turbo_batch, cfg.turbo_lr, cfg.seed + 6, device,
                              adv_weight=cfg.turbo_adv_weight, max_seconds=cfg.seconds.get("turbo"),
                              regression_weight=cfg.turbo_regression_weight, score_weight=cfg.turbo_score_weight,
                              uncond=uncond, guidance=score_guidance,
                              alphas_cumprod=alphas_cumprod)
    save_half(turbo, out / "turbo")
    with torch.no_grad():
        imgs = decode(vae, torch.cat([one_step_x0(turbo, ev_noise[a : a + 1024], ev_cond[a : a + 1024], abar)
                                      for a in range(0, len(ev_noise), 1024)]))
    _save_grid(imgs[:16], out / "turbo_samples.png")
    record("turbo", f"teacher UNet fine-tuned to one step at t={STUDENT_T} (ADD): "
           f"{turbo_recipe(cfg, n, target_seconds, score_guidance)}", info,
           **fid_vs(judges["features"], imgs, ev_nchw), alignment=alignment(judges["attributes"], imgs, ev_scenes))

    import shutil

    shutil.rmtree(tok_dir, ignore_errors=True)
    write_card()
    print("every model is saved; the teacher at other guidance scales:", flush=True)
    for g in (2.0, 7.5):  # a kept teacher gets those an earlier run did not live to compute
        if g != cfg.guidance and f"cfg{g}" not in card["models"]["teacher"]["metrics"]:
            card["models"]["teacher"]["metrics"][f"cfg{g}"] = teacher_at(g)
            print(f"== teacher cfg{g}: {json.dumps(card['models']['teacher']['metrics'][f'cfg{g}'])}", flush=True)
            write_card()
    write_card()
    print(f"pretrain done in {card['total_seconds']:.0f}s → {out}", flush=True)
    return card


def turbo_recipe(cfg: PretrainConfig, n: int, target_seconds: float, score_guidance: float) -> str:
    """The card's words for the Turbo analog's loss: only the terms with a weight."""
    from sb2.miniworld.turbo import SCORE_T_RANGE

    terms = []
    if cfg.turbo_regression_weight:
        terms.append(f"{cfg.turbo_regression_weight:g} × MSE to the teacher's {cfg.sample_steps}-step "
                     f"cfg-{cfg.guidance:g} samples of {n} training captions ({target_seconds:.0f}s to make)")
    if cfg.turbo_score_weight:
        lo, hi = SCORE_T_RANGE
        terms.append(f"{cfg.turbo_score_weight:g} × ADD's score distillation (x̂0 noised to s ~ U[{lo}, {hi}), the "
                     f"cfg-{score_guidance:g} teacher's one-step x̂0, weight √ᾱ_s) on {n} training captions")
    if cfg.turbo_adv_weight:
        terms.append(f"{cfg.turbo_adv_weight:g} × hinge GAN with a text-conditioned latent discriminator on real "
                     f"latents")
    return " + ".join(terms) + f", batches of {cfg.turbo_batch} at lr {cfg.turbo_lr:g}"


def _save_grid(images_nchw: torch.Tensor, path: Path, cols: int = 8) -> None:
    from PIL import Image

    x = images_nchw.cpu().permute(0, 2, 3, 1).numpy()
    n = len(x) - len(x) % cols or len(x)
    x = x[:n]
    rows = max(1, n // cols)
    c = min(cols, n)
    grid = x[: rows * c].reshape(rows, c, *x.shape[1:]).transpose(0, 2, 1, 3, 4).reshape(rows * x.shape[1],
                                                                                         c * x.shape[2], 3)
    Image.fromarray(grid).save(path)


def card_markdown(card: dict) -> str:
    lines = ["# The mini-world's pretrained models", "",
             (f"Built by `sb2 miniworld pretrain` on {card['device']} in {card.get('total_seconds', '?')} s "
              + (f"— the last run, which reused {', '.join(card['kept'])} of earlier runs (their entries keep their "
                 f"own times) — " if card.get("kept") else "") +
             f"(world seed {card['world']['seed']}, {card['world']['train_pairs']} training pairs, "
             f"{card['world']['eval_pairs']} evaluation captions; held-out (color, shape) pairs: "
             f"{', '.join(' '.join(p) for p in card['world']['held_out_pairs'])})."), ""]
    for name, m in card["models"].items():
        lines += [f"## {name}", "", f"{m['how']}. Trained {m['steps']} steps in {m['seconds']} s.", "", "```json",
                  json.dumps(m["metrics"], indent=1), "```", ""]
    return "\n".join(lines)
