"""BlurPool: low-pass filter before every spatial downsampling.

**What.** A stride-``s`` convolution or max-pool keeps one sample in ``s`` of a signal it never
low-pass filtered, so small shifts of the input change the output (aliasing). Zhang (2019,
"Making convolutional networks shift-invariant again", ICML) blurs before subsampling: a
strided convolution becomes ``conv_s(blur(x))`` and a max-pool ``blur_s(max_1(x))`` (max
over the window at stride 1, then a blur at the original stride). The blur is the depthwise
binomial filter ``[1, 2, 1]^T [1, 2, 1] / 16`` (the paper's "Tri-3"), applied with zero
padding 1, so output shapes are unchanged. ``blur_first=False`` instead runs the convolution
at stride 1 and blurs at stride ``s`` afterwards (Zhang's ConvBlurPool, without the ReLU in
between): ``s^2`` times the convolution's FLOPs. Strided convolutions with fewer than
``min_channels`` input channels (the stem, which sees the raw image) are left alone, so the
input is not downsampled more than the data pipeline intends.

Surgery keeps every parameter: :class:`BlurConv2d` *is* an ``nn.Conv2d`` holding the original
weight and bias tensors (same state-dict keys; pretrained weights and pruning masks still
apply), and the filter is a non-persistent buffer, so the parameter count and the checkpoint
format do not change.

**When it helps.** Conv nets that downsample with strided convolutions or max-pools (ResNets,
VGG, DenseNet). With this Tri-3 filter, ImageNet ResNet-50 top-1 goes 76.16% -> 76.83% and
shift consistency 89.20% -> 90.91% (Zhang 2019; figures from the ImageNet tables of the
authors' antialiased-cnns README, which update the paper's); across AlexNet, VGG16,
ResNet-18/34/50 and DenseNet-121 the Tri-3 top-1 gain is +0.35 to +1.95 points. Composer's
method card (composer/algorithms/blurpool/README.md) reports a Pareto improvement on
ResNet-50/ImageNet with ``blur_first=True``, about +0.1 point more and ~10% slower with
``blur_first=False``; every one of its ResNet-50 recipes uses it. CIFAR
ResNets with option-A shortcuts downsample inside ``BasicBlock.shortcut`` by slicing, which
is not a module and is not blurred; their strided 3x3 convolutions are.

**Composes badly with.** Nothing known (Composer's card: "not aware of an example of its
effects changing significantly"). Surgery that copies a convolution's ``weight`` as a tensor
must run after it: weight standardization (declared order). The blur is one extra depthwise
3x3 pass over each replaced layer's input (Composer's card: a slight slowdown, outweighed by
the accuracy gain on ResNet-50).

Functional twin: :func:`apply_blurpool` (with :func:`blur_2d` and :func:`blur_filter`).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from speedup.algorithms._init_order import init_surgery
from torch import nn

from speedup.algorithm import Algorithm, Declaration
from speedup.event import Event
from speedup.surgery import replace_modules

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = [
    "BlurConv2d",
    "BlurMaxPool2d",
    "BlurPool",
    "apply_blurpool",
    "blur_2d",
    "blur_filter",
]


def blur_filter(
    channels: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """The binomial low-pass filter ``[1, 2, 1]^T [1, 2, 1] / 16`` as a depthwise conv weight
    ``[channels, 1, 3, 3]`` (each 3x3 kernel sums to 1, so a constant image is unchanged)."""
    taps = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    kernel = torch.outer(taps, taps) / 16.0
    kernel = kernel.to(device=device, dtype=dtype or torch.get_default_dtype())
    return kernel.repeat(channels, 1, 1, 1)


def blur_2d(
    x: torch.Tensor, stride: int | tuple[int, int] = 1, filter: torch.Tensor | None = None
) -> torch.Tensor:
    """Blur every channel of ``x`` ``[N, C, H, W]`` with the binomial filter (zero padding 1),
    keeping one output in ``stride``. ``filter`` (``[C, 1, 3, 3]``) defaults to
    :func:`blur_filter`. The output is ``ceil(H / stride)`` by ``ceil(W / stride)``."""
    channels = x.shape[1]
    if filter is None:
        filter = blur_filter(channels, x.dtype, x.device)
    return F.conv2d(x, filter, stride=stride, padding=1, groups=channels)


class BlurConv2d(nn.Conv2d):
    """A strided ``nn.Conv2d`` that low-pass filters before it subsamples.

    ``blur_first=True``: ``conv(blur(x))`` at the original stride (filters the input
    channels). ``blur_first=False``: the convolution runs at stride 1 (``self.stride`` is
    ``(1, 1)``) and the output is blurred at ``self.blur_stride``. Build one from an existing
    convolution with :meth:`from_conv`, which shares its weight and bias.
    """

    def __init__(self, *args, blur_first: bool = True, **kwargs) -> None:  # noqa: ANN002,ANN003
        super().__init__(*args, **kwargs)
        self.blur_first = blur_first
        self.blur_stride: tuple[int, ...] = tuple(self.stride)
        if not blur_first:  # the convolution keeps every position; the blur subsamples
            self.stride = (1,) * len(self.stride)
        channels = self.in_channels if blur_first else self.out_channels
        device = self.weight.device
        self.register_buffer(
            "blur", blur_filter(channels, self.weight.dtype, device), persistent=False
        )

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, blur_first: bool = True) -> BlurConv2d:
        """A BlurConv2d computing with ``conv``'s own weight and bias tensors (no copy, no new
        random initialisation)."""
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            blur_first=blur_first,
            device="meta",  # no allocation and no draw from the RNG: the tensors are adopted
        )
        new.weight = conv.weight
        new.bias = conv.bias
        channels = conv.in_channels if blur_first else conv.out_channels
        new.blur = blur_filter(channels, conv.weight.dtype, conv.weight.device)
        new.train(conv.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.blur_first:
            return super().forward(blur_2d(x, 1, self.blur))
        return blur_2d(super().forward(x), self.blur_stride, self.blur)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, blur_first={self.blur_first}"


class BlurMaxPool2d(nn.Module):
    """``blur_s(max_pool_1(x))``: the max over each window at stride 1, then the binomial blur
    at the pool's stride (Zhang 2019's MaxBlurPool). Same output shape as the max-pool."""

    def __init__(
        self,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int],
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
    ) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        # The filter depends on the channel count, which a pool does not know before it runs:
        # built on first use and kept as a plain attribute (not a buffer), so the module's
        # state dict and named buffers are the same before and after the first forward.
        self._filter: torch.Tensor | None = None

    @classmethod
    def from_maxpool(cls, pool: nn.MaxPool2d) -> BlurMaxPool2d:
        stride = pool.stride if pool.stride is not None else pool.kernel_size
        return cls(pool.kernel_size, stride, pool.padding, pool.dilation)

    def _blur(self, x: torch.Tensor) -> torch.Tensor:
        cached = self._filter
        if (
            cached is None
            or cached.shape[0] != x.shape[1]
            or cached.device != x.device
            or cached.dtype != x.dtype
        ):
            cached = self._filter = blur_filter(x.shape[1], x.dtype, x.device)
        return cached

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        peaks = F.max_pool2d(x, self.kernel_size, 1, self.padding, self.dilation)
        return blur_2d(peaks, self.stride, self._blur(peaks))

    def extra_repr(self) -> str:
        return (
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}"
        )


def _strided(stride: int | tuple[int, ...] | None) -> bool:
    if stride is None:
        return False
    values = (stride,) if isinstance(stride, int) else tuple(stride)
    return max(values) > 1


def apply_blurpool(
    model: nn.Module,
    replace_convs: bool = True,
    replace_maxpools: bool = True,
    blur_first: bool = True,
    min_channels: int = 16,
) -> dict[str, int]:
    """Replace strided ``nn.Conv2d`` (with at least ``min_channels`` input channels) by
    :class:`BlurConv2d` and strided ``nn.MaxPool2d`` by :class:`BlurMaxPool2d`, in place.

    Returns ``{"convs": n, "maxpools": m}``, the numbers replaced. Parameters are shared, not
    copied, so an optimizer built before still holds the right tensors. Max-pools with
    ``ceil_mode`` or ``return_indices`` are left alone (their output shape or indices would
    change).
    """
    if min_channels < 1:
        raise ValueError(f"min_channels must be >= 1, got {min_channels}")
    counts = {"convs": 0, "maxpools": 0}

    def build(module: nn.Module) -> nn.Module | None:
        if isinstance(module, BlurConv2d) or isinstance(module, BlurMaxPool2d):
            return None
        if (
            replace_convs
            and type(module) is nn.Conv2d
            and _strided(module.stride)
            and module.in_channels >= min_channels
        ):
            counts["convs"] += 1
            return BlurConv2d.from_conv(module, blur_first)
        if (
            replace_maxpools
            and type(module) is nn.MaxPool2d
            and _strided(module.stride if module.stride is not None else module.kernel_size)
            and not module.ceil_mode
            and not module.return_indices
        ):
            counts["maxpools"] += 1
            return BlurMaxPool2d.from_maxpool(module)
        return None

    replace_modules(model, build)
    return counts


class BlurPool(Algorithm):
    """Blur before every strided conv and max-pool (anti-aliased downsampling, Zhang 2019)."""

    name = "blurpool"
    # Zhang 2019: the blur placement is the only design choice worth searching.
    SEARCH_SPACE = {"blur_first": {"type": "categorical", "choices": [True, False]}}

    def __init__(
        self,
        replace_convs: bool = True,
        replace_maxpools: bool = True,
        blur_first: bool = True,
        min_channels: int = 16,
    ) -> None:
        if not (replace_convs or replace_maxpools):
            raise ValueError(
                "blurpool: replace_convs and replace_maxpools are both False; "
                "at least one must be True"
            )
        if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
            raise ValueError(f"blurpool.min_channels must be an integer >= 1, got {min_channels}")
        self.replace_convs = replace_convs
        self.replace_maxpools = replace_maxpools
        self.blur_first = blur_first
        self.min_channels = min_channels
        #: What the last surgery replaced: ``{"convs": n, "maxpools": m}``.
        self.replaced: dict[str, int] = {}

    def declare(self) -> Declaration:
        # Its place in the one total order of INIT surgery (_init_order): after the block
        # rewrite, before the surgery that copies or gates the new convolutions.
        return init_surgery("blurpool", model_kinds={"cnn"}, data_kinds={"image"})

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        self.replaced = apply_blurpool(
            state.model,
            replace_convs=self.replace_convs,
            replace_maxpools=self.replace_maxpools,
            blur_first=self.blur_first,
            min_channels=self.min_channels,
        )
        if not any(self.replaced.values()):
            warnings.warn(
                "blurpool found no strided Conv2d with >= "
                f"{self.min_channels} input channels and no strided MaxPool2d: it has no effect",
                stacklevel=2,
            )
