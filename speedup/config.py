"""Recipes: YAML files validated against a structured schema before anything trains.

A recipe is a YAML file (shipped ones are found by name) that may ``extends:`` another; the
command line adds ``key=value`` overrides (``~key`` deletes a key). Layers merge in order
(base recipe, child recipe, ``smoke:`` section under ``--smoke``, command line), and every
problem is reported as a :class:`ConfigError` naming the key, the file it came from and what
is allowed.
"""

from __future__ import annotations

import collections.abc
import hashlib
import inspect
import json
import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from speedup.arguments import check_arguments
from speedup.errors import ConfigError, UnknownNameError
from speedup.registry import suggest
from speedup.time import Time, TimeUnit, schedule_time

if TYPE_CHECKING:
    from collections.abc import Iterator

    from speedup.algorithm import Algorithm

__all__ = [
    "NOT_TRAINING_KEYS",
    "ConfigError",
    "RunConfig",
    "DATA_LOADER_KEYS",
    "check_arguments",
    "check_batch_fits",
    "config_hash",
    "with_changes",
    "LoadedRecipe",
    "load_config",
    "load_recipe",
    "recipe_names",
    "resolve_recipe",
]

COMMAND_LINE = "the command line"


def _key(
    kind: str,
    help: str,
    default: Any = MISSING,
    *,
    factory: collections.abc.Callable[[], Any] | None = None,
    required: bool = False,
) -> Any:
    """A :class:`RunConfig` field with its documentation beside it, as field metadata:
    ``kind`` (the type as the reference shows it) and ``help`` (what the key does), the way
    OpenLTH keeps each hyperparameter's help beside it. ``required``: the schema's default is
    an empty section the recipe must fill (a model or dataset ``name``), so the reference
    shows no default. :data:`REFERENCE` and the keys table of docs/recipes.md are generated
    from these."""
    metadata = {"kind": kind, "help": help, "required": required}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _default_optimizer() -> dict[str, Any]:
    from speedup.optim import DEFAULT_OPTIMIZER  # optim imports torch; config stays light

    return dict(DEFAULT_OPTIMIZER)


def _default_scheduler() -> dict[str, Any]:
    from speedup.optim import DEFAULT_SCHEDULER

    return dict(DEFAULT_SCHEDULER)


@dataclass
class RunConfig:
    """The schema of a recipe. Component sections (model, data, optimizer, scheduler,
    algorithms, callbacks) hold ``name`` plus that component's own arguments, which are
    checked against its signature. Each field's ``metadata`` holds its ``kind`` and ``help``:
    the one description of the key (see :func:`reference_table`)."""

    description: str = _key("str", "free text", "")
    model: dict[str, Any] = _key(
        "mapping",
        "`name` (see `speedup list models`) plus that model's arguments",
        factory=dict,
        required=True,
    )
    data: dict[str, Any] = _key(
        "mapping",
        "`name` (see `speedup list datasets`), loader keys `batch_size` (required), "
        "`eval_batch_size`, `num_workers`, `train_samples`, `eval_samples` (take the first "
        "N), plus the dataset's arguments",
        factory=dict,
        required=True,
    )
    optimizer: dict[str, Any] = _key(
        "mapping",
        "`name` from torch.optim or torch-optimizer (case-insensitive) plus its constructor "
        "arguments",
        factory=_default_optimizer,
    )
    scheduler: dict[str, Any] = _key(
        "mapping",
        "`name`: constant, linear (`start_factor`, `end_factor`), cosine (`alpha_f`), step "
        "(`step_size`, `gamma`), multistep (`milestones`, `gamma`), wsd (`decay`, `shape`: "
        "linear or sqrt, `final_factor`; warmup-stable-decay, Hägele et al. 2024); `warmup` "
        "(a Time) and `scale_warmup` for all",
        factory=_default_scheduler,
    )
    algorithms: dict[str, Any] = _key(
        "mapping", "algorithm name -> its arguments (`{}` for defaults)", factory=dict
    )
    callbacks: dict[str, Any] = _key("mapping", "callback name -> its arguments", factory=dict)
    loggers: dict[str, Any] = _key(
        "mapping",
        "extra metric destinations besides `metrics.jsonl`: `csv`, `tensorboard`, `mlflow`, "
        "each with its arguments (`{}` for defaults); see [logging.md](logging.md)",
        factory=dict,
    )
    max_duration: str = _key(
        "Time", "run length in `ep`, `ba`, `sp`, `tok` or `sec` (not `dur`)", "1ep"
    )
    eval_interval: str = _key(
        "Time",
        "evaluate every ...; `0ba` evaluates only at the end (the end is always evaluated)",
        "1ep",
    )
    log_interval: str = _key("Time", "log training loss, LR and throughput every ...", "10ba")
    seed: int = _key("int", "seeds python, numpy, torch and the data order", 17)
    data_seed: int | None = _key(
        "int or null",
        "seeds the data order alone (default: `seed`); instability analysis varies it",
        None,
    )
    microbatch_size: int | None = _key(
        "int or null",
        "split each batch for gradient accumulation (same gradient as the whole batch)",
        None,
    )
    precision: str = _key(
        "str",
        "`fp32`, `bf16` (autocast, CPU or GPU), `fp16` (autocast with GradScaler, CUDA only)",
        "fp32",
    )
    device: str = _key(
        "str", "`auto` (CUDA, then MPS, then CPU), or any torch device string", "auto"
    )
    deterministic: bool = _key("bool", "`torch.use_deterministic_algorithms(True)`", False)
    compile: bool = _key("bool", "`torch.compile` the model", False)
    scale_schedule_ratio: float = _key(
        "float",
        "stretch the run and every schedule milestone by this factor (warmup only with "
        "`scale_warmup`)",
        1.0,
    )
    run_dir: str | None = _key(
        "str or null",
        "where the run writes; default `runs/<recipe>-<hash of the resolved config>`",
        None,
    )
    checkpoint: dict[str, Any] = _key(
        "mapping",
        "checkpoints into `<run_dir>/checkpoints` (or `folder`): every `interval` (a Time; "
        "`0ba` only saves at the end), keeping the `keep_last` newest (0 keeps all); see "
        "[checkpoints.md](checkpoints.md)",
        factory=lambda: {"interval": "1ep", "keep_last": 2, "save_final": True},
    )
    resume: str = _key(
        "str",
        "`auto` continues from the run directory's newest complete checkpoint (so the same "
        "command resumes); `never` starts from scratch; or a checkpoint / run directory path",
        "auto",
    )
    nonfinite: str = _key(
        "str",
        "a NaN/Inf training loss or gradient `stop`s the run before the optimizer step "
        "(exit 1, naming the step), or `skip`s that batch",
        "stop",
    )
    distributed: dict[str, Any] = _key(
        "mapping",
        "under torchrun (`--nproc N`): `ddp`, or `fsdp` (FSDP2, with `param_dtype` "
        "bf16/fp16/fp32); see [distributed.md](distributed.md)",
        factory=lambda: {"strategy": "ddp", "param_dtype": None},
    )
    threads: int | None = _key(
        "int or null",
        "`torch.set_num_threads` (1 is often fastest on busy or 2-core machines)",
        None,
    )
    progress_bar: bool = _key("bool", "a tqdm bar for training and evaluation", True)
    trace: bool = _key(
        "bool", "write `trace.jsonl`: every (event, algorithm/callback) call in order", False
    )
    smoke: dict[str, Any] = _key(
        "mapping",
        "overrides applied under `--smoke` (after the built-in smoke settings)",
        factory=dict,
    )


