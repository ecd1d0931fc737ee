"""The one validated config schema (pydantic) and its profiles.

A config is a profile (``sb2/profiles/<name>.yaml``) plus ``key.sub=value`` overrides. An unknown key, a wrong type
or an out-of-range value is a :class:`ConfigError` carrying one line that names the key and the problem.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PROFILES_DIR = Path(__file__).parent / "profiles"


def _names_unique(items: list, what: str) -> list:
    names = [item.name for item in items]
    if len(set(names)) != len(names):
        raise ValueError(f"{what} names must be unique: {names}")
    return items


class ConfigError(ValueError):
    """A user error in a config: the message is one line naming the key."""

    def __init__(self, message: str):
        # A hostile key or value may carry newlines or terminal escapes: show them escaped, on one line.
        super().__init__(re.sub(r"[\x00-\x1f\x7f-\x9f]", lambda m: repr(m.group())[1:-1], message))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelsConfig(_Strict):
    """Where every model comes from: a Hub id, a local folder, or ``tiny:`` for the built-in tiny test world."""

    teacher: str = "stabilityai/stable-diffusion-2-1-base"
    # Student initialization (paper 4.2, 7.3): SD-Turbo by default; the teacher itself or any one-step UNet works too.
    student: str = "stabilityai/sd-turbo"
    student_prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    tiny_vae: str = "madebyollin/taesd"
    # open_clip: a pretrained tag ("ViT-B-32:laion2b_s34b_b79k"), "hf-hub:org/repo" or a local open_clip folder.
    clip: str = "ViT-B-32:laion2b_s34b_b79k"
    revision: str | None = None
    # Models are loaded from the local cache only when true (clusters without internet).
    local_files_only: bool = False

    @field_validator("teacher", "student", "tiny_vae", "clip")
    @classmethod
    def _local_path_exists(cls, v: str) -> str:
        if v.startswith(("/", "./", "../", "~")):
            try:
                path = Path(v).expanduser()
            except RuntimeError:  # "~name" of a user this machine does not have
                raise ValueError(f"local model path {v!r}: no such user's home directory") from None
            if not path.exists():
                raise ValueError(f"local model path {v!r} does not exist")
        if not v.strip():
            raise ValueError("empty model id")
        return v


class VSDConfig(_Strict):
    """Variational Score Distillation, paper eq. (4)."""

    guidance_scale: float = Field(4.5, ge=0.0)
    # The LoRA teacher is the "fake score" that tracks the student's distribution; like ProlificDreamer and
    # SwiftBrush it sees the text without guidance by default (scale 1 = conditional prediction only).
    lora_guidance_scale: float = Field(1.0, ge=0.0)
    t_min: float = Field(0.02, ge=0.0, le=1.0)
    t_max: float = Field(0.98, ge=0.0, le=1.0)
    # w(t) of eq. (4): SwiftBrush's 1 − ᾱ_t; "dmd" is DMD's per-sample normalization (σ_t/α_t over the mean |x0 − x̂0|
    # of the teacher's estimate: sb2.distill.vsd.dmd_weight). In the mini-world a constant weighting was worse
    # (results/miniworld/TUNING.md, eleventh round); "dmd" is not measured there yet.
    weighting: Literal["one_minus_alpha_bar", "constant", "snr_inverse", "dmd"] = "one_minus_alpha_bar"
    # "mean" as SwiftBrush (gradient divided by the number of latent elements); "sum" gives w(t)(eps_t - eps_l) per
    # sample exactly.
    reduction: Literal["mean", "sum"] = "mean"
    student_timestep: int = Field(999, ge=0)
    # Frozen teacher (cond, uncond) and LoRA teacher in one UNet call on a 3B batch (peft's per-sample adapters).
    # Same results; measured 3% slower on an H200 at batch 16 (BENCHMARKS.md), so off by default.
    single_teacher_call: bool = False
    # The LoRA teacher's first update of each iteration trains on the pass that gave the VSD estimate (same x_t, t and
    # text, with gradients to its adapter) instead of a pass of its own: one UNet forward fewer a step. It then sees
    # t in [t_min, t_max] and no null-text dropout, so it needs lora_guidance_scale 1. Measured (BENCHMARKS.md): 12%
    # faster on an H100 (compiled, batch 16) at +9.6 GiB peak (37.2 GiB), but worse students in the mini-world
    # (branch A FID 1881 against 1402, 3 seeds) — off.
    shared_lora_pass: bool = False

    @model_validator(mode="after")
    def _range(self) -> "VSDConfig":
        if self.t_min >= self.t_max:
            raise ValueError("t_min must be below t_max")
        if self.shared_lora_pass and self.lora_guidance_scale != 1.0:
            raise ValueError("vsd.shared_lora_pass trains the LoRA teacher on its conditional pass only, so it needs "
                             f"vsd.lora_guidance_scale=1 (got {self.lora_guidance_scale})")
        if self.shared_lora_pass and self.single_teacher_call:
            raise ValueError("vsd.shared_lora_pass and vsd.single_teacher_call cannot both be on: the shared pass "
                             "runs with gradients, the single call without")
        return self


class LoraConfigSection(_Strict):
    rank: int = Field(64, gt=0)
    alpha: float = Field(128.0, gt=0.0)
    target_modules: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class LoraTeacherConfig(LoraConfigSection):
    lr: float = Field(1e-3, gt=0.0)
    null_text_dropout: float = Field(0.1, ge=0.0, le=1.0)
    updates_per_student_update: int = Field(1, ge=1)


class ClipLossConfig(_Strict):
    """Clamped CLIP loss, paper eq. (5), and its weight schedule."""

    enabled: bool = True
    tau: float = Field(0.35, ge=-1.0, le=1.0)
    clamp: bool = True
    weight: float = Field(0.1, ge=0.0)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    end_weight: float = Field(0.0, ge=0.0)
    # What decodes x̂0 for the CLIP loss and every other reward term (decoded once): the TinyVAE, as the paper (cheap
    # at 512 px), or the full VAE decoder, whose images are the ones generation and evaluation show (exact, and for SD
    # far costlier in time and memory). In the mini-world the TinyVAE is a poor stand-in (PSNR 19 dB against the VAE's
    # 30): gradient ascent of the CLIP cosine through it lowered the VAE's images' cosine (0.51 → 0.32 in 60 steps),
    # through the VAE it raised it (→ 0.91; results/miniworld/TUNING.md).
    decoder: Literal["tiny_vae", "vae"] = "tiny_vae"


class BadInputConfig(_Strict):
    # skip: report and count each bad record, stop only when a file has more than max_bad_fraction of them.
    on_error: Literal["skip", "stop"] = "skip"
    max_bad_fraction: float = Field(0.05, ge=0.0, le=1.0)


class RewardConfig(_Strict):
    """An auxiliary reward term max(0, τ − r(D(x̂0), y)) with its own weight and schedule (paper 8.1: HPSv2 added "similar
    to the CLIP loss"); the clamped CLIP loss is the instance ``kind: clip``. Logged as ``loss/reward/<name>``."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    # clip: an open_clip model (``model``, default models.clip), reward = cosine of image and prompt embeddings;
    # hps: the same with HPSv2's open_clip model and checkpoint (reward = HPS's cosine, about 0.27 for SD2.1 images);
    # module: ``model`` = "package.module:factory" returning a callable (images in [-1, 1], prompts) → rewards (B,).
    kind: Literal["clip", "hps", "module"]
    model: str | None = None  # hps: ViT-H-14 unless given
    # Fine-tuned weights of both towers (a local path, or a URL fetched once to the cache); hps: HPS_v2_compressed.pt
    # unless given (null: the model's own weights, as evaluate.hps.checkpoint).
    checkpoint: str | None = None
    tau: float
    clamp: bool = True
    weight: float = Field(ge=0.0)
    schedule: Literal["linear", "cosine", "constant"] = "constant"
    end_weight: float = Field(0.0, ge=0.0)
    # The paper adds HPS to the resource-efficient (LoRA) branch only, like the CLIP loss.
    schemes: list[Literal["full", "lora"]] = ["lora"]

    @model_validator(mode="before")
    @classmethod
    def _hps_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kind") == "hps":
            data = {"model": "ViT-H-14", "checkpoint": HPS_CHECKPOINT, **data}
        return data

    @model_validator(mode="after")
    def _model(self) -> "RewardConfig":
        if self.kind == "module" and not self.model:
            raise ValueError("a module reward needs model: package.module:factory")
        return self


class RegPairsConfig(_Strict):
    """``sb2 regpairs``: DMD's noise–image pairs, the teacher's deterministic (DDIM) sampler run from stored noise."""

    steps: int = Field(50, ge=1)
    # null: the teacher's guidance scale of the VSD term (vsd.guidance_scale, 4.5).
    guidance_scale: float | None = Field(None, ge=0.0)
    seed: int = 0  # pair i starts from the noise of seed + i
    batch_size: int = Field(8, ge=1)
    shard_rows: int = Field(1024, ge=1)
    # float16 halves the disk (200K SD2.1 pairs: 13 GB); the noise is rounded before the teacher sees it, so every
    # stored pair is exact.
    dtype: Literal["float16", "float32"] = "float16"


class RegularizationConfig(_Strict):
    """Image regularization on a little real data (paper 5.1 and Tables 3, 5, "Ours*": DMD's regression [54] on 200K
    LAION-Aesthetics 6.25+ pairs, about 5% of the training data). See sb2/distill/regularization.py."""

    enabled: bool = False
    # real: the student's x̂0 for a real latent noised to its input timestep, regressed to that latent;
    # dmd_pairs: the student's x̂0 from stored noise regressed to the teacher's output for it (``sb2 regpairs``).
    kind: Literal["real", "dmd_pairs"] = "real"
    # A folder of images with same-name .txt captions, a CSV/TSV/Parquet manifest (path and caption columns, paths
    # relative to it), WebDataset .tar shards (a file, a folder or a glob), or a folder written by `sb2 regpairs`.
    source: str | None = None
    format: Literal["auto", "folder", "csv", "tsv", "parquet", "webdataset", "regpairs"] = "auto"
    caption_field: str = "caption"
    path_field: str = "path"
    # As the prompt builder: keep pairs whose numeric filter_column >= filter_min (manifests and .json of shards).
    filter_column: str | None = None
    filter_min: float | None = None
    max_records: int | None = Field(None, ge=1)
    # Share of training steps that carry a regularization batch (decided per step from the seed, so a resume
    # repeats it); with batch_size = train.batch_size, 0.05 puts about 5% of the samples on real data.
    share: float = Field(0.05, ge=0.0, le=1.0)
    batch_size: int | None = Field(None, ge=1)  # null: train.batch_size
    weight: float = Field(0.25, ge=0.0)  # DMD's λ_reg
    schedule: Literal["linear", "cosine", "constant"] = "constant"
    end_weight: float = Field(0.0, ge=0.0)
    # latent_mse: mean squared error of latents; lpips: a perceptual distance of decoded images (DMD's choice).
    distance: Literal["latent_mse", "lpips"] = "latent_mse"
    # lpips:<alex|vgg|squeeze> (the lpips package, fetched separately) or module:package.module:factory (an nn.Module
    # (images, images) in [-1, 1] → distance per sample).
    perceptual_net: str = "lpips:vgg"
    decoder: Literal["tiny_vae", "vae"] = "tiny_vae"
    bad_input: BadInputConfig = BadInputConfig()
    pairs: RegPairsConfig = RegPairsConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "RegularizationConfig":
        if self.enabled and not self.source:
            raise ValueError("enabled without a source (a folder, manifest, .tar shards or `sb2 regpairs` folder)")
        if (self.filter_column is None) != (self.filter_min is None):
            raise ValueError("filter_column and filter_min go together")
        if self.filter_column is not None and self.format in ("folder", "regpairs"):
            raise ValueError(f"a {self.format} source has no columns to filter on")
        if not (self.perceptual_net.startswith("module:") or
                self.perceptual_net in ("lpips:alex", "lpips:vgg", "lpips:squeeze")):
            raise ValueError("perceptual_net must be lpips:alex, lpips:vgg, lpips:squeeze or module:package.module:factory")
        return self


class OptimConfig(_Strict):
    student_lr: float = Field(1e-6, gt=0.0)
    # Per-layer learning rates of the student: student_lr times the factor of the first key (in order) that its
    # parameter's name contains, e.g. {attn2: 10} trains the cross-attention layers (where the text enters) at 10x.
    student_lr_scale: dict[str, float] = {}
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.01, ge=0.0)
    eps: float = Field(1e-8, gt=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)

    @field_validator("student_lr_scale")
    @classmethod
    def _lr_scale(cls, v: dict[str, float]) -> dict[str, float]:
        for key, factor in v.items():
            if not str(key).strip():
                raise ValueError("optim.student_lr_scale: an empty key would match every parameter")
            if not factor > 0 or factor != factor or factor == float("inf"):
                raise ValueError(f"optim.student_lr_scale[{key!r}] = {factor}: a factor must be positive and finite")
        return v


