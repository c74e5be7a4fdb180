"""The FFCV stage of `convert --format ffcv|both`: one `OUT/<split>.beton` per split from its shards.

A split's .beton is written (data_tools/beton.py) from the split's finished shards in plan order.
Its state file `OUT/.state/beton/<split>.json` lands last and names the shards' sha256s and the
FFCV settings (`key_of`): a re-run reuses a current .beton and rewrites a missing, partial or
outdated one. With --format ffcv alone the shards are work files: a re-run with a current .beton
converts nothing, one without rebuilds the shards it needs. Errors: `BetonError` (the images do
not fit FFCV's format) and `OutputError` (the file cannot be written), one line each; the
temporary file is gone either way.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from data_tools.beton import BetonSettings
from data_tools.outdir import BETON_STATE
from data_tools.shards import atomic_write_json, read_samples, sha256_file
from data_tools.webvision import Split
from mopro_fast.progress import Progress

if TYPE_CHECKING:
    from data_tools.convert import ShardTask


def state_path(out: Path, split: str) -> Path:
    return out / BETON_STATE / f"{split}.json"


def key_of(done: list[tuple[ShardTask, dict]], beton: BetonSettings) -> dict:
    """What decides a split's .beton bytes: the shards (by sha256, in plan order) and the settings."""
    return {"shards": [state.get("sha256") for _task, state in done], "settings": asdict(beton),
            "fingerprint": done[0][0].fingerprint if done else None}


def current_summary(out: Path, split: str, key: dict) -> dict | None:
    """The recorded summary of split's .beton if the file on disk was written from exactly `key`."""
    try:
        state = json.loads(state_path(out, split).read_text())
    except (OSError, ValueError):
        return None
    path = out / f"{split}.beton"
    if state.get("key") != key or not path.is_file() or path.stat().st_size != state["summary"]["bytes"]:
        return None
    return state["summary"]


def current_splits(out: Path, splits: dict[str, Split], tasks: list[ShardTask], finished: dict[str, dict | None],
                   beton: BetonSettings) -> frozenset:
    """Splits whose .beton is current given the shard states already on disk (ffcv-only resume)."""
    current = set()
    for name in splits:
        done = [(t, finished[t.name]) for t in tasks if t.split == name]
        if all(state is not None for _t, state in done) and current_summary(out, name, key_of(done, beton)):
            current.add(name)
    return frozenset(current)


def write_split(out: Path, split: str, done: list[tuple[ShardTask, dict]], beton: BetonSettings, seed: int,
                progress: bool, every_s: float) -> dict:
    """Write (or reuse) OUT/<split>.beton from the split's finished shards; returns its manifest entry."""
    from data_tools.beton import write_beton

    key = key_of(done, beton)
    summary = current_summary(out, split, key)
    if summary is not None:
        return summary
    path = out / f"{split}.beton"
    total = sum(state["samples"] for _t, state in done)

    def samples():
        for _task, state in done:
            if state["file"] is not None:
                for _key, fields in read_samples(out / state["file"]):
                    yield (fields["jpg"], int.from_bytes(fields["lbl"], "little", signed=True),
                           int.from_bytes(fields["sid"], "little", signed=True))

    bar = Progress(total, f"ffcv {split}", unit="img", every_s=every_s, enabled=progress)
    try:
        counts = write_beton(path, samples(), total, beton, seed, split, tick=bar.update)
    finally:
        bar.close()
    summary = {"file": path.name, "samples": counts["samples"], "jpg": counts["jpg"], "raw": counts["raw"],
               "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    state_path(out, split).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(state_path(out, split), {"key": key, "summary": summary})
    return summary
