"""The report of a composition sweep: ``report.md``, ``analysis.json`` and three PNG plots.

``write_report(out_dir, results)`` analyses a ``results.json`` payload (schema in
:mod:`speedup.benchmarks.analysis`) and writes into ``out_dir``:

* ``report.md``: the main table (seeds reaching the target, steps-, calibrated- and wall-clock
  time-to-target, speedups with bootstrap CIs, final quality), the pair interactions, the
  Pareto set, the configurations the engine refused to compose, and the environment;
* ``analysis.json``: everything :func:`~speedup.benchmarks.analysis.analyze` computed
  (infinities written as the string ``"inf"``, NaN as null, so the file is strict JSON);
* ``curves.png`` (target metric against training seconds, a line per run, a colour per
  configuration), ``pareto.png`` (time against quality, frontier highlighted) and
  ``interaction.png`` (heat-map of the pair interactions).

``rebuild(out_dir)`` re-reads ``out_dir/results.json`` and rewrites all of it; the report holds
no timestamps and the bootstrap is seeded, so a rebuild reproduces ``report.md`` byte for byte.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from speedup.benchmarks.analysis import analyze

__all__ = ["plot_curves", "plot_interactions", "plot_pareto", "rebuild", "render_markdown"]


def _num(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    return f"{value:.{digits}g}"


def _spread(stats: dict | None, digits: int = 4) -> str:
    """mean ± std (std shown only when defined: two or more finite values)."""
    if not stats or stats["n"] == 0:
        return "n/a"
    text = _num(stats["mean"], digits)
    if not math.isnan(stats["std"]):
        text += f" ± {_num(stats['std'], 2)}"
    return text


def _ci(estimate: dict, suffix: str = "×") -> str:
    point, low, high = estimate["point"], estimate["low"], estimate["high"]
    if math.isnan(point):
        return "n/a"
    text = f"{point:.2f}{suffix}" if math.isfinite(point) else _num(point)
    if math.isnan(low) or (low == high == point):
        return text
    return f"{text} [{_fmt_bound(low)}, {_fmt_bound(high)}]"


def _fmt_bound(value: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) else _num(value)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _flatten(mapping: dict, prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key in sorted(mapping):
        value = mapping[key]
        if isinstance(value, dict):
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def _reading(estimate: dict) -> str:
    """Synergy/interference only when the whole CI lies on one side of 1."""
    point, low, high = estimate["point"], estimate["low"], estimate["high"]
    if math.isnan(point):
        return "undefined (a single never reached the target)"
    if low == high == point:
        return "synergy?" if point > 1 else "interference?" if point < 1 else "neutral"
    if low > 1:
        return "synergy"
    if high < 1:
        return "interference"
    return "within noise"


def render_markdown(results: dict, analysis: dict) -> str:
    """The Markdown report of one sweep (deterministic: no timestamps)."""
    target = results["target"]
    metric = target["metric"]
    relation = "≥" if target.get("higher_is_better", True) else "≤"
    workload = results.get("workload") or {}
    runs = results.get("runs", [])
    confidence = round(100 * analysis.get("confidence", 0.95))
    lines = [f"# Composition benchmark: {results.get('suite', 'unnamed suite')}", ""]
    if results.get("description"):
        lines += [str(results["description"]).strip(), ""]
    lines.append(f"- workload: `{workload.get('recipe', '?')}`")
    if workload.get("budget"):
        lines.append(f"- budget: {workload['budget']}")
    if workload.get("overrides"):
        lines.append(f"- overrides: {' '.join(f'`{o}`' for o in workload['overrides'])}")
    lines += [
        f"- target: {metric} {relation} {target['value']}",
        f"- seeds: {', '.join(str(s) for s in results.get('seeds', []))}",
        f"- baseline seconds per step (timing phase): {_num(results.get('baseline_step_time_s'))}",
        f"- runs: {len(runs)} ({sum(bool(r.get('cached')) for r in runs)} from cache)",
        "",
    ]
    header = [
        "config",
        "seeds reaching target",
        "steps to target",
        "calibrated time to target (s)",
        "wall-clock time to target (s)",
        f"speedup, calibrated [{confidence}% CI]",
        f"speedup, wall-clock [{confidence}% CI]",
        f"final {metric}",
    ]
    rows = []
    for name, stats in analysis["configs"].items():
        rows.append(
            [
                name,
                f"{stats['reached']}/{len(stats['seeds'])}",
                _spread(stats["steps_to_target"]),
                _spread(stats["calibrated_time_to_target_s"]),
                _spread(stats["time_to_target_s"]),
                _ci(stats["speedup_calibrated"]),
                _ci(stats["speedup_raw"]),
                _spread(stats["final_quality"]),
            ]
        )
    lines += _table(header, rows)
    lines += [""] + [f"- {note}" for note in analysis.get("notes", [])]
    lines += ["", "## Curves", "", "![curves](curves.png)", "", "## Interactions", ""]
    if analysis["interactions"]:
        lines.append(
            "interaction = speedup(A+B) / (speedup(A) × speedup(B)) on calibrated times: "
            "> 1 synergy, < 1 interference; a reading is given when the CI excludes 1."
        )
        lines.append("")
        header = ["pair", "speedup A", "speedup B", "A × B", "speedup A+B"]
        header += [f"interaction [{confidence}% CI]", "reading"]
        rows = []
        for row in analysis["interactions"]:
            expected = row["speedup_a"] * row["speedup_b"]
            rows.append(
                [
                    row["pair"],
                    _ci({"point": row["speedup_a"], "low": math.nan, "high": math.nan}),
                    _ci({"point": row["speedup_b"], "low": math.nan, "high": math.nan}),
                    _ci({"point": expected, "low": math.nan, "high": math.nan}),
                    _ci({"point": row["speedup_ab"], "low": math.nan, "high": math.nan}),
                    _ci(row["interaction_calibrated"], suffix=""),
                    _reading(row["interaction_calibrated"]),
                ]
            )
        lines += _table(header, rows)
        lines += ["", "![interaction](interaction.png)"]
    else:
        lines.append("No pair was run together with both of its singles and the baseline.")
    lines += ["", "## Pareto set", ""]
    lines.append(
        "Time is the calibrated time to target, or the calibrated total training time where "
        f"some seed missed the target; quality is the mean final {metric}."
    )
    lines.append("")
    points = {p["config"]: p for p in analysis["pareto"]["points"]}
    rows = [
        [
            name,
            _num(points[name]["time_s"]),
            points[name]["time_kind"].replace("_", " "),
            _num(points[name]["quality"]),
        ]
        for name in analysis["pareto"]["frontier"]
    ]
    lines += _table(["config", "time (s)", "time measured as", f"final {metric}"], rows)
    lines += ["", "![pareto](pareto.png)", "", "## Conflicts (not run)", ""]
    conflicts = results.get("conflicts") or {}
    if conflicts:
        lines += _table(["config", "reason"], [[k, conflicts[k]] for k in sorted(conflicts)])
    else:
        lines.append("None: every requested combination composed.")
    lines += ["", "## Environment", ""]
    environment = _flatten(results.get("environment") or {})
    if environment:
        for key, value in environment:
            text = value if isinstance(value, str) else json.dumps(value)
            lines.append(f"- {key}: {text}")
    else:
        lines.append("Not recorded.")
    return "\n".join(lines) + "\n"


def _figure(width: float = 7.0, height: float = 4.5):  # noqa: ANN202
    """A matplotlib Figure on the Agg canvas (no display, no pyplot global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _colours(names: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def plot_curves(results: dict, analysis: dict, path: Path) -> None:
    """The target metric against training seconds: a line per run, a colour per config."""
    fig = _figure(8.0, 4.5)
    ax = fig.add_subplot()
    names = list(analysis["configs"])
    colours = _colours(names)
    labelled = set()
    for run in results.get("runs", []):
        curve = [p for p in run.get("curve", []) if p.get("value") is not None]
        if not curve:
            continue
        name = run["config"]
        ax.plot(
            [p["train_time_s"] for p in curve],
            [p["value"] for p in curve],
            color=colours.get(name),
            marker=".",
            linewidth=1.2,
            alpha=0.8,
            label=None if name in labelled else name,
        )
        labelled.add(name)
    target = results["target"]
    ax.axhline(target["value"], color="black", linestyle="--", linewidth=1, label="target")
    ax.set_xlabel("training time (s, eval excluded)")
    ax.set_ylabel(target["metric"])
    ax.set_title(f"{results.get('suite', '')}: {target['metric']} vs training time")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_pareto(results: dict, analysis: dict, path: Path) -> None:
    """Calibrated time against final quality; the frontier highlighted and joined."""
    fig = _figure(7.0, 4.5)
    ax = fig.add_subplot()
    points = [p for p in analysis["pareto"]["points"] if math.isfinite(p["time_s"])]
    frontier = set(analysis["pareto"]["frontier"])
    colours = _colours(list(analysis["configs"]))
    for p in points:
        reached = p["time_kind"] == "time_to_target"
        on_front = p["config"] in frontier
        ax.scatter(
            p["time_s"],
            p["quality"],
            s=80 if on_front else 40,
            facecolors=colours[p["config"]] if reached else "none",
            edgecolors="red" if on_front else colours[p["config"]],
            linewidths=2 if on_front else 1,
            zorder=3,
        )
        ax.annotate(
            p["config"],
            (p["time_s"], p["quality"]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    front = sorted((p for p in points if p["config"] in frontier), key=lambda p: p["time_s"])
    if front:
        ax.plot(
            [p["time_s"] for p in front],
            [p["quality"] for p in front],
            color="red",
            linewidth=1,
            drawstyle="steps-post",
            label="Pareto frontier",
            zorder=2,
        )
        ax.legend(fontsize=8)
    metric = results["target"]["metric"]
    ax.set_xlabel("calibrated time to target (s); hollow: target missed, total time")
    ax.set_ylabel(f"final {metric}")
    ax.set_title("time vs quality")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_interactions(analysis: dict, path: Path) -> None:
    """Heat-map of pair interactions (calibrated), algorithms on both axes, values written."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import TwoSlopeNorm

    fig = _figure(6.0, 5.0)
    ax = fig.add_subplot()
    rows = analysis["interactions"]
    names: list[str] = []
    for row in rows:
        names += [n for n in (row["a"], row["b"]) if n not in names]
    if not names:
        ax.text(0.5, 0.5, "no pair measured with both singles", ha="center", va="center")
        ax.set_axis_off()
        fig.savefig(path, dpi=120)
        return
    matrix = np.full((len(names), len(names)), np.nan)
    measured = set()
    for row in rows:
        i, j = names.index(row["a"]), names.index(row["b"])
        matrix[i, j] = matrix[j, i] = row["interaction_calibrated"]["point"]
        measured |= {(i, j), (j, i)}
    finite = matrix[np.isfinite(matrix)]
    low = min([0.9, *finite.tolist()])
    high = max([1.1, *finite.tolist()])
    norm = TwoSlopeNorm(vmin=low, vcenter=1.0, vmax=high)
    cmap = colormaps["RdBu"].with_extremes(bad="#eeeeee")
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, norm=norm)
    for i, j in sorted(measured):
        value = float(matrix[i, j])
        shade = 0.5 if math.isnan(value) else float(norm(min(max(value, low), high)))
        colour = "white" if shade < 0.2 or shade > 0.8 else "black"
        ax.text(j, i, _num(value, 3), ha="center", va="center", fontsize=9, color=colour)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_title("interaction: >1 synergy, <1 interference")
    fig.colorbar(image, ax=ax, label="speedup(A+B) / (speedup(A) × speedup(B))")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def write_report(out_dir: str | Path, results: dict, analysis: dict | None = None) -> Path:
    """Write report.md, analysis.json and the three PNGs into ``out_dir``; returns report.md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    analysis = analyze(results) if analysis is None else analysis
    payload = json.dumps(_jsonable(analysis), indent=2, allow_nan=False) + "\n"
    (out_dir / "analysis.json").write_text(payload, encoding="utf-8")
    plot_curves(results, analysis, out_dir / "curves.png")
    plot_pareto(results, analysis, out_dir / "pareto.png")
    plot_interactions(analysis, out_dir / "interaction.png")
    report = out_dir / "report.md"
    report.write_text(render_markdown(results, analysis), encoding="utf-8")
    return report


def rebuild(out_dir: str | Path) -> Path:
    """Re-read ``out_dir/results.json`` and rewrite the report (``speedup report DIR``)."""
    path = Path(out_dir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the sweep first (it writes results.json)")
    results = json.loads(path.read_text(encoding="utf-8"))
    return write_report(out_dir, results)
