"""What the builder says about its output: the per-source counts, the bad-input policy, and the stats plot."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from sb2.config import BadInputConfig
from sb2.prompts.sources import FileChunk, PromptInputError

SHOWN_PER_FILE = 10


@dataclass
class SourceCounts:
    files: int = 0
    records: int = 0
    bad_input: int = 0
    empty_files: int = 0
    unreadable_files: int = 0
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0
    exact_duplicate: int = 0
    near_duplicate: int = 0
    kept: int = 0
    train: int = 0
    val: int = 0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["dropped"] = dict(sorted(self.dropped.items()))
        return d


class BadInputPolicy:
    """Every bad record is reported (the first few of a file on the log, all in ``bad_input.txt``) and counted; the
    build stops on the first one with ``on_error=stop``, or when a file's share of them passes
    ``max_bad_fraction``. A file that cannot be read to its end counts as all bad."""

    def __init__(self, cfg: BadInputConfig, counts: dict[str, SourceCounts], out: TextIO,
                 log: Callable[[str], None]):
        self.cfg, self.counts, self.out, self.log = cfg, counts, out, log
        self.file_bad: Counter = Counter()
        self.file_records: Counter = Counter()
        self.first_bad: dict[str, str] = {}

    def check(self, chunk: FileChunk) -> None:
        c = self.counts[chunk.source]
        path = chunk.path
        c.records += chunk.records
        c.bad_input += len(chunk.bad)
        c.dropped["filtered"] += chunk.filtered
        self.file_records[path] += chunk.records
        for msg in chunk.bad:
            if self.cfg.on_error == "stop":
                raise PromptInputError(f"{msg} (bad_input.on_error=stop)")
            self.out.write(msg + "\n")
            if self.file_bad[path] < SHOWN_PER_FILE:
                self.log(f"warning: {msg}")
            self.first_bad.setdefault(path, msg)
            self.file_bad[path] += 1
        if chunk.done:
            self._file_done(chunk, c)

    def _file_done(self, chunk: FileChunk, c: SourceCounts) -> None:
        path, bad, records = chunk.path, self.file_bad[chunk.path], self.file_records[chunk.path]
        c.files += 1
        if chunk.error is not None:
            if self.cfg.on_error == "stop" or self.cfg.max_bad_fraction < 1.0:
                hint = "bad_input.on_error=stop" if self.cfg.on_error == "stop" else \
                    "a file that cannot be read counts as all bad; bad_input.max_bad_fraction=1 skips it"
                raise PromptInputError(f"{chunk.error} ({hint})")
            self.log(f"warning: {chunk.error}; skipped")
            self.out.write(chunk.error + "\n")
            c.unreadable_files += 1
            return
        if records == 0:
            if self.cfg.on_error == "stop":
                raise PromptInputError(f"{path}: empty file, no records (bad_input.on_error=stop)")
            self.log(f"warning: {path}: empty file, no records; skipped")
            self.out.write(f"{path}: empty file, no records\n")
            c.empty_files += 1
            return
        if bad > SHOWN_PER_FILE:
            self.log(f"warning: {path}: {bad - SHOWN_PER_FILE} more bad records (all in bad_input.txt)")
        if bad > self.cfg.max_bad_fraction * records:
            raise PromptInputError(
                f"{path}: {bad} of {records} records bad ({bad / records:.1%}), more than "
                f"bad_input.max_bad_fraction={self.cfg.max_bad_fraction}; first: {self.first_bad[path]}")


def write_stats_plot(path: Path, lengths: np.ndarray, length_label: str, counts: dict[str, SourceCounts]) -> None:
    """Prompt-length histogram and, per source, what became of its records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_len, ax_src) = plt.subplots(1, 2, figsize=(11, 4))
    if len(lengths):
        ax_len.hist(lengths, bins=min(60, max(int(lengths.max()) - int(lengths.min()) + 1, 1)), color="#4c72b0")
    ax_len.set_xlabel(length_label)
    ax_len.set_ylabel("prompts")
    ax_len.set_title(f"length of the {len(lengths):,} kept prompts")
    names = list(counts)
    parts = {
        "train": [counts[n].train for n in names],
        "val": [counts[n].val for n in names],
        "exact dup": [counts[n].exact_duplicate for n in names],
        "near dup": [counts[n].near_duplicate for n in names],
        "dropped": [sum(counts[n].dropped.values()) + counts[n].bad_input for n in names],
    }
    bottom = np.zeros(len(names))
    for label, values in parts.items():
        ax_src.bar(names, values, bottom=bottom, label=label)
        bottom += np.asarray(values, dtype=float)
    ax_src.set_ylabel("records")
    ax_src.set_title("records per source")
    ax_src.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80, metadata={"Software": None})
    plt.close(fig)
