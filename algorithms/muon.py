"""Muon: orthogonalised momentum for hidden weight matrices.

**What.** For every hidden weight matrix, Muon keeps a momentum buffer ``B <- mu * B + (1 -
mu) * g`` (an EMA; Nesterov uses ``g + mu * (B - g)``), replaces the update by an approximate
orthogonalisation of it, five Newton-Schulz iterations ``X <- a X + (b A + c A^2) X`` with
``A = X X^T``, ``(a, b, c) = (3.4445, -4.7750, 2.0315)``, in bfloat16 on the update divided by
its Frobenius norm (tall matrices transposed first), decays the weight ``W <- W (1 - lr * wd)``
with the *unadjusted* lr, and steps ``W <- W - lr * s * O`` with a per-shape scale ``s``
(Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks", blog post and
github.com/KellerJordan/Muon; the update of ``torch.optim.Muon``, which this module uses where
the installed torch has it, with an own implementation of the same update for older torch,
tested equal to torch's). ``lr_scaling`` picks ``s``: ``original`` ``sqrt(max(1, out/in))``
(update RMS about ``1/sqrt(in)``, Jordan's), or ``match_rms_adamw`` ``0.2 * sqrt(max(out,
in))`` (update RMS about 0.2, so AdamW's lr and weight decay carry over: Liu et al. 2025,
"Muon is Scalable for LLM Training", arXiv 2502.16982).

Routing follows the reference (Muon README; its ``muon.py``): Muon trains the hidden ``>=2``-D
weights of linear and convolution layers, convolution filters viewed as ``(out, in*kh*kw)``
matrices; everything else stays with the run's own optimizer (AdamW, or SGD): embeddings, the
output head, biases, norm gains, and the input layer (the first convolution or linear layer
when the model has no embedding: airbench94_muon keeps its first conv out of Muon). GPT-2's
fused query-key-value projection (Hugging Face ``Conv1D`` ``c_attn``, stored ``(in, out)``) is
orthogonalised per matrix, as three ``(d, d)`` blocks (modded-nanogpt's later records did the
same). ``exclude`` routes more parameters (shell patterns on their names) to the run's
optimizer. Muon's learning rate follows the run's LR schedule with the run's optimizer: every
param group, Muon's included, gets the schedule's multiplier.

**When it helps.** Language-model and CIFAR speedruns: modded-nanogpt's record #3 went from
31.4 to 24.9 minutes with Muon, whose README claims about 1.5x sample efficiency over AdamW at
under 2% wall-clock overhead; airbench94_muon reaches 94% on CIFAR-10 in 2.59 s against 3.09 s
for the record before it (its README). Liu et al. report about 2x compute efficiency over AdamW
at compute-optimal LLM training (their Fig. 1) with weight decay and ``match_rms_adamw``.
Suggested hidden-layer settings (Jordan): lr 0.02, momentum 0.95 (these defaults), with AdamW
around 3e-4, betas (0.9, 0.95) for the rest; only lr and weight decay need tuning. On tiny
models, Newton-Schulz costs more per step than it saves (the matrices are small).

**Composes badly with.** Schedule-free optimizers (both replace the run's optimizer: declared
incompatible). FSDP (the iteration needs whole matrices; refused). Lookahead composes (it acts
on the weights after each step), but airbench94_muon's filter renormalisation does not exist
here.

**Checkpoint.** The run's optimizer state is saved in its own layout (so a resumed run loads it
into the optimizer it builds), and Muon's momentum buffers in this algorithm's state, keyed by
parameter name.

Functional twin: :func:`newton_schulz` and :func:`muon_update` (one parameter's update), and
:func:`muon_optimizer` (a whole optimizer for a model, with the routing, for any loop).
"""

from __future__ import annotations

