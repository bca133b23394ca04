"""The prepared GPU check (speedup.benchmarks.gpu_check): its CPU smoke, its last line and
JSON, the MFU arithmetic, the budget and the error handling of its sections."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from speedup.benchmarks import gpu_check
from speedup.benchmarks.gpu_check import (
    DEFAULTS,
    Report,
    flops_per_token,
    gpt2_model_flops,
    mfu,
    peak_bf16_flops,
    run_section,
)

REQUIRED = (
    "device",
    "bf16_ok",
    "fp16_resume_exact",
    "compile_ok",
    "sparse24_ok",
    "channels_last_ratio",
    "sparse24_ratio",
    "resnet50_img_s",
    "gpt2_tok_s",
    "mfu_gpt2",
)
#: Values the timed sections set (nan until they run).
TIMED = (
    "channels_last_ratio",
    "compile_ratio",
    "sparse24_ratio",
    "mild_step_ratio",
    "resnet50_img_s",
    "gpt2_tok_s",
    "gpt2_tuned_tok_s",
    "mfu_gpt2",
)
CHECKS = ("bf16_ok", "fp16_ok", "fp16_resume_exact", "channels_last_ok", "compile_ok", "fsdp2_ok")


def as_json_value(text: str):
    """A value of the last line as the JSON file holds it."""
    if text in ("true", "false"):
        return text == "true"
    if text == "nan":
        return None
    try:
        return float(text)
    except ValueError:
        return text


@pytest.mark.slow
def test_cpu_smoke_prints_a_parsable_last_line_equal_to_the_json(tmp_path):
    out = tmp_path / "tmp.json"
    proc = subprocess.run(
        [sys.executable, "-m", "speedup.benchmarks.gpu_check", "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    line = dict(item.split("=", 1) for item in last.split())
    for key in REQUIRED:
        assert key in line, f"{key} missing from the last line: {last}"
    if not torch.cuda.is_available():
        # CUDA-only checks are skipped, never passed, on a machine without CUDA.
        assert line["sparse24_ok"] == "skipped"
        assert line["sparse24_ratio"] == "nan"
        assert line["device"] == "cpu" and line["cuda"] == "false"
        assert line["mfu_gpt2"] == "nan"  # no peak FLOP/s is known for a CPU
    assert line["bf16_ok"] == "true"  # torch.autocast("cpu", dtype=torch.bfloat16) trains
    # Every check ran and passed or failed with its evidence (none crashed the run).
    for key in CHECKS:
        assert line[key] in ("true", "false"), (key, line[key])
    assert float(line["resnet50_img_s"]) > 0 and float(line["gpt2_tok_s"]) > 0
    assert json.loads(out.read_text()) == {k: as_json_value(v) for k, v in line.items()}
    assert "section" in proc.stdout and "evidence" in proc.stdout  # the table


def test_budget_zero_skips_every_timed_section(tmp_path, capsys):
    out = tmp_path / "b.json"
    values = gpu_check.main(["--smoke", "--budget-s", "0", "--out", str(out)])
    printed = capsys.readouterr().out
    for key in TIMED:
        assert values[key] is None, key
    for key in CHECKS:
        assert values[key] == "skipped", key
    for section in ("resnet50", "gpt2", "mild", "catalogue"):
        assert any(
            row.split()[:2] == [section, "skipped"] and "budget" in row
            for row in printed.splitlines()
        ), section
    assert json.loads(out.read_text()) == values


def test_planted_mfu_arithmetic():
    # 6N + 12 L H Q T with N = 100M, 12 layers of 12 heads of 64, a 1024-token context.
    per_token = flops_per_token(100_000_000, 12, 12, 64, 1024)
    assert per_token == 6e8 + 12 * 12 * 12 * 64 * 1024 == 713_246_208
    assert mfu(1e5, per_token, 989e12) == pytest.approx(1e5 * 713_246_208 / 989e12)
    assert mfu(1e5, per_token, 989e12) == pytest.approx(0.072118, abs=1e-6)
    assert math.isnan(mfu(1e5, per_token, None))  # unknown GPU: nan, not a guess


def test_gpt2_n_counts_the_tied_embedding_once_and_leaves_out_positions():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    model = GPT2LMHeadModel(config)
    n, per_token = gpt2_model_flops(model, seq=8)
    # wte 16*8; one block: ln_1 16, c_attn 8*24+24, attn c_proj 8*8+8, ln_2 16,
    # c_fc 8*32+32, mlp c_proj 32*8+8; ln_f 16. lm_head is wte (tied); wpe is left out.
    assert n == 128 + (16 + 216 + 72 + 16 + 288 + 264) + 16 == 1016
    assert per_token == 6 * 1016 + 12 * 1 * 2 * 4 * 8


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H200", 989e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA A10G", 125e12),
        ("NVIDIA L40S", None),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_table_matches_device_names(name, peak):
    assert peak_bf16_flops(name) == peak


def test_a_failing_section_is_recorded_and_the_run_goes_on(tmp_path, capsys):
    report = Report(None, tmp_path / "r.json")

    def broken(r: Report) -> None:
        raise RuntimeError("planted failure")

    def fine(r: Report) -> None:
        r.check("bf16", "bf16_ok", True, "ok")

    sizes = gpu_check.SMOKE
    run_section(report, "compile", sizes, broken, ("compile_ok", "compile_ratio"))
    run_section(report, "bf16", sizes, fine, ("bf16_ok",))
    assert report.values["compile_ok"] is False  # a check that raised failed
    assert math.isnan(report.values["compile_ratio"])
    assert report.values["bf16_ok"] is True  # the next section ran
    assert ("compile", "failed", "RuntimeError: planted failure") in report.rows
    assert json.loads((tmp_path / "r.json").read_text())["compile_ok"] is False


def test_trainer_resume_is_bit_exact_on_cpu():
    """The CUDA fp16 resume check's code path, at bf16 on the CPU (the Trainer takes fp16 on
    CUDA only): checkpoint after 2 steps, resume, against 4 uninterrupted steps."""
    device = torch.device("cpu")
    with gpu_check._exact_math(device):
        ok, evidence = gpu_check.trainer_resume(device, k=2, m=2, precision="bf16")
    assert ok, evidence
    assert "16/16 tensors torch.equal" in evidence


def test_unknown_section_is_refused():
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--only", "nope"])
    assert exc.value.code == 2


def test_every_key_has_a_not_run_value():
    assert set(REQUIRED) <= set(DEFAULTS)
    assert all(DEFAULTS[k] == "skipped" for k in CHECKS)


def test_stored_targets_are_read_in_both_shapes(tmp_path):
    tuned = tmp_path / "tuned.json"
    tuned.write_text(
        json.dumps({"target": {"metric": "loss", "value": 2.5, "higher_is_better": False}})
    )
    assert gpu_check._stored_target(tuned) == ("loss", 2.5, False)
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"metric": "accuracy", "target": 0.9}))
    assert gpu_check._stored_target(plain) == ("accuracy", 0.9, True)


def test_tuned_recipes_race_the_baseline_they_were_proven_against():
    """The GPU figure compares a tuned recipe with the tune's own baseline (its workload and
    the fastest baseline's changes), not with the bare baseline recipe."""
    results = gpu_check.RESULTS_DIR / "shapes2d-tuned.json"
    pair = gpu_check._tuned_pair("shapes2d-tuned", results, ["max_duration=4ba"])
    tuned, base = pair["shapes2d-tuned"], pair["shapes2d-baseline"]
    stored = json.loads(results.read_text())
    assert base.model.name == tuned.model.name == stored["config"]["model"]["name"] == "small_cnn"
    assert base.optimizer.lr == stored["baseline"]["changes"]["optimizer.lr"]
    assert not base.algorithms and set(tuned.algorithms) == set(
        stored["winner"]["changes"]["algorithms"]
    )
    assert base.max_duration == tuned.max_duration == "4ba"
