"""`python -m mopro_fast.cli ...` (what torchrun launches): the `mopro-fast` command."""

from mopro_fast.cli import main

main()
