"""Readers of every input format, and what they say about bad input (file and line named, nothing raised)."""

import bz2
import gzip
import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sb2.config import PromptSourceConfig
from sb2.prompts.sources import PromptInputError, expand_paths, read_source

JSONL = b'{"prompt": "a cat", "img_path": "x.jpg"}\n\n{"prompt": "a dog"}\n'


def _read(name, fmt, paths, chunk_rows=1000, **kw):
    """Everything a source yields: prompts, bad-record messages, filtered count, records, file errors."""
    chunks = list(read_source(PromptSourceConfig(name=name, format=fmt, paths=[str(p) for p in paths], **kw),
                              chunk_rows))
    return ([t for c in chunks for t in c.texts], [m for c in chunks for m in c.bad],
            sum(c.filtered for c in chunks), sum(c.records for c in chunks),
            [c.error for c in chunks if c.error], [c for c in chunks if c.done])


def _tgz(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_jsonl_plain_and_compressed(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(JSONL)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(JSONL))
    (tmp_path / "c.jsonl.bz2").write_bytes(bz2.compress(JSONL))
    _tgz(tmp_path / "d.jsonl.tgz", [("annos/part1.jsonl", JSONL), ("annos/part2.jsonl", b'{"prompt": "a cow"}\n')])
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.bz2"):
        texts, bad, _, records, errors, done = _read("j", "jsonl", [tmp_path / name])
        assert (texts, bad, records, errors, len(done)) == (["a cat", "a dog"], [], 2, [], 1)
    texts, *_ = _read("j", "jsonl", [tmp_path / "d.jsonl.tgz"])
    assert texts == ["a cat", "a dog", "a cow"]


def test_the_sample_files_read(tmp_path):
    texts, bad, filtered, records, errors, _ = _read("j", "jsonl", ["data/samples/journeydb_sample.jsonl"])
    assert records == 20 and len(texts) == 20 and not bad and not errors
    texts, bad, filtered, records, errors, _ = _read("l", "parquet", ["data/samples/laion_sample.parquet"],
                                                     filter_column="AESTHETIC_SCORE", filter_min=6.25)
    assert (records, len(texts), filtered, bad) == (15, 12, 3, [])
    assert "" in texts  # the null caption, dropped later as empty
    texts, *_ = _read("u", "csv", ["data/samples/user_prompts.csv"])
    assert texts[1] == "a cup of coffee on a rainy windowsill, cozy, film photo" and len(texts) == 5
    texts, *_ = _read("t", "text", ["data/samples/prompts.txt"])
    assert len(texts) == 72 and texts[0] == "a bouquet of tulips, at sunset"


def test_text_csv_tsv_and_named_columns(tmp_path):
    (tmp_path / "p.txt").write_text("\ufeffa cat\n\n  a dog  \r\n")
    assert _read("t", "text", [tmp_path / "p.txt"])[0] == ["a cat", "a dog"]
    (tmp_path / "p.csv").write_text('\ufeffid,caption\n1,"a cat, sitting"\n\n2,a dog\n')
    assert _read("c", "csv", [tmp_path / "p.csv"], field="caption")[0] == ["a cat, sitting", "a dog"]
    (tmp_path / "p.tsv").write_text("prompt\tscore\na cat\t7\na dog\t3\n")
    texts, _, filtered, *_ = _read("t", "tsv", [tmp_path / "p.tsv"], filter_column="score", filter_min=5)
    assert texts == ["a cat"] and filtered == 1
    (tmp_path / "f.jsonl").write_text('{"caption": "a cat", "s": 6.5}\n{"caption": "a dog", "s": 6.0}\n')
    texts, _, filtered, *_ = _read("j", "jsonl", [tmp_path / "f.jsonl"], field="caption", filter_column="s",
                                   filter_min=6.25)
    assert texts == ["a cat"] and filtered == 1


def test_parquet_named_column_and_folder_of_shards(tmp_path):
    folder = tmp_path / "laion"
    folder.mkdir()
    for i in range(3):
        pq.write_table(pa.table({"caption": [f"p{i}-{k}" for k in range(4)]}), folder / f"part-{i}.parquet")
    texts, *_ = _read("l", "parquet", [folder], field="caption")
    assert texts == [f"p{i}-{k}" for i in range(3) for k in range(4)]


def test_globs_order_chunks_and_max_records(tmp_path):
    for i in (2, 0, 1):
        (tmp_path / f"s{i}.txt").write_text("".join(f"prompt {i} {k}\n" for k in range(5)))
    src = dict(name="t", format="text", paths=[str(tmp_path / "s*.txt")])
    assert [p.name for p in expand_paths(PromptSourceConfig(**src))] == ["s0.txt", "s1.txt", "s2.txt"]
    chunks = list(read_source(PromptSourceConfig(**src), chunk_rows=2))
    assert [len(c.texts) for c in chunks] == [2, 2, 1] * 3 and [c.done for c in chunks].count(True) == 3
    texts, *_, done = _read("t", "text", [tmp_path / "s*.txt"], max_records=7)
    assert texts == [f"prompt 0 {k}" for k in range(5)] + ["prompt 1 0", "prompt 1 1"] and len(done) == 2


def test_no_match_is_an_error(tmp_path):
    with pytest.raises(PromptInputError, match=r"source 'j': '.*nothing\*\.jsonl' matches no file"):
        _read("j", "jsonl", [tmp_path / "nothing*.jsonl"])
    with pytest.raises(PromptInputError, match="matches no file"):
        _read("j", "jsonl", [tmp_path / "missing.jsonl"])


def test_bad_jsonl_records_are_reported_by_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(b'{"prompt": "ok one"}\n'
                  b'{"prompt": "broken\n'
                  b'{"prompt": "caf\xe9 latte"}\n'
                  b'["a list"]\n'
                  b'{"caption": "no prompt field"}\n'
                  b'{"prompt": 42}\n'
                  b'{"prompt": null}\n'
                  b'{"prompt": "ok two"}\n')
    texts, bad, _, records, errors, _ = _read("j", "jsonl", [f])
    assert texts == ["ok one", "", "ok two"] and records == 8 and not errors
    assert bad == [f"{f}:2: malformed JSON (Invalid control character at column 19)",
                   f"{f}:3: invalid UTF-8 at byte 16",
                   f"{f}:4: expected a JSON object, got list",
                   f"{f}:5: no field 'prompt'",
                   f"{f}:6: field 'prompt' is int, not a string"]


def test_bad_text_and_csv_records(tmp_path):
    t = tmp_path / "p.txt"
    t.write_bytes(b"fine\nbad \xff\xfe byte\nfine too\n")
    texts, bad, *_ = _read("t", "text", [t])
    assert texts == ["fine", "fine too"] and bad == [f"{t}:2: invalid UTF-8 at byte 5"]
    c = tmp_path / "p.csv"
    c.write_bytes(b'prompt,score\na cat,7\na dog\n"caf\xe9",7\nan owl,high\n"a fox",6\n')
    texts, bad, *_ = _read("c", "csv", [c], filter_column="score", filter_min=5)
    assert texts == ["a cat", "a fox"]
    assert bad == [f"{c}:3: 1 fields, expected 2", f"{c}:4: invalid UTF-8", f"{c}:5: 'score' is 'high', not a number"]


def test_bad_parquet_rows_and_files(tmp_path):
    arr = pa.Array.from_buffers(pa.string(), 3, [None, pa.py_buffer(bytes([0, 0, 0, 0, 2, 0, 0, 0, 5, 0, 0, 0,
                                                                           8, 0, 0, 0])),
                                                 pa.py_buffer(b"ok\xff\xfe!fox")])
    f = tmp_path / "bad_utf8.parquet"
    pq.write_table(pa.table({"TEXT": arr}), f)
    texts, bad, *_ = _read("l", "parquet", [f])
    assert texts == ["ok", "fox"] and bad == [f"{f}: row 2: invalid UTF-8 at byte 1"]
    g = tmp_path / "cols.parquet"
    pq.write_table(pa.table({"caption": ["a"], "n": [1]}), g)
    assert _read("l", "parquet", [g])[4] == [f"{g}: no column 'TEXT' (columns: caption, n)"]
    assert _read("l", "parquet", [g], field="n")[4] == [f"{g}: column 'n' is int64, not text"]
    h = tmp_path / "not.parquet"
    h.write_bytes(b"PAR1 this is not parquet")
    assert _read("l", "parquet", [h])[4][0].startswith(f"{h}: not a readable Parquet file (")


def test_unreadable_and_empty_files(tmp_path):
    gz = tmp_path / "trunc.jsonl.gz"
    gz.write_bytes(gzip.compress(JSONL * 200)[:-40])
    texts, bad, _, records, errors, _ = _read("j", "jsonl", [gz])
    assert len(errors) == 1 and errors[0].startswith(f"{gz}: unreadable after {records} records (")
    fake = tmp_path / "fake.jsonl.gz"
    fake.write_bytes(b"plain text, not gzip")
    assert _read("j", "jsonl", [fake])[4] == [f"{fake}: unreadable after 0 records (Not a gzipped file (b'pl'))"]
    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "blank.jsonl").write_bytes(b"\n\n")
    for name, fmt in (("empty.csv", "csv"), ("blank.jsonl", "jsonl")):
        texts, bad, _, records, errors, done = _read("e", fmt, [tmp_path / name])
        assert (texts, bad, records, errors, len(done)) == ([], [], 0, [], 1)
    (tmp_path / "cols.csv").write_text("id,caption\n1,a\n")
    assert _read("c", "csv", [tmp_path / "cols.csv"])[4] == [
        f"{tmp_path / 'cols.csv'}: no column 'prompt' (columns: id, caption)"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400), fmt=st.sampled_from(["jsonl", "text", "csv", "tsv"]))
def test_readers_survive_hostile_bytes(tmp_path, data, fmt):
    f = tmp_path / f"h.{fmt}"
    f.write_bytes(data)
    texts, bad, filtered, records, errors, done = _read("h", fmt, [f], chunk_rows=3)
    assert records == len(texts) + len(bad) + filtered and len(done) == 1
    assert all(isinstance(t, str) for t in texts)
    assert all(m.startswith(str(f)) and "\n" not in m for m in bad + errors)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(st.one_of(
    st.text(max_size=30), st.none(), st.integers(),
    st.dictionaries(st.sampled_from(["prompt", "x"]), st.one_of(st.text(max_size=20), st.none(), st.floats()))),
    max_size=20))
def test_jsonl_reader_survives_any_json(tmp_path, records):
    f = tmp_path / "any.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    texts, bad, _, n, errors, _ = _read("j", "jsonl", [f])
    assert n == len(texts) + len(bad) and not errors