class EMAConfig(_Strict):
    enabled: bool = False
    decay: float = Field(0.999, gt=0.0, lt=1.0)


class DDPConfig(_Strict):
    """How DistributedDataParallel all-reduces the gradients of the student and of the LoRA teacher across processes
    (one per GPU); a single process ignores it. bench/train_ddp.py --variants measures these against each other."""

    # Gradients are all-reduced bucket by bucket while the backward still runs: larger buckets make fewer and larger
    # all-reduces (less per-call latency), smaller ones start the first one earlier (more overlap with the backward).
    # torch's default; the full SD2.1 student is 866M fp32 gradients, 3.5 GB a step.
    bucket_cap_mb: float = Field(25.0, gt=0.0, le=4096.0)
    # Each .grad becomes a view into its bucket: no copy of every gradient into the bucket and back after the
    # all-reduce, and one gradient-sized buffer less (3.5 GB for the full student). Same values; zero_grad(set_to_none)
    # and checkpoints (weights and optimizer state, never gradients) are unaffected (tests/test_ddp.py).
    gradient_as_bucket_view: bool = False
    # A promise that every forward through a wrapper is followed by one backward reaching the same parameters — true
    # of both wrappers here, the skip of a non-finite step included (sb2/train/loop.py): DDP then skips its
    # per-iteration bookkeeping of which parameters got a gradient. With every parameter used (as here) little gain
    # is expected; off until measured.
    static_graph: bool = False
    # Gradients compressed to 16 bits for the all-reduce (half the bytes) and widened back: lossy, so off by default.
    # bf16 keeps fp32's range with 8 significant bits; fp16 keeps 11 but overflows above 65504 (the step is then
    # skipped as non-finite) and loses small values (below 6e-5 gradually, below 6e-8 entirely).
    comm_hook: Literal["none", "fp16", "bf16"] = "none"


