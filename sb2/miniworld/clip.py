"""The mini-world's CLIP: an open_clip ``CLIP`` trained contrastively on the world's training pairs, saved as an
open_clip folder (``load_clip("…/clip")`` reads it), and its text tower converted to a transformers
``CLIPTextModel`` — the teacher's text encoder, as SD2's is OpenCLIP's text tower."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from sb2.miniworld.fitting import Progress, WorldData, autocast, optimizer, step
from sb2.miniworld.tokenizer import CONTEXT_LENGTH, load_tokenizer, save_tokenizer, tokenize, vocab_size

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def clip_config(width: int = 128, layers: int = 4, vision_width: int = 128, vision_layers: int = 4,
                embed_dim: int = 128) -> dict:
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 64, "layers": vision_layers, "width": vision_width, "head_width": 32,
                       "patch_size": 8},
        # hf_tokenizer_name: open_clip then reads the CLIPTokenizer saved in the model's own folder (local-dir).
        "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": vocab_size(), "width": width,
                     "heads": max(1, width // 32), "layers": layers, "hf_tokenizer_name": "miniworld-clip-bpe"},
    }


def image_input(images_uint8: torch.Tensor) -> torch.Tensor:
    x = images_uint8.permute(0, 3, 1, 2).float() / 255
    return (x - 0.5) / 0.5


def train_clip(data: WorldData, ids_all: torch.Tensor, model_cfg: dict, steps: int, batch: int, lr: float,
               seed: int, device, max_seconds: float | None = None) -> tuple[torch.nn.Module, dict]:
    """``ids_all``: the token ids of ``data.captions`` (N, 77), on ``device``."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg).to(device)
    progress = Progress(f"clip{seed}", steps, max_seconds)
    opt, sched = optimizer(model.parameters(), lr, progress, weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    for i in range(steps):
        images, _, idx = data.batch(gen, batch)
        with autocast(device):
            img = F.normalize(model.encode_image(image_input(images)), dim=-1)
            txt = F.normalize(model.encode_text(ids_all[idx.to(device)]), dim=-1)
            logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
            # Under-specified captions repeat: pairs with the same caption are positives too.
            same = ids_all[idx.to(device)]
            pos = (same[:, None] == same[None]).all(-1).float()
            target = pos / pos.sum(1, keepdim=True)
            loss = 0.5 * (torch.sum(-target * logits.float().log_softmax(1), 1).mean()
                          + torch.sum(-target * logits.float().T.log_softmax(1), 1).mean())
        step(opt, sched, loss, model.parameters())
        if progress(i, loss=loss.item()):
            break
    return model.eval().requires_grad_(False), progress.summary()


@torch.no_grad()
def retrieval_accuracy(model, tokenizer, images_uint8: torch.Tensor, captions: list[str], group: int = 64) -> dict:
    """Top-1 image→caption and caption→image accuracy within groups of ``group`` pairs (chance 1/group; under-
    specified captions make 100 % unreachable)."""
    device = next(model.parameters()).device
    hits_i, hits_t, n = 0, 0, 0
    for a in range(0, len(captions) - group + 1, group):
        img = F.normalize(model.encode_image(image_input(images_uint8[a : a + group].to(device))), dim=-1)
        txt = F.normalize(model.encode_text(tokenize(tokenizer, captions[a : a + group]).to(device)), dim=-1)
        sim = img @ txt.T
        target = torch.arange(group, device=device)
        hits_i += (sim.argmax(1) == target).sum().item()
        hits_t += (sim.argmax(0) == target).sum().item()
        n += group
    return {"image_to_text_top1": hits_i / n, "text_to_image_top1": hits_t / n, "group": group}


def save_open_clip_model(model, model_cfg: dict, folder: str | Path, dtype=torch.float16) -> Path:
    """``open_clip_config.json`` + ``open_clip_model.safetensors`` + the tokenizer files, the Hub layout."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": list(MEAN), "std": list(STD)}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    save_tokenizer(folder)
    return folder


def text_encoder_from_open_clip(model, dtype=torch.float32):
    """open_clip's text tower as a transformers ``CLIPTextModel`` with the same per-token hidden states
    (``last_hidden_state`` = open_clip's ``ln_final`` output): what a diffusers pipeline conditions on."""
    from transformers import CLIPTextConfig, CLIPTextModel

    width = model.token_embedding.weight.shape[1]
    blocks = model.transformer.resblocks
    act = type(blocks[0].mlp.gelu).__name__
    v = model.token_embedding.weight.shape[0]
    config = CLIPTextConfig(
        vocab_size=v, hidden_size=width, intermediate_size=blocks[0].mlp.c_fc.out_features,
        num_hidden_layers=len(blocks), num_attention_heads=blocks[0].attn.num_heads,
        max_position_embeddings=model.positional_embedding.shape[0], layer_norm_eps=model.ln_final.eps,
        hidden_act="quick_gelu" if act == "QuickGELU" else "gelu", projection_dim=width,
        bos_token_id=v - 2, eos_token_id=v - 1, pad_token_id=0,
    )
    sd = {"text_model.embeddings.token_embedding.weight": model.token_embedding.weight,
          "text_model.embeddings.position_embedding.weight": model.positional_embedding,
          "text_model.final_layer_norm.weight": model.ln_final.weight,
          "text_model.final_layer_norm.bias": model.ln_final.bias}
    for i, b in enumerate(blocks):
        p = f"text_model.encoder.layers.{i}."
        for name, w, bias in zip(("q_proj", "k_proj", "v_proj"), b.attn.in_proj_weight.chunk(3),
                                 b.attn.in_proj_bias.chunk(3)):
            sd[p + f"self_attn.{name}.weight"], sd[p + f"self_attn.{name}.bias"] = w, bias
        pairs = {"self_attn.out_proj": b.attn.out_proj, "layer_norm1": b.ln_1, "layer_norm2": b.ln_2,
                 "mlp.fc1": b.mlp.c_fc, "mlp.fc2": b.mlp.c_proj}
        for name, mod in pairs.items():
            sd[p + name + ".weight"], sd[p + name + ".bias"] = mod.weight, mod.bias
    enc = CLIPTextModel(config)
    # transformers 5 names the keys without the "text_model." prefix that its saved files (and 4.x) carry.
    prefix = "text_model." if any(k.startswith("text_model.") for k in enc.state_dict()) else ""
    sd = {prefix + k.removeprefix("text_model."): v.detach().float().cpu() for k, v in sd.items()}
    missing, unexpected = enc.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"text tower conversion: missing {missing}, unexpected {unexpected}")
    return enc.to(dtype).eval()


def open_clip_token_states(model, ids: torch.Tensor) -> torch.Tensor:
    """open_clip's per-token text features before pooling (its ``encode_text`` up to ``ln_final``)."""
    x = model.token_embedding(ids) + model.positional_embedding
    x = model.transformer(x, attn_mask=model.attn_mask)
    return model.ln_final(x)


def tokenizer_of(folder: str | Path):
    return load_tokenizer(folder)
