"""Readers for prompt sources: JSON Lines (JourneyDB's annotations, plain or .gz/.bz2/.xz/.tgz/.tar), Parquet
(LAION's metadata), plain text (one prompt a line) and CSV/TSV with a named column.

A reader never raises on a bad record: it yields the record's message ("file:line: what is wrong") and goes on; the
builder decides, by config, whether to skip and count or to stop. A file that cannot be read (missing, corrupt,
no such column) ends with ``FileChunk.error`` set.
"""

from __future__ import annotations

import bz2
import csv
import glob
import gzip
import json
import lzma
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sb2.config import PromptSourceConfig

SUFFIXES = {
    "jsonl": (".jsonl", ".json", ".ndjson"),
    "text": (".txt",),
    "csv": (".csv",),
    "tsv": (".tsv", ".tab"),
    "parquet": (".parquet", ".pq"),
}
_COMPRESSED = (".gz", ".bz2", ".xz", ".tgz", ".tar")
_READ_ERRORS = (OSError, EOFError, zlib.error, tarfile.TarError, lzma.LZMAError, pa.ArrowException)


class PromptInputError(ValueError):
    """Input that stops the build; the message is one line naming the file (and line)."""


@dataclass
class FileChunk:
    """Up to ``chunk_rows`` prompts of one file, with what was wrong in the same stretch of the file."""

    source: str
    path: str
    texts: list[str] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    filtered: int = 0
    records: int = 0
    done: bool = False
    error: str | None = None


class _FileFailed(Exception):
    pass


def expand_paths(src: PromptSourceConfig) -> list[Path]:
    """Files of a source, in a stable order: each path or glob sorted, folders searched for the format's files."""
    found: list[Path] = []
    for pattern in src.paths:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches or not Path(matches[0]).exists():
            raise PromptInputError(f"source {src.name!r}: {pattern!r} matches no file")
        for m in map(Path, matches):
            if m.is_dir():
                ok = tuple(s + c for s in SUFFIXES[src.format] for c in ("",) + _COMPRESSED)
                found.extend(sorted(p for p in m.rglob("*") if p.is_file() and p.name.endswith(ok)))
            else:
                found.append(m)
    seen: set[Path] = set()
    return [p for p in found if not (p in seen or seen.add(p))]


def _open_streams(path: Path) -> Iterator[tuple[str, BinaryIO]]:
    """(display name, binary stream) for a plain or compressed file, one per member of a tar archive."""
    name = path.name
    if name.endswith((".tgz", ".tar.gz", ".tar", ".tar.bz2", ".tar.xz")):
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if member.isfile():
                    yield f"{path}:{member.name}", tar.extractfile(member)
        return
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(path.suffix, open)
    with opener(path, "rb") as f:
        yield str(path), f


