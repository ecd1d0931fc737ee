"""The training recipe: alternate a student update with LoRA-teacher updates through accelerate, checkpointing so
that a preempted run resumes exactly where it stopped.

Reads: the config, the models it names, the prompt source and, with ``regularization.enabled``, its pair source.
Writes into the run folder: ``student/`` (a diffusers
UNet for ``full``, a peft LoRA adapter naming its base for ``lora``), ``lora_teacher/``, ``samples.png``,
``logs/metrics.jsonl``, ``train.json`` and ``checkpoints/``.
"""

from __future__ import annotations

import faulthandler
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sb2.config import Config, DDPConfig
from sb2.models.lora import lora_state_dict, save_lora
from sb2.student import encode_prompts
from sb2.tracking import Logger, safe_config, stage_logger
from sb2.train import checkpoint as ckpt
from sb2.train.data import PromptSampler, read_prompts
from sb2.train.paired import RegularizationFeed
from sb2.train.steps import (Models, Scheme, _adamw, apply_speed_switches, build_models, lora_teacher_loss,
                             regularization_batch, student_optimizer, student_step, vae_scale_factor)

PREVIEW_PROMPTS = 8


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps: the run stopped, its last good checkpoint kept."""


EXIT_GRACE_EXPIRED = 75  # EX_TEMPFAIL: stopped at the deadline before the checkpoint was complete; retry resumes
_MARGIN_S = 2.0  # the watchdog stops this much before the grace period ends (a tenth of it, for short ones)


class _Preemption:
    """SIGTERM (Kubernetes preemption, spot reclaim) or SIGINT asks the loop to checkpoint at the end of the step in
    flight and exit 0. Kubernetes sends SIGKILL ``terminationGracePeriodSeconds`` after SIGTERM, so a watchdog
    started at the signal holds the process to ``checkpoint.grace_period_s``: if the checkpoint is not complete at the
    deadline (the grace period less a small margin), it exits by itself with ``EXIT_GRACE_EXPIRED`` and a message
    naming the newest complete checkpoint (writes are atomic: the one in flight is simply not there), rather than
    being killed mid-write without a word. A second signal gets the default handling (immediate death).

    A step is never interrupted: exact resume needs the student and LoRA-teacher updates of a step to be both done or
    both not done. The watchdog is a thread, which needs the interpreter lock; should a C call hold it past the
    deadline, faulthandler (which does not) dumps the stacks and exits with code 1 half a margin later."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, grace_s: float, rank: int = 0, describe=lambda: ""):
        self.grace_s = grace_s
        self.deadline_s = grace_s - min(_MARGIN_S, grace_s / 10)
        self.rank, self.describe = rank, describe  # describe(): where the newest complete checkpoint is
        self.requested_at: float | None = None
        self.signal_name = "a signal to another process"  # what stopped this process, for the messages
        self.checkpointed = False  # the preemption checkpoint is complete: the deadline then exits 0
        self._old: dict[int, object] = {}
        self._signalled, self._over = threading.Event(), threading.Event()

    def __enter__(self):
        for s in self.SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: no handler, no preemption support
                pass
        if self._old:
            threading.Thread(target=self._watch, name="sb2-preemption-watchdog", daemon=True).start()
        return self

    def _handle(self, signum, frame):
        if self.requested_at is not None:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.signal_name = signal.Signals(signum).name
        self.arm()

    def arm(self) -> None:
        """Start the clock: on our own signal, or when another DDP process was signalled (it may not reach us)."""
        if self.requested_at is None:
            self.requested_at = time.monotonic()
            # (at least 0.1 s later: the thread may wait a switch interval, 5 ms, for the interpreter lock)
            backstop = self.deadline_s + max((self.grace_s - self.deadline_s) / 2, 0.1)
            faulthandler.dump_traceback_later(backstop, exit=True)
            self._signalled.set()  # no thread is started here: a signal handler may interrupt threading's own locks

    def _watch(self) -> None:
        self._signalled.wait()
        if self.requested_at is None:
            return
        if self._over.wait(max(0.0, self.requested_at + self.deadline_s - time.monotonic())):
            return
        if self.checkpointed:
            msg, code = (f"{self.signal_name}: the grace period ({self.grace_s:g} s) ran out while exiting after the "
                         f"checkpoint; exiting now"), 0
        else:
            msg, code = (f"{self.signal_name}: the checkpoint could not be completed within the grace period "
                         f"(checkpoint.grace_period_s = {self.grace_s:g} s); exiting with code {EXIT_GRACE_EXPIRED} "
                         f"before SIGKILL. {self.describe()}"), EXIT_GRACE_EXPIRED
        if self.rank == 0:
            os.write(2, f"\nerror: {msg}\n".encode())
        os._exit(code)

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        if not self.requested:  # after a preemption the watchdog stays armed until the process is gone
            self._over.set()
            self._signalled.set()


