"""One training iteration's pieces: the models a step touches, the student's loss (VSD, plus the clamped CLIP loss
in the lora scheme, any reward terms, and on some steps the image regularization) and the LoRA teacher's diffusion
loss on detached student samples.

The math lives in :mod:`sb2.distill`; this module only composes it (SwiftBrush's step, paper 3 and 4.2–4.4).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch

from sb2.config import Config
from sb2.distill.clip_loss import scheduled_weight
from sb2.distill.regularization import latent_regression_loss, perceptual_regression_loss, student_input_for_real
from sb2.distill.reward import ClipReward, ModuleReward, RewardScorer, clamped_reward_loss
from sb2.distill.vsd import add_noise, diffusion_loss, dmd_weight, guided, sample_timesteps, vsd_loss, vsd_weight
from sb2.models.loading import load_clip, load_perceptual_net, load_teacher, load_tiny_vae, load_unet
from sb2.models.lora import add_lora
from sb2.student import decode, encode_prompts, latent_shape, student_x0
from sb2.train.paired import RealPair

Scheme = Literal["full", "lora"]
Log = torch.Tensor | float  # a value to log: a 0-dim device tensor until it is logged


@dataclass
class RewardTerm:
    """One reward term of the student's loss: the clamped CLIP loss (``clip_loss``, ``index`` None) or
    ``rewards[index]``; its τ, weight and schedule are read from the config at each step."""

    name: str
    scorer: RewardScorer
    index: int | None = None

    def settings(self, cfg: Config):
        return cfg.clip_loss if self.index is None else cfg.rewards[self.index]


@dataclass
class RegBatch:
    """A regularization batch as the student sees it: its input at the student timestep, the captions' embeddings,
    the latents it is regressed to and, for a perceptual distance, those latents decoded."""

    x_in: torch.Tensor
    emb: torch.Tensor
    target: torch.Tensor
    target_images: torch.Tensor | None = None


@dataclass
class Models:
    """Everything a step touches. ``teacher_unet`` carries the LoRA teacher as a switchable adapter."""

    student: torch.nn.Module
    student_params: list[torch.nn.Parameter]
    teacher_unet: torch.nn.Module
    lora_params: list[torch.nn.Parameter]
    text_encoder: torch.nn.Module
    tokenizer: object
    vae: torch.nn.Module
    alphas_cumprod: torch.Tensor
    num_train_timesteps: int
    tiny_vae: torch.nn.Module | None = None
    clip: object | None = None
    rewards: list[RewardTerm] = field(default_factory=list)
    perceptual_net: torch.nn.Module | None = None
    extras: dict = field(default_factory=dict)
    # The module the LoRA teacher's trained passes run through: its DDP wrapper under data parallelism (gradients
    # all-reduced); None = ``teacher_unet``. Adapters switch on ``teacher_unet`` itself.
    teacher_trainer: torch.nn.Module | None = None

    def __post_init__(self):
        # read once from the plain module: under DDP ``student`` becomes a wrapper without ``.config``
        self.latent_shape = latent_shape(self.student)


def build_student(cfg: Config, scheme: Scheme, device) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """The student UNet in fp32 (its init, ``models.student``) and its trainable parameters: all of them (full), or
    a LoRA adapter's (lora, ``student_lora``)."""
    student = load_unet(cfg.models.student, cfg.models, dtype=torch.float32, device=device)
    if scheme == "full":
        student.requires_grad_(True)
        return student, list(student.parameters())
    if scheme == "lora":
        sl = cfg.student_lora
        return student, add_lora(student, sl.rank, sl.alpha, sl.target_modules, sl.dropout)
    raise ValueError(f"scheme must be 'full' or 'lora', not {scheme!r}")


