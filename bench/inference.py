"""Benchmark: one-step generation, prompt → image tensor, SD2.1-base architecture with random weights.

Baseline: diffusers' StableDiffusionPipeline at 1 step (fp16, tensor output). Ours: sb2's generator eager, and its
GPU fast path (sb2/generation/fast.py: CUDA graph per batch size, channels_last, cuDNN autotuning; optionally
torch.compile), with the full VAE and with TAESD. All timed in the same run on the same card; outputs are checked
against eager fp32 (relative error ‖out − ref‖/‖ref‖ on the image).

    python bench/inference.py [--batches 1 4 16] [--iters 50] [--no-compile]
    python bench/inference.py --batches 1 --tuned [--coordinate-descent] --only "sb2 fast + compile" "sb2 fast + tuned compile"
    python bench/inference.py --tiny      # CPU smoke test of the script (tiny models, eager paths only)
    python bench/inference.py --batches 1 --stages [--tuned]   # where the compiled path's time goes, stage by stage
    python bench/inference.py --batches 1 16 --tuned --only "sb2 fast + tuned compile" \
        "sb2 fast + tuned compile + subpixel transposed" "sb2 fast + tuned compile + subpixel phases"
    python bench/inference.py --batches 1 --stages --tuned --subpixel phases   # the stages with that lever
    python bench/inference.py --batches 1 16 --no-compile --only "sb2 fast (CUDA graph)" \
        "sb2 fast + subpixel transposed" "sb2 fast + subpixel phases"   # the lever under the CUDA graph alone

``--stages`` times the fast path's three stages apart — text encoder, UNet (x̂0), decoder (full VAE and TAESD) —
each compiled and captured in a CUDA graph of its own as the whole is (on CPU: eager, a smoke test), beside the whole.

Prints a table and writes $OUT/inference.json when OUT is set. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sb2.generation.generator import OneStepGenerator  # noqa: E402
from sb2.generation.subpixel import MODES as SUBPIXEL, subpixel_upsamplers  # noqa: E402  (generate.subpixel_upsample)
from sb2.student import decode  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, iters: int, warmup: int = 5) -> dict:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "p10_ms": sorted(times)[len(times) // 10],
            "p90_ms": sorted(times)[(9 * len(times)) // 10]}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float().cpu(), ref.float().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-12))


def build(args, device):
    if args.tiny:
        from sb2.config import load_config
        from sb2.models.loading import load_noise_scheduler, load_text_encoder, load_tiny_vae, load_unet, load_vae

        cfg = load_config("tiny")
        te, tok = load_text_encoder("tiny:teacher")
        return {"unet": load_unet("tiny:student"), "text_encoder": te, "tokenizer": tok,
                "vae": load_vae("tiny:teacher"), "tiny_vae": load_tiny_vae("tiny:tiny_vae"),
                "scheduler": load_noise_scheduler("tiny:teacher"), "cfg": cfg}
    from sb2.models.architectures import sd21_parts

    return sd21_parts(device, torch.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--tuned", action="store_true", help="also the tuned compile (generate.tuned_compile)")
    ap.add_argument("--coordinate-descent", action="store_true",
                    help="the tuned compile with coordinate-descent tuning (generate.coordinate_descent_tuning)")
    ap.add_argument("--only", nargs="+", default=None, help="run only these variants (and the diffusers baseline)")
    ap.add_argument("--stages", action="store_true",
                    help="time the compiled fast path's stages apart (text encoder, UNet, decoders) instead")
    ap.add_argument("--subpixel", choices=SUBPIXEL, default=None,
                    help="with --stages: the UNet's and VAE's upsamplers as sub-pixel convolutions "
                         "(generate.subpixel_upsample)")
    args = ap.parse_args()
    if args.subpixel and not args.stages:
        ap.error("--subpixel is for --stages; the whole path's variants are named "
                 "'sb2 fast + tuned compile + subpixel MODE' (with --tuned) and 'sb2 fast + subpixel MODE'")
    if args.coordinate_descent and not args.tuned:
        ap.error("--coordinate-descent tunes the tuned compile: add --tuned")
    if args.only:
        known = {"sb2 eager", "sb2 eager + TAESD", "sb2 fast (CUDA graph)", "sb2 fast + TAESD", "sb2 fast + compile",
                 "sb2 fast + compile + TAESD", "sb2 fast + tuned compile", "sb2 fast + tuned compile + TAESD",
                 *(f"sb2 fast + tuned compile + subpixel {m}" for m in SUBPIXEL),
                 *(f"sb2 fast + subpixel {m}" for m in SUBPIXEL)}
        if set(args.only) - known:
            ap.error(f"--only: unknown variants {sorted(set(args.only) - known)}; known: {sorted(known)}")
        tuned = sorted(v for v in args.only if "tuned compile" in v)
        if tuned and not args.tuned:  # they would be left out silently
            ap.error(f"--only {tuned}: the tuned variants run with --tuned")
        if args.no_compile and any("compile" in v for v in args.only):
            ap.error("--only names compiled variants, which --no-compile leaves out")
    # Every compiled variant × batch size is one more graph of the same code object (GraphedOneStep._forward): with
    # --tuned and three batch sizes that is 12, over dynamo's default limit of 8, past which it silently runs eager.
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    card = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    half = torch.float16 if device.type == "cuda" else torch.float32
    p = build(args, device)
    for k in ("unet", "text_encoder", "vae", "tiny_vae"):
        p[k] = p[k].to(device).eval().requires_grad_(False)
    ac = p["scheduler"].alphas_cumprod
    fp32 = {k: p[k] for k in ("unet", "text_encoder", "vae", "tiny_vae")}
    f16 = {k: copy.deepcopy(v).to(half) for k, v in fp32.items()}
    tok = p["tokenizer"]
    ref_gen = OneStepGenerator(fp32["unet"], fp32["text_encoder"], tok, fp32["vae"], ac)
    ref_tiny = OneStepGenerator(fp32["unet"], fp32["text_encoder"], tok, fp32["tiny_vae"], ac)
    eager = OneStepGenerator(f16["unet"], f16["text_encoder"], tok, f16["vae"], ac)
    eager_tiny = OneStepGenerator(f16["unet"], f16["text_encoder"], tok, f16["tiny_vae"], ac)

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    sched = DDIMScheduler.from_config(p["scheduler"].config, timestep_spacing="trailing", set_alpha_to_one=True,
                                      clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=f16["vae"], text_encoder=f16["text_encoder"], tokenizer=tok, unet=f16["unet"],
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    rows: list[dict] = []
    results = {"card": card, "torch": torch.__version__, "rows": rows}
    prompts_all = [f"a photo of a cat number {i}, highly detailed" for i in range(max(args.batches))]
    if args.stages:
        results["subpixel"] = args.subpixel
        results["stages"] = time_stages(args, device, eager, eager_tiny, prompts_all)
        print(f"card: {card}, torch {torch.__version__}")
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "inference_stages.json").write_text(json.dumps(results, indent=2))
        return
    for b in args.batches:
        prompts = prompts_all[:b]
        z = eager.noise(list(range(b)))
        with torch.no_grad():
            ref = ref_gen(prompts, noise=z.float())
            ref_t = ref_tiny(prompts, noise=z.float())

        def run_pipe():
            return pipe(prompts, num_inference_steps=1, guidance_scale=0.0, latents=z, output_type="pt").images

        def run_eager(gen=eager):
            with torch.no_grad():
                return decode(gen.decoder, gen.latents(gen.encode(prompts), z))

        variants = [("diffusers pipeline", run_pipe, ref, True), ("sb2 eager", run_eager, ref, False),
                    ("sb2 eager + TAESD", lambda: run_eager(eager_tiny), ref_t, False)]
        if device.type == "cuda":
            from sb2.generation.fast import GraphedOneStep

            fast = GraphedOneStep(eager)
            fast_t = GraphedOneStep(eager_tiny)
            variants += [("sb2 fast (CUDA graph)", lambda: fast.run(fast.tokenize(prompts), z), ref, False),
                         ("sb2 fast + TAESD", lambda: fast_t.run(fast_t.tokenize(prompts), z), ref_t, False)]
            for mode in SUBPIXEL:  # the CUDA graph without compile; built only if asked for
                name = f"sb2 fast + subpixel {mode}"
                if args.only and name in args.only:
                    fsp = GraphedOneStep(subpixel_gen(copy_gen(eager), mode))
                    variants.append((name, lambda fsp=fsp: fsp.run(fsp.tokenize(prompts), z), ref, False))
            if not args.no_compile:
                fc = GraphedOneStep(copy_gen(eager), compile=True)
                fct = GraphedOneStep(copy_gen(eager_tiny), compile=True)
                variants += [("sb2 fast + compile", lambda: fc.run(fc.tokenize(prompts), z), ref, False),
                             ("sb2 fast + compile + TAESD", lambda: fct.run(fct.tokenize(prompts), z), ref_t, False)]
                if args.tuned:
                    cd = args.coordinate_descent
                    ft = GraphedOneStep(copy_gen(eager), compile=True, tuned=True, coordinate_descent=cd)
                    ftt = GraphedOneStep(copy_gen(eager_tiny), compile=True, tuned=True, coordinate_descent=cd)
                    variants += [("sb2 fast + tuned compile", lambda: ft.run(ft.tokenize(prompts), z), ref, False),
                                 ("sb2 fast + tuned compile + TAESD", lambda: ftt.run(ftt.tokenize(prompts), z), ref_t,
                                  False)]
                    for mode in SUBPIXEL:  # built only if asked for: each is one more compile of the whole path
                        name = f"sb2 fast + tuned compile + subpixel {mode}"
                        if args.only and name not in args.only:
                            continue
                        fs = GraphedOneStep(subpixel_gen(copy_gen(eager), mode), compile=True, tuned=True,
                                            coordinate_descent=cd)
                        variants.append((name, lambda fs=fs: fs.run(fs.tokenize(prompts), z), ref, False))
        if args.only:  # the baseline always runs: the ratios are against it
            variants = [v for v in variants if v[0] == "diffusers pipeline" or v[0] in args.only]
        base_ms = None
        for name, fn, reference, is_01 in variants:
            try:
                t0 = time.perf_counter()
                out = fn()
                first_s = time.perf_counter() - t0
                img = out.float() * 2 - 1 if is_01 else out.float()  # pipeline returns [0, 1]
                err = rel_err(img.clamp(-1, 1), reference.clamp(-1, 1))
                stats = timed(fn, device, args.iters if b == 1 else max(10, args.iters // 2))
            except Exception as e:  # noqa: BLE001 — a lever that fails is reported, not fatal
                rows.append({"batch": b, "variant": name, "error": f"{type(e).__name__}: {e}"[:300]})
                print(f"batch {b:>2}  {name:<28} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            if base_ms is None:
                base_ms = stats["median_ms"]
            row = {"batch": b, "variant": name, **stats, "images_per_s": b * 1e3 / stats["median_ms"],
                   "speedup_vs_diffusers": base_ms / stats["median_ms"], "rel_err_vs_fp32": err,
                   "first_call_s": first_s}
            rows.append(row)
            print(f"batch {b:>2}  {name:<28} {stats['median_ms']:8.2f} ms  {row['images_per_s']:8.1f} img/s  "
                  f"x{row['speedup_vs_diffusers']:5.2f}  rel.err {err:.2e}  (first call {first_s:.1f}s)", flush=True)
            if os.environ.get("OUT"):
                Path(os.environ["OUT"], "inference.json").write_text(json.dumps(results, indent=2))
    if device.type == "cuda":
        results["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    print(f"card: {card}, torch {torch.__version__}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "inference.json").write_text(json.dumps(results, indent=2))


def graphed(fn, args: tuple, device, compile: bool, inductor: dict | None = None):
    """``fn`` compiled (static shapes; under the ``inductor`` settings, as the tuned fast path compiles) and captured
    in a CUDA graph on these inputs, as the fast path captures the whole; a callable that replays it and returns its
    output buffer. On CPU: ``fn`` on the inputs, eager."""
    if device.type != "cuda":
        return lambda: fn(*args)
    import torch._inductor.config

    f = torch.compile(fn, dynamic=False) if compile else fn
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad(), torch._inductor.config.patch(inductor or {}):
        for _ in range(2):
            f(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = f(*args)

    def replay():
        graph.replay()
        return out

    return replay


def time_stages(args, device, eager: OneStepGenerator, eager_tiny: OneStepGenerator, prompts_all) -> list[dict]:
    """Median time of each stage of the compiled fast path alone (text encoder, UNet to x̂0, full VAE decoder, TAESD
    decoder) and of the whole, per batch size: the stages' sum against the whole shows what crossing the stage
    boundaries costs; the largest stage is where a lever pays."""
    from sb2.student import student_x0

    rows = []
    compile = device.type == "cuda" and not args.no_compile
    for b in args.batches:
        if device.type == "cuda":
            from sb2.generation.fast import GraphedOneStep

            fast = GraphedOneStep(subpixel_gen(copy_gen(eager), args.subpixel), compile=compile,
                                  tuned=args.tuned)  # channels_last, fusions
            fast_t = GraphedOneStep(subpixel_gen(copy_gen(eager_tiny), args.subpixel), compile=compile,
                                    tuned=args.tuned)
            gen, tiny = fast.gen, fast_t.gen
        else:
            fast = fast_t = None
            gen, tiny = subpixel_gen(copy_gen(eager), args.subpixel), subpixel_gen(copy_gen(eager_tiny), args.subpixel)
        ids = (fast.tokenize(prompts_all[:b]) if fast else gen.tokenizer(
            prompts_all[:b], padding="max_length", max_length=gen.tokenizer.model_max_length, truncation=True,
            return_tensors="pt").input_ids).to(device)
        z = gen.noise(list(range(b))).to(device, gen.dtype)
        if device.type == "cuda":
            z = z.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            emb = gen.text_encoder(ids)[0]
            x0 = student_x0(gen.unet, z, emb, gen.alphas_cumprod.to(device), gen.timestep, gen.prediction_type)
        ac = gen.alphas_cumprod.to(device)
        stages = {
            "text encoder": (lambda i: gen.text_encoder(i)[0], (ids,)),
            "UNet (x0)": (lambda zz, e: student_x0(gen.unet, zz, e, ac, gen.timestep, gen.prediction_type), (z, emb)),
            "VAE decoder": (lambda x: decode(gen.decoder, x.to(gen.decoder.dtype)), (x0,)),
            "TAESD decoder": (lambda x: decode(tiny.decoder, x.to(tiny.decoder.dtype)), (x0,)),
        }
        iters = args.iters if b == 1 else max(10, args.iters // 2)
        for name, (fn, inputs) in stages.items():
            t0 = time.perf_counter()
            run = graphed(fn, inputs, device, compile, fast.inductor if fast is not None and fast.tuned else None)
            first = time.perf_counter() - t0
            st = timed(run, device, iters)
            rows.append({"batch": b, "stage": name, **st, "first_call_s": first})
            print(f"batch {b:>2}  {name:<16} {st['median_ms']:8.3f} ms  (first call {first:.1f}s)", flush=True)
        for name, whole in (("whole, VAE", fast), ("whole, TAESD", fast_t)):
            if whole is None:
                continue
            st = timed(lambda w=whole: w.run(w.tokenize(prompts_all[:b]), z), device, iters)
            rows.append({"batch": b, "stage": name, **st})
            print(f"batch {b:>2}  {name:<16} {st['median_ms']:8.3f} ms", flush=True)
    return rows


def subpixel_gen(gen: OneStepGenerator, mode: str | None) -> OneStepGenerator:
    """``gen`` with its UNet's and decoder's upsamplers as sub-pixel convolutions (``mode``), in place; as it is
    without a mode."""
    if mode:
        if subpixel_upsamplers(gen.unet, mode) == 0:
            raise ValueError("the UNet has no upsampler to replace")
        subpixel_upsamplers(gen.decoder, mode)  # none in TAESD
    return gen


def copy_gen(gen: OneStepGenerator) -> OneStepGenerator:
    """A generator of its own (the fast path changes memory formats in place), sharing nothing with ``gen``."""
    return OneStepGenerator(copy.deepcopy(gen.unet), gen.text_encoder, gen.tokenizer, copy.deepcopy(gen.decoder),
                            gen.alphas_cumprod, gen.timestep, gen.prediction_type)


if __name__ == "__main__":
    main()
