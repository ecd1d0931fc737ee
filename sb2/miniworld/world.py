"""The mini-world: procedural 64×64 scenes of 1–3 flat objects with known attributes, and captions describing them.

A scene is a record (:class:`Scenes`, arrays over N scenes × 3 object slots): each object has a shape, a color, a
size and a cell of a 3×3 grid (one object per cell, jittered a few pixels), on a muted dark or light background with
a linear gradient. Rendering is vectorized numpy over the whole batch (anti-aliased signed distances).

A caption names every object's shape, and each other attribute only with some probability, so a caption is often
under-specified (one caption ↔ many valid images); what it does say is kept in the record (``says_*``), which is how
the alignment judge scores a generated image exactly.

The paper's zero-shot protocol (sec. 5.1: distill on one prompt set, evaluate on COCO captions) in miniature:

- ``train`` scenes (the distillation prompts, and the pairs every pretrained model learns from) use the training
  templates and never contain a held-out (color, shape) pair;
- ``eval`` scenes (the evaluation captions, and the reference images rendered from them) use other templates, and
  about a third of them contain a held-out pair — combinations no model has seen.

Everything is a function of (seed, split, index range): the same arguments give the same scenes, captions and pixels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

SIZE = 64
MAX_OBJECTS = 3
SHAPES = ("circle", "square", "triangle", "diamond", "ring")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
RGB = np.array([[215, 40, 40], [40, 170, 60], [45, 80, 225], [235, 210, 45], [150, 55, 195], [245, 140, 30]],
               np.float32)
SIZES = ("small", "large")
# Pixels (circumradius), per size: uniform in the range. A latent cell of the 8× VAE is 8×8 px: a small object must
# span more than one (the first build's 4.5–6 px objects did not survive the VAE), and large stays ≥ 1.35× small.
RADII = ((5.5, 7.0), (9.5, 11.0))
BACKGROUNDS = ("dark", "light")
# The 3×3 grid, row-major; cell centers in pixels.
CELL_CENTERS = np.array([10.5, 31.5, 52.5], np.float32)
POSITIONS = ("in the top left", "at the top", "in the top right", "on the left", "in the center", "on the right",
             "in the bottom left", "at the bottom", "in the bottom right")
# (color, shape) pairs that appear only in evaluation scenes (the compositional zero-shot split).
HELD_OUT = (("red", "triangle"), ("blue", "ring"), ("green", "diamond"), ("yellow", "square"))
SPLITS = ("train", "eval")
# The caption frames: the two splits share the attribute words, never a frame.
# Every word of an eval frame also occurs in some training frame, so that no model meets an untrained token.
TRAIN_FRAMES = ("{objs}", "a picture of {objs}", "a drawing of {objs}", "{objs} on a {bg} background",
                "a simple photo with {objs}", "this image has {objs}", "here is {objs}",
                "there we see a render with {objs}", "{objs} against a plain backdrop, flat style")
EVAL_FRAMES = ("there is {objs}", "an image with {objs}", "a photo of {objs}", "{objs} against a {bg} backdrop",
               "this photo has {objs}", "we see {objs}")
# Each attribute is named with these probabilities (shape: always).
P_COLOR, P_SIZE, P_POSITION, P_BACKGROUND = 0.9, 0.5, 0.6, 0.3
_HELD = np.zeros((len(COLORS), len(SHAPES)), bool)
for _c, _s in HELD_OUT:
    _HELD[COLORS.index(_c), SHAPES.index(_s)] = True


@dataclass
class Scenes:
    """N scenes. Object arrays are (N, 3); slots ≥ ``count`` are empty (shape = -1)."""

    count: np.ndarray  # (N,) 1..3
    shape: np.ndarray  # (N, 3) index into SHAPES, -1 for an empty slot
    color: np.ndarray
    size: np.ndarray
    cell: np.ndarray  # 0..8, row-major
    center: np.ndarray  # (N, 3, 2) x, y in pixels
    radius: np.ndarray  # (N, 3)
    tint: np.ndarray  # (N, 3) object RGB jitter is per scene: (N, 3, 3)
    background: np.ndarray  # (N,) index into BACKGROUNDS
    bg_rgb: np.ndarray  # (N, 3) base color
    bg_gradient: np.ndarray  # (N, 3) gx, gy, amplitude
    says_color: np.ndarray  # (N, 3) bool: the caption names this object's color
    says_size: np.ndarray
    says_position: np.ndarray
    says_background: np.ndarray  # (N,)
    frame: np.ndarray  # (N,) index into the split's frames
    split: str

    def __len__(self) -> int:
        return len(self.count)

    def objects(self, i: int) -> list[dict]:
        """Scene i's objects as attribute names, with what its caption says about each."""
        return [{"shape": SHAPES[self.shape[i, k]], "color": COLORS[self.color[i, k]], "size": SIZES[self.size[i, k]],
                 "cell": int(self.cell[i, k]), "says_color": bool(self.says_color[i, k]),
                 "says_size": bool(self.says_size[i, k]), "says_position": bool(self.says_position[i, k])}
                for k in range(int(self.count[i]))]