def filter_value(value, column: str) -> float:
    """The number in a record's filter column (a number or numeric text); ValueError naming the column otherwise.
    Shared with the image–caption sources of the regularization (sb2/train/paired.py)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{column!r} is {type(value).__name__}, not a number")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{column!r} is {value!r}, not a number") from None


class _Chunker:
    """Collects records into FileChunks of ``rows`` prompts and stops at ``limit`` records."""

    def __init__(self, source: str, path: str, rows: int, limit: int | None):
        self.source, self.path, self.rows, self.limit = source, path, rows, limit
        self.chunk = FileChunk(source, path)
        self.total = 0

    def full(self) -> bool:
        return self.limit is not None and self.total >= self.limit

    def text(self, t: str) -> FileChunk | None:
        self.chunk.texts.append(t)
        return self._count()

    def bad(self, where: str, msg: str) -> FileChunk | None:
        self.chunk.bad.append(f"{where}: {msg}")
        return self._count()

    def filtered(self) -> FileChunk | None:
        self.chunk.filtered += 1
        return self._count()

    def _count(self) -> FileChunk | None:
        self.chunk.records += 1
        self.total += 1
        if len(self.chunk.texts) >= self.rows:
            out, self.chunk = self.chunk, FileChunk(self.source, self.path)
            return out
        return None


def _jsonl(stream, display: str, src: PromptSourceConfig, ck: _Chunker) -> Iterator[FileChunk]:
    fld, col, low = src.prompt_field, src.filter_column, src.filter_min
    for lineno, raw in enumerate(stream, 1):
        if ck.full():
            return
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)  # bytes: decoded as UTF-8 (a BOM allowed), strictly
        except UnicodeDecodeError as e:
            out = ck.bad(f"{display}:{lineno}", f"invalid UTF-8 at byte {e.start + 1}")
        except json.JSONDecodeError as e:
            msg = e.msg.removesuffix(" at")  # "Unterminated string starting at"
            out = ck.bad(f"{display}:{lineno}", f"malformed JSON ({msg} at column {e.colno})")
        else:
            out = _json_record(rec, display, lineno, fld, col, low, ck)
        if out is not None:
            yield out


def _json_record(rec, display, lineno, fld, col, low, ck: _Chunker) -> FileChunk | None:
    if type(rec) is dict and col is None:  # the common case, first
        value = rec.get(fld)
        if type(value) is str:
            return ck.text(value)
    where = f"{display}:{lineno}"
    if not isinstance(rec, dict):
        return ck.bad(where, f"expected a JSON object, got {type(rec).__name__}")
    if fld not in rec:
        return ck.bad(where, f"no field {fld!r}")
    value = rec[fld]
    if value is not None and not isinstance(value, str):
        return ck.bad(where, f"field {fld!r} is {type(value).__name__}, not a string")
    if col is not None:
        if rec.get(col) is None:
            return ck.bad(where, f"no field {col!r}")
        try:
            if filter_value(rec[col], col) < low:
                return ck.filtered()
        except ValueError as e:
            return ck.bad(where, str(e))
    return ck.text(value or "")


def _text(stream, display: str, src: PromptSourceConfig, ck: _Chunker) -> Iterator[FileChunk]:
    for lineno, raw in enumerate(stream, 1):
        if ck.full():
            return
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            out = ck.bad(f"{display}:{lineno}", f"invalid UTF-8 at byte {e.start + 1}")
        else:
            out = ck.text(text.lstrip("\ufeff") if lineno == 1 else text)
        if out is not None:
            yield out


def _has_surrogates(s: str) -> bool:
    if s.isascii():
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _csv(stream, display: str, src: PromptSourceConfig, ck: _Chunker) -> Iterator[FileChunk]:
    lines = (raw.decode("utf-8", "surrogateescape") for raw in stream)
    reader = csv.reader(lines, delimiter="\t" if src.format == "tsv" else ",")
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        raise _FileFailed(f"{display}:1: unreadable header ({e})") from None
    if header:
        header[0] = header[0].lstrip("\ufeff")
    fld, col = src.prompt_field, src.filter_column
    for name in (fld, col):
        if name is not None and name not in header:
            raise _FileFailed(f"{display}: no column {name!r} (columns: {', '.join(header)})")
    i, j = header.index(fld), header.index(col) if col else None
    while not ck.full():
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            out = ck.bad(f"{display}:{reader.line_num}", f"malformed row ({e})")
        else:
            if not row:
                continue
            where = f"{display}:{reader.line_num}"
            if len(row) != len(header):
                out = ck.bad(where, f"{len(row)} fields, expected {len(header)}")
            elif _has_surrogates(row[i]):
                out = ck.bad(where, "invalid UTF-8")
            elif j is not None:
                try:
                    out = ck.filtered() if filter_value(row[j], col) < src.filter_min else ck.text(row[i])
                except ValueError as e:
                    out = ck.bad(where, str(e))
            else:
                out = ck.text(row[i])
        if out is not None:
            yield out


def _parquet(path: Path, src: PromptSourceConfig, ck: _Chunker) -> Iterator[FileChunk]:

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise _FileFailed(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    schema = pf.schema_arrow
    fld, col = src.prompt_field, src.filter_column
    for name in (fld, col):
        if name is not None and name not in schema.names:
            raise _FileFailed(f"{path}: no column {name!r} (columns: {', '.join(schema.names)})")
    if not (pa.types.is_string(schema.field(fld).type) or pa.types.is_large_string(schema.field(fld).type)):
        raise _FileFailed(f"{path}: column {fld!r} is {schema.field(fld).type}, not text")
    if col is not None and not (pa.types.is_integer(schema.field(col).type) or
                                pa.types.is_floating(schema.field(col).type)):
        raise _FileFailed(f"{path}: column {col!r} is {schema.field(col).type}, not a number")
    row = 0
    for batch in pf.iter_batches(batch_size=ck.rows, columns=[fld] + ([col] if col else [])):
        if ck.limit is not None:
            batch = batch.slice(0, max(ck.limit - ck.total, 0))
        if batch.num_rows == 0:
            return
        texts = _parquet_texts(batch.column(0), path, row, ck)
        keep = None
        if col is not None:
            keep = pc.fill_null(pc.greater_equal(batch.column(1), pa.scalar(src.filter_min)), False).to_pylist()
        for k, t in enumerate(texts):
            if t is None:  # invalid UTF-8, already reported
                continue
            out = ck.text(t) if keep is None or keep[k] else ck.filtered()
            if out is not None:
                yield out
        row += batch.num_rows


def _parquet_texts(column, path: Path, first_row: int, ck: _Chunker) -> list[str | None]:
    try:
        column.validate(full=True)
        return ["" if t is None else t for t in column.to_pylist()]
    except (pa.ArrowInvalid, UnicodeDecodeError):
        texts: list[str | None] = []
        for k, raw in enumerate(column.cast(pa.binary()).to_pylist()):
            try:
                texts.append("" if raw is None else raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                texts.append(None)
                # A bad record never completes a chunk (only prompts do), so nothing is lost here.
                ck.bad(f"{path}: row {first_row + k + 1}", f"invalid UTF-8 at byte {e.start + 1}")
        return texts


def read_source(src: PromptSourceConfig, chunk_rows: int) -> Iterator[FileChunk]:
    """Every file of ``src`` as FileChunks; the last chunk of each file has ``done`` set (and ``error`` if the
    file could not be read to its end)."""
    total = 0
    for path in expand_paths(src):
        limit = None if src.max_records is None else src.max_records - total
        if limit is not None and limit <= 0:
            return
        ck = _Chunker(src.name, str(path), chunk_rows, limit)
        error = None
        try:
            if src.format == "parquet":
                yield from _parquet(path, src, ck)
            else:
                reader = {"jsonl": _jsonl, "text": _text, "csv": _csv, "tsv": _csv}[src.format]
                for display, stream in _open_streams(path):
                    yield from reader(stream, display, src, ck)
        except _FileFailed as e:
            error = str(e)
        except _READ_ERRORS as e:
            msg = str(e).splitlines()[0] if str(e).strip() else e.__class__.__name__
            error = f"{path}: unreadable after {ck.total} records ({msg})"
        last = ck.chunk
        last.done, last.error = True, error
        total += ck.total
        yield last
