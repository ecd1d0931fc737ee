"""The mini-world's caption files and reference images, as the distillation and the evaluation protocol read them.

- ``prompts.txt``: the distillation prompts, distinct training-split captions of scenes far past those the
  pretrained models learned from (the paper distills on prompts, never on the teacher's training pairs);
- ``eval_captions.txt``: the first N evaluation captions (one a line; ``evaluate.captions`` reads them in order);
- ``reference/``: the images of exactly those evaluation scenes, ``000000.png`` …, the FID/precision-recall
  reference (as COCO val2014 images are for COCO captions).
"""

from __future__ import annotations

from pathlib import Path

from sb2.miniworld import world

PROMPTS_START = 1_000_000  # scene index where the distillation prompts begin, far past any pretraining pair


def write_caption_files(out: str | Path, seed: int = 0, num_prompts: int = 8_000,
                        num_eval: int = 2048) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prompts: list[str] = []
    seen: set[str] = set()
    start = PROMPTS_START
    while len(prompts) < num_prompts:
        for c in world.captions(world.sample_scenes(seed, "train", world.BLOCK, start)):
            if c not in seen and len(prompts) < num_prompts:
                seen.add(c)
                prompts.append(c)
        start += world.BLOCK
    paths = {"prompts": out / "prompts.txt", "eval_captions": out / "eval_captions.txt"}
    paths["prompts"].write_text("\n".join(prompts) + "\n")
    paths["eval_captions"].write_text("\n".join(world.captions(world.sample_scenes(seed, "eval", num_eval))) + "\n")
    return paths


def write_reference_images(out: str | Path, seed: int = 0, num_eval: int = 2048, start: int = 0) -> Path:
    """The images of the evaluation split's scenes ``start`` … ``start + num_eval − 1`` (the evaluation captions are
    scenes 0 … num_eval − 1; the bench's validation captions the next num_eval)."""
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(world.render(world.sample_scenes(seed, "eval", num_eval, start=start))):
        Image.fromarray(im).save(out / f"{i:06d}.png")
    return out
