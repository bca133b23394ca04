"""Procedural MNIST-1D: a tiny, download-free 1-D classification benchmark.

Follows the idea of Greydanus (2020), "Scaling down deep learning" (arXiv:2011.14439):
ten hand-made 1-D "digit" templates are rendered with random geometric transforms and
noise so that the task separates model families (logistic < MLP < CNN) while staying
small enough to train on a laptop CPU in seconds. The templates and augmentation
pipeline here are this project's own, so accuracies are in the published ballpark but
not identical to the original data set. Use :func:`load_mnist1d_file` to read the
original ``mnist1d_data.pkl`` if you have it.

Rendering of one sample (all randomness from ``numpy.random.default_rng(seed)``)::

    template (12 control points)
      -> random width and offset on a zero-padded canvas (scale + linear translation)
      -> random amplitude
      -> smooth correlated noise (binomial ~ gaussian filter of white noise)
      -> random shear (linear trend)
      -> random circular shift
      -> linear resampling to ``length`` points
      -> random constant offset and iid gaussian noise

Only elementwise float64 arithmetic is used after drawing the random numbers (no BLAS
reductions, no vectorised transcendental functions), so identical arguments give
bit-identical tensors on any machine, for a given NumPy random-stream version (NumPy
keeps ``default_rng`` streams stable in practice but does not promise it across major
versions).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speedup.data.cache import default_cache_dir, save_to_cache

__all__ = [
    "NUM_CLASSES",
    "TEMPLATES",
    "default_cache_dir",
    "generate_mnist1d",
    "load_mnist1d",
    "load_mnist1d_file",
]

NUM_CLASSES = 10

# Ten piecewise-linear digit templates, 12 control points each, peak |value| = 1.
# Designed to be distinguishable by shape only (translation, width and amplitude are
# randomised): number, sign, width and order of their extrema differ.
TEMPLATES: np.ndarray = np.array(
    [
        [0.0, 0.6, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.6, 0.0],  # 0: broad plateau
        [0.0, 0.0, 0.0, 0.0, 0.2, 1.0, 1.0, 0.2, 0.0, 0.0, 0.0, 0.0],  # 1: narrow spike
        [0.0, -0.6, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -0.6, 0.0],  # 2: trough
        [0.0, 0.7, 1.0, 0.7, 0.0, -0.7, -1.0, -0.7, 0.0, 0.0, 0.0, 0.0],  # 3: up then down
        [0.0, 0.0, 0.0, 0.0, -0.7, -1.0, -0.7, 0.0, 0.7, 1.0, 0.7, 0.0],  # 4: down then up
        [0.0, 1.0, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.3, 1.0, 0.0],  # 5: twin spikes
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 0.0],  # 6: rising saw
        [0.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # 7: falling saw
        [0.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # 8: zigzag
        [0.0, 0.4, 0.4, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0],  # 9: small + big bump
    ],
    dtype=np.float64,
)
TEMPLATES.setflags(write=False)

# Augmentation magnitudes, tuned so that (4000 train / 1000 test, length 40, noise 1) the
# Conv1dNet reaches ~93% test accuracy, a 2-hidden-layer MLP ~65% and logistic regression
# ~34% (compare 94% / 68% / 32% reported for the original MNIST-1D); see tests.
_CANVAS = 64  # resolution of the intermediate canvas
_WIDTH_RANGE = (0.25, 0.45)  # digit width as a fraction of the canvas (the rest is padding)
_AMP_RANGE = (0.7, 1.3)  # amplitude scale
_SHEAR = 2.0  # max |slope| of the added linear trend across the canvas
_CORR_NOISE = 0.06  # std of smooth noise (times ``noise``)
_CORR_PASSES = 1  # passes of the [1, 2, 1] / 4 filter that correlates the smooth noise
_IID_NOISE = 0.05  # std of per-point noise (times ``noise``)
_OFFSET = 0.1  # max |constant offset| added to the whole sequence

_DEFAULT_NOISE = 1.0
_VERSION = 1  # bump when the generator changes, invalidates caches


def _smooth(x: np.ndarray, passes: int) -> np.ndarray:
    """Circular [1, 2, 1] / 4 filter applied ``passes`` times along the last axis.

    Repeated passes give a binomial kernel (a discrete gaussian). The result is divided
    by the exact std of the filtered unit white noise, so it stays unit variance.
    """
    for _ in range(passes):
        x = (np.roll(x, 1, axis=-1) + 2.0 * x + np.roll(x, -1, axis=-1)) * 0.25
    if passes:
        # sum of squared binomial(2p) coefficients / 4^p == C(4p, 2p) / 16^p
        var = math.comb(4 * passes, 2 * passes) / 16.0**passes
        x = x / math.sqrt(var)
    return x


def _circular_interp(canvas: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Linearly interpolate rows of ``canvas`` at fractional ``positions`` (wrapping)."""
    size = canvas.shape[-1]
    base = np.floor(positions)
    frac = positions - base
    i0 = base.astype(np.int64) % size
    i1 = (i0 + 1) % size
    rows = np.arange(canvas.shape[0])[:, None]
    return canvas[rows, i0] * (1.0 - frac) + canvas[rows, i1] * frac


