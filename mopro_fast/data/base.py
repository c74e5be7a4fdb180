"""The one loader interface every backend implements (DESIGN.md section 3).

- `LoaderSpec`: the arguments every backend shares, built once by the caller (`loader_spec(cfg, ...)`)
  and handed to `build_train_loader` / `build_eval_loader` together with what differs per loader
  (split, resolution; eval: resize) and the backend's own options (`loader.dali.*`, options.py).
- `TrainLoaderBase` / `EvalLoaderBase`: the shared checks, the manifest read, the empty-split
  check and the epoch plan (epochs.py). A backend subclass implements `_iterate(debug)`.
- Where the shards live: `spec.shards` is a folder or a URL (s3://, gs://, http(s)://; remote.py),
  `spec.cache_dir` the optional local cache (cache.py). A backend reads shard bytes only through
  `self._source` (source.py: `open(i)` a stream, `local(i)` a local file), never by path itself.
- Iteration always yields `Batch` (train) / `EvalBatch` (eval). `iter_debug()` yields
  `(Batch, params)` where a backend can say how it drew the views; shared keys (B-row numpy arrays):
  `flip_q`, `flip_k`, `gray` (bool), `crop_q`, `crop_k` (y0, x0, h, w as fractions of the source).
- Capabilities, class attributes the trainer reads instead of asking which backend it has:
  `exact_resume` (set_epoch(e, start_step=k) yields exactly steps k.. of the full epoch e),
  `resolution_without_rebuild` (set_resolution is free; False: the pipeline is rebuilt, and a
  compiled one pays its JIT again), `debug_params` (iter_debug is available).

Units: `workers` = parallel readers/decoders per rank (DataLoader processes for torch and nvjpeg,
threads for dali and ffcv; 0 = in the main process where the backend can, else 1);
`prefetch` = batches prepared ahead per rank (shared over the workers where they prefetch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from mopro_fast.data.batch import Batch, EvalBatch
from mopro_fast.data.epochs import EpochPlan, check_loader_args
from mopro_fast.data.host_memory import keep_freed_blocks
from mopro_fast.errors import MoproError
from mopro_fast.data.manifest import read_manifest
from mopro_fast.data.remote import location, scheme
from mopro_fast.data.source import ShardSource



class LoaderError(MoproError, ValueError):
    """Loader arguments that cannot work (an empty split, a resize below the crop); one line."""

@dataclass(frozen=True)
class LoaderSpec:
    """What every loader of one process shares (train and eval, every backend)."""

    shards: Path | str  # the folder `mopro-fast convert` wrote, or its URL (kept as a string)
    batch_size: int  # images per rank per batch
    workers: int = 1  # parallel readers/decoders per rank (see the module docstring)
    prefetch: int = 2  # batches prepared ahead per rank
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    channels_last: bool = True  # B x 3 x H x W with the strides of B x H x W x 3
    seed: int = 0
    shuffle_buffer: int = 5000  # samples held for shuffling (train only; ffcv reads in a random order anyway)
    cache_dir: Path | None = None  # local copies of remote shards (cache.py); None: stream them

    def __post_init__(self) -> None:
        object.__setattr__(self, "shards", location(self.shards))
        object.__setattr__(self, "cache_dir", None if self.cache_dir is None else Path(self.cache_dir))
        object.__setattr__(self, "device", torch.device(self.device))


def loader_spec(cfg: Any, rank: int, world_size: int, device: torch.device | str) -> LoaderSpec:
    """The spec of a run's config (trainer, eval, clean, cRT: the same helper)."""
    return LoaderSpec(shards=location(cfg.data.shards), cache_dir=cfg.data.cache_dir,
                      batch_size=cfg.loader.batch_size, workers=cfg.loader.workers,
                      prefetch=cfg.loader.prefetch, rank=rank, world_size=world_size, device=torch.device(device),
                      channels_last=cfg.run.channels_last, seed=cfg.run.seed,
                      shuffle_buffer=cfg.loader.shuffle_buffer)


def backend_options(cfg: Any, backend: str) -> Any:
    """The recipe's `loader.<backend>` section (None when the backend has none)."""
    sections = {"dali": cfg.loader.dali}  # the backends with a recipe section of their own
    return sections.get(backend)


