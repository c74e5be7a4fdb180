"""Shards behind a URL (mopro_fast/data/remote.py, cache.py, source.py) against real servers on loopback.

moto's S3 server and Python's http.server are started and stopped here (tests/loopback.py); the
S3 clients find the server through `AWS_ENDPOINT_URL` and dummy `AWS_*` credentials in the
environment, as a user's would. The data: small built-in JPEGs converted into many small shards
(8 samples each), so a training epoch reads a dozen shards and a rank reads only part of them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from data_tools.fixture import FixtureSpec
from mopro_fast.data.cache import ShardCache, cache_folder
from mopro_fast.data.errors import ShardError
from mopro_fast.data.manifest import read_manifest
from mopro_fast.data.stream import pieces, shard_order, train_window
from tests.conftest import REPO, TINY, eval_loader, one_line, tiny_args, train_loader
from tests.loopback import HttpFolder, MotoS3, free_port

SPEC = FixtureSpec(classes=4, train_per_class=24, val_per_class=4, imagenet_per_class=2, image_size=40, seed=5)
RUN = {"schedule.epochs": 1}  # the tiny recipe, one epoch of 3 steps


@pytest.fixture(scope="module")
def data(build_data) -> dict[str, Path]:
    return build_data(SPEC, shard_size=8)  # 96 training samples in 12 shards, val and imagenet-val


@pytest.fixture(scope="module")
def s3(data):
    """moto's S3 server with the shards at s3://shards/tiny and, with one JPEG's bytes changed
    (same size, so only the sha256 tells), at s3://shards/bad; the environment points at it."""
    server = MotoS3()
    with pytest.MonkeyPatch.context() as env:
        for key, value in server.env.items():
            env.setenv(key, value)
        server.url = server.upload(data["shards"], "shards", "tiny")
        server.bad = server.upload(_with_bad_jpeg(data["shards"], data["shards"].parent / "bad"), "shards", "bad")
        yield server
    server.kill()


@pytest.fixture(scope="module")
def http(data):
    server = HttpFolder(data["shards"])
    yield server
    server.stop()


def _with_bad_jpeg(shards: Path, out: Path) -> Path:
    """A copy of `shards` whose train-000003.tar has one JPEG byte flipped; the manifest is unchanged."""
    if not out.exists():
        shutil.copytree(shards, out)
        tar = out / "train" / "train-000003.tar"
        with tarfile.open(tar) as archive:
            member = next(m for m in archive.getmembers() if m.name.endswith(".jpg"))
        raw = bytearray(tar.read_bytes())
        raw[member.offset_data + member.size // 2] ^= 0xFF
        tar.write_bytes(bytes(raw))
    return out


def _final(run: Path) -> dict[str, torch.Tensor]:
    ckpt = sorted(run.glob("ckpt-*.pt"))[-1]
    return torch.load(ckpt, map_location="cpu", weights_only=False)["model"]


def _start_train(*args, env: dict | None = None) -> subprocess.Popen:
    """`mopro-fast train TINY ARGS` started in the background (one torch thread: two may run at once)."""
    return subprocess.Popen([sys.executable, "-m", "mopro_fast.cli", "train", str(TINY), *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})})


