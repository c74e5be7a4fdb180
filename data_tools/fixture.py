"""A small synthetic data set laid out like WebVision 1.0 (DESIGN.md section 2), or like 2.0.

``layout="2.0"`` is WebVision 2.0's shape: the same info/ files, up to 5,000 classes, five-digit
query folders (``q00001``; 2.0 has 12,597 queries) and no ImageNet-1k eval split (its classes are
not the ILSVRC-2012 ones). Classes beyond 2520 repeat the drawing of class ``c mod 2520``: such a
fixture checks listing, conversion and training at 5,000 classes, not what a model can learn.

Class c is a drawn object: shape ``c mod 9``, hue ``c mod 8``, fill pattern ``c mod 5``, edge colour
``c mod 7``. The moduli are pairwise coprime, so (Chinese remainder theorem) the first 2520 classes are
distinct and neighbouring ids differ in every attribute: small fixtures stay learnable at 32 px.
With ``hue_coded=False`` the hue is drawn per image instead, so colour is a nuisance as in photos
(the strong view's hue jitter then cannot destroy the class cue), and shape, pattern and edge
(315 combinations) carry the class.
Random position, size (30-70% of the shorter side), rotation (at most 20 degrees: a square never
becomes a diamond), low-saturation gradient background, luma noise. Out-of-distribution images show
self-crossing blobs, scribbles or smooth colour noise, never a class shape.

Training lists mimic a web crawl: each class (query) lists exactly ``train_per_class`` images;
a fraction ``noise`` of all listed images shows another class and a fraction ``ood`` shows no
class. The other class is drawn uniformly (symmetric noise), except for a share ``pair`` of the
flipped images, which show the query's one confusable class ``(c + 1) mod K`` (structured noise,
as when a web search for one class keeps returning a related one). Counts are ``round(fraction * N)`` over the whole list, so the truth
fractions match the spec to within 1/N. ``truth.tsv`` records the content of every listed image.

Each image draws from its own ``numpy.random.default_rng([seed, split, index])``: the output does not
depend on generation order or thread count, and the same spec gives a byte-identical tree (for a
given Pillow/libjpeg build; no timestamps anywhere).

Planted broken records (``corrupt=True``): one of each kind, listed in the Google list under
ordinary paths and labels, and in ``truth.tsv`` with their (nominal) class. What is on disk, and
what the converter is expected to do (reasons as in ``data_tools/imaging.py``):

- ``png_as_jpg`` / ``gif_as_jpg``: valid PNG / GIF bytes of the class behind a .jpg name -> repair
  (decode, re-encode as RGB JPEG);
- ``cmyk`` / ``grayscale``: valid CMYK / mode-'L' JPEG of the class -> repair (convert to RGB);
- ``truncated``: the first half of a JPEG -> reject (``truncated``);
- ``empty``: a zero-byte file -> reject (``empty_file``); ``missing``: listed, not on disk -> ``missing_file``;
- ``huge``: a real 20000 x 20000 baseline JPEG (flat grey, quality 10: ~4.7 MB, ~1 s and ~400 MB
  peak to write) -> reject (``too_large``) from the header alone. Pillow itself refuses to open it
  (``DecompressionBombError``: 4e8 pixels > 2 x ``Image.MAX_IMAGE_PIXELS``); its class is nominal.
"""

from __future__ import annotations

import colorsys
import io
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw

# Per shape, a function that is < 1 inside and grows ~linearly outside, in units of the radius, so
# (1 - gauge) * radius approximates the distance to the edge in pixels: that gives anti-aliasing and
# the edge band for free. A union of parts is the min of their gauges. v points down (image rows).
GAUGES = {
    "circle": lambda u, v: np.hypot(u, v),
    "square": lambda u, v: np.maximum(abs(u), abs(v)) / 0.8,
    "triangle": lambda u, v: np.maximum(v, 0.866 * abs(u) - 0.5 * v) / 0.5,  # apex up, inradius 0.5
    "cross": lambda u, v: np.minimum(np.maximum(abs(u) / 0.3, abs(v)), np.maximum(abs(u), abs(v) / 0.3)),
    "ring": lambda u, v: abs(np.hypot(u, v) - 0.72) / 0.28,
    "star": lambda u, v: _star(np.hypot(u, v), v),
    "diamond": lambda u, v: abs(u) + abs(v),
    "bar": lambda u, v: np.maximum(abs(u), abs(v) / 0.35),
    "hexagon": lambda u, v: np.maximum(abs(v), 0.866 * abs(u) + 0.5 * abs(v)) / 0.866,  # flat top
}
SHAPES = tuple(GAUGES)