import fnmatch
import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from speedup.algorithm import Access, Algorithm, Declaration
from speedup.errors import ConfigError
from speedup.event import Event
from speedup.optim import build_optimizer

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = [
    "LR_SCALINGS",
    "Muon",
    "MuonOptimizer",
    "muon_optimizer",
    "muon_routing",
    "muon_update",
    "newton_schulz",
]

#: Jordan's quintic Newton-Schulz coefficients (Muon README; ``torch.optim.Muon``'s defaults).
COEFFICIENTS = (3.4445, -4.7750, 2.0315)
EPS = 1e-7
#: ``lr_scaling`` -> the update's scale for an ``(out, in)`` matrix.
LR_SCALINGS: dict[str, Callable[[int, int], float]] = {
    "original": lambda out, in_: math.sqrt(max(1.0, out / in_)),
    "match_rms_adamw": lambda out, in_: 0.2 * math.sqrt(max(out, in_)),
}
#: The settings :func:`muon_update` and ``torch.optim.Muon``'s param groups name alike (they
#: differ on ``lr_scaling``, torch's ``adjust_lr_fn``).
_SAME_NAMES = ("lr", "weight_decay", "momentum", "nesterov", "ns_steps")
#: Muon's settings as :class:`MuonOptimizer` and :class:`Muon` take them.
_SETTINGS = (*_SAME_NAMES, "lr_scaling")

# -- the update -------------------------------------------------------------------------------


def newton_schulz(
    matrix: torch.Tensor,
    steps: int = 5,
    coefficients: Sequence[float] = COEFFICIENTS,
    eps: float = EPS,
) -> torch.Tensor:
    """Approximately orthogonalise a 2-D ``matrix`` (``U S V^T -> U S' V^T`` with ``S'`` near
    1): in bfloat16, transposed when tall, divided by its Frobenius norm (at least ``eps``),
    then ``steps`` iterations ``X <- a X + (b A + c A^2) X``, ``A = X X^T``. Returns bfloat16."""
    if matrix.ndim != 2:
        raise ValueError(f"newton_schulz takes a 2-D matrix, got shape {tuple(matrix.shape)}")
    a, b, c = coefficients
    tall = matrix.size(0) > matrix.size(1)
    x = matrix.bfloat16()
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        # addmm(input, m1, m2, beta, alpha) = beta * input + alpha * m1 @ m2: one rounding
        # per product in bfloat16, as torch.optim.Muon does.
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x.T if tall else x


@torch.no_grad()
def muon_update(
    weight: torch.Tensor,
    grad: torch.Tensor,
    buffer: torch.Tensor,
    *,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    coefficients: Sequence[float] = COEFFICIENTS,
    eps: float = EPS,
    lr_scaling: str = "original",
) -> None:
    """One Muon step for one ``(out, in)`` weight matrix, in place on ``weight`` and
    ``buffer`` (the momentum, same shape, zeros at first). A convolution filter passes
    ``weight.flatten(1)`` views (contiguous filters), so ``in`` is ``in_channels * kh * kw``."""
    if weight.ndim != 2 or grad.shape != weight.shape or buffer.shape != weight.shape:
        raise ValueError(
            f"muon_update takes matrices of one shape; got weight {tuple(weight.shape)}, grad "
            f"{tuple(grad.shape)}, buffer {tuple(buffer.shape)}"
        )
    if lr_scaling not in LR_SCALINGS:
        raise ValueError(f"lr_scaling {lr_scaling!r}: allowed {', '.join(LR_SCALINGS)}")
    buffer.lerp_(grad, 1 - momentum)
    direction = grad.lerp(buffer, momentum) if nesterov else buffer
    orthogonal = newton_schulz(direction, ns_steps, coefficients, eps)
    scale = LR_SCALINGS[lr_scaling](weight.size(0), weight.size(1))
    weight.mul_(1 - lr * weight_decay)  # decoupled, with the unadjusted lr
    weight.add_(orthogonal, alpha=-lr * scale)


