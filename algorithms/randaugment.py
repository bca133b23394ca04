"""RandAugment, and the batched image operations it shares with AugMix.

**What.** Applies ``depth`` operations to every image, each drawn uniformly (per image and
per layer) from a fixed list and applied at one global magnitude (Cubuk et al. 2020,
"RandAugment: Practical automated data augmentation with a reduced search space", CVPR
Workshops): the policy search of AutoAugment collapses to two integers, N (``depth``) and M
(``severity``). The paper's list is identity, autocontrast, equalize, rotate, solarize, color,
posterize, contrast, brightness, sharpness, shear-x/y and translate-x/y (``"all"`` here).
``severity`` is on the 0-10 scale of the paper's reference code, where 10 is AutoAugment's
largest range (Cubuk et al. 2019, appendix table of operations): rotate 30 degrees, shear
0.3, translate 0.45 of the side (150 of 331 pixels), enhancement factors 1 +- 0.9, solarize
threshold down to 0, posterize to 4 bits. Signed operations get a random sign per image.
The magnitude is fixed, as in the paper (Composer instead draws it uniformly up to
``severity`` for every operation, a weaker augmentation at equal settings).

**On normalised tensors.** Our batches are normalised float tensors on the device, not PIL
images. Each batch is mapped to a unit pixel range with its per-channel minimum and maximum
(for data normalised from [0, 1] pixels, a batch of natural images nearly always contains
both extremes in each channel, so this recovers the pixel scale), every operation works in
that range exactly as its PIL counterpart works on 8-bit values (results clipped to it;
posterize and equalize quantise to 256 levels), and the result is mapped back. Geometric
operations are one affine ``grid_sample`` per layer (bilinear), and fill what moves in with
the input value 0, the dataset mean of normalised data (as timm fills with the mean colour);
color/contrast use ITU-R 601 luma weights on three channels, the channel mean otherwise.
Images draw their own operations; each operation runs once on the images that drew it, and
images whose every draw is identity come back bit for bit. Draws come from torch's global
CPU RNG (checkpointed), so runs repeat and resume exactly, on any device.

**When it helps.** Long schedules and large models. Cubuk et al. report ImageNet ResNet-50
top-1 76.3% -> 77.6% at N = 2, M = 9 (equal to AutoAugment without its search), and larger
gains for larger models. Composer's method card measured +0.7% (ResNet-50) and +1.4%
(ResNet-101) on ImageNet, but +0.31% for ResNet-18 at 90 epochs vs +1.15% for ResNet-50 at
120: it can cost accuracy on small models and short runs; its CPU (PIL) version slowed
training by up to 2.5x, which running batched on the device avoids. Composer's hot
ResNet-50 recipe uses ``depth = 1, severity = 10``. Expected effect: higher final accuracy
for long runs of large models, at a per-step cost of a few elementwise passes and one resample.

**Composes badly with.** AugMix (both are per-image augmentation policies: stacking them
over-regularises; ordered RandAugment first if both are used). CIFAR-10-C/ImageNet-C
robustness evaluation: ``"all"`` contains operations those corruptions use; ``"safe"`` drops
color, contrast, brightness and sharpness (Hendrycks et al. 2020). Models and schedules too
small to absorb a strong regulariser.

Functional twin: :func:`randaugment_batch`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from speedup.algorithms.mixup import image_augmentation

from speedup.algorithm import Algorithm, Declaration
from speedup.event import Event

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = [
    "AUGMENTATION_SETS",
    "OPS",
    "RandAugment",
    "apply_op",
    "apply_ops",
    "augmentation_ops",
    "check_images",
    "from_unit",
    "randaugment_batch",
    "to_unit",
    "UnitRange",
]

#: Largest ranges (at severity 10), from AutoAugment's table of operations.
MAX_ROTATE_DEGREES = 30.0
MAX_SHEAR = 0.3
MAX_TRANSLATE = 150 / 331  # of the image side
MAX_ENHANCE = 0.9  # factors in [0.1, 1.9]
MAX_POSTERIZE_BITS_REMOVED = 4

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's "L" conversion
_SMOOTH = ((1.0, 1.0, 1.0), (1.0, 5.0, 1.0), (1.0, 1.0, 1.0))  # PIL's SMOOTH filter (/13)


# -- the unit range ------------------------------------------------------------------------------


class UnitRange(NamedTuple):
    """The affine map between the inputs and the unit range: ``x = unit * scale + low``."""

    low: torch.Tensor  # [1, C, 1, 1]
    scale: torch.Tensor  # [1, C, 1, 1]


def to_unit(
    inputs: torch.Tensor, value_range: tuple[float, float] | None = None
) -> tuple[torch.Tensor, UnitRange]:
    """Map ``inputs`` [N, C, H, W] to the unit range (float32): by ``value_range`` ``(low,
    high)`` when the pixel range is known, else by the batch's per-channel min and max."""
    x = inputs.float()
    if value_range is None:
        low = x.amin(dim=(0, 2, 3), keepdim=True)
        high = x.amax(dim=(0, 2, 3), keepdim=True)
    else:
        low = torch.full((1, 1, 1, 1), float(value_range[0]), device=x.device)
        high = torch.full((1, 1, 1, 1), float(value_range[1]), device=x.device)
    scale = (high - low).clamp_min(1e-12)
    return (x - low) / scale, UnitRange(low, scale)


