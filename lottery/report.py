"""Reports of lottery experiments: summary.json, a Markdown table, PNG plots."""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "average_rows",
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


def plot_accuracy_vs_density(rows: list[dict], path: Path, title: str = "") -> None:
    """Test accuracy against density (log scale, dense on the left), ticket and controls."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series = sorted({k for row in rows for k in row["accuracy"]}, key=lambda k: k != "ticket")
    for name in series:
        points = [(r["density"], r["accuracy"].get(name)) for r in rows]
        points = [(d, a) for d, a in points if a is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=name, linewidth=2 if name == "ticket" else 1)
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("density (fraction of weights remaining)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title or "IMP: ticket vs controls")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
