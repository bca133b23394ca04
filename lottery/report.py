"""Reports of lottery experiments: summary.json, a Markdown table, PNG plots."""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

__all__ = ["average_rows", "markdown_table", "plot_accuracy_vs_density", "write_reports"]


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def average_rows(runs: list[list[dict]]) -> list[dict]:
    """Mean over seeds, level by level (``accuracy_std`` holds the standard deviations)."""
    import statistics

    averaged = []
    for level_rows in zip(*runs, strict=True):
        names = level_rows[0]["accuracy"]
        accuracy, spread = {}, {}
        for name in names:
            values = [
                r["accuracy"][name] for r in level_rows if r["accuracy"].get(name) is not None
            ]
            accuracy[name] = statistics.fmean(values) if values else None
            spread[name] = statistics.pstdev(values) if len(values) > 1 else 0.0
        steps = [r["early_stop_step"] for r in level_rows if r.get("early_stop_step") is not None]
        averaged.append(
            {
                "level": level_rows[0]["level"],
                "density": statistics.fmean(r["density"] for r in level_rows),
                "accuracy": accuracy,
                "accuracy_std": spread,
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
        std = row.get("accuracy_std", {})

        def cell(name: str, row: dict = row, std: dict = std) -> str:
            value = _fmt(row["accuracy"].get(name))
            return f"{value} ± {std[name]:.4f}" if name in std and value != "-" else value

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