def _star(rho: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Five-pointed star, a point up: radius 0.62 - 0.33 sin(5 theta); sin(5t) as a polynomial in
    sin(t) = v / rho, which is several times cheaper than arctan2 + cos."""
    s = v / np.maximum(rho, 1e-6)
    s2 = s * s
    return rho / (0.62 - 0.33 * s * (16 * s2 * s2 - 20 * s2 + 5))
HUES = {"red": 0, "orange": 30, "yellow": 58, "green": 120, "cyan": 185, "blue": 228, "purple": 275, "magenta": 318}
PATTERNS = ("plain", "hstriped", "vstriped", "dotted", "checked")
EDGES = ("", "white", "black", "grey", "dark", "light", "inverse")
MAX_CLASSES = len(SHAPES) * len(HUES) * len(PATTERNS) * len(EDGES)  # 2520, see module docstring
MAX_CLASSES_NO_HUE = len(SHAPES) * len(PATTERNS) * len(EDGES)  # 315: shape, pattern and edge only
WEBVISION2_CLASSES = 5000  # layout "2.0": classes allowed (drawings repeat beyond MAX_CLASSES)
LAYOUTS = ("1.0", "2.0")
CORRUPT_KINDS = ("truncated", "png_as_jpg", "gif_as_jpg", "cmyk", "grayscale", "empty", "missing", "huge")
HUGE_SIDE = 20000
_TRAIN, _VAL, _IMAGENET, _CORRUPT, _PLAN = range(5)  # seed-key namespaces: one rng stream per split


@dataclass(frozen=True)
class FixtureSpec:
    """What to generate. All fractions are of the listed (non-planted) training images."""

    classes: int = 10
    train_per_class: int = 120  # images listed per web class (query), noisy ones included
    val_per_class: int = 20  # WebVision val images per class, clean labels
    imagenet_per_class: int = 20  # ImageNet-val-style images per class, clean labels
    image_size: int = 64  # base shorter side (px); train/ImageNet vary 0.8-1.25x, aspect 3/4-4/3
    noise: float = 0.2  # content of another class, listed under this label
    pair: float = 0.0  # share of the flipped images showing the confusable class (c + 1) mod K, not a uniform one
    ood: float = 0.1  # content of no class
    flickr: float = 0.3  # share from the flickr source, the rest is google
    seed: int = 0
    corrupt: bool = False  # also plant one broken record of each CORRUPT_KINDS
    hue_coded: bool = True  # False: the object's hue is drawn per image (a nuisance, as colour is in photos)
    layout: str = "1.0"  # "2.0": WebVision 2.0's shape (module docstring)

    def validate(self) -> None:
        """Raise ValueError with one clear line for a spec that cannot be generated."""
        top = WEBVISION2_CLASSES if self.layout == "2.0" else MAX_CLASSES
        for ok, msg in [
            (self.layout in LAYOUTS, f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}"),
            (1 <= self.classes <= top, f"classes must be in 1..{top} (layout {self.layout}), got {self.classes}"),
            (self.layout != "2.0" or self.imagenet_per_class == 0,
             "layout 2.0 has no ImageNet-1k eval split: imagenet_per_class must be 0"),
            (min(self.train_per_class, self.val_per_class, self.imagenet_per_class, self.seed) >= 0,
             "per-class counts and seed must be >= 0"),
            (self.image_size >= 16, f"image_size must be >= 16, got {self.image_size}"),
            (all(0 <= x <= 1 for x in (self.noise, self.pair, self.ood, self.flickr)),
             "noise, pair, ood, flickr must be in [0, 1]"),
            (self.noise + self.ood <= 1, f"noise + ood must be <= 1, got {self.noise + self.ood}"),
            (self.noise == 0 or self.classes >= 2, "label noise needs at least 2 classes"),
            (self.hue_coded or self.layout == "2.0" or self.classes <= MAX_CLASSES_NO_HUE,
             f"without hue coding at most {MAX_CLASSES_NO_HUE} classes are distinct, got {self.classes}"),
        ]:
            if not ok:
                raise ValueError(msg)


@dataclass(frozen=True)
class FixtureSummary:
    """Counts of what was written. clean + flipped + ood = regular training images;
    train_google + train_flickr = those plus the planted records (all in the google list)."""

    root: str
    classes: int
    train_google: int  # lines in train_filelist_google.txt
    train_flickr: int  # lines in train_filelist_flickr.txt
    clean: int
    flipped: int
    ood: int
    val: int
    imagenet_val: int
    corrupt: dict[str, int] = field(default_factory=dict)  # kind -> planted count

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Job:
    path: str  # relative to the root
    content: int  # class id, -1 = out of distribution
    key: tuple[int, int]  # (split, index): seeds this image's rng
    kind: str = "jpeg"  # "jpeg" or a corrupt kind
    fixed_short: bool = False  # val_images_256 style: shorter side exactly image_size


def class_name(c: int) -> str:
    """Human-readable class name, e.g. 'red_plain_circle' or 'green_dotted_star_black_edge'."""
    hue = list(HUES)[c % len(HUES)]
    edge = EDGES[c % len(EDGES)]
    return f"{hue}_{PATTERNS[c % len(PATTERNS)]}_{SHAPES[c % len(SHAPES)]}" + (f"_{edge}_edge" if edge else "")


def wnid(c: int) -> str:
    """Fake WordNet id for class c (real ones are n0..., these cannot collide)."""
    return "n%08d" % (90000000 + c)


def _size(rng: np.random.Generator, base: int, fixed_short: bool) -> tuple[int, int]:
    short = base if fixed_short else int(round(base * rng.uniform(0.8, 1.25)))
    long = int(round(short * rng.uniform(1.0, 4 / 3)))
    return (long, short) if rng.random() < 0.5 else (short, long)  # (width, height)


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Low-saturation two-colour gradient in a random direction."""
    c0, c1 = (255 * np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, 0.3), rng.uniform(0.2, 0.95))) for _ in "01")
    a = rng.uniform(0, 2 * np.pi)
    # A linear ramp survives bilinear upsampling, so draw it on a 16x16 grid and let PIL scale it.
    g = np.linspace(0, 1, 16)
    t = np.cos(a) * g[None, :] + np.sin(a) * g[:, None]
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    low = (c0 + t[..., None] * (c1 - c0)).astype(np.uint8)
    return Image.fromarray(low, "RGB").resize((w, h), Image.BILINEAR)


