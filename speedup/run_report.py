"""A finished run, summarised: the end-of-run table and the PNG plots of ``speedup report``.

Both read only the run directory's files, ``metrics.jsonl`` (one JSON object per logged step
or evaluation, with ``step`` and ``train_time_s`` in each) and ``summary.json``, so they work
on any run, finished or not, without torch. matplotlib is imported only to plot, and draws on
the Agg canvas (no display, no pyplot global state).

Which way is better for an eval metric is read from its name: losses, errors, perplexities
and the like are minimised, everything else (accuracy, F1, ...) is maximised; the table says
which way it took for each metric.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from speedup.callbacks import lower_is_better

__all__ = [
    "best_eval",
    "eval_history",
    "format_run_summary",
    "lower_is_better",
    "plot_run",
    "read_metrics",
]

_RULE = "-" * 64


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``, in order; a line cut short by a crash is skipped and
    the strings ``"nan"``/``"inf"`` (how the logger writes non-finite values) become floats."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        for key, value in record.items():
            if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf"):
                record[key] = float(value)
        records.append(record)
    return records


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def eval_history(records: list[dict[str, Any]]) -> dict[str, list[tuple[int, float, float]]]:
    """``{metric: [(step, train seconds, value), ...]}`` for every ``eval/<metric>`` logged."""
    history: dict[str, list[tuple[int, float, float]]] = {}
    for record in records:
        for key, value in record.items():
            number = _number(value)
            if key.startswith("eval/") and number is not None:
                point = (int(record.get("step", 0)), float(record.get("train_time_s", 0.0)), number)
                history.setdefault(key[len("eval/") :], []).append(point)
    return history


def best_eval(records: list[dict[str, Any]]) -> dict[str, tuple[float, int]]:
    """``{metric: (best value, step it was first reached)}`` over all evaluations; NaNs never
    count as best."""
    best: dict[str, tuple[float, int]] = {}
    for metric, points in eval_history(records).items():
        finite = [(value, step) for step, _, value in points if not math.isnan(value)]
        if not finite:
            continue
        sign = 1.0 if lower_is_better(metric) else -1.0
        value, step = min(finite, key=lambda p: (sign * p[0], p[1]))
        best[metric] = (value, step)
    return best


# -- the end-of-run table -----------------------------------------------------------------------


def format_value(value: float | None) -> str:
    """A metric value as the table shows it: 4 decimals, or 4 significant digits when tiny or
    huge."""
    if value is None:
        return "-"
    if math.isnan(value) or math.isinf(value) or value == 0:
        return f"{value:.4f}" if value == 0 else str(value)
    if 1e-3 <= abs(value) < 1e6:
        return f"{value:.4f}"
    return f"{value:.4g}"


def format_seconds(seconds: float) -> str:
    """``4.21 s``, ``12m 03s``, ``2h 05m``."""
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def format_count(count: int | None) -> str:
    return "-" if count is None else f"{count:,}"


def format_rate(count: float, seconds: float, unit: str) -> str:
    if not count or seconds <= 0:
        return "-"
    rate = count / seconds
    shown = f"{rate:,.0f}" if rate >= 100 else f"{rate:.1f}" if rate >= 1 else f"{rate:.3g}"
    return f"{shown} {unit}/s"


def format_run_summary(summary: dict[str, Any], records: list[dict[str, Any]] | None = None) -> str:
    """The table ``speedup run`` prints at the end: final and best eval metrics, counts, times,
    throughput and the run directory. ``records`` (``metrics.jsonl``) supply the best values."""
    final = summary.get("metrics") or {}
    best = best_eval(records or [])
    header = [f"run {summary.get('recipe', '?')}", f"seed {summary.get('seed', '?')}"]
    if summary.get("device"):
        processes = summary.get("processes") or 1
        header.append(f"{summary['device']}" + (f" x{processes}" if processes > 1 else ""))
    lines = ["  ".join(header), _RULE]
    names = sorted(set(final) | set(best))
    if names:
        width = min(max(12, *(len(n) for n in names)), 30)
        lines.append(f"{'eval metric'.ljust(width)}  {'final':>12}  {'best':>12}        at step")
        for name in names:
            value = _number(final.get(name))
            best_value, best_step = best.get(name, (None, None))
            at = "" if best_step is None else str(best_step)
            # Which way "best" went, so a reader can check it: min for costs, max otherwise.
            way = "(min)" if lower_is_better(name) else "(max)"
            lines.append(
                f"{name[:width].ljust(width)}  {format_value(value):>12}  "
                f"{format_value(best_value):>12} {way if best_step is not None else '':5}  "
                f"{at}".rstrip()
            )
    else:
        lines.append("eval metric  (no eval data)")
    lines.append(_RULE)
    train_s = float(summary.get("train_time_s") or 0.0)
    eval_s = float(summary.get("eval_time_s") or 0.0)
    samples, tokens = summary.get("samples"), summary.get("tokens")
    pairs = [
        (
            "steps",
            format_count(summary.get("steps")),
            "epochs",
            format_count(summary.get("epochs")),
        ),
        ("samples", format_count(samples), "tokens", format_count(tokens) if tokens else "-"),
        ("train time", format_seconds(train_s), "eval time", format_seconds(eval_s)),
        (
            "throughput",
            format_rate(samples or 0, train_s, "samples"),
            "",
            format_rate(tokens, train_s, "tokens") if tokens else "",
        ),
    ]
    for left, left_value, right, right_value in pairs:
        line = f"{left:<12}{left_value:>18}"
        if right or right_value:
            line += f"    {right:<12}{right_value:>18}"
        lines.append(line)
    if summary.get("stopped_early"):
        lines.append(f"stopped early: {summary.get('stop_reason') or 'requested'}")
    if summary.get("resumed_from"):
        lines.append(f"resumed from: {summary['resumed_from']}")
    lines.append(f"run dir: {summary.get('run_dir', '?')}")
    return "\n".join(lines)


# -- plots ----------------------------------------------------------------------------------------


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float], list[float]]:
    steps, seconds, values = [], [], []
    for record in records:
        value = _number(record.get(key))
        if value is not None:
            steps.append(int(record.get("step", 0)))
            seconds.append(float(record.get("train_time_s", 0.0)))
            values.append(value)
    return steps, seconds, values


def _logged(accept: Callable[[str], bool]) -> Callable[[list[dict[str, Any]]], list[str]]:
    """A plot's selector: the numeric metric keys accepted by ``accept(key)``, in first-logged
    order."""

    def keys(records: list[dict[str, Any]]) -> list[str]:
        seen: dict[str, None] = {}
        for record in records:
            for key, value in record.items():
                if key not in seen and _number(value) is not None and accept(key):
                    seen[key] = None
        return list(seen)

    return keys


def _figure(width: float, height: float):  # noqa: ANN202 - a matplotlib Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path, title: str) -> Path:
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path


def _plot_loss(records: list[dict[str, Any]], keys: list[str], title: str, path: Path) -> Path:
    fig = _figure(10.0, 3.8)
    by_step, by_time = fig.subplots(1, 2)
    for key in keys:
        steps, seconds, values = _series(records, key)
        by_step.plot(steps, values, label=key, linewidth=1.2)
        by_time.plot(seconds, values, label=key, linewidth=1.2)
    steps, seconds, values = _series(records, "eval/loss")
    if values:  # the held-out loss on the same axes, for over/underfitting at a glance
        by_step.plot(steps, values, "o-", label="eval/loss", markersize=4)
        by_time.plot(seconds, values, "o-", label="eval/loss", markersize=4)
    by_step.set_xlabel("step")
    by_time.set_xlabel("train seconds (eval excluded)")
    for ax in (by_step, by_time):
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    by_step.legend(fontsize=8)
    return _save(fig, path, f"{title}: training loss")


def _plot_eval(
    records: list[dict[str, Any]],
    history: dict[str, list[tuple[int, float, float]]],
    title: str,
    path: Path,
) -> Path:
    best = best_eval(records)
    fig = _figure(10.0, 2.8 * len(history) + 0.6)
    axes = fig.subplots(len(history), 2, squeeze=False)
    for (metric, points), (by_step, by_time) in zip(history.items(), axes):
        steps = [p[0] for p in points]
        seconds = [p[1] for p in points]
        values = [p[2] for p in points]
        by_step.plot(steps, values, "o-", markersize=4)
        by_time.plot(seconds, values, "o-", markersize=4)
        if metric in best:
            value, step = best[metric]
            at = steps.index(step)
            direction = "min" if lower_is_better(metric) else "max"
            label = f"best ({direction}) {format_value(value)} at step {step}"
            by_step.plot([step], [value], "*", markersize=12, label=label)
            by_time.plot([seconds[at]], [value], "*", markersize=12)
            by_step.legend(fontsize=8)
        by_step.set_ylabel(metric)
        by_step.set_xlabel("step")
        by_time.set_xlabel("train seconds (eval excluded)")
        for ax in (by_step, by_time):
            ax.grid(alpha=0.3)
    return _save(fig, path, f"{title}: eval metrics")


def _plot_lr(records: list[dict[str, Any]], keys: list[str], title: str, path: Path) -> Path:
    fig = _figure(7.0, 3.6)
    ax = fig.subplots()
    for key in keys:
        steps, _, values = _series(records, key)
        ax.plot(steps, values, label=key, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)
    if len(keys) > 1:
        ax.legend(fontsize=8)
    return _save(fig, path, f"{title}: learning rate")


def _plot_throughput(
    records: list[dict[str, Any]], keys: list[str], title: str, path: Path
) -> Path:
    fig = _figure(7.0, 2.8 * len(keys) + 0.6)
    axes = fig.subplots(len(keys), 1, squeeze=False)
    for key, (ax,) in zip(keys, axes):
        steps, _, values = _series(records, key)
        ax.plot(steps, values, linewidth=1.2)
        ax.set_ylabel(key.split("/", 1)[1].replace("_per_s", "/s").replace("_", " "))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return _save(fig, path, f"{title}: throughput")


def _plot_sparsity(records: list[dict[str, Any]], keys: list[str], title: str, path: Path) -> Path:
    fig = _figure(8.0, 4.2)
    ax = fig.subplots()
    layers = [k for k in keys if k not in ("sparsity/target", "sparsity/global")]
    for key in layers:  # per layer: thin, labelled only when few enough to read
        steps, _, values = _series(records, key)
        label = key[len("sparsity/") :] if len(layers) <= 8 else None
        ax.plot(steps, values, linewidth=0.8, alpha=0.6, marker=".", label=label)
    for key, style in (("sparsity/global", "-"), ("sparsity/target", "--")):
        steps, _, values = _series(records, key)
        if values:
            ax.plot(steps, values, style, color="black", linewidth=2, marker="o", label=key[9:])
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of weights at zero")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path, f"{title}: sparsity")


#: Per plot: its file, what it draws (metric keys; for ``eval.png`` the history per metric),
#: empty when none of it was logged, and the function that draws it.
_PLOTS: tuple[tuple[str, Callable[[list[dict[str, Any]]], Any], Callable[..., Path]], ...] = (
    ("loss.png", _logged(lambda k: k.startswith("loss/")), _plot_loss),
    ("eval.png", eval_history, _plot_eval),
    ("lr.png", _logged(lambda k: k == "lr" or k.startswith(("lr/", "lr-"))), _plot_lr),
    ("throughput.png", _logged(lambda k: k.startswith("throughput/")), _plot_throughput),
    ("sparsity.png", _logged(lambda k: k.startswith("sparsity/")), _plot_sparsity),
)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Plot a run directory's ``metrics.jsonl`` into ``out`` (default ``run_dir/plots``):
    ``loss.png``, ``eval.png`` (a row per metric), ``lr.png``, ``throughput.png`` and, when
    the run logged ``sparsity/*``, ``sparsity.png``. A plot whose metrics were never logged is
    not written. Returns the paths written."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    out = Path(out) if out is not None else run_dir / "plots"
    title = run_dir.name
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        try:
            recipe = json.loads(summary_path.read_text(encoding="utf-8")).get("recipe")
            title = f"{recipe} ({run_dir.name})" if recipe and recipe != run_dir.name else title
        except ValueError:
            pass
    if not records:
        return []
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, select, plot in _PLOTS:
        selected = select(records)
        if selected:  # a plot whose metrics were never logged is not written
            written.append(plot(records, selected, title, out / name))
    return written