#: The recipes reference, key -> (type, meaning), read from :class:`RunConfig`'s field
#: metadata (the one place each key is described); docs/recipes.md's keys table is generated
#: from it (``python -m speedup.config``) and a test keeps the two equal. ``extends`` is the
#: one entry written here: it is not a field, since the loader consumes it while reading each
#: file (:func:`_recipe_layers`) and no merged config ever holds it.
REFERENCE: dict[str, tuple[str, str]] = {
    "extends": ("str", "a recipe name or path (relative to this file) to start from"),
    **{f.name: (f.metadata["kind"], f.metadata["help"]) for f in fields(RunConfig)},
}


#: Keys of the ``data`` section that configure the loaders, not the dataset builder.
DATA_LOADER_KEYS: dict[str, type] = {
    "name": str,
    "batch_size": int,
    "eval_batch_size": int,
    "num_workers": int,
    "train_samples": int,
    "eval_samples": int,
}

_PRECISIONS = ("fp32", "bf16", "fp16")
_COMPONENT_SECTIONS = ("model", "data", "optimizer", "scheduler")
_TOP_KEYS = [f.name for f in fields(RunConfig)]
_MAPPING_KEYS = {
    key for key, kind in typing.get_type_hints(RunConfig).items() if typing.get_origin(kind) is dict
}

# -- finding recipes ------------------------------------------------------------------------


def _recipe_dir() -> Path:
    return Path(str(resources.files("speedup.recipes")))


def recipe_names() -> list[str]:
    return sorted(p.stem for p in _recipe_dir().glob("*.yaml"))


def resolve_recipe(name_or_path: str, relative_to: Path | None = None) -> Path:
    """A path to an existing YAML file, or the name of a shipped recipe."""
    candidates = [Path(name_or_path)]
    if relative_to is not None:
        candidates.insert(0, relative_to / name_or_path)
    for candidate in candidates:
        if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
            return candidate.resolve()
    shipped = _recipe_dir() / f"{Path(name_or_path).stem}.yaml"
    if "/" not in name_or_path and shipped.is_file():
        return shipped
    names = recipe_names()
    raise ConfigError(
        f"unknown recipe {name_or_path!r}{suggest(name_or_path, names)}: not a YAML file and "
        f"not a shipped recipe; shipped recipes: {', '.join(names)}"
    )


# -- loading layers -------------------------------------------------------------------------


#: Bounds on a recipe file. Recipes are a few hundred values; the bounds are far above that
#: and far below what would stall loading. YAML aliases let a short file stand for a huge tree
#: ("billion laughs": each level repeats the previous one ten times), which PyYAML builds as
#: shared references but OmegaConf expands into real nodes, so the bound is on the expanded
#: size, not on the text.
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_VALUES = 100_000
MAX_RECIPE_DEPTH = 64