class _Shared:
    """Spec fields as attributes, the split's shards, one check of the shared arguments."""

    Options: type | None = None  # the backend's own options (a dataclass), None: it has none

    def _setup(self, spec: LoaderSpec, split: str, resolution: int, options: Any) -> None:
        check_loader_args(spec.batch_size, resolution, spec.workers, spec.rank, spec.world_size)
        if spec.prefetch < 0:
            raise LoaderError(f"need prefetch >= 0, got {spec.prefetch}")
        self.spec, self.split, self.resolution = spec, split, resolution
        self.batch_size, self.workers, self.prefetch = spec.batch_size, spec.workers, spec.prefetch
        self.rank, self.world_size, self.device = spec.rank, spec.world_size, spec.device
        self.channels_last, self.seed, self.shuffle_buffer = spec.channels_last, spec.seed, spec.shuffle_buffer
        if options is None and self.Options is not None:
            options = self.Options()
        if hasattr(options, "check"):
            options.check()
        self.options = options
        self.host_memory = keep_freed_blocks()  # batch memory reused, not page-faulted anew (host_memory.py)
        self.num_samples = self._read_split(spec.shards, split)

    def _read_split(self, shards: Path | str, split: str) -> int:
        """The split's webdataset shards (source, names, sizes); returns the sample count. FFCV overrides it."""
        manifest = read_manifest(shards)
        infos = manifest.shards(split)
        self._source = ShardSource.of(manifest, infos, self.spec.cache_dir)
        self._paths, self._sizes = list(self._source.names), [s.samples for s in infos]
        self._where = (str(shards), split)
        return sum(self._sizes)

    def _reader_paths(self, backend: str, native: tuple[str, ...] = ()) -> list[str]:
        """The .tar paths for a library that opens the files itself (each with its .idx beside it).

        Local shards: as they are. Behind a URL: the URLs when the library reads that scheme itself
        (`native`, e.g. DALI's S3 reader) and no cache is set; else the cached copies, every shard of the
        split fetched (with its .idx) and verified up front, as such a reader plans over all of them.
        """
        source = self._source
        if not source.remote or not source.names or (source.cache is None and scheme(source.names[0]) in native):
            return list(source.names)
        what = f"loader.backend={backend}" + (f" (it reads {', '.join(native)}:// itself)" if native else "")
        for i in range(len(source)):
            source.local_index(i, what)
        return [source.local(i, what) for i in range(len(source))]


class TrainLoaderBase(_Shared, EpochPlan):
    """Training batches of one rank: exactly `steps_per_epoch` per epoch on every rank.

    `set_epoch(epoch, start_step=k)` then iterate: steps k..steps_per_epoch-1 of that epoch.
    `set_resolution(r)`: the crop size from the next iteration on.
    """

    exact_resume: bool = True
    resolution_without_rebuild: bool = True
    debug_params: bool = False

    def __init__(self, spec: LoaderSpec, split: str, resolution: int, steps_per_epoch: int | None = None,
                 options: Any = None):
        self._setup(spec, split, resolution, options)
        if self.num_samples == 0:
            raise LoaderError(f"split {split!r} of {spec.shards} has no samples")
        self._plan_epochs(self.num_samples, spec.batch_size, spec.world_size, steps_per_epoch)

    def set_resolution(self, resolution: int) -> None:
        """The crop size of the views from the next iteration on (progressive resizing)."""
        if resolution < 1:
            raise LoaderError(f"resolution must be positive, got {resolution}")
        if resolution != self.resolution:
            self.resolution = resolution
            self._resolution_changed()

    def _resolution_changed(self) -> None:
        """Drop what a new resolution makes stale (a built pipeline); nothing by default."""

    def _iterate(self, debug: bool) -> Iterator[tuple[Batch, dict | None]]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Batch]:
        for batch, _ in self._iterate(False):
            yield batch

    def iter_debug(self) -> Iterator[tuple[Batch, dict]]:
        """As iteration, with the sampled view parameters of each batch (module docstring)."""
        if not self.debug_params:
            raise NotImplementedError(f"{type(self).__name__} does not report its view parameters")
        return self._iterate(True)


class EvalLoaderBase(_Shared):
    """Eval batches of one rank: its disjoint share of the split, in a fixed order; over all ranks
    every sample exactly once (ranks may get different batch counts)."""

    def __init__(self, spec: LoaderSpec, split: str, resolution: int, resize: int, options: Any = None):
        if resize < resolution:
            raise LoaderError(f"eval resize ({resize}) must be at least the eval resolution ({resolution})")
        self.resize = resize
        self._setup(spec, split, resolution, options)

    def __len__(self) -> int:
        raise NotImplementedError

    def __iter__(self) -> Iterator[EvalBatch]:
        raise NotImplementedError