BLOCK = 1024  # scenes are drawn in blocks of this many, each from its own seed: scene i never depends on n or start


def sample_scenes(seed: int, split: str, n: int, start: int = 0) -> Scenes:
    """Scenes ``start .. start+n`` of ``split``: scene i is the same whatever range it is drawn in."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    first, last = start // BLOCK, (start + n - 1) // BLOCK
    blocks = [_sample_block(seed, split, b) for b in range(first, last + 1)]
    cut = slice(start - first * BLOCK, start - first * BLOCK + n)
    fields = {f.name: (np.concatenate([getattr(b, f.name) for b in blocks])[cut] if f.name != "split" else split)
              for f in dataclasses.fields(Scenes)}
    return Scenes(**fields)


def _sample_block(seed: int, split: str, block: int) -> Scenes:
    rng = np.random.default_rng([seed, SPLITS.index(split), block])
    n = BLOCK
    count = rng.integers(1, MAX_OBJECTS + 1, n)
    present = np.arange(MAX_OBJECTS)[None] < count[:, None]
    shape = rng.integers(0, len(SHAPES), (n, MAX_OBJECTS))
    color = rng.integers(0, len(COLORS), (n, MAX_OBJECTS))
    held = _HELD[color, shape] & present
    if split == "train":  # redraw held-out pairs until none is left
        while held.any():
            shape[held] = rng.integers(0, len(SHAPES), held.sum())
            color[held] = rng.integers(0, len(COLORS), held.sum())
            held = _HELD[color, shape] & present
    else:  # a third of the eval scenes hold one held-out pair in their first slot
        force = rng.random(n) < 1 / 3
        pair = rng.integers(0, len(HELD_OUT), n)
        color[force, 0] = [COLORS.index(HELD_OUT[p][0]) for p in pair[force]]
        shape[force, 0] = [SHAPES.index(HELD_OUT[p][1]) for p in pair[force]]
    size = rng.integers(0, len(SIZES), (n, MAX_OBJECTS))
    cell = np.argsort(rng.random((n, 9)), axis=1)[:, :MAX_OBJECTS]  # distinct cells
    lo, hi = np.array(RADII, np.float32).T
    radius = lo[size] + (hi[size] - lo[size]) * rng.random((n, MAX_OBJECTS), np.float32)
    jitter = rng.uniform(-2.5, 2.5, (n, MAX_OBJECTS, 2)).astype(np.float32)
    center = np.stack([CELL_CENTERS[cell % 3], CELL_CENTERS[cell // 3]], -1) + jitter
    tint = rng.uniform(-18, 18, (n, MAX_OBJECTS, 3)).astype(np.float32)
    background = rng.integers(0, 2, n)
    gray = np.where(background == 0, rng.uniform(15, 70, n), rng.uniform(175, 235, n)).astype(np.float32)
    bg_rgb = gray[:, None] + rng.uniform(-14, 14, (n, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi, n)
    bg_gradient = np.stack([np.cos(angle), np.sin(angle), rng.uniform(0, 22, n)], -1).astype(np.float32)
    frames = TRAIN_FRAMES if split == "train" else EVAL_FRAMES
    shape, color, size, cell = (np.where(present, a, -1) for a in (shape, color, size, cell))
    return Scenes(
        count=count, shape=shape, color=color, size=size, cell=cell, center=center, radius=radius * present,
        tint=tint, background=background, bg_rgb=bg_rgb, bg_gradient=bg_gradient,
        says_color=(rng.random((n, MAX_OBJECTS)) < P_COLOR) & present,
        says_size=(rng.random((n, MAX_OBJECTS)) < P_SIZE) & present,
        says_position=(rng.random((n, MAX_OBJECTS)) < P_POSITION) & present,
        says_background=rng.random(n) < P_BACKGROUND, frame=rng.integers(0, len(frames), n), split=split,
    )


_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5


def _signed_distance(shape: int, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Signed distance (pixels, < 0 inside) of objects of one shape; dx, dy (M, H, W), r (M, 1, 1)."""
    name = SHAPES[shape]
    if name == "circle":
        return np.sqrt(dx * dx + dy * dy) - r
    if name == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.8 * r
    if name == "diamond":
        return (np.abs(dx) + np.abs(dy)) * np.float32(0.7071) - 0.8 * r
    if name == "ring":
        return np.abs(np.sqrt(dx * dx + dy * dy) - 0.72 * r) - 0.28 * r
    # triangle, apex up (y grows downwards), centroid at the center: three half-planes at inradius r/2
    return np.maximum(dy, np.abs(dx) * np.float32(0.8660) - dy * np.float32(0.5)) - 0.5 * r


