"""The tiny world: random models with the real architectures' classes and file formats, built from small configs on
CPU in seconds and saved like the real ones (a diffusers pipeline folder, a UNet folder, an AutoencoderTiny folder and
an open_clip folder), so that the loader reads them through exactly the code path it uses for SD2.1."""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

import torch

TINY_VERSION = "v1"
TINY_COMPONENTS = ("teacher", "student", "tiny_vae", "clip")
TEXT_DIM = 32


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


@lru_cache(maxsize=1)
def clip_bpe_vocab() -> tuple[dict[str, int], list[str]]:
    """The OpenAI CLIP BPE vocabulary (49,408 tokens) rebuilt from the merges file that open_clip ships, in the form
    of ``vocab.json``/``merges.txt`` that transformers' ``CLIPTokenizer`` reads — the SD2.1 tokenizer, offline."""
    from open_clip.tokenizer import default_bpe

    merges_lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = merges_lines[1 : 49152 - 256 - 2 + 1]
    tokens = list(_bytes_to_unicode().values())
    tokens = tokens + [t + "</w>" for t in tokens]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def save_clip_tokenizer(folder: Path) -> None:
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!", model_max_length=77)
    tok.save_pretrained(folder)


def tiny_unet(seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=16,
        use_linear_projection=True,  # as SD2.x
    )


def tiny_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.18215,
    )


def tiny_autoencoder_tiny(seed: int):
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    return AutoencoderTiny(
        encoder_block_out_channels=(16, 16, 16, 16),
        decoder_block_out_channels=(16, 16, 16, 16),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
        scaling_factor=1.0,
    )


def tiny_text_encoder(seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=TEXT_DIM,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=TEXT_DIM,
            hidden_act="gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=0,
        )
    )


def sd_scheduler():
    """SD2.1-base's noise schedule (scaled-linear β from 0.00085 to 0.012, 1000 steps, ε-prediction)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
    )


TINY_OPEN_CLIP_CFG = {
    "embed_dim": TEXT_DIM,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def save_open_clip(folder: Path, seed: int, model_cfg: dict | None = None) -> None:
    """Save a random open_clip model as ``open_clip_config.json`` + ``open_clip_model.safetensors`` (the Hub format)."""
    import open_clip
    from safetensors.torch import save_file

    model_cfg = model_cfg or TINY_OPEN_CLIP_CFG
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
    }
    (folder / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))


def build_tiny_world(root: str | Path) -> Path:
    """Build (once) every tiny model under ``root/<version>/`` and return that folder."""
    from sb2.atomic import atomic_dir

    root = Path(root)
    final = root / TINY_VERSION
    if (final / "done").is_file():
        return final
    from diffusers import StableDiffusionPipeline  # after the check: the import alone takes seconds

    # Building seeds torch's global RNG; a run that builds the world must draw the same numbers as one that finds it.
    with torch.random.fork_rng(devices=[]), atomic_dir(final) as tmp:
        tok_dir = tmp / "_tokenizer"
        save_clip_tokenizer(tok_dir)
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
        teacher = StableDiffusionPipeline(
            vae=tiny_vae(1), text_encoder=tiny_text_encoder(2), tokenizer=tokenizer, unet=tiny_unet(3),
            scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        teacher.save_pretrained(tmp / "teacher")
        tiny_unet(4).save_pretrained(tmp / "student" / "unet")
        tiny_autoencoder_tiny(5).save_pretrained(tmp / "tiny_vae")
        save_open_clip(tmp / "clip", seed=6)
        import shutil

        shutil.rmtree(tok_dir)
        (tmp / "done").write_text("ok\n")
    return final
