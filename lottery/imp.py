"""Iterative magnitude pruning (IMP) with rewinding, by levels, with its controls.

Level 0 trains the dense network. Each later level prunes a fraction of the weights that
survived the previous level (by magnitude of that level's final weights), resets the
survivors, and retrains (Frankle & Carbin, ICLR 2019, "The lottery ticket hypothesis"):

* ``mode: weights`` resets survivors to the rewind point: the initialisation (``rewind: 0ba``)
  or step k of a dense pretraining run, and retrains from step k of the schedule and data order
  (Frankle et al., ICML 2020: rewinding to 0.1-7% of training finds matching tickets in deep
  nets where rewinding to init does not);
* ``mode: lr`` keeps the previous level's final weights and replays the schedule from step k
  (learning-rate rewinding, Renda et al., ICLR 2020).

Per-layer rates follow the LTH paper: conv and linear layers can prune at different rates,
and the output layer at half the linear rate (its Figure 2 table: e.g. LeNet 20% with the
output 10%; Conv-2/4/6 10-15% for conv layers). Controls at every level, each a full run:

* ``reinit``: the ticket's mask on a fresh random initialisation (LTH section 2);
* ``random``: a uniformly random mask with the ticket's per-layer sparsity, on the original
  initialisation (random pruning);
* ``shuffle``: the ticket's own mask permuted within each layer, on the original
  initialisation (the layerwise shuffle of "Missing the mark", Frankle et al. ICLR 2021).
  Statistically ``random`` and ``shuffle`` are the same ablation; both are kept because the
  literature reports both, and they check each other.

Every run lives in its own directory; a finished run is never recomputed, so an interrupted
experiment resumes at its first unfinished run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from speedup.algorithms.magnitude_pruning import magnitude_masks, prunable_parameters
from speedup.lottery.runs import initial_weights, load_result, train_run

from speedup.config import with_changes
from speedup.run import build_trainer

__all__ = ["IMPSettings", "prune_surviving", "run_imp", "layer_fractions", "CONTROLS"]

CONTROLS = ("reinit", "random", "shuffle")


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

    def __post_init__(self) -> None:
        if self.levels < 0:
            raise ValueError(f"levels must be >= 0, got {self.levels}")
        for name in ("prune_fraction", "conv_fraction", "output_fraction"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {value}")
        if self.scope not in ("layerwise", "global"):
            raise ValueError(f"scope must be 'layerwise' or 'global', got {self.scope!r}")
        if self.mode not in ("weights", "lr"):
            raise ValueError(f"mode must be 'weights' or 'lr', got {self.mode!r}")
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


def run_imp(cfg: DictConfig, out_dir: str | Path, settings: IMPSettings) -> list[dict]:
    """Run (or resume) the experiment; returns one row per level and writes the reports."""
    from speedup.lottery.report import write_reports

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "settings.json").write_text(json.dumps(asdict(settings), indent=2) + "\n")
    probe = build_trainer(cfg)
    rewind_step = round(probe.converter.to_batches(settings.rewind))
    names = list(prunable_parameters(probe.state.model))
    fractions = layer_fractions(probe.state.model, names, settings)
    del probe

    init = initial_weights(cfg)
    rewind_weights = init
    if rewind_step > 0:
        rewind_weights = train_run(
            cfg, out_dir / "pretrain", stop_at_batch=rewind_step
        ).final_weights

    rows, masks, previous_final = [], None, None
    for level in range(settings.levels + 1):
        level_dir = out_dir / f"level_{level}"
        if level > 0:
            prunable_final = {n: previous_final[n] for n in names}
            masks = prune_surviving(prunable_final, masks, fractions, settings.scope)
            level_dir.mkdir(parents=True, exist_ok=True)
            torch.save(masks, level_dir / "masks.pt")
        start = rewind_weights if settings.mode == "weights" or level == 0 else previous_final
        main = train_run(
            cfg,
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
            row["accuracy"].update(
                _controls(cfg, level_dir, settings, masks, rewind_weights, rewind_step, level)
            )
        rows.append(row)
        previous_final = main.final_weights
    write_reports(out_dir, rows, settings)
    return rows


def _controls(cfg, level_dir, settings, masks, rewind_weights, rewind_step, level) -> dict:  # noqa: ANN001
    generator = torch.Generator().manual_seed(settings.control_seed + level)
    accuracy = {}
    for control in settings.controls:
        run_masks, weights = masks, rewind_weights
        if control == "reinit":
            weights = initial_weights(
                with_changes(cfg, seed=cfg.seed + settings.control_seed + level)
            )
        elif control == "random":
            run_masks = _random_masks(masks, generator)
        else:
            run_masks = _shuffled(masks, generator)
        result = train_run(
            cfg,
            level_dir / control,
            weights=_masked(weights, run_masks),
            masks=run_masks,
            start_batch=rewind_step,
        )
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
