"""Shared test fixtures and helpers: small built-in data sets (one with planted broken files) and
their shards, the tiny training recipe, the CLI runners and the one-line-error checks.

Everything is real files in temporary folders: JPEGs written, converted, read back.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_tools.convert import ConvertSettings, convert
from data_tools.fixture import FixtureSpec, make_fixture

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny_test.yaml"  # the few-second CPU training run; needs data.shards and run.out
DEMO = REPO / "recipes" / "small_data_cpu.yaml"

SMALL = FixtureSpec(classes=6, train_per_class=30, val_per_class=6, imagenet_per_class=5, image_size=48,
                    seed=3, corrupt=True)
# The session's one longer MoPro run (`trained_run`): 300 images of 6 classes at 32 px, 30 % flipped labels and
# 10 % OOD; tests/test_after_training.py cleans and re-trains it, tests/test_transfer.py evaluates its encoder.
TRAINED = FixtureSpec(classes=6, train_per_class=50, val_per_class=10, imagenet_per_class=5, image_size=32,
                      seed=11, noise=0.3, ood=0.1)


def run_cli(*args, cwd: Path | None = None, timeout: float = 600, threads: int | None = None,
            **kwargs) -> subprocess.CompletedProcess:
    """Run `mopro-fast ARGS` in a fresh interpreter, as a user would (OMP_NUM_THREADS=threads if given)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    return subprocess.run([sys.executable, "-m", "mopro_fast.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env, **kwargs)


def cli(*args, **kwargs) -> subprocess.CompletedProcess:
    """`run_cli` in the repository root (relative recipe paths as in the README)."""
    return run_cli(*args, **{"cwd": REPO, **kwargs})


def tiny_args(shards, out, epochs: int | None = None, **extra) -> list[str]:
    """Overrides for `TINY`: the data, the run folder, `schedule.epochs` when given and `extra`
    (dotted keys, passed as `**{"optim.lr": 1}`; None is written as null)."""
    settings = {"data.shards": shards, "run.out": out,
                **({} if epochs is None else {"schedule.epochs": epochs}), **extra}
    return [f"{k}={'null' if v is None else v}" for k, v in settings.items()]


def train(*args, recipe: Path = TINY, **kwargs) -> subprocess.CompletedProcess:
    """`mopro-fast train RECIPE ARGS` (by default the tiny recipe) in the repository root."""
    return cli("train", recipe, *args, **kwargs)


def output_of(result) -> tuple[int, str]:
    """(exit code, stderr) of a subprocess result, (exit code, output) of a click CliRunner result."""
    if hasattr(result, "returncode"):
        return result.returncode, result.stderr
    return result.exit_code, result.output


def one_line(result, code: int = 2, *words: str, prefix: str = "") -> str:
    """Exit `code`, and stderr (CliRunner: its output) is one line, no traceback, starting with
    `prefix` and holding every word; returns that line."""
    got, err = output_of(result)
    line = err.strip()
    assert got == code, (got, err[-3000:])
    assert line and line.count("\n") == 0 and "Traceback" not in err, err[-3000:]
    assert line.startswith(prefix), (prefix, line)
    for word in words:
        assert word in line, (word, line)
    return line


def digest(folder: Path, ignore: tuple[str, ...] = ()) -> dict[str, str]:
    """Every file under `folder` but those named in `ignore` (relative path -> sha256): equal before
    and after = untouched."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file() and p.name not in ignore}


@pytest.fixture(scope="session")
def build_data(tmp_path_factory):
    """A factory: (FixtureSpec, shard size[, ImageNet-val]) -> {"fixture", "shards", "truth"}, each
    data set generated and converted once per session, however many files ask for it."""
    built: dict[tuple, dict[str, Path]] = {}

    def build(spec: FixtureSpec, shard_size: int, imagenet_val: bool = True) -> dict[str, Path]:
        key = (spec, shard_size, imagenet_val)
        if key not in built:
            root = tmp_path_factory.mktemp("data")
            make_fixture(root / "fixture", spec)
            settings = ConvertSettings(shard_size=shard_size, **(
                {"imagenet_val": str(root / "fixture" / "imagenet_val")} if imagenet_val else {}))
            convert(root / "fixture", root / "shards", settings, workers=1, progress=False)
            built[key] = {"fixture": root / "fixture", "shards": root / "shards",
                          "truth": root / "fixture" / "truth.tsv"}
        return built[key]

    return build


def trained_settings(data: dict[str, Path], out: Path, epochs: int) -> list[str]:
    """The tiny recipe on `TRAINED`, longer: 14 epochs of 9 steps, a warm-up epoch, the prototype loss from
    epoch 2 and noise correction from epoch 7 (half way, once the classifier is decent), one evaluation at
    the end and one checkpoint kept."""
    return tiny_args(data["shards"], out, epochs, **{
        "data.truth": data["truth"], "schedule.warmup_epochs": 1, "mopro.proto_start_epoch": 2,
        "mopro.start_clean_epoch": epochs // 2, "run.eval_every": 100, "run.keep_last": 1})


@pytest.fixture(scope="session")
def trained_data(build_data) -> dict[str, Path]:
    return build_data(TRAINED, shard_size=100)


@pytest.fixture(scope="session")
def trained_run(trained_data, tmp_path_factory) -> Path:
    """`TRAINED` trained for 14 epochs with the tiny recipe (its run folder)."""
    out = tmp_path_factory.mktemp("after-run") / "run"
    result = run_cli("train", TINY, *trained_settings(trained_data, out, epochs=14), "--no-progress", cwd=REPO,
                     threads=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def trained_ckpt(trained_run) -> Path:
    from mopro_fast.training.checkpoint import list_checkpoints

    return list_checkpoints(trained_run)[0]


@pytest.fixture(scope="session")
def small_fixture(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fixture") / "webvision"
    make_fixture(root, SMALL)
    return root


@pytest.fixture(scope="session")
def small_shards(small_fixture, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "out"
    convert(small_fixture, out, ConvertSettings(shard_size=40, imagenet_val=str(small_fixture / "imagenet_val")),
            workers=2, progress=False)
    return out


@pytest.fixture(scope="session")
def ffcv_shards(small_fixture, tmp_path_factory) -> Path:
    """`small_shards`' data converted with --format both: the webdataset shards and a .beton per split."""
    pytest.importorskip("ffcv", reason="ffcv is not importable: apt-get install pkg-config libopencv-dev "
                                       "libturbojpeg0-dev, then pip install -e .[ffcv]")
    out = tmp_path_factory.mktemp("ffcv") / "out"
    convert(small_fixture, out, ConvertSettings(shard_size=40, imagenet_val=str(small_fixture / "imagenet_val")),
            workers=1, progress=False, fmt="both")
    return out


@pytest.fixture(scope="session")
def truth(small_shards: Path) -> dict[str, dict[int, int]]:
    """split -> {sid: label}, read with the writer's own tar reader."""
    from data_tools.shards import read_samples
    from mopro_fast.data.manifest import read_manifest

    out: dict[str, dict[int, int]] = {}
    manifest = read_manifest(small_shards)
    for split in manifest.splits:
        out[split] = {int.from_bytes(f["sid"], "little", signed=True): int.from_bytes(f["lbl"], "little", signed=True)
                      for shard in manifest.shards(split) for _key, f in read_samples(shard.path)}
    return out


def train_loader(shards: Path, backend: str, split: str = "train", resolution: int = 32,
                 steps_per_epoch: int | None = None, options=None, **spec):
    """A training loader on CPU with the tests' small defaults (batch 8, 1 worker, buffer 32, seed 0)."""
    from mopro_fast.data import LoaderSpec, build_train_loader

    spec = LoaderSpec(**{**dict(shards=shards, batch_size=8, workers=1, shuffle_buffer=32, seed=0), **spec})
    return build_train_loader(backend, spec, split=split, resolution=resolution, steps_per_epoch=steps_per_epoch,
                              options=options)


def eval_loader(shards: Path, backend: str, split: str, resolution: int = 32, resize: int = 36, options=None,
                **spec):
    from mopro_fast.data import LoaderSpec, build_eval_loader

    spec = LoaderSpec(**{**dict(shards=shards, batch_size=4, workers=1), **spec})
    return build_eval_loader(backend, spec, split=split, resolution=resolution, resize=resize, options=options)


def demo_run(backend: str, shards: Path, fixture: Path, out: Path, epochs: int = 2) -> subprocess.CompletedProcess:
    """`mopro-fast train recipes/tiny_test.yaml` on the small data with `backend` (log windows of 2
    steps: the loss curves the backend tests compare are window means)."""
    return train(*tiny_args(shards, out, epochs, **{"data.truth": fixture / "truth.tsv", "loader.backend": backend,
                                                    "run.log_every": 2}))
