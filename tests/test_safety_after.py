"""Nothing lost, nothing mixed (issue 12): damaged shards in every loader backend, and the
after-training commands on bad input, unusable output paths and a full disk.

Every case runs the real command on real files and checks what a user sees: exit code 2, one
line on stderr (`error: ...`, no traceback), and that nothing outside the command's output
changed (folders hashed before and after). Damage is always done to a copy of the shards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tests.conftest import DEMO, REPO, TINY, digest, eval_loader, one_line, run_cli, tiny_args, train_loader


def cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_cli(*args, cwd=REPO, timeout=timeout, threads=1)


def train(shards: Path, out: Path, **extra) -> subprocess.CompletedProcess:
    """One epoch of the tiny recipe with the prototype loss and noise cleaning from the start (the run
    feeds clean, retrain and report)."""
    return cli("train", TINY, *tiny_args(shards, out, 1, **{"mopro.proto_start_epoch": 0,
                                                            "mopro.start_clean_epoch": 0, **extra}), "--no-progress")


def failed(result, *words: str) -> str:
    """Exit 2 and one `error: ...` line holding every word; works for subprocess results and CliRunner results."""
    return one_line(result, 2, *words, prefix="error: ")


def leftovers(folder: Path) -> list[Path]:
    return [p for p in Path(folder).rglob("*") if ".tmp-" in p.name]


# ----------------------------------------------------------------------------------- damage

def copy_shards(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".state"))
    return dst


def zero_jpeg(shards: Path, split: str = "train", shard: int = 1, sample: int = 2) -> tuple[Path, str]:
    """Overwrite one stored JPEG with zeros in place (same length); returns (shard, key)."""
    from mopro_fast.data.manifest import read_manifest

    path = read_manifest(shards).shards(split)[shard].path
    parts = path.with_suffix(".idx").read_text().splitlines()[1 + sample].split()
    at = parts.index("jpg")
    offset, size, name = int(parts[at + 1]), int(parts[at + 2]), parts[at + 3]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(bytes(size))
    return path, name[: -len(".jpg")]


def zero_beton_jpeg(beton: Path) -> int:
    """Zero the stored bytes of the first JPEG record of a .beton in place; returns its sample index."""
    import numpy as np
    from ffcv.reader import Reader

    reader = Reader(str(beton))
    meta = reader.metadata
    row = int(np.flatnonzero(meta["f0"]["mode"] == 0)[0])
    ptr = int(meta["f0"]["data_ptr"][row])
    size = int(reader.alloc_table["size"][reader.alloc_table["ptr"] == ptr][0])
    with open(beton, "r+b") as fh:
        fh.seek(ptr)
        fh.write(bytes(size))
    return int(meta["f2"][row])


@pytest.fixture(scope="module")
def zeroed(small_shards: Path, tmp_path_factory) -> tuple[Path, Path, str]:
    """A copy of the shards with one train JPEG zeroed: (shards, shard file, sample key)."""
    shards = copy_shards(small_shards, tmp_path_factory.mktemp("zeroed") / "shards")
    return (shards, *zero_jpeg(shards))


@pytest.mark.parametrize("backend", ["torch", "nvjpeg", "dali"])
def test_a_zeroed_jpeg_stops_training_with_one_line(backend: str, zeroed, tmp_path: Path) -> None:
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    shards, shard, key = zeroed
    before = digest(shards)
    result = train(shards, tmp_path / "run", **{"loader.backend": backend})
    failed(result, "damaged shard", "does not decode", str(shard), key, f"mopro-fast verify {shards}")
    assert digest(shards) == before


def test_a_truncated_tar_is_named_before_training_starts(small_shards: Path, tmp_path: Path) -> None:
    shards = copy_shards(small_shards, tmp_path / "shards")
    from mopro_fast.data.manifest import read_manifest

    shard = read_manifest(shards).shards("train")[2].path
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    result = train(shards, tmp_path / "run")
    failed(result, str(shard), "truncated", f"mopro-fast verify {shards}")


def test_a_cut_tar_inside_a_worker_names_the_shard(small_shards: Path, tmp_path: Path) -> None:
    """Without the manifest's size (older manifests), the reader itself finds the damage, in a worker."""
    import json

    from mopro_fast.data.errors import ShardError

    shards = copy_shards(small_shards, tmp_path / "shards")
    manifest = json.loads((shards / "manifest.json").read_text())
    for entry in manifest["splits"]["train"]["shards"]:
        entry.pop("bytes")
    (shards / "manifest.json").write_text(json.dumps(manifest))
    shard = shards / manifest["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:5000])
    loader = train_loader(shards, "torch", resolution=16, batch_size=16, shuffle_buffer=1)
    loader.set_epoch(0)
    with pytest.raises(ShardError) as caught:
        list(loader)
    message = str(caught.value)
    assert str(shard) in message and "mopro-fast verify" in message and "\n" not in message
    assert "Traceback" not in message  # the worker's wrapping is gone


def test_a_damaged_beton_stops_training_and_eval_with_one_line(ffcv_shards: Path, tmp_path: Path) -> None:
    from mopro_fast.data.errors import ShardError
    from mopro_fast.data.ffcv_loader import beton_path

    shards = copy_shards(ffcv_shards, tmp_path / "shards")
    index = zero_beton_jpeg(shards / "train.beton")
    result = train(shards, tmp_path / "run", **{"loader.backend": "ffcv"})
    failed(result, str(shards / "train.beton"), f"sample index {index}", "does not decode", "mopro-fast verify")
    index = zero_beton_jpeg(shards / "val.beton")  # eval (and clean) read EvalDecoder's status row
    loader = eval_loader(shards, "ffcv", "val", resolution=16, resize=18, batch_size=8)
    with pytest.raises(ShardError, match=f"sample index {index} of {shards / 'val.beton'}.*mopro-fast verify"):
        list(loader)
    (shards / "val.beton").write_bytes((shards / "val.beton").read_bytes()[:4096])
    with pytest.raises(ShardError, match=r"the .beton is 4096 bytes but the manifest says \d+ \(truncated.*val.beton"):
        beton_path(shards, "val")


# ----------------------------------------------------------------------------------- a trained run

@pytest.fixture(scope="module")
def run(small_shards: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("safety-run") / "run"
    result = train(small_shards, out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def ckpt(run: Path) -> Path:
    from mopro_fast.training.checkpoint import list_checkpoints

    return list_checkpoints(run)[0]


@pytest.fixture(scope="module")
def cleaned(ckpt: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("safety-clean") / "clean"
    result = CliRunner().invoke(main(), ["clean", str(ckpt), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    return out


def main():
    from mopro_fast.cli import main as group

    return group


def test_clean_and_eval_on_damaged_shards_are_one_line(ckpt: Path, zeroed, small_shards: Path,
                                                       tmp_path: Path) -> None:
    shards, shard, key = zeroed
    result = cli("clean", ckpt, "--data", shards, "--out", tmp_path / "clean", "--no-progress")
    failed(result, str(shard), key, "mopro-fast verify")
    assert not (tmp_path / "clean" / "labels.jsonl").exists()
    val = copy_shards(small_shards, tmp_path / "val-damaged")
    val_shard, val_key = zero_jpeg(val, split="val", shard=0, sample=1)
    result = cli("eval", ckpt, f"data.shards={val}", "--split", "val")
    failed(result, str(val_shard), val_key, "mopro-fast verify")


def test_report_with_another_runs_folder_leaves_it_untouched(run: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-run"
    shutil.copytree(run, other)
    before, run_before = digest(other), digest(run)
    result = cli("report", run, "--clean", other)
    failed(result, "--clean", str(other), "labels.jsonl")
    assert digest(other) == before and digest(run) == run_before  # nothing written anywhere


def test_report_writes_only_its_report_folder(run: Path, cleaned: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for name in ("loss.png", "accuracy.png", "noise.png"):
        (copy / name).unlink(missing_ok=True)  # the curves are drawn again, but not into RUN
    before, clean_before = digest(copy), digest(cleaned)
    result = CliRunner().invoke(main(), ["report", str(copy), "--clean", str(cleaned), "--gallery", "2"])
    assert result.exit_code == 0, result.output
    after = digest(copy)
    assert {k: v for k, v in after.items() if not k.startswith("report/")} == before
    assert {"report/report.html", "report/noise_epochs.png", "report/class_counts.png"} <= set(after)
    assert digest(cleaned) == clean_before


# ----------------------------------------------------------------------------------- bad input

def test_bad_checkpoints_and_folders_are_one_line(ckpt: Path, run: Path, cleaned: Path, tmp_path: Path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    empty_run = tmp_path / "empty-run"
    empty_run.mkdir()
    missing = tmp_path / "nope.pt"
    runner = CliRunner()
    for bad, words in ((missing, ["no such checkpoint"]), (text, ["notes.pt", "unreadable"]),
                       (empty_run, ["no checkpoints"]), (run, ["is a folder", ckpt.name])):
        for command in (["clean", str(bad), "--out", str(tmp_path / "c")],
                        ["retrain", str(bad), "--labels", str(cleaned), "--out", str(tmp_path / "r")],
                        ["export", str(bad), str(tmp_path / "e.pt")],
                        ["import", str(bad), str(tmp_path / "i.pt"), "--recipe", str(DEMO)]):
            failed(runner.invoke(main(), command), *words)
        if bad in (missing, text):
            failed(runner.invoke(main(), ["eval", str(bad)]), *words)
    assert not any((tmp_path / n).exists() for n in ("c", "r", "e.pt", "i.pt"))
    failed(runner.invoke(main(), ["report", str(missing)]), "no such run folder")
    failed(runner.invoke(main(), ["report", str(empty_run)]), "no metrics.jsonl")


def test_retrain_labels_that_are_not_labels(ckpt: Path, tmp_path: Path) -> None:
    noise = tmp_path / "random.bin"
    noise.write_bytes(os.urandom(4096))
    as_json = tmp_path / "list.jsonl"
    as_json.write_text("[1, 2, 3]\n")
    runner = CliRunner()
    for labels, words in ((noise, ["random.bin", "binary", "labels.jsonl written by `mopro-fast clean`"]),
                          (ckpt, [ckpt.name, "zip file", "labels.jsonl written by `mopro-fast clean`"]),
                          (as_json, ["list.jsonl:1", "not a clean record"])):
        result = runner.invoke(main(), ["retrain", str(ckpt), "--labels", str(labels), "--out", str(tmp_path / "r"),
                                        "--no-progress"])
        failed(result, *words)
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------------- output paths

def test_outputs_on_unusable_paths_are_one_line(ckpt: Path, cleaned: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me\n")
    runner = CliRunner()
    original = tmp_path / "original.pt"
    from test_after_training import original_layout  # the original MoPro layout, as that test builds it

    torch.save({"state_dict": original_layout(torch.load(ckpt, map_location="cpu", weights_only=False)["model"])},
               original)
    for target, words in ((Path("/proc/mopro-x"), ["/proc"]), (a_file, ["a-file", "is a file"]),
                          (a_file / "sub", ["a-file"])):
        failed(runner.invoke(main(), ["clean", str(ckpt), "--out", str(target), "--no-progress"]), *words)
        failed(runner.invoke(main(), ["retrain", str(ckpt), "--labels", str(cleaned), "--out", str(target),
                                      "--no-progress"]), *words)
    for target in (Path("/proc/mopro-x.pt"), a_file / "x.pt", tmp_path):
        failed(runner.invoke(main(), ["export", str(ckpt), str(target)]))
        failed(runner.invoke(main(), ["import", str(original), str(target), "--recipe", str(DEMO)]))
    assert a_file.read_text() == "keep me\n" and not leftovers(tmp_path)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 1 MB tmpfs (root only); skips where mounting is not allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_keeps_previous_outputs(ckpt: Path, cleaned: Path, small_disk: Path) -> None:
    full_disk, previous = small_disk, {}
    for folder, name in (("clean", "labels.jsonl"), ("crt", "crt.pt")):
        (full_disk / folder).mkdir()
        previous[f"{folder}/{name}"] = b"previous output\n"
    previous["export.pt"] = b"previous export\n"
    for rel, data in previous.items():
        (full_disk / rel).write_bytes(data)
    (full_disk / "filler").write_bytes(bytes(shutil.disk_usage(full_disk).free - 8192))  # about 8 KB left
    runner = CliRunner()
    results = [runner.invoke(main(), ["clean", str(ckpt), "--out", str(full_disk / "clean"), "--no-progress"]),
               runner.invoke(main(), ["retrain", str(ckpt), "--labels", str(cleaned), "--out", str(full_disk / "crt"),
                                      "crt.epochs=2", "crt.milestones=[1]", "--no-progress"]),
               cli("export", ckpt, full_disk / "export.pt")]  # one as a user runs it
    for result in results:
        failed(result, "No space left on device", "needs about", "free there", str(full_disk))
    for rel, data in previous.items():
        assert (full_disk / rel).read_bytes() == data, rel
    assert not leftovers(full_disk)
    assert sorted(p.name for p in full_disk.rglob("*") if p.is_file()) == \
           sorted(["filler", "labels.jsonl", "crt.pt", "export.pt"])
