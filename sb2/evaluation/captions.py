"""The evaluation captions: the first N of a captions file, chosen by one documented, deterministic rule.

COCO (``captions_val2014.json``: ``{"annotations": [{"image_id", "id", "caption"}, ...]}``): one caption per image,
the annotation with the smallest ``id`` of each image, images in ascending ``image_id``; the first N of that list.
The rule depends on nothing but the ids (not on the order of the file), and it gives N distinct images, so the
captions spread over the reference set as the paper's "first 30k prompts" of val2014 do.

Other formats are read in file order: a JSON list of strings, a CSV with a ``caption`` (or ``prompt``/``text``)
column, or a text file with one caption a line. Whitespace inside a caption is collapsed to single spaces (COCO
captions carry stray newlines and trailing spaces).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

CAPTION_RULE = "coco: first annotation (smallest id) of each image, images by ascending image_id; others: file order"


def _clean(text: str) -> str:
    return " ".join(str(text).split())


def coco_captions(annotations: list[dict]) -> list[str]:
    """One caption per image: the smallest annotation id of each image, images in ascending image_id."""
    first: dict[int, tuple[int, str]] = {}
    for a in annotations:
        image_id, ann_id = int(a["image_id"]), int(a["id"])
        if image_id not in first or ann_id < first[image_id][0]:
            first[image_id] = (ann_id, a["caption"])
    return [_clean(first[i][1]) for i in sorted(first)]


def _read_csv(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        column = next((c for c in ("caption", "prompt", "text") if c in (reader.fieldnames or [])), None)
        if column is None:
            raise ValueError(f"captions file {str(path)!r}: no caption, prompt or text column")
        return [_clean(row[column]) for row in reader]


def read_captions(path: str | Path, n: int | None = None) -> list[str]:
    """The first ``n`` captions of ``path`` (all when ``n`` is None) by the rule above; fewer than ``n`` is an error,
    since a metric on fewer images is not the protocol's."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file {str(path)!r} does not exist")
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "annotations" in data:
            captions = coco_captions(data["annotations"])
        elif isinstance(data, list) and all(isinstance(c, str) for c in data):
            captions = [_clean(c) for c in data]
        else:
            raise ValueError(f"captions file {str(path)!r}: expected COCO annotations or a list of strings")
    elif path.suffix == ".csv":
        captions = _read_csv(path)
    else:
        captions = [_clean(line) for line in path.read_text(encoding="utf-8").splitlines()]
    captions = [c for c in captions if c]
    if n is not None:
        if len(captions) < n:
            raise ValueError(f"captions file {str(path)!r} has {len(captions)} captions, {n} requested")
        captions = captions[:n]
    return captions