def _closure_loss(closure: Callable[[], Any] | None) -> Any:
    """The loss a ``step(closure)`` re-evaluates (with gradients on), as torch's optimizers do."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class _OwnMuon(torch.optim.Optimizer):
    """Muon over 2-D tensors with ``torch.optim.Muon``'s arguments and state layout (a
    ``momentum_buffer`` per tensor), for torch versions without it."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: Sequence[float] = COEFFICIENTS,
        eps: float = EPS,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=tuple(ns_coefficients),
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = _closure_loss(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                muon_update(
                    p,
                    p.grad,
                    state["momentum_buffer"],
                    coefficients=group["ns_coefficients"],
                    eps=group["eps"],
                    lr_scaling=group["adjust_lr_fn"] or "original",
                    **{key: group[key] for key in _SAME_NAMES},
                )
        return loss


def _muon_class() -> type[torch.optim.Optimizer]:
    """torch's Muon where this torch has it (2.9 and later), else the same update here."""
    return getattr(torch.optim, "Muon", _OwnMuon)


def _torch_muon_args(hyper: Mapping[str, Any]) -> dict[str, Any]:
    """Muon's settings (``lr_scaling`` and the rest, as :class:`MuonOptimizer`'s group holds
    them) under ``torch.optim.Muon``'s names, for building it and for updating its group."""
    return {**{key: hyper[key] for key in _SAME_NAMES}, "adjust_lr_fn": hyper["lr_scaling"]}


# -- routing ----------------------------------------------------------------------------------

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a linear layer whose weight is stored ``(in, out)``;
    recognised by duck type so the algorithm does not import transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _chunks(module: nn.Module, parent: nn.Module | None) -> int:
    """How many matrices a fused projection holds: GPT-2's ``c_attn`` packs query, key and
    value (``nf == 3 * split_size`` of its attention module), orthogonalised one by one."""
    split = getattr(parent, "split_size", None)
    if _is_hf_conv1d(module) and isinstance(split, int) and module.nf == 3 * split:
        return 3
    return 1


def muon_routing(
    model: nn.Module, exclude: Sequence[str] = (), trainable: Iterable[nn.Parameter] | None = None
) -> dict[str, str]:
    """Each trainable parameter's route by name: ``muon`` or ``aux`` (the run's optimizer).

    Muon: the weights of linear layers (``nn.Linear``, Hugging Face ``Conv1D``) and
    convolutions, except the input layer (the first of them when the model has no embedding)
    and the output head (the last of them), and except names matching an ``exclude`` pattern.
    Tied weights (a head sharing the embedding) appear once, under their first name."""
    allowed = {id(p) for p in trainable} if trainable is not None else None
    layers = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, *_CONV)) or _is_hf_conv1d(module)
    ]
    has_embedding = any(isinstance(m, nn.Embedding) for m in model.modules())
    edge = {id(layers[-1][1])} if layers else set()  # the output head
    if layers and not has_embedding:
        edge.add(id(layers[0][1]))  # the input layer sees the raw inputs
    hidden = {
        id(module.weight)
        for _, module in layers
        if id(module) not in edge and getattr(module, "weight", None) is not None
    }
    routes = {}
    for name, param in model.named_parameters():
        if not param.requires_grad or (allowed is not None and id(param) not in allowed):
            continue
        excluded = any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)
        routes[name] = "muon" if id(param) in hidden and not excluded else "aux"
    return routes


def _matrix_views(model: nn.Module) -> dict[int, Callable[[torch.Tensor], list[torch.Tensor]]]:
    """For each layer weight (by id): the function giving its ``(out, in)`` matrices."""
    parents = {id(child): module for module in model.modules() for child in module.children()}
    views: dict[int, Callable[[torch.Tensor], list[torch.Tensor]]] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        if _is_hf_conv1d(module):
            n = _chunks(module, parents.get(id(module)))
            width = module.nf // n
            views[id(weight)] = functools.partial(_conv1d_blocks, n=n, width=width)
        elif isinstance(module, _CONV):
            views[id(weight)] = _flat_filters
        elif isinstance(module, nn.Linear):
            views[id(weight)] = _as_list
    return views


