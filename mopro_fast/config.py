"""Run configuration: typed sections loaded from a YAML recipe, with dotted command-line overrides.

    cfg = load_config("recipes/rn50_8gpu.yaml", ["optim.lr=0.2", "run.out=runs/x"])
    d = derive(cfg, world_size=8, num_train=2_400_000)   # global batch, scaled lr, steps, ...
    lr = lr_at(d, step)                                  # per-iteration lr (STYLE.md point 10)
    use_proto, clean = mopro_switches(cfg, epoch)

OmegaConf structured configs parse the YAML and the overrides, merge them and convert types. This
module adds what OmegaConf lets through: unknown keys get a "did you mean" hint, ints are not
booleans and strings are not numbers, and impossible values (negative lr, alpha outside [0, 1],
milestones beyond the last epoch, ...) are refused. Every problem is a `ConfigError` whose
message is one line naming the dotted key. Defaults are the paper's 8-GPU WebVision 1.0 setup
(DESIGN.md section 1; arXiv 2009.07995, section 4.1). Epochs are numbered from 0.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, get_args, get_origin, get_type_hints

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from mopro_fast.data.options import DALI_DECODE, DaliOptions


class ConfigError(ValueError):
    """A bad recipe or override; the message is one line: `dotted.key: problem`."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def spec(default: Any, *, choices: tuple[str, ...] | None = None, ge: float | None = None,
         gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with its allowed values (checked by `validate`; for lists, per item)."""
    meta = {k: v for k, v in dict(choices=choices, ge=ge, gt=gt, le=le, lt=lt).items() if v is not None}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    shards: str = MISSING
    """Folder written by `mopro-fast convert` (holds manifest.json and the shards)."""
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
    arch: str = spec("resnet50", choices=("resnet50", "resnet18"))
    """Encoder trunk."""
    small_stem: bool = False
    """3x3 stride-1 stem without max-pool, for 32-64 px images."""
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
    """EMA factor m of the key (momentum) encoder, per step."""
    proto_momentum: float = spec(0.999, ge=0, lt=1)
    """EMA factor m_p of the class prototypes, per sample."""
    alpha: float = spec(0.5, ge=0, le=1)
    """Weight of the classifier in the soft label (1 - alpha for the prototypes)."""
    pseudo_threshold: float = spec(0.8, gt=0, le=1)
    """Relabel a sample when the soft label's max exceeds this."""
    w_inst: float = spec(1.0, ge=0)
    """Weight of the instance (InfoNCE) loss."""
    w_proto: float = spec(1.0, ge=0)
    """Weight of the prototype loss."""
    proto_start_epoch: int = spec(1, ge=0)
    """First epoch with the prototype loss (epoch 0 has no prototypes yet); = epochs: never."""
    start_clean_epoch: int = spec(11, ge=0)
    """First epoch with noise correction (before it every label is kept); = epochs: never."""


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
    nesterov: bool = False
    """Nesterov momentum (needs momentum > 0)."""
    impl: str = spec("auto", choices=("auto", "fused", "foreach", "for_loop"))
    """SGD kernel: auto = fused where the device supports it, else foreach."""


@dataclass
class ScheduleConfig:
    epochs: int = spec(90, ge=1)
    """Training epochs."""
    kind: str = spec("step", choices=("step", "cosine"))
    """step: multiply by `gamma` at each milestone; cosine: to 0 at the last step."""
    milestones: list[int] = spec([40, 80], ge=1)
    """Epochs at which step decay applies (kind=step only); increasing, < epochs."""
    gamma: float = spec(0.1, gt=0, le=1)
    """Step decay factor (kind=step only)."""
    warmup_epochs: float = spec(0.0, ge=0)
    """Linear warm-up length in epochs (may be fractional); 0 = none."""


