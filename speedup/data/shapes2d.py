"""Shapes-2D: a procedural, download-free image classification set with spatial structure.

Each image shows one shape (the class: disk, ring, square, triangle, ...) drawn at a random
position, scale, rotation and mirroring, in a random colour, over a textured gradient
background, with distractor strokes and blobs behind and in front of it, and pixel noise.
Nothing is downloaded and no file is read: the images are rasterised from signed distance
functions, with anti-aliased edges, at any resolution (32x32 and up; the same parameters
give the same scene at every resolution (up to pixel noise), so a low-resolution set is a
blurred copy of a high-resolution one, which is what progressive resizing assumes).

The task is built so that it needs spatial features, not colour statistics: the class is
independent of every colour, of the position and of the orientation; a linear model on the
pixels is near chance while a small CNN learns it over several epochs and stays clearly
below 100% (``difficulty`` scales clutter, noise, contrast and scale range; 0 gives clean
shapes on a plain gradient). See ``tests/test_shapes2d.py`` for the measured gap.

Rendering of one split (all randomness from ``numpy.random.default_rng`` seeded by
``(seed, split)``, and torch generators seeded from it for per-pixel noise)::

    labels: a shuffled, exactly balanced list of classes
    background: linear gradient between two random colours + smooth colour texture
    3 strokes behind the shape (each present with a probability that grows with difficulty)
    the shape: signed distance of the class's template in rotated, scaled local coordinates,
               filled with a shaded random colour that keeps a minimum contrast
    2 strokes and 2 blobs in front of it (occluders)
    gaussian pixel noise, clamp to [0, 1], round to uint8

Train and test splits come from independent random streams, so the test set does not
change when ``num_train`` does.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from speedup.data.cache import default_cache_dir, save_to_cache
from speedup.data.loaders import DataInfo, DataSplits, TensorDictDataset
from speedup.data.registry import DATASETS

__all__ = [
    "CLASS_NAMES",
    "BatchToFloat",
    "Shapes2DDataset",
    "default_cache_dir",
    "generate_shapes2d",
    "load_shapes2d",
    "shapes2d",
]

_VERSION = 1  # bump when the generator changes: invalidates caches

CLASS_NAMES: tuple[str, ...] = (
    "disk",
    "ring",
    "square",
    "triangle",
    "cross",
    "star",
    "ellipse",
    "two_blobs",
    "chevron",
    "checker",
    "crescent",
    "hollow_square",
    "three_dots",
    "tee",
    "half_disk",
    "hollow_triangle",
)
MAX_CLASSES = len(CLASS_NAMES)

# Pixels rendered per chunk (samples x R x R); bounds peak memory to some hundred MB.
_CHUNK_PIXELS = 1 << 22


# -- signed distance functions in local shape coordinates (shape fills about |p| <= 1) -------


def _length(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.hypot(u, v)


def _box(u: torch.Tensor, v: torch.Tensor, hu: Any, hv: Any) -> torch.Tensor:
    """Exact signed distance to an axis-aligned box of half sizes ``hu``, ``hv``."""
    du, dv = u.abs() - hu, v.abs() - hv
    outside = _length(du.clamp(min=0), dv.clamp(min=0))
    inside = torch.maximum(du, dv).clamp(max=0)
    return outside + inside


def _triangle(u: torch.Tensor, v: torch.Tensor, inradius: float = 0.5) -> torch.Tensor:
    """Equilateral triangle (apex up, circumradius ``2 * inradius``): max of 3 half-planes."""
    d = v.neg() - inradius  # bottom edge, normal (0, -1)
    for angle in (math.pi / 6, 5 * math.pi / 6):  # the two slanted edges
        d = torch.maximum(d, u * math.cos(angle) + v * math.sin(angle) - inradius)
    return d


def _segment(u: torch.Tensor, v: torch.Tensor, a: Any, b: Any, radius: Any) -> torch.Tensor:
    """Capsule around the segment a-b (a, b: pairs of scalars or per-sample tensors)."""
    au, av = a
    bu, bv = b
    eu, ev = bu - au, bv - av
    pu, pv = u - au, v - av
    inv = 1.0 / (eu * eu + ev * ev + 1e-12)
    h = (pu * (eu * inv) + pv * (ev * inv)).clamp_(0.0, 1.0)
    return torch.hypot(pu - h * eu, pv - h * ev).sub_(radius)


def _shape_sdf(label: int, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance (local units) of class ``label``; ``r`` in [0, 1] varies the shape."""
    if label == 0:  # disk
        return _length(u, v) - 0.9
    if label == 1:  # ring
        return (_length(u, v) - 0.75).abs() - (0.12 + 0.08 * r)
    if label == 2:  # square
        return _box(u, v, 0.75, 0.75)
    if label == 3:  # triangle
        return _triangle(u, v + 0.15)
    if label == 4:  # cross (plus)
        arm = 0.2 + 0.1 * r
        return torch.minimum(_box(u, v, 0.9, arm), _box(u, v, arm, 0.9))
    if label == 5:  # five-pointed star (polar radius with sharpened lobes)
        theta = torch.atan2(v, u)
        radius = 0.4 + 0.55 * torch.cos(2.5 * theta).abs().pow(3)
        return (_length(u, v) - radius) * 0.7
    if label == 6:  # fat ellipse; approximate distance, exact on the axes
        b = 0.4 + 0.15 * r
        return (_length(u / 0.95, v / b) - 1.0) * b
    if label == 7:  # two blobs
        rad = 0.3 + 0.1 * r
        return torch.minimum(_length(u - 0.5, v) - rad, _length(u + 0.5, v) - rad)
    if label == 8:  # chevron (an upside-down V)
        w = 0.14 + 0.06 * r
        top = (0.0, 0.45)
        return torch.minimum(
            _segment(u, v, (-0.65, -0.45), top, w), _segment(u, v, (0.65, -0.45), top, w)
        )
    if label == 9:  # 3x3 checkerboard patch
        k = math.pi / (1.6 / 3)
        field = torch.sin(k * (u + 0.8)) * torch.sin(k * (v + 0.8))
        return torch.maximum(_box(u, v, 0.8, 0.8), -field / k)
    if label == 10:  # crescent
        return torch.maximum(_length(u, v) - 0.9, 0.7 - _length(u - 0.45 - 0.1 * r, v))
    if label == 11:  # hollow square
        return _box(u, v, 0.7, 0.7).abs() - (0.12 + 0.06 * r)
    if label == 12:  # three dots on a triangle
        rad = 0.24 + 0.06 * r
        d = None
        for k in range(3):
            angle = math.pi / 2 + 2 * math.pi * k / 3
            dk = _length(u - 0.62 * math.cos(angle), v - 0.62 * math.sin(angle)) - rad
            d = dk if d is None else torch.minimum(d, dk)
        return d
    if label == 13:  # T shape
        w = 0.16 + 0.06 * r
        return torch.minimum(_box(u, v - 0.65, 0.85, w), _box(u, v + 0.1, w, 0.75))
    if label == 14:  # half disk, centred on its centroid
        vv = v + 0.35
        return torch.maximum(_length(u, vv) - 0.95, -vv)
    if label == 15:  # hollow triangle
        return _triangle(u, v + 0.2, inradius=0.55).abs() - (0.1 + 0.05 * r)
    raise ValueError(f"no shape for class {label}")


