"""`mopro-fast verify OUT`: re-read every shard of a conversion and check it against its manifest.

Checks per shard: the file is there, its size and sha256 match, the tar reads to the end, the
sample count matches, every sample has all fields, its JPEG decodes, its binary label and index
agree with its text label and metadata, and the index file equals the one rebuilt from the tar.
Per split: the samples add up to `num_written`, and `written + rejected = listed`. An FFCV
`.beton` (convert --format ffcv|both) is checked for size, sha256 and its header's sample count.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from mopro_fast.errors import MoproError
from data_tools.convert import MANIFEST
from data_tools.shards import FIELDS, build_index, read_samples, sha256_file


class VerifyError(MoproError):
    """OUT is not a conversion at all (no readable manifest); one line."""


@dataclass
class Report:
    splits: int = 0
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self, out: Path) -> str:
        head = "OK" if self.ok else f"FAILED, {len(self.problems)} problem(s)"
        return (f"verify {out}: {head}: {self.splits} split(s), {self.shards} shard(s), "
                f"{self.samples} sample(s) checked")


def verify(out: Path, decode: bool = True, progress: bool = False, progress_seconds: float = 30.0) -> Report:
    """Check OUT against its manifest. `progress`: a bar on a TTY, else a plain line on stderr every
    `progress_seconds` (0: none)."""
    from mopro_fast.progress import Progress

    out = Path(out)
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        splits = manifest["splits"]
    except FileNotFoundError:
        raise VerifyError(f"{out / MANIFEST}: not found; is {out} the OUT of `mopro-fast convert`?") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise VerifyError(f"{out / MANIFEST}: unreadable manifest ({exc}); re-run convert") from None
    report = Report(splits=len(splits))
    total = sum(len(s["shards"]) for s in splits.values())
    bar = Progress(total, "verify", unit="shard", every_s=progress_seconds, enabled=progress)
    try:
        for name, split in splits.items():
            seen = 0
            for shard in split["shards"]:
                count = _check_shard(out, shard, report, decode)
                seen += count
                report.samples += count
                report.shards += 1
                bar.update(1)
            if "beton" in split:
                _check_beton(out, split["beton"], split["num_written"], report)
            if not split["shards"] and "beton" in split:
                seen = split["num_written"]  # ffcv only: the .beton holds the samples (checked above)
            if seen != split["num_written"]:
                report.problems.append(f"{name}: {seen} samples in shards, manifest says {split['num_written']}")
            if split["num_written"] + split["num_rejected"] != split["num_listed"]:
                report.problems.append(f"{name}: written {split['num_written']} + rejected "
                                       f"{split['num_rejected']} != listed {split['num_listed']}")
    finally:
        bar.close()
    return report


def _check_beton(out: Path, beton: dict, num_written: int, report: Report) -> None:
    path = out / beton["file"]
    if not path.is_file():
        report.problems.append(f"{beton['file']}: missing")
        return
    if path.stat().st_size != beton["bytes"]:
        report.problems.append(f"{beton['file']}: {path.stat().st_size} bytes, manifest says {beton['bytes']}")
    elif sha256_file(path) != beton["sha256"]:
        report.problems.append(f"{beton['file']}: sha256 differs from the manifest (file changed or corrupt)")
    with open(path, "rb") as fh:  # FFCV header: version u16, fields u16, page size u32, samples u64
        head = fh.read(16)
    samples = struct.unpack("<Q", head[8:16])[0] if len(head) == 16 else -1
    if samples != num_written or beton["samples"] != num_written:
        report.problems.append(f"{beton['file']}: {samples} samples in its header, manifest says {num_written}")


def _check_shard(out: Path, shard: dict, report: Report, decode: bool) -> int:
    tar, idx = out / shard["file"], out / shard["index"]
    where = shard["file"]
    if not tar.is_file():
        report.problems.append(f"{where}: missing")
        return 0
    if tar.stat().st_size != shard["bytes"]:
        report.problems.append(f"{where}: {tar.stat().st_size} bytes, manifest says {shard['bytes']}")
    if sha256_file(tar) != shard["sha256"]:
        report.problems.append(f"{where}: sha256 differs from the manifest (file changed or corrupt)")
    count = 0
    try:
        for key, fields in read_samples(tar):
            count += 1
            _check_sample(f"{where}:{key}", fields, report, decode)
        rebuilt = build_index(tar)
    except (tarfile.TarError, OSError, EOFError) as exc:
        report.problems.append(f"{where}: unreadable tar after {count} samples ({type(exc).__name__}: {exc})")
        return count
    if count != shard["samples"]:
        report.problems.append(f"{where}: {count} samples, manifest says {shard['samples']}")
    if not idx.is_file():
        report.problems.append(f"{shard['index']}: index file missing")
    elif idx.read_text() != rebuilt:
        report.problems.append(f"{shard['index']}: index does not match the tar")
    elif sha256_file(idx) != shard["index_sha256"]:
        report.problems.append(f"{shard['index']}: sha256 differs from the manifest")
    return count


def _check_sample(where: str, fields: dict[str, bytes], report: Report, decode: bool) -> None:
    missing = [f for f in FIELDS if f not in fields]
    if missing:
        report.problems.append(f"{where}: missing field(s) {', '.join(missing)}")
        return
    try:
        label = int(fields["cls"])
        meta = json.loads(fields["json"])
        (lbl,) = struct.unpack("<i", fields["lbl"])
        (sid,) = struct.unpack("<i", fields["sid"])
    except (ValueError, struct.error) as exc:
        report.problems.append(f"{where}: unreadable label/index/metadata ({exc})")
        return
    if not (label == lbl == meta.get("label") and sid == meta.get("index")):
        report.problems.append(f"{where}: label/index disagree (cls {label}, lbl {lbl}, sid {sid}, json {meta})")
    if decode:
        try:
            with Image.open(io.BytesIO(fields["jpg"])) as img:
                img.load()
                if img.format != "JPEG" or img.mode != "RGB":
                    report.problems.append(f"{where}: image is {img.format} {img.mode}, expected JPEG RGB")
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a problem to report
            report.problems.append(f"{where}: image does not decode ({type(exc).__name__}: {exc})")