@dataclass
class LoaderConfig:
    backend: str = spec("torch", choices=("torch", "dali", "ffcv", "nvjpeg"))
    """Data loading backend; every backend yields the same Batch."""
    batch_size: int = spec(32, ge=1)
    """Images per rank per step (global batch = batch_size x world size)."""
    workers: int = spec(8, ge=0)
    """Parallel readers/decoders per rank: processes (torch, nvjpeg; 0 = main process) or threads (dali, ffcv)."""
    resolution: int = spec(224, ge=1)
    """Side of the training crops (px)."""
    eval_resolution: int = spec(224, ge=1)
    """Side of the evaluation centre crop (px)."""
    eval_resize: int = spec(256, ge=1)
    """Shorter side (px) images are resized to before the evaluation centre crop."""
    shuffle_buffer: int = spec(5000, ge=0)
    """Shuffle buffer in samples, every backend (DALI: the reader's initial_fill); 0 = shard order only."""
    prefetch: int = spec(2, ge=1)
    """Batches prepared ahead per rank (all of its workers together)."""
    dali: DaliOptions = field(default_factory=DaliOptions)
    """Options only the dali backend reads (mopro_fast.data.options): hw_decoder_load, decode."""


@dataclass
class RunConfig:
    out: str = MISSING
    """Run folder: resolved recipe, metrics, TensorBoard events, checkpoints, plots."""
    device: str = spec("auto", choices=("auto", "cpu", "cuda"))
    """auto = cuda when available, else cpu."""
    precision: str = spec("bf16", choices=("bf16", "fp16", "fp32"))
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


# ---- loading ------------------------------------------------------------------------------------

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
    init: str = spec("trained", choices=("trained", "random"))
    """Start from the trained classifier (as the original code does) or from N(0, 0.01) weights and zero bias."""
    seed: int = spec(0, ge=0)
    """Seed of the sampling and of a random init."""


