"""`mopro-fast convert`: listed records -> WebDataset shards + DALI index files (+ FFCV .beton) + manifest.json.

The plan is a pure function of the listing and the settings: each split's records (the training
split in a seeded random order, so shards are class-mixed) are cut into shards of `shard_size`.
Each shard is one task for the process pool (data_tools/workers.py). A finished shard leaves
three files, each written to a temporary name and renamed: the tar, its index, and a state file
under `OUT/.state/` that is written last. A re-run reuses every shard whose state file matches
the plan, including the size and mtime of each of its input files (`ShardTask.records_digest`),
and rewrites the rest, so a killed conversion resumes to exactly the bytes of an uninterrupted
one, whatever `--workers`, and a changed source image is never served from an old shard.

Safety (data_tools/outdir.py): OUT may not overlap a source, must be writable, and is cleared by
--overwrite only if it is empty or an earlier mopro-fast output; all of this is checked before
anything is written. Every failure the user must fix is a one-line `ConvertError`: bad settings,
listing or OUT, a full disk (from any worker), or a split that lost every record
(data_tools/accounting.py). OUT/manifest.json is removed when a run starts and written when it
ends well: an OUT without a manifest is an unfinished conversion (resume it with the same command).

Accounting: every listed record ends in a shard or in the manifest's rejects with a reason;
`listed = written + rejected` is checked per split before the manifest is written.

Formats (`--format`): "wds" (the default, the output above), "ffcv" (one FFCV `.beton` per split,
written from the finished shards by data_tools/ffcv_stage.py; the shards are then work files under
`OUT/.state/work/`, deleted once the .beton is written) or "both". OUT holds what the last command
asked for: shards or .beton files of another format left by an earlier run are removed.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from mopro_fast.errors import MoproError
from data_tools import ffcv_stage, workers as pool
from data_tools.accounting import SplitLost, check_kept, check_present, compact_state, split_summary
from data_tools.beton import FIELDS_DOC, PAGE_SIZE, BetonError, BetonSettings
from data_tools.convert_config import DEFAULTS as _D, recipe_of, validate_convert
from data_tools.imaging import ImageRejected, prepare_image
from data_tools.outdir import (BETON_STATE, FORMAT, MANIFEST, WORK, check_sources, make_out, prepare_out,
                               remove_stale, unmake)
from data_tools.shard_plan import ShardTask, plan
from data_tools.shards import INDEX_VERSION, Sample, atomic_write_bytes, atomic_write_json, index_text, \
    sha256_file, write_tar
from data_tools.webvision import (ListingError, Record, Split, effective_classes, list_imagenet_val, list_webvision,
                                  read_synsets)
from mopro_fast.config import ConfigError
from mopro_fast.manifest_doc import BetonEntry, ManifestDoc, SplitSummary
from mopro_fast.progress import Progress
from mopro_fast.safe_io import OutputError, describe, discard

__all__ = ["BETON_STATE", "FORMAT", "MANIFEST", "WORK", "ConvertError", "ConvertSettings", "convert"]
OUTPUT_FORMATS = {"wds": ("wds",), "ffcv": ("ffcv",), "both": ("wds", "ffcv")}  # --format -> what is written


class ConvertError(MoproError):
    """A problem the user must fix before converting; one line."""


@dataclass(frozen=True)
class ConvertSettings:
    """Everything that decides the output bytes (the worker count does not): the listing and
    shards sections of a settings file, flat (data_tools/convert_config.py documents every field
    and holds the defaults). Recorded as the manifest's "settings"."""

    subset: str = _D.listing.subset
    classes: int | None = _D.listing.classes
    sources: tuple[str, ...] | None = _D.listing.sources
    val_dir: str = _D.listing.val_dir
    imagenet_val: str | None = _D.listing.imagenet_val
    imagenet_labels: str | None = _D.listing.imagenet_labels
    max_side: int = _D.shards.max_side
    quality: int = _D.shards.quality
    shard_size: int = _D.shards.shard_size
    max_pixels: int = _D.shards.max_pixels
    seed: int = _D.shards.seed

    def check(self) -> None:
        """ConvertError naming the first bad value (the settings file's rules, convert_config.py)."""
        try:
            validate_convert(recipe_of(self))
        except ConfigError as exc:
            raise ConvertError(str(exc)) from None

    def sources_of(self, src: Path) -> dict[str, Path]:
        """The inputs OUT must stay clear of, by the option that names them."""
        found = {"SRC": Path(src), "--val-dir": Path(src) / self.val_dir}
        if self.imagenet_val:
            found["--imagenet-val"] = Path(self.imagenet_val)
        if self.imagenet_labels:
            found["--imagenet-labels"] = Path(self.imagenet_labels)
        return found