class TrainConfig(_Strict):
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(16, ge=1)
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"
    gradient_checkpointing: bool = True
    # Selective checkpointing, with gradient_checkpointing off: only these blocks of the student UNet (names as in
    # its state dict: "up_blocks.3", "down_blocks.0", "mid_block") recompute their activations in the backward —
    # the high-resolution blocks hold most of the activations for a small share of the arithmetic ([up_blocks.3] on
    # SD2.1 at batch 16: -3.2 GiB for +4% step time on an H100, BENCHMARKS.md).
    checkpoint_blocks: list[str] = []
    log_every: int = Field(10, ge=1)
    # Where prompts come from: a text file (one a line), or a Parquet/CSV file or folder with a `prompt` column.
    prompts: str = "data/samples/prompts.txt"
    # A folder written by `sb2 prompts embed` for these prompts: their text embeddings are read, not computed.
    prompt_embeddings: str | None = None
    num_workers: int = Field(0, ge=0)
    # A step with a non-finite loss or gradient is skipped; this many in a row stop the run.
    max_consecutive_nonfinite: int = Field(10, ge=1)
    # GPU speed switches (see BENCHMARKS.md): NHWC convolutions, and torch.compile of the student and teacher UNets.
    channels_last: bool = True
    compile: bool = False
    # "blocks": each transformer and ResNet block compiled on its own (regional compilation: identical blocks share one
    # compiled graph, so compiling takes a minute or two); "full": the whole UNet as one graph (compiles for > 4 min).
    # "regions": each whole Transformer2DModel (its GroupNorm and projections too), the ResNet blocks and the samplers;
    # not measured (on an H100 its compilation with channels_last and CUDA graphs had not finished after ~540 s).
    compile_mode: Literal["blocks", "regions", "full"] = "blocks"
    # With compile: each compiled region replayed as a CUDA graph (torch.compile's "reduce-overhead" mode, CUDA graph
    # trees; every training iteration marks a new step). The compiled step kept one H100 busy only 64% of the time
    # (the host's launches were the limit); with graphs another H100 went from 86% to 93% busy, 5% faster in one run
    # (BENCHMARKS.md). `sb2 train` under it (bench/cuda_graphs_check.py, H100): the lora scheme's student equal, bit
    # for bit, to compiled without graphs; the full scheme's weights within 3.1e-5 of eager (small by construction at
    # lr 1e-6); their updates from the init differ by 0.15 (H200), of the order of the lora scheme's compiled-vs-eager
    # 8.0e-2, with no noise floor measured yet (the check's --noise-floor). Off, as compile is (minutes of
    # compilation on the first step). Refused with gradient checkpointing (its recompute calls the compiled blocks
    # inside the backward: not measured).
    cuda_graphs: bool = False
    # The frozen teacher's no-grad passes (cond/uncond and the LoRA teacher's VSD estimate) under autocast, as the
    # rest of the step; false runs them in the teacher's own dtype (bf16 under mixed precision) without autocast, so
    # GroupNorm/LayerNorm stay bf16 instead of round trips through fp32 (eager profile on an H100: casts, elementwise
    # and normalization kernels are 44% of the step's GPU time). Measured on an H100 (eager, full scheme, batch 16):
    # 552 ms against 534 ms with autocast — 3.5% slower, so it stays true (BENCHMARKS.md).
    frozen_autocast: bool = True
    ddp: DDPConfig = DDPConfig()

    @model_validator(mode="after")
    def _cuda_graphs(self) -> "TrainConfig":
        if self.cuda_graphs and not self.compile:
            raise ValueError("train.cuda_graphs replays the compiled blocks as CUDA graphs: set train.compile=true "
                             "with it")
        if self.cuda_graphs and (self.gradient_checkpointing or self.checkpoint_blocks):
            # checkpointing calls the compiled blocks again inside the backward: not measured under CUDA graphs
            raise ValueError("train.cuda_graphs was measured without gradient checkpointing only: set "
                             "train.gradient_checkpointing=false and no train.checkpoint_blocks with it")
        return self

    @model_validator(mode="after")
    def _checkpointing(self) -> "TrainConfig":
        if self.gradient_checkpointing and self.checkpoint_blocks:
            raise ValueError("train.checkpoint_blocks checkpoints only some blocks: set "
                             "train.gradient_checkpointing=false with it (true checkpoints every block)")
        return self


