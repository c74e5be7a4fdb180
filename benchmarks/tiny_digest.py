"""Digest of a tiny run, to show a refactoring changed nothing: sha256 of the torch backend's
batches (epochs 0 and 1: both views, labels, indices) and of the final weights of a run.

    python benchmarks/tiny_digest.py SHARDS RUN_DIR      # prints {"batches": ..., "weights": ...}

RUN_DIR is a finished run of the tiny regime in benchmarks/results/tiny-digest-2026-12-01.json
("command"); the batches are built with the same settings (batch 32, 32 px, seed 0, 12 steps).
"""

import hashlib
import json
import sys
from pathlib import Path

import torch

from mopro_fast.data import build_train_loader


def main(shards: Path, run: Path) -> dict:
    batches = hashlib.sha256()
    loader = build_train_loader("torch", shards=shards, split="train", batch_size=32, workers=1, rank=0,
                                world_size=1, device=torch.device("cpu"), channels_last=False, prefetch=2,
                                hw_decoder_load=0.65, resolution=32, shuffle_buffer=1000, seed=0,
                                steps_per_epoch=12)
    for epoch in (0, 1):
        loader.set_epoch(epoch, start_step=0)
        for b in loader:
            for t in (b.view_q, b.view_k, b.label, b.index):
                batches.update(t.contiguous().numpy().tobytes())
    ckpt = sorted(run.glob("ckpt-*.pt"))[-1]
    model = torch.load(ckpt, map_location="cpu", weights_only=False)["model"]
    weights = hashlib.sha256()
    for key in sorted(model):
        weights.update(key.encode())
        weights.update(model[key].contiguous().numpy().tobytes())
    return {"batches": batches.hexdigest(), "weights": weights.hexdigest(), "ckpt": ckpt.name}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2]))))