def _expanded_size(data: Any, path: Path) -> int:
    """The number of values in ``data`` with every alias expanded, counted without expanding:
    a container shared by several aliases is sized once and counted at each use."""
    sizes: dict[int, int] = {}
    open_ids: set[int] = set()  # containers being sized: meeting one again is a cycle

    def size(node: Any, depth: int) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_ids:
            raise ConfigError(
                f"{path}: a YAML alias refers to a mapping or list that contains it; a recipe "
                "must be a tree"
            )
        if depth > MAX_RECIPE_DEPTH:
            raise ConfigError(f"{path}: nested deeper than {MAX_RECIPE_DEPTH} levels")
        open_ids.add(key)
        total = 1
        for child in node.values() if isinstance(node, dict) else node:
            total += size(child, depth + 1)
            if total > MAX_RECIPE_VALUES:  # stop counting: the answer is already no
                raise ConfigError(
                    f"{path}: expands to more than {MAX_RECIPE_VALUES:,} values through YAML "
                    "aliases (&anchor/*alias); refusing it (a recipe has a few hundred)"
                )
        open_ids.discard(key)
        sizes[key] = total
        return total

    return size(data, 0)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's message in one line: where, then what (its own text spans several lines)."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is None or problem is None:
        return ": " + " ".join(str(err).split())
    return f" at line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise ConfigError(
            f"{path}: {path.stat().st_size:,} bytes; a recipe may be at most "
            f"{MAX_RECIPE_BYTES:,} bytes"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML{_yaml_problem(err)}") from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise ConfigError(f"{path}: nested too deeply to read") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    _expanded_size(data, path)
    return data


def _recipe_layers(path: Path, chain: tuple[Path, ...] = ()) -> list[tuple[str, dict]]:
    """The recipe and its ``extends:`` ancestors, base first."""
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain, path))
        raise ConfigError(f"{path}: extends: cycle {cycle}")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    layers: list[tuple[str, dict]] = []
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: extends: must be a recipe name or path, got {parent!r}")
        try:
            parent_path = resolve_recipe(parent, relative_to=path.parent)
        except ConfigError as err:
            raise ConfigError(f"{path}: extends: {err}") from None
        layers = _recipe_layers(parent_path, (*chain, path))
    return [*layers, (str(path), data)]


def _parse_overrides(overrides: list[str]) -> tuple[list[str], dict[str, Any]]:
    deletions, assignments = [], []
    for item in overrides:
        if item.startswith("~"):
            deletions.append(item[1:])
        elif "=" not in item:
            raise ConfigError(f"{COMMAND_LINE}: override {item!r} must be key=value (or ~key)")
        else:
            assignments.append(item)
    try:
        values = OmegaConf.to_container(OmegaConf.from_dotlist(assignments))
    except OmegaConfBaseException as err:
        raise ConfigError(f"{COMMAND_LINE}: cannot parse overrides: {err}") from None
    return deletions, values  # type: ignore[return-value]


def _flat_keys(data: Any, prefix: str = "") -> list[str]:
    if not isinstance(data, dict):
        return []
    keys = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        keys.extend(_flat_keys(value, dotted + "."))
    return keys


