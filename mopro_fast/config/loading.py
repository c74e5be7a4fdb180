"""Loading a recipe: YAML file, then overrides, into a schema tree (config/schema.py), checked.

    cfg = load_config("recipes/rn50_8gpu.yaml", ["optim.lr=0.2", "run.out=runs/x"])
    crt = load_config("recipes/crt.yaml", ["crt.epochs=4"], root=CrtRecipe)   # = load_crt_config(...)

One loader for every root (a dataclass of sections: `Config`, `CrtRecipe`, the convert settings of
data_tools/convert_config.py). OmegaConf structured configs parse the YAML and the overrides,
merge them and convert types. This module adds what OmegaConf lets through: unknown keys get a
"did you mean" hint, ints are not booleans and strings are not numbers, a choice names its allowed
values, and impossible values (negative lr, alpha outside [0, 1], milestones beyond the last
epoch, ...) are refused. Every problem is a `ConfigError` whose message is one line naming the
dotted key and, for a type, where the value came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from functools import cache
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence, get_args, get_origin, get_type_hints

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from mopro_fast.errors import MoproError
from mopro_fast.config.schema import Config, CrtRecipe


class ConfigError(MoproError, ValueError):
    """A bad recipe or override; the message is one line: `dotted.key: problem`."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def format_config_error(e: ConfigError) -> str:
    """The line the CLI prints before exiting with status 2."""
    return f"config error: {e}"


Layer = tuple[Any, str]  # (a parsed mapping of sections, where it came from: "in FILE", "in override 'a.b=1'")


def load_config(recipe_path: str | Path | None, overrides: Sequence[str] = (), root: type = Config, *,
                values: Sequence[Layer] = (), check: Callable[[Any], None] | None = None) -> Any:
    """The recipe file (None: the schema's defaults), then `values` (mappings of sections, each with
    the phrase saying where it came from, e.g. command-line options), then `section.key=value`
    overrides, in order; each layer checked, the result validated by `check` (default: `validate`
    for a Config, `validate_crt` for a CrtRecipe, the field ranges for any other root)."""
    path = "defaults" if recipe_path is None else str(recipe_path)
    layers = [] if recipe_path is None else [(read_yaml(path), f"in {path}")]
    layers += [(OmegaConf.create(dict(layer)), source) for layer, source in values]
    return _build(layers + _override_layers(overrides), path, root, check)


def load_crt_config(recipe_path: str | Path, overrides: Sequence[str] = ()) -> CrtRecipe:
    """A cRT recipe (recipes/crt.yaml) with `crt.key=value` overrides; checked like a training recipe."""
    return load_config(recipe_path, overrides, root=CrtRecipe)


def config_from_dict(data: dict[str, Any], overrides: Sequence[str] = (), source: str = "checkpoint") -> Config:
    """A config saved as a dict (e.g. in a checkpoint), with overrides; checked like a recipe.

    Checkpoints of earlier versions are read too: their `loader.hw_decoder_load` is today's
    `loader.dali.hw_decoder_load`."""
    loader = data.get("loader")
    if isinstance(loader, dict) and "hw_decoder_load" in loader:
        loader = {k: v for k, v in loader.items() if k != "hw_decoder_load"}
        loader["dali"] = {"hw_decoder_load": data["loader"]["hw_decoder_load"], **loader.get("dali", {})}
        data = {**data, "loader": loader}
    return _build([(OmegaConf.create(data), f"in {source}"), *_override_layers(overrides)], source, Config, None)


def read_yaml(path: str) -> Any:
    """One recipe file, parsed (not yet checked against a schema)."""
    try:
        return OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: recipe file not found") from None
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None


def _override_layers(overrides: Sequence[str]) -> list[Layer]:
    layers = []
    for item in overrides:
        key, eq, _ = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"{item}: an override must look like section.key=value")
        try:
            layers.append((OmegaConf.from_dotlist([item]), f"in override '{item}'"))
        except (yaml.YAMLError, OmegaConfBaseException) as e:
            raise ConfigError(f"{key}: cannot parse override '{item}': {e}") from None
    return layers


