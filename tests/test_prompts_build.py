"""The prompt builder end to end: counts, dedup across sources, determinism, the split, bad input, atomic output."""

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sb2.config import PromptsConfig, load_config
from sb2.prompts.build import build_prompts
from sb2.prompts.process import is_validation
from sb2.prompts.sources import PromptInputError


def _rows(out):
    """All output rows in order (train shards, then val shards) and the manifest."""
    manifest = json.loads((out / "manifest.json").read_text())
    rows = {}
    for split in ("train", "val"):
        rows[split] = [r for s in manifest["shards"][split] for r in pq.read_table(out / s["file"]).to_pylist()]
    return rows, manifest


def _cfg(tmp_path, sources, **kw):
    return PromptsConfig(sources=sources, workers=1, **kw)


def _quiet(msg):
    pass


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    cfg = load_config("tiny")
    out = tmp_path_factory.mktemp("prompts") / "built"
    logs = []
    build_prompts(cfg.prompts, out, cfg.models, log=logs.append)
    return out, cfg, logs


def test_tiny_profile_build_counts_and_contents(tiny_build):
    out, _, _ = tiny_build
    rows, m = _rows(out)
    assert m["total"] == {"records": 112, "bad_input": 0, "truncated": 1, "exact_duplicate": 5, "near_duplicate": 3,
                          "kept": 96, "train": 86, "val": 10}
    assert m["dropped"] == {"blocked": 0, "empty": 3, "filtered": 3, "non_text": 1, "too_long": 0, "too_short": 1}
    src = m["sources"]
    jdb = src["journeydb"]
    assert (jdb["exact_duplicate"], jdb["near_duplicate"], jdb["kept"], jdb["truncated"]) == (2, 2, 14, 1)
    assert (src["laion"]["dropped"]["filtered"], src["laion"]["exact_duplicate"], src["laion"]["kept"]) == (3, 2, 7)
    assert src["laion"]["near_duplicate"] == 1 and src["samples"]["near_duplicate"] == 0
    assert src["user"]["exact_duplicate"] == 1  # the JourneyDB fox, again
    prompts = {r["prompt"]: r for split in rows.values() for r in split}
    assert "a lighthouse on a cliff at dawn, dramatic clouds, oil painting" in prompts  # first of three versions
    assert prompts["a lighthouse on a cliff at dawn, dramatic clouds, oil painting"]["source"] == "journeydb"
    assert not any("rocky cliff" in p or "photo, 8k" in p or "small sandbar" in p or "--" in p or "http" in p
                   for p in prompts)
    for p in ("hot air balloons over the desert at sunrise",
              "fullwidth robot gardener watering tomatoes, studio ghibli style", "Tom & Jerry style chase through a library, cartoon, dynamic angle",
              "a glass teapot with a tiny ocean inside, product photo, soft shadows",
              "Vintage travel poster of the Swiss Alps railway through the mountains",
              "Handmade ceramic mug with blue glaze & gold rim"):
        assert p in prompts
    assert any(p.startswith("a steampunk airship") and p.endswith("of a blockbuster film") for p in prompts)
    assert not any("2048" in p for p in prompts)
    assert all(len(r["id"]) == 16 for r in prompts.values())
    assert (out / "stats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "bad_input.txt").read_text() == ""
    assert not any(p.name.startswith(".") or p.name == "_work" for p in out.parent.iterdir() if p != out)


def test_split_is_a_hash_of_the_prompt(tiny_build):
    out, cfg, _ = tiny_build
    rows, _ = _rows(out)
    for split, want in (("train", False), ("val", True)):
        ids = np.array([int(r["id"], 16) for r in rows[split]], dtype=np.uint64)
        assert (is_validation(ids, cfg.prompts.val_fraction) == want).all()
    ids = np.arange(100_000, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    assert is_validation(ids, 0.01).mean() == pytest.approx(0.01, abs=0.002)


def test_read_prompts_reads_the_train_split(tiny_build):
    from sb2.train.data import read_prompts

    out, _, _ = tiny_build
    rows, _ = _rows(out)
    assert read_prompts(out) == [r["prompt"] for r in rows["train"]]
    assert read_prompts(out / "val") == [r["prompt"] for r in rows["val"]]


def test_output_is_deterministic_across_runs_shards_chunks_and_workers(tiny_build, tmp_path):
    out, cfg, _ = tiny_build
    rows, m = _rows(out)
    for i, changes in enumerate(({}, {"shard_rows": 3, "chunk_rows": 7}, {"shard_rows": 1000, "workers": 2})):
        again = tmp_path / f"again{i}"
        build_prompts(cfg.prompts.model_copy(update=changes), again, cfg.models, log=_quiet)
        rows2, m2 = _rows(again)
        assert rows2 == rows and m2["content_sha256"] == m["content_sha256"]
        assert m2["total"] == m["total"] and m2["sources"] == m["sources"]
    assert len(m2["shards"]["train"]) == 1 and len(_rows(tmp_path / "again1")[1]["shards"]["train"]) == 29


def test_a_prompt_keeps_its_split_when_the_dataset_changes(tiny_build, tmp_path):
    out, cfg, _ = tiny_build
    rows, _ = _rows(out)
    only = cfg.prompts.model_copy(update={"sources": cfg.prompts.sources[2:3]})
    build_prompts(only, tmp_path / "only", cfg.models, log=_quiet)
    rows2, _ = _rows(tmp_path / "only")
    split_of = {r["prompt"]: s for s, rs in rows.items() for r in rs}
    assert all(split_of[r["prompt"]] == s for s, rs in rows2.items() for r in rs)


def test_long_prompts_truncate_or_drop(tmp_path):
    from sb2.models.loading import load_tokenizer

    f = tmp_path / "p.txt"
    f.write_text("a short prompt\n" + "a very long prompt about many things, " * 12 + "\n")
    src = [{"name": "t", "format": "text", "paths": [str(f)]}]
    cfg = load_config("tiny")
    build_prompts(_cfg(tmp_path, src), tmp_path / "trunc", cfg.models, log=_quiet)
    rows, m = _rows(tmp_path / "trunc")
    long = [r["prompt"] for r in rows["train"] + rows["val"] if r["prompt"].startswith("a very")]
    tok = load_tokenizer("tiny:teacher")
    assert m["total"]["truncated"] == 1 and len(tok(long[0], add_special_tokens=False).input_ids) <= 75
    build_prompts(_cfg(tmp_path, src, filters={"long_prompts": "drop"}), tmp_path / "drop", cfg.models, log=_quiet)
    _, m = _rows(tmp_path / "drop")
    assert m["dropped"]["too_long"] == 1 and m["total"]["kept"] == 1


def test_blocklist_file_and_filters(tmp_path):
    (tmp_path / "p.txt").write_text("a gore scene\na calm lake\nab\n12345 678\na calm lake.\nA calm   LAKE\n")
    (tmp_path / "block.txt").write_text("# words\ngore\n")
    cfg = _cfg(tmp_path, [{"name": "t", "format": "text", "paths": [str(tmp_path / "p.txt")]}],
               normalize={"blocklist_file": str(tmp_path / "block.txt")})
    m = build_prompts(cfg, tmp_path / "o", None, log=_quiet)  # no tokenizer: no token counting
    assert m["dropped"] == {"blocked": 1, "empty": 0, "filtered": 0, "non_text": 1, "too_long": 0, "too_short": 1}
    assert m["total"]["exact_duplicate"] == 2 and m["total"]["kept"] == 1 and m["tokenizer"] is None


def _word(i):
    return "".join(chr(97 + (i // 26**k) % 26) for k in range(4))


def _bad_jsonl(tmp_path, good=40, bad=1):
    f = tmp_path / "mixed.jsonl"
    lines = [json.dumps({"prompt": f"{_word(i)} {_word(i + 999)} in a scene"}) for i in range(good)]
    for k in range(bad):
        lines.insert(3 + k, '{"prompt": broken')
    f.write_text("\n".join(lines) + "\n")
    return f


def test_bad_records_skipped_counted_and_logged(tmp_path):
    f = _bad_jsonl(tmp_path, bad=1)
    logs = []
    m = build_prompts(_cfg(tmp_path, [{"name": "j", "format": "jsonl", "paths": [str(f)]}]), tmp_path / "o", None,
                      log=logs.append)
    assert m["total"]["bad_input"] == 1 and m["total"]["kept"] == 40 and m["sources"]["j"]["records"] == 41
    msg = f"{f}:4: malformed JSON (Expecting value at column 12)"
    assert f"warning: {msg}" in logs
    assert (tmp_path / "o" / "bad_input.txt").read_text() == msg + "\n"


def test_too_many_bad_records_stop_the_build(tmp_path):
    f = _bad_jsonl(tmp_path, good=20, bad=3)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "old.txt").write_text("previous output")
    with pytest.raises(PromptInputError) as e:
        build_prompts(_cfg(tmp_path, [{"name": "j", "format": "jsonl", "paths": [str(f)]}]), tmp_path / "o", None,
                      log=_quiet)
    assert str(e.value) == (f"{f}: 3 of 23 records bad (13.0%), more than bad_input.max_bad_fraction=0.05; "
                            f"first: {f}:4: malformed JSON (Expecting value at column 12)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixed.jsonl", "o"]  # no temporary folder left
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["old.txt"]  # the previous output is untouched


def test_stop_on_first_bad_record(tmp_path):
    f = _bad_jsonl(tmp_path)
    cfg = _cfg(tmp_path, [{"name": "j", "format": "jsonl", "paths": [str(f)]}], bad_input={"on_error": "stop"})
    with pytest.raises(PromptInputError, match=rf"^{f}:4: malformed JSON .* \(bad_input.on_error=stop\)$"):
        build_prompts(cfg, tmp_path / "o", None, log=_quiet)
    assert not (tmp_path / "o").exists()


def test_unreadable_and_empty_files_by_policy(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("a calm lake at dawn\n")
    (tmp_path / "empty.txt").write_text("")
    broken = tmp_path / "broken.csv"
    broken.write_text("id,caption\n1,a\n")
    srcs = [{"name": "t", "format": "text", "paths": [str(good), str(tmp_path / "empty.txt")]},
            {"name": "c", "format": "csv", "paths": [str(broken)]}]
    with pytest.raises(PromptInputError, match=r"broken.csv: no column 'prompt' \(columns: id, caption\) \(a file "
                                               r"that cannot be read counts as all bad; bad_input.max_bad_fraction=1"):
        build_prompts(_cfg(tmp_path, srcs), tmp_path / "o", None, log=_quiet)
    logs = []
    m = build_prompts(_cfg(tmp_path, srcs, bad_input={"max_bad_fraction": 1.0}), tmp_path / "o", None,
                      log=logs.append)
    assert m["sources"]["t"]["empty_files"] == 1 and m["sources"]["c"]["unreadable_files"] == 1
    assert m["total"]["kept"] == 1
    assert f"warning: {tmp_path / 'empty.txt'}: empty file, no records; skipped" in logs
    with pytest.raises(PromptInputError, match="empty.txt: empty file, no records"):
        build_prompts(_cfg(tmp_path, srcs[:1], bad_input={"on_error": "stop"}), tmp_path / "p", None, log=_quiet)


def test_config_errors():
    from sb2.config import ConfigError

    for override, words in (("prompts.dedup.threshold=0", "prompts.dedup.threshold"),
                            ("prompts.dedup.bands=7", "num_perm must be a multiple of bands"),
                            ("prompts.bad_input.on_error=ignore", "prompts.bad_input.on_error"),
                            ("prompts.sources=[{name: a, format: xml, paths: [x]}]", "prompts.sources.0.format"),
                            ("prompts.sources=[{name: a, format: text, paths: [x], filter_column: s, filter_min: 1}]",
                             "text source has no columns"),
                            ("prompts.val_fraction=1", "prompts.val_fraction")):
        with pytest.raises(ConfigError, match=words):
            load_config("tiny", [override])


def test_cli_build_and_user_errors(tmp_path):
    from sb2.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["prompts", "build", "-p", "tiny", "--out", str(tmp_path / "o"),
                            "--set", "prompts.sources=[{name: s, format: text, paths: [data/samples/prompts.txt]}]"])
    assert r.exit_code == 0, r.output
    assert "72 prompts (train" in r.output and (tmp_path / "o" / "manifest.json").is_file()
    r = runner.invoke(app, ["prompts", "build", "-p", "tiny", "--out", str(tmp_path / "x"),
                            "--set", "prompts.sources=[{name: s, format: text, paths: [nope/*.txt]}]"])
    assert r.exit_code == 2 and "error: source 's': 'nope/*.txt' matches no file" in r.output
    assert not (tmp_path / "x").exists()


def test_cli_bad_input_exits_2_without_traceback(tmp_path):
    f = _bad_jsonl(tmp_path)
    r = subprocess.run([sys.executable, "-m", "sb2.cli", "prompts", "build", "-p", "tiny", "--out", str(tmp_path / "o"),
                        "--set", f"prompts.sources=[{{name: j, format: jsonl, paths: ['{f}']}}]",
                        "--set", "prompts.bad_input.on_error=stop"], capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (f"error: {f}:4: malformed JSON (Expecting value at column 12) "
                                                 "(bad_input.on_error=stop)")
    assert not (tmp_path / "o").exists()


def test_nothing_left_is_an_error(tmp_path):
    (tmp_path / "p.txt").write_text("ab\n--ar 16:9\n")
    with pytest.raises(PromptInputError, match=r"no prompt left: 2 records read, dropped .*'empty': 1.*'too_short': 1"):
        build_prompts(_cfg(tmp_path, [{"name": "t", "format": "text", "paths": [str(tmp_path / "p.txt")]}]),
                      tmp_path / "o", None, log=_quiet)
    assert not (tmp_path / "o").exists()