# ----------------------------------------------------------------------------------- planning

def list_splits(src: Path, settings: ConvertSettings) -> tuple[dict[str, Split], list]:
    """All splits to convert, and the synsets (class names) of the source."""
    splits = list_webvision(src, settings.subset, settings.classes, settings.sources, settings.val_dir)
    synsets = read_synsets(src)
    if settings.imagenet_val is not None:
        labels = Path(settings.imagenet_labels) if settings.imagenet_labels else None
        splits["imagenet-val"] = list_imagenet_val(Path(settings.imagenet_val), synsets, labels,
                                                   num_classes(settings, synsets))
    return splits, synsets


def num_classes(settings: ConvertSettings, synsets: list) -> int:
    return effective_classes(settings.subset, settings.classes, len(synsets))


# ------------------------------------------------------------------------------------ one shard

def run_shard(task: ShardTask, settings: ConvertSettings, tick: Callable[[], None] = pool.tick) -> dict:
    """Convert one shard's records; write tar, index and state file; return the state."""
    out = Path(task.out)
    tar_path, idx_path = out / task.tar_rel, out / task.idx_rel
    pool.writing([tar_path, idx_path, task.state_path])
    inputs = task.records_digest()  # before any file is read, see records_digest
    rejects: list[dict] = []
    repaired: list[dict] = []
    class_counts: dict[int, int] = {}
    source_counts: dict[str, int] = {}

    def samples():
        for rec in task.records:
            try:
                enc = prepare_image(_read(rec), settings.max_side, settings.quality, settings.max_pixels)
            except ImageRejected as exc:
                rejects.append({**rec.to_json(), "reason": exc.reason, "detail": exc.detail[:200]})
                tick()
                continue
            if enc.repairs:
                repaired.append({"key": rec.key, "path": rec.path, "repairs": list(enc.repairs)})
            class_counts[rec.label] = class_counts.get(rec.label, 0) + 1
            source_counts[rec.source] = source_counts.get(rec.source, 0) + 1
            meta = {**rec.to_json(), "width": enc.width, "height": enc.height, "orig_width": enc.orig_width,
                    "orig_height": enc.orig_height, "orig_format": enc.orig_format, "orig_mode": enc.orig_mode}
            tick()
            yield Sample(rec.key, enc.data, rec.label, rec.index, meta)

    members = write_tar(tar_path, samples(), expected=len(task.records))
    state = {"fingerprint": task.fingerprint, "records": inputs, "samples": sum(class_counts.values()),
             "rejects": rejects, "repaired": repaired,
             "class_counts": {str(k): v for k, v in sorted(class_counts.items())},
             "source_counts": dict(sorted(source_counts.items()))}
    if members is None:
        # Every record rejected: no empty tar (DALI refuses those); the state still accounts for them.
        for path in (tar_path, idx_path):
            path.unlink(missing_ok=True)
        state.update(file=None, index=None)
    else:
        atomic_write_bytes(idx_path, index_text(members).encode())
        state.update(file=task.tar_rel, index=task.idx_rel, bytes=tar_path.stat().st_size,
                     sha256=sha256_file(tar_path), index_sha256=sha256_file(idx_path))
    atomic_write_json(task.state_path, state)
    return state


_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}


