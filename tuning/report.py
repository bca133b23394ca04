"""A tune's outputs: results.json, the winning recipe (YAML with provenance) and report.md.

Plots (matplotlib, Agg): the search history of both studies, the (time, quality) Pareto
front of every trial, and Optuna's parameter importances (fANOVA) when the methods study has
at least two parameters and enough finished trials; importances are diagnostics only
(``research/search-and-records.md``, implication 13).
"""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import fields
from pathlib import Path
from typing import Any

import optuna
import yaml

__all__ = ["git_revision", "trial_points", "winner", "write_outputs"]

#: Importances need a few finished trials to say anything (fANOVA fits a forest on them).
MIN_TRIALS_FOR_IMPORTANCE = 8


def git_revision() -> str:
    """The project's git revision (``unknown`` outside a checkout), with ``+dirty`` when the
    work tree has changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        )
    except OSError:
        return "unknown"
    if rev.returncode != 0:
        return "unknown"
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _json_safe(value: Any) -> Any:
    """inf/NaN as strings: results.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def trial_points(study: optuna.Study) -> list[dict[str, Any]]:
    """Every counted trial of ``study`` as a row: number, state, time, quality, params."""
    from speedup.tuning.study import counted_trials

    return [
        {
            "study": study.study_name,
            "trial": t.number,
            "state": t.state.name,
            "time_to_target_s": t.user_attrs.get("time_to_target_s", math.inf),
            "raw_time_to_target_s": t.user_attrs.get("raw_time_to_target_s"),
            "flops_to_target": t.user_attrs.get("flops_to_target"),
            "final": t.user_attrs.get("final", math.nan),
            "params": t.params,
        }
        for t in counted_trials(study)
    ]


def algorithm_effects(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """What each algorithm bought in the methods search: the median time-to-target of the
    completed trials with it on and off, and how many of each reached the target.

    A diagnostic, not a measurement: the other parameters vary with it (TPE samples
    where it expects gains), so a ratio here says which algorithms the search favoured and
    which interfered, and only the fresh-seed table says what is a speedup."""
    import statistics

    done = [r for r in rows if r["study"] == "methods" and r["state"] == "COMPLETE"]
    names = sorted({k[4:] for r in done for k in r["params"] if k.startswith("use.")})
    effects = {}
    for name in names:
        split: dict[bool, list[float]] = {True: [], False: []}
        for r in done:
            split[bool(r["params"].get(f"use.{name}", False))].append(r["time_to_target_s"])
        effects[name] = {
            side: {
                "trials": len(times),
                "reached": sum(math.isfinite(t) for t in times),
                "median_time_s": statistics.median(times) if times else math.nan,
            }
            for side, times in (("on", split[True]), ("off", split[False]))
        }
    return effects


def winner(results: dict[str, Any]) -> dict[str, Any]:
    """The validated configuration with the largest speedup whose CI lower bound is above 1;
    the fastest tuned baseline when none is."""
    proven = [v for v in results["validated"] if v["is_speedup"]]
    if not proven:
        return {"kind": "baseline", **results["baseline"]}
    best = max(proven, key=lambda v: v["speedup"]["point"])
    return {"kind": "method", **best}


def winning_recipe(results: dict[str, Any], win: dict[str, Any], studies: dict) -> str:
    """The winner as a recipe YAML (``speedup run FILE`` trains it), provenance on top."""
    from omegaconf import OmegaConf

    from speedup.config import RunConfig, with_changes
    from speedup.run import environment

    cfg = with_changes(OmegaConf.create(results["config"]), **win["changes"])
    keep = {f.name for f in fields(RunConfig)} - {"run_dir", "smoke", "seed"}
    body = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k in keep}
    algorithms = ", ".join(body.get("algorithms") or {}) or "no algorithms"
    body["description"] = (
        f"{results['recipe']} as `speedup tune` found it fastest to the target "
        f"({results['target']['metric']} {results['target']['value']:.6g}): {algorithms}, "
        f"{body['optimizer']['name']} at lr {body['optimizer']['lr']:.3g}, "
        f"scheduler {body['scheduler'].get('name', 'constant')}, "
        f"scale_schedule_ratio {body.get('scale_schedule_ratio', 1.0):.3g} of "
        f"{body['max_duration']}. The workload it was tuned on: "
        + str(body.get("description") or results["recipe"]).strip()
        + (
            f" With the overrides {' '.join(results['settings']['overrides'])} (set below)."
            if results["settings"].get("overrides")
            else ""
        )
    )
    study = "methods" if win["kind"] == "method" else win.get("study", "baseline-speed")
    env = {**environment(), "optuna": optuna.__version__}
    if body.get("threads"):  # what the trials ran with, not the process writing this
        env["torch_threads"] = body["threads"]
    row = win.get("speedup")
    lines = [
        f"# Found by `speedup tune {results['recipe']}` and checked on fresh seeds.",
        f"# study: {study} in {results['storage']}, trial {win['trial']}",
        f"# search seeds: {results['settings']['seeds']}; "
        f"validation seeds: {results['settings']['validate_seeds']}",
        f"# target: {results['target']['metric']} {results['target']['value']:.6g} "
        f"({results['target']['source']})",
        (
            f"# speedup vs the fastest tuned baseline: {row['point']:.3f} "
            f"(95% CI {row['low']:.3f}-{row['high']:.3f}), misses {win['misses']}"
            if row
            else "# no configuration beat the tuned baseline on fresh seeds: this is the baseline"
        ),
        f"# git revision: {git_revision()}",
        "# environment: " + json.dumps(env, sort_keys=True),
    ]
    return "\n".join(lines) + "\n" + yaml.safe_dump(body, sort_keys=False)