def _as_list(t: torch.Tensor) -> list[torch.Tensor]:
    return [t]


def _flat_filters(t: torch.Tensor) -> list[torch.Tensor]:
    return [t.flatten(1)]  # a view for contiguous filters, a copy for channels_last ones


def _conv1d_blocks(t: torch.Tensor, n: int, width: int) -> list[torch.Tensor]:
    return [t[:, i * width : (i + 1) * width].T for i in range(n)]


def _shares_storage(view: torch.Tensor, base: torch.Tensor) -> bool:
    return view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


# -- the optimizer ----------------------------------------------------------------------------


class _NothingRouted(ValueError):
    """No parameter qualifies for Muon (the algorithm says so in its own, config terms)."""


class MuonOptimizer(torch.optim.Optimizer):
    """Muon for the routed matrices plus another optimizer (``aux``) for the rest, as one
    optimizer: ``param_groups`` are ``aux``'s groups (the same dicts) then Muon's group, so LR
    schedulers, gradient scalers and ``zero_grad`` see every parameter.

    ``matrices`` are ``(name, parameter, views)`` with ``views(tensor)`` giving the parameter's
    ``(out, in)`` matrices. ``layout`` is the parameter lists of ``aux``'s groups before the
    Muon parameters were taken out of them: :meth:`state_dict` writes ``aux``'s state in that
    layout, so it loads into the optimizer a fresh run builds, and Muon's momentum goes under
    ``"muon"`` by parameter name (or only to :meth:`muon_state_dict`, see ``momentum_in_state``).
    """

    def __init__(
        self,
        matrices: Sequence[tuple[str, nn.Parameter, Callable[[torch.Tensor], list[torch.Tensor]]]],
        aux: torch.optim.Optimizer,
        layout: Sequence[Sequence[torch.Tensor]] | None = None,
        *,
        lr: float = 0.02,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        lr_scaling: str = "original",
        momentum_in_state: bool = True,
    ) -> None:
        if lr_scaling not in LR_SCALINGS:
            raise ValueError(f"lr_scaling {lr_scaling!r}: allowed {', '.join(LR_SCALINGS)}")
        if not matrices:
            raise _NothingRouted("no parameter is routed to Muon")
        hyper = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            lr_scaling=lr_scaling,
        )
        super().__init__([p for _, p, _ in matrices], hyper)
        self.aux = aux
        self.momentum_in_state = momentum_in_state
        self._layout = [list(ps) for ps in layout] if layout is not None else None
        self._entries = []  # (name, parameter, views, proxies)
        proxies: list[torch.Tensor] = []
        for name, param, views in matrices:
            mats = views(param.detach())
            own = [nn.Parameter(m.detach().clone(), requires_grad=False) for m in mats]
            self._entries.append((name, param, views, own))
            proxies += own
        self._muon = _muon_class()(proxies, **_torch_muon_args(hyper))
        # One state mapping for all three, so clearing it (a weight rewind) resets everything.
        self.state.update(aux.state)
        aux.state = self.state
        self._muon.state = self.state
        self.param_groups = [*aux.param_groups, self.param_groups[0]]

    @property
    def muon_group(self) -> dict[str, Any]:
        return self.param_groups[-1]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = _closure_loss(closure)
        self.aux.step()
        # The muon group is the one schedulers and users change; torch's Muon steps with it.
        self._muon.param_groups[0].update(_torch_muon_args(self.muon_group))
        copies = []
        for _, param, views, proxies in self._entries:
            grad = param.grad
            weights = views(param.detach())
            grads = views(grad) if grad is not None else [None] * len(proxies)
            for proxy, weight, g in zip(proxies, weights, grads, strict=True):
                proxy.data = weight  # a view of the weight: the update lands in it
                proxy.grad = g
            if grad is not None and not all(_shares_storage(w, param) for w in weights):
                copies.append((param, proxies))
        self._muon.step()
        for param, proxies in copies:  # filters not viewable as matrices (channels_last)
            param.copy_(proxies[0].detach().reshape(param.shape))
        for _, _, _, proxies in self._entries:
            for proxy in proxies:
                proxy.grad = None
        return loss

    # -- state --------------------------------------------------------------------------------

    def muon_state_dict(self) -> dict[str, list[torch.Tensor]]:
        """Muon's momentum buffers by parameter name (one per matrix; none before a step)."""
        found = {}
        for name, _, _, proxies in self._entries:
            buffers = [self.state.get(p, {}).get("momentum_buffer") for p in proxies]
            if all(b is not None for b in buffers):
                found[name] = [b.detach().clone() for b in buffers]
        return found

    def load_muon_state_dict(self, buffers: Mapping[str, Sequence[torch.Tensor]]) -> None:
        names = {name for name, *_ in self._entries}
        unknown = sorted(set(buffers) - names)
        if unknown:
            raise ValueError(f"muon: momentum saved for parameters this model lacks: {unknown}")
        for name, param, _, proxies in self._entries:
            if name not in buffers:
                continue
            saved = list(buffers[name])
            if [tuple(b.shape) for b in saved] != [tuple(p.shape) for p in proxies]:
                raise ValueError(f"muon: saved momentum of {name} does not fit its shape")
            for proxy, buf in zip(proxies, saved, strict=True):
                self.state[proxy]["momentum_buffer"] = buf.to(param.device, param.dtype).clone()

    def _flat_layout(self) -> list[torch.Tensor]:
        layout = self._layout or [g["params"] for g in self.aux.param_groups]
        return [p for params in layout for p in params]

    def state_dict(self) -> dict[str, Any]:
        layout = self._layout or [list(g["params"]) for g in self.aux.param_groups]
        index = {id(p): i for i, p in enumerate(self._flat_layout())}
        groups = []
        for group, params in zip(self.aux.param_groups, layout, strict=True):
            saved = {k: v for k, v in group.items() if k != "params"}
            saved["params"] = [index[id(p)] for p in params]
            groups.append(saved)
        owned = {id(p) for g in self.aux.param_groups for p in g["params"]}
        state = {
            index[id(p)]: dict(values)
            for p, values in self.state.items()
            if id(p) in owned and id(p) in index
        }
        out: dict[str, Any] = {"state": state, "param_groups": groups}
        if self.momentum_in_state:
            out["muon"] = self.muon_state_dict()
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        flat = self._flat_layout()
        owned = {id(p) for g in self.aux.param_groups for p in g["params"]}
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.aux.param_groups):
            raise ValueError(
                f"saved {len(saved_groups)} param groups, this optimizer has "
                f"{len(self.aux.param_groups)} besides Muon's"
            )
        for group, saved in zip(self.aux.param_groups, saved_groups, strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
        for index, values in state_dict["state"].items():
            param = flat[int(index)]
            if id(param) not in owned:
                continue
            self.state[param] = {k: _cast(v, param, k) for k, v in values.items()}
        if "muon" in state_dict:
            self.load_muon_state_dict(state_dict["muon"])


def _cast(value: Any, param: torch.Tensor, key: str) -> Any:
    """Saved optimizer state onto the parameter's device; floating tensors take its dtype,
    except ``step`` counters (``torch.optim.Optimizer.load_state_dict``'s policy)."""
    if not isinstance(value, torch.Tensor):
        return value
    if key != "step" and value.is_floating_point():
        return value.to(param.device, param.dtype)
    return value.to(param.device)


def _split(
    model: nn.Module,
    base: torch.optim.Optimizer,
    exclude: Sequence[str],
) -> list[tuple[str, nn.Parameter, Callable[[torch.Tensor], list[torch.Tensor]]]]:
    """Take the Muon-routed parameters out of ``base``'s groups; return them with their views."""
    trainable = [p for g in base.param_groups for p in g["params"]]
    routes = muon_routing(model, exclude, trainable)
    named = dict(model.named_parameters())
    views = _matrix_views(model)
    chosen = [(n, named[n], views[id(named[n])]) for n, r in routes.items() if r == "muon"]
    taken = {id(p) for _, p, _ in chosen}
    for group in base.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in taken]
    return chosen