def _coverage(distance: torch.Tensor, pixels_per_unit: torch.Tensor) -> torch.Tensor:
    """Anti-aliased coverage from a signed distance: a one-pixel linear ramp at the edge."""
    return (0.5 - distance * pixels_per_unit).clamp(0.0, 1.0)


def _over(canvas: torch.Tensor, colour: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Alpha-composite ``colour`` [n, 3, 1|R, 1|R] with coverage ``alpha`` [n, R, R]."""
    return canvas.lerp_(colour.expand_as(canvas), alpha.unsqueeze(1))


def _col(x: np.ndarray) -> torch.Tensor:
    """Per-sample scalars as a float32 tensor broadcastable over [n, R, R]."""
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).view(-1, 1, 1)


def _rgb(x: np.ndarray) -> torch.Tensor:
    """Per-sample colours [n, 3] as [n, 3, 1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).view(-1, 3, 1, 1)


# -- scene parameters -------------------------------------------------------------------------


def _draw_parameters(
    rng: np.random.Generator, labels: np.ndarray, difficulty: float
) -> dict[str, np.ndarray]:
    """All per-sample random numbers of one split, drawn in a fixed order (the format)."""
    n = labels.shape[0]
    d = difficulty
    p: dict[str, np.ndarray] = {}
    # Background: two colours, a gradient direction, a texture amplitude.
    p["bg_a"] = rng.uniform(0.0, 1.0, (n, 3))
    p["bg_b"] = rng.uniform(0.0, 1.0, (n, 3))
    p["bg_angle"] = rng.uniform(0.0, 2 * math.pi, n)
    p["texture_amp"] = rng.uniform(0.0, 0.08, n) * d
    # The shape: scale (half size in [-1, 1] image units), centre, rotation, mirror, variant.
    smin = max(0.25, 0.5 - 0.1 * d)
    p["scale"] = rng.uniform(smin, 0.6, n)
    room = np.clip(0.95 - p["scale"] * (1.0 - 0.1 * min(d, 2.0)), 0.0, None)
    p["cx"] = rng.uniform(-1.0, 1.0, n) * room
    p["cy"] = rng.uniform(-1.0, 1.0, n) * room
    p["angle"] = rng.uniform(0.0, 2 * math.pi, n)
    p["mirror"] = np.where(rng.uniform(0.0, 1.0, n) < 0.5, -1.0, 1.0)
    p["variant"] = rng.uniform(0.0, 1.0, n)
    # Foreground colour, pushed away from the background colour under the shape.
    fg = rng.uniform(0.0, 1.0, (n, 3))
    min_contrast = max(0.15, 0.55 - 0.15 * d)
    p["min_contrast"] = np.full(n, min_contrast)
    p["fg_raw"] = fg
    p["fg_shade"] = rng.uniform(-0.2, 0.2, (n, 2)) * min(d, 2.0)
    # Distractors: 3 strokes behind, 2 strokes and 2 blobs in front.
    k = 7
    p["dis_on"] = rng.uniform(0.0, 1.0, (n, k)) < np.clip(
        np.array([0.3, 0.25, 0.2, 0.22, 0.18, 0.2, 0.15]) * d, 0.0, 1.0
    )
    p["dis_a"] = rng.uniform(-1.1, 1.1, (n, k, 2))
    p["dis_dir"] = rng.uniform(0.0, 2 * math.pi, (n, k))
    p["dis_len"] = rng.uniform(0.3, 1.2, (n, k))
    p["dis_width"] = rng.uniform(0.025, 0.07, (n, k))
    p["dis_blob"] = rng.uniform(0.06, 0.16, (n, k))
    p["dis_colour"] = rng.uniform(0.0, 1.0, (n, k, 3))
    p["noise_std"] = rng.uniform(0.5, 1.0, n) * 0.03 * d
    p["seeds"] = rng.integers(0, 2**62, size=1)
    return p


def _render_chunk(
    p: dict[str, np.ndarray], labels: np.ndarray, resolution: int, gen: torch.Generator
) -> torch.Tensor:
    """Render the samples whose parameters are in ``p`` (already sliced) as uint8 [n,3,R,R]."""
    n, res = labels.shape[0], resolution
    axis = (torch.arange(res, dtype=torch.float32) + 0.5) * (2.0 / res) - 1.0
    y = axis.view(1, res, 1)  # row index = image y (down)
    x = axis.view(1, 1, res)
    pixels_per_unit = res / 2.0

    # Background: gradient + smooth colour texture (bilinear upsampling of a 5x5 lattice).
    angle = _col(p["bg_angle"])
    t = (x * (0.5 * torch.cos(angle)) + (y * (0.5 * torch.sin(angle)) + 0.5)).clamp_(0, 1)
    bg_a = _rgb(p["bg_a"])
    canvas = torch.lerp(bg_a.expand(n, 3, res, res), _rgb(p["bg_b"]), t.unsqueeze(1))
    # Bilinear upsampling is linear: scale the lattice, not the full-size texture.
    lattice = torch.randn(n, 3, 5, 5, generator=gen) * _col(p["texture_amp"]).unsqueeze(1)
    canvas += F.interpolate(lattice, size=(res, res), mode="bilinear", align_corners=False)

    ppu = torch.tensor(pixels_per_unit)

    def distractor(canvas: torch.Tensor, j: int, is_blob: bool) -> torch.Tensor:
        """Composite distractor ``j`` onto the samples where it is present (only those)."""
        on = np.flatnonzero(p["dis_on"][:, j])
        if on.size == 0:
            return canvas
        a = p["dis_a"][on, j]
        au, av = _col(a[:, 0]), _col(a[:, 1])
        if is_blob:
            d = _length(x - au, y - av) - _col(p["dis_blob"][on, j])
        else:
            direction = p["dis_dir"][on, j]
            length = p["dis_len"][on, j]
            bu = _col(a[:, 0] + length * np.cos(direction))
            bv = _col(a[:, 1] + length * np.sin(direction))
            d = _segment(x, y, (au, av), (bu, bv), _col(p["dis_width"][on, j]))
        idx = torch.from_numpy(on)
        part = canvas[idx].lerp_(_rgb(p["dis_colour"][on, j]), _coverage(d, ppu).unsqueeze(1))
        canvas[idx] = part
        return canvas

    for j in range(3):
        canvas = distractor(canvas, j, is_blob=False)

    # The shape, in local coordinates: translate, rotate, mirror, scale.
    scale = _col(p["scale"])
    dx, dy = x - _col(p["cx"]), y - _col(p["cy"])  # [n, 1, R] and [n, R, 1]
    cos, sin = torch.cos(_col(p["angle"])) / scale, torch.sin(_col(p["angle"])) / scale
    mirror = _col(p["mirror"])
    u = dx * (cos * mirror) + dy * (sin * mirror)
    v = dx * sin - dy * cos  # v points up in the template
    variant = _col(p["variant"])
    alpha = torch.empty(n, res, res)
    for label in np.unique(labels).tolist():
        idx = torch.from_numpy(np.flatnonzero(labels == label))
        d = _shape_sdf(int(label), u[idx], v[idx], variant[idx])
        alpha[idx] = _coverage(d, scale[idx] * pixels_per_unit)
    shade = torch.from_numpy(p["fg_shade"].astype(np.float32))
    light = 1.0 + (u * shade[:, 0, None, None] + v * shade[:, 1, None, None]) * 0.5
    colour = _rgb(p["fg"]) * light.unsqueeze(1)
    canvas = _over(canvas, colour, alpha)

    for j in range(3, 7):
        canvas = distractor(canvas, j, is_blob=j >= 5)

    noise = torch.randn(n, 3, res, res, generator=gen)
    canvas += noise.mul_(_col(p["noise_std"]).unsqueeze(1))
    return canvas.mul_(255.0).clamp_(0.0, 255.0).round_().to(torch.uint8)


def _foreground(p: dict[str, np.ndarray]) -> np.ndarray:
    """Foreground colours at least ``min_contrast`` (RGB distance) from the background there."""
    t = np.clip(
        (p["cx"] * np.cos(p["bg_angle"]) + p["cy"] * np.sin(p["bg_angle"])) * 0.5 + 0.5, 0, 1
    )
    under = p["bg_a"] * (1 - t[:, None]) + p["bg_b"] * t[:, None]
    fg = p["fg_raw"]
    diff = fg - under
    dist = np.linalg.norm(diff, axis=1, keepdims=True)
    need = p["min_contrast"][:, None]
    # Too close: move along the difference (or away from grey) to the minimum distance.
    direction = np.where(dist > 1e-6, diff / np.maximum(dist, 1e-6), np.sign(0.5 - under) + 0.0)
    direction = direction / np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-6)
    pushed = np.clip(under + direction * need, 0.0, 1.0)
    pushed_far = np.linalg.norm(pushed - under, axis=1, keepdims=True) >= need * 0.999
    flipped = np.clip(under - direction * need, 0.0, 1.0)  # clipped at the cube edge: go back
    fixed = np.where(pushed_far, pushed, flipped)
    return np.where(dist >= need, fg, fixed)


