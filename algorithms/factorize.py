"""Factorize: replace large Linear and Conv2d layers by pairs of low-rank layers.

**What.** A weight ``W`` (``out x fan_in``; a convolution's filters flattened to ``fan_in =
in_channels * kh * kw``) becomes the product of two thinner factors of rank ``r``: ``W ~= B A``
with ``B`` ``out x r`` and ``A`` ``r x fan_in``. They are initialised from the truncated SVD
``W = U S V^T``: ``B = U_r S_r^(1/2)``, ``A = S_r^(1/2) V_r^T``, so ``B A`` is the best rank-r
approximation of ``W`` in Frobenius and spectral norm (Eckart & Young 1936) and the square
roots balance the two factors' scales. A Linear becomes ``Linear(fan_in, r, bias=False)`` then
``Linear(r, out)``; a Conv2d becomes a ``k x k`` conv to ``r`` channels (same stride, padding,
dilation) then a ``1 x 1`` conv to ``out``, the structure of Zhang et al. (2016, "Accelerating
very deep convolutional networks for classification and detection", TPAMI, figure 1), which
cuts the multiply-adds per output position from ``k^2 c d`` to ``k^2 c r + r d``. The rank is
``latent_features``/``latent_channels``: a fraction of ``min(in, out)`` if below 1, else a
count. A layer is replaced only when ``min(in, out)`` reaches ``min_features``/``min_channels``
and ``r (fan_in + out) < fan_in out``, i.e. when the pair has fewer parameters (and, equally,
fewer multiply-adds) than the original. Grouped convolutions and weights shared between modules
(GPT-2's head tied to its embedding) are left alone. Hugging Face's GPT-2 ``Conv1D`` (a linear
layer with a transposed weight) is factorized like a Linear.

**When it helps.** Rarely when training from scratch. The low-rank idea comes from compressing
*trained* networks: Jaderberg et al. (2014, "Speeding up convolutional neural networks with
low rank expansions", BMVC) report 2.5x speedup with no accuracy loss and 4.5x with under 1%
drop on a scene-text CNN; Zhang et al. (2016) report a 4x whole-model speedup of VGG-16 for
0.3 points more ImageNet top-5 error (abstract), fitting the factors to a trained network's
responses (a data-driven reconstruction, not an SVD of the weights). Composer's method card
(composer/algorithms/factorize/README.md) is negative: on ResNet-50 it never found Factorize
helpful, and even conservative settings (``min_channels=512, latent_channels=128``) cost over
1 point of accuracy for under 5% more throughput. Small layers are memory-bound, so
factorizing them saves FLOPs but no time: Composer suggests ``min_channels``/``min_features
>= 512`` and a rank of at most 0.25 before expecting any speedup. The defaults here are
Composer's (convs and linears, ``min_channels=256, latent_channels=0.25, min_features=256,
latent_features=128``). From a random initialisation the SVD keeps only the top-``r``
directions of the random matrix, so the layer starts with a smaller output scale than the
original init. Checkpoints hold the factors; :func:`merge_factorization` turns a trained model
back into the original architecture (rank-``r`` weights) for export.

**Composes badly with.** Magnitude pruning (it would prune the factors, a second way of
reducing the same weights). Weight standardization standardizes each factor, not their
product (declared order: factorize first). Surgery that expects the original Linear layers
(GatedLinearUnits, ALiBi) runs first (declared). ChannelsLast runs after so the new convs get
its memory format (declared). NoOpModel replaces the model after everything (declared).

Functional twin: :func:`apply_factorization` (and :func:`low_rank_factors`,
:func:`factorize_linear`, :func:`factorize_conv2d`; :func:`merge_factorization` folds trained
pairs back into single layers of the original types, e.g. before exporting).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from speedup.algorithms._init_order import init_surgery
from torch import nn

from speedup.algorithm import Algorithm, Declaration
from speedup.event import Event

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = [
    "Factorize",
    "FactorizedConv2d",
    "FactorizedLinear",
    "apply_factorization",
    "factorize_conv2d",
    "factorize_linear",
    "latent_size",
    "low_rank_factors",
    "merge_factorization",
]


@torch.no_grad()
def low_rank_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B @ A`` the best rank-``rank`` approximation of the matrix ``weight``.

    ``B = U_r sqrt(S_r)`` (``out x rank``) and ``A = sqrt(S_r) V_r^T`` (``rank x in``), from the
    truncated SVD computed in float32 (float64 inputs stay float64); both come back in
    ``weight``'s dtype.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be a matrix, got shape {tuple(weight.shape)}")
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(f"rank must be in [1, {min(weight.shape)}], got {rank}")
    work = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    root = s[:rank].sqrt()
    b = u[:, :rank] * root
    a = root[:, None] * vh[:rank]
    return b.to(weight.dtype), a.to(weight.dtype)


def latent_size(latent: float, in_size: int, out_size: int) -> int:
    """The rank a ``latent`` setting gives a layer: a fraction (< 1) of ``min(in, out)``,
    at least 1, or a count (>= 1)."""
    if latent <= 0:
        raise ValueError(f"latent size must be > 0, got {latent}")
    if latent < 1:
        return max(1, int(latent * min(in_size, out_size)))
    return int(latent)


def _reduces_cost(rank: int, fan_in: int, out: int) -> bool:
    """Two factors cost ``rank * (fan_in + out)`` weights and multiply-adds per output
    position, the original ``fan_in * out``."""
    return rank * (fan_in + out) < fan_in * out


class FactorizedLinear(nn.Module):
    """``Linear(in, out)`` as ``second(first(x))``: ``in -> latent`` (no bias) ``-> out``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        latent_features: int,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        transposed: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.latent_features = latent_features
        #: Made from a transformers ``Conv1D`` (merges back into one).
        self.transposed = transposed
        self.first = nn.Linear(in_features, latent_features, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(
            latent_features, out_features, bias=bias, device=device, dtype=dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def merged_weight(self) -> torch.Tensor:
        """The ``out x in`` weight the pair computes (``second.weight @ first.weight``)."""
        return self.second.weight @ self.first.weight

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.latent_features} -> {self.out_features}"


class FactorizedConv2d(nn.Module):
    """``Conv2d(c, d, k)`` as a ``k x k`` conv to ``latent`` channels (no bias, the original
    stride/padding/dilation) followed by a ``1 x 1`` conv to ``d`` channels."""

    def __init__(self, conv: nn.Conv2d, latent_channels: int) -> None:
        super().__init__()
        weight = conv.weight
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation
        self.padding_mode = conv.padding_mode
        self.latent_channels = latent_channels
        kwargs = {"device": weight.device, "dtype": weight.dtype}
        self.first = nn.Conv2d(
            conv.in_channels,
            latent_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=False,
            padding_mode=conv.padding_mode,
            **kwargs,
        )
        self.second = nn.Conv2d(
            latent_channels, conv.out_channels, 1, bias=conv.bias is not None, **kwargs
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def merged_weight(self) -> torch.Tensor:
        """The ``d x c x kh x kw`` filters the pair computes."""
        b = self.second.weight.flatten(1)  # d x latent
        a = self.first.weight.flatten(1)  # latent x (c kh kw)
        return (b @ a).view(self.out_channels, self.in_channels, *self.kernel_size)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels} -> {self.latent_channels} -> {self.out_channels}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}"
        )


