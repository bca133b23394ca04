"""One prepared GPU check: every CUDA path verified, and figures against the physical limit.

``python -m speedup.benchmarks.gpu_check [--smoke] [--budget-s N] [--out FILE.json]`` runs, in
one process and in this order:

1. **Checks**, each passed / failed / skipped with its evidence: training steps under bf16
   and fp16 autocast through the project's Trainer (fp16 with its GradScaler); a bit-exact
   fp16 resume (k steps, checkpoint with the scaler, resume, against an uninterrupted run,
   every parameter compared with ``torch.equal``); channels-last outputs equal to contiguous
   ones; ``torch.compile`` trains and matches eager; 2:4 semi-structured sparsity
   (``torch.sparse.to_sparse_semi_structured``, CUDA only) equal to the masked dense layer;
   FSDP2 ``fully_shard`` in a one-process group.
2. **Ratios**, measured interleaved in ABBA order after a warm-up, as time ratios
   ``variant / reference`` (below 1: the variant is faster): channels-last vs contiguous
   (ResNet-50), compile vs eager (GPT-2), 2:4 sparse vs dense linear layer, the Mild recipe's
   step vs the baseline's, and every algorithm's step (:mod:`.catalogue_costs`).
3. **The physical limit**: ResNet-50 training images/s (synthetic 224 px, bf16,
   channels-last), GPT-2 125M training tokens/s with model FLOPs utilisation (:func:`mfu`),
   as ``GPT2Config()`` defines it and with nanoGPT's pretraining settings, and peak memory.
4. **Tuned recipes** against their baselines: time-to-target in seconds, where the recipe and
   its stored result exist.

It prints a table and, last, one ``key=value`` line (see docs/gpu_check.md), and writes the
same values as JSON. ``--smoke`` runs the same code with tiny sizes (on the CPU when there is
no GPU; CUDA-only checks are then ``skipped``). ``--budget-s`` skips each section whose
estimated cost would not fit in what is left; ``--only`` runs the sections named. No section
can end the run: each records its error and the next starts.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import re
import socket
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from speedup.callback import Callback

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = [
    "PEAK_BF16_DENSE_FLOPS",
    "Report",
    "Sizes",
    "flops_per_token",
    "main",
    "mfu",
    "peak_bf16_flops",
]

#: Peak dense bf16 tensor-core FLOP/s by GPU model, from NVIDIA's datasheets (the figures
#: "with sparsity" there are twice these): H100 SXM and H200 SXM 989 TFLOP/s (H100 and H200
#: Tensor Core GPU datasheets, 1,979 with sparsity), H100 PCIe 756 (1,513), A100 312 (A100
#: datasheet, 624), L4 121 (L4 datasheet, 242), A10/A10G 125 (A10 datasheet, 250; AWS's A10G
#: clocks lower, so its MFU here is an underestimate). First match of the device name wins.
PEAK_BF16_DENSE_FLOPS: list[tuple[str, float]] = [
    (r"H200", 989e12),
    (r"H100.*PCIE", 756e12),
    (r"H100", 989e12),
    (r"A100", 312e12),
    (r"A10G?\b", 125e12),
    (r"\bL4\b", 121e12),
]

#: Tuned embedded recipes and the baselines they are measured against.
TUNED = {
    "shapes2d-tuned": "shapes2d-baseline",
    "stdlib-gpt-tuned": "stdlib-gpt",
    "stdlib-bert-tuned": "stdlib-bert",
}
RESULTS_DIR = Path(__file__).parent / "results"
#: The CPU-scale overrides of the embedded image workload under --smoke.
SMOKE_IMAGE = ["data.num_train=256", "data.num_test=64", "data.batch_size=32"]


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak of ``device_name`` (:data:`PEAK_BF16_DENSE_FLOPS`), or None."""
    for pattern, peak in PEAK_BF16_DENSE_FLOPS:
        if re.search(pattern, device_name.upper()):
            return peak
    return None


def flops_per_token(n_params: int, n_layer: int, n_head: int, head_dim: int, seq: int) -> float:
    """Training FLOPs per token of a decoder: ``6 N + 12 L H Q T``.

    ``6 N`` is the forward and backward matrix products over the ``N`` weights, ``12 L H Q T``
    the attention scores and their weighted sum (L layers, H heads of dimension Q, context
    T). This is the convention of PaLM (Chowdhery et al. 2022, appendix B, "model FLOPs
    utilization") as nanoGPT's ``estimate_mfu`` applies it to GPT-2."""
    return 6.0 * n_params + 12.0 * n_layer * n_head * head_dim * seq


def mfu(tokens_per_s: float, per_token: float, peak: float | None) -> float:
    """Model FLOPs utilisation: model FLOP/s over the peak; nan when the peak is unknown."""
    if not peak or not math.isfinite(tokens_per_s):
        return math.nan
    return tokens_per_s * per_token / peak


@dataclass
class Sizes:
    """Problem sizes: :data:`FULL` for one H100/H200-class GPU, :data:`SMOKE` for a CPU."""

    resnet: str  # a torchvision ResNet constructor (untrained: weights=None)
    resnet_res: int
    resnet_batch: int
    gpt: dict[str, int]  # GPT2Config arguments (empty: GPT-2 125M, the default config)
    gpt_tuned: dict[str, Any]  # changes for the nanoGPT-style run (measure_gpt2_tuned)
    gpt_seq: int
    gpt_batch: int
    window: int  # timed steps per window; 4 windows (ABBA), so 2 x window per arm
    warmup: int
    sparse: tuple[int, int, int]  # tokens, in features, out features
    mild: dict[str, Any]  # harness timing settings
    catalogue: list[str] | None  # None: every algorithm
    catalogue_timing: tuple[int, int]  # steps, repeats
    overrides: list[str] = field(default_factory=list)  # extra for the embedded image runs
    #: Extra for the tuned recipes and their baselines (the smoke: a few batches, the code
    #: path; the target is not expected to be reached).
    tuned_overrides: list[str] = field(default_factory=list)
    estimates: dict[str, float] = field(default_factory=dict)  # seconds per section