def generate_shapes2d(
    num_samples: int,
    resolution: int = 32,
    num_classes: int = 10,
    difficulty: float = 1.0,
    seed: int = 0,
    split: str = "train",
) -> dict[str, torch.Tensor]:
    """Generate one split: ``{"inputs": uint8 [N, 3, R, R], "targets": int64 [N]}``.

    Classes are exactly balanced (counts differ by at most one) and shuffled. Identical
    arguments give identical tensors; ``split`` selects an independent random stream.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8, got {resolution}")
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in 2..{MAX_CLASSES}, got {num_classes}")
    if difficulty < 0:
        raise ValueError(f"difficulty must be >= 0, got {difficulty}")
    stream = {"train": 0, "test": 1}[split]
    rng = np.random.default_rng([int(seed), stream, 0x5A9E5])
    labels = rng.permutation(np.arange(num_samples, dtype=np.int64) % num_classes)
    params = _draw_parameters(rng, labels, float(difficulty))
    params["fg"] = _foreground(params)
    gen = torch.Generator().manual_seed(int(params.pop("seeds")[0]))
    chunk = max(1, _CHUNK_PIXELS // (resolution * resolution))
    images = torch.empty(num_samples, 3, resolution, resolution, dtype=torch.uint8)
    for start in range(0, num_samples, chunk):
        stop = min(start + chunk, num_samples)
        part = {k: v[start:stop] for k, v in params.items()}
        images[start:stop] = _render_chunk(part, labels[start:stop], resolution, gen)
    return {"inputs": images, "targets": torch.from_numpy(labels)}


# -- caching ------------------------------------------------------------------------------------


def cache_path(settings: dict[str, Any], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return directory / f"shapes2d-{key}.pt"


def _valid(loaded: Any, settings: dict[str, Any]) -> bool:
    if not isinstance(loaded, dict):
        return False
    res = settings["resolution"]
    for split, count in (("train", settings["num_train"]), ("test", settings["num_test"])):
        part = loaded.get(split)
        if not isinstance(part, dict):
            return False
        inputs, targets = part.get("inputs"), part.get("targets")
        if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
            return False
        if inputs.shape != (count, 3, res, res) or inputs.dtype != torch.uint8:
            return False
        if targets.shape != (count,) or targets.dtype != torch.int64:
            return False
    return True


def load_shapes2d(
    resolution: int = 32,
    num_classes: int = 10,
    num_train: int = 10000,
    num_test: int = 2000,
    seed: int = 0,
    difficulty: float = 1.0,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(train, test)`` splits, generated once and cached on disk by a hash of the settings.

    The cache (``cache_dir``, default :func:`default_cache_dir`) holds the exact tensors
    :func:`generate_shapes2d` returns; a corrupt or mismatching file is regenerated.
    """
    if num_train < 0 or num_test < 0:
        raise ValueError("num_train and num_test must be >= 0")
    settings: dict[str, Any] = {
        "version": _VERSION,
        "resolution": int(resolution),
        "num_classes": int(num_classes),
        "num_train": int(num_train),
        "num_test": int(num_test),
        "seed": int(seed),
        "difficulty": float(difficulty),
    }
    path = cache_path(settings, cache_dir)
    if path.is_file():
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            if _valid(loaded, settings):
                return loaded["train"], loaded["test"]
        except Exception:  # corrupt or foreign file: regenerate and overwrite
            pass
    common = {
        "resolution": settings["resolution"],
        "num_classes": settings["num_classes"],
        "difficulty": settings["difficulty"],
        "seed": settings["seed"],
    }
    train = generate_shapes2d(settings["num_train"], split="train", **common)
    test = generate_shapes2d(settings["num_test"], split="test", **common)
    save_to_cache({"train": train, "test": test}, path)  # unwritable: kept in memory
    return train, test