def _is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): ``y = x @ W + b`` with ``W`` of shape ``in x out``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def _linear_view(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(weight as out x in, bias)`` of a Linear-like module, else None."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if _is_hf_conv1d(module):
        return module.weight.t(), module.bias
    return None


@torch.no_grad()
def factorize_linear(module: nn.Module, latent_features: float) -> FactorizedLinear:
    """A :class:`FactorizedLinear` initialised from ``module``'s truncated SVD (an
    ``nn.Linear`` or a transformers ``Conv1D``); the original bias moves to the second layer."""
    view = _linear_view(module)
    if view is None:
        raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(module).__name__}")
    weight, bias = view
    out_features, in_features = weight.shape
    rank = latent_size(latent_features, in_features, out_features)
    if rank > min(in_features, out_features):
        raise ValueError(f"rank {rank} exceeds min(in, out) = {min(in_features, out_features)}")
    new = FactorizedLinear(
        in_features,
        out_features,
        rank,
        bias=bias is not None,
        device=weight.device,
        dtype=weight.dtype,
        transposed=_is_hf_conv1d(module),
    )
    b, a = low_rank_factors(weight, rank)
    new.first.weight.copy_(a)
    new.second.weight.copy_(b)
    if bias is not None:
        new.second.bias.copy_(bias)
    _keep_requires_grad(new, weight.requires_grad)
    return new