def _delete(container: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    node = container
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            raise ConfigError(f"{COMMAND_LINE}: ~{dotted}: no such key to delete")
    if not isinstance(node, dict) or last not in node:
        raise ConfigError(f"{COMMAND_LINE}: ~{dotted}: no such key to delete")
    del node[last]


def _merge_layer(base: DictConfig, layer: dict, source: str) -> DictConfig:
    for key in layer:
        if key not in _TOP_KEYS:
            raise ConfigError(
                f"{source}: unknown key {key!r}{suggest(str(key), _TOP_KEYS)}; "
                f"allowed top-level keys: {', '.join(_TOP_KEYS)}"
            )
    for key, value in layer.items():
        # OmegaConf cannot merge a list or a scalar into a mapping field, and says so in a
        # TypeError that names neither the key nor the file.
        if key in _MAPPING_KEYS and value is not None and not isinstance(value, dict):
            raise ConfigError(
                f"{source}: {key}: expected a mapping of keys (key: value lines), got "
                f"{type(value).__name__} {value!r}"
            )
    for section in _COMPONENT_SECTIONS:
        # Naming a different component replaces the section: sgd's momentum must not leak
        # into an inherited adamw.
        new = layer.get(section)
        if isinstance(new, dict) and "name" in new and base[section].get("name") != new["name"]:
            base = base.copy()
            kept = {k: v for k, v in base[section].items() if k in DATA_LOADER_KEYS}
            base[section] = kept if section == "data" else {}
    try:
        return OmegaConf.merge(base, layer)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        expected = _expected_type(key)
        raise ConfigError(f"{source}: {key}: wrong type ({_short(err)}){expected}") from None


def _expected_type(key: str) -> str:
    for f in fields(RunConfig):
        if f.name == key:
            return f"; expected {getattr(f.type, '__name__', f.type)}"
    return ""


def _short(err: Exception) -> str:
    return str(err).splitlines()[0]


# -- semantic checks ------------------------------------------------------------------------


def _type_ok(value: Any, annotation: Any) -> bool:
    """A lenient runtime check for the annotation shapes builders use (see
    :func:`speedup.arguments.value_fits`, the one definition)."""
    from speedup.arguments import value_fits

    return value_fits(value, annotation)


#: Where a dotted key came from (a file, the command line, ...): see :func:`_source_finder`.
_Source = collections.abc.Callable[[str], str]


def _source_finder(origin: dict[str, str]) -> _Source:
    """``src(key)``: the layer that set ``key``, or its nearest dotted parent, or "recipe"."""

    def src(key: str) -> str:
        while key and key not in origin:
            key = key.rpartition(".")[0]
        return origin.get(key, "recipe")

    return src


def _validate(cfg: DictConfig, origin: dict[str, str]) -> list[Algorithm]:
    """Every semantic check of a merged config, section by section; the first problem is
    raised as a ConfigError naming the key and the layer that set it. The order is part of
    the behaviour: a config with several problems reports the first one checked. Returns the
    recipe's algorithms, which checking their values built."""
    src = _source_finder(origin)
    _validate_durations(cfg, src)
    _validate_top_level(cfg, src)
    _validate_machine(cfg, src)
    _validate_checkpointing(cfg, src)
    _validate_distributed(cfg, src)
    _validate_loggers(cfg, src)
    _validate_model_and_data(cfg, src)
    _validate_optimizer(cfg, src)
    _validate_scheduler(cfg, src)
    algorithms = _validate_algorithms(cfg, src)
    _validate_callbacks(cfg, src)
    _validate_fsdp_algorithms(cfg, src, algorithms)
    return algorithms


def _validate_durations(cfg: DictConfig, src: _Source) -> None:
    """max_duration, eval_interval and log_interval are Times. Errors list the units the key
    accepts: dur (a fraction of max_duration) is not one of max_duration's."""
    for key, allow_dur in (
        ("max_duration", False),
        ("eval_interval", True),
        ("log_interval", True),
    ):
        units = [u for u in TimeUnit if allow_dur or u != TimeUnit.DURATION]
        try:
            value = Time.parse(str(cfg[key]), units=units)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{src(key)}: {key}: {err}") from None
        if key == "max_duration" and value.value <= 0:
            raise ConfigError(f"{src(key)}: {key}: must be > 0, got {value}")


def _validate_top_level(cfg: DictConfig, src: _Source) -> None:
    """The scalar keys with a range: precision, scale_schedule_ratio, microbatch_size."""
    if cfg.precision not in _PRECISIONS:
        raise ConfigError(
            f"{src('precision')}: precision: {cfg.precision!r} is not allowed; "
            f"allowed: {', '.join(_PRECISIONS)}"
        )
    if cfg.scale_schedule_ratio <= 0:
        raise ConfigError(f"{src('scale_schedule_ratio')}: scale_schedule_ratio: must be > 0")
    if cfg.microbatch_size is not None and cfg.microbatch_size <= 0:
        raise ConfigError(f"{src('microbatch_size')}: microbatch_size: must be > 0")


def _validate_component(
    cfg: DictConfig,
    src: _Source,
    section: str,
    registry: Any,
    reserved: dict[str, type] | None = None,
) -> None:
    """A ``name`` + arguments section: the name is registered, the ``reserved`` keys (the data
    loader's) have their types, the rest are the builder's arguments; a model's int
    arguments are sizes (:func:`_check_sizes`)."""
    spec = OmegaConf.to_container(cfg[section])
    if "name" not in spec:
        raise ConfigError(
            f"{src(section)}: {section}.name: missing; available: {', '.join(registry.names())}"
        )
    try:
        builder = registry.get(spec["name"])
    except UnknownNameError as err:
        raise ConfigError(f"{src(section + '.name')}: {section}.name: {err}") from None
    args = {k: v for k, v in spec.items() if k != "name" and k not in (reserved or {})}
    for key, kind in (reserved or {}).items():
        if key in spec and spec[key] is not None and not _type_ok(spec[key], kind):
            raise ConfigError(
                f"{src(f'{section}.{key}')}: {section}.{key}: wrong type: got "
                f"{spec[key]!r}, expected {kind.__name__}"
            )
    skip = ("info",) if section == "model" else ()
    check_arguments(builder, args, section, src(section), skip=skip)
    if section == "model":
        _check_sizes(builder, args, section, src)


def _validate_model_and_data(cfg: DictConfig, src: _Source) -> None:
    """The model and the dataset are registered and take their arguments; the loader keys
    have usable values (a batch size, sample counts > 0, workers >= 0)."""
    from speedup.data import DATASETS
    from speedup.models import MODELS

    _validate_component(cfg, src, "model", MODELS)
    _validate_component(cfg, src, "data", DATASETS, DATA_LOADER_KEYS)
    if cfg.data.get("batch_size") is None:
        raise ConfigError(f"{src('data')}: data.batch_size: missing (an int)")
    for key in ("batch_size", "eval_batch_size", "train_samples", "eval_samples"):
        value = cfg.data.get(key)
        if value is not None and value <= 0:
            raise ConfigError(f"{src('data.' + key)}: data.{key}: must be > 0, got {value}")
    workers = cfg.data.get("num_workers")
    if workers is not None and workers < 0:
        raise ConfigError(
            f"{src('data.num_workers')}: data.num_workers: must be >= 0 (0 loads in the "
            f"training process), got {workers}"
        )
    if cfg.data.get("train_samples") is not None:  # the dataset's own size is checked once built
        check_batch_fits(
            cfg.data.batch_size, cfg.data.train_samples, src("data"), "data.train_samples"
        )


def _entries(
    cfg: DictConfig, section: str, registry: Any, src: _Source, skip: tuple[str, ...] = ()
) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """A named-entries section (``algorithms``, ``callbacks``, ``loggers``), entry by entry: its
    name, its registered class, and its arguments, which must be a mapping (or null/``{}``:
    defaults) of names and types the class takes (``skip``: arguments the run supplies)."""
    for name, args in OmegaConf.to_container(cfg[section]).items():
        where = src(f"{section}.{name}")
        try:
            cls = registry.get(name)
        except UnknownNameError as err:
            raise ConfigError(f"{where}: {section}: {err}") from None
        if args is not None and not isinstance(args, dict):
            raise ConfigError(
                f"{where}: {section}.{name}: expected a mapping of arguments (or {{}} for "
                f"defaults), got {args!r}"
            )
        check_arguments(cls, args or {}, f"{section}.{name}", where, skip=skip)
        yield name, cls, args or {}


def _validate_algorithms(cfg: DictConfig, src: _Source) -> list[Algorithm]:
    """Each algorithm is registered and takes its arguments (names and types); building it
    with :func:`~speedup.algorithm.build_algorithm` checks their values (ranges, enums). The
    built algorithms are returned, to be planned and trained (:func:`load_recipe`)."""
    from speedup.algorithm import ALGORITHMS, build_algorithm

    algorithms = []
    for name, _, args in _entries(cfg, "algorithms", ALGORITHMS, src):
        try:
            algorithms.append(build_algorithm(name, args))
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{src(f'algorithms.{name}')}: algorithms.{name}: {err}") from None
    return algorithms


def _validate_callbacks(cfg: DictConfig, src: _Source) -> None:
    """Each callback is registered, takes its arguments, and its constructor accepts them."""
    from speedup.callback import CALLBACKS

    for name, cls, args in _entries(cfg, "callbacks", CALLBACKS, src):
        try:  # constructors check values (ranges, enums) beyond types
            cls(**args)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{src(f'callbacks.{name}')}: callbacks.{name}: {err}") from None


def _validate_optimizer(cfg: DictConfig, src: _Source) -> None:
    """The optimizer exists; its arguments' names and types (one check, shared with
    :func:`speedup.optim.build_optimizer`), then their values, by building it over a dummy
    parameter."""
    from speedup.optim import optimizer_argument_problem, optimizer_class, optimizer_problem

    optimizer = OmegaConf.to_container(cfg.optimizer)
    try:
        cls = optimizer_class(str(optimizer.get("name", "")))
    except ValueError as err:
        raise ConfigError(f"{src('optimizer.name')}: optimizer.name: {err}") from None
    args = {k: v for k, v in optimizer.items() if k != "name"}
    problem = optimizer_argument_problem(cls, args)
    if problem is None:
        problem = optimizer_problem(cls, args)
        if problem is not None:  # torch's own message, about the value given
            key, message = problem
            given = args if key is None else repr(args[key])
            problem = key, f"{cls.__name__} refuses {given}: {message}"
    if problem is not None:
        key, message = problem
        where = "optimizer" if key is None else f"optimizer.{key}"
        raise ConfigError(f"{src(where)}: {where}: {message}")


def _validate_scheduler(cfg: DictConfig, src: _Source) -> None:
    from speedup.optim import SCHEDULES, schedule_argument_types, schedule_arguments

    scheduler = OmegaConf.to_container(cfg.scheduler)
    name = scheduler.get("name", "constant")
    if name not in SCHEDULES:
        raise ConfigError(
            f"{src('scheduler.name')}: scheduler.name: unknown schedule {name!r}"
            f"{suggest(str(name), list(SCHEDULES))}; available: {', '.join(SCHEDULES)}"
        )
    allowed = ["name", "warmup", "scale_warmup", *schedule_arguments(name)]
    types = schedule_argument_types(name)
    for key, value in scheduler.items():
        where = f"{src('scheduler.' + key)}: scheduler.{key}"
        if key not in allowed:
            raise ConfigError(
                f"{where}: unknown key{suggest(key, allowed)}; allowed for {name}: "
                f"{', '.join(allowed)}"
            )
        if key in ("warmup", "step_size", "milestones"):
            if key == "milestones" and not isinstance(value, list):
                raise ConfigError(f"{where}: expected a list of Times, got {value!r}")
            for t in value if key == "milestones" else [value]:
                try:  # a schedule runs on the step count: wall-clock has no step rate
                    schedule_time(f"scheduler.{key}", str(t), positive=key == "step_size")
                except ValueError as err:
                    raise ConfigError(f"{src('scheduler.' + key)}: {err}") from None
        elif not _type_ok(value, types.get(key, Any)):
            kind = types[key]
            raise ConfigError(
                f"{where}: wrong type: got {value!r}, expected {getattr(kind, '__name__', kind)}"
            )
    if name in ("step", "multistep") and scheduler.get("gamma", 0.1) <= 0:
        raise ConfigError(
            f"{src('scheduler.gamma')}: scheduler.gamma: the LR is multiplied by it at each "
            f"milestone, so it must be > 0; got {scheduler['gamma']}"
        )
    if name not in ("step", "multistep"):
        factor = SCHEDULES[name][0]
        kwargs = {k: v for k, v in scheduler.items() if k in schedule_arguments(name)}
        for frac in (0.0, 0.5, 1.0):  # the multiplier must be a finite number along the run
            try:  # a schedule refuses values outside its range (wsd's shape, decay)
                value = factor(frac, 0.0, **kwargs)
            except ValueError as err:
                raise ConfigError(f"{src('scheduler')}: {err}") from None
            if not math.isfinite(value):
                raise ConfigError(
                    f"{src('scheduler')}: scheduler: {name} with {kwargs} gives an LR "
                    f"multiplier of {value} at {frac:g}dur"
                )


def check_batch_fits(
    batch_size: int, train_size: int, source: str | None = None, what: str = "the training set"
) -> None:
    """Training drops the last partial batch (every step sees a full batch), so a batch larger
    than the training set would leave every epoch empty: a run in batches would loop forever
    and one in epochs would divide by zero. Refused before anything trains."""
    if batch_size > train_size:
        where = f"{source}: " if source else ""
        raise ConfigError(
            f"{where}data.batch_size: {batch_size} is larger than {what} "
            f"({train_size} samples): every epoch would be empty (the last partial batch is "
            f"dropped); use data.batch_size <= {train_size}"
        )


def _check_sizes(builder: Any, args: dict[str, Any], section: str, src: _Source) -> None:
    """A component's int arguments (``int``, ``int | None``, ``list[int]``) are sizes and
    counts (channels, widths, layers, vocabulary): below 1 the network is empty or cannot be
    built, found only once training starts, or never (a zero-width layer trains to chance).
    An argument whose own default is 0 or negative is not a size and is left alone."""
    target = builder.__init__ if isinstance(builder, type) else builder
    parameters = inspect.signature(target).parameters
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: nothing to go by
        return
    for key, value in args.items():
        if key not in parameters or not _is_int_annotation(hints.get(key)):
            continue
        default = parameters[key].default
        if isinstance(default, int) and not isinstance(default, bool) and default <= 0:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, int) and not isinstance(v, bool) and v < 1 for v in values):
            raise ConfigError(
                f"{src(f'{section}.{key}')}: {section}.{key}: must be a positive int (a size "
                f"or count), got {value!r}"
            )


