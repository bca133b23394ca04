"""The ``speedup`` command line: run, plan, list, describe, report, bench, lottery, export.

Imports are deferred to the command that needs them, so ``speedup --help`` stays fast.
Bad input exits with code 2 and one message naming the key and file; ``--debug`` adds the
traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

__all__ = ["main"]

LISTABLE = ("algorithms", "recipes", "models", "datasets", "callbacks", "optimizers", "schedules")


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "recipe", help="a shipped recipe name (see `speedup list recipes`) or a path"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="overrides; ~key deletes a key"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="shrink to a few CPU steps on tiny data, end to end"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="speedup",
        description="Composable training speedups for PyTorch: run recipes, plan compositions.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="train a recipe and write a run directory")
    _add_recipe_args(run)
    run.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="train with N processes on this machine through torchrun (DDP: one per GPU, or "
        "gloo on CPUs); data.batch_size stays the global batch",
    )
    plan = sub.add_parser("plan", help="print the per-event algorithm order and conflicts")
    _add_recipe_args(plan)
    lottery = sub.add_parser(
        "lottery",
        help="lottery-ticket experiments: IMP with controls, pruning at init, instability",
        description="Iterative magnitude pruning with rewinding (default), or --pai, "
        "--instability, --scaling. Every run has its own directory; rerunning the same "
        "command resumes at the first unfinished run.",
    )
    _add_recipe_args(lottery)
    lottery.add_argument(
        "--out", help="experiment directory (default runs/lottery-<recipe>-<hash>)"
    )
    lottery.add_argument("--levels", type=int, default=3, help="IMP levels after the dense one")
    lottery.add_argument("--prune-fraction", type=float, default=0.2, help="of survivors per level")
    lottery.add_argument("--conv-fraction", type=float, help="conv layers' rate (default: same)")
    lottery.add_argument("--output-fraction", type=float, help="output layer (default: half)")
    lottery.add_argument("--scope", choices=("layerwise", "global"), default="layerwise")
    lottery.add_argument("--rewind", default="0ba", help="rewind point, a Time (0ba: init)")
    lottery.add_argument("--mode", choices=("weights", "lr"), default="weights")
    lottery.add_argument("--controls", nargs="*", default=["reinit", "random", "shuffle"])
    lottery.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        help="IMP once per seed (seed_<s>/), then mean ± std per level",
    )
    lottery.add_argument(
        "--pai",
        nargs="+",
        metavar="METHOD",
        help="pruning at init instead: snip grasp synflow magnitude random",
    )
    lottery.add_argument(
        "--densities",
        nargs="+",
        type=float,
        default=[0.2, 0.05],
        help="densities for --pai and --scaling",
    )
    lottery.add_argument("--instability", action="store_true", help="instability analysis")
    lottery.add_argument(
        "--rewind-points", nargs="+", default=["0ba"], help="rewind points for --instability"
    )
    lottery.add_argument("--points", type=int, default=11, help="points on the linear path")
    lottery.add_argument(
        "--scaling",
        action="store_true",
        help="fit the pruning scaling law across widths, predict the largest",
    )
    lottery.add_argument("--widths", nargs="+", type=int, default=[8, 16, 32])
    lottery.add_argument("--width-key", default="model.channels")
    bench = sub.add_parser(
        "bench",
        help="run a composition benchmark suite: baseline, singles, pairs, full",
        description="Runs a suite (see `speedup bench --list`), reusing finished runs, and "
        "writes results.json, report.md and plots to --out.",
    )
    bench.add_argument("suite", nargs="?", help="a shipped suite name or a YAML path")
    bench.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="overrides for the workload recipe of every run",
    )
    bench.add_argument("--list", action="store_true", help="list the shipped suites")
    bench.add_argument("--out", help="output directory (default runs/bench-<suite>)")
    bench.add_argument("--smoke", action="store_true", help="the suite's smoke: settings")
    bench.add_argument("--force", action="store_true", help="recompute finished runs")
    bench.add_argument(
        "--parallel",
        type=int,
        default=1,
        metavar="K",
        help="run K of the sweep's runs at once, each in its own process (GPUs split between them)",
    )
    bench.add_argument(
        "--nproc", type=int, default=1, metavar="N", help="each run with N processes (torchrun)"
    )
    report = sub.add_parser(
        "report",
        help="plot a run (PNGs in RUN_DIR/plots) or rebuild a benchmark report",
        description="Given a `speedup run` directory (it has metrics.jsonl), write PNG plots of "
        "the training loss, eval metrics, learning rate, throughput and, for pruning runs, "
        "sparsity into DIR/plots/. Given a `speedup bench` output directory (results.json), "
        "rebuild report.md and its plots.",
    )
    report.add_argument("dir", help="a `speedup run` directory or a `speedup bench` output dir")
    listing = sub.add_parser("list", help="list registered components")
    listing.add_argument(
        "what",
        nargs="*",
        metavar="KIND",
        help=f"kinds to list: {', '.join(LISTABLE)} (default: all)",
    )
    describe = sub.add_parser("describe", help="an algorithm's method card and declaration")
    describe.add_argument("name", help="an algorithm, model, dataset or recipe name")
    export = sub.add_parser(
        "export",
        help="write model.safetensors (+ config) from a run directory or checkpoint",
        description="Export a run's weights for use without speedup: model.safetensors (the "
        "network's own state_dict, pruned weights as zeros) and, for Hugging Face models, "
        "config.json so that from_pretrained(DIR) loads them.",
    )
    export.add_argument("source", help="a run directory, its checkpoints/ folder or a checkpoint")
    export.add_argument("--out", default=None, help="output folder (default: the run directory)")
    export.add_argument(
        "--ema", action="store_true", help="export the EMA average of a mid-training checkpoint"
    )
    for command in (run, plan, lottery, bench, report, listing, describe, export):
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
    return parser


def cmd_list(args: argparse.Namespace) -> int:
    kinds = list(args.what) or list(LISTABLE)
    unknown = [k for k in kinds if k not in LISTABLE]
    if unknown:
        from speedup.registry import UnknownNameError, suggest

        raise UnknownNameError(
            f"cannot list {unknown[0]!r}{suggest(unknown[0], list(LISTABLE))}; "
            f"kinds: {', '.join(LISTABLE)}"
        )
    from speedup.listing import listing  # reads source files: no component (nor torch) imported

    for kind in kinds:
        rows = listing(kind)
        print(f"{kind}:")
        if not rows:
            print("  (none)")
        width = max((len(n) for n, _ in rows), default=0)
        for name, summary in rows:
            print(f"  {name.ljust(width)}  {summary}".rstrip())
    return 0


def _registry(kind: str):  # noqa: ANN202
    if kind == "algorithms":
        from speedup.algorithm import ALGORITHMS

        return ALGORITHMS
    if kind == "callbacks":
        from speedup.callback import CALLBACKS

        return CALLBACKS
    if kind == "models":
        from speedup.models import MODELS

        return MODELS
    from speedup.data import DATASETS

    return DATASETS


def cmd_describe(args: argparse.Namespace) -> int:
    import inspect

    from speedup.registry import UnknownNameError

    for kind in ("algorithms", "callbacks", "models", "datasets"):
        registry = _registry(kind)
        if args.name in registry:
            item = registry.get(args.name)
            print(f"{args.name} ({kind[:-1]}): {item.__module__}.{item.__qualname__}")
            print()
            print(inspect.cleandoc(item.__doc__ or "(no description)"))
            card = sys.modules[item.__module__].__doc__
            if kind == "algorithms" and card:  # the module docstring is the method card
                print()
                print(inspect.cleandoc(card))
            print()
            print("arguments:")
            print(_format_arguments(item))
            if kind == "algorithms":
                print()
                print(_format_declaration(item()))
            return 0
    from speedup.config import recipe_names, resolve_recipe

    if args.name in recipe_names():
        print(resolve_recipe(args.name).read_text(encoding="utf-8"))
        return 0
    names = sorted(
        {n for k in ("algorithms", "callbacks", "models", "datasets") for n in _registry(k)}
        | set(recipe_names())
    )
    from speedup.registry import suggest

    raise UnknownNameError(
        f"unknown name {args.name!r}{suggest(args.name, names)}; known: {', '.join(names)}"
    )


def _format_arguments(item: object) -> str:
    import inspect

    target = item.__init__ if isinstance(item, type) else item
    lines = []
    for name, param in inspect.signature(target).parameters.items():
        if name in ("self", "info") or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        annotation = param.annotation
        shown = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
        default = "" if param.default is param.empty else f" = {param.default!r}"
        lines.append(f"  {name}: {shown}{default}" if shown else f"  {name}{default}")
    return "\n".join(lines) or "  (none)"


def _format_declaration(algorithm: object) -> str:
    decl = algorithm.declare()  # type: ignore[attr-defined]
    lines = ["declaration:"]
    for event, access in decl.events.items():
        reads = ", ".join(sorted(access.reads)) or "-"
        writes = ", ".join(sorted(access.writes)) or "-"
        lines.append(f"  {event.name}: reads {reads}; writes {writes}")
    for label, value in (
        ("runs_before", decl.runs_before),
        ("runs_after", decl.runs_after),
        ("incompatible_with", decl.incompatible_with),
        ("model_kinds", decl.model_kinds),
        ("data_kinds", decl.data_kinds),
    ):
        shown = ", ".join(sorted(value)) if value is not None else "any"
        lines.append(f"  {label}: {shown or '-'}")
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> int:
    from speedup.config import load_config
    from speedup.run import plan_config

    cfg = load_config(args.recipe, args.overrides, smoke=args.smoke)
    plan, declarations = plan_config(cfg)
    print(f"plan for {cfg.recipe} (model {cfg.model.name}, data {cfg.data.name})")
    print(plan.format(declarations))
    return 1 if plan.conflicts else 0


def cmd_run(args: argparse.Namespace) -> int:
    from speedup import distributed
    from speedup.config import load_config
    from speedup.engine import PlanError
    from speedup.run import plan_config, run_config

    cfg = load_config(args.recipe, args.overrides, smoke=args.smoke)
    plan, _ = plan_config(cfg)
    if plan.conflicts:  # before any data is loaded
        raise PlanError(plan.conflicts)
    if args.nproc > 1 and not distributed.launched_by_torchrun():
        return _launch_torchrun(args, cfg)
    summary = run_config(cfg)
    if not distributed.is_main():
        return 0
    if "preempted" in summary:
        print(
            f"{summary['preempted']}: stopped at step {summary['steps']} after saving "
            f"{summary['checkpoint']}; run the same command again to resume",
            file=sys.stderr,
        )
        return 128 + int(summary["signal"] or 15)  # the shell's code for death by that signal
    print(_format_summary(summary))
    return 0


def _launch_torchrun(args: argparse.Namespace, cfg: object) -> int:
    """Re-run this command under torchrun with ``args.nproc`` processes on this machine."""
    import subprocess

    from speedup.config import check_global_batch

    check_global_batch(cfg.data.batch_size, args.nproc)  # type: ignore[attr-defined]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.nproc}",
        "-m",
        "speedup",
        "run",
        args.recipe,
        *args.overrides,
        *(["--smoke"] if args.smoke else []),
    ]
    print("launching: " + " ".join(command[1:]), file=sys.stderr)
    return subprocess.call(command)


def cmd_export(args: argparse.Namespace) -> int:
    from speedup.export import export_model

    path = export_model(args.source, out=args.out, ema=args.ema)
    print(f"wrote {path}")
    return 0


def cmd_lottery(args: argparse.Namespace) -> int:
    import hashlib
    import json
    from pathlib import Path

    from speedup.config import config_hash, load_config

    cfg = load_config(args.recipe, args.overrides, smoke=args.smoke)
    settings = {k: v for k, v in vars(args).items() if k not in ("recipe", "overrides", "debug")}
    digest = hashlib.sha256(
        (config_hash(cfg) + json.dumps(settings, sort_keys=True, default=str)).encode()
    ).hexdigest()[:8]
    out = Path(args.out or f"runs/lottery-{cfg.recipe}-{digest}")
    if args.pai:
        from speedup.lottery.pai import run_pai

        rows = []
        for method in args.pai:
            rows += run_pai(cfg, out, method, args.densities)
        (out / "pai.json").write_text(json.dumps(rows, indent=2) + "\n")
        for row in rows:
            accs = "  ".join(f"{k}={v:.4f}" for k, v in row["accuracy"].items())
            print(f"{row['method']:>9} density {row['density']:.4f}  {accs}")
    elif args.instability:
        from speedup.lottery.instability import plot_instability, run_instability

        results = run_instability(cfg, out, args.rewind_points, points=args.points)
        plot_instability(results, out / "instability.png")
        for result in results:
            print(f"rewind {result['rewind']}: error barrier {result['barrier']:.4f}")
    elif args.scaling:
        from speedup.lottery.scaling import run_scaling

        report = run_scaling(cfg, out, args.widths, args.densities, width_key=args.width_key)
        for row in report["observations"]:
            print(f"width {row['width']:g}  density {row['density']:.4f}  error {row['error']:.4f}")
        holdout = report.get("holdout")
        if holdout:
            print(
                f"fit on the other widths predicts width {holdout['holdout_width']:g}: mean "
                f"absolute error {holdout['mean_abs_error']:.4f}, mean relative error "
                f"{holdout['mean_rel_error']:.1%}"
            )
    else:
        from speedup.lottery.imp import IMPSettings, run_imp
        from speedup.lottery.report import markdown_table

        try:
            imp = IMPSettings(
                levels=args.levels,
                prune_fraction=args.prune_fraction,
                conv_fraction=args.conv_fraction,
                output_fraction=args.output_fraction,
                scope=args.scope,
                rewind=args.rewind,
                mode=args.mode,
                controls=tuple(args.controls),
            )
        except ValueError as err:
            from speedup.config import ConfigError

            raise ConfigError(f"speedup lottery: {err}") from None
        if args.seeds:  # one experiment per seed, then the mean and spread per level
            from speedup.config import with_changes
            from speedup.lottery.report import average_rows, write_reports

            runs = []
            for seed in args.seeds:
                seeded = with_changes(cfg, seed=seed)
                runs.append(run_imp(seeded, out / f"seed_{seed}", imp))
            rows = average_rows(runs)
            write_reports(out, rows, imp)
        else:
            rows = run_imp(cfg, out, imp)
        print(markdown_table(rows), end="")
    print(f"experiment dir: {out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from speedup.benchmarks.harness import load_suite, run_suite, suite_names

    if args.list or not args.suite:
        for name in suite_names():
            print(name)
        return 0 if args.list else 2
    suite = load_suite(args.suite, smoke=args.smoke)
    suite.overrides = [*suite.overrides, *args.overrides]
    out = args.out or f"runs/bench-{suite.name}{'-smoke' if args.smoke else ''}"
    if args.parallel < 1 or args.nproc < 1:
        from speedup.config import ConfigError

        raise ConfigError("--parallel and --nproc must be >= 1")
    run_suite(suite, out, force=args.force, parallel=args.parallel, nproc=args.nproc)
    print((Path(out) / "report.md").read_text().split("\n## ")[0])
    print(f"report: {Path(out) / 'report.md'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from speedup.config import ConfigError

    directory = Path(args.dir)
    if not directory.is_dir():
        raise ConfigError(f"speedup report: {directory}: no such directory")
    if (directory / "results.json").is_file():  # a `speedup bench` output directory
        from speedup.benchmarks.report import rebuild

        rebuild(directory)
        print(f"report: {directory / 'report.md'}")
        return 0
    if not (directory / "metrics.jsonl").is_file():
        raise ConfigError(
            f"speedup report: {directory} has neither metrics.jsonl (a `speedup run` "
            "directory) nor results.json (a `speedup bench` output directory)"
        )
    from speedup.run_report import plot_run

    paths = plot_run(directory)
    if not paths:
        raise ConfigError(
            f"speedup report: {directory / 'metrics.jsonl'} holds no metrics to plot "
            "(did the run stop before its first log_interval?)"
        )
    for path in paths:
        print(path)
    return 0


def _format_summary(summary: dict) -> str:
    """The end-of-run table, with the best evaluations read back from ``metrics.jsonl``."""
    from speedup.run_report import format_run_summary, read_metrics

    metrics = Path(summary["run_dir"]) / "metrics.jsonl"
    records = read_metrics(metrics) if metrics.is_file() else []
    return format_run_summary(summary, records)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "plan": cmd_plan,
    "lottery": cmd_lottery,
    "bench": cmd_bench,
    "report": cmd_report,
    "list": cmd_list,
    "describe": cmd_describe,
    "export": cmd_export,
}


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input: reported in one line with exit code 2."""
    from speedup.checkpoint import CheckpointError
    from speedup.config import ConfigError
    from speedup.data import DataPathError
    from speedup.engine import PlanError
    from speedup.registry import UnknownNameError

    return (ConfigError, DataPathError, PlanError, UnknownNameError, CheckpointError)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may sit on either side of flags (`run r --smoke a=1`): collect the strays.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e or e.startswith("~") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `speedup list | head`: the reader left; not an error
        sys.stderr.close()
        return 0
    except Exception as err:
        from speedup.guard import NonFiniteLossError

        if isinstance(err, NonFiniteLossError):  # training failed; the message says where
            print(f"error: {err}", file=sys.stderr)
            return 1
        if isinstance(err, _user_errors()):
            if args.debug:
                traceback.print_exc()
            print(f"error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