def build_models(cfg: Config, scheme: Scheme, device, weight_dtype=torch.float32) -> Models:
    """Frozen teacher (+ LoRA teacher adapter), trainable student, and for ``lora`` the TinyVAE and CLIP."""
    teacher = load_teacher(cfg.models, dtype=weight_dtype, device=device)
    lt = cfg.lora_teacher
    lora_params = add_lora(teacher.unet, lt.rank, lt.alpha, lt.target_modules, lt.dropout)
    for p in lora_params:  # trainable weights stay fp32 under mixed precision
        p.data = p.data.float()
    student, student_params = build_student(cfg, scheme, device)
    set_checkpointing(student, cfg)
    student.train()
    m = Models(student, student_params, teacher.unet, lora_params, teacher.text_encoder, teacher.tokenizer,
               teacher.vae, teacher.alphas_cumprod.to(device), teacher.num_train_timesteps)
    rewards_on_tiny = cfg.clip_loss.decoder == "tiny_vae"
    if scheme == "lora" and cfg.clip_loss.enabled:
        if rewards_on_tiny:
            m.tiny_vae = load_tiny_vae(cfg.models.tiny_vae, cfg.models, weight_dtype, device)
        m.clip = load_clip(cfg.models.clip, device=device, dtype=weight_dtype)
        m.rewards.append(RewardTerm("clip", ClipReward(m.clip)))
    m.rewards += build_rewards(cfg, scheme, device, weight_dtype)
    rc = cfg.regularization
    perceptual = rc.enabled and rc.distance == "lpips"
    if perceptual:
        m.perceptual_net = load_perceptual_net(rc.perceptual_net, device)
    if m.tiny_vae is None and ((m.rewards and rewards_on_tiny) or (perceptual and rc.decoder == "tiny_vae")):
        m.tiny_vae = load_tiny_vae(cfg.models.tiny_vae, cfg.models, weight_dtype, device)
    return m


def set_checkpointing(student: torch.nn.Module, cfg: Config) -> None:
    """``train.gradient_checkpointing`` (every block of the student) or ``train.checkpoint_blocks`` (the named ones)."""
    if cfg.train.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    elif cfg.train.checkpoint_blocks:
        checkpoint_blocks(student, cfg.train.checkpoint_blocks)


def checkpoint_blocks(unet: torch.nn.Module, names: list[str]) -> None:
    """Gradient checkpointing of the named top-level blocks only (each of their ResNets and attention blocks
    recomputed in the backward, as diffusers checkpoints them); every other module keeps its activations."""
    known = [f"{kind}.{i}" for kind in ("down_blocks", "up_blocks") for i in range(len(getattr(unet, kind)))]
    known.append("mid_block")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"train.checkpoint_blocks: no block {', '.join(unknown)} in this UNet; its blocks are "
                         f"{', '.join(known)}")
    unet.enable_gradient_checkpointing()
    # a named block and the transformers inside it (diffusers' cross-attention blocks checkpoint their ResNets and
    # leave the attention to the transformer's own switch)
    chosen = {id(mod) for n in names for mod in unet.get_submodule(n).modules()}
    for mod in unet.modules():
        if hasattr(mod, "gradient_checkpointing") and id(mod) not in chosen:
            mod.gradient_checkpointing = False


def build_rewards(cfg: Config, scheme: Scheme, device, weight_dtype=torch.float32) -> list[RewardTerm]:
    """The terms of ``rewards`` that apply to this scheme, each with its scorer loaded (frozen)."""
    from sb2.evaluation.features import import_factory, load_clip_with_checkpoint

    terms = []
    for i, r in enumerate(cfg.rewards):
        if scheme not in r.schemes:
            continue
        if r.kind == "module":
            scorer = ModuleReward(import_factory(r.model)())
        else:
            clip = load_clip_with_checkpoint(r.model or cfg.models.clip, device, r.checkpoint,
                                             cfg.models.local_files_only)
            clip.model.to(weight_dtype)
            scorer = ClipReward(clip)
        terms.append(RewardTerm(r.name, scorer, i))
    return terms


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def apply_speed_switches(m: Models, cfg: Config, device) -> Models:
    """GPU-only switches, measured in bench/train_step.py: NHWC memory format for the UNets' convolutions and
    torch.compile (in place, so adapters still switch on the same module)."""
    if torch.device(device).type != "cuda":
        return m
    if cfg.train.channels_last:
        for mod in (m.student, m.teacher_unet, m.tiny_vae):
            if mod is not None:
                mod.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        for unet in (m.student, m.teacher_unet):
            compile_unet(unet, cfg.train.compile_mode, cuda_graphs=cfg.train.cuda_graphs)
    return m