def _build(layers: list[Layer], path: str, root: type, check: Callable[[Any], None] | None) -> Any:
    merged = OmegaConf.structured(root)
    for layer, source in layers:
        if not OmegaConf.is_dict(layer):
            raise ConfigError(f"{path}: a recipe must be a mapping of sections ({', '.join(_hints(root))})")
        _check_section(root, root, OmegaConf.to_container(layer, resolve=False), "", source)
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
    (check or _CHECKS.get(root, validate_fields))(cfg)
    return cfg


# ---- keys and types -----------------------------------------------------------------------------

@cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _suggest(root: type, section_cls: type, prefix: str, key: str) -> str:
    """'; did you mean x.y?' from close names in the same section, else the same name elsewhere."""
    names = list(_hints(section_cls))
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {prefix}{close[0]}?"
    elsewhere = [f"{s}.{key}" for s, cls in _hints(root).items()
                 if dataclasses.is_dataclass(cls) and key in _hints(cls)]
    if elsewhere:
        return f"; did you mean {elsewhere[0]}?"
    return f"; {prefix.rstrip('.') or 'a recipe'} has {', '.join(names)}"


def _check_section(root: type, cls: type, raw: Any, prefix: str, source: str) -> None:
    """Unknown keys and values of the wrong kind in one parsed layer (file or override)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.')}: expected a mapping of keys, got {_show(raw)} {source}")
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in _hints(cls):
            kind = "section" if cls is root else "key"
            raise ConfigError(f"{dotted}: unknown {kind} {source}{_suggest(root, cls, prefix, str(key))}")
        tp = _hints(cls)[key]
        if dataclasses.is_dataclass(tp):
            _check_section(root, tp, value, f"{dotted}.", source)
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
    if get_origin(tp) is Literal:  # a choice of strings
        if (problem := _type_problem(str, value)) is not None:
            return problem
        return None if value in get_args(tp) else f"{value!r} is not one of {', '.join(get_args(tp))}"
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok, want = {bool: (isinstance(value, bool), "true or false"),
                int: (number and isinstance(value, int), "an integer"),
                float: (number, "a number"),
                str: (isinstance(value, str) or number, "a string")}[tp]
    return None if ok else f"expected {want}, got {_show(value)}"


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


# ---- values -------------------------------------------------------------------------------------

def _range_text(b: Mapping[str, Any]) -> str:
    lo = f"[{b['ge']}" if "ge" in b else f"({b['gt']}" if "gt" in b else ""
    hi = f"{b['le']}]" if "le" in b else f"{b['lt']})" if "lt" in b else ""
    if lo and hi:
        return f"in {lo}, {hi}"
    return " and ".join(f"{op} {b[k]}" for k, op in [("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")] if k in b)


def _range_problem(bounds: Mapping[str, Any], value: Any) -> str | None:
    ok = all([value >= bounds.get("ge", -math.inf), value > bounds.get("gt", -math.inf),
              value <= bounds.get("le", math.inf), value < bounds.get("lt", math.inf)])
    return None if ok else f"must be {_range_text(bounds)}, got {value}"


def validate_fields(cfg: Any, prefix: str = "") -> None:
    """ConfigError for the first field outside its choices (a Literal type) or its `spec` range
    (any root of sections, nested sections such as loader.dali included; also catches values set
    in Python rather than loaded)."""
    for f in dataclasses.fields(cfg):
        value, tp, dotted = getattr(cfg, f.name), _hints(type(cfg))[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            validate_fields(value, f"{dotted}.")
            continue
        if get_origin(tp) is Literal and value not in get_args(tp):
            raise ConfigError(f"{dotted}: {value!r} is not one of {', '.join(get_args(tp))}")
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if f.metadata and item is not None and (problem := _range_problem(f.metadata, item)) is not None:
                where = f"[{i}]" if isinstance(value, list) else ""
                raise ConfigError(f"{dotted}{where}: {problem}")


def raise_first(checks: Sequence[tuple[str, bool, str]]) -> None:
    """ConfigError `key: problem` for the first (key, ok, problem) that is not ok."""
    for key, ok, problem in checks:
        if not ok:
            raise ConfigError(f"{key}: {problem}")


def _increasing_below(milestones: Sequence[int], epochs: int) -> bool:
    return all(0 < a < epochs for a in milestones) and list(milestones) == sorted(set(milestones))


def validate_crt(recipe: CrtRecipe) -> None:
    """Field ranges, then the milestones against the epochs."""
    validate_fields(recipe)
    c = recipe.crt
    raise_first([("crt.milestones", _increasing_below(c.milestones, c.epochs),
                  f"{c.milestones} must be increasing epochs below crt.epochs ({c.epochs})")])


def validate(cfg: Config) -> None:
    """Raise ConfigError for the first impossible value (field ranges, then cross-field)."""
    validate_fields(cfg)
    d, s, m, ld = cfg.data, cfg.schedule, cfg.mopro, cfg.loader
    raise_first([
        ("data.shards", d.shards not in ("", MISSING), "missing; the folder `mopro-fast convert` wrote"),
        ("run.out", cfg.run.out not in ("", MISSING), "missing; the run folder"),
        ("data.train_split", d.train_split != "", "must not be empty"),
        ("data.eval_splits", len(set(d.eval_splits)) == len(d.eval_splits), f"lists a split twice: {d.eval_splits}"),
        ("optim.nesterov", not cfg.optim.nesterov or cfg.optim.momentum > 0, "needs optim.momentum > 0"),
        ("schedule.milestones", s.kind != "step" or _increasing_below(s.milestones, s.epochs),
         f"{s.milestones} must be increasing epochs below schedule.epochs ({s.epochs})"),
        ("schedule.warmup_epochs", s.warmup_epochs < s.epochs,
         f"must be < schedule.epochs ({s.epochs}), got {s.warmup_epochs}"),
        # (an epoch whose fraction is set is not used: the fraction wins, and is within the run by its range)
        ("mopro.proto_start_epoch",
         not m.enabled or m.proto_start_fraction is not None or m.proto_start_epoch <= s.epochs,
         f"{m.proto_start_epoch} is beyond schedule.epochs ({s.epochs})"),
        ("mopro.start_clean_epoch",
         not m.enabled or m.clean_start_fraction is not None or m.start_clean_epoch <= s.epochs,
         f"{m.start_clean_epoch} is beyond schedule.epochs ({s.epochs})"),
        ("loader.eval_resolution", ld.eval_resolution <= ld.eval_resize,
         f"{ld.eval_resolution} is larger than loader.eval_resize ({ld.eval_resize})"),
        ("loader.min_resolution", ld.min_resolution is None or ld.min_resolution <= ld.resolution,
         f"{ld.min_resolution} is larger than loader.resolution ({ld.resolution})"),
        ("loader.ramp_end_epoch", ld.ramp_start_epoch <= ld.ramp_end_epoch <= s.epochs,
         f"{ld.ramp_end_epoch} must be in [loader.ramp_start_epoch ({ld.ramp_start_epoch}), "
         f"schedule.epochs ({s.epochs})]"),
        ("loader.ramp_end_epoch", ld.min_resolution is None or ld.ramp_end_epoch > ld.ramp_start_epoch,
         f"with loader.min_resolution set, must be > loader.ramp_start_epoch ({ld.ramp_start_epoch}), "
         f"got {ld.ramp_end_epoch}"),
    ])


_CHECKS: dict[type, Callable[[Any], None]] = {Config: validate, CrtRecipe: validate_crt}
