"""The output folder OUT of `mopro-fast convert`: what may be written, reused or cleared.

Checked before anything is read or written, in this order, each failure one line (`OutputError`):

1. OUT never overlaps a source: it is not SRC, the --val-dir folder, the --imagenet-val folder
   or the --imagenet-labels file, not inside one and does not hold one (symlinks resolved). This
   holds with --overwrite too: clearing OUT must never delete the images being converted.
2. OUT is a folder, or can be made one, on a writable file system (a probe file is created and
   removed), so a read-only mount, /proc or a file in the way fail before any work.
3. What OUT holds decides what may happen to it:
   - nothing (or only the empty `.state/` of a run killed at its first step): it is used;
   - a mopro-fast conversion (our settings stamp `.state/settings.json`, or a manifest.json whose
     "format" and "tool" keys say mopro-fast): it is resumed when its settings are the same, and
     cleared by --overwrite when they differ (without --overwrite: refused, the changes named);
   - anything else, such as a manifest.json another tool wrote: refused, --overwrite included.
     Only an empty folder or an earlier mopro-fast output is ever cleared.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable

from data_tools.shards import atomic_write_json
from mopro_fast.safe_io import OutputError, discard, output_dir

MANIFEST = "manifest.json"
FORMAT = "mopro-fast-wds/1"
STATE = ".state"
STAMP = f"{STATE}/settings.json"
WORK = f"{STATE}/work"  # shards of an ffcv-only conversion (work files)
BETON_STATE = f"{STATE}/beton"


def check_sources(out: Path, sources: dict[str, Path]) -> None:
    """Refuse an OUT that is, is inside, or holds one of `sources` ({"SRC": path, ...})."""
    target = Path(out).resolve()
    for what, source in sources.items():
        where = f"(OUT {out}, {what} {source})"
        real = Path(source).resolve()
        if target == real:
            raise OutputError(f"OUT is the same folder as {what} {where}; choose an OUT outside every source")
        if real in target.parents:
            raise OutputError(f"OUT is inside {what} {where}; choose an OUT outside every source")
        if target in real.parents:
            raise OutputError(f"OUT holds {what} {where}; --overwrite would delete it: "
                              f"choose an OUT that holds no source")


def make_out(out: Path) -> list[Path]:
    """Create OUT (checked writable); returns the folders this created, deepest first (see `unmake`)."""
    out = Path(out)
    created = [p for p in (out, *out.parents) if not p.exists() and not p.is_symlink()]
    output_dir(out, "OUT")
    return created


def unmake(created: list[Path]) -> None:
    """Remove the folders `make_out` created if they are still empty (a refused run leaves no trace)."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            return


def is_our_manifest(data: object) -> bool:
    """Whether a parsed manifest.json was written by mopro-fast (its "format" and "tool" keys)."""
    if not isinstance(data, dict) or not isinstance(data.get("tool"), dict):
        return False
    return str(data.get("format", "")).startswith("mopro-fast") and data["tool"].get("name") == "mopro-fast"


def _read_json(path: Path) -> object | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def recorded(out: Path) -> tuple[dict | None, str | None]:
    """(what OUT was converted with, None) if OUT is ours; (None, None) if it is empty; else
    (None, why it is not ours). "What": {"format", "settings"} from the stamp or the manifest."""
    out = Path(out)
    entries = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if not entries or (entries == {STATE} and not any((out / STATE).iterdir())):
        return None, None
    manifest = _read_json(out / MANIFEST) if (out / MANIFEST).exists() else None
    if (out / MANIFEST).exists() and not is_our_manifest(manifest):
        return None, (f"holds a {MANIFEST} that mopro-fast did not write (no mopro-fast \"format\"/\"tool\" "
                      f"keys: {out / MANIFEST})")
    stamp = _read_json(out / STAMP)
    if isinstance(stamp, dict) and str(stamp.get("format", "")).startswith("mopro-fast"):
        return stamp, None
    if manifest is not None:
        return {"format": manifest.get("format"), "settings": manifest.get("settings")}, None
    sample = sorted(entries)[:3]
    return None, f"is not empty and is not a mopro-fast conversion (it holds {', '.join(sample)}"\
                 f"{', ...' if len(entries) > 3 else ''})"


def prepare_out(out: Path, wanted: dict, overwrite: bool) -> None:
    """Apply rule 3 of the module docstring, then stamp OUT with `wanted` and drop temporary files
    of a killed run (they are never valid output)."""
    out = Path(out)
    wanted = json.loads(json.dumps(wanted))  # as read back: tuples become lists
    had, foreign = recorded(out)
    if foreign is not None:
        raise OutputError(f"OUT {out} {foreign}; --overwrite only clears an empty folder or an earlier "
                          f"mopro-fast output: choose another OUT, or empty this one yourself")
    if had is not None and had != wanted:
        if not overwrite:
            changed = diff_settings(had.get("settings") or {}, wanted["settings"]) \
                if had.get("format") == wanted["format"] else "format changed"
            raise OutputError(f"{out} holds a conversion made with other settings ({changed}); "
                              f"use another OUT or pass --overwrite")
        clear(out)
    (out / STATE).mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / STAMP, wanted)
    for tmp in out.rglob("*.tmp-*"):
        discard(tmp)


def diff_settings(old: dict, new: dict) -> str:
    diffs = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in new.items() if old.get(k) != v]
    return ", ".join(diffs) or "format changed"


def clear(out: Path) -> None:
    """Empty OUT (only ever called on a folder `recorded` found to be ours); symlinks are removed,
    never followed. `.state/` (with the stamp that marks OUT as ours) goes last, so an OUT whose
    clearing was interrupted is still recognised, and cleared, by the next --overwrite."""
    for child in sorted(Path(out).iterdir(), key=lambda p: p.name == STATE):
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def remove_stale(out: Path, splits: Iterable[str], keep: set[str], formats: tuple[str, ...] = ("wds",)) -> None:
    """Drop shards, .beton files and states that an earlier, larger plan or another --format left
    behind; `keep`: the shard names of the current plan."""
    splits = list(splits)
    for path in list((out / STATE).glob("*-*.json")):
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