def _read(rec: Record) -> bytes:
    """The listed file's bytes. Only a regular file is read: anything else (a FIFO would block
    forever, a device never end) is rejected from its stat, and the file is opened non-blocking
    and checked again before reading, in case it was swapped in between."""
    path = rec.file()
    try:
        if not stat.S_ISREG(mode := os.stat(path).st_mode):
            raise ImageRejected("not_a_regular_file", _KINDS.get(stat.S_IFMT(mode), f"mode {mode:o}"))
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        if not stat.S_ISREG(mode := os.fstat(fd).st_mode):
            os.close(fd)
            raise ImageRejected("not_a_regular_file", _KINDS.get(stat.S_IFMT(mode), f"mode {mode:o}"))
        with open(fd, "rb") as fh:
            return fh.read()
    except (FileNotFoundError, NotADirectoryError):
        raise ImageRejected("missing_file", str(path)) from None
    except OSError as exc:
        raise ImageRejected("unreadable_file", f"{type(exc).__name__}: {exc}") from None


def _finished_state(task: ShardTask) -> dict | None:
    """The state file of a shard an earlier run finished with the same plan and the same input
    files (its output files unchecked)."""
    try:
        state = json.loads(task.state_path.read_text())
    except (OSError, ValueError):
        return None
    if state.get("fingerprint") != task.fingerprint or state.get("file") not in (None, task.tar_rel):
        return None  # other settings, or written for another --format
    if state.get("records") != task.records_digest():
        return None
    return state


def _finished_states(tasks: list[ShardTask], threads: int) -> dict[str, dict | None]:
    with ThreadPoolExecutor(max(1, min(32, 4 * threads))) as executor:
        return dict(zip((t.name for t in tasks), executor.map(_finished_state, tasks)))


def _reusable(task: ShardTask, state: dict | None, current_betons: frozenset[str] = frozenset()) -> dict | None:
    """`state` (from `_finished_state`) if the shard's files are there (or, for the work files of
    an ffcv-only conversion, if its split's .beton is current)."""
    if state is None or state.get("file") is None or task.split in current_betons:
        return state
    out = Path(task.out)
    tar, idx = out / state["file"], out / state["index"]
    if not (tar.is_file() and idx.is_file() and tar.stat().st_size == state.get("bytes")):
        return None
    return state


def _run_all(tasks: list[ShardTask], finished: dict[str, dict | None], settings: ConvertSettings, workers: int,
             progress: bool, every_s: float, current_betons: frozenset[str] = frozenset()) -> dict[str, dict]:
    states: dict[str, dict] = {}
    todo = []
    for task in tasks:
        state = _reusable(task, finished[task.name], current_betons)
        if state is not None:
            states[task.name] = compact_state(state)
        else:
            todo.append(task)
    reused = len(tasks) - len(todo)
    bar = Progress(sum(len(t.records) for t in todo), "convert", unit="img", every_s=every_s, enabled=progress)
    if reused:
        bar.update(0, reused=f"{reused} shards")
    try:
        states.update(pool.run_tasks(run_shard, todo, (settings,), workers, lambda n: bar.update(n - bar.done),
                                     keep=compact_state))
    finally:
        bar.close()
    return states


# --------------------------------------------------------------------------------- orchestration

def convert(src: Path, out: Path, settings: ConvertSettings, workers: int | None = None,
            overwrite: bool = False, progress: bool = True, fmt: str = "wds",
            beton: BetonSettings | None = None, progress_seconds: float = 30.0,
            listing: Callable | None = None) -> dict:
    """Convert SRC into shards (and/or .beton files, `fmt`) under OUT; returns the manifest (also
    written to OUT/manifest.json). `progress`: a bar on a TTY, else a plain line on stderr every
    `progress_seconds` (0: none). `listing`: () -> (splits, synsets) in place of SRC's WebVision listing
    (`mopro-fast finetune` converts an ImageNet folder's subset). Raises `ConvertError` (one line)."""
    src, out = Path(src), Path(out)
    try:
        return _convert(src, out, settings, workers or os.cpu_count() or 1, overwrite, progress, fmt,
                        beton or BetonSettings(), progress_seconds, listing)
    except (OutputError, SplitLost, BetonError) as exc:
        raise ConvertError(str(exc)) from None
    except OSError as exc:  # outside the atomic writes: making folders, removing stale files, reading
        path = Path(exc.filename or out)
        inside = path == out or out in path.parents
        raise ConvertError(describe(exc, path, what="write" if inside else "read")) from None


