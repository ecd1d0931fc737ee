"""What every mini-world trainer shares: the device's autocast, AdamW with warmup + cosine decay, batches of the
in-memory dataset, and images as the networks take them."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch


@dataclass
class WorldData:
    """A fixed set of (image, caption) pairs, images uint8 (N, 64, 64, 3) on the training device."""

    images: torch.Tensor
    captions: list[str]
    scenes: object  # sb2.miniworld.world.Scenes

    def __len__(self) -> int:
        return len(self.captions)

    def batch(self, gen: torch.Generator, size: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        idx = torch.randint(0, len(self), (size,), generator=gen)
        return self.images[idx.to(self.images.device)], [self.captions[i] for i in idx.tolist()], idx


def to_signed(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) or (B, 3, H, W) → float (B, 3, H, W) in [-1, 1]."""
    x = images_uint8 if images_uint8.shape[1] == 3 else images_uint8.permute(0, 3, 1, 2)
    return x.float() / 127.5 - 1


def autocast(device) -> object:
    return torch.autocast("cuda", torch.bfloat16) if torch.device(device).type == "cuda" else nullcontext()


def optimizer(params, lr: float, progress: Progress, warmup: int = 100, weight_decay: float = 0.0,
              betas=(0.9, 0.99)):
    """AdamW, linear warmup, then cosine decay to 5 % over the run — whose end is its step count or its time
    budget, whichever comes first (``progress.fraction``), so a run cut by time still ends annealed."""
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=weight_decay, betas=betas)
    warmup = max(1, min(warmup, progress.steps // 10))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * progress.fraction(step))) * 0.95 + 0.05

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def step(opt, sched, loss: torch.Tensor, params=None, clip: float = 1.0) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if params is not None:
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    sched.step()


class Progress:
    """A trainer's clock: prints its losses every ``every`` steps (so a killed run still shows how far it got) and
    says when its step count or time budget is spent (``__call__`` returns True: stop)."""

    def __init__(self, name: str, steps: int, max_seconds: float | None = None, every: int | None = None):
        self.name, self.steps, self.max_seconds = name, steps, max_seconds
        self.every, self.t0, self.done = every or max(1, steps // 5), time.perf_counter(), 0

    def fraction(self, step: int) -> float:
        by_time = (time.perf_counter() - self.t0) / self.max_seconds if self.max_seconds else 0.0
        return min(1.0, max(step / max(1, self.steps), by_time))

    def __call__(self, i: int, **values: float) -> bool:
        self.done = i + 1
        stop = self.fraction(i + 1) >= 1.0
        if i % self.every == 0 or stop:
            text = " ".join(f"{k}={v:.4g}" for k, v in values.items())
            print(f"[{self.name}] step {i + 1}/{self.steps} {text} ({time.perf_counter() - self.t0:.0f}s)", flush=True)
        return stop

    def summary(self) -> dict:
        return {"steps": self.done, "seconds": round(time.perf_counter() - self.t0, 1)}

    def seconds(self) -> float:
        return time.perf_counter() - self.t0
