"""Known clean labels of a training split (the built-in data set's truth.tsv), by sample index.

With truth at hand the trainer and `clean` report how well MoPro finds the planted noise:
precision and recall of "relabelled or dropped as OOD" against "web label is wrong".
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import torch

from mopro_fast.data.manifest import ManifestError
from mopro_fast.data.remote import is_url
from mopro_fast.errors import MoproError

OOD = -1
UNKNOWN = -2


class TruthError(MoproError, ValueError):
    """data.truth cannot be used; the message is one line naming the file."""


def read_truth_tsv(path: Path) -> dict[str, int]:
    """path -> clean label, or OOD (-1); the file's header is `path  web_label  truth`."""
    truth = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise TruthError(f"data.truth: cannot read {path} ({exc.strerror or exc}); fix the path or set data.truth=null") from None
    for lineno, line in enumerate(lines[1:], 2):
        parts = line.split("\t")
        if len(parts) != 3 or not (parts[2] == "ood" or parts[2].isdigit()):
            raise TruthError(f"data.truth: {path}:{lineno}: expected 'path<TAB>web_label<TAB>class id or ood'")
        truth[parts[0]] = OOD if parts[2] == "ood" else int(parts[2])
    return truth


def truth_by_index(shards: Path | str, split: str, truth_tsv: Path) -> torch.Tensor:
    """Tensor (num_listed,) of clean labels by sample index: -1 = OOD, -2 = not in truth.tsv.

    Reads only the small `.json` member of each sample (the path), never the images.
    """
    if is_url(shards):
        raise ManifestError(f"data.truth reads the samples' paths from local shards, and data.shards is {shards}: "
                            f"set data.truth=null, or train from a local copy of the shards")
    manifest = json.loads((Path(shards) / "manifest.json").read_text())["splits"][split]
    by_path = read_truth_tsv(truth_tsv)
    out = torch.full((manifest["num_listed"],), UNKNOWN, dtype=torch.long)
    for shard in manifest["shards"]:
        with tarfile.open(Path(shards) / shard["file"], "r:") as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    out[meta["index"]] = by_path.get(meta["path"], UNKNOWN)
    return out
