"""Two processes under torchrun (gloo, CPU): ranks agree, and agree with one process on the
concatenated global batch (DESIGN.md section 1 steps 1, 2 and 6; section 3, DDP via torchrun).

What is compared, exactly:
- shuffle-BN: every global sample is encoded once, on a rank chosen by the permutation, and
  `unshuffle_batch` returns each rank's own samples in order (bit for bit);
- the state-update path fed with identical z / labels / kept on both ranks: prototypes, queue and
  pointer equal bit for bit across ranks and to one process updating with the global batch;
- full steps under DDP with a BN-free network (BN is the only part of a step that depends on
  how the batch is split): state equal bit for bit across ranks, and equal to one process up to
  float rounding (1e-6); the per-rank vs global mean over kept samples would differ once cleaning
  starts, so the worker sets lr 0 on those steps (see dist_worker.full_step_plan);
- full steps under DDP with resnet18 (with BN): state equal bit for bit across ranks only.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dist_worker as W
from mopro_fast.core.prototypes import Prototypes
from mopro_fast.core.queue import InstanceQueue

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
           str(REPO / "tests" / "dist_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(W.WORLD)]


def test_shuffle_bn_restores_order(ranks):
    rows = torch.arange(W.WORLD * W.LOCAL_BATCH * 3, dtype=torch.float32).view(-1, 3)
    rank0_rows = set(rows[: W.LOCAL_BATCH, 0].tolist())
    moved_across_ranks = 0
    for draw in range(W.SHUFFLE_DRAWS):
        shuffled = torch.cat([r["shuffled"][draw] for r in ranks])
        # Every global sample is encoded exactly once...
        assert sorted(shuffled[:, 0].tolist()) == rows[:, 0].tolist()
        # ...and comes back to its own rank, in order.
        for rank, result in enumerate(ranks):
            local = rows[rank * W.LOCAL_BATCH:(rank + 1) * W.LOCAL_BATCH]
            assert torch.equal(result["restored"][draw], local * 2 + 1)
        moved_across_ranks += set(ranks[0]["shuffled"][draw][:, 0].tolist()) != rank0_rows
    # A real permutation of the global batch (one draw keeps rank 0's set with chance 1/70).
    assert moved_across_ranks >= 1


def test_update_path_identical_on_ranks_and_to_one_process(ranks):
    for name in ("prototypes", "queue", "ptr"):
        assert torch.equal(ranks[0]["update"][name], ranks[1]["update"][name]), name
    protos, queue = Prototypes(W.CLASSES, W.DIM), InstanceQueue(W.DIM, W.QUEUE_LEN)
    queue.keys.copy_(ranks[0]["queue_init"])
    for step in range(W.UPDATE_STEPS):
        z, labels, kept = W.update_inputs(step)  # the concatenated global batch
        protos.update(z, labels, kept, 0.9)
        queue.enqueue(z)
    assert torch.equal(ranks[0]["update"]["prototypes"], protos.weight)
    assert torch.equal(ranks[0]["update"]["queue"], queue.keys)
    assert int(ranks[0]["update"]["ptr"]) == (W.UPDATE_STEPS * 8) % W.QUEUE_LEN == int(queue.ptr)
    assert protos.weight.abs().sum() > 0


def test_full_steps_bn_free_match_one_process(ranks):
    a, b = ranks[0]["tiny"], ranks[1]["tiny"]
    for name in a:
        assert torch.equal(a[name], b[name]), name
    torch.manual_seed(W.MODEL_SEED)
    mopro = W.build_tiny_mopro()
    history = W.run_full_steps(mopro, mopro.query, slice(None))
    single = W.state_of(mopro)
    for name in single:
        assert torch.allclose(a[name], single[name], atol=1e-6, rtol=0), name
    assert int(a["ptr"]) == (W.FULL_STEPS * 8) % W.QUEUE_LEN
    assert a["prototypes"].abs().sum() > 0
    # The cleaning steps did relabel or drop samples, so that path was exercised.
    cleaned = sum(float(h["frac_relabelled"] + h["frac_ood"]) for h in history[2:])
    assert cleaned > 0
    # Training moved the query network (lr > 0 on the first steps) and the key followed.
    assert not torch.allclose(single["query.classifier.weight"], single["key.classifier.weight"])


def test_resnet_ddp_ranks_identical(ranks):
    a, b = ranks[0]["resnet"], ranks[1]["resnet"]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert torch.isfinite(ranks[0]["resnet_losses"]).all()
    assert int(a["ptr"]) == (W.FULL_STEPS * 8) % W.QUEUE_LEN