def compile_unet(unet: torch.nn.Module, mode: str = "blocks", cuda_graphs: bool = False) -> None:
    """torch.compile in place. ``blocks`` compiles every transformer and ResNet block separately: blocks of the same
    class and shape reuse one graph, which keeps compilation to minutes where the whole UNet's forward and backward
    took over four; the code between blocks (time embedding, up/down sampling, skip concatenation) stays eager.
    ``regions``: larger regions of the same kind — each whole ``Transformer2DModel`` (its GroupNorm, input and output
    projections and residual with its transformer blocks) instead of the blocks alone, the ResNet blocks, and the
    up/down samplers — so that less of the UNet runs as eager kernels between compiled graphs.
    ``cuda_graphs``: each compiled region is replayed as a CUDA graph (mode "reduce-overhead"; on CPU tensors
    torch.compile runs it without)."""
    kwargs = {"mode": "reduce-overhead"} if cuda_graphs else {}
    if mode == "full":
        unet.compile(**kwargs)
        return
    import torch._dynamo

    # One graph per (block class, channel widths, resolution, batch, grad mode, adapter state): the lora scheme (LoRA
    # student, LoRA teacher on and off, with and without grad) needs more than 64 per code object (measured on an
    # H100: ResnetBlock2D hit a limit of 64 and fell back to eager), far more than dynamo's default of 8.
    cfg = torch._dynamo.config
    for name, limit in (("recompile_limit", 512), ("cache_size_limit", 512),
                        ("accumulated_recompile_limit", 4096), ("accumulated_cache_size_limit", 4096)):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), limit))
    for mod in compiled_regions(unet, mode):
        mod.compile(dynamic=False, **kwargs)


def compiled_regions(unet: torch.nn.Module, mode: str) -> list[torch.nn.Module]:
    """The submodules ``compile_unet`` compiles one by one in a regional mode, outermost first; none inside another."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    if mode == "blocks":
        kinds: tuple[type, ...] = (BasicTransformerBlock, ResnetBlock2D)
    elif mode == "regions":
        from diffusers.models.transformers.transformer_2d import Transformer2DModel
        from diffusers.models.downsampling import Downsample2D
        from diffusers.models.upsampling import Upsample2D

        kinds = (Transformer2DModel, ResnetBlock2D, Downsample2D, Upsample2D)
    else:
        raise ValueError(f"no regional compile mode {mode!r}: blocks or regions")
    out: list[torch.nn.Module] = []
    for mod in unet.modules():  # pre-order: a region's children come after it
        if isinstance(mod, kinds) and not any(mod in set(o.modules()) for o in out):
            out.append(mod)
    return out


def lr_param_groups(named: list[tuple[str, torch.nn.Parameter]], lr: float,
                    scale: dict[str, float]) -> list[dict]:
    """Optimizer parameter groups: each parameter at ``lr`` times the factor of the first key of ``scale`` that its
    name contains, else at ``lr``: the unscaled group first (its rate is the one logged), then one a key, in order. A key
    that names no parameter is an error (a typo would otherwise train everything at the base rate)."""
    groups: dict[str | None, list[torch.nn.Parameter]] = {None: []}
    for name, p in named:
        key = next((k for k in scale if k in name), None)
        groups.setdefault(key, []).append(p)
    unused = [k for k in scale if k not in groups]
    if unused:
        shadowed = [k for k in unused if any(k in n for n, _ in named)]
        raise ValueError(
            f"optim.student_lr_scale: no trainable student parameter is left for {unused}"
            + (f" ({shadowed}: every parameter whose name contains it is taken by an earlier key; the first key a "
               "name contains decides)" if shadowed else "")
            + (f" ({[k for k in unused if k not in shadowed]}: no parameter's name contains it; e.g. "
               f"{[n for n, _ in named[:3]]})" if len(shadowed) < len(unused) else ""))
    return [{"params": groups[k], "lr": lr * (scale[k] if k is not None else 1.0), "name": k or "base"}
            for k in [None, *scale]]


def student_optimizer(m: Models, cfg: Config, device) -> torch.optim.AdamW:
    """AdamW over the student's trainable parameters, with ``optim.student_lr_scale``'s per-layer rates."""
    if not cfg.optim.student_lr_scale:
        return _adamw(m.student_params, cfg.optim.student_lr, cfg, device)
    ids = {id(p) for p in m.student_params}
    named = [(n, p) for n, p in m.student.named_parameters() if id(p) in ids]
    if len(named) != len(ids):
        raise RuntimeError("the student's trainable parameters are not all named in its module")
    return _adamw(lr_param_groups(named, cfg.optim.student_lr, cfg.optim.student_lr_scale), cfg.optim.student_lr,
                  cfg, device)


def _adamw(params, lr: float, cfg: Config, device) -> torch.optim.AdamW:
    o = cfg.optim
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(params, lr=lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps, fused=fused)


@contextmanager
def per_sample_adapters(unet, adapter_names: list[str]):
    """Run the LoRA adapter on some samples of a batch only (peft's mixed-batch forward; "__base__" = adapter off):
    the frozen teacher's cond/uncond passes and the LoRA teacher's pass become one UNet call on one batch."""
    from peft.tuners.lora import LoraLayer

    def inject(module, args, kwargs):
        kwargs["adapter_names"] = adapter_names
        return args, kwargs

    hooks = [mod.register_forward_pre_hook(inject, with_kwargs=True) for mod in unet.modules()
             if isinstance(mod, LoraLayer)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def _trainer(m: Models) -> torch.nn.Module:
    """The module the LoRA teacher's trained passes run through (see ``Models.teacher_trainer``)."""
    return m.teacher_trainer if m.teacher_trainer is not None else m.teacher_unet


def frozen_teacher_eps(teacher, x_t, t, emb, null_emb, cfg: Config) -> torch.Tensor:
    """ε̂ of the frozen teacher with CFG at x_t: cond and uncond in one call with the adapter off (and on again after)."""
    teacher.disable_adapters()
    eps_c, eps_u = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]),
                           encoder_hidden_states=torch.cat([emb, null_emb.expand_as(emb)])).sample.float().chunk(2)
    teacher.enable_adapters()
    return guided(eps_u, eps_c, cfg.vsd.guidance_scale)