@torch.no_grad()
def factorize_conv2d(conv: nn.Conv2d, latent_channels: float) -> FactorizedConv2d:
    """A :class:`FactorizedConv2d` initialised from the truncated SVD of ``conv``'s filters
    flattened to ``out x (in kh kw)``."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"expected nn.Conv2d, got {type(conv).__name__}")
    if conv.groups != 1:
        raise ValueError(f"grouped convolutions cannot be factorized (groups={conv.groups})")
    out_channels = conv.out_channels
    fan_in = conv.weight[0].numel()
    rank = latent_size(latent_channels, conv.in_channels, out_channels)
    if rank > min(fan_in, out_channels):
        raise ValueError(f"rank {rank} exceeds min(fan_in, out) = {min(fan_in, out_channels)}")
    new = FactorizedConv2d(conv, rank)
    b, a = low_rank_factors(conv.weight.flatten(1), rank)
    new.first.weight.copy_(a.view_as(new.first.weight))
    new.second.weight.copy_(b.view_as(new.second.weight))
    if conv.bias is not None:
        new.second.bias.copy_(conv.bias)
    _keep_requires_grad(new, conv.weight.requires_grad)
    return new


def _keep_requires_grad(module: nn.Module, requires_grad: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(requires_grad)


def _shared_tensors(model: nn.Module) -> set[int]:
    """ids of parameters that more than one module holds (tied weights)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def apply_factorization(
    model: nn.Module,
    factorize_convs: bool = True,
    factorize_linears: bool = True,
    min_channels: int = 256,
    latent_channels: float = 0.25,
    min_features: int = 256,
    latent_features: float = 128,
) -> list[str]:
    """Replace, in place, every qualifying Conv2d/Linear of ``model`` by its factorized pair.

    A layer qualifies when ``min(in, out) >= min_channels``/``min_features``, it is not
    grouped, its weight is not shared with another module, and the pair would have fewer
    weights than the layer. Returns the names of the replaced modules, in model order. Call
    it before building the optimizer (or rebuild the optimizer afterwards).
    """
    shared = _shared_tensors(model)
    chosen: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name:  # the root cannot be replaced in place
            continue
        if factorize_convs and isinstance(module, nn.Conv2d):
            if module.groups != 1 or id(module.weight) in shared:
                continue
            out, fan_in = module.out_channels, module.weight[0].numel()
            if min(module.in_channels, out) < min_channels:
                continue
            rank = latent_size(latent_channels, module.in_channels, out)
            if _reduces_cost(rank, fan_in, out):
                chosen.append((name, factorize_conv2d(module, latent_channels)))
        elif factorize_linears and _linear_view(module) is not None:
            if id(module.weight) in shared:
                continue
            out, fan_in = _linear_view(module)[0].shape
            if min(fan_in, out) < min_features:
                continue
            rank = latent_size(latent_features, fan_in, out)
            if _reduces_cost(rank, fan_in, out):
                chosen.append((name, factorize_linear(module, latent_features)))
    for name, replacement in chosen:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, replacement)
    return [name for name, _ in chosen]


@torch.no_grad()
def _merged(module: nn.Module) -> nn.Module:
    weight = module.merged_weight()
    bias = module.second.bias
    if isinstance(module, FactorizedConv2d):
        layer = nn.Conv2d(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            bias=bias is not None,
            padding_mode=module.padding_mode,
            device=weight.device,
            dtype=weight.dtype,
        )
        layer.weight.copy_(weight)
    elif module.transposed:
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(module.out_features, module.in_features).to(weight.device, weight.dtype)
        layer.weight.copy_(weight.t())
    else:
        layer = nn.Linear(
            module.in_features,
            module.out_features,
            bias=bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        layer.weight.copy_(weight)
    if bias is not None:
        layer.bias.copy_(bias)
    _keep_requires_grad(layer, module.second.weight.requires_grad)
    return layer


def merge_factorization(model: nn.Module) -> list[str]:
    """Undo :func:`apply_factorization` in place: each factorized pair becomes one layer of
    the original type holding the product of the factors (still of rank ``latent``), so the
    weights load into the original architecture (export, fine-tuning without the pairs).
    Returns the names of the merged modules."""
    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if name and isinstance(module, (FactorizedLinear, FactorizedConv2d))
    ]
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, _merged(module))
    return [name for name, _ in chosen]