def _anywhere(accelerator, flag: bool) -> bool:
    """``flag`` of any process, on every process. Decisions that change which collective calls a process makes
    (stop to checkpoint) must be the same everywhere, or DDP waits forever for the missing call. An all-reduce and a
    host sync: the skip of a non-finite step needs none (see backward_seed)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([int(flag)], device=accelerator.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


class _GraceBudget:
    """Warns once, with the numbers, when one step plus one checkpoint write would not fit in the grace period: a
    preemption would then always end at the deadline with the checkpoint before it."""

    def __init__(self, grace_s: float, main: bool):
        self.grace_s, self.main, self.warned = grace_s, main, False
        self.step_s: float | None = None
        self.save_s: float | None = None
        shutdown = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30")
        if main and os.environ.get("TORCHELASTIC_RUN_ID") and shutdown.isdigit() and int(shutdown) < grace_s:
            print(f"warning: the launcher (torchrun/accelerate launch) kills its processes {shutdown} s after "
                  f"forwarding SIGTERM (TORCH_ELASTIC_SHUTDOWN_TIMEOUT), less than checkpoint.grace_period_s = "
                  f"{grace_s:g} s: set TORCH_ELASTIC_SHUTDOWN_TIMEOUT={math.ceil(grace_s)}", file=sys.stderr)

    def check(self, steps_run: int) -> None:
        # From the second step on: the first one carries warm-up (allocation, autotuning, compilation).
        if self.warned or not self.main or steps_run < 2 or self.step_s is None or self.save_s is None:
            return
        need = self.step_s + self.save_s
        if need > self.grace_s - min(_MARGIN_S, self.grace_s / 10):
            self.warned = True
            print(f"warning: one step ({self.step_s:.3g} s) plus one checkpoint write ({self.save_s:.3g} s) is "
                  f"{need:.3g} s, more than fits in checkpoint.grace_period_s = {self.grace_s:g} s: a preemption "
                  f"would stop at the deadline and lose the steps since the previous checkpoint. Raise "
                  f"checkpoint.grace_period_s together with the pod's terminationGracePeriodSeconds, or checkpoint "
                  f"more often (checkpoint.every) to lose less.", file=sys.stderr)


def _agreed_checkpoint(accelerator, out_dir: Path, cfg: Config) -> ckpt.Loaded | None:
    """The main process picks the newest good checkpoint (verifying every process's file) and every process loads
    that one: left to themselves, processes could pick different ones and resume from different steps."""
    from accelerate.utils import broadcast_object_list

    found, choice = None, [None]
    if accelerator.is_main_process:
        try:
            found = ckpt.find_latest_good(out_dir, warn=lambda s: print(f"warning: {s}", file=sys.stderr))
            if found is not None:
                note = ckpt.check_world_size(found, accelerator.num_processes, cfg.checkpoint.world_size_change)
                if note:
                    print(f"warning: {note}", file=sys.stderr)
                choice = [{"path": str(found.path)}]
        except ckpt.WorldSizeChanged as e:
            choice = [{"error": str(e)}]
    if accelerator.num_processes > 1:
        broadcast_object_list(choice)
    if choice[0] is None:
        return None
    if "error" in choice[0]:
        raise ckpt.WorldSizeChanged(choice[0]["error"])
    return found if found is not None else ckpt.Loaded(-1, Path(choice[0]["path"]), None, None)


def backward_seed(loss: torch.Tensor) -> torch.Tensor:
    """The gradient a backward starts from: 1 (the default, so a finite loss's gradients are bit for bit the same),
    NaN for a non-finite loss. Every gradient of that process is then NaN, the all-reduce carries the NaN to every
    process, and the gradient norm, identical on all of them after the all-reduce, decides the skip for all at once:
    no collective and no host sync before the backward."""
    return torch.where(torch.isfinite(loss), torch.ones_like(loss), torch.full_like(loss, math.nan))


def after_skipped_update(accelerator) -> None:
    """A skipped update under fp16 loss scaling: the optimizer's gradients were unscaled (for the norm) but it did not
    step, so the scaler must still update — lower the scale (an overflow is how fp16 loss scaling finds its scale)
    and forget that unscale, which the next step's would otherwise refuse. Nothing without a scaler (bf16, fp32)."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None:
        scaler.update()


def ddp_kwargs(ddp: DDPConfig):
    """``train.ddp`` as accelerate's handler of the DistributedDataParallel wrappers (ignored by a single process)."""
    from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs

    return DistributedDataParallelKwargs(
        bucket_cap_mb=ddp.bucket_cap_mb, gradient_as_bucket_view=ddp.gradient_as_bucket_view,
        static_graph=ddp.static_graph,
        comm_hook={"none": DDPCommunicationHookType.NO, "fp16": DDPCommunicationHookType.FP16,
                   "bf16": DDPCommunicationHookType.BF16}[ddp.comm_hook])


def _on_host(logs: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Log values kept on the device until they are logged, then read back in one transfer (one host sync)."""
    keys = [k for k, v in logs.items() if isinstance(v, torch.Tensor)]
    if not keys:
        return dict(logs)
    values = torch.stack([logs[k].detach().float().reshape(()) for k in keys]).tolist()
    return {**logs, **dict(zip(keys, values))}


def _student_state(m: Models, scheme: Scheme, unwrapped) -> dict[str, torch.Tensor]:
    if scheme == "full":
        return {k: v.detach().cpu().clone() for k, v in unwrapped.state_dict().items()}
    return lora_state_dict(unwrapped)


def _load_student_optimizer(opt: torch.optim.Optimizer, shared: dict, cfg: Config) -> None:
    """The student optimizer's state from a checkpoint, at the rates of this run's config (a changed
    ``optim.student_lr`` or factor takes effect; torch would restore the saved rates). Its groups must be the saved
    ones: a changed set of ``optim.student_lr_scale`` keys would put Adam's moments on other parameters."""
    here = list(cfg.optim.student_lr_scale)
    saved = shared.get("student_lr_scale")  # absent from checkpoints written before per-layer rates were recorded
    n_saved = len(shared["opt_student"]["param_groups"])
    if (saved is not None and list(saved) != here) or n_saved != len(opt.param_groups):
        was = f"the keys {list(saved)}" if saved is not None else f"{n_saved} parameter group(s)"
        raise ValueError(f"optim.student_lr_scale has the keys {here} here (in this order) and {was} in the "
                         "checkpoint: a resumed run keeps its parameter groups (the factors may change); restore "
                         "the keys, or start a new run (checkpoint.resume=false)")
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    opt.load_state_dict(shared["opt_student"])
    for g, f in zip(opt.param_groups, fresh, strict=True):
        g["lr"] = f["lr"]
        if "name" in f:
            g["name"] = f["name"]


def _load_student_state(unwrapped, scheme: Scheme, state: dict[str, torch.Tensor]) -> None:
    if scheme == "full":
        unwrapped.load_state_dict(state)
    else:
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(unwrapped, state)
        if getattr(result, "unexpected_keys", None):
            raise ckpt.CorruptCheckpoint(f"student LoRA keys do not match: {result.unexpected_keys[:3]}")


def train(cfg: Config, scheme: Scheme, out_dir: str | Path, logger: Logger | None = None,
          progress: bool = True) -> Path:
    """Train one branch and return its student folder. Resumes from the newest good checkpoint in ``out_dir``."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from sb2.atomic import atomic_dir

    out_dir = Path(out_dir)
    use_cuda = torch.cuda.is_available()
    # cpu=True: without it accelerate ignores a multi-process launch on a machine without GPUs (every process
    # thinks it is the only one); with it the processes form a gloo group.
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision if use_cuda else "no", cpu=not use_cuda,
                              kwargs_handlers=[ddp_kwargs(cfg.train.ddp)])
    rank, main = accelerator.process_index, accelerator.is_main_process
    world = accelerator.num_processes
    found = _agreed_checkpoint(accelerator, out_dir, cfg) if cfg.checkpoint.resume else None
    set_seed(cfg.train.seed, device_specific=True)
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    prompts_all = read_prompts(cfg.train.prompts)
    # indexed before the models load: a bad regularization source fails at once
    reg_feed = RegularizationFeed(cfg, rank) if cfg.regularization.enabled else None
    with accelerator.main_process_first():  # one process fills the model cache (downloads, the tiny world) at a time
        m = apply_speed_switches(build_models(cfg, scheme, device, weight_dtype), cfg, device)
    if reg_feed is not None:
        reg_feed.fit(m.latent_shape, vae_scale_factor(m.vae))
    opt_s = student_optimizer(m, cfg, device)
    opt_l = _adamw(m.lora_params, cfg.lora_teacher.lr, cfg, device)
    student, teacher_ddp, opt_s, opt_l = accelerator.prepare(m.student, m.teacher_unet, opt_s, opt_l)
    m.student = student
    teacher_plain = m.teacher_unet  # adapters switch on the unwrapped module; updates go through the wrapper
    m.teacher_trainer = teacher_ddp
    unwrapped = accelerator.unwrap_model(m.student)
    ema = None
    if cfg.ema.enabled:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(m.student_params, decay=cfg.ema.decay)
    sampler = PromptSampler(prompts_all, cfg.train.batch_size, cfg.train.seed + rank)
    null_emb = encode_prompts(m.text_encoder, m.tokenizer, [""], device)
    cache = None
    if cfg.train.prompt_embeddings:
        from sb2.prompts.embeddings import EmbeddingCache

        cache = EmbeddingCache(cfg.train.prompt_embeddings, teacher=cfg.models.teacher, prompts=cfg.train.prompts)
    autocast = accelerator.autocast if use_cuda else nullcontext

    start, skipped_total = 0, 0
    if found is not None:
        found = ckpt.load_checkpoint(found.path, rank, found.shared)
        sh = found.shared
        _load_student_state(unwrapped, scheme, sh["student"])
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(teacher_plain, sh["lora_teacher"])
        _load_student_optimizer(opt_s, sh, cfg)
        rates = [g["lr"] for g in opt_l.param_groups]  # this run's lora_teacher.lr, as for the student
        opt_l.load_state_dict(sh["opt_lora_teacher"])
        for g, lr in zip(opt_l.param_groups, rates, strict=True):
            g["lr"] = lr
        if ema is not None and sh.get("ema") is not None:
            ema.load_state_dict(sh["ema"])
        start, skipped_total = int(sh["step"]), int(sh.get("nonfinite_skips", 0))
        if found.rank is not None:
            sampler.load_state_dict(found.rank["sampler"])
            if reg_feed is not None and "reg_sampler" in found.rank:
                reg_feed.load_state_dict(found.rank["reg_sampler"])
            ckpt.restore_rng(found.rank["rng"])
        else:  # a process the checkpoint has no state for (checkpoint.world_size_change=resume): fresh streams
            import numpy as np

            set_seed(int(np.random.SeedSequence([cfg.train.seed, start, rank]).generate_state(1)[0]))
        if main:
            print(f"resuming from {found.path} (step {start})", file=sys.stderr)

    def save_checkpoint(step: int) -> None:
        # Every process writes its rank file between two barriers; the main process then writes the shared state and
        # the manifest (which must list every process's file) and renames the folder into place.
        if main:
            ckpt.begin_checkpoint(out_dir, step)
        accelerator.wait_for_everyone()
        rank_state = {"rng": ckpt.capture_rng(), "sampler": sampler.state_dict()}
        if reg_feed is not None:
            rank_state["reg_sampler"] = reg_feed.state_dict()
        ckpt.write_rank_state(out_dir, step, rank, rank_state)
        accelerator.wait_for_everyone()
        if main:
            shared = {
                "step": step, "scheme": scheme, "nonfinite_skips": skipped_total,
                "student": _student_state(m, scheme, unwrapped), "lora_teacher": lora_state_dict(teacher_plain),
                "opt_student": opt_s.state_dict(), "opt_lora_teacher": opt_l.state_dict(),
                "student_lr_scale": dict(cfg.optim.student_lr_scale),
                "ema": ema.state_dict() if ema is not None else None,
                "config": json.dumps(safe_config(cfg)),
            }
            ckpt.finish_checkpoint(out_dir, step, shared, cfg.checkpoint.keep_last, world)
        accelerator.wait_for_everyone()

    own_logger = logger is None
    if logger is None:
        logger = stage_logger(cfg, f"train_{scheme}", out_dir) if main else None
    if logger is not None and start == 0:
        logger.log_params({"scheme": scheme, **cfg.model_dump(mode="json")})
    preview_prompts = prompts_all[:PREVIEW_PROMPTS]

    bar = tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps, desc=f"train[{scheme}]",
               disable=not (progress and main))
    logs: dict[str, torch.Tensor | float] = {}
    t_last, n_last, consecutive = time.perf_counter(), 0, 0
    last_saved = start if found is not None else None
    budget = _GraceBudget(cfg.checkpoint.grace_period_s, main)

    def newest_checkpoint() -> str:
        if last_saved is None:
            return "No checkpoint was complete yet: the next run starts over."
        return (f"The newest complete checkpoint is step {last_saved} in {out_dir / ckpt.CKPT_DIR}; the next run "
                f"resumes from it.")

    with _Preemption(cfg.checkpoint.grace_period_s, rank, newest_checkpoint) as preempt:
        for step in bar:
            t_step = time.perf_counter()
            prompts = sampler.next_batch()
            if cache is not None:
                emb = cache.lookup(prompts).to(device, null_emb.dtype)
            else:
                emb = encode_prompts(m.text_encoder, m.tokenizer, prompts, device)
            pairs = reg_feed.batch_for(step) if reg_feed is not None else None
            if pairs is None:
                loss, x0, logs, shared_l = student_step(m, cfg, emb, null_emb, prompts, step, autocast)
            else:
                reg = regularization_batch(m, cfg, pairs, device, autocast)
                loss, x0, logs, shared_l = student_step(m, cfg, emb, null_emb, prompts, step, autocast, reg=reg)
                logs["reg/skipped_pairs"] = len(reg_feed.sampler.bad)
            # One host sync per backward (the gradient norm): no collective before it (see backward_seed), and the
            # losses stay on the device until a log step.
            if shared_l is not None:  # vsd.shared_lora_pass: the LoRA teacher's first update, from the VSD pass
                accelerator.backward(shared_l, gradient=backward_seed(shared_l))
            accelerator.backward(loss, gradient=backward_seed(loss))
            gn_s = float(accelerator.clip_grad_norm_(m.student_params, cfg.optim.max_grad_norm))
            ok = math.isfinite(gn_s)
            if ok:
                opt_s.step()
                if ema is not None:
                    ema.step(m.student_params)
            else:
                after_skipped_update(accelerator)
            opt_s.zero_grad(set_to_none=True)
            if not ok:
                opt_l.zero_grad(set_to_none=True)  # a shared pass's LoRA gradients go with the skipped step
            if ok:
                for i in range(cfg.lora_teacher.updates_per_student_update):
                    if i == 0 and shared_l is not None:
                        loss_l = shared_l  # its backward ran with the student's
                    else:
                        loss_l = lora_teacher_loss(m, cfg, x0, emb, null_emb, autocast)
                        accelerator.backward(loss_l, gradient=backward_seed(loss_l))
                    gn_l = float(accelerator.clip_grad_norm_(m.lora_params, cfg.optim.max_grad_norm))
                    if not math.isfinite(gn_l):
                        after_skipped_update(accelerator)
                        opt_l.zero_grad(set_to_none=True)
                        ok = False
                        break
                    opt_l.step()
                    opt_l.zero_grad(set_to_none=True)
            if not ok:
                consecutive += 1
                skipped_total += 1
                msg = f"step {step + 1}: non-finite loss or gradient, update skipped ({consecutive} in a row)"
                print(f"warning: {msg}", file=sys.stderr)
                if logger is not None:
                    logger.log_metrics({"train/nonfinite_skips": skipped_total}, step + 1)
                if consecutive >= cfg.train.max_consecutive_nonfinite:
                    kept = ("No checkpoint was written yet" if last_saved is None else
                            f"The last good checkpoint (step {last_saved}) is kept in {out_dir / ckpt.CKPT_DIR}")
                    if own_logger and logger is not None:  # an MLflow run left open would capture the next stage's
                        logger.close()
                    raise TrainingDiverged(
                        f"{consecutive} consecutive non-finite steps at step {step + 1}; stopped. {kept}; lower the "
                        f"learning rate or check the inputs, then run again to resume from it.")
            else:
                consecutive = 0
                n_last += cfg.train.batch_size * accelerator.num_processes
                logs.update({"loss/lora_teacher": loss_l.detach(), "grad_norm/student": gn_s,
                             "grad_norm/lora_teacher": gn_l, "lr/student": opt_s.param_groups[0]["lr"],
                             "lr/lora_teacher": opt_l.param_groups[0]["lr"], "train/nonfinite_skips": skipped_total})
                logs.update({f"lr/student/{g['name']}": g["lr"] for g in opt_s.param_groups[1:]})
                log_step = (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps
                if log_step and (logger is not None or not bar.disable):
                    logs = _on_host(logs)
                    bar.set_postfix(vsd=f"{logs['loss/vsd']:.4g}", lora=f"{logs['loss/lora_teacher']:.4g}")
                if log_step and logger is not None:
                    now = time.perf_counter()
                    logs["throughput/samples_per_s"] = n_last / max(now - t_last, 1e-9)
                    t_last, n_last = now, 0
                    logger.log_metrics(logs, step + 1)
            done = step + 1
            budget.step_s = time.perf_counter() - t_step
            # One decision for all processes, at the same step (a signal may reach them at different steps).
            stop = _anywhere(accelerator, preempt.requested)
            if stop:
                preempt.arm()
            every = cfg.tracking.image_every
            if logger is not None and every and done % every == 0 and done != cfg.train.steps and not stop:
                grid = _preview(m, cfg, unwrapped, preview_prompts, out_dir / "logs" / f"samples-{done:08d}.png",
                                device, weight_dtype)
                logger.log_image(grid, "samples", step=done)
            # The first step of every run also checkpoints: it measures the write time against the grace period,
            # and an unwritable checkpoint folder fails in the first minute rather than at `checkpoint.every`.
            if consecutive == 0 and (done % cfg.checkpoint.every == 0 or done == cfg.train.steps or stop
                                     or step == start):
                t_save = time.perf_counter()
                save_checkpoint(done)
                last_saved = done
                budget.save_s = time.perf_counter() - t_save
                preempt.checkpointed = stop
            budget.check(step - start + 1)
            if stop:
                if main:
                    saved = (f"checkpoint at step {done} saved in {out_dir / ckpt.CKPT_DIR}" if last_saved == done
                             else f"no checkpoint after a non-finite step. {newest_checkpoint()}")
                    print(f"{preempt.signal_name}: {saved}; exiting with code 0 to resume later", file=sys.stderr)
                if own_logger and logger is not None:
                    logger.close()
                raise SystemExit(0)

    accelerator.wait_for_everyone()
    student_path = out_dir / "student"
    if main:
        if ema is not None:
            ema.copy_to(m.student_params)  # the EMA weights are the branch's result
        with atomic_dir(student_path) as tmp:
            if scheme == "full":
                unwrapped.save_pretrained(tmp)
            else:
                save_lora(unwrapped, tmp, cfg.models.student)
        with atomic_dir(out_dir / "lora_teacher") as tmp:
            save_lora(teacher_plain, tmp, cfg.models.teacher)
        grid = _preview(m, cfg, unwrapped, preview_prompts, out_dir / "samples.png", device, weight_dtype)
        (out_dir / "train.json").write_text(json.dumps(
            {"scheme": scheme, "steps": cfg.train.steps, "nonfinite_skips": skipped_total, "final": _on_host(logs),
             "student": str(student_path), "mlflow_run_id": getattr(logger, "run_id", None)}, indent=2))
        if logger is not None:
            logger.log_image(grid, "samples", step=cfg.train.steps)
            logger.log_artifact(out_dir / "train.json")
    if own_logger and logger is not None:
        logger.close()
    accelerator.end_training()
    return student_path


@torch.no_grad()
def _preview(m: Models, cfg: Config, student, prompts: list[str], path: Path, device, dtype) -> Path:
    from sb2.generation.generator import OneStepGenerator
    from sb2.generation.images import save_grid

    was_training = student.training
    student.eval()
    gen = OneStepGenerator(student, m.text_encoder, m.tokenizer, m.vae, m.alphas_cumprod,
                           cfg.vsd.student_timestep, cfg.models.student_prediction_type)
    ps = prompts[:PREVIEW_PROMPTS]
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        images = gen(ps, seeds=list(range(len(ps))))
    student.train(was_training)
    return save_grid(images, path, cols=4)