def _is_int_annotation(annotation: Any) -> bool:
    """``int``, ``int | None``, or a list/tuple/sequence of ints."""
    if annotation is int:
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return len(rest) == 1 and _is_int_annotation(rest[0])
    if origin in (list, tuple, typing.Sequence, collections.abc.Sequence):
        return bool(args) and all(a is int or a is Ellipsis for a in args)
    return False


def _device_type(name: str) -> str | None:
    """The device type ``name`` resolves to on this machine (``auto`` as the Trainer picks it),
    or None when it is not a device string."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    try:
        return torch.device(name).type
    except (RuntimeError, ValueError, TypeError):
        return None


def _available_devices() -> list[str]:
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def _device_problem(name: str) -> str | None:
    """Why ``name`` cannot be trained on here, or None. Checked before anything trains: torch
    would otherwise fail at the first tensor moved there, after the data was loaded."""
    import torch

    if name == "auto":
        return None
    here = f"devices on this machine: auto, {', '.join(_available_devices())}"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        return f"{name!r} is not a torch device string; {here}"
    if device.type == "cpu":
        return None
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        available, count = mps is not None and mps.is_available(), 1
    else:
        backend = getattr(torch, device.type, None)
        if backend is None or not hasattr(backend, "is_available"):
            return f"{name!r}: {device.type} is not a device to train on; {here}"
        available = backend.is_available()
        count = backend.device_count() if hasattr(backend, "device_count") else 1
    if not available:
        return f"{name!r}: no {device.type} device on this machine; {here}"
    if device.index is not None and device.index >= count:
        return f"{name!r}: this machine has {count} {device.type} device(s); {here}"
    return None


def _validate_machine(cfg: DictConfig, src: _Source) -> None:
    """What the run asks of this machine: the device, fp16's CUDA, intra-op threads."""
    problem = _device_problem(str(cfg.device))
    if problem is not None:
        raise ConfigError(f"{src('device')}: device: {problem}")
    kind = _device_type(str(cfg.device))
    if cfg.precision == "fp16" and kind != "cuda":
        shown = f"auto, which is {kind} here" if cfg.device == "auto" else cfg.device
        raise ConfigError(
            f"{src('precision')}: precision: fp16 needs a CUDA device (its GradScaler runs on "
            f"CUDA only), but device is {shown}; use bf16 or fp32"
        )
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(
            f"{src('threads')}: threads: must be >= 1 (or null for torch's default), "
            f"got {cfg.threads}"
        )


