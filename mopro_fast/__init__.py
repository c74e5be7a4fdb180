"""mopro-fast: a data-loading-first trainer for MoPro (Li, Xiong, Hoi, ICLR 2021, arXiv 2009.07995)."""

__version__ = "0.1.0"
