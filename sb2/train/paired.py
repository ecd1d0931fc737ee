"""Image–caption pairs for the image regularization (sb2/distill/regularization.py), and which steps get them.

A source is indexed when opened, without decoding an image: a folder of images with same-name ``.txt`` captions; a
CSV/TSV/Parquet manifest (a path and a caption column, paths relative to the manifest, and the prompt builder's numeric
filter, e.g. ``filter_column: AESTHETIC_SCORE, filter_min: 6.25``); WebDataset ``.tar`` shards (members grouped by
key: the image ``.jpg/.jpeg/.png/.webp``, the caption ``.txt`` or the caption field of ``.json``, which the filter
reads); or a folder written by ``sb2 regpairs`` (:mod:`sb2.train.regpairs`). An image is decoded when drawn,
center-cropped to the model's aspect ratio and resized (LANCZOS) to its resolution, in [-1, 1].

Bad input follows the prompt builder's policy (``regularization.bad_input``): a bad record or unreadable image is
reported and counted, or stops the run; skipping stops anyway past ``max_bad_fraction`` of the source.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sb2.config import BadInputConfig, Config, RegularizationConfig
from sb2.distill.regularization import is_regularization_step
from sb2.prompts.sources import filter_value
from sb2.train.data import PromptSampler

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_SHOWN_BAD = 5


class PairedInputError(ValueError):
    """A source that cannot be used; the message is one line naming the file."""


class BadPair(Exception):
    """One pair that cannot be loaded (skipped or fatal by ``bad_input``)."""


@dataclass(frozen=True)
class PairRef:
    """Where a pair's image lives: a file, or a member of a tar shard (``offset``/``size`` of its data)."""

    caption: str
    path: str
    offset: int = -1
    size: int = -1

    @property
    def where(self) -> str:
        return f"{self.path}@{self.offset}" if self.offset >= 0 else self.path


@dataclass
class RealPair:
    caption: str
    image: torch.Tensor  # (3, H, W) in [-1, 1]


