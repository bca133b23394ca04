"""Vision models: torchvision classifiers, CIFAR ResNets and the lottery-ticket Conv nets.

Every builder takes the data's ``DataInfo`` first and returns a :class:`Classifier` of kind
``"cnn"``; the class count comes from ``info.num_classes`` and the input channels from
``info.input_shape[0]``. torchvision is imported inside the builders so that importing this
module (and ``speedup list``) stays fast.
"""

from __future__ import annotations

import difflib
import math
import os
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from speedup.errors import PretrainedPathError
from speedup.model import Classifier, ResidualBlock
from speedup.models.registry import MODELS

__all__ = ["BasicBlock", "CifarResNet", "ConvNet", "load_pretrained", "PretrainedPathError"]


# -- shared helpers -------------------------------------------------------------------------


def _num_classes(info: Any) -> int:
    if not info.num_classes:
        raise ValueError("this model is a classifier: the data must declare num_classes")
    return int(info.num_classes)


def _set_input_channels(net: nn.Module, channels: int) -> None:
    """Replace the first Conv2d when the data does not have the 3 channels it was built for."""
    name, first = next((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d))
    if first.in_channels == channels:
        return
    parent_name, _, child_name = name.rpartition(".")
    conv = nn.Conv2d(
        channels,
        first.out_channels,
        first.kernel_size,
        stride=first.stride,
        padding=first.padding,
        dilation=first.dilation,
        bias=first.bias is not None,
        padding_mode=first.padding_mode,
    )
    setattr(net.get_submodule(parent_name), child_name, conv)


def _head_keys(net: nn.Module) -> set[str]:
    """State-dict keys of the last Linear layer: the classifier head."""
    last = None
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        return set()
    return {f"{last}.weight", f"{last}.bias"}


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a common checkpoint wrapping
    if not isinstance(state, dict):
        raise ValueError(f"pretrained {path!r}: expected a state dict, got {type(state).__name__}")
    return state


def load_pretrained(net: nn.Module, path: str) -> list[str]:
    """Load weights from a local state dict (``.pt``/``.pth`` or ``.safetensors``).

    Keys saved from a ``Classifier`` (prefixed ``net.``) load too. A classifier head whose
    shape differs (fine-tuning from 1000 ImageNet classes to fewer) is left freshly
    initialised; its keys are returned. Any other missing, unexpected or mismatched key is an
    error, so a wrong file never loads half-way silently.
    """
    if not os.path.isfile(path):
        raise PretrainedPathError(
            f"model.pretrained: weights file {path!r} does not exist; put a state dict there "
            "(torch.save(model.state_dict(), path), e.g. torchvision's resnet50-*.pth, or a "
            ".safetensors file), or remove model.pretrained to start from random weights"
        )
    state = _read_state_dict(path)
    if state and all(k.startswith("net.") for k in state):
        state = {k[len("net.") :]: v for k, v in state.items()}
    own = net.state_dict()
    head = _head_keys(net)
    skipped = [k for k in head if k in state and k in own and state[k].shape != own[k].shape]
    for key in skipped:
        del state[key]
    missing = sorted(set(own) - set(state) - set(skipped))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in state if k in own and state[k].shape != own[k].shape)
    if missing or unexpected or mismatched:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else "")

        problems = []
        if missing:
            problems.append(f"missing keys: {show(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {show(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatch: {show(mismatched)}")
        raise ValueError(
            f"model.pretrained: {path!r} does not fit this network ({'; '.join(problems)})"
        )
    net.load_state_dict(state, strict=False)  # only the skipped head keys are absent
    return sorted(skipped)


def _torchvision_net(arch: str, info: Any, **kwargs: Any) -> nn.Module:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=5, cutoff=0.5)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ValueError(
            f"model.arch: {arch!r} is not a torchvision classifier{hint}; "
            f"see torchvision.models.list_models(module=torchvision.models)"
        )
    net = torchvision.models.get_model(arch, weights=None, num_classes=_num_classes(info), **kwargs)
    _set_input_channels(net, int(info.input_shape[0]))
    return net


def _classifier(net: nn.Module, info: Any, pretrained: str | None) -> Classifier:
    if pretrained is not None:
        load_pretrained(net, pretrained)
    return Classifier(net, _num_classes(info), kind="cnn")


