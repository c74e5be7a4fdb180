"""Accounting of `convert`: every listed record is written or rejected with a reason, and a split
that lost all of them is an error, not an empty success.

A split whose every listed record was rejected (a wrong --val-dir, an unmounted image folder,
a listing of files that are all broken) is refused twice over:

- before anything is written, when none of its files exists (`check_present`: stats the
  split's files up to the first one found, so a normal split costs one stat);
- after its shards are converted, when all were rejected for other reasons (`check_kept`).

In the second case the shards of every split are kept with their state files, so that the same
command, re-run once the files are fixed, converts only the shards whose inputs changed; but no
manifest.json is written (an earlier one was removed when the run began): a conversion without
a manifest is unfinished, and loaders and `verify` refuse it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from data_tools.webvision import Split
from mopro_fast.manifest_doc import ShardEntry, SplitSummary

HINTS = {"train": "check SRC and the paths in info/train_filelist_*.txt", "val": "check --val-dir",
         "imagenet-val": "check --imagenet-val and --imagenet-labels"}


class SplitLost(Exception):
    """A split none of whose records made it; the message is one line."""


def check_present(splits: dict[str, Split]) -> None:
    """Raise `SplitLost` for the first split whose every listed file is missing."""
    for name, split in splits.items():
        if not split.records or any(_exists(r.file()) for r in split.records):
            continue
        reasons = {"missing_file": len(split.records)}
        if split.duplicates:
            reasons["duplicate_listing"] = len(split.duplicates)
        raise SplitLost(_message(name, split.num_listed, reasons, str(split.records[0].file())))


def _exists(path: Path) -> bool:
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True  # there, but not readable: the worker rejects it with the reason
    return True


def check_kept(name: str, summary: SplitSummary, root: str) -> None:
    """Raise `SplitLost` if split `name` (its manifest entry `summary`) has listed records but wrote none."""
    if summary.num_listed == 0 or summary.num_written > 0:
        return
    reasons = dict(sorted(summary.rejected_by_reason.items(), key=lambda kv: (-kv[1], kv[0])))
    majority = next(iter(reasons))
    first = next(r["path"] for r in summary.rejects if r["reason"] == majority)
    raise SplitLost(_message(name, summary.num_listed, reasons, str(Path(root) / first)))


def _message(name: str, listed: int, reasons: dict[str, int], first: str) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in reasons.items())
    return f"{name}: all {listed} listed records rejected ({counts}: first {first}); " \
           f"{HINTS.get(name, 'check its listing')}"


def compact_state(state: dict) -> dict:
    """A shard's state as `convert` holds it until the manifest is written: its class counts as an
    int64 array of (label, count) rows instead of a dict with a str key per class (16 M records in
    5,000 classes would be ~13 M dict entries over 8,000 shards). The state files keep the dict."""
    counts = state["class_counts"]
    if isinstance(counts, dict):
        pairs = np.fromiter((v for item in counts.items() for v in (int(item[0]), item[1])), dtype=np.int64,
                            count=2 * len(counts))
        state = {**state, "class_counts": pairs.reshape(-1, 2)}
    return state


def split_summary(split: Split, states: list[dict], k: int) -> SplitSummary:
    """The manifest entry of a split from the states of its shards (in plan order)."""
    shards, rejects, repaired = [], [], []
    class_counts = np.zeros(k, dtype=np.int64)
    source_counts: dict[str, int] = {}
    for state in states:
        if state["file"] is not None:
            shards.append(ShardEntry(state["file"], state["index"], state["samples"], state["bytes"], state["sha256"],
                                     state["index_sha256"]))
        rejects += state["rejects"]
        repaired += state["repaired"]
        counts = compact_state(state)["class_counts"]  # m x 2: (label, count)
        np.add.at(class_counts, counts[:, 0], counts[:, 1])
        for source, n in state["source_counts"].items():
            source_counts[source] = source_counts.get(source, 0) + n
    rejects += [{**r.to_json(), "reason": "duplicate_listing", "detail": f"{r.path} listed again"}
                for r in split.duplicates]
    rejects.sort(key=lambda r: r["index"])
    repaired.sort(key=lambda r: r["key"])
    written = sum(s.samples for s in shards)
    if written + len(rejects) != split.num_listed:
        raise RuntimeError(f"accounting failed for split {split.name}: listed {split.num_listed} != "
                           f"written {written} + rejected {len(rejects)}")
    reasons: dict[str, int] = {}
    for r in rejects:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    return SplitSummary(num_listed=split.num_listed, num_written=written, num_rejected=len(rejects),
                        rejected_by_reason=dict(sorted(reasons.items())), num_repaired=len(repaired), shards=shards,
                        class_counts=class_counts.tolist(), source_counts=dict(sorted(source_counts.items())),
                        rejects=rejects, repaired=repaired)
