"""Run configuration: typed sections loaded from a YAML recipe, with dotted command-line overrides.

    cfg = load_config("recipes/rn50_8gpu.yaml", ["optim.lr=0.2", "run.out=runs/x"])
    d = derive(cfg, world_size=8, num_train=2_400_000)   # global batch, scaled lr, steps, ...
    lr = lr_at(d, step)                                  # per-iteration lr (STYLE.md point 10)
    use_proto, clean = mopro_switches(d, epoch)          # MoPro's start epochs, resolved by derive
    side = resolution_at(cfg.loader, epoch)              # training crop side (progressive resizing)

By concern:
    schema.py     the sections (dataclasses): every key, its type, default, meaning and range
    loading.py    YAML + overrides -> a checked tree, for any root (training, cRT, convert settings)
    derive.py     `Derived`: values computed once from the config, the world size and the data size
    schedules.py  pure functions of the step or epoch: lr_at, mopro_switches, resolution_at
Every public name is importable from `mopro_fast.config`.
"""

from mopro_fast.config.derive import Derived, derive
from mopro_fast.config.loading import (ConfigError, config_from_dict, format_config_error, load_config,
                                       load_crt_config, raise_first, read_yaml, validate, validate_crt,
                                       validate_fields)
from mopro_fast.config.schedules import lr_at, mopro_switches, resolution_at
from mopro_fast.config.schema import (Config, CrtConfig, CrtRecipe, DataConfig, LoaderConfig, ModelConfig,
                                      MoproConfig, OptimConfig, RunConfig, ScheduleConfig, spec)

__all__ = ["Config", "ConfigError", "CrtConfig", "CrtRecipe", "DataConfig", "Derived", "LoaderConfig", "ModelConfig",
           "MoproConfig", "OptimConfig", "RunConfig", "ScheduleConfig", "config_from_dict", "derive",
           "format_config_error", "load_config", "load_crt_config", "lr_at", "mopro_switches", "raise_first",
           "read_yaml", "resolution_at", "spec", "validate", "validate_crt", "validate_fields"]