# -- transforms and a per-sample view ----------------------------------------------------------


class BatchToFloat:
    """uint8 images -> normalised float32, optionally with random horizontal flips.

    Works on a batch (``inputs`` [N, 3, R, R]) or a single sample ([3, R, R]). Flips draw
    from torch's global RNG, so seeding and resume make them reproducible. Picklable, so it
    can run as a DataLoader's collate step in worker processes.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, flip: bool = False) -> None:
        self.mean = mean.float().view(3, 1, 1)
        self.std = std.float().view(3, 1, 1)
        self.flip = flip

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images = batch["inputs"]
        single = images.dim() == 3
        if single:
            images = images.unsqueeze(0)
        x = images.float().div_(255.0).sub_(self.mean).div_(self.std)
        if self.flip:
            flip = torch.rand(x.shape[0]) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        out = dict(batch)
        out["inputs"] = x[0] if single else x
        return out

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] from normalised ones (the inverse of the conversion)."""
        return x * self.std + self.mean


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 images [N, 3, R, R], in [0, 1] units."""
    if images.shape[0] == 0:
        return torch.full((3,), 0.5), torch.full((3,), 0.25)
    x = images.transpose(0, 1).reshape(3, -1).double() / 255.0
    return x.mean(1).float(), x.std(1).clamp(min=1e-3).float()


#: The per-sample view of the generated tensors (a DataLoader over it is what
#: :mod:`speedup.benchmarks.data_throughput` compares with the in-memory loader).
Shapes2DDataset = TensorDictDataset


@DATASETS.register("shapes2d", kind="image")
def shapes2d(
    resolution: int = 32,
    num_classes: int = 10,
    num_train: int = 10000,
    num_test: int = 2000,
    seed: int = 0,
    difficulty: float = 1.0,
) -> DataSplits:
    """Procedural 2-D shapes (10-16 classes) on cluttered textured backgrounds; no download.

    Images are uint8 in memory; the train transform flips horizontally at random and
    normalises, the eval transform only normalises (per-channel train-set statistics).
    """
    train, test = load_shapes2d(resolution, num_classes, num_train, num_test, seed, difficulty)
    mean, std = channel_stats(train["inputs"])
    info = DataInfo(kind="image", input_shape=(3, resolution, resolution), num_classes=num_classes)
    return DataSplits(
        train,
        test,
        info,
        train_transform=BatchToFloat(mean, std, flip=True),
        eval_transform=BatchToFloat(mean, std, flip=False),
    )
