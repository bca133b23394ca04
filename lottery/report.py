"""Reports of lottery experiments: summary.json, a Markdown table, PNG plots."""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "average_rows",
    "density_ticks",
    "format_spread",
    "markdown_table",
    "mean_spread",
    "plot_accuracy_vs_density",
    "write_reports",
]


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def mean_spread(values: list[float]) -> tuple[float | None, float | None, int]:
    """Mean, sample standard deviation (ddof=1, Bessel's correction: the seeds are a sample
    of the runs one could have made) and n of ``values``; the deviation is None below two."""
    import statistics

    n = len(values)
    mean = statistics.fmean(values) if n else None
    return mean, statistics.stdev(values) if n > 1 else None, n


def format_spread(mean: float | None, std: float | None, n: int, digits: int = 4) -> str:
    """``"0.9120 ± 0.0040 (n=3)"``; ``"0.9120 (n=1)"`` when one value has no spread."""
    if mean is None:
        return "-"
    text = f"{mean:.{digits}f}"
    if std is not None:
        text += f" ± {std:.{digits}f}"
    return f"{text} (n={n})"


def average_rows(runs: list[list[dict]]) -> list[dict]:
    """Mean over seeds, level by level: ``accuracy_std`` holds the sample standard deviations
    (None with one value) and ``accuracy_n`` how many seeds each mean is over."""
    import statistics

    averaged = []
    for level_rows in zip(*runs, strict=True):
        names = level_rows[0]["accuracy"]
        accuracy, spread, counts = {}, {}, {}
        for name in names:
            values = [
                r["accuracy"][name] for r in level_rows if r["accuracy"].get(name) is not None
            ]
            accuracy[name], spread[name], counts[name] = mean_spread(values)
        steps = [r["early_stop_step"] for r in level_rows if r.get("early_stop_step") is not None]
        averaged.append(
            {
                "level": level_rows[0]["level"],
                "density": statistics.fmean(r["density"] for r in level_rows),
                "accuracy": accuracy,
                "accuracy_std": spread,
                "accuracy_n": counts,
                "early_stop_step": statistics.median(steps) if steps else None,
                "seeds": len(level_rows),
            }
        )
    return averaged


def markdown_table(rows: list[dict]) -> str:
    """Level, density, ticket accuracy and each control's, early-stop step."""
    controls = sorted({k for row in rows for k in row["accuracy"]} - {"ticket"})
    header = ["level", "density", "ticket", *controls, "early-stop step"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        counts = row.get("accuracy_n")

        def cell(name: str, row: dict = row, counts: dict | None = counts) -> str:
            if counts is None or name not in counts:  # one run: no spread to show
                return _fmt(row["accuracy"].get(name))
            std = row.get("accuracy_std", {}).get(name)
            return format_spread(row["accuracy"].get(name), std, counts[name])

        cells = [str(row["level"]), f"{row['density']:.4f}", cell("ticket")]
        cells += [cell(c) for c in controls]
        cells.append(_fmt(row.get("early_stop_step")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_density(rows: list[dict], path: Path, title: str = "") -> Any:
    """Test accuracy against density (log scale, dense on the left), ticket and controls.
    Returns the figure (saved to ``path``)."""
    # A Figure on the Agg canvas: no display needed, and no pyplot state (nor backend switch)
    # left behind in the caller's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    # The ticket first, then the controls by name: the same colours in every plot.
    series = sorted({k for row in rows for k in row["accuracy"]}, key=lambda k: (k != "ticket", k))
    for name in series:
        points = [(r["density"], r["accuracy"].get(name)) for r in rows]
        points = [(d, a) for d, a in points if a is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=name, linewidth=2 if name == "ticket" else 1)
    ax.set_xscale("log")
    _density_ticks(ax, [r["density"] for r in rows])
    ax.invert_xaxis()
    ax.set_xlabel("density: % of weights remaining (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title or "IMP: ticket vs controls")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def density_ticks(densities: list[float], max_ticks: int = 8) -> list[float]:
    """The densities to mark on a log axis: the measured ones (IMP's are evenly spaced there),
    thinned from the dense end so that neighbours are at least 1/``max_ticks`` of the span
    apart and their labels never run into each other."""
    import math

    points = sorted({d for d in densities if d > 0}, reverse=True)
    if len(points) < 2:
        return points
    span = math.log10(points[0] / points[-1])
    kept = [points[0]]
    for density in points[1:]:
        if math.log10(kept[-1] / density) >= span / max_ticks - 1e-12:
            kept.append(density)
    if kept[-1] != points[-1]:  # always mark the sparsest level, in place of its neighbour
        if len(kept) > 1 and math.log10(kept[-1] / points[-1]) < span / max_ticks:
            kept.pop()
        kept.append(points[-1])
    return kept


def _density_ticks(ax: Any, densities: list[float]) -> None:
    """Ticks at the measured densities labelled as plain percentages (``51.2%``), instead of
    matplotlib's log-axis defaults (``9x10^-1`` minor labels, or a single major tick)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    ticks = density_ticks(densities)
    if not ticks:
        return
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{100 * x:.3g}%"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


def write_reports(out_dir: Path, rows: list[dict], settings: Any = None) -> None:
    out_dir = Path(out_dir)
    payload = {"levels": rows}
    if settings is not None:
        payload["settings"] = asdict(settings) if is_dataclass(settings) else settings
    tmp = out_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(out_dir / "summary.json")
    (out_dir / "summary.md").write_text(markdown_table(rows))
    plot_accuracy_vs_density(rows, out_dir / "accuracy_vs_density.png")