def _render(rng: np.random.Generator, labels: np.ndarray, length: int, noise: float) -> np.ndarray:
    n = labels.shape[0]
    canvas = _CANVAS
    k = TEMPLATES.shape[1]
    # Per-sample random parameters, drawn in a fixed order (part of the format).
    width = rng.uniform(*_WIDTH_RANGE, size=n)
    offset = rng.uniform(0.0, 1.0, size=n) * (1.0 - width)
    amp = rng.uniform(*_AMP_RANGE, size=n)
    slope = rng.uniform(-_SHEAR, _SHEAR, size=n)
    shift = rng.integers(0, canvas, size=n)
    dc = rng.uniform(-_OFFSET, _OFFSET, size=n)
    corr = rng.standard_normal((n, canvas))
    iid = rng.standard_normal((n, length))

    # Digit on a zero-padded canvas: evaluate the piecewise-linear template.
    t = (np.arange(canvas) + 0.5) / canvas  # canvas coordinates in (0, 1)
    u = (t[None, :] - offset[:, None]) / width[:, None]  # template coordinate
    inside = (u >= 0.0) & (u <= 1.0)
    pos = np.clip(u, 0.0, 1.0) * (k - 1)
    i0 = np.minimum(np.floor(pos).astype(np.int64), k - 2)
    frac = pos - i0
    tmpl = TEMPLATES[labels]
    rows = np.arange(n)[:, None]
    x = tmpl[rows, i0] * (1.0 - frac) + tmpl[rows, i0 + 1] * frac
    x = np.where(inside, x, 0.0) * amp[:, None]

    x = x + (noise * _CORR_NOISE) * _smooth(corr, _CORR_PASSES)
    x = x + slope[:, None] * (t[None, :] - 0.5)

    # Circular shift and resample to `length` points in one interpolation step.
    grid = (np.arange(length) + 0.5) * (canvas / length) - 0.5
    x = _circular_interp(x, grid[None, :] - shift[:, None].astype(np.float64))

    return x + dc[:, None] + (noise * _IID_NOISE) * iid


