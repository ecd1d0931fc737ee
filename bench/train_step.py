"""Benchmark: one VSD training iteration (a student update and a LoRA-teacher update), SD2.1-base architecture with
random weights, batch 16, on one GPU; the naive step is timed in the same run on the same card.

naive  = student fp32 + bf16 autocast, gradient checkpointing, frozen teacher kept in fp32, text encoder run every
         step, teacher cond / uncond / LoRA as three separate calls, unfused AdamW.
ours   = the library's step (sb2/train/steps.py: student_step, lora_teacher_loss) with its switches: frozen weights
         in bf16, cond+uncond in one call, fused AdamW, precomputed text embeddings, then checkpointing off,
         channels_last, torch.compile — each lever added and measured in turn.
Numerical check: the first step of each variant starts from the same weights and random draws as the naive one;
the VSD and LoRA-teacher losses and the student and LoRA gradients are compared (relative error).

    python bench/train_step.py [--batch 16] [--steps 12] [--scheme full|lora|both] [--no-compile]
    python bench/train_step.py --tiny     # CPU smoke test with tiny models
    python bench/train_step.py --scheme full --quick --no-compile --profile   # + where the best eager step's time goes
    python bench/train_step.py --scheme full --only "CUDA graphs" "torch.compile, per block"   # graphs vs compile
Prints a table; writes $OUT/train_step.json when OUT is set. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sb2.config import load_config  # noqa: E402
from sb2.distill.vsd import add_noise, guided, sample_timesteps, vsd_loss, vsd_weight  # noqa: E402
from sb2.models.lora import add_lora  # noqa: E402
from sb2.distill.clip_loss import clamped_clip_loss, clip_preprocess, scheduled_weight  # noqa: E402
from sb2.student import decode, encode_prompts, student_x0  # noqa: E402
from sb2.distill.reward import ClipReward  # noqa: E402
from sb2.train.steps import (Models, RewardTerm, apply_speed_switches, lora_teacher_loss, set_checkpointing,  # noqa: E402
                             student_step)

PROMPTS = [f"a photo of subject {i} in a scene, highly detailed, {i % 7} lights" for i in range(64)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def base_models(args, device):
    """fp32 masters: student init, teacher, text encoder (+ TAESD and a ViT-B/32 CLIP for the lora scheme)."""
    if args.tiny:
        from sb2.models.loading import load_clip, load_teacher, load_tiny_vae, load_unet

        t = load_teacher(load_config("tiny").models)
        return {"student": load_unet("tiny:student"), "teacher": t.unet, "text_encoder": t.text_encoder,
                "tokenizer": t.tokenizer, "vae": t.vae, "scheduler": t.scheduler,
                "tiny_vae": load_tiny_vae("tiny:tiny_vae"), "clip": load_clip("tiny:clip")}
    import open_clip

    from sb2.models.architectures import sd21_parts, sd21_unet
    from sb2.models.loading import ClipScorer

    torch.manual_seed(0)
    p = sd21_parts(device, torch.float32)  # built on the GPU (fast), kept on the CPU: peaks count the variant only
    with torch.device(device):
        student = sd21_unet().cpu()
        clip_model = open_clip.create_model("ViT-B-32").cpu()  # the architecture; weights random (no download)
    for k in ("unet", "text_encoder", "vae", "tiny_vae"):
        p[k] = p[k].cpu()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    clip = ClipScorer(clip_model.eval().requires_grad_(False), tokenizer, 224,
                      (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    return {"student": student, "teacher": p["unet"], "text_encoder": p["text_encoder"], "tokenizer": p["tokenizer"],
            "vae": p["vae"], "scheduler": p["scheduler"], "tiny_vae": p["tiny_vae"], "clip": clip}


def assemble(base, cfg, scheme, device, frozen_dtype):
    """A Models of the library from the masters: the student fp32 and trainable, the teacher (+ LoRA) frozen."""
    student = copy.deepcopy(base["student"]).to(device).float()
    teacher = copy.deepcopy(base["teacher"]).to(device, frozen_dtype).requires_grad_(False)
    torch.manual_seed(1)
    lt = cfg.lora_teacher
    lora = add_lora(teacher, lt.rank, lt.alpha, lt.target_modules)
    for p in lora:
        p.data = p.data.float()
    if scheme == "full":
        student.requires_grad_(True)
        sparams = list(student.parameters())
    else:
        torch.manual_seed(2)
        sl = cfg.student_lora
        sparams = add_lora(student, sl.rank, sl.alpha, sl.target_modules)
    set_checkpointing(student, cfg)
    student.train()
    te = copy.deepcopy(base["text_encoder"]).to(device, frozen_dtype)
    m = Models(student, sparams, teacher, lora, te.to(device), base["tokenizer"], None,
               base["scheduler"].alphas_cumprod.to(device), 1000)
    if scheme == "lora":
        m.tiny_vae = copy.deepcopy(base["tiny_vae"]).to(device, frozen_dtype)
        clip = copy.copy(base["clip"])
        clip.model = copy.deepcopy(base["clip"].model).to(device, frozen_dtype).requires_grad_(False)
        m.clip = clip
        m.rewards.append(RewardTerm("clip", ClipReward(clip)))  # the clamped CLIP loss, as build_models adds it
    return m


def naive_iteration(m, cfg, prompts, null_prompt, opt_s, opt_l, autocast, device):
    """The straightforward step: text encoder every step, three teacher calls, no batching."""
    with torch.no_grad(), autocast():
        emb = encode_prompts(m.text_encoder, m.tokenizer, prompts, device)
        null = encode_prompts(m.text_encoder, m.tokenizer, [null_prompt] * len(prompts), device)
    b = len(prompts)
    z = torch.randn((b, *m.latent_shape), device=device)
    with autocast():
        x0 = student_x0(m.student, z, emb, m.alphas_cumprod)
    t = sample_timesteps(b, 1000, cfg.vsd.t_min, cfg.vsd.t_max, device=device)
    noise = torch.randn_like(x0, dtype=torch.float32)
    x_t = add_noise(x0.detach().float(), noise, m.alphas_cumprod, t)
    with torch.no_grad(), autocast():
        m.teacher_unet.disable_adapters()
        eps_c = m.teacher_unet(x_t, t, encoder_hidden_states=emb).sample.float()
        eps_u = m.teacher_unet(x_t, t, encoder_hidden_states=null).sample.float()
        m.teacher_unet.enable_adapters()
        eps_l = m.teacher_unet(x_t, t, encoder_hidden_states=emb).sample.float()
    loss, _ = vsd_loss(x0, guided(eps_u, eps_c, cfg.vsd.guidance_scale), eps_l,
                       vsd_weight(m.alphas_cumprod, t), cfg.vsd.reduction)
    if m.clip is not None:  # lora scheme: + clamped CLIP through TAESD, as the library computes it
        cl = cfg.clip_loss
        with autocast():
            images = decode(m.tiny_vae, x0.to(m.tiny_vae.dtype))
            img = m.clip.encode_image(clip_preprocess(images, m.clip.image_size, m.clip.mean, m.clip.std)
                                      .to(next(m.clip.model.parameters()).dtype))
            with torch.no_grad():
                txt = m.clip.encode_text(prompts, device)
        loss = loss + scheduled_weight(0, cfg.train.steps, cl.weight, cl.end_weight, cl.schedule) * \
            clamped_clip_loss(img, txt, cl.tau, cl.clamp)
    return loss, x0.detach(), emb, null[:1]


def lora_update_naive(m, cfg, x0, emb, null, autocast):
    return lora_teacher_loss(m, cfg, x0, emb, null, autocast)


# First match wins: cuDNN's attention and implicit-GEMM convolutions carry "sm90"/"gemm" in their names too.
KERNEL_KINDS = [("attention", ("flash", "fmha", "sdpa", "attention")),
                ("layout conversion (NCHW <-> NHWC)", ("nchwtonhwc", "nhwctonchw")),
                ("convolution", ("implicit_gemm", "fprop", "dgrad", "wgrad", "conv", "winograd")),
                ("matmul (GEMM)", ("gemm", "cutlass", "nvjet", "cublas", "xmma")),
                # torch._foreach_copy_: CUDA graph trees copying a block's inputs into the graph's own buffers
                ("list copies (_foreach_copy_: CUDA-graph inputs)", ("copyfunctor",)),
                ("optimizer and gradient clipping", ("adam", "multi_tensor", "lpnorm", "normtwo")),
                ("normalization", ("layer_norm", "group_norm", "layernorm", "groupnorm", "rowwisemoments")),
                ("triton (fused by compile)", ("triton",)),
                ("elementwise / copies / other", ())]


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k in low for k in keys):
            return kind
    return KERNEL_KINDS[-1][0]


def kernel_ms_by_kind(events, n: int) -> dict[str, float]:
    """Kernel time per step (ms) by kind from a profile's ``key_averages()`` over ``n`` steps. GPU-side user
    annotations (``Optimizer.step#AdamW.step``: the span of the optimizer's kernels) carry device time too; they are
    not kernels and would count that time twice."""

    def dev_us(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0

    kinds: dict[str, float] = {}
    for e in events:
        if getattr(e, "is_user_annotation", False):
            continue
        if dev_us(e) > 0 and getattr(e, "device_type", None) is not None and "CUDA" in str(e.device_type):
            kinds[kernel_kind(e.key)] = kinds.get(kernel_kind(e.key), 0.0) + dev_us(e) / 1e3 / n
    return kinds


def profile_steps(iteration, first: int, n: int, device, step_ms: float, path: Path | None) -> dict:
    """Where the time of ``n`` steps goes on the GPU: kernel time per step by kind and the share of the (unprofiled)
    step it fills — a GPU busy far less than the step waits on the host (Python, launches, syncs)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(first, first + n):
            iteration(i)
        sync(device)
    events = prof.key_averages()

    kinds = kernel_ms_by_kind(events, n)
    total = sum(kinds.values())
    out = {"kernel_ms_per_step": total, "step_ms": step_ms, "gpu_busy": total / step_ms,
           "by_kind_ms": dict(sorted(kinds.items(), key=lambda kv: -kv[1]))}
    if path is not None:
        sort = "self_cuda_time_total"
        try:
            table = events.table(sort_by=sort, row_limit=40)
        except Exception:  # noqa: BLE001 — newer torch names it self_device_time_total
            table = events.table(sort_by="self_device_time_total", row_limit=40)
        path.write_text(json.dumps(out, indent=2) + "\n\n" + table)
    return out


def release_cuda_graphs() -> None:
    """Forget the compiled blocks and the CUDA graph trees of a ``train.cuda_graphs`` variant: torch keeps the
    trees' memory pools (and the graphs' outputs in them) until reset."""
    import torch._dynamo
    from torch._inductor.cudagraph_trees import reset_cudagraph_trees

    torch._dynamo.reset()
    reset_cudagraph_trees()
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def _setup(base, cfg, scheme, device, args, naive: bool, precompute: bool):
    """The models, optimizers and one training iteration of a variant. The iteration reads ``state["cfg"]``, so
    switches that act per step (``vsd.shared_lora_pass``, the student's checkpointing) can change between steps."""
    torch.cuda.empty_cache() if device.type == "cuda" else None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    use_cuda = device.type == "cuda"
    frozen = torch.float32 if naive or not use_cuda else torch.bfloat16
    m = assemble(base, cfg, scheme, device, frozen)
    if not naive:
        apply_speed_switches(m, cfg, device)
    fused = use_cuda and not naive
    opt_s = torch.optim.AdamW(m.student_params, lr=1e-6, fused=fused)
    opt_l = torch.optim.AdamW(m.lora_params, lr=1e-3, fused=fused)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_cuda else nullcontext
    bs = args.batch
    cache = {}
    if precompute:  # what the prompt-embedding cache gives the loop: no text encoder in the step
        with torch.no_grad():
            for i in range(0, len(PROMPTS), bs):
                cache[i // bs] = encode_prompts(m.text_encoder, m.tokenizer, PROMPTS[i:i + bs], device)
            null = encode_prompts(m.text_encoder, m.tokenizer, [""], device)
    state = {"cfg": cfg, "shared_steps": 0}

    def iteration(i, record=False):
        cfg = state["cfg"]
        prompts = PROMPTS[(i * bs) % len(PROMPTS):][:bs]
        if len(prompts) < bs:
            prompts = PROMPTS[:bs]
        shared = None
        if naive:
            loss, x0, emb, nul = naive_iteration(m, cfg, prompts, "", opt_s, opt_l, autocast, device)
        else:
            emb = cache[((i * bs) % len(PROMPTS)) // bs] if precompute else \
                encode_prompts(m.text_encoder, m.tokenizer, prompts, device)
            nul = null if precompute else encode_prompts(m.text_encoder, m.tokenizer, [""], device)
            loss, x0, _, shared = student_step(m, cfg, emb, nul, prompts, i, autocast)
        if shared is not None:  # vsd.shared_lora_pass: the LoRA teacher's update from the VSD pass, as the loop does
            shared.backward()
            state["shared_steps"] += 1
        loss.backward()
        out = {}
        if record:
            out["loss_vsd"] = loss.item()
            out["grad_student"] = torch.cat([p.grad.flatten().float() for p in m.student_params if p.grad is not None])
        torch.nn.utils.clip_grad_norm_(m.student_params, 1.0)
        opt_s.step()
        opt_s.zero_grad(set_to_none=True)
        ll = shared if shared is not None else lora_teacher_loss(m, cfg, x0, emb, nul, autocast)
        if shared is None:
            ll.backward()
        if record:
            out["loss_lora"] = ll.item()
            out["grad_lora"] = torch.cat([p.grad.flatten().float() for p in m.lora_params])
        torch.nn.utils.clip_grad_norm_(m.lora_params, 1.0)
        opt_l.step()
        opt_l.zero_grad(set_to_none=True)
        return out

    return m, state, iteration


def _timed_step(iteration, i, device) -> tuple[float, float]:
    """One iteration's wall time (s) and the peak memory it reached (GiB; 0 on the CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    iteration(i)
    sync(device)
    dt = time.perf_counter() - t0
    return dt, (torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else 0.0)


def run_variant(name, base, cfg, scheme, device, args, naive: bool, precompute: bool, ref=None,
                profile: bool = False):
    m, state, iteration = _setup(base, cfg, scheme, device, args, naive, precompute)
    bs = args.batch
    torch.manual_seed(123)
    t0 = time.perf_counter()
    first = iteration(0, record=True)
    sync(device)
    first_s = time.perf_counter() - t0
    # to the CPU at once: the full student's gradient is 3.2 GiB that the timed steps' peak must not count
    first = {k: v.cpu() if torch.is_tensor(v) else v for k, v in first.items()}
    check = {}
    if ref is not None:
        # the shared pass trains the LoRA teacher at the VSD estimate's t and noise, not at the naive step's own
        # draws: its LoRA loss and gradient are not comparable, the student's are
        lora = not cfg.vsd.shared_lora_pass
        for k in ("grad_student", "grad_lora")[:2 if lora else 1]:
            check[f"rel_err_{k}"] = float((first[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-30))
        for k in ("loss_vsd", "loss_lora")[:2 if lora else 1]:
            check[f"rel_err_{k}"] = abs(first[k] - ref[k]) / max(abs(ref[k]), 1e-30)
    for i in range(1, 3):
        iteration(i)
    sync(device)
    times = []
    for i in range(3, 3 + args.steps):
        t0 = time.perf_counter()
        iteration(i)
        sync(device)
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    row = {"variant": name, "scheme": scheme, "batch": bs, "step_ms": ms, "samples_per_s": bs * 1e3 / ms,
           "first_step_s": first_s, **check}
    if profile:
        slug = "".join(c if c.isalnum() else "_" for c in name.strip(" +")).strip("_")[:40]
        path = Path(os.environ["OUT"], f"profile_{scheme}_{slug}.txt") if os.environ.get("OUT") else None
        row["profile"] = profile_steps(iteration, 3 + args.steps, 2, device, ms, path)
        print(f"     profile: {row['profile']['kernel_ms_per_step']:.1f} ms of kernels a step "
              f"({row['profile']['gpu_busy']:.0%} of the step): " + ", ".join(
                  f"{k} {v:.1f}" for k, v in row["profile"]["by_kind_ms"].items()), flush=True)
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    keep = first if ref is None else None
    del m, state, iteration
    return row, keep


def run_interleaved(variants, base, scheme, device, args) -> list[dict]:
    """Variants that differ only in per-step switches (same models, same compiled graphs), timed in turns — A B C,
    B C A, C A B, … — so that a drift of the card's speed during the run (seen on the lent H100s: the same variant
    10–15% apart within one run) falls on all of them alike. Each gets ``args.steps`` timed steps after two warm-ups
    of its own; peak memory is the highest of its own steps. No numerical check here (the rows measured alone carry
    it)."""
    names = [n for n, _ in variants]
    m, state, iteration = _setup(base, variants[0][1], scheme, device, args, False, True)

    def switch(cfg):
        state["cfg"] = cfg
        m.student.disable_gradient_checkpointing()
        set_checkpointing(m.student, cfg)

    torch.manual_seed(123)
    i, first = 0, {}
    for name, cfg in variants:
        switch(cfg)
        t0 = time.perf_counter()
        for _ in range(2):
            iteration(i)
            i += 1
        sync(device)
        first[name] = time.perf_counter() - t0
    times = {n: [] for n in names}
    peaks = {n: 0.0 for n in names}
    shared = {n: 0 for n in names}  # what each variant's steps ran: steps with the shared pass, checkpointed blocks
    checkpointed = {}
    for turn in range(args.steps):
        k = turn % len(variants)  # the order rotates: no variant always follows the same one
        for name, cfg in variants[k:] + variants[:k]:
            switch(cfg)
            checkpointed[name] = sorted({"mid_block" if n.startswith("mid_block") else ".".join(n.split(".")[:2])
                                         for n, mod in m.student.named_modules()
                                         if getattr(mod, "gradient_checkpointing", False)})
            before = state["shared_steps"]
            dt, peak = _timed_step(iteration, i, device)
            shared[name] += state["shared_steps"] - before
            i += 1
            times[name].append(dt)
            peaks[name] = max(peaks[name], peak)
    bs = args.batch
    rows = []
    for name in names:
        ms = statistics.median(times[name]) * 1e3
        rows.append({"variant": name, "scheme": scheme, "batch": bs, "step_ms": ms, "samples_per_s": bs * 1e3 / ms,
                     "interleaved": True, "warmup_s": first[name], "step_ms_all": [t * 1e3 for t in times[name]],
                     "steps_with_shared_pass": shared[name], "checkpointed_blocks": checkpointed[name],
                     **({"peak_gib": peaks[name]} if device.type == "cuda" else {})})
    del m, state, iteration
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--scheme", choices=["full", "lora", "both"], default="both")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="naive, the best eager variant, the shared pass, the compiled ones and the checkpoint-block "
                         "variants only")
    ap.add_argument("--checkpoint-blocks", nargs="*", default=None,
                    help="variants with the shared LoRA-teacher pass and train.checkpoint_blocks, each a comma-joined "
                         "list of student blocks (default: up_blocks.3 and up_blocks.3,down_blocks.0, the 64x64 "
                         "latent's blocks; up_blocks.1 with --tiny)")
    ap.add_argument("--only", nargs="*", default=None,
                    help="after naive, only the variants whose names contain these strings, in this order (a "
                         "string given twice measures its variant twice; any variant, with --quick or without)")
    ap.add_argument("--interleave", nargs="*", default=None,
                    help="time these variants (name substrings; they may differ only in the shared pass and "
                         "checkpointing) in turns on one set of models, after naive alone: robust to the card's drift")
    ap.add_argument("--profile", action="store_true",
                    help="profile two steps of every non-naive variant: kernel time by kind, GPU busy share")
    args = ap.parse_args()
    if args.checkpoint_blocks is None:
        args.checkpoint_blocks = ["up_blocks.1"] if args.tiny else ["up_blocks.3", "up_blocks.3,down_blocks.0"]
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    card = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    base = base_models(args, device)
    rows: list[dict] = []
    for scheme in (["full", "lora"] if args.scheme == "both" else [args.scheme]):
        prof = "tiny" if args.tiny else "sd21"
        off = dict(gradient_checkpointing=True, channels_last=False)
        levers = [
            ("naive", dict(off), {}, True, False),
            ("ours: bf16 frozen, batched CFG, fused AdamW, cached text", dict(off), {"vsd.single_teacher_call": "false"},
             False, True),
            ("  + teacher and LoRA teacher in one call", dict(off), {"vsd.single_teacher_call": "true"}, False, True),
            ("  + no gradient checkpointing", dict(off, gradient_checkpointing=False), {}, False, True),
            ("  + channels_last", dict(gradient_checkpointing=False, channels_last=True), {}, False, True),
            ("  + frozen passes in bf16 without autocast (no channels_last)",
             dict(off, gradient_checkpointing=False, frozen_autocast=False), {}, False, True),
        ]
        shared = {"vsd.shared_lora_pass": "true"}
        levers.append(("  + shared LoRA-teacher pass (no channels_last)", dict(off, gradient_checkpointing=False),
                       shared, False, True))
        fastest = dict(off, gradient_checkpointing=False)
        if not args.no_compile and device.type == "cuda":
            fastest = dict(gradient_checkpointing=False, channels_last=False, compile=True)
            levers += [("  + torch.compile, per block (no channels_last)", fastest, {}, False, True),
                       ("  + torch.compile + shared LoRA-teacher pass", fastest, shared, False, True),
                       ("  + torch.compile + CUDA graphs per block", dict(fastest, cuda_graphs=True), {}, False, True),
                       ("  + torch.compile regions + CUDA graphs",
                        dict(fastest, compile_mode="regions", cuda_graphs=True), {}, False, True),
                       ("  + torch.compile regions + CUDA graphs + channels_last",
                        dict(fastest, compile_mode="regions", cuda_graphs=True, channels_last=True), {}, False, True)]
        for blocks in args.checkpoint_blocks:  # selective checkpointing, to bring the shared pass's peak down
            levers.append((f"  + checkpoint {blocks} (shared pass{', compiled' if fastest.get('compile') else ''})",
                           dict(fastest, checkpoint_blocks=f"[{blocks}]"), shared, False, True))
        every = list(levers)
        if args.quick or (scheme == "lora" and not args.tiny):
            # naive, the best eager variant, the shared pass and the compiled ones (the lever study itself is on
            # the full scheme; the frozen-autocast lever was measured slower and is left out; CUDA graphs compile
            # for minutes more: asked for by --only)
            levers = [levers[0], levers[3]] + [v for v in levers[6:] if "CUDA graphs" not in v[0]]
        if args.only:  # naive first (the baseline and the numerical reference), then the named ones in the given order
            levers = every  # any variant, --quick or not
            picked = [[v for v in levers if o in v[0]] for o in args.only]
            missing = [o for o, p in zip(args.only, picked, strict=True) if not p]
            if missing:
                ap.error(f"--only {missing}: no such variant in {[v[0].strip() for v in levers]}")
            levers = [levers[0]] + [p[0] for p in picked]

        def config(train_kw, other):
            sets = [f"train.{k}={str(v).lower()}" for k, v in train_kw.items()] + [f"{k}={v}" for k, v in other.items()]
            return load_config(prof, sets + [f"train.batch_size={args.batch}"])

        turns = []
        if args.interleave:  # these are timed in turns on one set of models, after naive is timed alone
            picked = [[v for v in levers[1:] if o in v[0]] for o in args.interleave]
            missing = [o for o, p in zip(args.interleave, picked, strict=True) if not p]
            if missing:
                ap.error(f"--interleave {missing}: no such variant in {[v[0].strip() for v in levers[1:]]}")
            turns = [p[0] for p in picked]

            def model_level(t):  # the resolved config without the switches a turn may change
                d = config(t[1], t[2]).model_dump()
                d["train"].pop("gradient_checkpointing"), d["train"].pop("checkpoint_blocks")
                d["vsd"].pop("shared_lora_pass")
                return repr(d)

            if len({model_level(t) for t in turns}) > 1:
                ap.error("--interleave: the variants must differ only in the shared pass and checkpointing")
            levers = [levers[0]]
        ref, base_ms = None, None
        for name, train_kw, other, naive, pre in levers:
            cfg = config(train_kw, other)
            failed = None
            try:
                row, keep = run_variant(name, base, cfg, scheme, device, args, naive, pre, ref,
                                        profile=args.profile and not naive)
            except torch.OutOfMemoryError as e:
                failed = f"OOM: {str(e)[:200]}"
            except Exception as e:  # noqa: BLE001 — a lever that fails (a compile mode, say) must not cost the rest
                if naive:
                    raise
                traceback.print_exc()
                failed = f"{type(e).__name__}: {str(e)[:500]}"
            if cfg.train.cuda_graphs:
                try:
                    release_cuda_graphs()  # their memory pools would count in the peaks of the variants after
                except Exception as e:  # noqa: BLE001 — a broken CUDA context fails what follows, not this row
                    traceback.print_exc()
                    failed = failed or f"reset after the variant: {type(e).__name__}: {str(e)[:300]}"
            if failed is not None:
                rows.append({"variant": name, "scheme": scheme, "error": failed})
                print(f"{scheme:<4} {name:<58} failed: {failed[:80]}", flush=True)
                gc.collect()
                torch.cuda.empty_cache() if device.type == "cuda" else None
                continue
            if ref is None:
                ref, base_ms = keep, row["step_ms"]
            row["speedup_vs_naive"] = base_ms / row["step_ms"]
            rows.append(row)
            errs = "  ".join(f"{k[8:]}={v:.1e}" for k, v in row.items() if k.startswith("rel_err"))
            print(f"{scheme:<4} {name:<58} {row['step_ms']:8.1f} ms {row['samples_per_s']:7.1f} samples/s "
                  f"x{row['speedup_vs_naive']:.2f}  peak {row.get('peak_gib', 0):5.1f} GiB  first {row['first_step_s']:.1f}s"
                  f"  {errs}", flush=True)
            if os.environ.get("OUT"):  # after every row: a run cut short keeps what it measured
                Path(os.environ["OUT"], "train_step.json").write_text(json.dumps(
                    {"card": card, "torch": torch.__version__, "args": vars(args), "rows": rows}, indent=2))
        if turns:
            try:
                done = run_interleaved([(t[0], config(t[1], t[2])) for t in turns], base, scheme, device, args)
            except torch.OutOfMemoryError as e:
                done = [{"variant": t[0], "scheme": scheme, "error": f"OOM in turns: {str(e)[:200]}"} for t in turns]
                print(f"{scheme:<4} variants in turns: OOM", flush=True)
            rows += [r for r in done if "error" in r]
            for row in [r for r in done if "error" not in r]:
                row["speedup_vs_naive"] = base_ms / row["step_ms"]
                rows.append(row)
                print(f"{scheme:<4} {row['variant']:<58} {row['step_ms']:8.1f} ms {row['samples_per_s']:7.1f} "
                      f"samples/s x{row['speedup_vs_naive']:.2f}  peak {row.get('peak_gib', 0):5.1f} GiB  "
                      f"(in turns; warm-up {row['warmup_s']:.1f}s)", flush=True)
    print(f"card: {card}, torch {torch.__version__}, batch {args.batch}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "train_step.json").write_text(json.dumps(
            {"card": card, "torch": torch.__version__, "args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
