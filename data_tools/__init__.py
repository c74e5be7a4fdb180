"""Offline data preparation for mopro-fast: listing, fixture generation, shard writing, verification.

No training code lives here (DESIGN.md section 3).
"""