FULL = Sizes(
    resnet="resnet50",
    resnet_res=224,
    resnet_batch=256,
    gpt={},
    gpt_tuned={"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "vocab_size": 50304},
    gpt_seq=1024,
    gpt_batch=32,
    window=10,
    warmup=3,
    sparse=(16384, 8192, 8192),
    mild={"steps": 8, "repeats": 2, "positions": [0.1, 0.5, 0.9]},
    catalogue=None,
    catalogue_timing=(10, 3),
    estimates={
        "bf16": 10,
        "fp16": 10,
        "fp16_resume": 15,
        "channels_last": 10,
        "compile": 60,
        "sparse24": 15,
        "fsdp2": 10,
        "resnet50": 45,
        "gpt2": 120,
        "gpt2_tuned": 60,
        "mild": 45,
        "tuned": 300,
        "catalogue": 20,  # per algorithm; the section stops when the budget is spent
    },
)
SMOKE = Sizes(
    resnet="resnet18",  # ResNet-50 steps take seconds on a small CPU
    resnet_res=32,
    resnet_batch=2,
    gpt={
        "vocab_size": 256,
        "n_positions": 64,
        "n_embd": 64,
        "n_layer": 2,
        "n_head": 2,
        "bos_token_id": 255,
        "eos_token_id": 255,
    },
    gpt_tuned={"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    gpt_seq=32,
    gpt_batch=2,
    window=2,
    warmup=1,
    sparse=(64, 64, 64),
    mild={"steps": 1, "repeats": 1, "positions": [0.5]},
    catalogue=["label_smoothing", "channels_last"],
    catalogue_timing=(1, 1),
    overrides=SMOKE_IMAGE,
    tuned_overrides=[
        "max_duration=4ba",
        "eval_interval=2ba",
        "scale_schedule_ratio=1.0",
        "data.train_samples=64",
        "data.eval_samples=32",
    ],
    estimates={
        "bf16": 2,
        "fp16": 2,
        "fp16_resume": 3,
        "channels_last": 2,
        "compile": 10,
        "sparse24": 1,
        "fsdp2": 2,
        "resnet50": 8,
        "gpt2": 10,
        "gpt2_tuned": 5,
        "mild": 8,
        "tuned": 60,
        "catalogue": 5,
    },
)

#: The sections, in the order they run.
SECTIONS = (
    "bf16",
    "fp16",
    "fp16_resume",
    "channels_last",
    "compile",
    "sparse24",
    "fsdp2",
    "resnet50",
    "gpt2",
    "gpt2_tuned",
    "mild",
    "tuned",
    "catalogue",
)

#: Every key of the last line, with its value when its section did not run.
DEFAULTS: dict[str, Any] = {
    "device": "cpu",
    "torch": torch.__version__.replace(" ", "_"),
    "cuda": False,
    "bf16_ok": "skipped",
    "fp16_ok": "skipped",
    "fp16_resume_exact": "skipped",
    "channels_last_ok": "skipped",
    "compile_ok": "skipped",
    "sparse24_ok": "skipped",
    "fsdp2_ok": "skipped",
    "channels_last_ratio": math.nan,
    "compile_ratio": math.nan,
    "sparse24_ratio": math.nan,
    "mild_step_ratio": math.nan,
    "resnet50_img_s": math.nan,
    "resnet50_peak_mem_gb": math.nan,
    "gpt2_tok_s": math.nan,
    "gpt2_eager_tok_s": math.nan,
    "mfu_gpt2": math.nan,
    "mfu_gpt2_eager": math.nan,
    "gpt2_peak_mem_gb": math.nan,
    "gpt2_compile_s": math.nan,
    "gpt2_tuned_tok_s": math.nan,
    "mfu_gpt2_tuned": math.nan,
    "peak_bf16_tflops": math.nan,
}
for _recipe, _baseline in TUNED.items():
    DEFAULTS[f"ttt_{_recipe.replace('-', '_')}_s"] = math.nan
    DEFAULTS[f"ttt_{_baseline.replace('-', '_')}_s"] = math.nan


# -- the report --------------------------------------------------------------------------


class Report:
    """The values of the last line, the table's rows, and the clock the budget runs on."""

    def __init__(self, budget_s: float | None, out: Path | None) -> None:
        self.values: dict[str, Any] = dict(DEFAULTS)
        self.rows: list[tuple[str, str, str]] = []
        self.started = time.perf_counter()
        self.budget_s = budget_s
        self.out = out

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return math.inf if self.budget_s is None else self.budget_s - self.elapsed()

    def set(self, key: str, value: Any) -> None:
        """Record a value (floats kept to 6 significant digits, as the line prints them)."""
        if isinstance(value, float) and math.isfinite(value):
            value = float(f"{value:.6g}")
        self.values[key] = value

    def row(self, name: str, status: str, evidence: str) -> None:
        self.rows.append((name, status, evidence))
        print(f"  {name:<22} {status:<8} {evidence}", flush=True)

    def check(self, name: str, key: str, ok: bool, evidence: str) -> None:
        self.set(key, bool(ok))
        self.row(name, "passed" if ok else "failed", evidence)

    def line(self) -> str:
        return " ".join(f"{k}={format_value(v)}" for k, v in self.values.items())

    def json_values(self) -> dict[str, Any]:
        return {
            k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in self.values.items()
        }

    def write(self) -> None:
        """The JSON file, rewritten after every section (a run cut short keeps what it had)."""
        if self.out is not None:
            self.out.write_text(json.dumps(self.json_values(), indent=1, allow_nan=False) + "\n")


def format_value(value: Any) -> str:
    """A value as the last line prints it: true/false, skipped, nan, 6 significant digits."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if not math.isfinite(value) else f"{value:.6g}"
    return str(value).replace(" ", "_")


def parse_line(line: str) -> dict[str, Any]:
    """The last line back into values (JSON's: nan is None)."""
    values: dict[str, Any] = {}
    for item in line.split():
        key, _, text = item.partition("=")
        if text in ("true", "false"):
            values[key] = text == "true"
        elif text == "nan":
            values[key] = None
        else:
            try:
                values[key] = float(text)
            except ValueError:
                values[key] = text
    return values


def run_section(
    report: Report, name: str, sizes: Sizes, body: Callable[[Report], None], keys: tuple = ()
) -> None:
    """Run ``body`` unless its estimate exceeds the budget left; an error is recorded
    (``keys`` not set by then become false / nan) and the run goes on."""
    estimate = sizes.estimates.get(name, 0.0)
    if estimate > 0 and estimate > report.left():
        report.row(name, "skipped", f"budget: needs ~{estimate:.0f} s, {report.left():.0f} s left")
        return
    print(f"[{report.elapsed():6.1f} s] {name}", flush=True)
    before = dict(report.values)
    try:
        body(report)
    except Exception as err:  # noqa: BLE001 - the check reports every failure and goes on
        message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        report.row(name, "failed", message[:300])
        traceback.print_exc(limit=4, file=sys.stdout)
        for key in keys:
            if report.values[key] == before[key]:
                failed = isinstance(DEFAULTS[key], str)
                report.set(key, False if failed else math.nan)
    finally:
        _release()
        report.write()


# -- helpers -----------------------------------------------------------------------------


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _exact_math(device: torch.device) -> Iterator[None]:
    """Comparisons in full fp32 with deterministic kernel choice (no TF32, no autotuning);
    the previous settings come back afterwards."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        (
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.benchmark,
            torch.backends.cudnn.deterministic,
        ) = saved


@contextlib.contextmanager
def _fast_math() -> Iterator[None]:
    """Throughput settings: TF32 for fp32 matmuls, cuDNN autotuning."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark = saved


def interleaved(
    arms: dict[str, Callable[[], Any]], window: int, warmup: int, device: torch.device
) -> dict[str, float]:
    """Seconds per call of each of two arms: ``warmup`` calls of each first, then four
    windows of ``window`` calls in ABBA order (neither arm always runs on a warmer machine);
    an arm's time is the mean of its two windows."""
    first, second = arms
    for name in (first, second):
        for _ in range(warmup):
            arms[name]()
    _sync(device)
    times: dict[str, list[float]] = {first: [], second: []}
    for name in (first, second, second, first):
        _sync(device)
        started = time.perf_counter()
        for _ in range(window):
            arms[name]()
        _sync(device)
        times[name].append((time.perf_counter() - started) / window)
    return {name: statistics.fmean(t) for name, t in times.items()}


def timed(call: Callable[[], Any], window: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of one arm: ``warmup`` calls, then the mean over 2 x ``window``."""
    for _ in range(warmup):
        call()
    _sync(device)
    started = time.perf_counter()
    for _ in range(2 * window):
        call()
    _sync(device)
    return (time.perf_counter() - started) / (2 * window)


def _peak_memory_gb(step: Callable[[], Any], device: torch.device) -> float:
    """Peak allocated GPU memory over one call of ``step`` (nan on a CPU)."""
    if device.type != "cuda":
        return math.nan
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def _max_relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


class _TinyNet(nn.Module):
    """A small conv net (conv, batch norm, linear): the model of the precision checks."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _tiny_data(steps: int, batch: int = 16, repeat: bool = False) -> Any:
    """A DataLoader of random 16x16 images and labels (one batch repeated when ``repeat``:
    then training must lower its loss)."""
    gen = torch.Generator().manual_seed(0)
    n = batch if repeat else batch * steps
    x = torch.randn(n, 3, 16, 16, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    if repeat:
        x, y = x.repeat(steps, 1, 1, 1), y.repeat(steps)
    dataset = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False)


class _Losses(Callback):
    """Each step's training loss."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def batch_end(self, state: State, logger: Logger) -> None:
        self.losses.append(float(state.train_metrics["loss"]))


class _StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def batch_end(self, state: State, logger: Logger) -> None:
        if state.timestamp.batch >= self.step:
            state.stop_training("gpu_check: checkpoint point")


def _trainer(
    model: nn.Module,
    device: torch.device,
    precision: str,
    steps: int,
    data: Any = None,
    **kw: Any,
) -> Any:
    """The project's Trainer on ``model`` for ``steps`` SGD steps of :func:`_tiny_data`."""
    from speedup.trainer import Trainer

    return Trainer(
        model,
        data if data is not None else _tiny_data(steps),
        f"{steps}ba",
        optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9},
        precision=precision,
        device=device,
        seed=0,
        log_interval="0ba",
        **kw,
    )


# -- checks ------------------------------------------------------------------------------


def _autocast_steps(device: torch.device, precision: str, steps: int = 8) -> dict[str, Any]:
    """``steps`` Trainer steps on one repeated batch at ``precision``: the losses and the
    dtype the autocast region produced (seen by a hook on the linear layer)."""
    torch.manual_seed(0)
    model = _TinyNet()
    seen: list[torch.dtype] = []
    model.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    losses = _Losses()
    trainer = _trainer(
        model, device, precision, steps, data=_tiny_data(steps, repeat=True), callbacks=[losses]
    )
    trainer.fit()
    scaler = trainer.state.scaler
    return {
        "losses": losses.losses,
        "dtype": seen[0] if seen else None,
        "scale": scaler.get_scale() if scaler is not None else None,
    }


def _judge_steps(out: dict[str, Any], dtype: torch.dtype) -> tuple[bool, str]:
    losses = out["losses"]
    finite = all(math.isfinite(v) for v in losses)
    ok = finite and out["dtype"] == dtype and losses[-1] < losses[0]
    evidence = (
        f"{len(losses)} steps, autocast output {out['dtype']}, loss {losses[0]:.4f} -> "
        f"{losses[-1]:.4f}"
    )
    if out.get("scale") is not None:
        evidence += f", grad scale {out['scale']:g}"
    return ok, evidence


def check_bf16(report: Report, device: torch.device) -> None:
    ok, evidence = _judge_steps(_autocast_steps(device, "bf16"), torch.bfloat16)
    report.check("bf16", "bf16_ok", ok, f"Trainer precision=bf16 on {device.type}: {evidence}")


def _plain_fp16_steps(device: torch.device, steps: int = 8) -> dict[str, Any]:
    """The CPU stand-in for the Trainer's fp16 path (which needs CUDA): torch's autocast and
    GradScaler in a plain loop, so what fp16 does on this device is reported."""
    torch.manual_seed(0)
    model = _TinyNet().to(device)
    seen: list[torch.dtype] = []
    model.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type)
    losses = []
    for x, y in _tiny_data(steps, repeat=True):
        losses.append(_scaled_step(model, optimizer, scaler, x.to(device), y.to(device), device))
    return {"losses": losses, "dtype": seen[0] if seen else None, "scale": scaler.get_scale()}


def _scaled_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
) -> float:
    with torch.autocast(device.type, dtype=torch.float16):
        loss = nn.functional.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def check_fp16(report: Report, device: torch.device) -> None:
    if device.type == "cuda":
        ok, evidence = _judge_steps(_autocast_steps(device, "fp16"), torch.float16)
        evidence = f"Trainer precision=fp16 + GradScaler: {evidence}"
    else:
        ok, evidence = _judge_steps(_plain_fp16_steps(device), torch.float16)
        evidence = f"torch loop (the Trainer takes fp16 on CUDA only) on {device.type}: {evidence}"
    report.check("fp16", "fp16_ok", ok, evidence)


def _compare_states(a: nn.Module, b: nn.Module) -> tuple[int, int, list[str]]:
    """(tensors equal, tensors compared, names of the first differing ones), parameters and
    buffers, with ``torch.equal``."""
    sa, sb = a.state_dict(), b.state_dict()
    differing = [k for k in sa if not torch.equal(sa[k], sb[k])]
    return len(sa) - len(differing), len(sa), differing[:3]


def _optimizer_equal(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> bool:
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    return sa.keys() == sb.keys() and all(
        torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i] if torch.is_tensor(sa[i][k])
    )


def trainer_resume(
    device: torch.device, k: int, m: int, precision: str = "fp16"
) -> tuple[bool, str]:
    """The project's path: the Trainer at ``precision`` for k steps, save_checkpoint (model,
    optimizer, GradScaler, RNG, data position), a fresh Trainer loads it and trains m more;
    against one uninterrupted run of k+m steps."""
    torch.manual_seed(0)
    init = _TinyNet()
    straight, interrupted, resumed = (copy.deepcopy(init) for _ in range(3))
    uninterrupted = _trainer(straight, device, precision, k + m)
    uninterrupted.fit()
    with tempfile.TemporaryDirectory() as folder:
        first = _trainer(interrupted, device, precision, k + m, callbacks=[_StopAt(k)])
        first.fit()
        scale_at_k = _scale(first)
        first.save_checkpoint(folder)
        second = _trainer(resumed, device, precision, k + m)
        second.load_checkpoint(folder)
        second.fit()
    equal, total, differing = _compare_states(straight, resumed)
    same_optimizer = _optimizer_equal(uninterrupted.state.optimizer, second.state.optimizer)
    scales = (_scale(uninterrupted), _scale(second))
    ok = equal == total and same_optimizer and scales[0] == scales[1]
    evidence = (
        f"Trainer {precision} {k}+{m} steps vs {k + m}: {equal}/{total} tensors torch.equal"
        f"{' (differ: ' + ', '.join(differing) + ')' if differing else ''}, optimizer state "
        f"{'equal' if same_optimizer else 'differs'}, grad scale at {k} {scale_at_k}, "
        f"final {scales[0]} / {scales[1]}"
    )
    return ok, evidence


def _scale(trainer: Any) -> float | None:
    scaler = trainer.state.scaler
    return scaler.get_scale() if scaler is not None else None


def _plain_resume(device: torch.device, k: int, m: int) -> tuple[bool, str]:
    """The same comparison in a plain torch loop with autocast fp16 and a GradScaler (the
    CPU stand-in: the Trainer takes fp16 on CUDA only)."""
    torch.manual_seed(0)
    init = _TinyNet().to(device)
    batches = [(x.to(device), y.to(device)) for x, y in _tiny_data(k + m)]

    def fresh(model: nn.Module) -> tuple[torch.optim.Optimizer, torch.amp.GradScaler]:
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), torch.amp.GradScaler(
            device.type
        )

    straight = copy.deepcopy(init)
    opt, scaler = fresh(straight)
    for x, y in batches:
        _scaled_step(straight, opt, scaler, x, y, device)
    first = copy.deepcopy(init)
    opt1, scaler1 = fresh(first)
    for x, y in batches[:k]:
        _scaled_step(first, opt1, scaler1, x, y, device)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ckpt.pt"
        torch.save(
            {"model": first.state_dict(), "opt": opt1.state_dict(), "scaler": scaler1.state_dict()},
            path,
        )
        saved = torch.load(path, weights_only=True)
    resumed = copy.deepcopy(init)
    opt2, scaler2 = fresh(resumed)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    scaler2.load_state_dict(saved["scaler"])
    for x, y in batches[k:]:
        _scaled_step(resumed, opt2, scaler2, x, y, device)
    equal, total, differing = _compare_states(straight, resumed)
    same_optimizer = _optimizer_equal(opt, opt2)
    ok = equal == total and same_optimizer and scaler.get_scale() == scaler2.get_scale()
    evidence = (
        f"torch loop fp16 + GradScaler on {device.type} (the Trainer takes fp16 on CUDA only), "
        f"{k}+{m} steps vs {k + m}: {equal}/{total} tensors torch.equal"
        f"{' (differ: ' + ', '.join(differing) + ')' if differing else ''}, optimizer state "
        f"{'equal' if same_optimizer else 'differs'}, grad scale {scaler.get_scale():g} / "
        f"{scaler2.get_scale():g}"
    )
    return ok, evidence