def _hybrid(
    model: nn.Module, base: torch.optim.Optimizer, exclude: Sequence[str], **options: Any
) -> MuonOptimizer:
    """``base`` without ``model``'s Muon-routed parameters, joined with Muon for them;
    ``options`` are :class:`MuonOptimizer`'s keywords."""
    layout = [list(g["params"]) for g in base.param_groups]  # before the split: the saved layout
    return MuonOptimizer(_split(model, base, exclude), base, layout, **options)


def muon_optimizer(
    model: nn.Module,
    aux: Mapping[str, Any] | None = None,
    *,
    lr: float = 0.02,
    weight_decay: float = 0.0,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    lr_scaling: str = "original",
    exclude: Sequence[str] = (),
) -> MuonOptimizer:
    """A Muon optimizer for ``model``, usable in any loop: hidden matrices with Muon, the rest
    with ``aux`` (a spec as in recipes; default AdamW lr 3e-4, betas (0.9, 0.95), Jordan's
    suggestion). ``state_dict()`` round-trips through ``load_state_dict()``."""
    spec = dict(aux or {"name": "adamw", "lr": 3e-4, "betas": (0.9, 0.95)})
    params = [p for p in model.parameters() if p.requires_grad]
    return _hybrid(
        model,
        build_optimizer(params, spec),
        exclude,
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        nesterov=nesterov,
        ns_steps=ns_steps,
        lr_scaling=lr_scaling,
    )


