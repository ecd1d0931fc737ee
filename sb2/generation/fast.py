"""The GPU fast path of one-step generation: prompt token ids + noise → image in one replay of a CUDA graph.

One-step generation at batch 1 is bound by kernel launches (about a thousand per image), not by arithmetic: a CUDA
graph replays them with one launch. The graph needs static shapes, so one is captured per batch size, on demand;
convolutions run NHWC (channels_last) with cuDNN's autotuned algorithms, which the VAE decoder at 512 px
(2.5 TFLOP, most of the image's arithmetic) needs most.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch._inductor.config

from sb2.student import decode, student_x0


# Inductor settings of the "tuned" compile (diffusers' recipe for fast SD inference): 1×1 convolutions as matrix
# multiplies, no epilogue fusion into GEMMs; and, separately because it makes compiling several times longer (over
# six minutes for the SD2.1 UNet and VAE at batch 1 on an H100, measured), coordinate-descent tuning of the generated
# kernels' launch parameters.
TUNED_INDUCTOR = {"conv_1x1_as_mm": True, "epilogue_fusion": False}
COORDINATE_DESCENT = {"coordinate_descent_tuning": True, "coordinate_descent_check_all_directions": True}


def fuse_projections(*models: torch.nn.Module) -> None:
    """Fuse each attention's q/k/v (self-attention) or k/v (cross-attention) projections into one matrix multiply, in
    place, where the model supports it (diffusers' UNets and AutoencoderKL; not AutoencoderTiny, which has none)."""
    for m in models:
        if hasattr(m, "fuse_qkv_projections") and getattr(m, "original_attn_processors", None) is None:
            m.fuse_qkv_projections()


class GraphedOneStep:
    """Wraps a :class:`~sb2.generation.generator.OneStepGenerator` on a CUDA device. ``tuned`` (with ``compile``):
    fused attention projections and :data:`TUNED_INDUCTOR` while compiling; ``coordinate_descent`` adds
    :data:`COORDINATE_DESCENT`."""

    def __init__(self, gen, compile: bool = False, warmup: int = 2, tuned: bool = False,
                 coordinate_descent: bool = False):
        if gen.device.type != "cuda":
            raise ValueError("the CUDA-graph fast path needs a CUDA device")
        self.gen, self.warmup, self.tuned = gen, warmup, tuned and compile
        self.inductor = {**TUNED_INDUCTOR, **(COORDINATE_DESCENT if coordinate_descent else {})}
        gen.alphas_cumprod = gen.alphas_cumprod.to(gen.device)  # no host-to-device copy inside the graph
        torch.backends.cudnn.benchmark = True
        for m in (gen.unet, gen.decoder):
            m.to(memory_format=torch.channels_last)
        if self.tuned:
            fuse_projections(gen.unet, gen.decoder)
        self._fn = torch.compile(self._forward, dynamic=False) if compile else self._forward
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def _forward(self, ids: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        g = self.gen
        emb = g.text_encoder(ids)[0]
        x0 = student_x0(g.unet, z, emb, g.alphas_cumprod, g.timestep, g.prediction_type)
        return decode(g.decoder, x0.to(g.decoder.dtype))

    def _capture(self, ids: torch.Tensor, z: torch.Tensor):
        static_ids, static_z = ids.clone(), z.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        tuning = torch._inductor.config.patch(self.inductor) if self.tuned else nullcontext()
        with torch.cuda.stream(stream), tuning:  # warm-up off the default stream: cuDNN autotuning, compile, allocations
            for _ in range(self.warmup):
                self._fn(static_ids, static_z)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._fn(static_ids, static_z)
        return graph, static_ids, static_z, out

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        tok = self.gen.tokenizer
        return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids

    @torch.no_grad()
    def run(self, ids: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] on the GPU; the output buffer is reused by the next call of the same batch size."""
        b = ids.shape[0]
        ids = ids.to(self.gen.device, non_blocking=True)
        z = z.to(self.gen.device, self.gen.dtype, non_blocking=True).contiguous(memory_format=torch.channels_last)
        if b not in self._graphs:
            self._graphs[b] = self._capture(ids, z)
        graph, s_ids, s_z, out = self._graphs[b]
        s_ids.copy_(ids)
        s_z.copy_(z)
        graph.replay()
        return out

    def __call__(self, prompts: list[str], seeds: list[int] | None = None, noise: torch.Tensor | None = None):
        if noise is None:
            noise = self.gen.noise(list(range(len(prompts))) if seeds is None else seeds)
        return self.run(self.tokenize(prompts), noise).float().cpu()