def _mask(x: np.ndarray) -> Image.Image:
    return Image.fromarray((255 * np.clip(x, 0, 1)).astype(np.uint8), "L")


def _draw_object(im: Image.Image, rng: np.random.Generator, c: int, hue_coded: bool = True) -> None:
    """Paint the object of class c into im (in place); its hue is the class's, or any (`hue_coded=False`)."""
    w, h = im.size
    r = rng.uniform(0.15, 0.35) * min(h, w)  # diameter 30-70% of the shorter side
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    phi = math.radians(rng.uniform(-20, 20))
    hue = list(HUES.values())[c % len(HUES)] + rng.uniform(-8, 8) if hue_coded else rng.uniform(0, 360)
    col = 255 * np.array(colorsys.hsv_to_rgb((hue / 360) % 1, rng.uniform(0.75, 1), rng.uniform(0.75, 1)), np.float32)
    # Work in the object's bounding box only: most pixels are background.
    x0, y0 = max(0, int(cx - 1.3 * r)), max(0, int(cy - 1.3 * r))
    dx = ((np.arange(x0, min(w, int(cx + 1.3 * r) + 1), dtype=np.float32) + 0.5 - cx) / r)[None, :]
    dy = ((np.arange(y0, min(h, int(cy + 1.3 * r) + 1), dtype=np.float32) + 0.5 - cy) / r)[:, None]
    # Python-float coefficients keep the arrays float32 (a numpy float64 scalar would promote them).
    cos, sin = math.cos(phi), math.sin(phi)
    u, v = dx * cos + dy * sin, dy * cos - dx * sin  # object frame, radius 1
    inside = (1 - GAUGES[SHAPES[c % len(SHAPES)]](u, v)) * r  # ~ px distance to the edge
    edge = EDGES[c % len(EDGES)]
    if edge:  # a band 0.18 r wide outside the shape
        ecol = {"white": np.full(3, 245.0), "black": np.full(3, 15.0), "grey": np.full(3, 128.0),
                "dark": 0.35 * col, "light": 0.4 * col + 0.6 * 255, "inverse": 255 - col}[edge]
        im.paste(tuple(int(x) for x in ecol), (x0, y0), _mask(inside + 0.18 * r + 0.5))
    alpha = np.clip(inside + 0.5, 0, 1)
    im.paste(tuple(int(x) for x in col), (x0, y0), _mask(alpha))
    k = 2.2  # pattern cycles per radius: still ~3 stripes across when downsampled to 32 px
    pattern = PATTERNS[c % len(PATTERNS)]
    if pattern == "plain":
        return
    if pattern == "dotted":
        fu, fv = u * k - np.floor(u * k) - 0.5, v * k - np.floor(v * k) - 0.5  # x - floor(x): cheaper than % 1
        p = fu * fu + fv * fv < 0.1
    else:  # stripes across v or u, or both for a checkerboard
        p = (np.floor(v * k) * (pattern != "vstriped") + np.floor(u * k) * (pattern != "hstriped")).astype(np.int32) & 1
    im.paste(tuple(int(x) for x in col // 2), (x0, y0), _mask(alpha * p))  # pattern: a darker shade of the hue


def _draw_ood(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Content of no class: irregular blobs, scribbles, or smooth colour noise."""
    w, h = im.size
    kind = rng.integers(3)
    if kind == 2:  # smooth noise texture over the whole image, blended strongly
        low = rng.integers(0, 256, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3), dtype=np.uint8)
        tex = Image.fromarray(low).resize((w, h), Image.BICUBIC)
        return Image.blend(im, tex, float(rng.uniform(0.6, 0.9)))
    draw = ImageDraw.Draw(im)
    s = min(w, h)
    for _ in range(int(rng.integers(2, 6))):
        fill = tuple(int(x) for x in rng.integers(0, 256, 3))
        start = rng.uniform(0, 1, 2) * (w, h)
        if kind == 0:  # self-crossing polygon from a random walk: no convex class shape
            pts = start + np.cumsum(rng.normal(0, 0.12 * s, (int(rng.integers(9, 16)), 2)), axis=0)
            draw.polygon([tuple(p) for p in pts], fill=fill)
        else:  # scribble
            pts = start + np.cumsum(rng.normal(0, 0.2 * s, (int(rng.integers(3, 8)), 2)), axis=0)
            draw.line([tuple(p) for p in pts], fill=fill, width=max(1, int(rng.uniform(0.02, 0.06) * s)))
    return im


def render(rng: np.random.Generator, content: int, base: int, fixed_short: bool = False,
           hue_coded: bool = True) -> Image.Image:
    """One RGB image of class `content` (or OOD content when -1)."""
    w, h = _size(rng, base, fixed_short)
    im = _background(rng, w, h)
    if content >= 0:
        _draw_object(im, rng, content, hue_coded)
    else:
        im = _draw_ood(im, rng)
    # Sensor-like luma noise, added in uint8 by PIL: out = im + (noise + 128) - 128, clipped.
    amp = int(rng.integers(3, 13))  # uniform, not Gaussian: one cheap call straight to uint8
    n = Image.fromarray(rng.integers(128 - amp, 129 + amp, (h, w), dtype=np.uint8), "L")
    return ImageChops.add(im, Image.merge("RGB", (n, n, n)), offset=-128)


def _write(root: Path, spec: FixtureSpec, job: _Job) -> None:
    """Render and write one file; everything random comes from the job's own rng."""
    rng = np.random.default_rng([spec.seed, *job.key])
    dest = root / job.path
    if job.kind in ("missing", "empty"):  # nothing on disk, or zero bytes
        if job.kind == "empty":
            dest.write_bytes(b"")
        return
    if job.kind == "huge":  # flat grey: cheap to encode, still a real baseline JPEG of 20000x20000
        Image.new("L", (HUGE_SIDE, HUGE_SIDE), int(rng.integers(60, 200))).save(dest, "JPEG", quality=10)
        return
    im = render(rng, job.content, spec.image_size, job.fixed_short, spec.hue_coded)
    quality = int(rng.integers(75, 96))  # web JPEGs come at mixed qualities
    buf = io.BytesIO()
    if job.kind == "png_as_jpg":
        im.save(buf, "PNG")
    elif job.kind == "gif_as_jpg":
        im.convert("P", palette=Image.ADAPTIVE).save(buf, "GIF")
    else:
        mode = {"cmyk": "CMYK", "grayscale": "L"}.get(job.kind, "RGB")
        im.convert(mode).save(buf, "JPEG", quality=quality)
    data = buf.getvalue()
    dest.write_bytes(data[: len(data) // 2] if job.kind == "truncated" else data)


def _plan(spec: FixtureSpec) -> tuple[list[_Job], list[tuple[str, int, int, str]]]:
    """All jobs plus the training rows (path, listed label, content, source/kind tag)."""
    K, P = spec.classes, spec.train_per_class
    n = K * P
    g = np.random.default_rng([spec.seed, _PLAN])
    label = np.repeat(np.arange(K), P)  # each query lists P images
    content = label.copy()
    order = g.permutation(n)
    n_flip, n_ood = round(spec.noise * n), round(spec.ood * n)
    flip = order[:n_flip]
    offset = g.integers(1, max(K, 2), n_flip)  # uniform over the other classes
    if spec.pair > 0:  # own stream, so that pair=0 keeps the symmetric fixtures byte-identical
        offset[np.random.default_rng([spec.seed, _PLAN, 1]).permutation(n_flip)[: round(spec.pair * n_flip)]] = 1
    content[flip] = (label[flip] + offset) % K
    content[order[n_flip : n_flip + n_ood]] = -1
    flickr = np.zeros(n, bool)
    flickr[g.permutation(n)[: round(spec.flickr * n)]] = True
    query = 2 * label + 1 + g.integers(0, 2, n)  # two queries per class, 1-based
    counters: dict[tuple[str, int], int] = {}

    digits = 5 if spec.layout == "2.0" else 4  # query folders: q0001 (1.0, 1,632 queries), q00001 (2.0, 12,597)

    def next_path(src: str, q: int) -> str:
        counters[src, q] = counters.get((src, q), 0) + 1
        return f"{src}/q{q:0{digits}d}/{counters[src, q]:06d}.jpg"

    jobs, rows = [], []
    for i in range(n):
        src = "flickr" if flickr[i] else "google"
        path = next_path(src, int(query[i]))
        jobs.append(_Job(path, int(content[i]), (_TRAIN, i)))
        rows.append((path, int(label[i]), int(content[i]), src))
    if spec.corrupt:
        for k, kind in enumerate(CORRUPT_KINDS):
            y = int(g.integers(K))
            path = next_path("google", 2 * y + 1 + int(g.integers(2)))
            jobs.append(_Job(path, y, (_CORRUPT, k), kind))
            rows.append((path, y, y, kind))
    for i in range(K * spec.val_per_class):
        jobs.append(_Job(f"val_images_256/val{i + 1:06d}.jpg", i // spec.val_per_class, (_VAL, i), fixed_short=True))
    for i in range(K * spec.imagenet_per_class):
        c = i // spec.imagenet_per_class
        jobs.append(_Job(f"imagenet_val/{wnid(c)}/ILSVRC2012_val_{i + 1:08d}.JPEG", c, (_IMAGENET, i)))
    return jobs, rows


def make_fixture(out: Path, spec: FixtureSpec, progress: bool = False, workers: int | None = None) -> FixtureSummary:
    """Write the WebVision-shaped fixture for `spec` into `out` (must not exist or be empty).

    `workers` threads render in parallel (default: up to 8 CPUs when the job is big); numpy and the
    JPEG encoder release the GIL. The output does not depend on it.
    """
    spec.validate()
    root = Path(out)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists and is not empty")
    K = spec.classes
    jobs, rows = _plan(spec)
    for d in {str(Path(j.path).parent) for j in jobs} | {"info"}:
        (root / d).mkdir(parents=True, exist_ok=True)
    lines = lambda items: "".join(f"{a} {b}\n" for a, b in items)  # noqa: E731
    info = root / "info"
    # (beyond 2520 classes, layout 2.0, a drawing repeats: the name gets the repeat number)
    names = (class_name(c) + (f"_{c // MAX_CLASSES}" if c >= MAX_CLASSES else "") for c in range(K))
    (info / "synsets.txt").write_text(lines(zip((wnid(c) for c in range(K)), names)))
    (info / "queries_synsets_map.txt").write_text(lines((q, (q - 1) // 2) for q in range(1, 2 * K + 1)))
    google = sorted((p, y) for p, y, _, src in rows if src != "flickr")
    flickr = sorted((p, y) for p, y, _, src in rows if src == "flickr")
    (info / "train_filelist_google.txt").write_text(lines(google))
    (info / "train_filelist_flickr.txt").write_text(lines(flickr))
    val = [(Path(j.path).name, j.content) for j in jobs if j.key[0] == _VAL]
    (info / "val_filelist.txt").write_text(lines(val))
    truth = {p: ("ood" if c < 0 else str(c)) for p, _, c, _ in rows}
    (root / "truth.tsv").write_text("path\tweb_label\ttruth\n" + "".join(f"{p}\t{y}\t{truth[p]}\n" for p, y in google + flickr))
    corrupt = [(p, src) for p, _, _, src in rows if src in CORRUPT_KINDS]
    if spec.corrupt:
        (root / "corrupt.tsv").write_text("path\tkind\n" + "".join(f"{p}\t{k}\n" for p, k in corrupt))
    if workers is None:  # threads only pay off once numpy and libjpeg work on big arrays
        workers = min(8, os.cpu_count() or 1) if len(jobs) * spec.image_size**2 > 2000 * 96**2 else 1
    from tqdm import tqdm

    with ThreadPoolExecutor(max(1, workers)) as pool, tqdm(total=len(jobs), unit="img", disable=not progress) as bar:
        for start in range(0, len(jobs), 4096):  # bounded number of pending futures on big fixtures
            for _ in pool.map(lambda j: _write(root, spec, j), jobs[start : start + 4096]):
                bar.update()

    # README.txt last: its presence means the tree is complete (the demo reuses only such a tree).
    (root / "README.txt").write_text(
        f"Synthetic WebVision-{spec.layout}-shaped fixture written by mopro-fast (data_tools/fixture.py).\n"
        "Classes are drawn shapes; truth.tsv holds the true content of every listed training image.\n"
        f"seed: {spec.seed}\nspec: {json.dumps(asdict(spec), sort_keys=True)}\n"
    )

    regular = [(y, c) for _, y, c, src in rows if src not in CORRUPT_KINDS]
    return FixtureSummary(
        root=str(root), classes=K, train_google=len(google), train_flickr=len(flickr),
        clean=sum(c == y for y, c in regular), flipped=sum(0 <= c != y for y, c in regular),
        ood=sum(c < 0 for _, c in regular), val=len(val), imagenet_val=K * spec.imagenet_per_class,
        corrupt={k: 1 for _, k in corrupt},
    )


def written_spec(root: Path) -> FixtureSpec | None:
    """The spec a complete fixture folder was written with (README.txt is written last), or None."""
    try:
        line = next(l for l in (Path(root) / "README.txt").read_text().splitlines() if l.startswith("spec: "))
        return FixtureSpec(**json.loads(line[len("spec: "):]))
    except (OSError, StopIteration, ValueError, TypeError):
        return None