def _validate_loggers(cfg: DictConfig, src: _Source) -> None:
    from speedup.loggers import LOGGERS

    if cfg.get("loggers") is None:
        return
    if "jsonl" in cfg.loggers:
        raise ConfigError(
            f"{src('loggers.jsonl')}: loggers.jsonl: metrics.jsonl is always written, it needs "
            f"no entry; available loggers: {', '.join(LOGGERS.names())}"
        )
    for name, cls, args in _entries(cfg, "loggers", LOGGERS, src, skip=("run_dir",)):
        try:  # values beyond types; constructing a logger touches no file
            cls(**args)
            cls.check_installed()  # a missing package fails here, before anything trains
        except (ValueError, TypeError, ImportError) as err:
            raise ConfigError(f"{src(f'loggers.{name}')}: loggers.{name}: {err}") from None


def check_global_batch(batch_size: int, processes: int) -> None:
    """``data.batch_size`` is the global batch: it must split evenly across the processes."""
    if batch_size % processes:
        raise ConfigError(
            f"data.batch_size: {batch_size} is the global batch and must divide evenly across "
            f"{processes} processes (it is split, {batch_size / processes:g} each)"
        )


def _validate_distributed(cfg: DictConfig, src: _Source) -> None:
    allowed = {
        "strategy": ("ddp", "fsdp"),
        "param_dtype": (None, "fp32", "bf16", "fp16"),
    }
    for key, value in OmegaConf.to_container(cfg.distributed).items():
        if key not in allowed:
            raise ConfigError(
                f"{src('distributed.' + key)}: distributed.{key}: unknown key"
                f"{suggest(str(key), list(allowed))}; allowed: {', '.join(allowed)}"
            )
        if value not in allowed[key]:
            shown = ", ".join("null" if v is None else v for v in allowed[key])
            raise ConfigError(
                f"{src('distributed.' + key)}: distributed.{key}: {value!r} is not allowed; "
                f"allowed: {shown}"
            )