def _plots(out: Path, rows: list[dict[str, Any]], studies: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from speedup.benchmarks.analysis import pareto_frontier

    made = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("baseline-speed", "methods"):
        points = [
            (r["trial"], r["time_to_target_s"])
            for r in rows
            if r["study"] == name and math.isfinite(r["time_to_target_s"])
        ]
        if points:
            ax.plot(*zip(*points), "o", label=name, alpha=0.7)
    ax.set_xlabel("trial")
    ax.set_ylabel("calibrated time-to-target (s)")
    ax.set_title("search history (misses not shown)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "history.png", dpi=100)
    plt.close(fig)
    made.append("history.png")

    finite = [r for r in rows if math.isfinite(r["time_to_target_s"])]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("baseline-speed", "methods"):
        pts = [(r["time_to_target_s"], r["final"]) for r in finite if r["study"] == name]
        if pts:
            ax.plot(*zip(*pts), "o", label=name, alpha=0.6)
    front = pareto_frontier([(r["time_to_target_s"], r["final"]) for r in finite])
    if front:
        ax.plot(
            [finite[i]["time_to_target_s"] for i in front],
            [finite[i]["final"] for i in front],
            "k--",
            label="Pareto front",
        )
    ax.set_xlabel("calibrated time-to-target (s)")
    ax.set_ylabel("final quality")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=100)
    plt.close(fig)
    made.append("pareto.png")
    return made


def importances(study: optuna.Study) -> dict[str, float]:
    """Optuna's parameter importances of the finished trials (empty when there are fewer
    than two parameters or :data:`MIN_TRIALS_FOR_IMPORTANCE` trials)."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    names = {p for t in complete for p in t.params}
    if len(names) < 2 or len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
        return {}
    try:
        return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError):  # e.g. a parameter that never varied
        return {}


def write_outputs(out: Path, results: dict[str, Any], studies: dict) -> dict[str, Any]:
    """Write results.json, recipe.yaml, report.md and the plots into ``out``."""
    from speedup.benchmarks.analysis import pareto_frontier

    rows = [row for study in studies.values() for row in trial_points(study)]
    finite = [r for r in rows if math.isfinite(r["time_to_target_s"])]
    front = pareto_frontier([(r["time_to_target_s"], r["final"]) for r in finite])
    results = {
        **results,
        "trials": rows,
        "pareto": [finite[i] for i in front],
        "importances": importances(studies["methods"]),
        "algorithm_effects": algorithm_effects(rows),
    }
    win = winner(results)
    results["winner"] = {"kind": win["kind"], "trial": win["trial"], "changes": win["changes"]}
    (out / "recipe.yaml").write_text(winning_recipe(results, win, studies), encoding="utf-8")
    plots = _plots(out, rows, studies)
    if results["importances"]:
        import matplotlib.pyplot as plt

        names = list(results["importances"])
        fig, ax = plt.subplots(figsize=(6, 0.4 * len(names) + 1.5))
        ax.barh(names[::-1], [results["importances"][n] for n in names][::-1])
        ax.set_xlabel("importance (fANOVA)")
        fig.tight_layout()
        fig.savefig(out / "importances.png", dpi=100)
        plt.close(fig)
        plots.append("importances.png")
    (out / "results.json").write_text(json.dumps(_json_safe(results), indent=2) + "\n")
    (out / "report.md").write_text(_markdown(results, plots), encoding="utf-8")
    return results


def _fmt(x: Any, spec: str = ".4g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "miss"
    return format(x, spec)


def _markdown(results: dict[str, Any], plots: list[str]) -> str:
    t = results["target"]
    lines = [
        f"# speedup tune: {results['recipe']}",
        "",
        f"Target: **{t['metric']} {'>=' if t['higher_is_better'] else '<='} {t['value']:.6g}** "
        f"({t['source']}; the tuned baseline's median final quality over seeds "
        f"{results['settings']['seeds']} was {t['tuned_baseline_median']:.6g}).",
        f"Trials: baseline {results['trial_counts']['baseline-speed']}, "
        f"methods {results['trial_counts']['methods']} (same budget). "
        f"Baseline step time {results['baseline_step_s']:.4g} s.",
        "",
        "## Validated on fresh seeds",
        "",
        f"Seeds {results['settings']['validate_seeds']}, never used in the search; speedup = "
        "mean baseline time / mean configuration time (calibrated), 95% bootstrap CI. Only a "
        "CI lower bound above 1 is a speedup.",
        "",
        "| trial | configuration | speedup | 95% CI | speedup? | FLOPs speedup (95% CI) "
        "| misses | final quality |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in results["validated"]:
        algos = ", ".join(v["changes"].get("algorithms") or {}) or "(none)"
        s, f = v["speedup"], v.get("flops_speedup")
        flops = (
            f"{_fmt(f['point'], '.3f')} ({_fmt(f['low'], '.3f')}-{_fmt(f['high'], '.3f')})"
            if f
            else "-"
        )
        lines.append(
            f"| {v['trial']} | {algos} | {_fmt(s['point'], '.3f')} | "
            f"{_fmt(s['low'], '.3f')}-{_fmt(s['high'], '.3f')} | "
            f"{'yes' if v['is_speedup'] else 'no'} | {flops} | {v['misses']}/{v['seeds']} | "
            f"{_fmt(v['final_mean'])} |"
        )
    if not results["validated"]:
        lines.append("| - | no method configuration reached the target in the search | | | | | | |")
    base = results["baseline"]["runs"]
    base_misses = sum(math.isinf(r["time_to_target_s"]) for r in base)
    lines += [
        "",
        f"Fastest tuned baseline ({results['baseline'].get('study', 'baseline-speed')} trial "
        f"{results['baseline']['trial']}): times "
        + ", ".join(_fmt(r["time_to_target_s"]) for r in base)
        + f" s; it missed the target on {base_misses} of {len(base)} fresh seeds.",
    ]
    if base_misses:
        lines.append(
            "The target is the tuned full-budget baseline's median, so the fastest baseline "
            "misses it on some seeds by construction; each such miss is counted at the "
            "calibrated time of its whole run (a lower bound on its time-to-target), so the "
            "speedups above can only understate."
        )
    lines += [
        "",
        f"Winner: **{results['winner']['kind']}** (trial {results['winner']['trial']}), "
        "written to recipe.yaml.",
        "",
        "## Pareto front (time, quality), all trials",
        "",
        "| study | trial | time-to-target (s) | raw (s) | final |",
        "|---|---|---|---|---|",
    ]
    for r in results["pareto"]:
        lines.append(
            f"| {r['study']} | {r['trial']} | {_fmt(r['time_to_target_s'])} | "
            f"{_fmt(r['raw_time_to_target_s'])} | {_fmt(r['final'])} |"
        )
    if results.get("algorithm_effects"):
        lines += [
            "",
            "## What each algorithm bought in the search (diagnostic)",
            "",
            "Completed methods trials with the algorithm on and off: how many reached the "
            "target and their median calibrated time-to-target (a miss counts as infinite). "
            "Other parameters vary with it, so this shows what the search favoured and what "
            "interfered; only the table above measures a speedup.",
            "",
            "| algorithm | on: reached/trials | on: median (s) | off: reached/trials "
            "| off: median (s) |",
            "|---|---|---|---|---|",
        ]
        for name, e in results["algorithm_effects"].items():
            on, off = e["on"], e["off"]
            lines.append(
                f"| {name} | {on['reached']}/{on['trials']} | {_fmt(on['median_time_s'])} | "
                f"{off['reached']}/{off['trials']} | {_fmt(off['median_time_s'])} |"
            )
    if results["importances"]:
        lines += ["", "## Parameter importances (methods study, fANOVA)", ""]
        lines += [f"- {k}: {v:.3f}" for k, v in results["importances"].items()]
    lines += ["", *[f"![{p}]({p})" for p in plots], ""]
    return "\n".join(lines)