class CheckpointConfig(_Strict):
    """Preemption safety: periodic atomic checkpoints, automatic resume, a clean exit on SIGTERM."""

    every: int = Field(500, ge=1)
    keep_last: int = Field(3, ge=1)
    resume: bool = True
    # Kubernetes sends SIGTERM, then SIGKILL after terminationGracePeriodSeconds (30 s by default; keep the two
    # equal): the run saves at the end of the step in flight, so one step plus one checkpoint write must fit in this
    # budget (a warning says so when they do not). A watchdog stops the process shortly before it ends (exit code 75,
    # the previous checkpoint kept) if the checkpoint is not complete by then. SIGINT is handled the same way.
    grace_period_s: float = Field(30.0, gt=0.0)
    # A checkpoint written by a different number of processes: refuse (one-line error), or resume its models,
    # optimizers and step with fresh data order and random streams for the processes it holds no state for.
    world_size_change: Literal["refuse", "resume"] = "refuse"


class TrackingConfig(_Strict):
    """MLflow: a local SQLite store by default, the server in MLFLOW_TRACKING_URI (or ``uri``) when given."""

    enabled: bool = True
    uri: str | None = None
    experiment: str = "sb2"
    system_metrics: bool = True
    # Every this many steps, a grid of fixed prompts and seeds is logged (0: only at the end).
    image_every: int = Field(1000, ge=0)