def _validate_fsdp_algorithms(cfg: DictConfig, src: _Source, algorithms: list[Algorithm]) -> None:
    """FSDP shards the weights: algorithms that touch them directly cannot run under it."""
    from speedup.distributed import fsdp_incompatible

    if cfg.distributed.get("strategy") != "fsdp":
        return
    refused = fsdp_incompatible({a.name: a.declare() for a in algorithms})
    if refused:
        raise ConfigError(
            f"{src('distributed.strategy')}: distributed.strategy: fsdp shards the weights, "
            f"and {', '.join(refused)} read or write them directly during training; use "
            "strategy ddp with these algorithms"
        )


def _validate_checkpointing(cfg: DictConfig, src: _Source) -> None:
    from speedup.checkpoint import CheckpointSaver
    from speedup.guard import NONFINITE_MODES

    if cfg.nonfinite not in NONFINITE_MODES:
        raise ConfigError(
            f"{src('nonfinite')}: nonfinite: {cfg.nonfinite!r} is not allowed; "
            f"allowed: {', '.join(NONFINITE_MODES)}"
        )
    if not str(cfg.resume).strip():
        raise ConfigError(
            f"{src('resume')}: resume: empty; allowed: auto, never, or a checkpoint path"
        )
    args = OmegaConf.to_container(cfg.checkpoint)
    saver_args = ("interval", "keep_last", "save_final", "folder")
    for key in args:
        if key not in saver_args:
            raise ConfigError(
                f"{src('checkpoint.' + key)}: checkpoint.{key}: unknown key"
                f"{suggest(str(key), list(saver_args))}; allowed: {', '.join(saver_args)}"
            )
    check_arguments(
        CheckpointSaver,
        {k: v for k, v in args.items() if k != "folder"},
        "checkpoint",
        src("checkpoint"),
        skip=("folder",),
    )
    if args.get("folder") is not None and not isinstance(args["folder"], str):
        raise ConfigError(f"{src('checkpoint.folder')}: checkpoint.folder: expected a path")
    try:
        Time.parse(str(args.get("interval", "1ep")))
    except ValueError as err:
        raise ConfigError(f"{src('checkpoint.interval')}: checkpoint.interval: {err}") from None
    if args.get("keep_last", 2) < 0:
        raise ConfigError(
            f"{src('checkpoint.keep_last')}: checkpoint.keep_last: must be >= 0 (0 keeps all)"
        )


# -- the entry point ------------------------------------------------------------------------


class LoadedRecipe(NamedTuple):
    """A validated recipe: its config, and its algorithms as validation built them (fresh,
    untrained: plan them with :func:`speedup.run.plan_config` and train these same objects)."""

    config: DictConfig
    algorithms: list[Algorithm]


def load_config(recipe: str, overrides: list[str] | None = None, smoke: bool = False) -> DictConfig:
    """Load, merge and validate a recipe; raises ConfigError on any problem.

    A recipe's ``smoke:`` section is checked with or without ``--smoke``: a typo in it would
    otherwise surface only on the day someone smoke-tests the recipe."""
    return load_recipe(recipe, overrides, smoke).config


def load_recipe(
    recipe: str, overrides: list[str] | None = None, smoke: bool = False
) -> LoadedRecipe:
    """:func:`load_config`, keeping the algorithms that validating their values built: the
    objects ``speedup plan`` plans and ``speedup run`` trains."""
    path = resolve_recipe(recipe)
    layers = _recipe_layers(path)
    deletions, cli = _parse_overrides(list(overrides or []))
    smoke_section: dict[str, Any] = {}
    for source, data in layers:
        section = data.get("smoke")
        if section is not None and not isinstance(section, dict):
            raise ConfigError(
                f"{source}: smoke: expected a mapping of overrides, got {type(section).__name__}"
            )
        smoke_section = _deep_merge(smoke_section, section or {})
    smoke_layers = [(SMOKE_DEFAULTS_SOURCE, _SMOKE_DEFAULTS), (SMOKE_SECTION, smoke_section)]
    recipe_cfg, recipe_origin = _merge_layers(OmegaConf.structured(RunConfig), {}, layers)

    def variant(extra: list[tuple[str, dict]]) -> tuple[DictConfig, dict[str, str]]:
        cfg, origin = _merge_layers(recipe_cfg, recipe_origin, [*extra, (COMMAND_LINE, cli)])
        return _finish(path, cfg, origin, deletions, smoke=bool(extra)), origin

    cfg, origin = variant(smoke_layers if smoke else [])
    algorithms = _validate(cfg, origin)
    if smoke_section and not smoke:
        try:
            _validate(*variant(smoke_layers))
        except ConfigError as err:
            # Only the section's own problems: the command line was written for this run.
            if str(err).startswith(SMOKE_SECTION):
                raise
    return LoadedRecipe(cfg, algorithms)