def teacher_predictions(teacher, x_t, t, emb, null_emb, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """ε̂ of the frozen teacher (with CFG) and of the LoRA teacher (with its own guidance scale) at x_t."""
    b = x_t.shape[0]
    null = null_emb.expand_as(emb)
    lora_cfg = cfg.vsd.lora_guidance_scale != 1.0
    if cfg.vsd.single_teacher_call:
        segments = [(emb, "__base__"), (null, "__base__"), (emb, "default")] + ([(null, "default")] if lora_cfg else [])
        names = [name for _, name in segments for _ in range(b)]
        with per_sample_adapters(teacher, names):
            out = teacher(torch.cat([x_t] * len(segments)), torch.cat([t] * len(segments)),
                          encoder_hidden_states=torch.cat([e for e, _ in segments])).sample.float().chunk(len(segments))
        eps_c, eps_u, lora_c = out[:3]
        lora_u = out[3] if lora_cfg else None
        eps_teacher = guided(eps_u, eps_c, cfg.vsd.guidance_scale)
    else:
        eps_teacher = frozen_teacher_eps(teacher, x_t, t, emb, null_emb, cfg)
        if lora_cfg:
            lora_c, lora_u = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                     encoder_hidden_states=torch.cat([emb, null])).sample.float().chunk(2)
        else:
            lora_c, lora_u = teacher(x_t, t, encoder_hidden_states=emb).sample.float(), None
    eps_lora = lora_c if lora_u is None else guided(lora_u, lora_c, cfg.vsd.lora_guidance_scale)
    return eps_teacher, eps_lora


def frozen_context(m: Models, cfg: Config, autocast):
    """The context of the frozen teacher's no-grad passes and the dtype to give their inputs: autocast and the inputs
    as they are (None), or with ``train.frozen_autocast`` off and a low-precision teacher, no autocast and inputs in
    the teacher's dtype."""
    dtype = next(m.teacher_unet.parameters()).dtype
    if cfg.train.frozen_autocast or dtype == torch.float32:
        return autocast(), None
    return nullcontext(), dtype


class StudentStep(NamedTuple):
    """What :func:`student_step` computes. ``lora_loss`` is the LoRA teacher's diffusion loss on the pass that gave
    the VSD estimate (``vsd.shared_lora_pass``; its backward trains the adapter), None without that switch."""

    loss: torch.Tensor
    x0: torch.Tensor
    logs: dict[str, Log]
    lora_loss: torch.Tensor | None = None


