"""One MoPro training step for a batch (DESIGN.md section 1 steps 1-6; paper arXiv 2009.07995,
section 3, Algorithm 1).

The caller's train loop reads:

    with torch.autocast(device_type, dtype=torch.bfloat16):
        loss, metrics = mopro_step(mopro, view_q, view_k, labels,
                                   use_proto_loss=epoch >= 1, clean=epoch >= start_clean_epoch)
    loss.backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)
    mopro.momentum_update()        # key network EMA: needs the new query weights

Order of the state updates, and why:
- the losses see the queue and prototypes as they were *before* this batch (the keys of this
  batch must not be their own negatives; prototypes are updated from this batch's embeddings);
- the prototype update and the enqueue then run inside the step, under no_grad, as in the
  original code: the gathered z, labels and keys are at hand, and they depend only on the
  forward, not on the optimiser step. The losses use clones of the two buffers, because autograd
  keeps them for backward and the updates are in place;
- the key EMA is the only update that must follow `optimizer.step()`, so it stays with the caller
  (`MoPro.momentum_update`), right after it. The original runs it at the start of the next
  forward, which is the same sequence of values.

No `.item()` and no boolean indexing: every metric is a 0-d tensor on the device; the loop
reduces and logs them every N steps.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mopro_fast import dist
from mopro_fast.core.losses import (
    instance_loss,
    masked_accuracy,
    masked_cross_entropy,
    prototype_logits,
)
from mopro_fast.core.mopro import MoPro
from mopro_fast.core.noise import correct_labels


@torch.no_grad()
def key_embeddings(key_net: nn.Module, view_k: Tensor) -> Tensor:
    """Step 1, k-branch: z' = f_k(x') with shuffle-BN across ranks; b x 3 x H x W -> b x d."""
    shuffled, unshuffle = dist.shuffle_batch(view_k)  # b x 3 x H x W, W*b
    _, k = key_net(shuffled)  # b x d, in shuffled order
    return dist.unshuffle_batch(k, unshuffle)  # b x d, this rank's samples in order


def mopro_step(
    mopro: MoPro,
    view_q: Tensor,
    view_k: Tensor,
    labels: Tensor,
    *,
    use_proto_loss: bool,
    clean: bool,
    truth: Tensor | None = None,
    query_net: nn.Module | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward, losses and state updates for one local batch; returns (loss, metrics).

    view_q: b x 3 x H x W weak views (query encoder); view_k: b x 3 x H x W strong views (key
    encoder); labels: b web labels (long). `use_proto_loss` (epoch >= 1) and `clean`
    (epoch >= start_clean_epoch) are chosen by the caller. `truth`: optional b true labels,
    -1 for out-of-distribution samples, for noise-detection precision and recall (fixtures).
    `query_net`: the DDP-wrapped query network, if any (default `mopro.query`).
    """
    query_net = mopro.query if query_net is None else query_net
    # 1. Both branches.
    class_logits, z = query_net(view_q)  # b x K, b x d
    k = key_embeddings(mopro.key, view_k)  # b x d, no grad
    queue = mopro.queue.keys.clone()  # L x d snapshot (kept by autograd; enqueue is in place)
    protos = mopro.prototypes.weight.clone()  # K x d snapshot (same reason)

    # 2-3. Instance loss against the queue; prototype logits.
    loss_inst, _, acc_inst = instance_loss(z, k, queue, mopro.temperature)
    proto_logits = prototype_logits(z, protos, mopro.temperature)  # b x K

    # 4. Noise correction (before start_clean_epoch every web label is kept as is).
    if clean:
        target, kept = correct_labels(
            class_logits.detach(), proto_logits.detach(), labels,
            mopro.alpha, mopro.threshold, mopro.num_classes, mopro.ood_threshold,
        )  # b, b
    else:
        target, kept = labels, torch.ones_like(labels, dtype=torch.bool)  # b, b

    # 5. Losses over the kept samples; label smoothing (optim.label_smoothing) on the classifier's
    #    only: the prototype loss and the noise correction above read the targets and logits as they are.
    loss_cls = masked_cross_entropy(class_logits, target, kept, mopro.label_smoothing)
    if use_proto_loss:
        loss_proto = masked_cross_entropy(proto_logits, target, kept)
    else:
        loss_proto = torch.zeros((), device=loss_cls.device)  # epoch 0: no prototypes yet
    loss = loss_cls + mopro.w_proto * loss_proto + mopro.w_inst * loss_inst

    # 6. State updates over the global batch: prototypes (kept samples, corrected labels, query
    #    embeddings, batch order = rank order), then the momentum keys into the queue.
    with torch.no_grad():
        mopro.prototypes.update(
            dist.all_gather(z), dist.all_gather(target), dist.all_gather(kept),
            mopro.proto_momentum,
        )
        mopro.queue.enqueue(dist.all_gather(k))

    relabelled = (target != labels) & kept  # b: label changed (relabelled to y itself does not count)
    metrics = {
        "loss": loss.detach(),
        "loss_cls": loss_cls.detach(),
        "loss_proto": loss_proto.detach(),
        "loss_inst": loss_inst.detach(),
        "acc_inst": acc_inst,
        "acc_cls": masked_accuracy(class_logits.detach(), target, kept),
        "acc_proto": masked_accuracy(proto_logits.detach(), target, kept),
        "frac_relabelled": relabelled.float().mean(),
        "frac_ood": (~kept).float().mean(),
    }
    if truth is not None:
        metrics.update(noise_detection(labels, relabelled | ~kept, truth))
    return loss, metrics


def noise_detection(labels: Tensor, detected: Tensor, truth: Tensor) -> dict[str, Tensor]:
    """Precision and recall of noise detection against known truth (b, b bool, b; 0 when empty).

    A sample is noisy when its true label differs from its web label (OOD, truth = -1, included);
    it is detected when relabelled or dropped as OOD.
    """
    noisy = truth != labels  # b
    hits = (noisy & detected).sum()
    return {
        "noise_precision": hits / detected.sum().clamp_min(1),
        "noise_recall": hits / noisy.sum().clamp_min(1),
    }