def _check_format(fmt: str, beton: BetonSettings) -> tuple[str, ...]:
    if fmt not in OUTPUT_FORMATS:
        raise ConvertError(f"--format must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}")
    if "ffcv" in OUTPUT_FORMATS[fmt]:
        from data_tools.beton import require_ffcv

        try:
            beton.check()
            require_ffcv()
        except BetonError as exc:
            raise ConvertError(str(exc)) from None
    return OUTPUT_FORMATS[fmt]


def _convert(src: Path, out: Path, settings: ConvertSettings, workers: int, overwrite: bool, progress: bool,
             fmt: str, beton: BetonSettings, every_s: float, listing: Callable | None = None) -> dict:
    settings.check()
    formats = _check_format(fmt, beton)
    check_sources(out, settings.sources_of(src))
    created = make_out(out)
    try:
        splits, synsets = listing() if listing is not None else list_splits(src, settings)
        check_present(splits)
    except (ListingError, SplitLost) as exc:
        unmake(created)
        raise ConvertError(str(exc)) from None
    prepare_out(out, {"format": FORMAT, "settings": asdict(settings)}, overwrite)
    discard(out / MANIFEST)  # OUT changes from here on: a manifest only ever describes a finished OUT
    prefix = "" if "wds" in formats else WORK + "/"
    for name in splits:
        (out / prefix / name).mkdir(parents=True, exist_ok=True)
    tasks = plan(splits, settings, out, prefix)
    finished = _finished_states(tasks, workers)
    current = ffcv_stage.current_splits(out, splits, tasks, finished, beton) if formats == ("ffcv",) else frozenset()
    states = _run_all(tasks, finished, settings, workers, progress, every_s, current)
    k = num_classes(settings, synsets)
    summaries = {name: split_summary(split, [states[t.name] for t in tasks if t.split == name], k)
                 for name, split in splits.items()}
    remove_stale(out, splits, {t.name for t in tasks}, formats)
    for name, summary in summaries.items():
        check_kept(name, summary, splits[name].records[0].root if splits[name].records else str(src))
    for name in splits:
        if "ffcv" in formats:
            done = [(t, states[t.name]) for t in tasks if t.split == name]
            entry = ffcv_stage.write_split(out, name, done, beton, settings.seed, progress, every_s)
            summaries[name] = replace(summaries[name], beton=BetonEntry(**entry))
        if "wds" not in formats:
            summaries[name] = replace(summaries[name], shards=[])  # work files, gone
    if formats == ("ffcv",):
        shutil.rmtree(out / WORK, ignore_errors=True)
    manifest = _manifest(src, settings, synsets, formats, beton, summaries).to_json()
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def _manifest(src: Path, settings: ConvertSettings, synsets: list, formats: tuple[str, ...], beton: BetonSettings,
              summaries: dict[str, SplitSummary]) -> ManifestDoc:
    from mopro_fast import __version__  # light: the package's __init__ imports nothing heavy

    k = num_classes(settings, synsets)
    ffcv = None
    if formats != ("wds",):  # (a wds-only manifest stays byte-identical to earlier versions)
        from importlib.metadata import version

        ffcv = {"settings": asdict(beton), "fields": FIELDS_DOC, "page_size": PAGE_SIZE,
                "ffcv_version": version("ffcv"), "file_version": 2}
    return ManifestDoc(
        format=FORMAT, tool={"name": "mopro-fast", "version": __version__}, settings=asdict(settings),
        source=str(src.resolve()),
        fields={"jpg": "RGB JPEG", "cls": "label, ASCII", "lbl": "label, int32 LE",
                "sid": "sample index in split, int32 LE", "json": "record metadata"},
        index_format=f"DALI wds2idx {INDEX_VERSION}", num_classes=k,
        classes=[{"id": i, "wnid": s.wnid, "name": s.name} for i, s in enumerate(synsets[:k])],
        splits=summaries, formats=list(formats) if ffcv else None, ffcv=ffcv)
