"""`mopro-fast bench ...`: benchmarks that compare a fast path with its baseline in the same run.

Every benchmark prints JSON (device, versions, settings, medians, ratio) so results can be
committed under `benchmarks/results/` and quoted in the README.
"""

from __future__ import annotations

import click


@click.group()
def bench() -> None:
    """Measure mopro-fast against the naive way, in the same run; prints JSON."""


def _register() -> None:
    # Each sub-module defines one or more click commands and keeps its heavy imports lazy.
    from mopro_fast.bench import convert as _convert

    bench.add_command(_convert.convert_bench)
    from mopro_fast.bench import listing as _listing

    bench.add_command(_listing.listing_bench)
    from mopro_fast.bench import core as _core

    bench.add_command(_core.proto_bench)
    bench.add_command(_core.ema_bench)
    from mopro_fast.bench import step as _step

    bench.add_command(_step.step_bench)
    from mopro_fast.bench import loader as _loader

    bench.add_command(_loader.loader_bench)
    from mopro_fast.bench import e2e as _e2e

    bench.add_command(_e2e.e2e_bench)
    from mopro_fast.bench import sweep as _sweep

    bench.add_command(_sweep.res_bench)
    from mopro_fast.bench import noise as _noise

    bench.add_command(_noise.noise_bench)
    from mopro_fast.bench import tta as _tta

    bench.add_command(_tta.tta_bench)
    from mopro_fast.bench import suite as _suite, table as _table

    bench.add_command(_suite.all_bench)
    bench.add_command(_table.table_command)


_register()