def _track_steps(optimizer: torch.optim.Optimizer) -> None:
    """Mark ``optimizer.step`` the way an LR scheduler marks the optimizer it is built with
    (it warns when the step it watches is not marked), since schedulers move to this one."""
    step = optimizer.step

    @functools.wraps(step)
    def tracked(*args: Any, **kwargs: Any) -> Any:
        optimizer._opt_called = True  # type: ignore[attr-defined]
        return step(*args, **kwargs)

    tracked._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = tracked  # type: ignore[method-assign]


class Muon(Algorithm):
    """Train hidden weight matrices with Muon; the run's optimizer keeps the rest.

    ``lr``, ``weight_decay``, ``momentum``, ``nesterov`` and ``ns_steps`` are Muon's (Jordan's
    defaults: lr 0.02, momentum 0.95 Nesterov, 5 iterations, no weight decay); ``lr_scaling``
    is ``original`` or ``match_rms_adamw``; ``exclude`` lists name patterns kept off Muon.
    """

    name = "muon"

    #: Tuner ranges: Muon's own LR for the hidden matrices around the speedruns' 0.02-0.05
    #: (Jordan et al. 2024, modded-nanogpt and airbench94_muon), momentum around their 0.95.
    SEARCH_SPACE = {
        "lr": {"type": "float", "low": 0.005, "high": 0.08, "log": True},
        "momentum": {"type": "float", "low": 0.85, "high": 0.98},
    }

    def __init__(
        self,
        lr: float = 0.02,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        lr_scaling: str = "original",
        exclude: list[str] | None = None,
    ) -> None:
        for key, value, low in (("lr", lr, 0.0), ("weight_decay", weight_decay, 0.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
                raise ValueError(f"muon.{key}: a number >= {low}; got {value!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
            raise ValueError(f"muon.momentum: a number in [0, 1); got {momentum!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"muon.momentum: a number in [0, 1); got {momentum!r}")
        if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or not 1 <= ns_steps < 100:
            raise ValueError(
                f"muon.ns_steps: Newton-Schulz iterations in [1, 99]; got {ns_steps!r}"
            )
        if lr_scaling not in LR_SCALINGS:
            raise ValueError(
                f"muon.lr_scaling: unknown {lr_scaling!r}; allowed: {', '.join(LR_SCALINGS)}"
            )
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.ns_steps = ns_steps
        self.lr_scaling = lr_scaling
        self.exclude = list(exclude or [])
        self.optimizer: MuonOptimizer | None = None
        self._pending: dict[str, list[torch.Tensor]] | None = None

    def declare(self) -> Declaration:
        return Declaration(
            events={
                Event.AFTER_LOAD: Access(
                    reads={"model.modules", "optimizer", "scheduler"},
                    writes={"optimizer", "scheduler", "lr"},
                )
            },
            incompatible_with={"schedule_free"},
        )

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        base = state.optimizer
        if isinstance(base, MuonOptimizer):  # already installed (a second Trainer on it)
            return
        if any(type(p).__name__ == "DTensor" for p in state.model.parameters()):
            raise ConfigError(
                "algorithms.muon: Newton-Schulz needs whole matrices and FSDP shards them; "
                "use distributed.strategy=ddp with muon"
            )
        settings = {key: getattr(self, key) for key in _SETTINGS}
        try:
            # Muon's momentum is this algorithm's state (by name), not the optimizer's.
            hybrid = _hybrid(state.model, base, self.exclude, **settings, momentum_in_state=False)
        except _NothingRouted:
            raise ConfigError(
                "algorithms.muon: the model has no hidden weight matrix for Muon (only an input "
                "layer, an output head, embeddings, biases or norms, or all are excluded)"
            ) from None
        if self._pending:
            hybrid.load_muon_state_dict(self._pending)
        self._pending = None
        self._move_schedulers(state, base, hybrid)
        state.optimizer = self.optimizer = hybrid
        routed = hybrid.muon_group["params"]
        logger.log_metrics(
            {"muon/matrices": len(routed), "muon/parameters": sum(p.numel() for p in routed)}
        )

    def _move_schedulers(
        self, state: State, base: torch.optim.Optimizer, hybrid: MuonOptimizer
    ) -> None:
        """Schedulers built on the run's optimizer now drive every group, Muon's included, with
        the same multiplier (a resumed run's schedulers were restored before this)."""
        group = hybrid.muon_group
        group["initial_lr"] = self.lr
        moved = False
        for scheduler in state.schedulers:
            if getattr(scheduler, "optimizer", None) is not base:
                continue
            lambdas = getattr(scheduler, "lr_lambdas", None)
            if not lambdas or any(f is not lambdas[0] for f in lambdas):
                raise ConfigError(
                    "algorithms.muon: the LR scheduler is not one schedule for every param "
                    "group (speedup.optim's), so Muon's group cannot follow it"
                )
            scheduler.optimizer = hybrid
            scheduler.lr_lambdas = [lambdas[0]] * len(hybrid.param_groups)
            scheduler.base_lrs = [g["initial_lr"] for g in hybrid.param_groups]
            group["lr"] = self.lr * lambdas[0](scheduler.last_epoch)
            scheduler._last_lr = [g["lr"] for g in hybrid.param_groups]
            moved = True
        if moved:
            _track_steps(hybrid)

    # -- resume -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        if self.optimizer is not None:
            momentum = {
                n: [b.detach().to("cpu", copy=True) for b in bufs]
                for n, bufs in self.optimizer.muon_state_dict().items()
            }
        else:
            momentum = dict(self._pending or {})
        return {"momentum": momentum}

    def load_state_dict(self, state: dict) -> None:
        momentum = {n: list(b) for n, b in (state.get("momentum") or {}).items()}
        if self.optimizer is not None:
            self.optimizer.load_muon_state_dict(momentum)
        else:
            self._pending = momentum