def from_unit(unit: torch.Tensor, mapping: UnitRange) -> torch.Tensor:
    """Map unit-range images back to the inputs' scale (the inverse of :func:`to_unit`)."""
    return unit * mapping.scale + mapping.low


# -- photometric operations: (images [n, C, H, W] in [0, 1], level [n], sign [n]) -> images ----


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def _factor(level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    return _per_image(1.0 + MAX_ENHANCE * level * sign)


def _gray(u: torch.Tensor) -> torch.Tensor:
    if u.shape[1] == 3:
        weights = torch.tensor(_LUMA, device=u.device, dtype=u.dtype).view(1, 3, 1, 1)
        return (u * weights).sum(dim=1, keepdim=True)
    return u.mean(dim=1, keepdim=True)


def _identity(u: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    return u


def _autocontrast(u: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Stretch each image's channels to the full range (constant channels are left alone)."""
    low = u.amin(dim=(2, 3), keepdim=True)
    span = u.amax(dim=(2, 3), keepdim=True) - low
    return torch.where(span > 0, (u - low) / span.clamp_min(1e-12), u)


def _equalize(u: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation per image and channel at 256 levels: each level maps to its
    share of the pixels below it (the classic CDF mapping)."""
    n, c, h, w = u.shape
    levels = (u * 255).round().long().clamp_(0, 255).view(n * c, h * w)
    hist = torch.zeros(n * c, 256, device=u.device).scatter_add_(
        1, levels, torch.ones_like(levels, dtype=torch.float32)
    )
    cdf = hist.cumsum(dim=1)
    lowest = cdf.gather(1, (hist > 0).float().argmax(dim=1, keepdim=True))  # pixels at the min
    span = cdf[:, -1:] - lowest
    lut = ((cdf - lowest) / span.clamp_min(1)).clamp_(0, 1)
    out = torch.where(span > 0, lut.gather(1, levels), u.reshape(n * c, h * w))
    return out.view(n, c, h, w)


def _posterize(u: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Keep ``8 - round(4 * level)`` bits of each 8-bit value."""
    step = _per_image(2.0 ** torch.round(MAX_POSTERIZE_BITS_REMOVED * level))
    return torch.floor(torch.round(u * 255) / step) * step / 255


def _solarize(u: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Invert values above a threshold falling from above white (level 0) to 0 (level 1),
    PIL's ``256 - 256 * level`` threshold on 8-bit values."""
    threshold = _per_image((256 / 255) * (1.0 - level))
    return torch.where(u >= threshold, 1.0 - u, u)


def _color(u: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Blend with the grayscale image (saturation)."""
    gray = _gray(u)
    return gray + _factor(level, sign) * (u - gray)


def _contrast(u: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean gray level."""
    mean = _gray(u).mean(dim=(2, 3), keepdim=True)
    return mean + _factor(level, sign) * (u - mean)


def _brightness(u: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Blend with black."""
    return _factor(level, sign) * u


def _sharpness(u: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Blend with a smoothed copy (PIL's 3x3 SMOOTH kernel; the border pixels are kept)."""
    n, c, h, w = u.shape
    if h < 3 or w < 3:
        return u
    kernel = torch.tensor(_SMOOTH, device=u.device, dtype=u.dtype).view(1, 1, 3, 3) / 13
    smooth = u.clone()
    smooth[..., 1:-1, 1:-1] = F.conv2d(u.reshape(n * c, 1, h, w), kernel).view(n, c, h - 2, w - 2)
    return smooth + _factor(level, sign) * (u - smooth)


# -- geometric operations: (level [n], sign [n], H, W) -> (A [n, 2, 2], t [n, 2]) --------------
# Output pixel p (x, y, from the image centre, in pixels) samples input pixel A @ p + t.


Affine = tuple[torch.Tensor, torch.Tensor]


def _eye(n: int) -> torch.Tensor:
    return torch.eye(2, dtype=torch.float64).repeat(n, 1, 1)


def _rotate(level: torch.Tensor, sign: torch.Tensor, h: int, w: int) -> Affine:
    angle = torch.deg2rad(MAX_ROTATE_DEGREES * level * sign)
    cos, sin = torch.cos(angle), torch.sin(angle)
    matrix = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    return matrix, torch.zeros(len(level), 2, dtype=torch.float64)


def _shear(axis: int) -> Callable:
    def shear(level: torch.Tensor, sign: torch.Tensor, h: int, w: int) -> Affine:
        matrix = _eye(len(level))
        matrix[:, axis, 1 - axis] = MAX_SHEAR * level * sign
        return matrix, torch.zeros(len(level), 2, dtype=torch.float64)

    return shear


def _translate(axis: int) -> Callable:
    def translate(level: torch.Tensor, sign: torch.Tensor, h: int, w: int) -> Affine:
        shift = torch.zeros(len(level), 2, dtype=torch.float64)
        shift[:, axis] = MAX_TRANSLATE * level * sign * (w, h)[axis]
        return _eye(len(level)), shift

    return translate


class Op(NamedTuple):
    """An operation: ``geometric`` ops return an affine map, the others transform pixels."""

    fn: Callable
    geometric: bool = False


#: Every operation by name.
OPS: dict[str, Op] = {
    "identity": Op(_identity),
    "autocontrast": Op(_autocontrast),
    "equalize": Op(_equalize),
    "posterize": Op(_posterize),
    "solarize": Op(_solarize),
    "rotate": Op(_rotate, geometric=True),
    "shear_x": Op(_shear(0), geometric=True),
    "shear_y": Op(_shear(1), geometric=True),
    "translate_x": Op(_translate(0), geometric=True),
    "translate_y": Op(_translate(1), geometric=True),
    "color": Op(_color),
    "contrast": Op(_contrast),
    "brightness": Op(_brightness),
    "sharpness": Op(_sharpness),
}

_SAFE_OPS = (
    "autocontrast",
    "equalize",
    "posterize",
    "solarize",
    "rotate",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
)

#: Named operation lists. ``safe`` leaves out the operations that CIFAR-10-C/ImageNet-C
#: corruptions are made of (AugMix's list, Hendrycks et al. 2020).
AUGMENTATION_SETS: dict[str, tuple[str, ...]] = {
    "all": _SAFE_OPS + ("color", "contrast", "brightness", "sharpness"),
    "safe": _SAFE_OPS,
}


def augmentation_ops(augmentation_set: str, with_identity: bool = False) -> tuple[str, ...]:
    """The operation names of a named set (``all``, ``safe``; with ``identity`` first if
    ``with_identity``), or of a comma-separated list of names taken as given."""
    if augmentation_set in AUGMENTATION_SETS:
        names = AUGMENTATION_SETS[augmentation_set]
        return (("identity",) if with_identity else ()) + names
    names = tuple(part.strip() for part in augmentation_set.split(",") if part.strip())
    unknown = [n for n in names if n not in OPS]
    if unknown or not names:
        raise ValueError(
            f"augmentation_set {augmentation_set!r}: use {' or '.join(AUGMENTATION_SETS)}, or "
            f"a comma-separated list of {', '.join(OPS)}"
        )
    return names


def check_augmentation_set(augmentation_set: str, owner: str) -> None:
    """The constructors' check of an ``augmentation_set`` argument: :func:`augmentation_ops`'
    ValueError, its key prefixed by the algorithm's name ``owner`` (``randaugment.…``)."""
    try:
        augmentation_ops(augmentation_set)
    except ValueError as err:
        raise ValueError(f"{owner}.{err}") from None


def _warp(
    u: torch.Tensor, matrix: torch.Tensor, shift: torch.Tensor, fill: torch.Tensor
) -> torch.Tensor:
    """Resample ``u`` by pixel-space affine maps about the centre; outside is ``fill``."""
    n, _, h, w = u.shape
    half = torch.tensor([w / 2, h / 2], dtype=torch.float64)  # pixels per normalised unit
    theta = torch.empty(n, 2, 3, dtype=torch.float64)
    theta[:, :, :2] = matrix * half[None, None, :] / half[None, :, None]
    theta[:, :, 2] = shift / half
    theta = theta.to(device=u.device, dtype=u.dtype, non_blocking=True)
    grid = F.affine_grid(theta, list(u.shape), align_corners=False)
    return F.grid_sample(u - fill, grid, align_corners=False) + fill


def apply_op(
    u: torch.Tensor,
    name: str,
    level: torch.Tensor | float,
    sign: torch.Tensor | float = 1.0,
    fill: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """Apply operation ``name`` to unit-range images ``u`` [n, C, H, W] at ``level`` in [0, 1]
    (severity / 10) with ``sign`` +-1 (scalars or per-image CPU tensors [n]); geometric
    operations fill with ``fill`` (unit range). The result is clipped to [0, 1]."""
    n = u.shape[0]
    level = torch.as_tensor(level, dtype=torch.float64).expand(n).cpu()
    sign = torch.as_tensor(sign, dtype=torch.float64).expand(n).cpu()
    op = OPS[name]
    if op.geometric:
        matrix, shift = op.fn(level, sign, u.shape[2], u.shape[3])
        return _warp(u, matrix, shift, torch.as_tensor(fill, device=u.device)).clamp_(0, 1)
    level_d = level.to(device=u.device, dtype=u.dtype)
    sign_d = sign.to(device=u.device, dtype=u.dtype)
    return op.fn(u, level_d, sign_d).clamp(0, 1)


def apply_ops(
    u: torch.Tensor,
    names: tuple[str, ...],
    choice: torch.Tensor,
    level: torch.Tensor,
    sign: torch.Tensor,
    fill: torch.Tensor,
) -> torch.Tensor:
    """One layer: image i gets ``names[choice[i]]`` (``-1``: nothing) at ``level[i]`` with
    ``sign[i]`` (CPU tensors [n]). Each operation runs once on the images that chose it; all
    geometric choices share one resample. Updates ``u`` in place and returns it."""
    device = u.device
    geometric: list[tuple[torch.Tensor, str]] = []
    for k in torch.unique(choice).tolist():
        if k < 0 or names[k] == "identity":
            continue
        rows = (choice == k).nonzero().flatten()
        op = OPS[names[k]]
        if op.geometric:
            geometric.append((rows, names[k]))
            continue
        rows_d = rows.to(device, non_blocking=True)
        level_d = level[rows].to(device=device, dtype=u.dtype, non_blocking=True)
        sign_d = sign[rows].to(device=device, dtype=u.dtype, non_blocking=True)
        out = op.fn(u.index_select(0, rows_d), level_d, sign_d).clamp_(0, 1)
        u.index_copy_(0, rows_d, out)
    if geometric:
        h, w = u.shape[2], u.shape[3]
        rows = torch.cat([r for r, _ in geometric])
        maps = [OPS[name].fn(level[r].double(), sign[r].double(), h, w) for r, name in geometric]
        matrix = torch.cat([m for m, _ in maps])
        shift = torch.cat([s for _, s in maps])
        rows_d = rows.to(device, non_blocking=True)
        out = _warp(u.index_select(0, rows_d), matrix, shift, fill).clamp_(0, 1)
        u.index_copy_(0, rows_d, out)
    return u


def check_images(inputs: torch.Tensor, name: str) -> None:
    """Raise ValueError unless ``inputs`` is a batch of images [N, C, H, W]."""
    if inputs.dim() != 4:
        raise ValueError(f"{name} needs images [N, C, H, W], got shape {tuple(inputs.shape)}")


def randaugment_batch(
    inputs: torch.Tensor,
    depth: int = 2,
    severity: float = 9,
    augmentation_set: str = "all",
    generator: torch.Generator | None = None,
    value_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """RandAugment every image of ``inputs`` [N, C, H, W]: ``depth`` layers, each a uniform
    draw per image from ``augmentation_set`` (identity included for named sets, as in the
    paper) at magnitude ``severity`` / 10 with a random sign. See the module docstring for how
    normalised tensors are handled. Returns a new tensor of the inputs' dtype."""
    check_images(inputs, "randaugment")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if not 0 <= severity <= 10:
        raise ValueError(f"severity must be in [0, 10], got {severity}")
    names = augmentation_ops(augmentation_set, with_identity=True)
    n = inputs.shape[0]
    choices = torch.randint(len(names), (depth, n), generator=generator)
    signs = torch.randint(0, 2, (depth, n), generator=generator).double() * 2 - 1
    level = torch.full((n,), severity / 10, dtype=torch.float64)
    unit, mapping = to_unit(inputs, value_range)
    fill = (-mapping.low / mapping.scale).clamp(0, 1)
    for layer in range(depth):
        unit = apply_ops(unit, names, choices[layer], level, signs[layer], fill)
    out = from_unit(unit, mapping).to(inputs.dtype)
    identity = [i for i, name in enumerate(names) if name == "identity"]
    untouched = torch.isin(choices, torch.tensor(identity, dtype=choices.dtype)).all(dim=0)
    if bool(untouched.any()):  # images that drew only identity come back bit for bit
        keep = untouched.to(inputs.device, non_blocking=True).view(-1, 1, 1, 1)
        out = torch.where(keep, inputs, out)
    return out


class RandAugment(Algorithm):
    """Apply N random image operations at a fixed magnitude M to each training image."""

    name = "randaugment"
    # Cubuk et al. 2020 (Sec. 3): N in 1-3, M in 5-15 on a 0-30 scale (here 0-10).
    SEARCH_SPACE = {
        "depth": {"type": "int", "low": 1, "high": 3},
        "severity": {"type": "float", "low": 2.0, "high": 10.0},
    }

    def __init__(self, depth: int = 2, severity: float = 9, augmentation_set: str = "all") -> None:
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise ValueError(f"randaugment.depth must be an integer >= 1, got {depth}")
        if not (isinstance(severity, (int, float)) and 0 <= severity <= 10):
            raise ValueError(f"randaugment.severity must be in [0, 10], got {severity}")
        check_augmentation_set(augmentation_set, "randaugment")
        self.depth = depth
        self.severity = float(severity)
        self.augmentation_set = augmentation_set

    def declare(self) -> Declaration:
        return image_augmentation(self.name)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        batch = state.batch
        batch["inputs"] = randaugment_batch(
            batch["inputs"], self.depth, self.severity, self.augmentation_set
        )