SMOKE_SECTION = "the recipe's smoke: section"
SMOKE_DEFAULTS_SOURCE = "the --smoke defaults"


def _merge_layers(
    cfg: DictConfig, origin: dict[str, str], layers: list[tuple[str, dict]]
) -> tuple[DictConfig, dict[str, str]]:
    """``cfg`` with the layers merged in order (a new config), and where each key came from."""
    origin = dict(origin)
    for source, data in layers:
        cfg = _merge_layer(cfg, data, source)
        origin.update(dict.fromkeys(_flat_keys(data), source))
    return cfg, origin


def _finish(
    path: Path, cfg: DictConfig, origin: dict[str, str], deletions: list[str], smoke: bool
) -> DictConfig:
    """Apply the ``~key`` deletions and the smoke-mode precision; record the recipe's name."""
    if deletions:
        container = OmegaConf.to_container(cfg)
        for dotted in deletions:
            _delete(container, dotted)
        cfg = _merge_layer(OmegaConf.structured(RunConfig), container, COMMAND_LINE)
    OmegaConf.set_struct(cfg, False)
    # A recipe written for GPUs smoke-tests on the CPU, where fp16's GradScaler cannot run;
    # fp16 asked for on the command line stays, and validation says why it cannot.
    if (
        smoke
        and cfg.precision == "fp16"
        and origin.get("precision") != COMMAND_LINE
        and _device_type(cfg.device) != "cuda"
    ):
        cfg.precision = "bf16"
    cfg.recipe = path.stem
    cfg.smoke_mode = smoke
    return cfg


#: What ``--smoke`` does to any recipe before its own ``smoke:`` section: a few batches on
#: small data on the CPU, so a full-scale recipe can be checked end to end in seconds.
_SMOKE_DEFAULTS: dict[str, Any] = {
    "max_duration": "4ba",
    # Exactly those 4 batches: a tuned recipe's compressed schedule would shorten them.
    "scale_schedule_ratio": 1.0,
    "eval_interval": "0ba",
    "log_interval": "1ba",
    "device": "cpu",
    "compile": False,
    "data": {
        "batch_size": 8,
        "eval_batch_size": 16,
        "train_samples": 64,
        "eval_samples": 32,
        "num_workers": 0,
    },
}


def _deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def with_changes(cfg: DictConfig, **changes: Any) -> DictConfig:
    """A copy of a loaded config with some keys set (dotted keys as ``{"model.channels": 8}``
    through ``**{...}``); the original is left as it is. Experiment drivers use it to vary a
    seed, a width or the progress bar across runs."""
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


#: Keys that cannot change what a run trains: where it is written, how it is shown, how
#: many threads, checkpointing and resuming, and where metrics go (``loggers``). Left out of
#: a run's identity (:func:`config_hash`), of the lottery's inputs and of the resume check.
NOT_TRAINING_KEYS = (
    "run_dir",
    "progress_bar",
    "trace",
    "threads",
    "smoke",
    "checkpoint",
    "resume",
    "loggers",
)


def config_hash(cfg: DictConfig) -> str:
    """A short hash of the resolved config, the run's identity: keys that cannot change what
    is trained (where it is written, how it is shown, checkpointing) are left out."""
    data = OmegaConf.to_container(cfg, resolve=True)
    for key in NOT_TRAINING_KEYS:
        data.pop(key, None)
    if data.get("nonfinite") == "stop":  # the default: older run directories keep their names
        data.pop("nonfinite")
    if data.get("distributed", {}).get("strategy", "ddp") == "ddp":  # ddp: the same training
        data.pop("distributed", None)
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _shown_default(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    if isinstance(value, dict):
        inner = ", ".join(f"{k}: {_shown_default(v).strip('`')}" for k, v in value.items())
        return f"`{{{inner}}}`"
    return str(value)


def reference_table() -> str:
    """The keys table of docs/recipes.md: every schema key with its type, default and meaning,
    in :data:`REFERENCE`'s order (``extends``, then the schema's fields)."""
    shown = {"extends": "-"}  # not a field: nothing to default to
    for f in fields(RunConfig):
        if f.metadata["required"]:
            shown[f.name] = "-"
        elif f.default_factory is not MISSING:
            shown[f.name] = _shown_default(f.default_factory())
        else:
            shown[f.name] = _shown_default(f.default)
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, (kind, meaning) in REFERENCE.items():
        rows.append(f"| `{key}` | {kind} | {shown[key]} | {meaning} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(reference_table(), end="")
