"""Iterative magnitude pruning (IMP) with rewinding, by levels, with its controls.

Level 0 trains the dense network. Each later level prunes a fraction of the weights that
survived the previous level (by magnitude of that level's final weights), resets the
survivors, and retrains (Frankle & Carbin, ICLR 2019, "The lottery ticket hypothesis"):

* ``mode: weights`` resets survivors to the rewind point: the initialisation (``rewind: 0ba``)
  or step k of a dense pretraining run, and retrains from step k of the schedule and data order
  (Frankle et al., ICML 2020: rewinding to 0.1-7% of training finds matching tickets in deep
  nets where rewinding to init does not);
* ``mode: lr`` keeps the previous level's final weights and replays the schedule from step k
  (learning-rate rewinding, Renda et al., ICLR 2020, "Comparing rewinding and fine-tuning in
  neural network pruning");
* ``mode: finetune`` keeps the previous level's final weights and trains them for the same
  ``T - k`` steps at a constant LR: the original schedule's final LR (Renda et al.'s
  fine-tuning, their baseline), or ``finetune_lr``. A schedule that ends at 0 (cosine) would
  fine-tune at LR 0, so that is refused before training unless ``finetune_lr`` is set.

Per-layer rates follow the LTH paper: conv and linear layers can prune at different rates,
and the output layer at half the linear rate (its Figure 2 table: e.g. LeNet 20% with the
output 10%; Conv-2/4/6 10-15% for conv layers).

Controls at every level, each a full run. A control is *matched*: it differs from the level's
ticket in one thing only, and starts from the ticket's start weights, with its schedule (from
step k) and budget (``T - k`` steps). With ``mode: weights`` the ticket starts from the rewind
point (the initialisation, or step k), as in the LTH paper (section 2 and its Figure 3):

* ``reinit``: the ticket's mask on a fresh random initialisation;
* ``random``: a uniformly random mask with the ticket's per-layer sparsity (random pruning);
* ``shuffle``: the ticket's own mask permuted within each layer (the layerwise shuffle of
  "Missing the mark", Frankle et al. ICLR 2021).

With ``mode: lr`` or ``finetune`` the ticket starts from the previous level's *trained*
weights (Renda et al. 2020 retrain the survivors from their final values), so the matched
controls start there too; resetting them to the initialisation, as a weight-rewinding
control does, would confound the mask with the weights. What they ablate:

* ``random``: re-pruning at random. The previous level's survivors (the trained, still
  nonzero weights) lose as many weights per layer as the ticket's magnitude pruning removes,
  chosen uniformly at random instead of by magnitude. Drawing from all positions instead
  would revive weights pruned at earlier levels (zeros) and change the start weights too;
* ``shuffle``: the ticket's keep/prune decisions of this level permuted among the previous
  survivors of each layer (the same ablation as ``random``, kept as its check);
* ``reinit``: the ticket's mask on a fresh initialisation, retrained with the same schedule
  from step k: "training the pruned architecture from scratch" (Liu et al., ICLR 2019,
  "Rethinking the value of network pruning"), the comparison Renda et al. discuss.

Statistically ``random`` and ``shuffle`` are the same ablation in every mode; both are kept
because the literature reports both, and they check each other.

Every run lives in its own directory; a finished run is never recomputed, so an interrupted
experiment resumes at its first unfinished run. The experiment directory is keyed by its
settings: ``experiment.json`` records them (all but ``levels`` and ``controls``, which only add
or leave out runs) with the resolved config, and a rerun with other values into the same
directory is refused with a :class:`~speedup.config.ConfigError` naming them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig
from speedup.algorithms.magnitude_pruning import magnitude_masks, prunable_parameters
from speedup.lottery.runs import (
    check_inputs,
    config_items,
    differences,
    initial_weights,
    load_result,
    refuse,
    train_run,
)

from speedup.config import with_changes
from speedup.errors import ConfigError
from speedup.run import build_trainer

if TYPE_CHECKING:
    from speedup.trainer import Trainer

__all__ = ["CONTROLS", "MODES", "IMPSettings", "layer_fractions", "prune_surviving", "run_imp"]

CONTROLS = ("reinit", "random", "shuffle")
MODES = ("weights", "lr", "finetune")
#: Settings that only add or leave out runs: an experiment may grow or shrink in them.
_NOT_IDENTITY = ("levels", "controls")


@dataclass
class IMPSettings:
    """The settings of an IMP experiment (``speedup lottery`` flags)."""

    levels: int = 3
    prune_fraction: float = 0.2
    conv_fraction: float | None = None  # default: prune_fraction
    output_fraction: float | None = None  # default: half of prune_fraction (LTH)
    scope: str = "layerwise"
    rewind: str = "0ba"
    mode: str = "weights"
    controls: tuple[str, ...] = CONTROLS
    control_seed: int = 1000
    finetune_lr: float | None = None  # mode finetune: default the schedule's final LR

    def __post_init__(self) -> None:
        if self.levels < 0:
            raise ValueError(f"levels must be >= 0, got {self.levels}")
        for name in ("prune_fraction", "conv_fraction", "output_fraction"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {value}")
        if self.scope not in ("layerwise", "global"):
            raise ValueError(f"scope must be 'layerwise' or 'global', got {self.scope!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.finetune_lr is not None:
            if self.mode != "finetune":
                raise ValueError(
                    f"finetune_lr is the LR of mode finetune only; mode {self.mode!r} follows "
                    "the schedule"
                )
            if not (math.isfinite(self.finetune_lr) and self.finetune_lr > 0):
                raise ValueError(f"finetune_lr must be a finite LR > 0, got {self.finetune_lr}")
        unknown = set(self.controls) - set(CONTROLS)
        if unknown:
            raise ValueError(f"unknown controls {sorted(unknown)}; allowed: {', '.join(CONTROLS)}")
        self.controls = tuple(self.controls)


def layer_fractions(model: torch.nn.Module, names: list[str], s: IMPSettings) -> dict[str, float]:
    """Per-parameter pruning fraction: conv, linear, and the output layer (the last one)."""
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        module = modules.get(name.rsplit(".", 1)[0])
        is_conv = isinstance(module, torch.nn.modules.conv._ConvNd)
        out[name] = (s.conv_fraction or s.prune_fraction) if is_conv else s.prune_fraction
    if names:
        out[names[-1]] = s.output_fraction or s.prune_fraction / 2
    return out


def prune_surviving(
    weights: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor] | None,
    fractions: dict[str, float],
    scope: str = "layerwise",
) -> dict[str, torch.Tensor]:
    """Prune ``fractions[name]`` of each tensor's surviving weights (layerwise), or one
    fraction of all survivors together (global; the first name's fraction)."""
    masks = masks or {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    if scope == "global":
        alive = sum(int(m.sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        fraction = next(iter(fractions.values()))
        target = 1.0 - alive * (1.0 - fraction) / total
        return magnitude_masks(weights, target, "global", masks=masks)
    out = {}
    for name, weight in weights.items():
        alive = int(masks[name].sum())
        target = 1.0 - alive * (1.0 - fractions[name]) / weight.numel()
        out[name] = magnitude_masks({name: weight}, target, "layerwise", masks=masks)[name]
    return out


def _masked(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None) -> dict:
    if not masks:
        return weights
    return {k: v * masks[k].to(v.dtype) if k in masks else v for k, v in weights.items()}


def _random_masks(masks: dict[str, torch.Tensor], generator: torch.Generator) -> dict:
    """Uniformly random masks with each tensor's number of survivors."""
    out = {}
    for name, mask in masks.items():
        keep = torch.zeros(mask.numel(), dtype=torch.bool)
        keep[torch.randperm(mask.numel(), generator=generator)[: int(mask.sum())]] = True
        out[name] = keep.view_as(mask)
    return out


def _shuffled(masks: dict[str, torch.Tensor], generator: torch.Generator) -> dict:
    """Each mask's own entries, permuted within its tensor."""
    return {
        name: mask.flatten()[torch.randperm(mask.numel(), generator=generator)].view_as(mask)
        for name, mask in masks.items()
    }


def _within(previous: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of the previous level's survivors (all positions at level 1)."""
    alive = torch.ones_like(mask) if previous is None else previous
    return alive.flatten().nonzero().flatten()


def _reprune(
    masks: dict[str, torch.Tensor],
    previous: dict[str, torch.Tensor] | None,
    place: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    generator: torch.Generator,
) -> dict:
    """Per tensor, a new mask over the previous level's survivors only: ``place(mask, alive,
    order)`` gives the kept flags of the ``alive`` positions, ``order`` a random permutation
    of them."""
    out = {}
    for name, mask in masks.items():
        alive = _within(previous and previous[name], mask)
        order = torch.randperm(len(alive), generator=generator)
        keep = torch.zeros(mask.numel(), dtype=torch.bool)
        keep[alive] = place(mask, alive, order)
        out[name] = keep.view_as(mask)
    return out


def _first_k(mask: torch.Tensor, alive: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """A ``_reprune`` placement: as many of the survivors as the ticket keeps, drawn uniformly."""
    flags = torch.zeros(len(alive), dtype=torch.bool)
    flags[order[: int(mask.sum())]] = True
    return flags


def _permuted(mask: torch.Tensor, alive: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """A ``_reprune`` placement: the ticket's decisions on the survivors, permuted among them."""
    return mask.flatten()[alive][order].bool()


def _finetune_config(cfg: DictConfig, probe: Trainer, settings: IMPSettings) -> DictConfig:
    """``cfg`` with a constant LR: ``finetune_lr``, else the schedule's value at its end."""
    lr = settings.finetune_lr
    if lr is None:
        state = probe.state
        if state.schedulers:
            scheduler = state.schedulers[0]
            end = probe.converter.to_batches(state.max_duration)
            lr = scheduler.base_lrs[0] * scheduler.lr_lambdas[0].factor_at(end)
        else:
            lr = state.optimizer.param_groups[0]["lr"]
        if not lr > 0:
            raise ConfigError(
                f"speedup lottery: mode finetune trains at the schedule's final LR, and "
                f"scheduler {cfg.scheduler.get('name', 'constant')!r} ends at {lr:g}: "
                "fine-tuning would not train; set finetune_lr (--finetune-lr)"
            )
    return with_changes(cfg, scheduler={"name": "constant"}, **{"optimizer.lr": float(lr)})


def run_imp(cfg: DictConfig, out_dir: str | Path, settings: IMPSettings) -> list[dict]:
    """Run (or resume) the experiment; returns one row per level and writes the reports.

    Raises :class:`~speedup.config.ConfigError`, before anything trains, when ``out_dir``
    holds an experiment with other settings or another config (naming each difference)."""
    from speedup.lottery.report import write_reports

    out_dir = Path(out_dir)
    probe = build_trainer(cfg)
    rewind_step = round(probe.converter.to_batches(settings.rewind))
    names = list(prunable_parameters(probe.state.model))
    fractions = layer_fractions(probe.state.model, names, settings)
    retrain_cfg = cfg  # the levels after the dense one
    if settings.mode == "finetune":  # may refuse the settings: before anything is written
        retrain_cfg = _finetune_config(cfg, probe, settings)
    del probe
    identity = {k: v for k, v in asdict(settings).items() if k not in _NOT_IDENTITY}
    legacy = out_dir / "settings.json"
    if legacy.exists() and not (out_dir / "experiment.json").exists():  # made before it
        changed = differences(json.loads(legacy.read_text()), identity)
        changed = [c for c in changed if c.split(":")[0] in identity]
        if changed:
            refuse(out_dir, "an experiment", changed)
    check_inputs(out_dir / "experiment.json", {**identity, **config_items(cfg)}, "an experiment")
    (out_dir / "settings.json").write_text(json.dumps(asdict(settings), indent=2) + "\n")

    init = initial_weights(cfg)
    rewind_weights = init
    if rewind_step > 0:
        rewind_weights = train_run(
            cfg, out_dir / "pretrain", stop_at_batch=rewind_step
        ).final_weights

    rows, masks, previous_final = [], None, None
    for level in range(settings.levels + 1):
        level_dir = out_dir / f"level_{level}"
        previous_masks = masks
        if level > 0:
            prunable_final = {n: previous_final[n] for n in names}
            masks = prune_surviving(prunable_final, masks, fractions, settings.scope)
            level_dir.mkdir(parents=True, exist_ok=True)
            if not (level_dir / "masks.pt").exists():  # else the same masks (experiment.json)
                torch.save(masks, level_dir / "masks.pt")
        start = rewind_weights if settings.mode == "weights" or level == 0 else previous_final
        level_cfg = cfg if level == 0 else retrain_cfg
        main = train_run(
            level_cfg,
            level_dir / "main",
            weights=_masked(start, masks),
            masks=masks,
            start_batch=rewind_step,
        )
        row = {
            "level": level,
            "density": main["density"],
            "accuracy": {"ticket": main["metrics"].get("accuracy")},
            "early_stop_step": main["best"].get("step"),
            "early_stop_accuracy": main["best"].get("eval/accuracy"),
        }
        if level > 0:
            ticket = {"masks": masks, "previous": previous_masks, "start": start}
            row["accuracy"].update(
                _controls(level_cfg, level_dir, settings, ticket, rewind_step, level)
            )
        rows.append(row)
        previous_final = main.final_weights
    write_reports(out_dir, rows, settings)
    return rows


def _controls(
    cfg: DictConfig,
    level_dir: Path,
    settings: IMPSettings,
    ticket: dict[str, dict[str, torch.Tensor]],
    rewind_step: int,
    level: int,
) -> dict:
    """The level's controls, matched to its ticket (module doc): ``ticket`` holds its masks,
    the previous level's masks and its start weights."""
    generator = torch.Generator().manual_seed(settings.control_seed + level)
    masks, previous = ticket["masks"], ticket["previous"]
    rewound = settings.mode == "weights"  # else the ticket retrains its trained weights
    accuracy = {}
    for control in settings.controls:
        run_masks, weights = masks, ticket["start"]
        if control == "reinit":
            weights = initial_weights(
                with_changes(cfg, seed=cfg.seed + settings.control_seed + level)
            )
        elif control == "random":
            if rewound:
                run_masks = _random_masks(masks, generator)
            else:
                run_masks = _reprune(masks, previous, _first_k, generator)
        elif rewound:
            run_masks = _shuffled(masks, generator)
        else:
            run_masks = _reprune(masks, previous, _permuted, generator)
        result = train_run(
            cfg,
            level_dir / control,
            weights=_masked(weights, run_masks),
            masks=run_masks,
            start_batch=rewind_step,
        )
        if not (level_dir / control / "masks.pt").exists():
            torch.save(run_masks, level_dir / control / "masks.pt")
        accuracy[control] = result["metrics"].get("accuracy")
    return accuracy


def finished_levels(out_dir: str | Path) -> list[int]:
    """Levels whose main run is complete (for progress reports)."""
    out_dir = Path(out_dir)
    return sorted(
        int(p.name.split("_")[1])
        for p in out_dir.glob("level_*")
        if load_result(p / "main") is not None
    )