@dataclass
class CrtRecipe:
    """A cRT recipe (recipes/crt.yaml): one section; data, model and loader come from the checkpoint."""

    crt: CrtConfig = field(default_factory=CrtConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_HINTS = {cls: get_type_hints(cls) for cls in [Config, *get_type_hints(Config).values(), CrtRecipe, CrtConfig,
                                               DaliOptions]}

def load_config(recipe_path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Recipe file, then `section.key=value` overrides in order; checked and validated."""
    path = str(recipe_path)
    try:
        raw = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: recipe file not found") from None
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return _build(raw, overrides, path)


def config_from_dict(data: dict[str, Any], overrides: Sequence[str] = (), source: str = "checkpoint") -> Config:
    """A config saved as a dict (e.g. in a checkpoint), with overrides; checked like a recipe."""
    return _build(OmegaConf.create(data), overrides, source)


def load_crt_config(recipe_path: str | Path, overrides: Sequence[str] = ()) -> CrtRecipe:
    """A cRT recipe (recipes/crt.yaml) with `crt.key=value` overrides; checked like a training recipe."""
    path = str(recipe_path)
    try:
        raw = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: recipe file not found") from None
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return _build(raw, overrides, path, root=CrtRecipe)


def _build(raw: Any, overrides: Sequence[str], path: str, root: type = Config) -> Any:
    layers = [(raw, f"in {path}")]
    for item in overrides:
        key, eq, _ = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"{item}: an override must look like section.key=value")
        try:
            layers.append((OmegaConf.from_dotlist([item]), f"in override '{item}'"))
        except (yaml.YAMLError, OmegaConfBaseException) as e:
            raise ConfigError(f"{key}: cannot parse override '{item}': {e}") from None
    merged = OmegaConf.structured(root)
    for layer, source in layers:
        if not OmegaConf.is_dict(layer):
            raise ConfigError(f"{path}: a recipe must be a mapping of sections ({', '.join(_HINTS[root])})")
        _check_section(root, OmegaConf.to_container(layer, resolve=False), "", source)
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{e.full_key or path}: {str(e).splitlines()[0]} {source}") from None
    try:
        cfg = OmegaConf.to_object(merged)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key}: missing; set it in {path} or as an override {e.full_key}=...") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{e.full_key or path}: {str(e).splitlines()[0]}") from None
    validate(cfg) if root is Config else validate_crt(cfg)
    return cfg


def _suggest(section_cls: type, prefix: str, key: str) -> str:
    """'; did you mean x.y?' from close names in the same section, else the same name elsewhere."""
    names = list(_HINTS[section_cls])
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {prefix}{close[0]}?"
    elsewhere = [f"{s}.{key}" for s, cls in _HINTS[Config].items() if key in _HINTS[cls]]
    if elsewhere:
        return f"; did you mean {elsewhere[0]}?"
    return f"; {prefix.rstrip('.') or 'a recipe'} has {', '.join(names)}"


def _check_section(cls: type, raw: Any, prefix: str, source: str) -> None:
    """Unknown keys and values of the wrong kind in one parsed layer (file or override)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.')}: expected a mapping of keys, got {_show(raw)} {source}")
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in _HINTS[cls]:
            kind = "section" if cls in (Config, CrtRecipe) else "key"
            raise ConfigError(f"{dotted}: unknown {kind} {source}{_suggest(cls, prefix, str(key))}")
        tp = _HINTS[cls][key]
        if dataclasses.is_dataclass(tp):
            _check_section(tp, value, f"{dotted}.", source)
        elif (problem := _type_problem(tp, value)) is not None:
            raise ConfigError(f"{dotted}: {problem} {source}")


def _type_problem(tp: Any, value: Any) -> str | None:
    """What is wrong with `value` for a field typed `tp` (None = fine). Stricter than OmegaConf,
    which would turn 1 into true and '32' into 32."""
    if type(None) in get_args(tp):  # `X | None`
        if value is None:
            return None
        tp = next(a for a in get_args(tp) if a is not type(None))
    if value is None:
        return "must not be null"
    if get_origin(tp) is list:
        if not isinstance(value, list):
            return f"expected a list, got {_show(value)}"
        for i, item in enumerate(value):
            if (problem := _type_problem(get_args(tp)[0], item)) is not None:
                return f"item {i}: {problem}"
        return None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok, want = {bool: (isinstance(value, bool), "true or false"),
                int: (number and isinstance(value, int), "an integer"),
                float: (number, "a number"),
                str: (isinstance(value, str) or number, "a string")}[tp]
    return None if ok else f"expected {want}, got {_show(value)}"


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


# ---- values -------------------------------------------------------------------------------------

def _range_text(b: dict[str, Any]) -> str:
    lo = f"[{b['ge']}" if "ge" in b else f"({b['gt']}" if "gt" in b else ""
    hi = f"{b['le']}]" if "le" in b else f"{b['lt']})" if "lt" in b else ""
    if lo and hi:
        return f"in {lo}, {hi}"
    return " and ".join(f"{op} {b[k]}" for k, op in [("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")] if k in b)


def _field_problem(meta: dict[str, Any], value: Any) -> str | None:
    if "choices" in meta and value not in meta["choices"]:
        return f"{value!r} is not one of {', '.join(meta['choices'])}"
    bounds = {k: v for k, v in meta.items() if k != "choices"}
    ok = all([value >= bounds.get("ge", -math.inf), value > bounds.get("gt", -math.inf),
              value <= bounds.get("le", math.inf), value < bounds.get("lt", math.inf)]) if bounds else True
    return None if ok else f"must be {_range_text(bounds)}, got {value}"


def _validate_fields(cfg: Any) -> None:
    """ConfigError for the first field outside its range or choices (any sectioned config)."""
    for section in dataclasses.fields(cfg):
        sec = getattr(cfg, section.name)
        for f in dataclasses.fields(sec):
            value = getattr(sec, f.name)
            for i, item in enumerate(value if isinstance(value, list) else [value]):
                if item is not None and (problem := _field_problem(dict(f.metadata), item)) is not None:
                    where = f"[{i}]" if isinstance(value, list) else ""
                    raise ConfigError(f"{section.name}.{f.name}{where}: {problem}")


def validate_crt(recipe: CrtRecipe) -> None:
    """Field ranges, then the milestones against the epochs."""
    _validate_fields(recipe)
    c = recipe.crt
    if not (all(0 < a < c.epochs for a in c.milestones) and list(c.milestones) == sorted(set(c.milestones))):
        raise ConfigError(f"crt.milestones: {c.milestones} must be increasing epochs below crt.epochs ({c.epochs})")


def validate(cfg: Config) -> None:
    """Raise ConfigError for the first impossible value (field ranges, choices, then cross-field)."""
    _validate_fields(cfg)
    d, s, m, ld = cfg.data, cfg.schedule, cfg.mopro, cfg.loader
    checks = [
        ("data.shards", d.shards not in ("", MISSING), "missing; the folder `mopro-fast convert` wrote"),
        ("run.out", cfg.run.out not in ("", MISSING), "missing; the run folder"),
        ("data.train_split", d.train_split != "", "must not be empty"),
        ("data.eval_splits", len(set(d.eval_splits)) == len(d.eval_splits), f"lists a split twice: {d.eval_splits}"),
        ("optim.nesterov", not cfg.optim.nesterov or cfg.optim.momentum > 0, "needs optim.momentum > 0"),
        ("schedule.milestones", s.kind != "step" or (all(0 < a < s.epochs for a in s.milestones)
                                                      and list(s.milestones) == sorted(set(s.milestones))),
         f"{s.milestones} must be increasing epochs below schedule.epochs ({s.epochs})"),
        ("schedule.warmup_epochs", s.warmup_epochs < s.epochs,
         f"must be < schedule.epochs ({s.epochs}), got {s.warmup_epochs}"),
        ("mopro.proto_start_epoch", not m.enabled or m.proto_start_epoch <= s.epochs,
         f"{m.proto_start_epoch} is beyond schedule.epochs ({s.epochs})"),
        ("mopro.start_clean_epoch", not m.enabled or m.start_clean_epoch <= s.epochs,
         f"{m.start_clean_epoch} is beyond schedule.epochs ({s.epochs})"),
        ("loader.eval_resolution", ld.eval_resolution <= ld.eval_resize,
         f"{ld.eval_resolution} is larger than loader.eval_resize ({ld.eval_resize})"),
        ("loader.dali.hw_decoder_load", 0 <= ld.dali.hw_decoder_load <= 1,
         f"must be in [0, 1], got {ld.dali.hw_decoder_load}"),
        ("loader.dali.decode", ld.dali.decode in DALI_DECODE,
         f"{ld.dali.decode!r} is not one of {', '.join(DALI_DECODE)}"),
    ]
    for key, ok, problem in checks:
        if not ok:
            raise ConfigError(f"{key}: {problem}")


# ---- derived values and schedules ---------------------------------------------------------------

@dataclass(frozen=True)
class Derived:
    """Values computed once from the config, the world size and the data set size."""

    world_size: int  # ranks
    num_train: int  # training samples in the shards
    num_classes: int | None  # K: data.num_classes or the manifest's
    global_batch: int  # images per step over all ranks
    lr: float  # peak lr, scaled to the global batch
    steps_per_epoch: int  # the same on every rank
    epochs: int
    total_steps: int
    warmup_steps: int
    schedule: str  # "step" | "cosine"
    milestone_steps: tuple[int, ...]  # step decay points, in steps
    gamma: float
    proto_start_epoch: int | None  # None: MoPro disabled
    clean_start_epoch: int | None  # None: MoPro disabled
    capped: bool  # steps_per_epoch limited by run.max_steps_per_epoch

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One paragraph, printed once at the start of a run."""
        decay = (f"step decay x{self.gamma} at steps {', '.join(map(str, self.milestone_steps)) or 'none'}"
                 if self.schedule == "step" else "cosine decay to 0")
        mopro = ("MoPro off: plain cross-entropy on the web labels" if self.proto_start_epoch is None else
                 f"MoPro: prototype loss from epoch {self.proto_start_epoch}, noise cleaning from epoch "
                 f"{self.clean_start_epoch} (epochs count from 0)")
        return (f"{self.world_size} rank(s) x {self.global_batch // self.world_size} = global batch "
                f"{self.global_batch}; {self.num_train} training samples, {self.num_classes or '?'} classes -> "
                f"{self.steps_per_epoch} steps per epoch{' (capped)' if self.capped else ''} x {self.epochs} epochs "
                f"= {self.total_steps} steps; peak lr {self.lr:g} with {self.warmup_steps} warm-up steps, "
                f"{decay}. {mopro}.")


def derive(cfg: Config, world_size: int, num_train: int, *, manifest_classes: int | None = None) -> Derived:
    """Global batch, scaled lr, steps per epoch (num_train // global batch, at least 1, capped by
    run.max_steps_per_epoch), total and warm-up steps, MoPro start epochs, resolved num_classes."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    validate(cfg)
    global_batch = cfg.loader.batch_size * world_size
    if num_train < global_batch:
        raise ConfigError(f"loader.batch_size: global batch {global_batch} ({cfg.loader.batch_size} x "
                          f"{world_size} ranks) is more than the {num_train} training samples")
    classes = cfg.data.num_classes
    if classes is not None and manifest_classes is not None and classes != manifest_classes:
        raise ConfigError(f"data.num_classes: {classes}, but the shards have {manifest_classes} classes")
    natural = max(1, num_train // global_batch)
    cap = cfg.run.max_steps_per_epoch
    spe = min(natural, cap) if cap > 0 else natural
    s, m = cfg.schedule, cfg.mopro
    return Derived(
        world_size=world_size, num_train=num_train,
        num_classes=classes if classes is not None else manifest_classes,
        global_batch=global_batch, lr=cfg.optim.lr * global_batch / cfg.optim.base_batch,
        steps_per_epoch=spe, epochs=s.epochs, total_steps=spe * s.epochs,
        warmup_steps=round(s.warmup_epochs * spe), schedule=s.kind,
        milestone_steps=tuple(e * spe for e in s.milestones) if s.kind == "step" else (), gamma=s.gamma,
        proto_start_epoch=m.proto_start_epoch if m.enabled else None,
        clean_start_epoch=m.start_clean_epoch if m.enabled else None, capped=spe < natural)


def lr_at(d: Derived, step: int) -> float:
    """Learning rate at global step `step` (0-based), set every iteration: linear warm-up to the
    peak over `warmup_steps` ((step + 1) / warmup_steps), times step decay (gamma per milestone
    passed) or a half cosine from the end of warm-up to 0 at `total_steps`."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if d.schedule == "cosine":
        t = min(max(step - d.warmup_steps, 0) / max(1, d.total_steps - d.warmup_steps), 1.0)
        lr = d.lr * 0.5 * (1.0 + math.cos(math.pi * t))
    else:
        lr = d.lr * d.gamma ** sum(step >= m for m in d.milestone_steps)
    if step < d.warmup_steps:
        lr *= (step + 1) / d.warmup_steps
    return lr


def mopro_switches(cfg: Config, epoch: int) -> tuple[bool, bool]:
    """(use the prototype loss, correct noisy labels) in 0-based `epoch` (DESIGN.md section 1,
    steps 4 and 5); both false when MoPro is disabled."""
    m = cfg.mopro
    return m.enabled and epoch >= m.proto_start_epoch, m.enabled and epoch >= m.start_clean_epoch


def format_config_error(e: ConfigError) -> str:
    """The line the CLI prints before exiting with status 2."""
    return f"config error: {e}"
