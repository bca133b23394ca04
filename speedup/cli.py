"""The ``speedup`` command line: run, plan, list, describe, report, bench, tune, lottery, export.

Imports are deferred to the command that needs them, so ``speedup --help`` stays fast.
Bad input exits with code 2 and one message naming the key and file; ``--debug`` adds the
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from speedup.errors import (
    CheckpointError,
    CheckpointWriteError,
    ConfigError,
    DataPathError,
    NonFiniteLossError,
    PlanError,
    PluginLoadError,
    RunLockedError,
    UnknownNameError,
)

__all__ = ["main"]

#: Output-directory locks (speedup.lock.RunLock) a command takes, released when it returns.
_LOCKS = contextlib.ExitStack()

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
        "command resumes at the first unfinished run, and a rerun with other settings into "
        "the same --out is refused (exit 2), naming what differs.",
    )
    _add_recipe_args(lottery)
    lottery.add_argument(
        "--out", help="experiment directory (default runs/lottery-<recipe>-<hash>)"
    )
    lottery.add_argument("--levels", type=int, default=3, help="IMP levels after the dense one")
    lottery.add_argument("--prune-fraction", type=float, default=0.2, help="of survivors per level")
    lottery.add_argument("--conv-fraction", type=float, help="conv layers' rate (default: same)")
    lottery.add_argument("--output-fraction", type=float, help="output layer (default: half)")
    lottery.add_argument(
        "--scope",
        choices=("layerwise", "global"),
        help="IMP: layerwise (default, as in the LTH paper); --pai: global (default, as in the "
        "SNIP, GraSP and SynFlow papers)",
    )
    lottery.add_argument("--rewind", default="0ba", help="rewind point, a Time (0ba: init)")
    lottery.add_argument(
        "--mode",
        choices=("weights", "lr", "finetune"),
        default="weights",
        help="after pruning: rewind the weights, rewind the LR schedule (Renda et al. 2020), "
        "or fine-tune at the schedule's final LR",
    )
    lottery.add_argument(
        "--finetune-lr", type=float, help="--mode finetune: the constant LR (default: final LR)"
    )
    lottery.add_argument("--controls", nargs="*", default=["reinit", "random", "shuffle"])
    lottery.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        help="the experiment once per seed (seed_<s>/), then mean ± sample std (n) "
        "(IMP, --pai, --instability)",
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
    lottery.add_argument(
        "--masks",
        metavar="PATH",
        help="--instability of a sparse network: a masks.pt of an IMP level "
        "(e.g. OUT/level_3/masks.pt of a run with --rewind equal to the rewind point)",
    )
    lottery.add_argument("--points", type=int, default=11, help="points on the linear path")
    lottery.add_argument(
        "--scaling",
        action="store_true",
        help="fit the pruning scaling law across widths, predict the largest",
    )
    lottery.add_argument("--widths", nargs="+", type=int, default=[8, 16, 32])
    lottery.add_argument(
        "--width-key",
        help="the model argument scaled by --widths (default: its channels, widths or width; "
        "a list such as an MLP's widths is scaled as a whole)",
    )
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
    tune = sub.add_parser(
        "tune",
        help="find the fastest recipe with Optuna, against a baseline tuned as hard; prove it "
        "on fresh seeds",
        description="Tunes the baseline for quality (the target is the median of its final "
        "quality over --seeds), then gives the baseline and the algorithms that apply the same "
        "number of trials to reach the target fastest, and re-runs the best on --validate-seeds. "
        "Writes the study, results.json, recipe.yaml and report.md to --out; the same command "
        "resumes an interrupted tune. See docs/tuning.md.",
    )
    _add_recipe_args(tune)
    tune.add_argument(
        "--target",
        metavar="METRIC[=VALUE]",
        default="accuracy",
        help="the metric to reach (default accuracy); =VALUE fixes the target instead of "
        "pre-registering it from the tuned baseline",
    )
    tune.add_argument("--trials", type=int, default=None, help="trials per phase (default 20)")
    tune.add_argument(
        "--parallel", type=int, default=1, metavar="K", help="K local worker processes"
    )
    tune.add_argument("--storage", help="an Optuna storage URL shared by workers on many machines")
    tune.add_argument("--seeds", type=int, nargs="+", help="search seeds (default 0 1 2)")
    tune.add_argument(
        "--validate-seeds", type=int, nargs="+", help="fresh seeds (default 100-104, >= 5)"
    )
    tune.add_argument("--algorithms", nargs="+", help="search only these (default: all that apply)")
    tune.add_argument(
        "--min-budget", type=float, default=0.25, help="shortest budget, a fraction of the recipe's"
    )
    tune.add_argument(
        "--seed-from",
        metavar="BENCH_DIR",
        help="start the methods search from the best configurations a `speedup bench` sweep "
        "measured (its output directory)",
    )
    tune.add_argument("--out", help="output directory (default runs/tune-<recipe>)")
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
    for command in (run, plan, lottery, bench, tune, report, listing, describe, export):
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
    return parser


def cmd_list(args: argparse.Namespace) -> int:
    kinds = list(args.what) or list(LISTABLE)
    unknown = [k for k in kinds if k not in LISTABLE]
    if unknown:
        from speedup.registry import suggest

        raise UnknownNameError(
            f"cannot list {unknown[0]!r}{suggest(unknown[0], list(LISTABLE))}; "
            f"kinds: {', '.join(LISTABLE)}"
        )
    from speedup.listing import listing  # reads source files: no component (nor torch) imported

    # On a terminal, long summaries wrap under themselves; piped, each stays on one line (grep).
    columns = None
    if sys.stdout.isatty():
        import shutil

        columns = shutil.get_terminal_size().columns
    for kind in kinds:
        rows = listing(kind)
        print(f"{kind}:")
        if not rows:
            print("  (none)")
        width = max((len(n) for n, _ in rows), default=0)
        for name, summary in rows:
            print(_list_row(name.ljust(width), summary, columns))
    return 0


def _list_row(name: str, summary: str, columns: int | None) -> str:
    """``  name  summary``; with ``columns``, the summary wraps in its own column."""
    indent = " " * (len(name) + 4)
    if columns is None or not summary or columns - len(indent) < 30:
        return f"  {name}  {summary}".rstrip()
    import textwrap

    lines = textwrap.wrap(summary, width=columns - len(indent) - 1, break_on_hyphens=False)
    return f"  {name}  " + f"\n{indent}".join(lines)


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

    from speedup.listing import plain_text

    for kind in ("algorithms", "callbacks", "models", "datasets"):
        registry = _registry(kind)
        if args.name in registry:
            item = registry.get(args.name)
            print(f"{args.name} ({kind[:-1]}): {item.__module__}.{item.__qualname__}")
            print()
            # Docstrings are reStructuredText for the API docs; a terminal shows plain text.
            print(plain_text(inspect.cleandoc(item.__doc__ or "(no description)")))
            card = sys.modules[item.__module__].__doc__
            if kind == "algorithms" and card:  # the module docstring is the method card
                print()
                print(plain_text(inspect.cleandoc(card)))
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
    from speedup.config import load_recipe
    from speedup.run import plan_config

    cfg, algorithms = load_recipe(args.recipe, args.overrides, smoke=args.smoke)
    plan, declarations = plan_config(cfg, algorithms)
    print(f"plan for {cfg.recipe} (model {cfg.model.name}, data {cfg.data.name})")
    print(plan.format(declarations))
    if plan.conflicts:  # the error `speedup run` stops on, with its exit code (2: bad input)
        error = PlanError(plan.conflicts)
        count = len(plan.conflicts)
        error.args = (  # one line: the conflicts are in the plan just printed
            f"{count} composition conflict{'s' if count > 1 else ''} (listed above): "
            "`speedup run` refuses this plan",
        )
        raise error
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from speedup import distributed
    from speedup.config import load_recipe
    from speedup.run import plan_config, run_config

    if args.nproc < 1:
        raise ConfigError(f"--nproc: must be >= 1 (processes on this machine), got {args.nproc}")
    # Validation builds the algorithms; they are planned here and that plan and those objects
    # are what trains (the engine plans again only if the model or data is of another kind).
    cfg, algorithms = load_recipe(args.recipe, args.overrides, smoke=args.smoke)
    plan, _ = plan_config(cfg, algorithms)
    if plan.conflicts:  # before any data is loaded
        raise PlanError(plan.conflicts)
    if args.nproc > 1 and not distributed.launched_by_torchrun():
        return _launch_torchrun(args, cfg)
    summary = run_config(cfg, algorithms=algorithms, plan=plan)
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
    import os

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
    # The launcher holds the run directory for its workers: a second launch fails here at
    # once, and rank 0 below finds the lock held by its own launcher (no self-deadlock).
    from speedup.launch import run_launcher
    from speedup.lock import RunLock
    from speedup.run import default_run_dir

    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)  # type: ignore[attr-defined]
    with RunLock(run_dir) as lock:
        print("launching: " + " ".join(command[1:]), file=sys.stderr)
        return run_launcher(command, env={**os.environ, **lock.child_environment()})


def cmd_export(args: argparse.Namespace) -> int:
    from speedup.export import export_model

    path = export_model(args.source, out=args.out, ema=args.ema)
    print(f"wrote {path}")
    return 0


def _lottery_settings_errors(args: argparse.Namespace) -> None:
    """Flags that the chosen experiment would ignore are errors, not silent no-ops."""

    flags = {"--pai": args.pai, "--instability": args.instability, "--scaling": args.scaling}
    chosen = [flag for flag, on in flags.items() if on]
    if len(chosen) > 1:
        raise ConfigError(f"speedup lottery: choose one of {', '.join(chosen)}")
    if args.masks and not args.instability:
        raise ConfigError("speedup lottery: --masks applies to --instability only")
    if args.seeds and args.scaling:
        raise ConfigError("speedup lottery: --seeds applies to IMP, --pai and --instability")
    if args.seeds and len(set(args.seeds)) != len(args.seeds):
        raise ConfigError(f"speedup lottery: --seeds must differ, got {args.seeds}")


def _read_masks(path: str) -> dict:
    import torch

    if not Path(path).is_file():
        raise ConfigError(f"speedup lottery: --masks {path}: no such file")
    try:
        masks = torch.load(path, weights_only=True)
    except Exception as err:  # not a torch file, or not tensors only
        raise ConfigError(f"speedup lottery: --masks {path}: cannot be read: {err}") from None
    if not isinstance(masks, dict) or not all(isinstance(m, torch.Tensor) for m in masks.values()):
        raise ConfigError(
            f"speedup lottery: --masks {path}: expected a dict of parameter name -> bool "
            "tensor (an IMP level's masks.pt)"
        )
    return masks


def _lottery_inputs(args: argparse.Namespace, cfg: object) -> dict | None:
    """Checks what the experiment reads besides the recipe: the --width-key of --scaling
    against the model's arguments, and the --masks of --instability against its weights
    (returned)."""
    if args.scaling:
        from speedup.lottery.scaling import resolve_width_key

        resolve_width_key(cfg, args.width_key)
    if not args.masks:
        return None
    from speedup.config import with_changes
    from speedup.lottery.instability import check_masks
    from speedup.run import build_trainer

    model = build_trainer(with_changes(cfg, progress_bar=False)).state.model
    return check_masks(_read_masks(args.masks), model)


def cmd_lottery(args: argparse.Namespace) -> int:
    import hashlib
    import json
    from pathlib import Path

    from speedup.config import config_hash, load_config, with_changes
    from speedup.lottery.report import format_spread

    _lottery_settings_errors(args)
    cfg = load_config(args.recipe, args.overrides, smoke=args.smoke)
    masks = _lottery_inputs(args, cfg)  # bad inputs exit 2 before the directory is made
    settings = {k: v for k, v in vars(args).items() if k not in ("recipe", "overrides", "debug")}
    digest = hashlib.sha256(
        (config_hash(cfg) + json.dumps(settings, sort_keys=True, default=str)).encode()
    ).hexdigest()[:8]
    out = Path(args.out or f"runs/lottery-{cfg.recipe}-{digest}")
    from speedup.lock import RunLock

    _LOCKS.enter_context(RunLock(out))  # one experiment per directory: a second exits 2
    seeds = args.seeds or [None]

    def for_seed(seed: int | None) -> tuple:  # the config and directory of one replicate
        if seed is None:
            return cfg, out
        return with_changes(cfg, seed=seed), out / f"seed_{seed}"

    if args.pai:
        from speedup.lottery.pai import average_seeds, run_pai

        per_seed = []
        for seed in seeds:
            seeded, where = for_seed(seed)
            rows = []
            for method in args.pai:
                scope = args.scope or "global"
                replicate = seed if seed is not None else 0  # seeds random scores, shuffles
                rows += run_pai(seeded, where, method, args.densities, scope=scope, seed=replicate)
            per_seed.append(rows)
        rows = average_seeds(per_seed) if args.seeds else per_seed[0]
        out.mkdir(parents=True, exist_ok=True)
        (out / "pai.json").write_text(json.dumps(rows, indent=2) + "\n")
        for row in rows:
            if args.seeds:
                accs = "  ".join(
                    f"{k}={format_spread(v, row['accuracy_std'][k], row['accuracy_n'][k])}"
                    for k, v in row["accuracy"].items()
                )
            else:
                accs = "  ".join(f"{k}={v:.4f}" for k, v in row["accuracy"].items())
            print(f"{row['method']:>9} density {row['density']:.4f}  {accs}")
    elif args.instability:
        from speedup.lottery.instability import average_seeds, plot_instability, run_instability

        per_seed = []
        for seed in seeds:
            seeded, where = for_seed(seed)
            per_seed.append(
                run_instability(seeded, where, args.rewind_points, points=args.points, masks=masks)
            )
        results = average_seeds(per_seed) if args.seeds else per_seed[0]
        if args.seeds:
            (out / "instability.json").write_text(json.dumps(results, indent=2) + "\n")
        plot_instability(results, out / "instability.png")
        for result in results:
            barrier = f"{result['barrier']:.4f}"
            if args.seeds:
                barrier = format_spread(result["barrier"], result["barrier_std"], result["n"])
            print(f"rewind {result['rewind']}: error barrier {barrier}")
    elif args.scaling:
        from speedup.lottery.scaling import run_scaling

        report = run_scaling(cfg, out, args.widths, args.densities, width_key=args.width_key)
        print(f"width key: {report['width_key']}")
        for row in report["observations"]:
            print(
                f"width {row['width']:g} ({row['model_arg']})  density {row['density']:.4f}  "
                f"error {row['error']:.4f}"
            )
        fit = report["fit"]
        print(
            f"fit: eps_up {fit['eps_up']:.4f}, gamma {fit['gamma']:.4f}, p {fit['p']:.4g}, "
            f"psi {fit['psi']:.4f}; loss {fit['loss']:.4g}, mean relative error on its own "
            f"data {fit['fit_mean_rel_error']:.1%}"
        )
        holdout = report.get("holdout")
        if holdout:
            print(
                f"fit on the other widths predicts width {holdout['holdout_width']:g}: mean "
                f"absolute error {holdout['mean_abs_error']:.4f}, mean relative error "
                f"{holdout['mean_rel_error']:.1%}, max relative error "
                f"{holdout['max_rel_error']:.1%}"
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
                scope=args.scope or "layerwise",
                rewind=args.rewind,
                mode=args.mode,
                controls=tuple(args.controls),
                finetune_lr=args.finetune_lr,
            )
        except ValueError as err:
            raise ConfigError(f"speedup lottery: {err}") from None
        if args.seeds:  # one experiment per seed, then the mean and spread per level
            from speedup.lottery.report import average_rows, write_reports

            runs = []
            for seed in args.seeds:
                seeded, where = for_seed(seed)
                runs.append(run_imp(seeded, where, imp))
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
        raise ConfigError("--parallel and --nproc must be >= 1")
    run_suite(suite, out, force=args.force, parallel=args.parallel, nproc=args.nproc)
    print((Path(out) / "report.md").read_text().split("\n## ")[0])
    print(f"report: {Path(out) / 'report.md'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
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


def cmd_tune(args: argparse.Namespace) -> int:
    from speedup.tuning import TuneSettings, tune

    metric, _, value = args.target.partition("=")
    try:
        target_value = float(value) if value else None
    except ValueError:
        raise ConfigError(f"--target: {value!r} is not a number (METRIC=VALUE)") from None
    settings = TuneSettings(
        recipe=args.recipe,
        out=args.out or f"runs/tune-{Path(args.recipe).stem}",
        overrides=list(args.overrides),
        smoke=args.smoke,
        metric=metric,
        target_value=target_value,
        trials=args.trials if args.trials is not None else (3 if args.smoke else 20),
        parallel=args.parallel,
        storage=args.storage,
        budget_low=args.min_budget,
        algorithms=args.algorithms,
        seed_from=args.seed_from,
    )
    if args.smoke:  # tiny, but every phase runs
        from speedup.tuning.tune import SMOKE_TIMING

        settings.seeds, settings.validate_seeds = [0, 1], [100, 101]
        settings.timing, settings.top_k = dict(SMOKE_TIMING), 1
    if args.seeds:
        settings.seeds = args.seeds
    if args.validate_seeds:
        settings.validate_seeds = args.validate_seeds
    results = tune(settings)
    out = Path(settings.out)
    for row in results["validated"]:
        s = row["speedup"]
        print(
            f"trial {row['trial']}: speedup {s['point']:.3f} (95% CI {s['low']:.3f}-"
            f"{s['high']:.3f}), misses {row['misses']}/{row['seeds']}"
            + (" -> speedup" if row["is_speedup"] else "")
        )
    print(f"winner: {results['winner']['kind']}; {out / 'recipe.yaml'}, {out / 'report.md'}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "plan": cmd_plan,
    "lottery": cmd_lottery,
    "bench": cmd_bench,
    "tune": cmd_tune,
    "report": cmd_report,
    "list": cmd_list,
    "describe": cmd_describe,
    "export": cmd_export,
}


#: Errors that mean bad input: reported in one line with exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (
    PluginLoadError,
    ConfigError,
    DataPathError,
    PlanError,
    UnknownNameError,
    CheckpointError,
    RunLockedError,
)


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
        with _LOCKS:
            return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `speedup list | head`: the reader left; not an error
        sys.stderr.close()
        return 0
    except Exception as err:
        # Training failed (the input was fine); the message says where and what is intact.
        if isinstance(err, (NonFiniteLossError, CheckpointWriteError)):
            print(f"error: {err}", file=sys.stderr)
            return 1
        if isinstance(err, USER_ERRORS):
            if args.debug:
                traceback.print_exc()
            print(f"error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
