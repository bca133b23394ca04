"""Progressive resizing.

**What.** Trains on downscaled images early and ramps the resolution up to full size, so early
epochs cost a fraction of the FLOPs (the cost of a conv net scales with pixels). The schedule
follows Composer's: ``initial_scale`` until ``delay``, then a linear ramp to 1.0 that ends
``finetune`` before the end of training, then full resolution. Sizes are rounded to a multiple
of ``size_increment`` so few distinct shapes occur (cuDNN autotuning, compile caches).

**When it helps.** Image classification with conv nets. FFCV's ResNet-50 configs train at
160 px for ~75% of the run, ramp to 192 px over epochs 65-76 of 88, and evaluate at 224-256
px; Composer's method card credits it with ~1.3x on ResNet-50 (initial_scale 0.5, delay 0.5,
finetune 0.2, its defaults here), and its mild ResNet-50 recipe uses delay 0.4. The final
phase and evaluation always run at full resolution.

**Composes badly with.** Other input-size changers (ColOut, CutOut at fixed pixel sizes):
their effect changes with the resolution. Models with fixed-size inputs (an MLP, a ViT
without interpolated position embeddings) cannot take it.

Functional twin: :func:`resize_batch`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from speedup.algorithm import Access, Algorithm, Declaration
from speedup.event import Event
from speedup.time import Time, TimeUnit

__all__ = ["ProgressiveResizing", "resize_batch", "resizing_scale"]

MODES = ("resize", "crop")


def resize_batch(
    inputs: torch.Tensor,
    size: int | tuple[int, int],
    mode: str = "resize",
    antialias: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Resize ``[N, C, H, W]`` images to ``size``: bilinear interpolation or a random crop.

    A crop takes one random window for the whole batch (cheap, and the same for every sample,
    like Composer's), drawn from ``generator`` or torch's global RNG.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    height, width = (size, size) if isinstance(size, int) else size
    if (height, width) == tuple(inputs.shape[-2:]):
        return inputs
    if mode == "resize":
        return F.interpolate(
            inputs, size=(height, width), mode="bilinear", align_corners=False, antialias=antialias
        )
    top = int(torch.randint(0, inputs.shape[-2] - height + 1, (1,), generator=generator))
    left = int(torch.randint(0, inputs.shape[-1] - width + 1, (1,), generator=generator))
    return inputs[..., top : top + height, left : left + width]


def resizing_scale(elapsed: float, initial_scale: float, delay: float, finetune: float) -> float:
    """The scale factor at ``elapsed`` (a fraction of the run): flat, linear ramp, then 1.0."""
    ramp_end = 1.0 - finetune
    if elapsed < delay:
        return initial_scale
    if elapsed >= ramp_end or ramp_end <= delay:
        return 1.0
    return initial_scale + (1.0 - initial_scale) * (elapsed - delay) / (ramp_end - delay)


def _rounded_size(full: int, scale: float, increment: int) -> int:
    size = int(full * scale // increment * increment) if increment > 1 else round(full * scale)
    return max(increment, min(full, size))


class ProgressiveResizing(Algorithm):
    """Train at a lower resolution early and ramp up to full size; eval is never resized."""

    name = "progressive_resizing"

    def __init__(
        self,
        initial_scale: float = 0.5,
        delay: str = "0.5dur",
        finetune: str = "0.2dur",
        size_increment: int = 4,
        mode: str = "resize",
        antialias: bool = True,
        resize_targets: bool = False,
    ) -> None:
        if not 0.0 < initial_scale <= 1.0:
            raise ValueError(f"initial_scale must be in (0, 1], got {initial_scale}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if size_increment < 1:
            raise ValueError(f"size_increment must be >= 1, got {size_increment}")
        if resize_targets and mode == "crop":
            raise ValueError("resize_targets needs mode 'resize' (a crop would misalign targets)")
        self.initial_scale = initial_scale
        self.delay = Time.parse(delay)
        self.finetune = Time.parse(finetune)
        self.size_increment = size_increment
        self.mode = mode
        self.antialias = antialias
        self.resize_targets = resize_targets  # segmentation masks follow the image

    def declare(self) -> Declaration:
        writes = {"batch.inputs", "batch.targets"} if self.resize_targets else {"batch.inputs"}
        return Declaration(
            events={Event.AFTER_DATALOADER: Access(reads={"batch.inputs"}, writes=writes)},
            model_kinds={"cnn"},
            data_kinds={"image"},
        )

    def _fraction(self, time: Time, state) -> float:  # noqa: ANN001
        if time.unit == TimeUnit.DURATION:
            return float(time.value)
        return float(state.converter.convert(time, TimeUnit.DURATION).value)

    def scale(self, state) -> float:  # noqa: ANN001
        """The scale for the current batch of training."""
        delay, finetune = self._fraction(self.delay, state), self._fraction(self.finetune, state)
        return resizing_scale(state.elapsed_fraction, self.initial_scale, delay, finetune)

    def apply(self, event: Event, state, logger) -> None:  # noqa: ANN001
        inputs = state.batch["inputs"]
        height, width = inputs.shape[-2:]
        scale = self.scale(state)
        size = (
            _rounded_size(height, scale, self.size_increment),
            _rounded_size(width, scale, self.size_increment),
        )
        if size == (height, width):
            return
        state.batch["inputs"] = resize_batch(inputs, size, self.mode, self.antialias)
        if self.resize_targets:
            targets = state.batch["targets"]
            state.batch["targets"] = F.interpolate(targets[:, None].float(), size=size)[:, 0].to(
                targets.dtype
            )
