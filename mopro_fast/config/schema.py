"""The recipe schema: one dataclass per section, a docstring under each field.

A training recipe (`Config`: data, model, mopro, optim, schedule, loader, run) and a cRT recipe
(`CrtRecipe`: crt) are trees of these; config/loading.py reads YAML into them. The schema says
everything about a key: its type, its default (the paper's 8-GPU WebVision 1.0 setup, DESIGN.md
section 1; arXiv 2009.07995, section 4.1), what it means, and what values it may take:

- a choice is a `Literal[...]` type (OmegaConf >= 2.4 keeps it as a Literal node; the loader names
  the allowed values in its error line before OmegaConf sees the value);
- a range is `spec(default, ge=, gt=, le=, lt=)` field metadata (for lists, per item);
- anything involving two keys is a check in config/loading.py (`validate`, `validate_crt`).

Epochs are numbered from 0.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from omegaconf import MISSING, OmegaConf


def spec(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
         lt: float | None = None) -> Any:
    """A dataclass field with its allowed range (checked by `validate_fields`; for lists, per item)."""
    meta = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt).items() if v is not None}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    shards: str = MISSING
    """Folder written by `mopro-fast convert` (holds manifest.json and the shards), or its URL: `s3://bucket/prefix`,
    `gs://...`, `http(s)://...` (credentials from the environment only: AWS_*, GOOGLE_APPLICATION_CREDENTIALS)."""
    cache_dir: str | None = None
    """Local cache of shards behind a URL: each rank fetches the shards it reads once, verifies their sha256 and
    keeps them; null = stream them (DALI and FFCV need the cache for non-S3 URLs). Ignored for a local folder."""
    train_split: str = "train"
    """Manifest split to train on."""
    eval_splits: list[str] = spec(["val", "imagenet-val"])
    """Splits to evaluate on; those missing from the manifest are skipped with a note at run time."""
    num_classes: int | None = spec(None, ge=1)
    """Number of classes K; null = the manifest's `num_classes` (if both are set they must agree)."""
    truth: str | None = None
    """truth.tsv (clean label or 'ood' per training path) for noise-detection precision/recall; null = none."""


@dataclass
class ModelConfig:
    arch: Literal["resnet50", "resnet18"] = "resnet50"
    """Encoder trunk."""
    small_stem: bool = False
    """3x3 stride-1 stem without max-pool, for 32-64 px images."""
    width: int = spec(64, ge=1)
    """Channels of the stem (64 = torchvision's ResNet); every stage is scaled by width / 64, compute by
    about its square. The small-data CPU recipes use 32."""
    blurpool: bool = False
    """Anti-aliased downsampling (Zhang 2019, "Making Convolutional Networks Shift-Invariant Again"; FFCV's rn50
    recipes): every strided conv of the residual stages (not the stem) first blurs its input with a fixed 3x3
    binomial filter (core/blurpool.py). Same parameters and state-dict keys; false = torchvision's ResNet."""
    proj_dim: int = spec(128, ge=1)
    """Embedding width d of the projection head (paper: 128)."""
    proj_hidden: int = spec(2048, ge=1)
    """Hidden width of the projection MLP (paper: 2048 = ResNet-50 feature width)."""


@dataclass
class MoproConfig:
    enabled: bool = True
    """false = plain cross-entropy on the web labels: no instance loss, no prototypes, no cleaning."""
    queue_size: int = spec(8192, ge=1)
    """Instance queue length L (momentum embeddings kept as negatives)."""
    temperature: float = spec(0.1, gt=0)
    """Temperature T of the instance and prototype logits."""
    momentum: float = spec(0.999, ge=0, lt=1)
    """EMA factor m of the key (momentum) encoder, per step (of a global batch of `momentum_batch`, if set)."""
    proto_momentum: float = spec(0.999, ge=0, lt=1)
    """EMA factor m_p of the class prototypes, per sample (so the same decay per image seen at any batch)."""
    momentum_batch: int | None = spec(None, ge=1)
    """Global batch (images) that `momentum` is given for (paper: 256); set, the key encoder's EMA factor per
    step is momentum ** (global batch / momentum_batch), the same decay per image seen at any batch
    (config/derive.py, `Derived.key_momentum`). `proto_momentum` is per sample already and is left as it is.
    null = `momentum` per step whatever the batch (the paper)."""
    alpha: float = spec(0.5, ge=0, le=1)
    """Weight of the classifier in the soft label (1 - alpha for the prototypes)."""
    pseudo_threshold: float = spec(0.8, gt=0, le=1)
    """Relabel a sample when the soft label's max exceeds this."""
    ood_threshold: float | None = spec(None, gt=0, lt=1)
    """Keep a sample (not relabelled) only when the soft label's mass on its label exceeds this; null = 1/K
    (paper). With few classes 1/K drops what an unsure model merely doubts (core/noise.py); 0.01 = "ruled out"."""
    w_inst: float = spec(1.0, ge=0)
    """Weight of the instance (InfoNCE) loss."""
    w_proto: float = spec(1.0, ge=0)
    """Weight of the prototype loss."""
    proto_start_epoch: int = spec(1, ge=0)
    """First epoch with the prototype loss (epoch 0 has no prototypes yet); = epochs: never."""
    start_clean_epoch: int = spec(11, ge=0)
    """First epoch with noise correction (before it every label is kept); = epochs: never."""
    proto_start_fraction: float | None = spec(None, ge=0, le=1)
    """`proto_start_epoch` as a fraction of schedule.epochs, which survives a change of run length (paper: 1/90):
    when set it wins over proto_start_epoch; the epoch is fraction x epochs rounded half up (1: never).
    null = proto_start_epoch."""
    clean_start_fraction: float | None = spec(None, ge=0, le=1)
    """`start_clean_epoch` as a fraction of schedule.epochs (paper: 11/90); when set it wins over
    start_clean_epoch, rounded half up like proto_start_fraction. null = start_clean_epoch."""