def render(scenes: Scenes, chunk: int = 256) -> np.ndarray:
    """Scenes → uint8 images (N, 64, 64, 3), in chunks that stay in cache."""
    out = np.empty((len(scenes), SIZE, SIZE, 3), np.uint8)
    for a in range(0, len(scenes), chunk):
        out[a : a + chunk] = _render_chunk(scenes, slice(a, a + chunk))
    return out


_XN, _YN = (_XX / SIZE - 0.5) * 2, (_YY / SIZE - 0.5) * 2
_WIN = 28  # each object is drawn in a window around its center (a large diamond's tips are 1.13 r away), not the image
_WIN_RANGE = np.arange(_WIN)


def _render_chunk(scenes: Scenes, part: slice) -> np.ndarray:
    gx, gy, amp = scenes.bg_gradient[part].T
    n = len(gx)
    ramp = _XN[None] * (gx * amp)[:, None, None] + _YN[None] * (gy * amp)[:, None, None]
    img = (scenes.bg_rgb[part][:, None, None, :] + ramp[..., None]).reshape(n * SIZE * SIZE, 3)
    shape, center, radius = scenes.shape[part], scenes.center[part], scenes.radius[part]
    color, tint = scenes.color[part], scenes.tint[part]
    for k in range(MAX_OBJECTS):
        idx = np.nonzero(shape[:, k] >= 0)[0]
        if len(idx) == 0:
            continue
        cx, cy = center[idx, k, 0], center[idx, k, 1]
        x0 = np.clip(np.round(cx).astype(np.int64) - _WIN // 2, 0, SIZE - _WIN)
        y0 = np.clip(np.round(cy).astype(np.int64) - _WIN // 2, 0, SIZE - _WIN)
        xs, ys = x0[:, None] + _WIN_RANGE, y0[:, None] + _WIN_RANGE  # (M, win)
        dx = np.broadcast_to((xs + 0.5 - cx[:, None]).astype(np.float32)[:, None, :], (len(idx), _WIN, _WIN))
        dy = np.broadcast_to((ys + 0.5 - cy[:, None]).astype(np.float32)[:, :, None], (len(idx), _WIN, _WIN))
        r = radius[idx, k][:, None, None]
        d = np.empty((len(idx), _WIN, _WIN), np.float32)
        for s in range(len(SHAPES)):
            m = shape[idx, k] == s
            if m.any():
                d[m] = _signed_distance(s, dx[m], dy[m], r[m])
        alpha = np.clip(0.5 - d, 0, 1)[..., None]
        rgb = (RGB[color[idx, k]] + tint[idx, k])[:, None, None, :]
        flat = (idx * (SIZE * SIZE))[:, None, None] + ys[:, :, None] * SIZE + xs[:, None, :]
        patch = img[flat]
        img[flat] = patch + alpha * (rgb - patch)
    return np.clip(img, 0, 255).astype(np.uint8).reshape(n, SIZE, SIZE, 3)


def _object_phrase(scenes: Scenes, i: int, k: int) -> str:
    words = []
    if scenes.says_size[i, k]:
        words.append(SIZES[scenes.size[i, k]])
    if scenes.says_color[i, k]:
        words.append(COLORS[scenes.color[i, k]])
    words.append(SHAPES[scenes.shape[i, k]])
    article = "an" if words[0][0] in "aeiou" else "a"
    phrase = f"{article} {' '.join(words)}"
    if scenes.says_position[i, k]:
        phrase += f" {POSITIONS[scenes.cell[i, k]]}"
    return phrase


def captions(scenes: Scenes) -> list[str]:
    """One caption per scene, from its split's frames."""
    frames = TRAIN_FRAMES if scenes.split == "train" else EVAL_FRAMES
    out = []
    for i in range(len(scenes)):
        phrases = [_object_phrase(scenes, i, k) for k in range(int(scenes.count[i]))]
        objs = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        frame = frames[scenes.frame[i]]
        if "{bg}" not in frame and scenes.says_background[i]:
            frame += " on a {bg} background" if scenes.split == "train" else ", {bg} backdrop"
        out.append(frame.format(objs=objs, bg=BACKGROUNDS[scenes.background[i]]))
    return out


def make_pairs(seed: int, split: str, n: int, start: int = 0) -> tuple[np.ndarray, list[str], Scenes]:
    """``n`` (image, caption) pairs of ``split`` and the scene record behind them."""
    scenes = sample_scenes(seed, split, n, start)
    return render(scenes), captions(scenes), scenes


def vocabulary() -> list[str]:
    """Every word a caption of either split can use (for the tokenizer's merges)."""
    text = " ".join(TRAIN_FRAMES + EVAL_FRAMES + SHAPES + COLORS + SIZES + BACKGROUNDS + POSITIONS)
    text += " a an and background backdrop"
    return sorted(set(text.replace("{objs}", " ").replace("{bg}", " ").replace(",", " ").split()))