def check_fp16_resume(report: Report, device: torch.device) -> None:
    with _exact_math(device):
        if device.type == "cuda":
            ok, evidence = trainer_resume(device, k=4, m=4)
        else:
            ok, evidence = _plain_resume(device, k=4, m=4)
    report.check("fp16_resume", "fp16_resume_exact", ok, evidence)


def _resnet(sizes: Sizes) -> nn.Module:
    import torchvision.models

    return getattr(torchvision.models, sizes.resnet)(weights=None)


def check_channels_last(report: Report, device: torch.device, sizes: Sizes) -> None:
    """ResNet-50's eval outputs in fp32: channels-last (the project's functional twins)
    against contiguous, same weights, same input."""
    from speedup.algorithms.channels_last import apply_channels_last, to_channels_last

    torch.manual_seed(0)
    model = _resnet(sizes).to(device).eval()
    x = torch.randn(max(sizes.resnet_batch // 8, 2), 3, sizes.resnet_res, sizes.resnet_res)
    x = x.to(device)
    with _exact_math(device), torch.no_grad():
        reference = model(x)
        apply_channels_last(model)
        layout = model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        out = model(to_channels_last(x))
    diff = _max_relative_diff(out, reference)
    ok = layout and diff < 1e-4
    report.check(
        "channels_last",
        "channels_last_ok",
        ok,
        f"{sizes.resnet} fp32 eval, batch {x.shape[0]} at {x.shape[-1]} px: weights channels-last "
        f"{layout}, max |diff| / max |out| = {diff:.2e} (tolerance 1e-4)",
    )


def check_compile(report: Report, device: torch.device, backend: str) -> None:
    """The Trainer with ``compile`` (the model's ``torch.compile``) against the same Trainer
    eager: 6 fp32 steps from one init on the same batches; losses and weights must agree."""
    steps = 6
    torch.manual_seed(0)
    init = _TinyNet()
    eager_model, compiled_model = copy.deepcopy(init), copy.deepcopy(init)
    eager_losses, compiled_losses = _Losses(), _Losses()
    with _exact_math(device):
        _trainer(eager_model, device, "fp32", steps, callbacks=[eager_losses]).fit()
        # Inductor is the Trainer's own path; another backend is set here by hand (the
        # Trainer's compile flag takes torch's default).
        trainer = _trainer(
            compiled_model,
            device,
            "fp32",
            steps,
            callbacks=[compiled_losses],
            compile=backend == "inductor",
        )
        if backend != "inductor":
            trainer.state.model.compile(backend=backend)
        started = time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - started
    loss_diff = max(abs(a - b) for a, b in zip(eager_losses.losses, compiled_losses.losses))
    weight_diff = max(
        _max_relative_diff(c, e)
        for c, e in zip(compiled_model.parameters(), eager_model.parameters())
    )
    losses = compiled_losses.losses
    ok = (
        len(losses) == steps
        and all(math.isfinite(v) for v in losses)
        and loss_diff < 1e-3
        and weight_diff < 1e-3
    )
    report.check(
        "compile",
        "compile_ok",
        ok,
        f"Trainer compile (backend {backend}) vs eager, {steps} fp32 steps: max loss diff "
        f"{loss_diff:.1e}, max relative weight diff {weight_diff:.1e} (tolerance 1e-3), "
        f"loss {losses[0]:.4f} -> {losses[-1]:.4f}, {seconds:.1f} s with compilation",
    )


def check_sparse24(report: Report, device: torch.device, sizes: Sizes) -> None:
    """2:4 masks by magnitude (the project's :func:`magnitude_masks`), the linear layer swapped
    to a semi-structured sparse weight (:func:`to_semi_structured`): same output as the
    masked dense layer; then the time of the sparse layer over the unpruned dense one."""
    if device.type != "cuda":
        report.set("sparse24_ok", "skipped")
        report.row("sparse24", "skipped", "CUDA only (to_sparse_semi_structured needs a GPU)")
        return
    from speedup.algorithms.magnitude_pruning import magnitude_masks, to_semi_structured

    tokens, fan_in, fan_out = sizes.sparse
    torch.manual_seed(0)
    dense = nn.Linear(fan_in, fan_out, bias=True).to(device, torch.bfloat16)
    masks = magnitude_masks({"weight": dense.weight}, 0.5, structure="2:4")
    masked_weight = dense.weight.detach() * masks["weight"]
    sparse = to_semi_structured(copy.deepcopy(dense), masks)
    x = torch.randn(tokens, fan_in, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        reference = nn.functional.linear(x, masked_weight, dense.bias)
        out = sparse(x)
        diff = _max_relative_diff(out, reference)
        kept = float(masks["weight"].float().mean())
        ok = diff < 2e-2 and kept == 0.5
        report.check(
            "sparse24",
            "sparse24_ok",
            ok,
            f"{type(sparse.weight).__name__} {fan_out}x{fan_in} bf16, {tokens} tokens: kept "
            f"{kept:.2f}, max |diff| / max |out| = {diff:.1e} vs masked dense (tolerance 2e-2)",
        )
        times = interleaved(
            {"dense": lambda: dense(x), "sparse": lambda: sparse(x)},
            sizes.window * 2,
            sizes.warmup,
            device,
        )
    ratio = times["sparse"] / times["dense"]
    report.set("sparse24_ratio", ratio)
    flops = 2 * tokens * fan_in * fan_out
    report.row(
        "sparse24_speed",
        "measured",
        f"dense {times['dense'] * 1e3:.3f} ms ({flops / times['dense'] / 1e12:.0f} TFLOP/s), "
        f"2:4 {times['sparse'] * 1e3:.3f} ms: time ratio {ratio:.3f}",
    )


class _MLPBlock(nn.Module):
    """A residual MLP block (its class name ends in "Block": shard_fsdp shards it alone)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_fsdp2(report: Report, device: torch.device) -> None:
    """FSDP2 in a one-process group (nccl on CUDA, gloo on CPU): the project's
    :func:`~speedup.distributed.shard_fsdp` on a model of residual blocks, 3 SGD steps, against
    the unsharded model."""
    import torch.distributed as dist

    from speedup.distributed import shard_fsdp

    if not dist.is_available():
        report.set("fsdp2_ok", "skipped")
        report.row("fsdp2", "skipped", "torch.distributed is not available in this build")
        return
    if dist.is_initialized():
        report.set("fsdp2_ok", "skipped")
        report.row("fsdp2", "skipped", "a process group already exists (run outside torchrun)")
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        torch.manual_seed(0)
        width = 64
        plain = nn.Sequential(_MLPBlock(width), _MLPBlock(width), nn.Linear(width, 10)).to(device)
        sharded = copy.deepcopy(plain)
        blocks = shard_fsdp(sharded)
        x = torch.randn(32, width, device=device)
        y = torch.randint(0, 10, (32,), device=device)
        plain_losses, sharded_losses = [], []
        with _exact_math(device):
            for model, losses in ((plain, plain_losses), (sharded, sharded_losses)):
                optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
                for _ in range(3):
                    loss = nn.functional.cross_entropy(model(x), y)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(float(loss.detach()))
        weight = sharded[0].fc1.weight
        is_dtensor = type(weight).__name__ == "DTensor"
        full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in sharded.parameters()]
        diff = max(_max_relative_diff(f, p) for f, p in zip(full, plain.parameters()))
        ok = is_dtensor and diff < 1e-5 and sharded_losses[-1] < sharded_losses[0]
        report.check(
            "fsdp2",
            "fsdp2_ok",
            ok,
            f"fully_shard ({backend}, 1 process) on blocks {blocks} + root: parameters "
            f"{type(weight).__name__}, 3 SGD steps vs unsharded: max relative weight diff "
            f"{diff:.1e}, loss {sharded_losses[0]:.4f} -> {sharded_losses[-1]:.4f}",
        )
    finally:
        dist.destroy_process_group()


# -- ratios and the physical limit -------------------------------------------------------


def _sgd_step(model: nn.Module, optimizer: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def measure_resnet50(report: Report, device: torch.device, sizes: Sizes) -> None:
    """ResNet-50 training steps in bf16 (SGD with momentum, synthetic data): contiguous and
    channels-last copies interleaved; images/s of the channels-last arm."""
    from speedup.algorithms.channels_last import apply_channels_last, to_channels_last

    torch.manual_seed(0)
    batch, res = sizes.resnet_batch, sizes.resnet_res
    contiguous = _resnet(sizes).to(device)
    channels_last = apply_channels_last(copy.deepcopy(contiguous))
    x = torch.randn(batch, 3, res, res, device=device)
    x_last = to_channels_last(x)
    y = torch.randint(0, 1000, (batch,), device=device)
    opts = {
        name: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        for name, m in (("contiguous", contiguous), ("channels_last", channels_last))
    }
    with _fast_math():
        times = interleaved(
            {
                "contiguous": lambda: _sgd_step(contiguous, opts["contiguous"], x, y),
                "channels_last": lambda: _sgd_step(channels_last, opts["channels_last"], x_last, y),
            },
            sizes.window,
            sizes.warmup,
            device,
        )
        memory = _peak_memory_gb(
            lambda: _sgd_step(channels_last, opts["channels_last"], x_last, y), device
        )
    ratio = times["channels_last"] / times["contiguous"]
    images = batch / times["channels_last"]
    report.set("channels_last_ratio", ratio)
    report.set("resnet50_img_s", images)
    report.set("resnet50_peak_mem_gb", memory)
    report.row(
        "resnet50",
        "measured",
        f"{sizes.resnet}, batch {batch} at {res} px bf16: contiguous "
        f"{times['contiguous'] * 1e3:.1f} ms/step, channels-last "
        f"{times['channels_last'] * 1e3:.1f} ms/step (time ratio {ratio:.3f}); "
        f"{images:.0f} images/s, peak memory {memory:.2f} GiB",
    )


def _gpt2(sizes: Sizes, device: torch.device, changes: dict[str, Any] | None = None) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    # Training keeps no key/value cache.
    config = GPT2Config(**{**sizes.gpt, "use_cache": False, **(changes or {})})
    return GPT2LMHeadModel(config).to(device)


def gpt2_model_flops(model: nn.Module, seq: int) -> tuple[int, float]:
    """(N, training FLOPs per token) of a Hugging Face GPT-2: N counts each weight once (the
    tied token embedding is the output layer's matrix) less the position embedding, a lookup
    (nanoGPT's ``get_num_params``)."""
    config = model.config
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    head_dim = config.n_embd // config.n_head
    return n, flops_per_token(n, config.n_layer, config.n_head, head_dim, seq)


def _gpt2_training(
    sizes: Sizes, device: torch.device, changes: dict[str, Any] | None = None
) -> tuple[nn.Module, Callable[[Callable[..., Any]], Any], int, float]:
    """A GPT-2 (``sizes.gpt`` with ``changes``), and a training step in bf16 autocast (AdamW,
    fused on CUDA; random tokens of the unpadded vocabulary) through a given forward (the
    model or its compiled twin); N and FLOPs per token."""
    torch.manual_seed(0)
    model = _gpt2(sizes, device, changes)
    vocab = sizes.gpt.get("vocab_size", 50257)
    ids = torch.randint(0, vocab, (sizes.gpt_batch, sizes.gpt_seq), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device.type == "cuda")
    n, per_token = gpt2_model_flops(model, sizes.gpt_seq)

    def step(forward: Callable[..., Any]) -> Any:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return model, step, n, per_token


def _device_peak(report: Report) -> float | None:
    peak = peak_bf16_flops(report.values["device"].replace("_", " "))
    report.set("peak_bf16_tflops", peak / 1e12 if peak else math.nan)
    return peak


def measure_gpt2(report: Report, device: torch.device, sizes: Sizes, backend: str) -> None:
    """GPT-2 125M as ``GPT2Config()`` defines it (dropout 0.1 included): training steps of
    the eager and the ``torch.compile``d forward of one model, interleaved; tokens/s and MFU
    of each."""
    model, step, n, per_token = _gpt2_training(sizes, device)
    batch, seq = sizes.gpt_batch, sizes.gpt_seq
    peak = _device_peak(report)
    arms: dict[str, Callable[[], Any]] = {"eager": lambda: step(model)}
    compile_error = None
    with _fast_math():
        try:
            compiled = torch.compile(model, backend=backend)
            started = time.perf_counter()
            step(compiled)
            _sync(device)
            report.set("gpt2_compile_s", time.perf_counter() - started)
            arms["compiled"] = lambda: step(compiled)
        except Exception as err:  # noqa: BLE001 - measured eager alone, error reported
            compile_error = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        if len(arms) == 2:
            times = interleaved(arms, sizes.window, sizes.warmup, device)
        else:
            times = {"eager": timed(arms["eager"], sizes.window, sizes.warmup, device)}
        best = min(times, key=times.get)
        memory = _peak_memory_gb(arms[best], device)
    tokens = {name: batch * seq / t for name, t in times.items()}
    report.set("gpt2_eager_tok_s", tokens["eager"])
    report.set("gpt2_tok_s", tokens[best])
    report.set("mfu_gpt2_eager", mfu(tokens["eager"], per_token, peak))
    report.set("mfu_gpt2", mfu(tokens[best], per_token, peak))
    report.set("gpt2_peak_mem_gb", memory)
    if "compiled" in times:
        report.set("compile_ratio", times["compiled"] / times["eager"])
    peak_note = f"peak {peak / 1e12:.0f} TFLOP/s" if peak else "peak unknown for this device"
    report.row(
        "gpt2",
        "measured",
        f"N={n / 1e6:.1f}M, batch {batch}x{seq} bf16, {per_token / 1e9:.3f} GFLOP/token; "
        + ", ".join(
            f"{k} {tokens[k]:.0f} tok/s (MFU {mfu(tokens[k], per_token, peak):.3f})" for k in times
        )
        + f"; {peak_note}; peak memory {memory:.2f} GiB"
        + (
            f"; compile vs eager time ratio {times['compiled'] / times['eager']:.3f}"
            if "compiled" in times
            else f"; compile failed: {compile_error}"
        ),
    )


def measure_gpt2_tuned(report: Report, device: torch.device, sizes: Sizes, backend: str) -> None:
    """The same GPT-2 compiled, with nanoGPT's pretraining settings (Karpathy, nanoGPT
    ``train.py`` and ``model.py``): no dropout, and the vocabulary padded to a multiple of 64
    (50,304) so the output layer's matrix product tiles evenly. The architecture and N are
    unchanged but for the 47 padding rows (0.03% of N, counted in the FLOPs)."""
    model, step, n, per_token = _gpt2_training(sizes, device, sizes.gpt_tuned)
    batch, seq = sizes.gpt_batch, sizes.gpt_seq
    peak = _device_peak(report)
    with _fast_math():
        compiled = torch.compile(model, backend=backend)
        seconds = timed(lambda: step(compiled), sizes.window, sizes.warmup, device)
    tokens = batch * seq / seconds
    report.set("gpt2_tuned_tok_s", tokens)
    report.set("mfu_gpt2_tuned", mfu(tokens, per_token, peak))
    report.row(
        "gpt2_tuned",
        "measured",
        f"compiled, {', '.join(f'{k}={v}' for k, v in sizes.gpt_tuned.items())}: N={n / 1e6:.1f}M, "
        f"{tokens:.0f} tok/s (MFU {mfu(tokens, per_token, peak):.3f})",
    )


def _suite(name: str, recipe: str, overrides: list[str], algorithms: dict, timing: dict) -> Any:
    from speedup.benchmarks.harness import Suite

    return Suite(
        name=name,
        path=Path.cwd() / f"{name}.yaml",
        recipe=recipe,
        overrides=overrides,
        metric="accuracy",
        target=1.0,
        algorithms=algorithms,
        seeds=[17],
        budget="",
        combinations=[],
        timing=timing,
    )


def measure_mild(report: Report, device: torch.device, sizes: Sizes) -> None:
    """shapes2d-mild's algorithms against shapes2d-baseline: the harness's interleaved step
    cost, averaged over the run (progressive resizing makes it vary)."""
    import yaml
    from speedup.benchmarks.harness import measure_step_costs

    from speedup.config import resolve_recipe

    mild = yaml.safe_load(Path(resolve_recipe("shapes2d-mild")).read_text())["algorithms"]
    overrides = [*sizes.overrides, f"device={device.type}"]
    if device.type == "cpu":
        overrides.append("threads=1")
    suite = _suite("gpu-check-mild", "shapes2d-baseline", overrides, mild, sizes.mild)
    with tempfile.TemporaryDirectory() as out:
        base, costs = measure_step_costs(suite, [list(mild)], Path(out))
    ratio = costs["+".join(mild)]
    report.set("mild_step_ratio", ratio)
    report.row(
        "mild",
        "measured",
        f"shapes2d-mild ({', '.join(mild)}) vs shapes2d-baseline: baseline "
        f"{base * 1e3:.1f} ms/step, time ratio {ratio:.3f} over the run",
    )


def measure_catalogue(report: Report, device: torch.device, sizes: Sizes) -> None:
    """Each algorithm's step time over its baseline's (:mod:`.catalogue_costs`' setups), one
    by one until the budget is spent."""
    from speedup.benchmarks import catalogue_costs
    from speedup.benchmarks.harness import measure_step_costs

    from speedup.algorithm import ALGORITHMS

    names = sizes.catalogue or [n for n in ALGORITHMS.names() if n not in catalogue_costs.SKIPPED]
    steps, repeats = sizes.catalogue_timing
    per_algorithm = sizes.estimates.get("catalogue", 0.0)
    measured, skipped, failed = [], [], []
    for name in names:
        if per_algorithm > report.left():
            skipped.append(name)
            continue
        (recipe, overrides), extra, args, position = catalogue_costs.setup(name)
        local = [*overrides, *extra, f"device={device.type}"]
        if device.type == "cpu":
            local.append("threads=1")
        if recipe == catalogue_costs.IMAGE[0]:
            local += sizes.overrides
        suite = _suite(
            f"gpu-check-{name}",
            recipe,
            local,
            {name: args},
            {"steps": steps, "repeats": repeats, "positions": [position]},
        )
        started = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory() as out:
                base, ratios = measure_step_costs(suite, [[name]], Path(out))
        except Exception as err:  # noqa: BLE001 - one algorithm's failure is its row
            failed.append(name)
            report.row(f"cost {name}", "failed", f"{type(err).__name__}: {err}"[:300])
            continue
        finally:
            _release()
        report.set(f"cost_{name}", ratios[name])
        measured.append(name)
        spent = time.perf_counter() - started
        per_algorithm = spent  # the next one will cost about as much
        report.row(
            f"cost {name}",
            "measured",
            f"{recipe} at {position:.2f} of the run: base {base * 1e3:.1f} ms/step, time "
            f"ratio {ratios[name]:.3f} ({spent:.0f} s)",
        )
    for name in skipped + failed:
        report.set(f"cost_{name}", math.nan)
    if skipped:
        report.row("catalogue", "skipped", f"budget: not timed: {', '.join(skipped)}")


def _stored_target(path: Path) -> tuple[str, float, bool]:
    """(metric, value, higher is better) of a stored result: ``{"target": {"metric",
    "value", "higher_is_better"}}`` as ``speedup tune`` registers it, or top-level
    ``metric`` and ``target``."""
    data = json.loads(path.read_text())
    target = data.get("target")
    if isinstance(target, dict):
        metric = target.get("metric", data.get("metric"))
        return metric, float(target["value"]), bool(target.get("higher_is_better", True))
    metric = data["metric"]
    from speedup.callbacks import lower_is_better

    return metric, float(target), not lower_is_better(metric)


def _time_to_target(cfg: Any, metric: str, value: float, higher: bool, run_dir: Path) -> float:
    """Training seconds (eval excluded) until ``metric`` first reaches ``value`` in a run of
    ``cfg``; nan if the run never does."""
    from speedup.benchmarks.harness import metric_curve

    from speedup.config import with_changes
    from speedup.run import run_config

    run_config(with_changes(cfg, run_dir=str(run_dir), progress_bar=False))
    for point in metric_curve(run_dir, metric):
        if (point["value"] >= value) if higher else (point["value"] <= value):
            return float(point["train_time_s"])
    return math.nan


def _tuned_pair(recipe: str, results: Path, overrides: list[str]) -> dict[str, Any]:
    """The tuned recipe and the baseline it was proven against: the tune's workload (its
    ``config``, overrides included) with the fastest tuned baseline's changes, not the bare
    baseline recipe; ``overrides`` (dotted ``key=value``) on both."""
    from omegaconf import OmegaConf

    from speedup.config import load_config, with_changes

    data = json.loads(results.read_text())
    extra = OmegaConf.from_dotlist(overrides)
    tuned = OmegaConf.merge(load_config(recipe), extra)
    base = with_changes(OmegaConf.create(data["config"]), **data["baseline"]["changes"])
    return {recipe: tuned, TUNED[recipe]: OmegaConf.merge(base, extra)}


def measure_tuned(report: Report, device: torch.device, sizes: Sizes) -> None:
    """Each tuned embedded recipe and its tuned baseline trained to the stored target."""
    from speedup.config import recipe_names

    available = set(recipe_names())
    for recipe, baseline in TUNED.items():
        results = RESULTS_DIR / f"{recipe}.json"
        if recipe not in available or not results.exists():
            missing = f"recipe {recipe}" if recipe not in available else f"{results.name}"
            report.row(f"tuned {recipe}", "skipped", f"{missing} not found")
            continue
        metric, value, higher = _stored_target(results)
        pair = _tuned_pair(recipe, results, sizes.tuned_overrides)
        with tempfile.TemporaryDirectory() as folder:
            times = {
                name: _time_to_target(cfg, metric, value, higher, Path(folder) / name)
                for name, cfg in pair.items()
            }
        for name, seconds in times.items():
            report.set(f"ttt_{name.replace('-', '_')}_s", seconds)
        report.row(
            f"tuned {recipe}",
            "measured",
            f"time to {metric} {value:g}: {recipe} {times[recipe]:.1f} s, tuned {baseline} "
            f"{times[baseline]:.1f} s",
        )


# -- main --------------------------------------------------------------------------------


def run(
    smoke: bool,
    budget_s: float | None,
    out: Path | None,
    backend: str | None = None,
    only: list[str] | None = None,
) -> Report:
    """Every section in order; returns the report (also printed and written)."""
    report = Report(budget_s, out)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    sizes = SMOKE if smoke else FULL
    backend = backend or ("inductor" if cuda else "aot_eager")
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    report.set("device", name.replace(" ", "_"))
    report.set("cuda", cuda)
    print(
        f"speedup gpu_check: device {name}, torch {torch.__version__}, "
        f"{'smoke (tiny sizes)' if smoke else 'full sizes'}, compile backend {backend}, "
        f"budget {'none' if budget_s is None else f'{budget_s:g} s'}",
        flush=True,
    )
    sections: list[tuple[str, Callable[[Report], None], tuple]] = [
        ("bf16", lambda r: check_bf16(r, device), ("bf16_ok",)),
        ("fp16", lambda r: check_fp16(r, device), ("fp16_ok",)),
        ("fp16_resume", lambda r: check_fp16_resume(r, device), ("fp16_resume_exact",)),
        (
            "channels_last",
            lambda r: check_channels_last(r, device, sizes),
            ("channels_last_ok",),
        ),
        ("compile", lambda r: check_compile(r, device, backend), ("compile_ok",)),
        ("sparse24", lambda r: check_sparse24(r, device, sizes), ("sparse24_ok", "sparse24_ratio")),
        ("fsdp2", lambda r: check_fsdp2(r, device), ("fsdp2_ok",)),
        ("resnet50", lambda r: measure_resnet50(r, device, sizes), ()),
        ("gpt2", lambda r: measure_gpt2(r, device, sizes, backend), ()),
        ("gpt2_tuned", lambda r: measure_gpt2_tuned(r, device, sizes, backend), ()),
        ("mild", lambda r: measure_mild(r, device, sizes), ()),
        ("tuned", lambda r: measure_tuned(r, device, sizes), ()),
        ("catalogue", lambda r: measure_catalogue(r, device, sizes), ()),
    ]
    from speedup.config import recipe_names

    if not set(TUNED) & set(recipe_names()):  # nothing to run: no estimate to budget for
        sizes = replace(sizes, estimates={**sizes.estimates, "tuned": 0.0})
    for section, body, keys in sections:
        if only and section not in only:
            continue
        run_section(report, section, sizes, body, keys)
    report.set("elapsed_s", report.elapsed())
    report.write()
    print(f"\n{'section':<24} {'status':<8} evidence")
    for row_name, status, evidence in report.rows:
        print(f"{row_name:<24} {status:<8} {evidence}")
    print(report.line(), flush=True)
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="skip sections that would not fit in this many seconds (default: 450 on a GPU, "
        "none under --smoke)",
    )
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="JSON file")
    parser.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend (default: inductor on CUDA, aot_eager on the CPU, where "
        "inductor's C++ compilation takes minutes on a small machine)",
    )
    parser.add_argument("--only", nargs="*", default=None, help=f"sections: {', '.join(SECTIONS)}")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only or ()) - set(SECTIONS))
    if unknown:
        parser.error(f"--only: unknown sections {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    budget = args.budget_s if args.budget_s is not None or args.smoke else 450.0
    report = run(args.smoke, budget, args.out, args.compile_backend, args.only)
    return report.json_values()


if __name__ == "__main__":
    main()
