"""Patch-whitening initialisation of the first convolution, then frozen.

**What.** The first convolution's filters are set from the training images instead of at
random: the uncentred covariance ``C = E[p p^T]`` of the ``C_in x k x k`` patches ``p`` of the
(normalised) training images is eigendecomposed, ``C = sum_i lambda_i v_i v_i^T``, and each
eigenvector becomes a filter scaled by ``1 / sqrt(lambda_i + eps)``, so that the responses to
training patches have (nearly) unit, uncorrelated second moments: the layer whitens its
input. The filters are used twice, ``[W, -W]``, so that the nonlinearity after the layer sees
both signs of every whitened component. The weight is then frozen (never in the optimizer);
its bias, if it has one, trains for a first phase (``bias_phase``) and is frozen after it.

This is airbench's whitening layer (Jordan 2024, "94% on CIFAR-10 in 3.29 seconds on a single
GPU", arXiv 2404.00498; reference ``airbench94_muon.py``, ``init_whiten``, descending from
tysam-code's hlb-CIFAR10): a 2x2 conv from 3 to 24 channels, without padding, whose filters
come from the patches of 5,000 training images with ``eps = 5e-4``, frozen, with the bias
trained for the first 3 epochs. The defaults follow it. Here the layer is whatever first
``Conv2d`` the model has (or the one named by ``layer``): with ``2 * C_in * k * k`` output
channels (airbench's 24 for 2x2 on RGB) every component is used; with fewer, the ``out // 2``
components of largest variance are (a principal-component whitening); filters beyond
``2 * C_in * k * k`` keep their initial values and are frozen with the rest.

Departures, and why: airbench decays the bias's learning rate linearly to zero over its phase
with its own learning rate; here the bias follows the run's optimizer and schedule and simply
stops at the end of its phase, because a separate param group would change the optimizer's
structure that checkpoints and other algorithms rely on. The patches are taken over the whole
image at stride 1 and without padding, whatever the layer's stride or padding (airbench's
layer has neither). The images are the first ``num_images`` of an in-memory training set
(airbench's ``train_images[:5000]``) after the train transform, or the first batches a
streaming loader yields.

**When it helps.** Short, fast training of small conv nets: the first layer starts as a
useful feature extractor and needs no gradient. It is part of every airbench and
hlb-CIFAR10 record (airbench94: 94% CIFAR-10 in 3.29 s on an A100); no isolated ablation
figure is published with it, so its effect here is what the project's suite measures. It
costs one pass over ``num_images`` images before training (logged as
``whitening_init/seconds``) and saves the first layer's weight gradient every step.

**Composes badly with.** Weight standardisation (it would re-standardise the whitening
filters: declared incompatible). Pruning the first layer (masks would zero whitening
filters). A change of input normalisation after initialisation (the filters are specific to
the statistics they were computed from). On resume the saved weights are loaded and never
recomputed: a different image subset would change them.

Functional twin: :func:`whitening_filters` (with :func:`patch_covariance` and
:func:`init_whitening`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from speedup import distributed
from speedup.algorithm import Access, Algorithm, Declaration
from speedup.errors import ConfigError
from speedup.event import Event
from speedup.time import Time, schedule_time

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = ["WhiteningInit", "init_whitening", "patch_covariance", "whitening_filters"]

_CHUNK = 256  # images per unfold: bounds the memory of the patch matrix


def _patches(images: torch.Tensor, kernel_size: tuple[int, int], dilation: Any = 1) -> torch.Tensor:
    """Every stride-1 patch of ``[N, C, H, W]`` images as rows ``[N * L, C * kh * kw]``,
    flattened in the order of a conv weight ``[C, kh, kw]``."""
    columns = F.unfold(images.float(), kernel_size, dilation=dilation)  # [N, C*kh*kw, L]
    return columns.transpose(1, 2).reshape(-1, columns.shape[1])


def patch_covariance(
    images: torch.Tensor, kernel_size: int | tuple[int, int] = 2, dilation: Any = 1
) -> tuple[torch.Tensor, int]:
    """The uncentred covariance ``mean(p p^T)`` of every stride-1 ``kernel_size`` patch ``p``
    of ``[N, C, H, W]`` images (float64, ``[C*kh*kw, C*kh*kw]``), and the number of patches."""
    kernel = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    total, count = None, 0
    for chunk in images.split(_CHUNK):
        # In float64: the small eigenvalues' filters are scaled by 1 / sqrt(lambda), so
        # rounding errors in the covariance grow into visible errors in those filters.
        rows = _patches(chunk, kernel, dilation).double()
        part = rows.T @ rows
        total = part if total is None else total + part
        count += rows.shape[0]
    if total is None or count == 0:
        raise ValueError(f"no {kernel} patches in images of shape {tuple(images.shape)}")
    return total / count, count


def whitening_filters(
    covariance: torch.Tensor,
    in_channels: int,
    kernel_size: int | tuple[int, int] = 2,
    eps: float = 5e-4,
    pairs: int | None = None,
) -> torch.Tensor:
    """``[W, -W]`` (``[2 * pairs, in_channels, kh, kw]``) from a patch covariance: ``W`` holds
    the eigenvectors of the ``pairs`` largest eigenvalues (all by default), each divided by
    ``sqrt(lambda + eps)``, largest first."""
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    dim = in_channels * kh * kw
    if covariance.shape != (dim, dim):
        raise ValueError(
            f"covariance of shape {tuple(covariance.shape)} does not fit {in_channels}x{kh}x{kw} "
            f"patches ({dim} values)"
        )
    pairs = dim if pairs is None else pairs
    if not 1 <= pairs <= dim:
        raise ValueError(f"pairs must be in [1, {dim}], got {pairs}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())  # ascending
    order = eigenvalues.argsort(descending=True)[:pairs]
    scale = (eigenvalues[order].clamp(min=0) + eps).rsqrt()
    filters = (eigenvectors[:, order] * scale).T.reshape(pairs, in_channels, kh, kw)
    return torch.cat([filters, -filters])


def init_whitening(
    conv: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4, freeze: bool = True
) -> int:
    """Set ``conv``'s filters to the whitening filters of ``images``' patches (see the module
    doc: the ``min(out // 2, C*kh*kw)`` largest components and their negations; the rest keep
    their values) and freeze its weight. Returns the number of pairs set."""
    kernel = tuple(conv.kernel_size)
    if conv.groups != 1:
        raise ValueError(f"whitening needs an ungrouped convolution, got groups={conv.groups}")
    if images.dim() != 4 or images.shape[1] != conv.in_channels:
        raise ValueError(
            f"images of shape {tuple(images.shape)} do not fit a conv with "
            f"{conv.in_channels} input channels"
        )
    pairs = min(conv.out_channels // 2, conv.in_channels * kernel[0] * kernel[1])
    if pairs < 1:
        raise ValueError(
            f"a conv with {conv.out_channels} output channel(s) has no room for [W, -W]"
        )
    covariance, _ = patch_covariance(images.to(conv.weight.device), kernel, conv.dilation)
    filters = whitening_filters(covariance, conv.in_channels, kernel, eps, pairs)
    with torch.no_grad():
        conv.weight[: 2 * pairs].copy_(filters.to(conv.weight.dtype))
    if freeze:
        conv.weight.requires_grad_(False)
    return pairs


def _first_conv(model: nn.Module, layer: str | None) -> tuple[str, nn.Conv2d]:
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if layer is None:
        if not convs:
            raise ConfigError("algorithms.whitening_init: the model has no Conv2d to initialise")
        return convs[0]
    found = dict(convs)
    if layer not in found:
        shown = ", ".join(n for n, _ in convs[:8]) or "(none)"
        raise ConfigError(
            f"algorithms.whitening_init.layer: {layer!r} is not a Conv2d of the model; its "
            f"Conv2d layers: {shown}"
        )
    return layer, found[layer]


def _training_images(loader: Any, count: int) -> tuple[torch.Tensor, bool]:
    """The first ``count`` training images as the model sees them (train transform applied),
    drawing nothing from the global RNG; and whether they are this process's own share."""
    with torch.random.fork_rng(devices=[]):  # a random flip in the transform draws here
        tensors = getattr(loader, "tensors", None)
        if isinstance(tensors, dict) and isinstance(tensors.get("inputs"), torch.Tensor):
            batch = {k: v[:count] for k, v in tensors.items()}
            transform = getattr(loader, "transform", None)
            batch = transform(batch) if transform is not None else batch
            return batch["inputs"], False
        parts, have = [], 0
        for batch in loader:
            inputs = batch["inputs"] if isinstance(batch, dict) else batch[0]
            parts.append(inputs[: count - have])
            have += parts[-1].shape[0]
            if have >= count:
                break
    if not parts:
        raise ConfigError("algorithms.whitening_init: the train dataloader yielded no images")
    return torch.cat(parts), True


class WhiteningInit(Algorithm):
    """Initialise the first conv as a patch-whitening layer from training images; freeze it."""

    name = "whitening_init"

    #: Tuner range: the eigenvalue floor around airbench's 5e-4 (Jordan 2024, arXiv 2404.00498).
    SEARCH_SPACE = {"eps": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}

    def __init__(
        self,
        num_images: int = 5000,
        eps: float = 5e-4,
        bias_phase: str | None = "3ep",
        layer: str | None = None,
    ) -> None:
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(
                f"whitening_init.num_images must be an integer >= 1, got {num_images!r}"
            )
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
            raise ValueError(f"whitening_init.eps must be a number >= 0, got {eps!r}")
        self.num_images = num_images
        self.eps = float(eps)
        #: How long the first conv's bias trains (None: the whole run).
        self.bias_phase: Time | None = (
            None if bias_phase is None else schedule_time("whitening_init.bias_phase", bias_phase)
        )
        self.layer = layer
        #: Whether the filters were computed (a resumed run loads them and never recomputes).
        self.initialised = False
        self.bias_frozen = False
        self._conv: nn.Conv2d | None = None
        self._bias_end: float | None = None  # in batches, resolved at fit start

    def declare(self) -> Declaration:
        return Declaration(
            events={
                # Frozen before the optimizer is built, so it never holds the weight.
                Event.INIT: Access(reads={"model.modules"}, writes={"model.mode"}),
                # After any checkpoint is loaded: a resumed run keeps the saved filters.
                Event.AFTER_LOAD: Access(
                    reads={"dataloader", "model.modules"}, writes={"model.weights"}
                ),
                Event.FIT_START: Access(reads={"timestamp", "max_duration"}, writes={"model.mode"}),
                Event.BATCH_END: Access(reads={"timestamp"}, writes={"model.mode"}),
            },
            runs_after={
                "blurpool",
                "factorize",
                "stochastic_depth",
                "squeeze_excite",
                "ghost_batchnorm",
                "layer_freezing",
            },  # fmt: skip
            runs_before={"channels_last", "no_op_model"},
            incompatible_with={"weight_standardization"},
            model_kinds={"cnn"},
            data_kinds={"image"},
            # The bias stops getting a gradient at the end of its phase: DDP must expect that.
            unused_parameters=self.bias_phase is not None,
        )

    def time_constants(self) -> dict[str, Time]:
        return {} if self.bias_phase is None else {"bias_phase": self.bias_phase}

    def match(self, event: Event, state: State) -> bool:
        if event == Event.BATCH_END:
            return (
                self._bias_end is not None
                and not self.bias_frozen
                and state.timestamp.batch >= self._bias_end
            )
        return True

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            _, self._conv = _first_conv(state.model, self.layer)
            self._conv.weight.requires_grad_(False)
        elif event == Event.AFTER_LOAD:
            if not self.initialised:
                self._initialise(state, logger)
        elif event == Event.FIT_START:
            self._resolve_bias_phase(state)
            if self.bias_frozen or (
                self._bias_end is not None and state.timestamp.batch >= self._bias_end
            ):
                self._freeze_bias()
        else:
            self._freeze_bias()
            logger.log_metrics({"whitening_init/bias_frozen_at": state.timestamp.batch})

    def _initialise(self, state: State, logger: Logger) -> None:
        assert self._conv is not None
        started = time.perf_counter()
        images, shared = _training_images(state.train_dataloader, self.num_images)
        conv = self._conv
        try:
            if shared and distributed.world_size() > 1:
                # Each process saw its own share: average the covariance over all of them.
                kernel = tuple(conv.kernel_size)
                covariance, count = patch_covariance(
                    images.to(conv.weight.device), kernel, conv.dilation
                )
                packed = torch.cat([covariance.flatten() * count, torch.tensor([count]).double()])
                packed = distributed.all_reduce_sum(packed.to(state.device)).cpu()
                covariance = (packed[:-1] / packed[-1]).view_as(covariance)
                pairs = min(conv.out_channels // 2, conv.in_channels * kernel[0] * kernel[1])
                filters = whitening_filters(covariance, conv.in_channels, kernel, self.eps, pairs)
                with torch.no_grad():
                    conv.weight[: 2 * pairs].copy_(filters.to(conv.weight.dtype))
            else:
                init_whitening(conv, images, self.eps)
        except ValueError as err:
            raise ConfigError(f"algorithms.whitening_init: {err}") from None
        self.initialised = True
        logger.log_metrics(
            {
                "whitening_init/seconds": time.perf_counter() - started,
                "whitening_init/images": int(images.shape[0]),
            }
        )

    def _resolve_bias_phase(self, state: State) -> None:
        assert self._conv is not None
        if self.bias_phase is None or self._conv.bias is None:
            self._bias_end = None
            return
        try:
            self._bias_end = state.converter.to_batches(self.bias_phase)
        except ValueError as err:
            raise ConfigError(f"algorithms.whitening_init.bias_phase: {err}") from None

    def _freeze_bias(self) -> None:
        assert self._conv is not None
        if self._conv.bias is not None:
            self._conv.bias.requires_grad_(False)
        self.bias_frozen = True

    @property
    def conv(self) -> nn.Conv2d | None:
        """The whitened convolution (found at INIT)."""
        return self._conv

    def state_dict(self) -> dict:
        return {"initialised": self.initialised, "bias_frozen": self.bias_frozen}

    def load_state_dict(self, state: dict) -> None:
        self.initialised = bool(state.get("initialised", False))
        self.bias_frozen = bool(state.get("bias_frozen", False))