def student_step(m: Models, cfg: Config, emb: torch.Tensor, null_emb: torch.Tensor, prompts: list[str], step: int,
                 autocast, reg: RegBatch | None = None) -> StudentStep:
    """Loss of one student update, the detached x̂0 the LoRA teacher learns from, and the values to log (losses as
    detached device tensors: reading them back would make the host wait for the device before the backward).

    With a regularization batch the student runs once on both batches (one forward and one backward under DDP and
    gradient checkpointing); only the prompt batch's x̂0 feeds VSD, the rewards and the LoRA teacher.

    With ``vsd.shared_lora_pass`` the LoRA teacher's ε̂ at x_t comes from a pass with gradients to its adapter, and
    its diffusion loss ‖ε̂_ψ(x_t, t, y) − ε‖² on that same pass is returned as ``lora_loss``: the VSD estimate uses it
    detached, so the student's loss and gradient are the same as without the switch.
    """
    if cfg.train.cuda_graphs:  # an iteration starts here: CUDA graph trees may now reuse the last one's outputs
        torch.compiler.cudagraph_mark_step_begin()
    b = emb.shape[0]
    device = emb.device
    z = torch.randn((b, *m.latent_shape), device=device)
    x_in, text = (z, emb) if reg is None else (torch.cat([z, reg.x_in.to(z.dtype)]), torch.cat([emb, reg.emb]))
    with autocast():
        x0_all = student_x0(m.student, x_in, text, m.alphas_cumprod, cfg.vsd.student_timestep,
                            cfg.models.student_prediction_type)
    x0 = x0_all if reg is None else x0_all[:b]
    t = sample_timesteps(b, m.num_train_timesteps, cfg.vsd.t_min, cfg.vsd.t_max, device=device)
    noise = torch.randn_like(x0, dtype=torch.float32)
    x_t = add_noise(x0.detach().float(), noise, m.alphas_cumprod, t)
    frozen, dt = frozen_context(m, cfg, autocast)
    lora_loss = None
    if cfg.vsd.shared_lora_pass:
        with torch.no_grad(), frozen:
            eps_teacher = frozen_teacher_eps(m.teacher_unet, x_t.to(dt or x_t.dtype), t, emb.to(dt or emb.dtype),
                                             null_emb.to(dt or null_emb.dtype), cfg)
        with autocast():
            eps_psi = _trainer(m)(x_t, t, encoder_hidden_states=emb).sample
        lora_loss = diffusion_loss(eps_psi, noise)
        eps_lora = eps_psi.detach().float()
    else:
        with torch.no_grad(), frozen:
            eps_teacher, eps_lora = teacher_predictions(m.teacher_unet, x_t.to(dt or x_t.dtype), t,
                                                        emb.to(dt or emb.dtype), null_emb.to(dt or null_emb.dtype),
                                                        cfg)
    w = dmd_weight(m.alphas_cumprod, t, x0, x_t, eps_teacher) if cfg.vsd.weighting == "dmd" \
        else vsd_weight(m.alphas_cumprod, t, cfg.vsd.weighting)
    loss_vsd, _ = vsd_loss(x0, eps_teacher, eps_lora, w, cfg.vsd.reduction)
    loss = loss_vsd
    logs: dict[str, Log] = {"loss/vsd": loss_vsd.detach()}
    if m.rewards:
        loss = loss + reward_losses(m, cfg, x0, prompts, step, autocast, logs)
    if reg is not None:
        loss = loss + regularization_loss(m, cfg, x0_all[b:], reg, step, autocast, logs)
    return StudentStep(loss, x0.detach(), logs, lora_loss)


