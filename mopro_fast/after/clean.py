"""Noise cleaning of the training set with the final model (DESIGN.md section 1, "After training";
paper arXiv 2009.07995, section 3.3; the original code's noise_cleaning.py).

Every training sample goes once through the query network in its evaluation view (resize +
centre crop, no augmentation); its classifier logits and prototype logits `z @ C.T / T` (the
final prototypes C) go through `noise.correct_labels`, the very rule the training step applies:
relabelled (the label becomes argmax of the soft label), kept (web label stays), or
out-of-distribution. Written to OUT:

- `labels.jsonl`: one JSON object per sample, in sample-index order: `index`, `key`, `path`,
  `web_label`, `label` (the corrected label; null for OOD), `status` (kept / relabelled / ood),
  `score_cls` and `score_proto` (the classifier's and the prototypes' softmax probability of
  `label`, or of the web label for an OOD sample), `soft_web` (the soft label's mass on the web
  label, the value the OOD test compares with 1/K), and `truth` when the planted truth is known;
- `summary.json`: counts kept / relabelled / OOD overall and per class, the rule's settings, a
  fingerprint of the shards (checked by `retrain`), and with truth the noise-detection figures
  next to their chance baselines.

Correct across ranks: under torchrun each rank scores its disjoint share of the split (the eval
loaders cover every sample exactly once), writes its rows into a table indexed by sample index,
and one all-reduce (sum) assembles the table on every rank; rank 0 writes the files. The result
does not depend on the number of ranks.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor

from mopro_fast.errors import MoproError
from mopro_fast import dist
from mopro_fast.core.losses import prototype_logits
from mopro_fast.core.noise import correct_labels
from mopro_fast.safe_io import output_dir
from mopro_fast.after.trained import Trained

# Columns of the per-sample table (float64, so sample indices up to 2^53 stay exact).
COLUMNS = ("seen", "web_label", "label", "kept", "score_cls", "score_proto", "soft_web")
STATUS = ("kept", "relabelled", "ood")
LABELS_FILE, SUMMARY_FILE = "labels.jsonl", "summary.json"


class CleanError(MoproError, ValueError):
    """clean cannot run on this input; one line."""


def shards_fingerprint(shards: Path, split: str) -> str:
    """sha256 over the manifest's record of the split's shards (names, sample counts, sha256)."""
    raw = json.loads((Path(shards) / "manifest.json").read_text())["splits"][split]
    listed = [{k: s.get(k) for k in ("file", "samples", "sha256")} for s in raw["shards"]]
    return hashlib.sha256(json.dumps(listed, sort_keys=True).encode()).hexdigest()


@torch.no_grad()
def score_batch(trained: Trained, images: Tensor, labels: Tensor) -> Tensor:
    """One eval batch -> its rows of the table (b x len(COLUMNS)); images b x 3 x H x W, labels b."""
    from mopro_fast.training import runtime

    cfg = trained.cfg
    with runtime.autocast(trained.device, cfg.run.precision):
        class_logits, z = trained.net(images)  # b x K, b x d
    proto_logits = prototype_logits(z.float(), trained.prototypes.float(), cfg.mopro.temperature)  # b x K
    corrected, kept = correct_labels(class_logits, proto_logits, labels, cfg.mopro.alpha,
                                     cfg.mopro.pseudo_threshold, trained.num_classes, cfg.mopro.ood_threshold)  # b, b
    p_cls = torch.softmax(class_logits.float(), dim=1)  # b x K
    p_proto = torch.softmax(proto_logits, dim=1)  # b x K
    shown = corrected.unsqueeze(1)  # b x 1: the corrected label (the web label where OOD)
    soft_web = cfg.mopro.alpha * p_cls.gather(1, labels[:, None]) + (1 - cfg.mopro.alpha) * p_proto.gather(1, labels[:, None])
    return torch.cat([torch.ones_like(soft_web), labels[:, None].double(), corrected[:, None].double(),
                      kept[:, None].double(), p_cls.gather(1, shown).double(), p_proto.gather(1, shown).double(),
                      soft_web.double()], dim=1)  # b x 7


def score_split(trained: Trained, progress: bool = True) -> Tensor:
    """The whole table (num_listed x len(COLUMNS), float64, on the device), the same on every rank.

    Rows of samples that were not written (rejected records) stay zero (`seen` = 0).
    """
    from mopro_fast.data import backend_options, build_eval_loader, loader_spec
    from mopro_fast.data.manifest import read_manifest
    from mopro_fast.data.remote import location

    cfg = trained.cfg
    shards = location(cfg.data.shards)
    manifest = read_manifest(shards)
    split = cfg.data.train_split
    if manifest.num_classes != trained.num_classes:
        raise CleanError(f"{shards} has {manifest.num_classes} classes but the checkpoint's classifier has "
                         f"{trained.num_classes}: wrong shards (set data.shards=...)")
    table = torch.zeros(int(manifest.split(split)["num_listed"]), len(COLUMNS), dtype=torch.float64,
                        device=trained.device)  # N x 7
    loader = build_eval_loader(cfg.loader.backend,
                               loader_spec(cfg, dist.rank(), dist.world_size(), trained.device), split=split,
                               resolution=cfg.loader.eval_resolution, resize=cfg.loader.eval_resize,
                               options=backend_options(cfg, cfg.loader.backend))
    batches = loader
    if progress and dist.is_main():
        from tqdm import tqdm

        batches = tqdm(loader, desc=f"clean {split}", unit="batch", leave=False, dynamic_ncols=True)
    for batch in batches:
        table.index_add_(0, batch.index, score_batch(trained, batch.image, batch.label))  # a duplicate would show as seen = 2
    table = dist.all_reduce_sum(table)  # every rank scored a disjoint share: the sum is the whole split
    seen = table[:, 0]
    if bool((seen > 1).any()) or int(seen.sum().item()) != manifest.num_written(split):
        raise CleanError(f"the {cfg.loader.backend} loader covered {int(seen.sum().item())} samples "
                         f"({int((seen > 1).sum().item())} twice) of the {manifest.num_written(split)} written")
    return table


def truth_of(trained: Trained, catalog) -> Tensor | None:
    """Planted truth by sample index (-1 OOD, -2 unknown), from data.truth; None when unset."""
    from mopro_fast.training.truth import UNKNOWN, read_truth_tsv

    if not trained.cfg.data.truth:
        return None
    by_path = read_truth_tsv(Path(trained.cfg.data.truth))
    return torch.tensor([UNKNOWN if e is None else by_path.get(e.path, UNKNOWN) for e in catalog.entries],
                        dtype=torch.long)


def summarize(table: Tensor, truth: Tensor | None, num_classes: int) -> dict:
    """Counts overall and per class; with truth, noise-detection figures and their chance baselines.

    A sample is *noisy* when its true content differs from its web label (a flipped label or an
    OOD image) and *flagged* when relabelled or dropped as OOD. Flagging at random at the same
    rate has precision = the noise rate and recall = the flagged fraction: those are the baselines.
    """
    t = table[table[:, 0] > 0].cpu()
    web, label, kept = t[:, 1].long(), t[:, 2].long(), t[:, 3].bool()  # n, n, n
    relabelled = kept & (label != web)  # n
    ood = ~kept  # n
    n = web.shape[0]

    def per_class(values: Tensor, mask: Tensor | None = None) -> list[int]:
        values = values if mask is None else values[mask]
        return torch.bincount(values, minlength=num_classes).tolist()

    summary = {
        "samples": n,
        "counts": {"kept": int((kept & ~relabelled).sum()), "relabelled": int(relabelled.sum()), "ood": int(ood.sum())},
        "per_class": {"web": per_class(web), "kept": per_class(web, kept & ~relabelled),
                      "relabelled_away": per_class(web, relabelled), "relabelled_in": per_class(label, relabelled),
                      "ood": per_class(web, ood), "final": per_class(label, kept)},
    }
    summary["fractions"] = {k: v / max(n, 1) for k, v in summary["counts"].items()}
    if truth is not None:
        true = truth[table[:, 0].cpu() > 0]  # n
        summary["truth"] = detection_figures(web, label, kept, true)
    return summary


def detection_figures(web: Tensor, label: Tensor, kept: Tensor, true: Tensor) -> dict:
    """Noise detection against the planted truth (samples with unknown truth left out)."""
    from mopro_fast.training.truth import OOD, UNKNOWN

    known = true != UNKNOWN
    web, label, kept, true = web[known], label[known], kept[known], true[known]
    relabelled = kept & (label != web)
    flagged = relabelled | ~kept
    noisy = true != web
    flipped = noisy & (true != OOD)
    planted_ood = true == OOD
    n = max(int(known.sum()), 1)

    def ratio(a: Tensor, b: Tensor) -> float:
        return float(a.sum()) / max(float(b.sum()), 1.0)

    return {
        "samples": int(known.sum()), "noisy": int(noisy.sum()), "flipped": int(flipped.sum()),
        "planted_ood": int(planted_ood.sum()), "flagged": int(flagged.sum()),
        "precision": ratio(flagged & noisy, flagged), "recall": ratio(flagged & noisy, noisy),
        "chance_precision": float(noisy.sum()) / n, "chance_recall": float(flagged.sum()) / n,
        "flipped_found": ratio(flipped & flagged, flipped),
        "flipped_corrected": ratio(flipped & relabelled & (label == true), flipped),
        "ood_found": ratio(planted_ood & ~kept, planted_ood), "ood_precision": ratio(planted_ood & ~kept, ~kept),
        "clean_kept": ratio(~noisy & kept & ~relabelled, ~noisy),
        "label_accuracy_before": float((~noisy).sum()) / n,
        "label_accuracy_after": ratio(kept & (label == true), kept),
    }


def write_outputs(out: Path, table: Tensor, catalog, truth: Tensor | None, summary: dict) -> None:
    """labels.jsonl (one line per written sample, index order) and summary.json, atomically, into OUT only."""
    from mopro_fast.after.trained import write_outputs as write_files
    from mopro_fast.training.truth import OOD, UNKNOWN

    rows = table.cpu().tolist()
    lines = []
    for index, row in enumerate(rows):
        if row[0] == 0:
            continue
        entry = catalog.entries[index]
        web, label, kept = int(row[1]), int(row[2]), row[3] > 0
        record = {"index": index, "key": entry.key, "path": entry.path, "web_label": web,
                  "label": label if kept else None,
                  "status": "ood" if not kept else ("relabelled" if label != web else "kept"),
                  "score_cls": round(row[4], 5), "score_proto": round(row[5], 5), "soft_web": round(row[6], 5)}
        if truth is not None and int(truth[index]) != UNKNOWN:
            record["truth"] = "ood" if int(truth[index]) == OOD else int(truth[index])
        lines.append(json.dumps(record))
    write_files(out, {LABELS_FILE: ("\n".join(lines) + "\n").encode(),
                      SUMMARY_FILE: (json.dumps(summary, indent=1, sort_keys=True) + "\n").encode()})


def clean(checkpoint: Path, out: Path | None = None, overrides: list[str] = (), progress: bool = True) -> dict:
    """Score the training split with the checkpoint's final model and write OUT (default RUN/clean).

    Returns the summary (also in OUT/summary.json). Runs in one process or under torchrun.
    """
    from mopro_fast.data.catalog import read_catalog
    from mopro_fast.after.trained import load_trained

    dist.init_from_env()
    trained = load_trained(Path(checkpoint), list(overrides))
    cfg = trained.cfg
    if not cfg.mopro.enabled or not bool(trained.prototypes.any()):
        raise CleanError(f"{Path(checkpoint).name} has no prototypes (trained with mopro.enabled=false?): "
                         f"the cleaning rule needs them")
    out = Path(out) if out is not None else Path(checkpoint).parent / "clean"
    if dist.is_main():  # before the long pass: an unusable --out fails now, in one line
        output_dir(out, "clean --out")
    table = score_split(trained, progress)
    summary: dict = {}
    if dist.is_main():
        catalog = read_catalog(Path(cfg.data.shards), cfg.data.train_split)
        truth = truth_of(trained, catalog)
        summary = {"checkpoint": str(checkpoint), "shards": str(cfg.data.shards), "split": cfg.data.train_split,
                   "fingerprint": shards_fingerprint(Path(cfg.data.shards), cfg.data.train_split),
                   "num_classes": trained.num_classes, "class_names": catalog.class_names,
                   "rule": {"alpha": cfg.mopro.alpha, "threshold": cfg.mopro.pseudo_threshold,
                            "ood_threshold": cfg.mopro.ood_threshold or 1 / trained.num_classes,
                            "temperature": cfg.mopro.temperature, "view": f"eval {cfg.loader.eval_resize}/"
                                                                          f"{cfg.loader.eval_resolution}"},
                   "world_size": dist.world_size(), "out": str(out),
                   **summarize(table, truth, trained.num_classes)}
        write_outputs(out, table, catalog, truth, summary)
    dist.barrier()
    return summary


def read_labels(path: Path) -> tuple[list[dict], dict | None]:
    """A clean output (folder, or its labels.jsonl) -> (records, summary or None if absent).

    Anything else (a binary file, a checkpoint, other JSON) is a CleanError saying what was expected.
    """
    path = Path(path)
    labels = path / LABELS_FILE if path.is_dir() else path
    if not labels.is_file():
        raise CleanError(f"{labels}: no such labels file; run `mopro-fast clean CKPT` first")
    expected = "expected the labels.jsonl written by `mopro-fast clean` (or its folder)"
    text = _read_text(labels, expected)
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record["index"], record["web_label"] = int(record["index"]), int(record["web_label"])
            if record["label"] is not None:
                record["label"] = int(record["label"])
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise CleanError(f"{labels}:{lineno}: not a clean record ({type(exc).__name__}: {str(exc)[:80]}); "
                             f"{expected}") from None
        records.append(record)
    summary_path = labels.parent / SUMMARY_FILE
    summary = None
    if summary_path.is_file():
        try:
            summary = json.loads(_read_text(summary_path, "expected the summary.json written by `mopro-fast clean`"))
        except ValueError as exc:
            raise CleanError(f"{summary_path}: not JSON ({str(exc)[:80]}); expected the summary.json written by "
                             f"`mopro-fast clean`") from None
        if not isinstance(summary, dict):
            raise CleanError(f"{summary_path}: not a clean summary; expected the summary.json of `mopro-fast clean`")
    return records, summary


def _read_text(path: Path, expected: str) -> str:
    """The file as UTF-8 text; a binary file (a checkpoint, an image) is a CleanError saying what was expected."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CleanError(f"cannot read {path}: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        kind = "a zip file (a .pt checkpoint?)" if data[:2] == b"PK" else "binary data"
        raise CleanError(f"{path} is {kind}, not text; {expected}")
    return text