# -- torchvision models ---------------------------------------------------------------------


@MODELS.register("resnet18", kind="cnn")
def resnet18(info, pretrained: str | None = None, zero_init_residual: bool = False) -> Classifier:
    """torchvision ResNet-18 (He et al. 2016, ImageNet stem), randomly initialised.

    ``pretrained``: a local state dict to load (no download). ``zero_init_residual`` starts
    each block's last BatchNorm at gamma = 0 (Goyal et al. 2017, section 5.1).
    """
    net = _torchvision_net("resnet18", info, zero_init_residual=zero_init_residual)
    return _classifier(net, info, pretrained)


@MODELS.register("resnet50", kind="cnn")
def resnet50(info, pretrained: str | None = None, zero_init_residual: bool = False) -> Classifier:
    """torchvision ResNet-50 (v1.5: stride 2 in the 3x3 conv), 25,557,032 parameters at 1000
    classes. ``pretrained`` and ``zero_init_residual`` as for ``resnet18``."""
    net = _torchvision_net("resnet50", info, zero_init_residual=zero_init_residual)
    return _classifier(net, info, pretrained)


@MODELS.register("torchvision", kind="cnn")
def torchvision_model(info, arch: str, pretrained: str | None = None) -> Classifier:
    """Any torchvision classifier by name (``efficientnet_b0``, ``mobilenet_v3_small``, ...),
    built with ``weights=None``; ``pretrained`` loads a local state dict."""
    return _classifier(_torchvision_net(arch, info), info, pretrained)


# -- CIFAR ResNets --------------------------------------------------------------------------


NORMS = ("batch", "group")


def _norm(kind: str, channels: int) -> nn.Module:
    """BatchNorm, or GroupNorm with 32 groups where the channels allow (Wu & He 2018)."""
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    return nn.BatchNorm2d(channels)


class BasicBlock(ResidualBlock):
    """Two 3x3 conv-norm layers and a shortcut (He et al. 2016, Figure 2): the CIFAR ResNets'
    block. A :class:`~speedup.model.ResidualBlock`, so algorithms that act on residual
    structure find it through the core's public class, not this module."""

    def __init__(
        self, c_in: int, c_out: int, stride: int, shortcut: str, norm: str = "batch"
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = _norm(norm, c_out)
        self.stride = stride
        self.pad = c_out - c_in
        self.projection: nn.Module | None = None
        if (stride != 1 or c_in != c_out) and shortcut == "conv":
            self.projection = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), _norm(norm, c_out)
            )

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.projection is not None:
            return self.projection(x)
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:  # option A: the new channels are zeros, no parameters
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


class CifarResNet(nn.Module):
    """The CIFAR-10 ResNets of He et al. 2016, section 4.2: a 3x3 conv with ``width`` filters,
    three stages of ``n`` basic blocks at ``width``, ``2*width``, ``4*width`` filters on
    32, 16 and 8 pixel maps (stride-2 first conv in stages 2 and 3), global average pooling
    and a linear layer: ``6n + 2`` layers.

    ``shortcut="zeros"`` is the paper's option A for CIFAR (identity, subsampled, with
    zero-padded extra channels; ResNet-20 has 0.27M parameters, ResNet-56 0.85M, Table 6);
    ``shortcut="conv"`` uses 1x1-conv + BN projections where the shape changes (option B).
    ``norm="group"`` swaps every BatchNorm for GroupNorm (Wu & He 2018), the pairing weight
    standardisation was designed for (Qiao et al. 2019).
    """

    def __init__(
        self,
        n: int,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 16,
        shortcut: str = "zeros",
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if shortcut not in ("zeros", "conv"):
            raise ValueError(f"shortcut must be 'zeros' (option A) or 'conv', got {shortcut!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            _norm(norm, width),
            nn.ReLU(),
        )
        blocks: list[nn.Module] = []
        c_in = width
        for stage in range(3):
            c_out = width * 2**stage
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(c_in, c_out, stride, shortcut, norm))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, num_classes)
        for module in self.modules():  # He et al. 2015 init, as the paper says (section 3.4)
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _cifar_resnet(
    info: Any, n: int, width: int, shortcut: str, pretrained: str | None, norm: str = "batch"
):
    channels = int(info.input_shape[0])
    net = CifarResNet(n, _num_classes(info), channels, width, shortcut, norm)
    return _classifier(net, info, pretrained)


