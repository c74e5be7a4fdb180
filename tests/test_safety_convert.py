"""`convert` on bad input and hostile outputs (issue 12): real file trees, the CLI in a subprocess.

Every refused case ends in one line `error: ...` on stderr with exit code 2, leaves the source
tree byte-identical and leaves no temporary file behind.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.convert import ConvertError, ConvertSettings, convert
from data_tools.fixture import FixtureSpec, make_fixture
from data_tools.shards import read_samples
from data_tools.webvision import list_imagenet_val, list_webvision, read_synsets
from tests.conftest import run_cli

TINY = FixtureSpec(classes=3, train_per_class=5, val_per_class=2, imagenet_per_class=2, image_size=32, seed=1)
# Large enough images (resized to 256) that a conversion runs for about a second.
MEDIUM = FixtureSpec(classes=3, train_per_class=50, val_per_class=2, imagenet_per_class=0, image_size=400, seed=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny") / "src"
    make_fixture(root, TINY)
    return root


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("medium") / "src"
    make_fixture(root, MEDIUM)
    return root


def snapshot(root: Path) -> dict[str, object]:
    """Every entry under `root`: file bytes, symlink target or 'dir', for byte-for-byte comparison."""
    tree: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            tree[rel] = ("symlink", os.readlink(path))
        elif path.is_dir():
            tree[rel] = "dir"
        else:
            tree[rel] = path.read_bytes()
    return tree


def temp_files(*roots: Path) -> list[Path]:
    return [p for root in roots if root.is_dir() for p in root.rglob("*.tmp-*")]


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)
    return result.stderr.strip()


def copy_of(tree: Path, where: Path) -> Path:
    shutil.copytree(tree, where, symlinks=True)
    return where


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def samples_of(out: Path, split: str = "train"):
    for shard in manifest_of(out)["splits"][split]["shards"]:
        for _key, fields in read_samples(out / shard["file"]):
            yield {**json.loads(fields["json"]), "jpg": fields["jpg"], "shard": shard["file"]}


# ----------------------------------------------------------------------- 1. OUT and the sources

@pytest.mark.parametrize("where", ["OUT is SRC", "OUT inside SRC", "OUT holds SRC", "OUT is a symlink to SRC",
                                   "OUT is --imagenet-val", "OUT is an outside --val-dir"])
def test_out_overlapping_a_source_is_refused_before_anything_is_touched(tiny: Path, tmp_path: Path,
                                                                         where: str) -> None:
    data = tmp_path / "data"
    src = copy_of(tiny, data / "src")
    imagenet = data / "imagenet"
    shutil.move(src / "imagenet_val", imagenet)
    outside_val = data / "val"
    shutil.copytree(src / "val_images_256", outside_val)
    (tmp_path / "link").symlink_to(src)
    out, extra, named = {
        "OUT is SRC": (src, [], "OUT is the same folder as SRC"),
        "OUT inside SRC": (src / "shards", [], "OUT is inside SRC"),
        "OUT holds SRC": (data, [], "OUT holds SRC"),
        "OUT is a symlink to SRC": (tmp_path / "link", [], "OUT is the same folder as SRC"),
        "OUT is --imagenet-val": (imagenet, ["--imagenet-val", imagenet], "--imagenet-val"),
        "OUT is an outside --val-dir": (outside_val, ["--val-dir", outside_val], "--val-dir"),
    }[where]
    before = snapshot(tmp_path)
    result = run_cli("convert", src, out, "--overwrite", "--workers", "1", *extra)
    one_line_error(result, named, str(out))
    assert snapshot(tmp_path) == before  # --overwrite deleted nothing, wrote nothing
    assert temp_files(tmp_path) == []


def test_overwrite_clears_only_an_empty_folder_or_a_mopro_fast_output(tiny: Path, tmp_path: Path) -> None:
    before_src = snapshot(tiny)
    other = tmp_path / "other"
    (other / "sub").mkdir(parents=True)
    (other / "notes.txt").write_text("my notes")
    (other / "sub" / "weights.bin").write_bytes(b"\0\1\2")
    before = snapshot(other)
    refused = run_cli("convert", tiny, other, "--overwrite", "--workers", "1")
    one_line_error(refused, str(other), "not a mopro-fast conversion", "notes.txt", "--overwrite only clears")
    assert snapshot(other) == before

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text(json.dumps({"format": "webdataset-index/2", "tool": "wds-tools"}))
    before = snapshot(foreign)
    refused = run_cli("convert", tiny, foreign, "--overwrite", "--workers", "1")
    one_line_error(refused, "did not write", str(foreign / "manifest.json"))
    assert snapshot(foreign) == before

    # An earlier conversion with other settings is ours: cleared by --overwrite (and only then).
    ours = tmp_path / "ours"
    assert run_cli("convert", tiny, ours, "--workers", "1").returncode == 0
    (ours / "manifest.json").write_text('{"format": "not ours"}')  # ... unless its manifest is foreign
    refused = run_cli("convert", tiny, ours, "--overwrite", "--quality", "80", "--workers", "1")
    one_line_error(refused, "did not write")
    assert (ours / "manifest.json").read_text() == '{"format": "not ours"}'
    (ours / "manifest.json").unlink()  # our .state/ stamp still marks it as a mopro-fast output
    forced = run_cli("convert", tiny, ours, "--overwrite", "--quality", "80", "--workers", "1")
    assert forced.returncode == 0, forced.stderr
    assert manifest_of(ours)["settings"]["quality"] == 80

    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli("convert", tiny, empty, "--workers", "1").returncode == 0
    assert snapshot(tiny) == before_src and temp_files(tmp_path) == []


# -------------------------------------------------------------------------- 3. changed inputs

def test_a_changed_source_image_redoes_its_shard_only(tiny: Path, tmp_path: Path) -> None:
    src = copy_of(tiny, tmp_path / "src")
    out = tmp_path / "out"
    args = ("convert", src, out, "--shard-size", "4", "--workers", "1")
    assert run_cli(*args).returncode == 0
    before = snapshot(out)
    tar_mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")}
    sample = next(iter(samples_of(out)))
    changed = src / sample["path"]
    Image.new("RGB", (40, 30), (250, 10, 10)).save(changed, "JPEG", quality=95)  # same listing, new pixels

    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    after = snapshot(out)
    rewritten = sorted(k for k in after if k.endswith(".tar") and after[k] != before.get(k))
    assert rewritten == [sample["shard"]]
    assert [p for p, t in tar_mtimes.items() if p.stat().st_mtime_ns != t] == [out / sample["shard"]]
    new = next(s for s in samples_of(out) if s["path"] == sample["path"])
    assert new["jpg"] == changed.read_bytes()  # the new image, not the stale one
    assert run_cli("verify", out).returncode == 0

    # Only the mtime changes: the shard is redone (the check is cheap: no content hash), same bytes.
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = run_cli(*args)
    assert third.returncode == 0, third.stderr
    outputs = {k: v for k, v in snapshot(out).items() if not k.startswith(".state")}  # (states: new mtime)
    assert outputs == {k: v for k, v in after.items() if not k.startswith(".state")}
    assert (out / sample["shard"]).stat().st_mtime_ns != tar_mtimes[out / sample["shard"]]


# ------------------------------------------------------------------- 4. unwritable OUT, disk full

def _mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    except OSError:
        return False
    return done.returncode == 0


def _umount(where: Path) -> None:
    subprocess.run(["umount", str(where)], capture_output=True)


@pytest.mark.parametrize("kind", ["/proc", "a regular file", "under a regular file", "a read-only mount"])
def test_unwritable_out_is_one_line_before_any_work(tiny: Path, tmp_path: Path, kind: str) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep me")
    read_only = tmp_path / "ro"
    out, fragment = {"/proc": (Path("/proc/mopro-fast-out"), "No such file"),
                     "a regular file": (blocker, "is a file, not a folder"),
                     "under a regular file": (blocker / "shards", "a file is in the way"),
                     "a read-only mount": (read_only / "shards", "Read-only file system")}[kind]
    if kind == "a read-only mount" and not _mount_tmpfs(read_only, "size=1m,ro"):
        pytest.skip("cannot mount a tmpfs here (no CAP_SYS_ADMIN)")
    try:
        before = snapshot(tiny)
        result = run_cli("convert", tiny, out, "--workers", "1")
        one_line_error(result, "OUT", str(out), fragment)
        assert snapshot(tiny) == before and blocker.read_text() == "keep me"
        assert out == blocker or not out.exists()
    finally:
        if kind == "a read-only mount":
            _umount(read_only)


def test_disk_full_is_one_line_leaves_no_temp_file_and_resumes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_fixture(src, FixtureSpec(classes=3, train_per_class=5, val_per_class=2, imagenet_per_class=0,
                                  image_size=160, seed=1))  # ~300 kB of shards
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "size=128k"):
        pytest.skip("cannot mount a tmpfs here (no CAP_SYS_ADMIN); see the simulated test below")
    try:
        out = disk / "out"
        before = snapshot(src)
        args = ("convert", src, out, "--shard-size", "3", "--workers", "2")
        full = run_cli(*args)  # the error comes from a pool worker
        line = one_line_error(full, "No space left on device", "free there", "needs about", str(out))
        assert re.search(r"cannot write \S+/out/\S+: ", line), line
        assert temp_files(disk) == [] and not (out / "manifest.json").exists()
        assert snapshot(src) == before
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        resumed = run_cli(*args)
        assert resumed.returncode == 0, resumed.stderr
        assert run_cli("verify", out).returncode == 0
        assert temp_files(disk) == []
    finally:
        _umount(disk)


def test_disk_full_simulated(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    """The same path without a mount: the fsync of a shard fails with ENOSPC."""
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if ".tar.tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "out"
    with pytest.raises(ConvertError, match=r"cannot write .*train-000000\.tar: No space left on device \(needs about"):
        convert(tiny, out, ConvertSettings(shard_size=4), workers=1, progress=False)
    assert temp_files(out) == [] and not (out / "manifest.json").exists()
    monkeypatch.setattr(os, "fsync", real_fsync)
    convert(tiny, out, ConvertSettings(shard_size=4), workers=1, progress=False)
    assert (out / "manifest.json").is_file()


# ----------------------------------------------------------------------- 6. a split lost entirely

def test_a_wrong_val_dir_is_refused_before_anything_is_written(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = (tiny / "info" / "val_filelist.txt").read_text().split()[0]
    listed = len((tiny / "info" / "val_filelist.txt").read_text().splitlines())
    result = run_cli("convert", tiny, out, "--val-dir", "wrongdir", "--workers", "1")
    line = one_line_error(result)
    assert line == (f"error: val: all {listed} listed records rejected (missing_file {listed}: first "
                    f"{tiny}/wrongdir/{first}); check --val-dir")
    assert not out.exists()


def test_a_split_whose_every_image_is_broken_fails_keeps_the_rest_and_resumes(tiny: Path, tmp_path: Path) -> None:
    src = copy_of(tiny, tmp_path / "src")
    out = tmp_path / "out"
    args = ("convert", src, out, "--shard-size", "4", "--workers", "1")
    val = sorted((src / "val_images_256").iterdir())
    for path in val:
        path.write_bytes(b"<html>404</html>")
    first = (src / "info" / "val_filelist.txt").read_text().split()[0]
    failed = run_cli(*args)
    one_line_error(failed, f"val: all {len(val)} listed records rejected (not_an_image {len(val)}: first "
                           f"{src}/val_images_256/{first}); check --val-dir")
    assert not (out / "manifest.json").exists()  # the conversion is not claimed finished
    train = {p: p.stat().st_mtime_ns for p in (out / "train").glob("*.tar")}
    assert train  # the other splits' shards are kept ...
    for path in val:
        shutil.copyfile(tiny / "val_images_256" / path.name, path)
    fixed = run_cli(*args)
    assert fixed.returncode == 0, fixed.stderr
    assert {p: p.stat().st_mtime_ns for p in (out / "train").glob("*.tar")} == train  # ... and reused
    assert manifest_of(out)["splits"]["val"]["num_written"] == len(val)
    for path in val:  # a later run that fails drops the manifest of the earlier one
        path.write_bytes(b"")
    one_line_error(run_cli(*args), "val: all", "(empty_file")
    assert not (out / "manifest.json").exists()


# ------------------------------------------------------------------------------ 8. small ones

BOM = "\ufeff"


def test_a_utf8_bom_does_not_cost_the_first_record(tmp_path: Path) -> None:
    root = tmp_path / "wv"
    (root / "info").mkdir(parents=True)
    (root / "info" / "synsets.txt").write_text(BOM + "n01 first\nn02 second\n", encoding="utf-8")
    (root / "info" / "train_filelist_google.txt").write_text(BOM + "google/q0001/a.jpg 0\ngoogle/q0002/b.jpg 1\n",
                                                            encoding="utf-8")
    (root / "info" / "train_filelist_flickr.txt").write_text(BOM + "flickr/q0003/c.jpg 1\n", encoding="utf-8")
    (root / "info" / "val_filelist.txt").write_text(BOM + "v1.jpg 0\nv2.jpg 1\r\n", encoding="utf-8")
    labels = root / "imagenet_labels.txt"
    labels.write_text(BOM + "x1.JPEG n01\nx2.JPEG 1\n", encoding="utf-8")
    (root / "imagenet").mkdir()
    synsets = read_synsets(root)
    assert [s.wnid for s in synsets] == ["n01", "n02"]
    splits = list_webvision(root)
    assert [r.path for r in splits["train"].records] == ["google/q0001/a.jpg", "google/q0002/b.jpg",
                                                         "flickr/q0003/c.jpg"]
    assert [r.path for r in splits["val"].records] == ["val_images_256/v1.jpg", "val_images_256/v2.jpg"]
    imagenet = list_imagenet_val(root / "imagenet", synsets, labels)
    assert [(r.path, r.label) for r in imagenet.records] == [("x1.JPEG", 0), ("x2.JPEG", 1)]


def test_fifos_directories_and_devices_are_rejected_unopened(tiny: Path, tmp_path: Path) -> None:
    src = copy_of(tiny, tmp_path / "src")
    listed = [line.split()[0] for line in (src / "info" / "train_filelist_google.txt").read_text().splitlines()]
    fifo, folder, device = (src / p for p in listed[:3])
    for path in (fifo, folder, device):
        path.unlink()
    os.mkfifo(fifo)  # reading it would block convert forever
    folder.mkdir()
    device.symlink_to("/dev/zero")  # reading it would never end
    result = run_cli("convert", src, tmp_path / "out", "--workers", "1", timeout=60)
    assert result.returncode == 0, result.stderr
    train = manifest_of(tmp_path / "out")["splits"]["train"]
    assert train["rejected_by_reason"]["not_a_regular_file"] == 3
    assert "not_a_regular_file 3" in result.stdout
    details = {r["path"]: r["detail"] for r in train["rejects"] if r["reason"] == "not_a_regular_file"}
    assert details == {listed[0]: "a FIFO", listed[1]: "a directory", listed[2]: "a character device"}


def _tiff(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path, "TIFF")


def test_high_bit_depth_tiffs_are_scaled_to_8_bits_not_clipped(tiny: Path, tmp_path: Path) -> None:
    src = copy_of(tiny, tmp_path / "src")
    ramp = np.tile(np.linspace(0, 1, 64), (48, 1))
    images = {"float.tif": ramp.astype(np.float32),
              "int32.tif": (ramp * 1_000_000).astype(np.int32),
              "uint16.tif": (ramp * 65535).astype(np.uint16),
              "dark16.tif": (ramp * 4096).astype(np.uint16),  # by range: stays dark
              "flat.tif": np.full((48, 64), 3.5, np.float32)}
    (src / "google" / "tiff").mkdir()
    for name, array in images.items():
        _tiff(src / "google" / "tiff" / name, array)
        assert Image.open(src / "google" / "tiff" / name).mode in ("F", "I", "I;16")
    with open(src / "info" / "train_filelist_google.txt", "a") as fh:
        fh.writelines(f"google/tiff/{name} 0\n" for name in images)
    out = tmp_path / "out"
    convert(src, out, ConvertSettings(shard_size=50), workers=1, progress=False)
    manifest = manifest_of(out)
    got = {Path(s["path"]).name: np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("L"), float)
           for s in samples_of(out) if s["path"].startswith("google/tiff/")}
    assert set(got) == set(images)
    for name in ("float.tif", "int32.tif", "uint16.tif"):
        left, right = got[name][:, :4].mean(), got[name][:, -4:].mean()
        assert left < 10 and right > 245, (name, left, right)  # the full ramp, neither black nor white
    assert got["dark16.tif"].max() < 25 and got["dark16.tif"][:, -4:].mean() > 8
    assert abs(got["flat.tif"].mean() - 128) < 3
    repairs = {Path(r["path"]).name: r["repairs"] for r in manifest["splits"]["train"]["repaired"]}
    assert repairs["float.tif"] == ["format:TIFF", "mode:F", "scale:minmax"]
    assert repairs["int32.tif"] == ["format:TIFF", "mode:I", "scale:minmax"]
    assert repairs["uint16.tif"] == ["format:TIFF", "mode:I;16", "scale:16bit"]


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """Running and not a zombie (a container's init may never reap orphans)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killing_convert_stops_its_workers(medium: Path, tmp_path: Path, sig: signal.Signals) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "mopro_fast.cli", "convert", str(medium), str(out),
                             "--shard-size", "2", "--workers", "2", "--progress-seconds", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:  # both workers started and converting: a shard is finished
            children = _children(proc.pid)
            if len(children) >= 2 and len(list(out.glob(".state/train-*.json"))) >= 1:
                break
            assert proc.poll() is None, "convert finished before it could be killed; make MEDIUM larger"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        children = _children(proc.pid)  # the workers and multiprocessing's resource tracker
        proc.send_signal(sig)  # the main process only, not its process group
        _stdout, stderr = proc.communicate(timeout=30)
        deadline = time.monotonic() + 5
        while any(map(_alive, children)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [pid for pid in children if _alive(pid)] == []
        assert temp_files(out) == []  # each worker removed what it was writing
        assert not (out / "manifest.json").exists()
        if sig == signal.SIGTERM:
            assert proc.returncode == 143
            assert stderr.strip().splitlines()[-1] == "error: terminated (SIGTERM); re-run the same command to resume"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------- 9. logs, --help

PLAIN = re.compile(r"convert: \d+/\d+ img \(\d+%\), \d+\.\d img/s, ETA (\d\d:\d\d:\d\d|\?)")


def test_plain_progress_lines_without_a_terminal(medium: Path, tmp_path: Path) -> None:
    result = run_cli("convert", medium, tmp_path / "out", "--workers", "1", "--progress-seconds", "0.2")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("convert: ")]
    assert lines and all(PLAIN.fullmatch(line) for line in lines), result.stderr
    quiet = run_cli("convert", medium, tmp_path / "quiet", "--workers", "1", "--progress-seconds", "0")
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert run_cli("verify", tmp_path / "quiet", "--progress-seconds", "0").stderr == ""


def test_help_explains_progress_and_what_overwrite_may_clear() -> None:
    text = " ".join(run_cli("convert", "--help").stdout.split())
    assert "--progress-seconds" in text and "0 = none" in text
    assert "--overwrite only clears a mopro-fast output" in text
    assert "OUT may not be SRC" in text
    assert "--progress-seconds" in run_cli("verify", "--help").stdout