def reward_losses(m: Models, cfg: Config, x0: torch.Tensor, prompts: list[str], step: int, autocast,
                  logs: dict[str, Log]) -> torch.Tensor:
    """Σ w_k(step)·max(0, τ_k − r_k(D(x̂0), y)) over the reward terms, D the TinyVAE decoder or, with
    ``clip_loss.decoder=vae``, the full VAE decoder (decoded once). The
    clamped CLIP loss logs as before (``loss/clip``, ``clip/weight``, ``clip/cos``), the others as
    ``loss/reward/<name>``, ``reward/<name>/weight`` and ``reward/<name>/mean``."""
    decoder = m.vae if cfg.clip_loss.decoder == "vae" else m.tiny_vae
    with autocast():
        images = decode(decoder, x0.to(decoder.dtype))
    total = None
    for term in m.rewards:
        s = term.settings(cfg)
        weight = scheduled_weight(step, cfg.train.steps, s.weight, s.end_weight, s.schedule)
        with autocast():
            reward = term.scorer(images, prompts)
        # the unclamped CLIP loss is 1 − cos (Table 6's ablation), whatever τ says
        tau = 1.0 if term.index is None and not s.clamp else s.tau
        value = clamped_reward_loss(reward, tau, s.clamp)
        total = weight * value if total is None else total + weight * value
        if term.index is None:
            logs.update({"loss/clip": value.detach(), "clip/weight": weight, "clip/cos": reward.detach().mean()})
        else:
            logs.update({f"loss/reward/{term.name}": value.detach(), f"reward/{term.name}/weight": weight,
                         f"reward/{term.name}/mean": reward.detach().mean()})
    return total


def _reg_decoder(m: Models, cfg: Config):
    return m.vae if cfg.regularization.decoder == "vae" else m.tiny_vae


@torch.no_grad()
def regularization_batch(m: Models, cfg: Config, pairs: list, device, autocast) -> RegBatch:
    """Real pairs: the image's latent (the teacher's VAE, its posterior mean × scaling factor) noised to the student
    timestep; teacher pairs (``sb2 regpairs``): the stored noise and teacher output. The captions are encoded here,
    not looked up (they are not in the prompt set)."""
    emb = encode_prompts(m.text_encoder, m.tokenizer, [p.caption for p in pairs], device)
    if isinstance(pairs[0], RealPair):
        pixels = torch.stack([p.image for p in pairs]).to(device, m.vae.dtype)
        with autocast():
            target = m.vae.encode(pixels).latent_dist.mode().float() * m.vae.config.scaling_factor
        noise = torch.randn_like(target)
        x_in = student_input_for_real(target, noise, m.alphas_cumprod, cfg.vsd.student_timestep)
    else:
        x_in = torch.stack([p.noise for p in pairs]).to(device)
        target = torch.stack([p.target for p in pairs]).to(device)
    target_images = None
    if cfg.regularization.distance == "lpips":
        # Both sides through the same decoder: the loss is zero exactly at x̂0 = target, whatever the decoder's own
        # reconstruction error on the real image.
        dec = _reg_decoder(m, cfg)
        with autocast():
            target_images = decode(dec, target.to(dec.dtype)).float()
    return RegBatch(x_in, emb.to(x_in.device), target, target_images)


def regularization_loss(m: Models, cfg: Config, x0_reg: torch.Tensor, reg: RegBatch, step: int, autocast,
                        logs: dict[str, Log]) -> torch.Tensor:
    """w_reg(step)·d(x̂0, target): latent MSE, or the perceptual distance of the decoded images (logged as
    ``loss/reg``)."""
    rc = cfg.regularization
    weight = scheduled_weight(step, cfg.train.steps, rc.weight, rc.end_weight, rc.schedule)
    if rc.distance == "latent_mse":
        value = latent_regression_loss(x0_reg, reg.target)
    else:
        dec = _reg_decoder(m, cfg)
        with autocast():
            images = decode(dec, x0_reg.to(dec.dtype))
            value = perceptual_regression_loss(m.perceptual_net, images, reg.target_images)
    logs.update({"loss/reg": value.detach(), "reg/weight": weight})
    return weight * value


def lora_teacher_loss(m: Models, cfg: Config, x0: torch.Tensor, emb: torch.Tensor, null_emb: torch.Tensor,
                      autocast) -> torch.Tensor:
    """ε-prediction diffusion loss of the LoRA teacher on detached student samples, t uniform over [0, T), with
    null-text dropout so that it can also predict unconditionally."""
    b = x0.shape[0]
    t = torch.randint(0, m.num_train_timesteps, (b,), device=x0.device)
    noise = torch.randn_like(x0, dtype=torch.float32)
    x_t = add_noise(x0.float(), noise, m.alphas_cumprod, t)
    drop = torch.rand(b, device=x0.device) < cfg.lora_teacher.null_text_dropout
    cond = torch.where(drop.view(-1, 1, 1), null_emb.expand_as(emb), emb)
    with autocast():
        eps = _trainer(m)(x_t, t, encoder_hidden_states=cond).sample
    return diffusion_loss(eps, noise)
