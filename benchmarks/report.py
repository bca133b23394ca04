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


def _figure(width: float = 7.0, height: float = 4.5, layout: str | None = None):  # noqa: ANN202
    """A matplotlib Figure on the Agg canvas (no display, no pyplot global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _colours(names: list[str]) -> dict[str, Any]:
    """Ten clearly different colours (tab20's light/dark pairs are too alike to tell apart
    at a glance); shapes (:func:`_markers`) separate configurations beyond ten."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
_LEGEND_FONT = 8.0
_LEGEND_LINE = 34  # characters per legend line: a long combination wraps at its "+"


def _markers(names: list[str]) -> dict[str, str]:
    """A marker shape per configuration, cycling at another period than the ten colours, so
    that colour and shape together tell up to 70 configurations apart."""
    return {name: _MARKERS[i % len(_MARKERS)] for i, name in enumerate(names)}


def _legend_label(name: str) -> str:
    """A configuration's name wrapped at its "+" signs into lines of at most ~34 characters."""
    lines: list[str] = []
    for part in name.split("+"):
        if lines and len(lines[-1]) + 1 + len(part) <= _LEGEND_LINE:
            lines[-1] += "+" + part
        else:
            lines.append(("+" if lines else "") + part)
    return "\n".join(lines)


def _legend_columns(labels: list[str], width_in: float) -> int:
    """As many legend columns as the longest line of ``labels`` lets fit across the figure."""
    longest = max((len(line) for label in labels for line in label.split("\n")), default=1)
    char_in = 0.6 * _LEGEND_FONT / 72  # the average width of a character of this font
    return max(1, min(len(labels), int(width_in // (longest * char_in + 0.55))))


def _fit_height(fig: Any, legend: Any, plot_height_in: float) -> None:
    """Make the figure tall enough for the plot and, below it, the legend as drawn: the
    legend gets its own room instead of squeezing the axes."""
    fig.canvas.draw()
    legend_in = legend.get_window_extent(fig.canvas.get_renderer()).height / fig.dpi
    fig.set_size_inches(fig.get_figwidth(), plot_height_in + legend_in + 0.15)
    fig.canvas.draw()


def _legend_below(fig: Any, handles: list[Any], labels: list[str], columns: int) -> Any:
    """The legend under the axes, outside them: it never covers data, nor squeezes the axes
    sideways (the figure was made taller for it)."""
    return fig.legend(
        handles,
        labels,
        loc="outside lower center",
        ncols=columns,
        fontsize=_LEGEND_FONT,
        frameon=False,
        handlelength=1.6,
        columnspacing=1.2,
    )


def plot_curves(results: dict, analysis: dict, path: Path) -> Any:
    """The target metric against training seconds: a line per run, a colour per config, the
    legend below the axes. Returns the figure (saved to ``path``)."""
    from matplotlib.lines import Line2D

    names = list(analysis["configs"])
    colours, markers = _colours(names), _markers(names)
    labels = [_legend_label(n) for n in names]
    fig = _figure(9.0, 4.2, layout="constrained")
    ax = fig.add_subplot()
    for run in results.get("runs", []):
        curve = [p for p in run.get("curve", []) if p.get("value") is not None]
        if not curve:
            continue
        name = run["config"]
        ax.plot(
            [p["train_time_s"] for p in curve],
            [p["value"] for p in curve],
            color=colours.get(name),
            marker=markers.get(name, "o"),
            markersize=3,
            linewidth=1.2,
            alpha=0.8,
        )
    target = results["target"]
    ax.axhline(target["value"], color="black", linestyle="--", linewidth=1)
    ax.set_xlabel("training time (s, eval excluded)")
    ax.set_ylabel(target["metric"])
    ax.set_title(f"{results.get('suite', '')}: {target['metric']} vs training time")
    ax.grid(True, alpha=0.3)
    handles = [
        Line2D([], [], color=colours[n], marker=markers[n], markersize=4, linewidth=1.2)
        for n in names
    ]
    handles.append(Line2D([], [], color="black", linestyle="--", linewidth=1))
    labels.append("target")
    legend = _legend_below(fig, handles, labels, _legend_columns(labels, 9.0))
    _fit_height(fig, legend, 4.2)
    fig.savefig(path, dpi=120)
    return fig


def plot_pareto(results: dict, analysis: dict, path: Path) -> Any:
    """Calibrated time against final quality, the frontier highlighted and joined. Every
    configuration is in the legend below the axes (its colour and marker), and named beside
    its point where the name fits without covering another name or point (the baseline's and
    the frontier's first). Returns the figure (saved to ``path``)."""
    from matplotlib.lines import Line2D

    names = list(analysis["configs"])
    colours, markers = _colours(names), _markers(names)
    points = [p for p in analysis["pareto"]["points"] if math.isfinite(p["time_s"])]
    frontier = set(analysis["pareto"]["frontier"])
    labels = [_legend_label(n) for n in names]
    labels += ["Pareto frontier", "target missed (hollow)"]
    fig = _figure(8.0, 4.6, layout="constrained")
    ax = fig.add_subplot()
    for p in points:
        reached = p["time_kind"] == "time_to_target"
        on_front = p["config"] in frontier
        colour = colours.get(p["config"], "grey")
        ax.scatter(
            p["time_s"],
            p["quality"],
            s=90 if on_front else 45,
            marker=markers.get(p["config"], "o"),
            facecolors=colour if reached else "none",
            edgecolors="red" if on_front else colour,
            linewidths=2 if on_front else 1.2,
            zorder=3,
        )
    front = sorted((p for p in points if p["config"] in frontier), key=lambda p: p["time_s"])
    if front:
        ax.plot(
            [p["time_s"] for p in front],
            [p["quality"] for p in front],
            color="red",
            linewidth=1,
            drawstyle="steps-post",
            zorder=2,
        )
    metric = results["target"]["metric"]
    ax.set_xlabel("calibrated time to target (s); where the target was missed: total time")
    ax.set_ylabel(f"final {metric}")
    ax.set_title("time vs quality")
    ax.grid(True, alpha=0.3)
    ax.margins(0.12)  # room inside the axes for the names beside the outermost points
    handles = [
        Line2D([], [], color=colours[n], marker=markers[n], linestyle="none", markersize=6)
        for n in names
    ]
    handles.append(Line2D([], [], color="red", linewidth=1))
    handles.append(
        Line2D([], [], color="grey", marker="o", markerfacecolor="none", linestyle="none")
    )
    legend = _legend_below(fig, handles, labels, _legend_columns(labels, 8.0))
    _fit_height(fig, legend, 4.6)
    fig.set_layout_engine("none")  # freeze the layout: names are placed in pixels
    # Named first: the baseline, then the frontier, then the rest, fastest first in each.
    named = sorted(
        points,
        key=lambda p: (p["config"] != "baseline", p["config"] not in frontier, p["time_s"]),
    )
    areas = [{**p, "marker_area": 90.0 if p["config"] in frontier else 45.0} for p in points]
    # Only the baseline's and the frontier's names may move away on a leader line: another
    # name far from its point would be read as a neighbour's.
    prominent = frontier | {"baseline"}
    items = [(p["time_s"], p["quality"], p["config"], p["config"] in prominent) for p in named]
    _place_labels(fig, ax, items, areas)
    fig.savefig(path, dpi=120)
    return fig


#: Where a point's name may go: (dx, dy) in points from the point, and the text's alignment.
#: Beside it first, then further out with a leader line; above/below it, it starts at the
#: point or ends there.
_LABEL_SPOTS = [
    (dx * r, dy * r, ha, va)
    for r in (1.0, 2.5, 4.0)
    for dx, dy, ha, va in (
        (6, 5, "left", "bottom"),
        (6, -5, "left", "top"),
        (-6, 5, "right", "bottom"),
        (-6, -5, "right", "top"),
        (0, 9, "center", "bottom"),
        (0, -9, "center", "top"),
        (2, 9, "left", "bottom"),
        (2, -9, "left", "top"),
        (-2, 9, "right", "bottom"),
        (-2, -9, "right", "top"),
        (9, 0, "left", "center"),
        (-9, 0, "right", "center"),
    )
]


def _place_labels(
    fig: Any, ax: Any, items: list[tuple[float, float, str, bool]], points: list[dict]
) -> list[Any]:
    """Annotate each ``(x, y, text, may_move_away)`` at the first spot where its box stays
    inside the axes and overlaps no earlier label and no marker (only beside the point unless
    it may move away); a name that fits nowhere is left to the legend. Returns the
    annotations made."""
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    taken = []
    for p in points:  # each marker's box: half its width (sqrt of its area) and its edge
        radius = (math.sqrt(p.get("marker_area", 90.0)) / 2 + 2) * fig.dpi / 72
        x, y = ax.transData.transform((p["time_s"], p["quality"]))
        taken.append((x - radius, y - radius, x + radius, y + radius))
    made = []
    for x, y, text, may_move_away in items:
        for dx, dy, ha, va in _LABEL_SPOTS:
            far = abs(dx) > 10 or abs(dy) > 10
            if far and not may_move_away:
                continue
            note = ax.annotate(
                text,
                (x, y),
                xytext=(dx, dy),
                textcoords="offset points",
                fontsize=7.5,
                ha=ha,
                va=va,
                # A pale backing keeps the name readable where it crosses a line or grid.
                bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.75},
                arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.6} if far else None,
                zorder=4,
            )
            box = note.get_window_extent(renderer)
            bounds = (box.x0, box.y0, box.x1, box.y1)
            fits = (
                box.x0 >= inside.x0
                and box.x1 <= inside.x1
                and box.y0 >= inside.y0
                and box.y1 <= inside.y1
            )
            if fits and not any(_overlap(bounds, other) for other in taken):
                taken.append(bounds)
                made.append(note)
                break
            note.remove()
    return made


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


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