class RegisterConfig(_Strict):
    """The promotion gate of the MLflow registry."""

    model_name: str = Field("sb2-swiftbrush-v2", min_length=1)
    # champion moves only if FID is lower and CLIP is not worse than the champion's by more than this.
    clip_margin: float = Field(0.005, ge=0.0)
    lock_timeout_s: float = Field(120.0, gt=0.0)
    stale_lock_s: float = Field(900.0, gt=0.0)


class StudentLoraConfig(LoraConfigSection):
    rank: int = Field(256, gt=0)
    alpha: float = Field(512.0, gt=0.0)


class MergeConfig(_Strict):
    lam: float = Field(0.5, ge=0.0, le=1.0)


class GenerateConfig(_Strict):
    batch_size: int = Field(8, ge=1)
    seed: int = 0
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    decoder: Literal["vae", "tiny_vae"] = "vae"
    grid_cols: int = Field(4, ge=1)
    # GPU fast path (sb2/generation/fast.py): channels_last + cuDNN autotuning, static shapes captured in a CUDA
    # graph per batch size, optionally torch.compile first. Ignored on CPU.
    fast: bool = True
    compile: bool = False
    # With compile: fused attention projections, 1×1 convolutions as GEMMs, no epilogue fusion (lossless; batch 1 on
    # an H100: 13.9 against 14.5 ms, one run); and inductor's coordinate-descent kernel tuning, off (it had not
    # finished compiling after six minutes). bench/inference.py measures them (BENCHMARKS.md).
    tuned_compile: bool = True
    coordinate_descent_tuning: bool = False
    # The UNet's and VAE decoder's upsamplers (nearest 2× then a 3×3 convolution) computed on the input's 2×2
    # windows: "transposed" (one stride-2 transposed convolution) or "phases" (one 2×2 convolution for the four
    # output phases, interleaved); the same images up to fp rounding, 4 instead of 9 multiply-adds per output pixel
    # (about 15% of the SD VAE decoder's arithmetic; sb2/generation/subpixel.py). Off: on an H200 neither form is
    # faster everywhere — with compile (tuned), batch 1, "phases" 9.5% faster and "transposed" not; without compile
    # "transposed" 3–7% faster and "phases" 2–3% slower; batch 16 compiled, no gain (BENCHMARKS.md).
    subpixel_upsample: Literal["off", "transposed", "phases"] = "off"