def generate_mnist1d(
    num_samples: int = 5000, length: int = 40, noise: float = _DEFAULT_NOISE, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Generate a procedural MNIST-1D data set.

    Args:
        num_samples: number of examples. Classes are balanced (counts differ by at most
            one when ``num_samples`` is not a multiple of 10) and shuffled.
        length: number of points per sequence.
        noise: multiplier of the correlated and iid noise (0 gives clean, but still
            randomly transformed, digits).
        seed: seed of ``numpy.random.default_rng``; identical arguments give
            bit-identical tensors.

    Returns:
        ``{"inputs": float32 [N, 1, length], "targets": int64 [N]}``.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if length < 2:
        raise ValueError(f"length must be >= 2, got {length}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(num_samples, dtype=np.int64) % NUM_CLASSES)
    x = _render(rng, labels, length, float(noise))
    return {
        "inputs": torch.from_numpy(x.astype(np.float32)).unsqueeze(1).contiguous(),
        "targets": torch.from_numpy(labels.astype(np.int64)),
    }


def _split(data: dict[str, torch.Tensor], num_train: int) -> tuple[dict, dict]:
    train = {k: v[:num_train].clone() for k, v in data.items()}
    test = {k: v[num_train:].clone() for k, v in data.items()}
    return train, test


def load_mnist1d(
    num_train: int = 4000,
    num_test: int = 1000,
    length: int = 40,
    noise: float = _DEFAULT_NOISE,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Return ``(train, test)`` splits of one generated set, cached on disk.

    ``num_train + num_test`` samples are generated with :func:`generate_mnist1d` and
    split in order. The result is cached in ``cache_dir`` (default
    :func:`default_cache_dir`) under a name derived from a hash of all settings; the
    cached and freshly generated tensors are identical.
    """
    if num_train < 0 or num_test < 0:
        raise ValueError("num_train and num_test must be >= 0")
    settings: dict[str, Any] = {
        "version": _VERSION,
        "num_samples": num_train + num_test,
        "length": int(length),
        "noise": float(noise),
        "seed": int(seed),
    }
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = directory / f"mnist1d-{key}.pt"

    data: dict[str, torch.Tensor] | None = None
    if path.is_file():
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            if (
                isinstance(loaded, dict)
                and isinstance(loaded.get("inputs"), torch.Tensor)
                and isinstance(loaded.get("targets"), torch.Tensor)
                and loaded["inputs"].dtype == torch.float32
                and loaded["targets"].dtype == torch.int64
                and loaded["inputs"].shape == (settings["num_samples"], 1, settings["length"])
                and loaded["targets"].shape == (settings["num_samples"],)
            ):
                data = {"inputs": loaded["inputs"], "targets": loaded["targets"]}
        except Exception:  # corrupt or foreign file: regenerate and overwrite
            data = None
    if data is None:
        data = generate_mnist1d(
            settings["num_samples"], settings["length"], settings["noise"], settings["seed"]
        )
        save_to_cache(data, path)  # an unwritable cache: kept in memory, with a warning
    return _split(data, num_train)


def load_mnist1d_file(
    path: str | os.PathLike[str],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Read the original MNIST-1D pickle (``mnist1d_data.pkl``) as ``(train, test)``.

    The file is a dict with numpy arrays ``x`` [N, L], ``y`` [N], ``x_test`` and
    ``y_test``. Returns the same layout as :func:`load_mnist1d`: ``inputs`` float32
    [N, 1, L] and ``targets`` int64 [N].
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"MNIST-1D pickle not found: '{p}'. Download mnist1d_data.pkl from the "
            "original MNIST-1D project, or use load_mnist1d() to generate data locally."
        )
    # Unpickling executes code from the file: this is a trusted, user-supplied file.
    with open(p, "rb") as f:
        raw = pickle.load(f)
    if not isinstance(raw, dict):
        raise ValueError(f"'{p}' does not hold a dict, so it is not an MNIST-1D pickle")
    missing = [k for k in ("x", "y", "x_test", "y_test") if k not in raw]
    if missing:
        raise KeyError(f"'{p}' lacks keys {missing}; is it an MNIST-1D pickle?")

    def split(x: Any, y: Any) -> dict[str, torch.Tensor]:
        xs = torch.as_tensor(np.asarray(x), dtype=torch.float32)
        if xs.dim() == 2:
            xs = xs.unsqueeze(1)
        return {"inputs": xs.contiguous(), "targets": torch.as_tensor(np.asarray(y)).long()}

    return split(raw["x"], raw["y"]), split(raw["x_test"], raw["y_test"])
