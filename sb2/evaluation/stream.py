"""One-step images streamed in batches as uint8 tensors on the device, straight into the judges; PNGs only on request
(for audit: writing 30K PNGs costs more than generating them)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import torch
from PIL import Image

from sb2.evaluation.preprocess import to_uint8
from sb2.student import decode


def prepare_for_speed(gen, channels_last: bool, compile: bool) -> None:
    """channels_last and torch.compile on CUDA; the one-step math is unchanged."""
    if gen.device.type != "cuda":
        return
    if channels_last:
        gen.unet.to(memory_format=torch.channels_last)
        gen.decoder.to(memory_format=torch.channels_last)
    if compile:
        gen.unet = torch.compile(gen.unet)
        gen.decoder.decoder = torch.compile(gen.decoder.decoder)


@torch.no_grad()
def generate_uint8(gen, captions: list[str], seeds: list[int], batch_size: int,
                   timer=None) -> Iterator[tuple[int, list[str], torch.Tensor]]:
    """(start index, captions, uint8 images (B, 3, H, W) on the generator's device), one batch at a time. Image i comes
    from its own seed, so it does not depend on the batch size. The last batch is padded to the full size (and the
    padding dropped): one input shape for cudnn's autotuning and torch.compile, instead of a second at the very end."""
    batch_size = min(batch_size, len(captions))
    for start in range(0, len(captions), batch_size):
        batch, batch_seeds = captions[start:start + batch_size], seeds[start:start + batch_size]
        pad = batch_size - len(batch)
        with timer("generation") if timer else nullcontext():
            x0 = gen.latents(gen.encode(batch + batch[-1:] * pad), gen.noise(batch_seeds + batch_seeds[-1:] * pad))
            images = to_uint8(decode(gen.decoder, x0.to(gen.decoder.dtype)))[:len(batch)]
        yield start, batch, images


class ImageWriter:
    """Writes ``<folder>/<index>.png`` and ``captions.txt`` in background threads (Pillow's PNG encoder releases the
    GIL), so an audit copy slows the stream down less."""

    def __init__(self, folder: str | Path, workers: int = 4):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.pool = ThreadPoolExecutor(workers)
        self.futures = []
        self.captions: list[str] = []

    def write(self, start: int, captions: list[str], images: torch.Tensor) -> None:
        for i, a in enumerate(images.permute(0, 2, 3, 1).cpu().numpy()):
            path = self.folder / f"{start + i:05d}.png"
            self.futures.append(self.pool.submit(lambda a=a, path=path: Image.fromarray(a).save(path)))
        self.captions += captions

    def close(self) -> None:
        for f in self.futures:
            f.result()
        self.pool.shutdown()
        (self.folder / "captions.txt").write_text("\n".join(self.captions) + "\n", encoding="utf-8")