@dataclass
class OptimConfig:
    lr: float = spec(0.1, gt=0)
    """Learning rate for a global batch of `base_batch`; scaled linearly to the real global batch."""
    base_batch: int = spec(256, ge=1)
    """Global batch (images) that `lr` is given for."""
    momentum: float = spec(0.9, ge=0, lt=1)
    """SGD momentum."""
    weight_decay: float = spec(1e-4, ge=0)
    """L2 weight decay."""
    no_bn_weight_decay: bool = False
    """No weight decay on BatchNorm weights and biases and on every bias (the 1-d parameters; a second
    optimiser param group, training/runtime.py `decay_groups`), as in Goyal et al. 2017 ("Accurate, Large
    Minibatch SGD", section 5.1) and FFCV's rn50 recipes. false = the paper (decay on every parameter). A run
    cannot resume across a change of this switch (the optimiser state has another number of groups)."""
    nesterov: bool = False
    """Nesterov momentum (needs momentum > 0)."""
    impl: Literal["auto", "fused", "foreach", "for_loop"] = "auto"
    """SGD kernel: auto = fused where the device supports it, else foreach."""
    label_smoothing: float = spec(0.0, ge=0, lt=1)
    """Label smoothing eps of the classifier's cross-entropy (Szegedy et al. 2016, "Rethinking the Inception
    Architecture", section 7; FFCV's rn50 recipes use 0.1): the target is (1 - eps) one-hot + eps / K. Only
    MoPro's classification loss and the cross-entropy baseline (mopro.enabled=false) use it; the prototype loss,
    the instance loss and the noise correction (which reads the raw logits) do not. 0 = the paper."""


@dataclass
class ScheduleConfig:
    epochs: int = spec(90, ge=1)
    """Training epochs."""
    kind: Literal["step", "cosine", "linear"] = "step"
    """step: multiply by `gamma` at each milestone (the paper); cosine: a half cosine to 0 at the end; linear:
    a straight line from the end of warm-up to 0 at the end (FFCV's rn50 recipes, their step-free
    "triangular" schedule with `warmup_epochs` as its peak epoch). Every kind starts with the linear warm-up."""
    milestones: list[int] = spec([40, 80], ge=1)
    """Epochs at which step decay applies (kind=step only); increasing, < epochs."""
    gamma: float = spec(0.1, gt=0, le=1)
    """Step decay factor (kind=step only)."""
    warmup_epochs: float = spec(0.0, ge=0)
    """Linear warm-up length in epochs (may be fractional); 0 = none."""


@dataclass
class DaliConfig:
    """`loader.dali`: what only the dali backend reads (mopro_fast/data/dali_loader.py)."""

    hw_decoder_load: float = spec(0.65, ge=0, le=1)
    """Share of JPEG decoding sent to the A100/H100 hardware decoder (DALI on CUDA only)."""
    decode: Literal["once", "roi"] = "once"
    """once: one full decode, then both crops; roi: two decodes of just the crops' regions."""

    def check(self) -> None:
        """The same rules as a recipe, for options built in code (ValueError, one line)."""
        if not 0 <= self.hw_decoder_load <= 1:
            raise ValueError(f"loader.dali.hw_decoder_load must be in [0, 1], got {self.hw_decoder_load}")
        if self.decode not in ("once", "roi"):
            raise ValueError(f"loader.dali.decode must be one of once, roi, got {self.decode!r}")