def load_image(file, size: tuple[int, int]) -> torch.Tensor:
    """An image file (path or binary stream) → (3, H, W) float32 in [-1, 1]: the largest centered box of the target's
    aspect ratio, resized with LANCZOS."""
    from PIL import Image

    h, w = size
    try:
        with Image.open(file) as im:
            im = im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadPair(f"unreadable image ({str(e).splitlines()[0] if str(e).strip() else e.__class__.__name__})") \
            from None
    iw, ih = im.size
    if iw * h > ih * w:  # wider than the target
        cw = round(ih * w / h)
        box = ((iw - cw) // 2, 0, (iw - cw) // 2 + cw, ih)
    else:
        ch = round(iw * h / w)
        box = (0, (ih - ch) // 2, iw, (ih - ch) // 2 + ch)
    # cropped first: resize(box=...) would let the filter read pixels outside the box
    arr = np.asarray(im.crop(box).resize((w, h), Image.LANCZOS), dtype=np.float32)
    return torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1).contiguous()


class ImageCaptionSource:
    """Indexed real pairs; ``load(i)`` decodes the i-th image at the model's resolution (``size``, or set by ``fit``)."""

    kind = "real"

    def __init__(self, refs: list[PairRef], size: tuple[int, int] | None, name: str):
        self.refs, self.size, self.name = refs, size, name

    def fit(self, latent_shape: tuple[int, int, int], vae_scale_factor: int) -> None:
        self.size = (latent_shape[1] * vae_scale_factor, latent_shape[2] * vae_scale_factor)

    def __len__(self) -> int:
        return len(self.refs)

    def where(self, i: int) -> str:
        return self.refs[i].where

    def load(self, i: int) -> RealPair:
        ref = self.refs[i]
        if ref.offset < 0:
            return RealPair(ref.caption, load_image(ref.path, self.size))
        try:
            with open(ref.path, "rb") as f:
                f.seek(ref.offset)
                data = f.read(ref.size)
        except OSError as e:
            raise BadPair(f"unreadable shard ({e.strerror or e})") from None
        return RealPair(ref.caption, load_image(io.BytesIO(data), self.size))


class _Index:
    """Collects pair references and bad records, and applies ``max_records``."""

    def __init__(self, limit: int | None):
        self.refs: list[PairRef] = []
        self.bad: list[str] = []
        self.filtered = 0
        self.limit = limit

    def full(self) -> bool:
        return self.limit is not None and len(self.refs) + len(self.bad) + self.filtered >= self.limit

    def keep(self, caption: str, path: str, offset: int = -1, size: int = -1) -> None:
        self.refs.append(PairRef(caption, path, offset, size))

    def passes(self, where: str, record: dict, rc: RegularizationConfig) -> bool:
        """The prompt builder's numeric filter on one record; a missing or non-numeric value is a bad record."""
        if rc.filter_column is None:
            return True
        value = record.get(rc.filter_column)
        if value is None:
            self.bad.append(f"{where}: no value in {rc.filter_column!r}")
            return False
        try:
            ok = filter_value(value, rc.filter_column) >= rc.filter_min
        except ValueError as e:
            self.bad.append(f"{where}: {e}")
            return False
        if not ok:
            self.filtered += 1
        return ok


def detect_format(source: str, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    p = Path(source)
    if glob.has_magic(source):
        return "webdataset"
    if p.is_dir():
        if (p / "manifest.json").is_file() and '"sb2-regpairs"' in (p / "manifest.json").read_text()[:200]:
            return "regpairs"
        return "webdataset" if any(p.glob("*.tar")) else "folder"
    suffix = p.suffix.lower()
    return {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet", ".tar": "webdataset"}.get(
        suffix, "folder")


def _index_folder(root: Path, ix: _Index) -> None:
    for img in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        if ix.full():
            return
        txt = img.with_suffix(".txt")
        if not txt.is_file():
            ix.bad.append(f"{img}: no caption file {txt.name}")
            continue
        try:
            ix.keep(txt.read_text(encoding="utf-8").strip(), str(img))
        except UnicodeDecodeError as e:
            ix.bad.append(f"{txt}: invalid UTF-8 at byte {e.start + 1}")


def _manifest_rows(path: Path, rc: RegularizationConfig, fmt: str):
    columns = [c for c in (rc.path_field, rc.caption_field, rc.filter_column) if c]
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            names = pq.ParquetFile(path).schema_arrow.names
            missing = [c for c in columns if c not in names]
            if missing:
                raise PairedInputError(f"{path}: no column {missing[0]!r} (columns: {', '.join(names)})")
            table = pq.read_table(path, columns=columns)
        except (pa.ArrowException, OSError) as e:
            raise PairedInputError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
        for k, row in enumerate(table.to_pylist()):
            yield f"{path}: row {k + 1}", row
        return
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if fmt == "tsv" else ",")
            names = reader.fieldnames or []
            missing = [c for c in columns if c not in names]
            if missing:
                raise PairedInputError(f"{path}: no column {missing[0]!r} (columns: {', '.join(names)})")
            for row in reader:
                yield f"{path}:{reader.line_num}", row
    except UnicodeDecodeError as e:
        raise PairedInputError(f"{path}: invalid UTF-8 at byte {e.start + 1}") from None
    except csv.Error as e:
        raise PairedInputError(f"{path}: malformed CSV ({e})") from None


def _index_manifest(path: Path, rc: RegularizationConfig, fmt: str, ix: _Index) -> None:
    for where, row in _manifest_rows(path, rc, fmt):
        if ix.full():
            return
        image, caption = row.get(rc.path_field), row.get(rc.caption_field)
        if not image:
            ix.bad.append(f"{where}: empty {rc.path_field!r}")
        elif caption is None:
            ix.bad.append(f"{where}: empty {rc.caption_field!r}")
        elif ix.passes(where, row, rc):
            ix.keep(str(caption), str(path.parent / Path(str(image)).expanduser()))


def _shards(source: str) -> list[Path]:
    if glob.has_magic(source):
        found = sorted(Path(p) for p in glob.glob(source, recursive=True) if p.endswith(".tar"))
    elif Path(source).is_dir():
        found = sorted(Path(source).rglob("*.tar"))
    else:
        found = [Path(source)]
    if not found:
        raise PairedInputError(f"{source!r}: no .tar shards")
    return found


def _index_shard(shard: Path, rc: RegularizationConfig, ix: _Index) -> None:
    """WebDataset's grouping: a member ``dir/key.ext`` belongs to sample ``dir/key`` (the name up to its first dot)."""
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(shard, "r:") as tar:
            for m in tar:
                if m.isfile():
                    folder, _, base = m.name.rpartition("/")
                    key, _, ext = base.partition(".")
                    samples.setdefault(f"{folder}/{key}", {})[ext.lower()] = m
            for key, members in samples.items():
                if ix.full():
                    return
                where = f"{shard}:{key}"
                image = next((members[e] for e in ("jpg", "jpeg", "png", "webp") if e in members), None)
                meta: dict = {}
                if "json" in members:
                    try:
                        meta = json.loads(tar.extractfile(members["json"]).read())
                    except (json.JSONDecodeError, UnicodeDecodeError) as e:
                        ix.bad.append(f"{where}.json: malformed JSON ({e.__class__.__name__})")
                        continue
                    if not isinstance(meta, dict):
                        ix.bad.append(f"{where}.json: expected a JSON object")
                        continue
                if image is None:
                    ix.bad.append(f"{where}: no image (.jpg, .jpeg, .png or .webp)")
                    continue
                if "txt" in members:
                    try:
                        caption = tar.extractfile(members["txt"]).read().decode("utf-8").strip()
                    except UnicodeDecodeError as e:
                        ix.bad.append(f"{where}.txt: invalid UTF-8 at byte {e.start + 1}")
                        continue
                elif isinstance(meta.get(rc.caption_field), str):
                    caption = meta[rc.caption_field]
                else:
                    ix.bad.append(f"{where}: no caption (.txt, or {rc.caption_field!r} in .json)")
                    continue
                if ix.passes(where, meta, rc):
                    ix.keep(caption, str(shard), image.offset_data, image.size)
    except tarfile.ReadError as e:
        raise PairedInputError(f"{shard}: not a readable plain (uncompressed) tar ({e})") from None
    except OSError as e:
        raise PairedInputError(f"{shard}: unreadable ({e.strerror or e})") from None


def _apply_policy(name: str, total: int, bad: list[str], policy: BadInputConfig, what: str) -> None:
    if not bad:
        return
    if policy.on_error == "stop":
        raise PairedInputError(f"{bad[0]} (regularization.bad_input.on_error=stop)")
    for msg in bad[:_SHOWN_BAD]:
        print(f"warning: {msg}; skipped", file=sys.stderr)
    if len(bad) > _SHOWN_BAD:
        print(f"warning: {len(bad) - _SHOWN_BAD} more bad {what} in {name}", file=sys.stderr)
    if len(bad) > policy.max_bad_fraction * max(total, 1):
        raise PairedInputError(f"{name}: {len(bad)} of {total} {what} are bad, more than "
                               f"regularization.bad_input.max_bad_fraction={policy.max_bad_fraction}; first: {bad[0]}")


def open_image_captions(rc: RegularizationConfig, size: tuple[int, int] | None = None) -> ImageCaptionSource:
    """Index the real pairs that ``regularization.source`` names (``size``: the model's image height and width)."""
    source = rc.source or ""
    fmt = detect_format(source, rc.format)
    if not glob.has_magic(source) and not Path(source).exists():
        raise PairedInputError(f"regularization source {source!r} does not exist")
    ix = _Index(rc.max_records)
    if fmt == "folder":
        if not Path(source).is_dir():
            raise PairedInputError(f"regularization source {source!r} is not a folder")
        _index_folder(Path(source), ix)
    elif fmt in ("csv", "tsv", "parquet"):
        _index_manifest(Path(source), rc, fmt, ix)
    elif fmt == "webdataset":
        for shard in _shards(source):
            if not ix.full():
                _index_shard(shard, rc, ix)
    else:
        raise PairedInputError(f"regularization source {source!r} is a {fmt} source, not image–caption pairs")
    _apply_policy(source, len(ix.refs) + len(ix.bad), ix.bad, rc.bad_input, "records")
    if not ix.refs:
        raise PairedInputError(f"regularization source {source!r} holds no image–caption pairs"
                               + (f" ({ix.filtered} below the filter)" if ix.filtered else ""))
    return ImageCaptionSource(ix.refs, size, source)


class PairSampler(PromptSampler):
    """Endless shuffled batches of a pair source, shuffled as the prompts are. A pair that fails to load is reported
    and skipped (remembered, so a resumed run skips the same ones) or stops the run; the position and the skipped
    pairs are training state."""

    def __init__(self, source, batch_size: int, seed: int, policy: BadInputConfig | None = None):
        super().__init__(source, batch_size, seed)
        self.source, self.policy, self.bad = source, policy or BadInputConfig(), set()

    def next_batch(self) -> list:
        batch = []
        while len(batch) < self.batch_size:
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation()
            i = self._order[self.index]
            self.index += 1
            if i in self.bad:
                continue
            try:
                batch.append(self.source.load(i))
            except BadPair as e:
                msg = f"{self.source.where(i)}: {e}"
                if self.policy.on_error == "stop":
                    raise PairedInputError(f"{msg} (regularization.bad_input.on_error=stop)") from None
                self.bad.add(i)
                print(f"warning: {msg}; skipped", file=sys.stderr)
                if len(self.bad) > self.policy.max_bad_fraction * len(self.source) or len(self.bad) == len(
                        self.source):
                    raise PairedInputError(f"{self.source.name}: {len(self.bad)} of {len(self.source)} pairs do not "
                                           f"load, more than regularization.bad_input.max_bad_fraction; last: {msg}")
        return batch

    def state_dict(self) -> dict:
        return {**super().state_dict(), "bad": sorted(self.bad)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.bad = {int(i) for i in state.get("bad", [])}


def open_pair_source(rc: RegularizationConfig):
    """The source ``regularization`` names, checked against its kind: real pairs, or the teacher's stored pairs."""
    fmt = detect_format(rc.source or "", rc.format)
    if rc.kind == "dmd_pairs":
        if fmt != "regpairs":
            raise PairedInputError(f"regularization.kind=dmd_pairs needs a folder written by `sb2 regpairs`, not "
                                   f"{rc.source!r} ({fmt})")
        from sb2.train.regpairs import TeacherPairSource

        return TeacherPairSource(rc.source)
    return open_image_captions(rc)


class RegularizationFeed:
    """Which steps carry a regularization batch (a seeded draw per step, the same on every process) and the batches
    (each process draws its own pairs, as each draws its own prompts).

    The source is indexed when the feed is made, before the models load, so that a bad source fails at once;
    ``fit`` then gives it the student's latent shape (the image resolution, or the shape stored pairs must have).
    """

    def __init__(self, cfg: Config, rank: int = 0):
        rc = cfg.regularization
        self.seed, self.share = cfg.train.seed, rc.share
        self.source = open_pair_source(rc)
        self.sampler = PairSampler(self.source, rc.batch_size or cfg.train.batch_size, cfg.train.seed + rank,
                                   rc.bad_input)

    def fit(self, latent_shape: tuple[int, int, int], vae_scale_factor: int) -> "RegularizationFeed":
        self.source.fit(latent_shape, vae_scale_factor)
        return self

    def batch_for(self, step: int) -> list | None:
        return self.sampler.next_batch() if is_regularization_step(self.seed, step, self.share) else None

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