@MODELS.register("resnet20", kind="cnn")
def resnet20(
    info,
    width: int = 16,
    shortcut: str = "zeros",
    pretrained: str | None = None,
    norm: Literal["batch", "group"] = "batch",
) -> Classifier:
    """CIFAR ResNet-20 (He et al. 2016, n=3): 0.27M parameters, 8.75% CIFAR-10 error."""
    return _cifar_resnet(info, 3, width, shortcut, pretrained, norm)


@MODELS.register("resnet56", kind="cnn")
def resnet56(
    info,
    width: int = 16,
    shortcut: str = "zeros",
    pretrained: str | None = None,
    norm: Literal["batch", "group"] = "batch",
) -> Classifier:
    """CIFAR ResNet-56 (He et al. 2016, n=9): 0.85M parameters, 6.97% CIFAR-10 error."""
    return _cifar_resnet(info, 9, width, shortcut, pretrained, norm)


# -- the lottery-ticket Conv nets -----------------------------------------------------------


class ConvNet(nn.Module):
    """Conv-2/4/6 of Frankle & Carbin 2019 (Figure 2): pairs of 3x3 convs (same padding,
    ReLU), a 2x2 max-pool after each pair, then fully connected 256-256-classes.

    At 32x32 and 10 classes the conv weights are 38K / 260K / 1.1M and the totals 4.3M /
    2.4M / 2.26M for Conv-2/4/6. The paper's Figure 2 table lists the same conv weights and
    totals 4.3M / 2.4M / 1.7M; its Conv-6 total disagrees with its own layer list (the
    first FC layer on the 4x4x256 map alone has 1.05M weights), so we follow the layers.
    The first FC layer is sized for ``resolution``; another input
    size is average-pooled to that grid first, so progressive resizing still runs (at the
    native size the pooling is the identity). Weights use Gaussian Glorot init, as in the
    paper.
    """

    def __init__(
        self,
        filters: tuple[int, ...],
        num_classes: int = 10,
        in_channels: int = 3,
        resolution: int = 32,
        fc: tuple[int, ...] = (256, 256),
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, c_out in enumerate(filters):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU()]
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.grid = max(1, resolution // 2 ** (len(filters) // 2))
        widths = [c_in * self.grid**2, *fc]
        head: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            head += [nn.Linear(a, b), nn.ReLU()]
        head.append(nn.Linear(widths[-1], num_classes))
        self.classifier = nn.Sequential(*head)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_normal_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if x.shape[-1] != self.grid or x.shape[-2] != self.grid:
            x = F.adaptive_avg_pool2d(x, self.grid)
        return self.classifier(torch.flatten(x, 1))


def _conv_net(info: Any, filters: tuple[int, ...], pretrained: str | None) -> Classifier:
    channels, height = int(info.input_shape[0]), int(info.input_shape[-1])
    net = ConvNet(filters, _num_classes(info), channels, resolution=height)
    return _classifier(net, info, pretrained)


@MODELS.register("conv2", kind="cnn")
def conv2(info, pretrained: str | None = None) -> Classifier:
    """Conv-2 (Frankle & Carbin 2019): 64, 64, pool, FC 256-256-10."""
    return _conv_net(info, (64, 64), pretrained)


@MODELS.register("conv4", kind="cnn")
def conv4(info, pretrained: str | None = None) -> Classifier:
    """Conv-4 (Frankle & Carbin 2019): 64, 64, pool, 128, 128, pool, FC 256-256-10."""
    return _conv_net(info, (64, 64, 128, 128), pretrained)


@MODELS.register("conv6", kind="cnn")
def conv6(info, pretrained: str | None = None) -> Classifier:
    """Conv-6 (Frankle & Carbin 2019): Conv-4 then 256, 256, pool; FC 256-256-10."""
    return _conv_net(info, (64, 64, 128, 128, 256, 256), pretrained)