@dataclass
class LoaderConfig:
    backend: Literal["torch", "dali", "ffcv", "nvjpeg"] = "torch"
    """Data loading backend; every backend yields the same Batch."""
    batch_size: int = spec(32, ge=1)
    """Images per rank per step (global batch = batch_size x world size)."""
    workers: int = spec(8, ge=0)
    """Parallel readers/decoders per rank: processes (torch, nvjpeg; 0 = main process) or threads (dali, ffcv)."""
    resolution: int = spec(224, ge=1)
    """Side of the training crops (px); with `min_resolution` set, the side reached at `ramp_end_epoch`."""
    min_resolution: int | None = spec(None, ge=1)
    """Progressive resizing (ffcv-imagenet): training crops of this side up to `ramp_start_epoch`, growing
    linearly to `resolution` at `ramp_end_epoch` (config/schedules.py, `resolution_at`); null = always
    `resolution`."""
    ramp_start_epoch: int = spec(0, ge=0)
    """Last epoch at `min_resolution` (with min_resolution set)."""
    ramp_end_epoch: int = spec(0, ge=0)
    """First epoch at `resolution` (with min_resolution set); > ramp_start_epoch, <= schedule.epochs."""
    resolution_step: int = spec(32, ge=1)
    """Crop sides during the ramp are rounded to a multiple of this (px), kept within [min_resolution, resolution]."""
    eval_resolution: int = spec(224, ge=1)
    """Side of the evaluation centre crop (px)."""
    eval_resize: int = spec(256, ge=1)
    """Shorter side (px) images are resized to before the evaluation centre crop."""
    shuffle_buffer: int = spec(5000, ge=0)
    """Shuffle buffer in samples, every backend (DALI: the reader's initial_fill); 0 = shard order only."""
    prefetch: int = spec(2, ge=1)
    """Batches prepared ahead per rank (all of its workers together)."""
    dali: DaliConfig = field(default_factory=DaliConfig)
    """Options only the dali backend reads: hw_decoder_load, decode."""


@dataclass
class RunConfig:
    out: str = MISSING
    """Run folder: resolved recipe, metrics, TensorBoard events, checkpoints, plots."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = cuda when available, else cpu."""
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Autocast dtype (fp16 adds a GradScaler); fp32 = no autocast."""
    channels_last: bool = True
    """NHWC memory format for model and images."""
    compile: bool = False
    """torch.compile the model."""
    cudnn_benchmark: bool = True
    """cuDNN autotuning (forced off when deterministic)."""
    tf32: bool = True
    """TF32 matmuls and convolutions on Ampere and newer."""
    seed: int = spec(0, ge=0)
    """Seed of model init, augmentation and shuffling."""
    deterministic: bool = False
    """Deterministic algorithms (for exact resume tests; slower)."""
    eval_every: int = spec(1, ge=1)
    """Evaluate every N epochs, and always after the last."""
    ckpt_every_steps: int = spec(0, ge=0)
    """Also checkpoint every N steps; 0 = only at epoch ends."""
    ckpt_every_minutes: float = spec(30.0, ge=0)
    """Also checkpoint when this many minutes passed since the last save (WebVision epochs are long); 0 = off.
    With several ranks it is checked every `log_every` steps."""
    keep_last: int = spec(3, ge=1)
    """Checkpoints kept in the run folder."""
    log_every: int = spec(50, ge=1)
    """Steps between metric reductions / log lines."""
    tensorboard: bool = True
    """Write TensorBoard event files."""
    progress_seconds: float = spec(30.0, ge=0)
    """Without a terminal (nohup, SLURM, CI): one plain progress line on stderr every this many seconds
    (step/total, images/s, ETA, loss, data wait); 0 = none. On a terminal a progress bar is shown instead."""
    max_steps_per_epoch: int = spec(0, ge=0)
    """Cap on steps per epoch for smoke runs; 0 = no cap."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mopro: MoproConfig = field(default_factory=MoproConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The resolved recipe; `load_config` reads it back to an equal Config."""
        return OmegaConf.to_yaml(OmegaConf.structured(self))


@dataclass
class CrtConfig:
    """Classifier re-training after MoPro (cRT; DESIGN.md section 1, "After training"; the original
    code's classifier_retrain.py). The encoder is frozen (eval mode, BN statistics included); only
    the classifier is trained, on the cleaned labels, with class-balanced sampling."""

    epochs: int = spec(15, ge=1)
    """Epochs; each draws as many samples (with replacement, class-balanced) as the cleaned set holds."""
    lr: float = spec(0.01, gt=0)
    """Learning rate for a batch of `base_batch`; scaled linearly to `batch_size`."""
    base_batch: int = spec(256, ge=1)
    """Batch (samples) that `lr` is given for."""
    batch_size: int = spec(256, ge=1)
    """Samples per step."""
    momentum: float = spec(0.9, ge=0, lt=1)
    """SGD momentum."""
    weight_decay: float = spec(0.0, ge=0)
    """L2 weight decay (paper: none)."""
    milestones: list[int] = spec([5, 10], ge=1)
    """Epochs at which the lr is multiplied by `gamma`; increasing, < epochs."""
    gamma: float = spec(0.1, gt=0, le=1)
    """Step decay factor."""
    balance_power: float = spec(0.5, ge=0)
    """A sample of class c is drawn with weight n_c^-power: 0.5 = paper, 0 = uniform, 1 = every class equally."""
    init: Literal["trained", "random"] = "trained"
    """Start from the trained classifier (as the original code does) or from N(0, 0.01) weights and zero bias."""
    seed: int = spec(0, ge=0)
    """Seed of the sampling and of a random init."""


@dataclass
class CrtRecipe:
    """A cRT recipe (recipes/crt.yaml): one section; data, model and loader come from the checkpoint."""

    crt: CrtConfig = field(default_factory=CrtConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
