"""`mopro-fast convert`: listed records -> WebDataset shards + DALI index files (+ FFCV .beton) + manifest.json.

The plan is a pure function of the listing and the settings: each split's records (the training
split in a seeded random order, so shards are class-mixed) are cut into shards of `shard_size`.
Each shard is one task for the process pool. A finished shard leaves three files, each written to
a temporary name and renamed: the tar, its index, and a state file under `OUT/.state/` that is
written last. A re-run reuses every shard whose state file matches the plan and rewrites the rest,
so a killed conversion resumes to exactly the bytes of an uninterrupted one, whatever `--workers`.

Accounting: every listed record ends in a shard or in the manifest's rejects with a reason;
`listed = written + rejected` is checked per split before the manifest is written.

Formats (`--format`): "wds" (the default, the output above), "ffcv" or "both". FFCV's `.beton`
(data_tools/beton.py) is written per split from the finished shards, in plan order, so it holds
the same records, images and rejects. Its state file `OUT/.state/beton/<split>.json` lands last
and names the shards' sha256s and the FFCV settings: a re-run reuses a current .beton and
rewrites a missing, partial or outdated one from the shards (FFCV options can change without
--overwrite: only the .beton is rewritten). With "ffcv" alone the shards are work files under
`OUT/.state/work/`, deleted once the .beton is written; a re-run with a current .beton converts
nothing, one without rebuilds the shards it needs. OUT holds what the last command asked for:
shards of another format left by an earlier run are removed.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import random
import shutil
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from data_tools.beton import FIELDS_DOC, PAGE_SIZE, BetonError, BetonSettings
from data_tools.imaging import ImageRejected, prepare_image
from data_tools.shards import (INDEX_VERSION, Sample, atomic_write_bytes, atomic_write_json,
                               index_text, read_samples, sha256_file, write_tar)
from data_tools.webvision import (ListingError, Record, Split, effective_classes, list_imagenet_val, list_webvision,
                                  read_synsets)

MANIFEST = "manifest.json"
FORMAT = "mopro-fast-wds/1"
OUTPUT_FORMATS = {"wds": ("wds",), "ffcv": ("ffcv",), "both": ("wds", "ffcv")}  # --format -> what is written
WORK = ".state/work"  # shards of an ffcv-only conversion (work files)
BETON_STATE = ".state/beton"


class ConvertError(Exception):
    """A problem the user must fix before converting; one line."""


@dataclass(frozen=True)
class ConvertSettings:
    """Everything that decides the output bytes (the worker count does not)."""

    subset: str = "webvision"
    classes: int | None = None
    sources: tuple[str, ...] | None = None
    val_dir: str = "val_images_256"
    imagenet_val: str | None = None
    imagenet_labels: str | None = None
    max_side: int = 256
    quality: int = 90
    shard_size: int = 2000
    max_pixels: int = 100_000_000
    seed: int = 0

    def check(self) -> None:
        if not 1 <= self.quality <= 100:
            raise ConvertError(f"--quality must be in 1..100, got {self.quality}")
        if self.max_side < 16:
            raise ConvertError(f"--max-side must be at least 16 px, got {self.max_side}")
        if self.shard_size < 1:
            raise ConvertError(f"--shard-size must be at least 1 sample, got {self.shard_size}")
        if self.max_pixels < 1:
            raise ConvertError(f"--max-pixels must be positive, got {self.max_pixels}")


@dataclass(frozen=True)
class ShardTask:
    split: str
    number: int
    records: tuple[Record, ...]
    out: str
    fingerprint: str
    prefix: str = ""  # "" = the shard is output; WORK + "/" = a work file of an ffcv-only conversion

    @property
    def name(self) -> str:
        return f"{self.split}-{self.number:06d}"

    @property
    def tar_rel(self) -> str:
        return f"{self.prefix}{self.split}/{self.name}.tar"

    @property
    def idx_rel(self) -> str:
        return f"{self.prefix}{self.split}/{self.name}.idx"

    @property
    def state_path(self) -> Path:
        return Path(self.out) / ".state" / f"{self.name}.json"

    def records_digest(self) -> str:
        digest = hashlib.sha256()
        for r in self.records:
            digest.update(f"{r.key}\t{r.path}\t{r.label}\t{r.index}\t{r.source}\n".encode())
        return digest.hexdigest()


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


def plan(splits: dict[str, Split], settings: ConvertSettings, out: Path, prefix: str = "") -> list[ShardTask]:
    fingerprint = _fingerprint(settings)
    tasks = []
    for name, split in splits.items():
        records = list(split.records)
        if name == "train":
            # Shards in listing order would be class-sorted; a seeded shuffle mixes them once.
            random.Random(settings.seed).shuffle(records)
        size = settings.shard_size
        for number, start in enumerate(range(0, len(records), size)):
            tasks.append(ShardTask(name, number, tuple(records[start:start + size]), str(out), fingerprint, prefix))
    return tasks


def _fingerprint(settings: ConvertSettings) -> str:
    blob = json.dumps({"settings": asdict(settings), "format": FORMAT}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------ workers

_progress = None  # shared image counter, set in each pool worker by `_init_worker`


def _init_worker(counter) -> None:
    global _progress
    _progress = counter


def _tick() -> None:
    if _progress is not None:
        with _progress.get_lock():
            _progress.value += 1


def run_shard(task: ShardTask, settings: ConvertSettings, tick: Callable[[], None] = _tick) -> dict:
    """Convert one shard's records; write tar, index and state file; return the state."""
    out = Path(task.out)
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

    tar_path, idx_path = out / task.tar_rel, out / task.idx_rel
    members = write_tar(tar_path, samples(), expected=len(task.records))  # atomic, see shards.write_tar
    written = sum(class_counts.values())
    state = {"fingerprint": task.fingerprint, "records": task.records_digest(), "samples": written,
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


def _read(rec: Record) -> bytes:
    try:
        return rec.file().read_bytes()
    except FileNotFoundError:
        raise ImageRejected("missing_file", str(rec.file())) from None
    except OSError as exc:
        raise ImageRejected("unreadable_file", f"{type(exc).__name__}: {exc}") from None


def _finished_state(task: ShardTask) -> dict | None:
    """The state file of a shard an earlier run finished with the same plan (its files unchecked)."""
    try:
        state = json.loads(task.state_path.read_text())
    except (OSError, ValueError):
        return None
    if state.get("fingerprint") != task.fingerprint or state.get("records") != task.records_digest():
        return None
    if state.get("file") not in (None, task.tar_rel):  # written for another --format
        return None
    return state


def _reusable(task: ShardTask, current_betons: frozenset[str] = frozenset()) -> dict | None:
    """The state of a shard finished by an earlier run with the same plan, if its files are there
    (or, for the work files of an ffcv-only conversion, if its split's .beton is current)."""
    state = _finished_state(task)
    if state is None or state.get("file") is None or task.split in current_betons:
        return state
    out = Path(task.out)
    tar, idx = out / state["file"], out / state["index"]
    if not (tar.is_file() and idx.is_file() and tar.stat().st_size == state.get("bytes")):
        return None
    return state


# --------------------------------------------------------------------------------- orchestration

def convert(src: Path, out: Path, settings: ConvertSettings, workers: int | None = None,
            overwrite: bool = False, progress: bool = True, fmt: str = "wds",
            beton: BetonSettings | None = None) -> dict:
    """Convert SRC into shards (and/or .beton files, `fmt`) under OUT; returns the manifest (also
    written to OUT/manifest.json)."""
    from mopro_fast import __version__  # light: the package's __init__ imports nothing heavy

    settings.check()
    if fmt not in OUTPUT_FORMATS:
        raise ConvertError(f"--format must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}")
    formats = OUTPUT_FORMATS[fmt]
    beton = beton or BetonSettings()
    if "ffcv" in formats:
        from data_tools.beton import require_ffcv

        try:
            beton.check()
            require_ffcv()
        except BetonError as exc:
            raise ConvertError(str(exc)) from None
    src, out = Path(src), Path(out)
    try:
        splits, synsets = list_splits(src, settings)
    except ListingError as exc:
        raise ConvertError(str(exc)) from None
    _prepare_out(out, settings, overwrite)
    prefix = "" if "wds" in formats else WORK + "/"
    for name in splits:
        (out / prefix / name).mkdir(parents=True, exist_ok=True)
    tasks = plan(splits, settings, out, prefix)
    current = _current_betons(out, splits, tasks, beton) if formats == ("ffcv",) else frozenset()
    states = _run_all(tasks, settings, workers or os.cpu_count() or 1, progress, current)
    _remove_stale(out, splits, tasks, formats)
    betons = {}
    if "ffcv" in formats:
        for name in splits:
            betons[name] = _write_beton(out, name, [(t, states[t.name]) for t in tasks if t.split == name], beton,
                                        settings.seed, progress)
        if formats == ("ffcv",):
            shutil.rmtree(out / WORK, ignore_errors=True)

    manifest = {
        "format": FORMAT,
        "tool": {"name": "mopro-fast", "version": __version__},
        "settings": asdict(settings),
        "source": str(src.resolve()),
        "fields": {"jpg": "RGB JPEG", "cls": "label, ASCII", "lbl": "label, int32 LE",
                   "sid": "sample index in split, int32 LE", "json": "record metadata"},
        "index_format": f"DALI wds2idx {INDEX_VERSION}",
        "num_classes": num_classes(settings, synsets),
        "classes": [{"id": i, "wnid": s.wnid, "name": s.name}
                    for i, s in enumerate(synsets[:num_classes(settings, synsets)])],
        "splits": {},
    }
    if formats != ("wds",):  # (a wds-only manifest stays byte-identical to earlier versions)
        from importlib.metadata import version

        manifest["formats"] = list(formats)
        manifest["ffcv"] = {"settings": asdict(beton), "fields": FIELDS_DOC, "page_size": PAGE_SIZE,
                            "ffcv_version": version("ffcv"), "file_version": 2}
    for name, split in splits.items():
        manifest["splits"][name] = _split_summary(split, [(t, states[t.name]) for t in tasks if t.split == name],
                                                  num_classes(settings, synsets))
        if "wds" not in formats:
            manifest["splits"][name]["shards"] = []  # work files, gone
        if name in betons:
            manifest["splits"][name]["beton"] = betons[name]
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


# ------------------------------------------------------------------------------------ FFCV .beton

def _beton_state_path(out: Path, split: str) -> Path:
    return out / BETON_STATE / f"{split}.json"


def _beton_key(done: list[tuple[ShardTask, dict]], beton: BetonSettings) -> dict:
    """What decides a split's .beton bytes: the shards (by sha256, in plan order) and the settings."""
    return {"shards": [state.get("sha256") for _task, state in done], "settings": asdict(beton),
            "fingerprint": done[0][0].fingerprint if done else None}


def _beton_current(out: Path, split: str, key: dict) -> dict | None:
    """The recorded summary of split's .beton if the file on disk was written from exactly `key`."""
    try:
        state = json.loads(_beton_state_path(out, split).read_text())
    except (OSError, ValueError):
        return None
    path = out / f"{split}.beton"
    if state.get("key") != key or not path.is_file() or path.stat().st_size != state["summary"]["bytes"]:
        return None
    return state["summary"]


def _current_betons(out: Path, splits: dict[str, Split], tasks: list[ShardTask], beton: BetonSettings) -> frozenset:
    """Splits whose .beton is current given the shard states already on disk (ffcv-only resume)."""
    current = set()
    for name in splits:
        done = [(t, _finished_state(t)) for t in tasks if t.split == name]
        if all(state is not None for _t, state in done) and _beton_current(out, name, _beton_key(done, beton)):
            current.add(name)
    return frozenset(current)


def _write_beton(out: Path, split: str, done: list[tuple[ShardTask, dict]], beton: BetonSettings, seed: int,
                 progress: bool) -> dict:
    """Write (or reuse) OUT/<split>.beton from the split's finished shards; returns its manifest entry."""
    from tqdm import tqdm

    from data_tools.beton import write_beton

    key = _beton_key(done, beton)
    summary = _beton_current(out, split, key)
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

    with tqdm(total=total, unit="img", desc=f"ffcv {split}", disable=not progress) as bar:
        try:
            counts = write_beton(path, samples(), total, beton, seed, split, tick=lambda: bar.update(1))
        except BetonError as exc:
            raise ConvertError(str(exc)) from None
    summary = {"file": path.name, "samples": counts["samples"], "jpg": counts["jpg"], "raw": counts["raw"],
               "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    _beton_state_path(out, split).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(_beton_state_path(out, split), {"key": key, "summary": summary})
    return summary


def _split_summary(split: Split, done: list[tuple[ShardTask, dict]], k: int) -> dict:
    shards, rejects, repaired = [], [], []
    class_counts = [0] * k
    source_counts: dict[str, int] = {}
    for _task, state in done:
        if state["file"] is not None:
            shards.append({k: state[k] for k in ("file", "index", "samples", "bytes", "sha256", "index_sha256")})
        rejects += state["rejects"]
        repaired += state["repaired"]
        for label, n in state["class_counts"].items():
            class_counts[int(label)] += n
        for source, n in state["source_counts"].items():
            source_counts[source] = source_counts.get(source, 0) + n
    rejects += [{**r.to_json(), "reason": "duplicate_listing", "detail": f"{r.path} listed again"}
                for r in split.duplicates]
    rejects.sort(key=lambda r: r["index"])
    repaired.sort(key=lambda r: r["key"])
    written = sum(s["samples"] for s in shards)
    if written + len(rejects) != split.num_listed:
        raise RuntimeError(f"accounting failed for split {split.name}: listed {split.num_listed} != "
                           f"written {written} + rejected {len(rejects)}")
    reasons: dict[str, int] = {}
    for r in rejects:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    return {"num_listed": split.num_listed, "num_written": written, "num_rejected": len(rejects),
            "rejected_by_reason": dict(sorted(reasons.items())), "num_repaired": len(repaired),
            "shards": shards, "class_counts": class_counts, "source_counts": dict(sorted(source_counts.items())),
            "rejects": rejects, "repaired": repaired}


def _run_all(tasks: list[ShardTask], settings: ConvertSettings, workers: int, progress: bool,
             current_betons: frozenset[str] = frozenset()) -> dict[str, dict]:
    from tqdm import tqdm

    states: dict[str, dict] = {}
    todo = []
    for task in tasks:
        state = _reusable(task, current_betons)
        if state is not None:
            states[task.name] = state
        else:
            todo.append(task)
    total = sum(len(t.records) for t in todo)
    reused = len(tasks) - len(todo)
    bar = tqdm(total=total, unit="img", desc="convert", disable=not progress, smoothing=0.1,
               postfix=f"{reused} shards reused" if reused else None)
    try:
        if workers <= 1 or len(todo) <= 1:
            for task in todo:
                states[task.name] = run_shard(task, settings, tick=lambda: bar.update(1))
        else:
            ctx = mp.get_context("spawn")  # fork after torch/OpenMP start-up can deadlock workers
            counter = ctx.Value("q", 0)
            with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx, initializer=_init_worker,
                                     initargs=(counter,)) as pool:
                pending = {pool.submit(run_shard, task, settings): task for task in todo}
                while pending:
                    finished, _ = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                    bar.update(counter.value - bar.n)
                    for future in finished:
                        states[pending.pop(future).name] = future.result()
                bar.update(counter.value - bar.n)
    finally:
        bar.close()
    return states


def _prepare_out(out: Path, settings: ConvertSettings, overwrite: bool) -> None:
    stamp = out / ".state" / "settings.json"
    wanted = {"format": FORMAT, "settings": asdict(settings)}
    if stamp.is_file():
        try:
            had = json.loads(stamp.read_text())
        except ValueError:
            had = None
        if had != wanted:
            if not overwrite:
                changed = _diff_settings((had or {}).get("settings", {}), wanted["settings"])
                raise ConvertError(f"{out} holds a conversion made with other settings ({changed}); "
                                   f"use another OUT or pass --overwrite")
            _clear(out)
    elif out.exists() and any(out.iterdir()) and not (out / MANIFEST).exists() and not (out / ".state").is_dir():
        # (A run killed before its settings stamp landed leaves .state/ behind: that OUT is ours.)
        if not overwrite:
            raise ConvertError(f"{out} exists and is not a mopro-fast conversion; use an empty or new OUT, "
                               f"or pass --overwrite to clear it")
        _clear(out)
    (out / ".state").mkdir(parents=True, exist_ok=True)
    atomic_write_json(stamp, wanted)
    # Leftovers of a killed run: temporary files are never valid output.
    for tmp in out.rglob("*.tmp-*"):
        tmp.unlink(missing_ok=True)


def _diff_settings(old: dict, new: dict) -> str:
    diffs = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in new.items() if old.get(k) != v]
    return ", ".join(diffs) or "format changed"


def _clear(out: Path) -> None:
    for child in out.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def _remove_stale(out: Path, splits: dict[str, Split], tasks: list[ShardTask],
                  formats: tuple[str, ...] = ("wds",)) -> None:
    """Drop shards, .beton files and states that an earlier, larger plan or another --format left behind."""
    keep = {t.name for t in tasks}
    for path in list((out / ".state").glob("*-*.json")):
        if path.stem not in keep:
            path.unlink()
    for split in splits:
        for folder, wanted in ((out / split, "wds" in formats), (out / WORK / split, formats == ("ffcv",))):
            if wanted:
                folder.mkdir(parents=True, exist_ok=True)
            elif not folder.is_dir():
                continue
            for path in folder.iterdir():
                if path.suffix in (".tar", ".idx") and (not wanted or path.stem not in keep):
                    path.unlink()
            if not wanted and not any(folder.iterdir()):
                folder.rmdir()
    if "wds" in formats:
        shutil.rmtree(out / WORK, ignore_errors=True)
    for path in list(out.glob("*.beton")) + list((out / BETON_STATE).glob("*.json")):
        if "ffcv" not in formats or path.stem not in splits:
            path.unlink()