INCEPTION_WEIGHTS = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                     "weights-inception-2015-12-05-6726825d.pth")
VGG16_WEIGHTS = "https://download.pytorch.org/models/vgg16-397923af.pth"
HPS_CHECKPOINT = "https://huggingface.co/xswu/HPSv2/resolve/main/HPS_v2_compressed.pt"
EvalMetric = Literal["fid", "precision_recall", "clip_score", "hps"]


class ExtractorConfig(_Strict):
    """A feature network of the evaluation (sb2/evaluation/features.py)."""

    kind: Literal["inception", "vgg16", "random_conv", "module"]
    # inception/vgg16: a weights file (local path, or a URL fetched once to the cache) or "random";
    # module: "package.module:factory" returning an nn.Module (uint8 images → vectors). Unused by random_conv.
    source: str = ""
    dim: int = Field(16, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _needs_source(self) -> "ExtractorConfig":
        if self.kind != "random_conv" and not self.source:
            raise ValueError(f"extractor kind {self.kind!r} needs a source")
        return self


class ClipScoreConfig(_Strict):
    # The authors' evaluation (GigaGAN's): open_clip ViT-g-14 laion2b_s12b_b42k, captions prefixed as below.
    model: str = "ViT-g-14:laion2b_s12b_b42k"
    prefix: str = "A photo depicts "
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"


class HPSConfig(_Strict):
    """HPSv2, scored with open_clip and the HPS checkpoint directly (not the hpsv2 package, which pins protobuf<4)."""

    model: str = "ViT-H-14"
    # The fine-tuned weights of both towers (a local path or URL); null keeps the model's own weights.
    checkpoint: str | None = HPS_CHECKPOINT
    # A folder with <style>.json, each a list of prompts (HPSv2's benchmark: 800 a style).
    prompts: str = "data/hps/benchmark"
    styles: list[str] = ["anime", "concept-art", "paintings", "photo"]
    prompts_per_style: int | None = Field(None, ge=1)
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"


class SweepConfig(_Strict):
    """Merge-λ sweep (paper Figs. 3, 7): θ = λ·θ_A + (1−λ)·θ_B evaluated on a subset of the captions."""

    lambdas: list[float] = [0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0]
    num_captions: int = Field(5000, ge=1)
    # The chosen λ has the best FID among those whose CLIP score is at least this (all when null).
    clip_floor: float | None = None

    @field_validator("lambdas")
    @classmethod
    def _unit_interval(cls, v: list[float]) -> list[float]:
        if not v or any(not 0.0 <= x <= 1.0 for x in v):
            raise ValueError("lambdas must be a non-empty list of values in [0, 1]")
        return sorted(set(v))


class TimingConfig(_Strict):
    """Inference timing as paper 7.5: warm-ups, then `calls` calls timed, `repeats` times; fp16."""

    warmup: int = Field(5, ge=0)
    calls: int = Field(50, ge=1)
    repeats: int = Field(10, ge=1)
    batch_size: int = Field(1, ge=1)
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    prompt: str = "A photo of a cat sitting on a windowsill"


class EvalConfig(_Strict):
    """The zero-shot COCO-2014 protocol (paper 5.1): the first N captions, one image each, FID, precision/recall,
    CLIP score, and HPSv2 on its own prompts."""

    captions: str = "data/coco/annotations/captions_val2014.json"
    num_captions: int = Field(30000, ge=1)
    seed: int = 0  # image i is generated from seed + i
    batch_size: int = Field(64, ge=1)
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    channels_last: bool = True
    compile: bool = False
    image_size: int = Field(256, ge=8)
    metrics: list[EvalMetric] = ["fid", "precision_recall", "clip_score", "hps"]
    # The reference: every image of this folder; its features are computed once into reference_dir and reused.
    reference_images: str = "data/coco/val2014"
    reference_dir: str = "data/coco/reference_val2014"
    num_workers: int = Field(8, ge=0)
    save_images: bool = False
    fid: ExtractorConfig = ExtractorConfig(kind="inception", source=INCEPTION_WEIGHTS)
    precision_recall: ExtractorConfig = ExtractorConfig(kind="vgg16", source=VGG16_WEIGHTS)
    pr_k: int = Field(3, ge=1)
    clip_score: ClipScoreConfig = ClipScoreConfig()
    hps: HPSConfig = HPSConfig()
    sweep: SweepConfig = SweepConfig()
    timing: TimingConfig = TimingConfig()


class PromptSourceConfig(_Strict):
    """One prompt source: files (paths or globs) in one format; ``name`` becomes the ``source`` column."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    format: Literal["jsonl", "parquet", "text", "csv", "tsv"]
    paths: list[str] = Field(min_length=1)
    # The prompt's JSON field or column; default "prompt", and "TEXT" for Parquet (LAION's metadata).
    field: str | None = None
    # Keep only records whose numeric `filter_column` is >= filter_min (e.g. LAION's AESTHETIC_SCORE >= 6.25).
    filter_column: str | None = None
    filter_min: float | None = None
    # Stop reading this source after this many records (bad ones included), e.g. the paper's 2M LAION prompts.
    max_records: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _filter(self) -> "PromptSourceConfig":
        if (self.filter_column is None) != (self.filter_min is None):
            raise ValueError("filter_column and filter_min go together")
        if self.filter_column is not None and self.format == "text":
            raise ValueError("a text source has no columns to filter on")
        return self

    @property
    def prompt_field(self) -> str:
        return self.field or ("TEXT" if self.format == "parquet" else "prompt")


class PromptNormalizeConfig(_Strict):
    strip_midjourney_params: bool = True
    strip_urls: bool = True
    strip_html_tags: bool = True
    # Words or phrases (case-insensitive, whole words): a prompt containing one is dropped as "blocked".
    blocklist: list[str] = []
    blocklist_file: str | None = None


class PromptFilterConfig(_Strict):
    min_chars: int = Field(3, ge=1)
    min_words: int = Field(1, ge=1)
    # CLIP's context is 77 tokens, BOS and EOS included.
    max_tokens: int = Field(75, ge=1, le=4096)
    long_prompts: Literal["truncate", "drop"] = "truncate"
    # Letters over non-space characters; below it a prompt is "mostly non-text" (numbers, symbols, emoji).
    min_letter_fraction: float = Field(0.5, ge=0.0, le=1.0)


class PromptDedupConfig(_Strict):
    near: bool = True
    # Estimated Jaccard similarity of word shingles at or above which a later prompt is a near duplicate.
    threshold: float = Field(0.7, gt=0.0, le=1.0)
    shingle_words: int = Field(1, ge=1, le=8)
    num_perm: int = Field(64, ge=8, le=512)
    bands: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _bands(self) -> "PromptDedupConfig":
        if self.num_perm % self.bands:
            raise ValueError("num_perm must be a multiple of bands")
        return self


class PromptEmbeddingsConfig(_Strict):
    batch_size: int = Field(64, ge=1)
    dtype: Literal["float16", "float32"] = "float16"
    shard_rows: int = Field(4096, ge=1)


class PromptsConfig(_Strict):
    """The prompt dataset builder (paper 4.3, 5.1): 1.3–1.5M deduplicated JourneyDB prompts + 2M LAION prompts."""

    sources: list[PromptSourceConfig] = [
        PromptSourceConfig(name="journeydb", format="jsonl", paths=["data/raw/journeydb/*.jsonl*"]),
        PromptSourceConfig(name="laion", format="parquet", paths=["data/raw/laion/*.parquet"], max_records=2_000_000),
    ]
    normalize: PromptNormalizeConfig = PromptNormalizeConfig()
    filters: PromptFilterConfig = PromptFilterConfig()
    dedup: PromptDedupConfig = PromptDedupConfig()
    bad_input: BadInputConfig = BadInputConfig()
    # Share of prompts in the validation split, chosen by a hash of the prompt (stable as the dataset grows).
    val_fraction: float = Field(0.01, ge=0.0, lt=1.0)
    shard_rows: int = Field(500_000, ge=1)
    # Token counting uses this model's tokenizer; default: the teacher's (models.teacher).
    tokenizer: str | None = None
    # Processes for normalization, token counting and hashing; 0 = one per CPU core.
    workers: int = Field(0, ge=0)
    chunk_rows: int = Field(20_000, ge=1)
    embeddings: PromptEmbeddingsConfig = PromptEmbeddingsConfig()

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, v: list[PromptSourceConfig]) -> list[PromptSourceConfig]:
        return _names_unique(v, "source")


class Config(_Strict):
    profile: str = "sd21"
    models: ModelsConfig = ModelsConfig()
    train: TrainConfig = TrainConfig()
    vsd: VSDConfig = VSDConfig()
    lora_teacher: LoraTeacherConfig = LoraTeacherConfig()
    student_lora: StudentLoraConfig = StudentLoraConfig()
    clip_loss: ClipLossConfig = ClipLossConfig()
    rewards: list[RewardConfig] = []
    regularization: RegularizationConfig = RegularizationConfig()
    optim: OptimConfig = OptimConfig()
    ema: EMAConfig = EMAConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig()
    registry: RegisterConfig = RegisterConfig()
    merge: MergeConfig = MergeConfig()
    generate: GenerateConfig = GenerateConfig()
    evaluate: EvalConfig = EvalConfig()
    prompts: PromptsConfig = PromptsConfig()

    @field_validator("rewards")
    @classmethod
    def _unique_rewards(cls, v: list[RewardConfig]) -> list[RewardConfig]:
        return _names_unique(v, "reward")

    @model_validator(mode="after")
    def _shared_pass_precision(self) -> "Config":
        # fp16's loss scaler: accelerate's clip of the student's gradients unscales every optimizer, the shared pass's
        # LoRA gradients included, and the LoRA teacher's own clip would unscale them a second time
        if self.vsd.shared_lora_pass and self.train.mixed_precision == "fp16":
            raise ValueError("vsd.shared_lora_pass does not support train.mixed_precision=fp16 (use bf16 or no)")
        return self

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, v: str) -> str:
        if not (PROFILES_DIR / f"{v}.yaml").is_file():
            raise ValueError(f"unknown profile {v!r} (known: {', '.join(available_profiles())})")
        return v


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {k!r} is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` with the value read as YAML (``1e-3`` → float, ``true`` → bool, ``[a, b]`` → list)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    extra = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {msg}{extra}"


def load_config(profile: str | None = None, overrides: list[str] | None = None,
                file: str | Path | None = None) -> Config:
    """Resolve profile → optional YAML file → ``key=value`` overrides, and validate the result.

    The profile is the one named here, else the file's ``profile:`` key (as in ``params.yaml``), else ``sd21``.
    """
    extra: dict[str, Any] = {}
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r}: not found")
        try:
            extra = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r}: not valid YAML ({e.__class__.__name__})") from None
        if not isinstance(extra, dict):
            raise ConfigError(f"config file {str(path)!r}: expected a mapping at the top level")
    profile = profile or extra.get("profile") or "sd21"
    if not isinstance(profile, str) or not (PROFILES_DIR / f"{profile}.yaml").is_file():
        raise ConfigError(f"profile: unknown profile {profile!r} (known: {', '.join(available_profiles())})")
    tree: dict[str, Any] = yaml.safe_load((PROFILES_DIR / f"{profile}.yaml").read_text()) or {}
    _deep_update(tree, extra)
    tree["profile"] = profile
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from None


def _deep_update(base: dict[str, Any], new: dict[str, Any]) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
