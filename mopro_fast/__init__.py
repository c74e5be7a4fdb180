"""mopro-fast: a data-loading-first trainer for MoPro (Li, Xiong, Hoi, ICLR 2021, arXiv 2009.07995)."""

from pathlib import Path

__version__ = "0.1.0"

RECIPES = Path(__file__).resolve().parents[1] / "recipes"  # the checkout's recipes/ (the CLI's defaults)
