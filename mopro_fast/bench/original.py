"""The yardsticks of `mopro-fast bench loader --baseline original`: the original code's data path and
the decode-only ceiling, fed from the same images as the backends.

- `original`: what the MoPro authors' code does per training sample (salesforce/MoPro,
  DataLoader/dataloader.py: `webvision_dataset` + `webvision_dataloader`): a map-style dataset over
  a WebVision-style file list of loose JPEGs, `PIL.Image.open(path).convert('RGB')`, then two
  independent torchvision (v1, PIL) pipelines, weak = RandomResizedCrop(scale 0.2-1) + flip +
  ToTensor + Normalize and strong = RandomResizedCrop + RandomGrayscale(0.2) +
  ColorJitter(0.4, 0.4, 0.4, 0.4) + flip + ToTensor + Normalize, in a DataLoader with shuffling,
  `drop_last` and its worker processes. Re-implemented here from that description (not copied); the
  loose files are the shards' own JPEG bytes, written out once (`write_loose`), so every path
  decodes the same images.
- `decode-only`: the limit to aim at: every image decoded once with libjpeg-turbo
  (`torchvision.io.decode_jpeg`), nothing else, in as many worker processes as the backends get.
  Each worker returns only a count, so no pixels cross a process boundary.

Both are `torch.utils.data.DataLoader`s that yield one item per batch of `batch_size` samples, timed
by `bench.loader.measure` exactly as the backends' loaders are.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

FILELIST = "info/train_filelist_google.txt"  # WebVision 1.0's name for the Google half of the training list
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def write_loose(shards: Path, split: str, root: Path) -> Path:
    """Write the JPEGs of `split` in `shards` as a WebVision-style folder under `root`:
    `google/qNNNN/<key>.jpg` (the stored bytes, unchanged) and `info/train_filelist_google.txt`
    (`path label` per line). Returns `root`."""
    from data_tools.shards import read_samples
    from mopro_fast.data.manifest import read_manifest

    lines = []
    for info in read_manifest(shards).shards(split):
        for key, fields in read_samples(info.path):
            label = int.from_bytes(fields["lbl"], "little", signed=True)
            rel = f"google/q{label:04d}/{Path(key).name}.jpg"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(fields["jpg"])
            lines.append(f"{rel} {label}\n")
    (root / FILELIST).parent.mkdir(parents=True, exist_ok=True)
    (root / FILELIST).write_text("".join(lines))
    return root


def original_transforms(resolution: int):
    """(weak, strong): the original's two torchvision v1 pipelines on PIL images (module docstring)."""
    import torchvision.transforms as T

    normalize = T.Normalize(mean=MEAN, std=STD)
    weak = T.Compose([T.RandomResizedCrop(resolution, scale=(0.2, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(),
                      normalize])
    strong = T.Compose([T.RandomResizedCrop(resolution, scale=(0.2, 1.0)), T.RandomGrayscale(p=0.2),
                        T.ColorJitter(0.4, 0.4, 0.4, 0.4), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    return weak, strong


class OriginalWebVision(Dataset):
    """The original's training dataset: (weak view, label, strong view) of one loose JPEG via PIL."""

    def __init__(self, root: Path, resolution: int):
        self.root = Path(root)
        self.items = [(path, int(label)) for path, label in
                      (line.split() for line in (self.root / FILELIST).read_text().splitlines())]
        self.weak, self.strong = original_transforms(resolution)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        from PIL import Image

        path, label = self.items[index]
        image = Image.open(self.root / path).convert("RGB")
        return self.weak(image), label, self.strong(image)  # 3 x res x res float32 (normalised), int, same


class _DecodeOnly(Dataset):
    """Batch b of JPEG byte strings -> how many decoded; the decode is the only work."""

    def __init__(self, jpegs: list[bytes], batch_size: int):
        self.jpegs, self.batch_size = jpegs, batch_size

    def __len__(self) -> int:
        return len(self.jpegs) // self.batch_size

    def __getitem__(self, b: int) -> int:
        from torchvision.io import ImageReadMode, decode_jpeg

        for jpeg in self.jpegs[b * self.batch_size:(b + 1) * self.batch_size]:
            decode_jpeg(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8), mode=ImageReadMode.RGB)
        return self.batch_size


def _repeat(loader: DataLoader, steps: int):
    """`steps` batches, cycling over `loader`'s epochs (reshuffled each time) as a training run would;
    the workers are shut down when the last batch has been taken."""
    done, it = 0, None
    try:
        while done < steps:
            it = iter(loader)
            for batch in it:
                yield batch
                done += 1
                if done == steps:
                    return
    finally:
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


def original_batches(root: Path, resolution: int, batch_size: int, workers: int, steps: int, seed: int = 0):
    """`steps` training batches of the original's data path (weak B x 3 x res x res, labels B, strong)."""
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(OriginalWebVision(root, resolution), batch_size=batch_size, shuffle=True, drop_last=True,
                        num_workers=workers, generator=generator, persistent_workers=workers > 0)
    return _repeat(loader, steps)


def jpegs_of(root: Path) -> list[bytes]:
    """The bytes of every file of the loose folder's list, in list order."""
    return [(root / line.split()[0]).read_bytes() for line in (root / FILELIST).read_text().splitlines()]


def decode_only_batches(jpegs: list[bytes], batch_size: int, workers: int, steps: int):
    """`steps` batches of `batch_size` decodes each (the count of each), in `workers` processes."""
    loader = DataLoader(_DecodeOnly(jpegs, batch_size), batch_size=None, shuffle=False, num_workers=workers,
                        persistent_workers=workers > 0)
    return _repeat(loader, steps)

