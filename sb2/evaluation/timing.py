"""Timing: the per-phase breakdown of an evaluation, and inference timing by the paper's protocol (7.5).

Paper 7.5: warm up with 5 calls, then time 50 calls, 10 times over, and average; a call is text encoding + UNet +
VAE decoding in float16. Each call here ends with a device synchronization, so a figure is the latency of one call.
"""

from __future__ import annotations

import contextlib
import json
import platform
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class PhaseTimer:
    """Wall-clock seconds per named phase, with the device synchronized at each boundary so that asynchronous GPU work
    is charged to the phase that launched it."""

    def __init__(self, device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.seconds[phase] += time.perf_counter() - start

    def summary(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}


def summarize_repeats(per_call_seconds: list[float]) -> dict[str, float]:
    """Mean and spread over the repeats of the mean call time (seconds)."""
    return {
        "mean_s": statistics.fmean(per_call_seconds),
        "std_s": statistics.stdev(per_call_seconds) if len(per_call_seconds) > 1 else 0.0,
        "min_s": min(per_call_seconds),
        "max_s": max(per_call_seconds),
    }


def time_calls(call, device, warmup: int, calls: int, repeats: int) -> list[float]:
    """Mean seconds per call of each repeat, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        call()
    synchronize(device)
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            call()
            synchronize(device)
        out.append((time.perf_counter() - start) / calls)
    return out


def timing(model: str | Path, cfg, out_dir: str | Path, device: str | None = None) -> dict:
    """The timing stage: ``out_dir/timing.json`` with the mean and spread of one call's latency, and the card."""
    from sb2.generation.generator import OneStepGenerator

    tcfg = cfg.evaluate.timing
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = tcfg.dtype if torch.device(device).type != "cpu" else "float32"
    gen = OneStepGenerator.load(model, cfg, device=device, dtype=dtype, decoder="vae")
    prompts = [tcfg.prompt] * tcfg.batch_size
    seeds = list(range(tcfg.batch_size))
    noise = gen.noise(seeds)

    @torch.no_grad()
    def call():  # text encoding + UNet + VAE decoding, as paper 7.5
        from sb2.student import decode

        return decode(gen.decoder, gen.latents(gen.encode(prompts), noise).to(gen.decoder.dtype))

    per_call = time_calls(call, device, tcfg.warmup, tcfg.calls, tcfg.repeats)
    record = {
        "model": str(model), "device": device_name(device), "dtype": dtype, "batch_size": tcfg.batch_size,
        "warmup": tcfg.warmup, "calls": tcfg.calls, "repeats": tcfg.repeats,
        **summarize_repeats(per_call), "per_repeat_s": per_call,
        "protocol": "paper 7.5: text encoding + UNet + VAE decoding per call, device synchronized after each call",
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "timing.json").write_text(json.dumps(record, indent=2))
    return record
