"""The caption-selection rule: one caption per image (its smallest annotation id), images by ascending image_id,
the first N; independent of the order of the file."""

import json
import random

import pytest

from sb2.evaluation.captions import coco_captions, read_captions


def test_coco_rule_picks_smallest_annotation_per_image_in_image_order(tmp_path):
    anns = [
        {"image_id": 9, "id": 50, "caption": "nine, second"},
        {"image_id": 2, "id": 31, "caption": "two, second"},
        {"image_id": 9, "id": 12, "caption": " nine,\n first  "},
        {"image_id": 2, "id": 7, "caption": "two, first"},
        {"image_id": 5, "id": 99, "caption": "five, only"},
    ]
    expected = ["two, first", "five, only", "nine, first"]
    assert coco_captions(anns) == expected
    for seed in range(3):  # the file's order does not matter
        shuffled = anns[:]
        random.Random(seed).shuffle(shuffled)
        path = tmp_path / f"captions_{seed}.json"
        path.write_text(json.dumps({"images": [], "annotations": shuffled}))
        assert read_captions(path) == expected
        assert read_captions(path, 2) == expected[:2]


def test_sample_file_and_other_formats(tmp_path):
    sample = read_captions("data/samples/captions_val2014_sample.json")
    assert len(sample) == 12  # 12 images, 18 annotations
    assert sample[0] == "A brown puppy curled up on a sofa"  # image 42: annotation 97 precedes 118
    (tmp_path / "c.csv").write_text('image_id,caption\n3,"a red car"\n1,"a  blue boat"\n')
    assert read_captions(tmp_path / "c.csv") == ["a red car", "a blue boat"]
    (tmp_path / "c.txt").write_text("first\n\nsecond\nthird\n")
    assert read_captions(tmp_path / "c.txt", 2) == ["first", "second"]
    (tmp_path / "c.json").write_text(json.dumps(["x", "y"]))
    assert read_captions(tmp_path / "c.json") == ["x", "y"]


def test_too_few_captions_or_missing_file_is_an_error(tmp_path):
    (tmp_path / "c.txt").write_text("only one\n")
    with pytest.raises(ValueError, match="1 captions, 5 requested"):
        read_captions(tmp_path / "c.txt", 5)
    with pytest.raises(FileNotFoundError):
        read_captions(tmp_path / "missing.json")