def _check_latent(key: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"factorize.{key} must be a number, got {value!r}")
    if value <= 0 or (value >= 1 and not float(value).is_integer()):
        raise ValueError(
            f"factorize.{key} must be a fraction in (0, 1) or a whole number >= 1, got {value}"
        )


class Factorize(Algorithm):
    """Replace large Linear/Conv2d layers by two low-rank layers initialised from their SVD."""

    name = "factorize"

    def __init__(
        self,
        factorize_convs: bool = True,
        factorize_linears: bool = True,
        min_channels: int = 256,
        latent_channels: int | float = 0.25,
        min_features: int = 256,
        latent_features: int | float = 128,
    ) -> None:
        if not (factorize_convs or factorize_linears):
            raise ValueError(
                "factorize: factorize_convs and factorize_linears are both False; "
                "enable at least one"
            )
        for key, value in (("min_channels", min_channels), ("min_features", min_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"factorize.{key} must be an integer >= 1, got {value!r}")
        _check_latent("latent_channels", latent_channels)
        _check_latent("latent_features", latent_features)
        self.factorize_convs = factorize_convs
        self.factorize_linears = factorize_linears
        self.min_channels, self.latent_channels = min_channels, latent_channels
        self.min_features, self.latent_features = min_features, latent_features
        #: Names of the modules replaced at INIT, and those made from transformers Conv1D.
        self.replaced: list[str] = []
        self.transposed: list[str] = []

    def declare(self) -> Declaration:
        # Its place in the one total order of INIT surgery (_init_order): surgery that needs
        # the original layers goes first; what acts on the factors (SE after the pair, WS on
        # each factor, norms and dropout elsewhere, channels_last on the new convs) goes
        # after; no_op_model replaces the model last.
        return init_surgery("factorize", reads={"model.modules", "model.weights"})

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        self.replaced = apply_factorization(
            state.model,
            factorize_convs=self.factorize_convs,
            factorize_linears=self.factorize_linears,
            min_channels=self.min_channels,
            latent_channels=self.latent_channels,
            min_features=self.min_features,
            latent_features=self.latent_features,
        )
        if not self.replaced:
            warnings.warn(
                "factorize: no layer qualified (min_channels="
                f"{self.min_channels}, min_features={self.min_features}, or the rank would "
                "not reduce the cost); the model is unchanged",
                stacklevel=2,
            )
        self.transposed = [
            n for n in self.replaced if getattr(state.model.get_submodule(n), "transposed", False)
        ]
        logger.log_metrics({"factorize/num_replaced": len(self.replaced)})

    # -- export and resume ------------------------------------------------------------------

    def exported_weights(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each factor pair's product under the original layer's keys (Eckart-Young: the
        best rank-r weight), so the export loads into the unfactorized architecture."""
        out = dict(weights)
        for key in [k for k in weights if k.endswith(".first.weight")]:
            prefix = key[: -len(".first.weight")]
            second = weights.get(f"{prefix}.second.weight")
            if second is None:
                continue
            first = weights[key]
            if first.dim() == 2:  # Linear: [out, r] @ [r, in]
                merged = second @ first
                if prefix in self.transposed:  # transformers Conv1D stores [in, out]
                    merged = merged.t()
            else:  # k x k conv to r channels, then 1 x 1 conv to d channels
                merged = torch.einsum("dr,rchw->dchw", second[:, :, 0, 0], first)
            del out[key], out[f"{prefix}.second.weight"]
            out[f"{prefix}.weight"] = merged.contiguous()
            if f"{prefix}.second.bias" in out:
                out[f"{prefix}.bias"] = out.pop(f"{prefix}.second.bias")
        return out

    def state_dict(self) -> dict:
        # The surgery reruns at INIT on resume; which layers were Conv1D is kept for export.
        return {"replaced": list(self.replaced), "transposed": list(self.transposed)}

    def load_state_dict(self, state: dict) -> None:
        self.replaced = list(state.get("replaced", self.replaced))
        self.transposed = list(state.get("transposed", []))