def _finish(child: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    """Wait for `child` (a run past `timeout` seconds fails the test: subprocess.TimeoutExpired)."""
    try:
        out, err = child.communicate(timeout=timeout)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


def test_training_from_s3_through_the_cache_equals_the_local_run(data, s3, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    children = [_start_train(*tiny_args(data["shards"], tmp_path / "local", **RUN)),  # the two side by side
                _start_train(*tiny_args(s3.url, tmp_path / "s3", **RUN, **{"data.cache_dir": cache}))]
    for result in [_finish(child, 300) for child in children]:
        assert result.returncode == 0, result.stderr[-3000:]
    a, b = _final(tmp_path / "local"), _final(tmp_path / "s3")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Every shard the run read is cached once, byte-identical to the local one, and nothing partial is left.
    folder = cache_folder(cache, s3.url, read_manifest(s3.url).sha256)
    cached = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    local = read_manifest(data["shards"])
    wanted = {Path(s.file) for split in ("train", "val", "imagenet-val") for s in local.shards(split)}
    assert set(cached) == wanted
    assert all((folder / p).read_bytes() == (data["shards"] / p).read_bytes() for p in cached)


def test_a_shard_with_a_wrong_checksum_is_refused_in_one_line(s3, tmp_path: Path) -> None:
    args = tiny_args(s3.bad, tmp_path / "run", **RUN, **{"data.cache_dir": tmp_path / "cache"})
    result = _finish(_start_train(*args), 120)
    one_line(result, 2, "s3://shards/bad/train/train-000003.tar", "sha256", prefix="error: bad shard")
    assert not list((tmp_path / "cache").rglob("train-000003.tar*")) and not list((tmp_path / "cache").rglob(".*"))


def test_a_server_gone_mid_epoch_ends_in_one_line_after_the_retries(data, tmp_path: Path) -> None:
    server = MotoS3()
    try:
        url = server.upload(data["shards"], "gone", "tiny")
        cache = tmp_path / "cache"
        args = tiny_args(url, tmp_path / "run", **RUN, **{"data.cache_dir": cache, "loader.workers": 0,
                                                          "loader.shuffle_buffer": 8})
        child = _start_train(*args, env=server.env)
        deadline = time.monotonic() + 120
        while not list(cache.rglob("train-*.tar")) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        server.kill()  # the first training shard has arrived: the epoch is under way
        t0 = time.monotonic()
        result = _finish(child, 60)  # a hang fails here
        waited = time.monotonic() - t0
    finally:
        server.kill()
    line = one_line(result, 2, "s3://gone/tiny/", "after 3 tries", prefix="error: cannot read")
    cached = list(cache.rglob("train-*.tar"))
    assert 1 <= len(cached) < 12, (len(cached), line)  # it stopped mid-epoch
    assert not list(cache.rglob(".*.part")) and waited < 30, waited


def test_http_batches_equal_the_local_ones(data, http) -> None:
    for workers in (0, 1):
        local = list(train_loader(data["shards"], "torch", workers=workers))
        remote = list(train_loader(http.url, "torch", workers=workers))  # streamed: no cache
        assert len(local) == len(remote) == 12
        for a, b in zip(local, remote):
            assert torch.equal(a.view_q, b.view_q) and torch.equal(a.view_k, b.view_k)
            assert torch.equal(a.label, b.label) and torch.equal(a.index, b.index)
    for split in ("val", "imagenet-val"):
        a, b = list(eval_loader(data["shards"], "torch", split)), list(eval_loader(http.url, "torch", split))
        assert [x.index.tolist() for x in a] == [x.index.tolist() for x in b]
        assert all(torch.equal(x.image, y.image) for x, y in zip(a, b))


def test_each_rank_fetches_only_the_shards_it_reads_and_keeps_them(data, s3, tmp_path: Path) -> None:
    manifest = read_manifest(s3.url)
    sizes = [s.samples for s in manifest.shards("train")]
    files = [s.file for s in manifest.shards("train")]
    folder = cache_folder(tmp_path, s3.url, manifest.sha256)
    loader = train_loader(s3.url, "torch", rank=0, world_size=2, workers=1, cache_dir=tmp_path)  # rank 0 of 2
    assert sum(1 for _ in loader) == loader.steps_per_epoch == 6
    start, end, _ = train_window(sum(sizes), 8, loader.steps_per_epoch, 0, 2, 1, 0)
    read = {files[p.shard] for p in pieces(sizes, start, end, lambda k: shard_order(len(sizes), 0, 0, k))}
    got = {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*.tar")}
    assert set(got) == read and len(got) < len(files)  # rank 0's share, not the whole split
    # Kept: the next epoch reads the same copies (not fetched again: the files are not rewritten).
    loader.set_epoch(1)
    assert sum(1 for _ in loader) == 6
    again = {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*.tar")}
    assert all(again[name] == stamp for name, stamp in got.items())


def test_the_cache_verifies_and_never_serves_a_partial_file(data, http, tmp_path: Path) -> None:
    manifest = read_manifest(http.url)
    entry = manifest.shards("train")[0]
    cache = ShardCache(tmp_path / "c", http.url)
    with pytest.raises(ShardError, match="sha256"):
        cache.local(entry.file, "0" * 64, entry.bytes)
    assert not [p for p in (tmp_path / "c").rglob("*") if p.is_file()]  # neither the file nor its .part
    path = cache.local(entry.file, entry.sha256, entry.bytes)
    assert path.read_bytes() == (data["shards"] / entry.file).read_bytes()
    with pytest.raises(ShardError, match="outside its folder"):
        cache.local("../escape.tar", None, None)


def test_dali_reads_s3_itself_and_http_through_the_cache(data, s3, http, tmp_path: Path) -> None:
    pytest.importorskip("nvidia.dali")
    from mopro_fast.data.source import CacheNeeded

    def batches(shards, **spec):
        return [(b.view_q, b.label, b.index) for b in train_loader(shards, "dali", steps_per_epoch=3, **spec)]

    local = batches(data["shards"])
    assert len(local) == 3
    for remote in (batches(s3.url), batches(http.url, cache_dir=tmp_path)):  # DALI's S3 reader; the cache
        assert all(torch.equal(x, y) for a, b in zip(local, remote) for x, y in zip(a, b))
    assert (cache_folder(tmp_path, http.url, read_manifest(http.url).sha256) / "train" / "train-000000.idx").is_file()
    with pytest.raises(CacheNeeded, match="data.cache_dir"):
        batches(http.url)


def test_missing_unreachable_and_unknown_locations_are_one_line(http) -> None:
    from mopro_fast.data.manifest import ManifestError
    from mopro_fast.data.remote import BACKOFF, TRIES

    with pytest.raises(ManifestError, match=r"/nowhere/manifest.json is not there"):
        read_manifest(f"{http.url}/nowhere")  # a 404: at once
    t0 = time.monotonic()
    with pytest.raises(ManifestError, match=rf"after {TRIES} tries \(Cannot connect"):
        read_manifest(f"http://127.0.0.1:{free_port()}/shards")  # nobody listens: the retries, then one line
    assert BACKOFF * (2 ** (TRIES - 1) - 1) <= time.monotonic() - t0 < 20
    with pytest.raises(ShardError, match="unknown URL scheme 'ftp'"):
        read_manifest("ftp://host/shards")
