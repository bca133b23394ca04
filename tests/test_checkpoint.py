"""Checkpoints: exact resume, atomic writes, integrity, the NaN guard and export."""

from __future__ import annotations

import json
import os
import signal
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from conftest import CountBatches, CrashAt

from speedup.callback import Callback
from speedup.checkpoint import (
    CheckpointError,
    CheckpointSaver,
    find_latest,
    list_checkpoints,
    read_checkpoint,
    resolve_checkpoint,
    verify_checkpoint,
)
from speedup.config import ConfigError, load_config
from speedup.guard import NonFiniteLossError
from speedup.run import build_trainer, run_config

if TYPE_CHECKING:
    from collections.abc import Iterable

    from omegaconf import DictConfig

    from speedup.loggers import Logger
    from speedup.state import State

#: Every stateful piece at once: microbatches, an eval interval, EMA, gradual-free one-shot
#: pruning with weight rewinding (a snapshot), progressive resizing and label smoothing.
COMPOSED = [
    "model.width=4",
    "data.batch_size=32",
    "data.train_samples=256",
    "data.eval_batch_size=64",
    "microbatch_size=16",
    "max_duration=3ep",  # 8 batches per epoch: 24 steps
    "eval_interval=5ba",
    "log_interval=1ba",
    "deterministic=true",
    "threads=1",
    "progress_bar=false",
    "checkpoint.interval=5ba",
    "checkpoint.keep_last=0",
    "algorithms.ema.half_life=3ba",
    "algorithms.magnitude_pruning.sparsity=0.6",
    "algorithms.magnitude_pruning.schedule=oneshot",
    "algorithms.magnitude_pruning.at=12ba",
    "algorithms.rewinding.mode=weights",
    "algorithms.rewinding.to=3ba",
    "algorithms.progressive_resizing.initial_scale=0.5",
    "algorithms.progressive_resizing.delay=0.2dur",
    "algorithms.progressive_resizing.finetune=0.3dur",
    "algorithms.label_smoothing.alpha=0.1",
]


def composed(run_dir: Path, *extra: str):
    return load_config("shapes2d-baseline", [*COMPOSED, f"run_dir={run_dir}", *extra], smoke=True)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    _, parts = read_checkpoint(resolve_checkpoint(run_dir))
    return parts["model"]


def zero_fraction(weights: dict[str, torch.Tensor]) -> float:
    """Zeros among the conv and linear weights (what magnitude pruning prunes by default)."""
    prunable = [v for k, v in weights.items() if k.endswith("weight") and v.dim() > 1]
    return sum(int((v == 0).sum()) for v in prunable) / sum(v.numel() for v in prunable)


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields (which differ between any two runs)."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key in [k for k in record if k == "train_time_s" or k.startswith("throughput/")]:
            record.pop(key, None)
        out.append(record)
    return out


@pytest.mark.parametrize(
    ("crash", "resume_at", "saved"),
    [
        # before the pruning at 12: the snapshot (step 3) and the EMA come from the checkpoint
        (13, "ep1-ba10", ["ep0-ba5", "ep1-ba10"]),
        # after it: masks, rewound weights, reset EMA and cleared momentum come from it too
        (18, "ep1-ba15", ["ep0-ba5", "ep1-ba10", "ep1-ba15"]),
    ],
)
def test_interrupted_mid_epoch_resume_is_bit_exact(
    tmp_path: Path, crash: int, resume_at: str, saved: list[str]
) -> None:
    straight = run_config(composed(tmp_path / "straight"))
    with pytest.raises(RuntimeError, match=f"simulated crash at step {crash}"):
        run_config(composed(tmp_path / "crashed"), extra_callbacks=[CrashAt(crash)])
    found = [p.name for p in list_checkpoints(tmp_path / "crashed" / "checkpoints")]
    assert found == saved  # the last one is mid-epoch (8 batches per epoch)

    counter = CountBatches()
    resumed = run_config(composed(tmp_path / "crashed"), extra_callbacks=[counter])
    assert resumed["resumed_from"].endswith(resume_at)
    done = int(resume_at.rpartition("ba")[2])
    assert counter.loaded == 24 - done  # the batches already done were not loaded again

    assert resumed["steps"] == straight["steps"] == 24
    assert resumed["metrics"] == straight["metrics"]
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "crashed")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert records(tmp_path / "crashed") == records(tmp_path / "straight")
    # The run really composed everything: 60% of the weights are zero in the final model.
    assert 0.55 < zero_fraction(a) < 0.65


def test_resume_restores_each_piece_of_state(tmp_path: Path) -> None:
    cfg = composed(tmp_path / "run", "max_duration=14ba")
    first = build_trainer(cfg)
    first.fit()
    rng_at_save = torch.get_rng_state()
    path = first.save_checkpoint(tmp_path / "ck")
    second = build_trainer(cfg)  # building draws random numbers (initial weights)
    assert not torch.equal(torch.get_rng_state(), rng_at_save)
    meta = second.load_checkpoint(path)
    assert torch.equal(torch.get_rng_state(), rng_at_save)
    assert meta["timestamp"]["batch"] == 14
    s1, s2 = first.state, second.state
    assert s2.timestamp.batch == 14 and s2.timestamp.batch_in_epoch == 6
    assert s2.masks.keys() == s1.masks.keys() and s2.masks_updated_at == 12
    for name in s1.masks:
        assert torch.equal(s1.masks[name], s2.masks[name])
    ema1, ema2 = (next(a for a in s.algorithms if a.name == "ema") for s in (s1, s2))
    assert all(torch.equal(ema1.ema[k], ema2.ema[k]) for k in ema1.ema)
    rw1, rw2 = (next(a for a in s.algorithms if a.name == "rewinding") for s in (s1, s2))
    assert rw2.snapshot is not None and rw2.retrain_from == rw1.retrain_from == 12
    assert s2.optimizer.state_dict()["param_groups"] == s1.optimizer.state_dict()["param_groups"]
    assert s2.schedulers[0].last_epoch == s1.schedulers[0].last_epoch == 14
    for p1, p2 in zip(s1.model.parameters(), s2.model.parameters(), strict=True):
        assert torch.equal(p1, p2)


def test_atomic_layout_latest_and_keep_last(tmp_path: Path) -> None:
    cfg = composed(tmp_path / "run", "max_duration=12ba", "checkpoint.keep_last=2", "~algorithms")
    run_config(cfg)
    folder = tmp_path / "run" / "checkpoints"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["ep1-ba10", "ep1-ba12", "latest"]  # no temp dirs left behind
    assert (folder / "latest").resolve().name == "ep1-ba12"
    meta = verify_checkpoint(folder / "ep1-ba12")
    assert meta["format_version"] == 1 and meta["final"] is True
    assert meta["config"]["max_duration"] == "12ba" and len(meta["config_hash"]) == 8
    assert set(meta["files"]) == {"model.pt", "optimizer.pt", "algorithms.pt", "trainer.pt"}
    for name in meta["files"]:  # plain data only: loads with weights_only=True
        torch.load(folder / "ep1-ba12" / name, weights_only=True)


def test_truncated_checkpoint_is_detected_and_skipped(tmp_path: Path) -> None:
    cfg = composed(tmp_path / "run", "max_duration=12ba", "~algorithms")
    run_config(cfg)
    folder = tmp_path / "run" / "checkpoints"
    newest = folder / "ep1-ba12"
    model = newest / "model.pt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        verify_checkpoint(newest)
    with pytest.warns(UserWarning, match="skipped damaged checkpoint.*ep1-ba10"):
        assert find_latest(folder) == folder / "ep1-ba10"
    # Same size, one flipped byte: the hash catches it.
    data = bytearray((folder / "ep1-ba10" / "trainer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "ep1-ba10" / "trainer.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="hash does not match"):
        verify_checkpoint(folder / "ep1-ba10")
    # resume=auto falls back past both damaged ones, naming them.
    with pytest.warns(UserWarning, match=r"ep1-ba12/model.pt.*ep1-ba10/trainer.pt"):
        assert find_latest(folder) == folder / "ep0-ba5"
    (folder / "ep0-ba5" / "meta.json").unlink()  # a write cut short before its meta.json
    with pytest.warns(UserWarning, match="no complete checkpoint"):
        assert find_latest(folder) is None


def test_resume_auto_falls_back_and_finishes(tmp_path: Path) -> None:
    cfg = composed(tmp_path / "run", "max_duration=12ba", "~algorithms")
    with pytest.raises(RuntimeError):
        run_config(cfg, extra_callbacks=[CrashAt(11)])
    folder = tmp_path / "run" / "checkpoints"
    (folder / "ep1-ba10" / "optimizer.pt").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="resuming from the previous complete one"):
        summary = run_config(cfg)
    assert summary["resumed_from"].endswith("ep0-ba5") and summary["steps"] == 12


class Opaque:
    """A custom class: pickled, it would run code of its module on load."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


def test_pickled_custom_object_is_refused(tmp_path: Path) -> None:
    cfg = composed(tmp_path / "run", "max_duration=5ba", "~algorithms")
    run_config(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "ep0-ba5"
    state = torch.load(ckpt / "algorithms.pt", weights_only=True)
    state["callbacks"]["evil#0"] = Opaque()
    torch.save(state, ckpt / "algorithms.pt")
    meta = json.loads((ckpt / "meta.json").read_text())  # forge matching hashes
    from speedup.checkpoint import _sha256

    meta["files"]["algorithms.pt"] = {
        "bytes": (ckpt / "algorithms.pt").stat().st_size,
        "sha256": _sha256(ckpt / "algorithms.pt"),
    }
    (ckpt / "meta.json").write_text(json.dumps(meta))
    verify_checkpoint(ckpt)  # intact by its hashes ...
    with pytest.raises(CheckpointError, match=r"refused: it holds pickled Python objects.*Opaque"):
        read_checkpoint(ckpt)  # ... but not plain data
    with pytest.raises(CheckpointError, match="refused"):
        run_config(composed(tmp_path / "run", "max_duration=8ba", "~algorithms", f"resume={ckpt}"))


def test_saving_a_non_plain_state_names_it(tmp_path: Path) -> None:
    class Leaky(Callback):
        def state_dict(self):
            return {"handle": Opaque()}

    trainer = build_trainer(composed(tmp_path / "run", "max_duration=2ba", "~algorithms"))
    trainer.state.callbacks.append(Leaky())
    with pytest.raises(CheckpointError, match=r"algorithms\.callbacks\.Leaky#0\.handle.*Opaque"):
        trainer.save_checkpoint(tmp_path / "ck")
    assert not list((tmp_path / "ck").glob("*")) if (tmp_path / "ck").exists() else True


def test_resume_with_other_batch_size_or_algorithms_fails_clearly(tmp_path: Path) -> None:
    run_config(composed(tmp_path / "run", "max_duration=5ba"))
    ckpt = tmp_path / "run" / "checkpoints"
    with pytest.raises(CheckpointError, match="batches of 32 samples.*data.batch_size"):
        run_config(composed(tmp_path / "other", "data.batch_size=16", f"resume={ckpt}"))
    with pytest.raises(CheckpointError, match=r"saved with algorithms \[ema, magnitude_pruning"):
        run_config(composed(tmp_path / "other2", "~algorithms.ema", f"resume={ckpt}"))
    with pytest.raises(CheckpointError, match="resume=.*nowhere: not a checkpoint"):
        run_config(composed(tmp_path / "x", f"resume={tmp_path / 'nowhere'}"))


def test_checkpoint_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"checkpoint\.every: unknown key.*allowed: interval"):
        load_config("quickstart", ["checkpoint.every=1ep"])
    with pytest.raises(ConfigError, match=r"checkpoint\.interval: malformed duration"):
        load_config("quickstart", ["checkpoint.interval=often"])
    with pytest.raises(ConfigError, match=r"nonfinite: 'ignore' is not allowed; allowed: stop"):
        load_config("quickstart", ["nonfinite=ignore"])


class PoisonAt(Callback):
    """Makes the loss NaN at step ``batch`` (as a bad batch or an LR spike would)."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def after_loss(self, state: State, logger: Logger) -> None:
        if state.timestamp.batch + 1 == self.batch:
            state.loss = state.loss * float("nan")


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path: Path) -> None:
    cfg = composed(tmp_path / "run", "max_duration=12ba", "~algorithms")
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 7 .*ep0-ba5") as err:
        run_config(cfg, extra_callbacks=[PoisonAt(7)])
    assert err.value.step == 7
    latest = find_latest(tmp_path / "run" / "checkpoints")
    assert latest is not None and latest.name == "ep0-ba5"
    _, parts = read_checkpoint(latest)
    assert all(torch.isfinite(v).all() for v in parts["model"].values() if v.is_floating_point())


def test_nonfinite_skip_leaves_weights_untouched(tmp_path: Path) -> None:
    cfg = composed(tmp_path / "run", "max_duration=4ba", "~algorithms", "nonfinite=skip")
    seen = {}

    class Snap(Callback):
        def batch_end(self, state: State, logger: Logger) -> None:
            seen[state.timestamp.batch] = {
                k: v.clone() for k, v in state.model.state_dict().items() if "weight" in k
            }

    trainer = build_trainer(cfg, extra_callbacks=[PoisonAt(3), Snap()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit()
    assert any("loss is nan at step 3" in str(w.message) for w in caught)
    for name, before in seen[2].items():  # step 3 was skipped: no update at all
        assert torch.equal(before, seen[3][name]), name
    assert any(not torch.equal(seen[3][n], seen[4][n]) for n in seen[3])  # step 4 trained
    guard = next(c for c in trainer.state.callbacks if type(c).__name__ == "NonFiniteGuard")
    assert guard.skipped == 1


def test_export_writes_safetensors_loadable_without_speedup(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from speedup.export import export_model

    cfg = composed(tmp_path / "run", "max_duration=14ba", "~algorithms.progressive_resizing")
    run_config(cfg)
    path = export_model(tmp_path / "run")
    assert path == tmp_path / "run" / "model.safetensors"
    tensors = load_file(str(path))
    final = final_weights(tmp_path / "run")
    assert set(tensors) == {k.removeprefix("net.") for k in final}
    for name, tensor in tensors.items():
        assert torch.equal(tensor, final[f"net.{name}"]), name
    assert 0.55 < zero_fraction(tensors) < 0.65  # dense tensors, zeros where pruned
    # The network alone (no speedup wrapper) loads it.
    from speedup.models.vision import CifarResNet

    net = CifarResNet(3, num_classes=10, width=4)  # ResNet-20: 6n+2 layers
    net.load_state_dict(tensors)
    saved = json.loads((tmp_path / "run" / "speedup_config.json").read_text())
    assert saved["model"] == {"name": "resnet20", "width": 4}


def test_cli_export_and_bad_source(tmp_path: Path, capsys) -> None:
    from speedup.cli import main

    run_config(composed(tmp_path / "run", "max_duration=2ba", "~algorithms"))
    out = tmp_path / "exported"
    assert main(["export", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert (out / "model.safetensors").stat().st_size > 0
    assert main(["export", str(tmp_path / "run"), "--ema"]) == 2
    assert "no EMA weights" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing")]) == 2
    assert "not a checkpoint" in capsys.readouterr().err


def test_saver_defers_last_batch_of_epoch_to_epoch_end(tmp_path: Path) -> None:
    events = []

    class Spy(Callback):
        def epoch_end(self, state: State, logger: Logger) -> None:
            events.append(("epoch_end", state.timestamp.batch))

    saver = CheckpointSaver(tmp_path / "ck", interval="4ba", keep_last=0, save_final=False)
    cfg = composed(tmp_path / "run", "max_duration=9ba", "~algorithms")
    trainer = build_trainer(cfg, extra_callbacks=[Spy(), saver])
    original = saver.save

    def save(state: State, final: bool = False):
        events.append(("save", state.timestamp.batch, state.timestamp.epoch))
        return original(state, final)

    saver.save = save
    trainer.fit()
    # Step 8 ends epoch 0: saved after EPOCH_END, as epoch 1 at batch 0 of it.
    assert events == [("save", 4, 0), ("epoch_end", 8), ("save", 8, 1)]
    meta = verify_checkpoint(tmp_path / "ck" / "ep1-ba8")
    assert meta["timestamp"]["batch_in_epoch"] == 0


def test_checkpoint_time_is_not_training_time(tmp_path: Path, monkeypatch) -> None:
    """Each checkpoint moves the clock on by 100 s (no real sleep, nothing timed): none of that
    may show in the training time."""
    import time

    real_clock, skipped = time.perf_counter, []
    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + 100.0 * len(skipped))

    class SlowSaver(Callback):
        def batch_checkpoint(self, state: State, logger: Logger) -> None:
            skipped.append(state.timestamp.batch)

    cfg = composed(tmp_path / "run", "max_duration=6ba", "~algorithms")
    trainer = build_trainer(cfg, extra_callbacks=[SlowSaver()])
    trainer.fit()
    assert skipped == [1, 2, 3, 4, 5, 6]  # six checkpoints, 600 s on the clock
    assert trainer.state.timestamp.train_time_s < 100.0


def test_resume_skips_without_loading_when_resumed_at_epoch_start(tmp_path: Path) -> None:
    cfg = composed(tmp_path / "run", "max_duration=10ba", "~algorithms", "checkpoint.interval=1ep")
    with pytest.raises(RuntimeError):
        run_config(cfg, extra_callbacks=[CrashAt(9)])
    counter = CountBatches()
    summary = run_config(cfg, extra_callbacks=[counter])
    assert summary["resumed_from"].endswith("ep1-ba8") and counter.loaded == 2
    # A finished run resumes from its final checkpoint and trains nothing more.
    again = CountBatches()
    assert run_config(cfg, extra_callbacks=[again])["metrics"] == summary["metrics"]
    assert again.loaded == 0


class SignalAt(Callback):
    """Sends this process a signal during step ``batch`` (as Ctrl-C or a scheduler would)."""

    def __init__(self, batch: int, signum: int) -> None:
        self.batch, self.signum = batch, signum

    def after_train_batch(self, state: State, logger: Logger) -> None:
        if state.timestamp.batch + 1 == self.batch:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_at_the_batch_boundary_and_stops(tmp_path: Path, signum: int) -> None:
    before = signal.getsignal(signum)
    cfg = composed(tmp_path / "run", "max_duration=12ba")
    summary = run_config(cfg, extra_callbacks=[SignalAt(7, signum)])
    assert summary["preempted"] == signal.Signals(signum).name and summary["steps"] == 7
    assert summary["checkpoint"].endswith("ep0-ba7")
    assert not (tmp_path / "run" / "summary.json").exists()
    assert signal.getsignal(signum) == before  # handlers restored after fit
    meta = verify_checkpoint(tmp_path / "run" / "checkpoints" / "ep0-ba7")
    assert meta["final"] is False
    resumed = run_config(cfg)
    assert resumed["resumed_from"].endswith("ep0-ba7") and resumed["steps"] == 12
    straight = run_config(composed(tmp_path / "straight", "max_duration=12ba"))
    assert resumed["metrics"] == straight["metrics"]


def test_second_ctrl_c_aborts_at_once(tmp_path: Path) -> None:
    class TwoCtrlC(Callback):
        def after_backward(self, state: State, logger: Logger) -> None:  # per microbatch
            if state.timestamp.batch == 2:
                os.kill(os.getpid(), signal.SIGINT)

    cfg = composed(tmp_path / "run", "max_duration=12ba")
    with pytest.raises(KeyboardInterrupt):
        run_config(cfg, extra_callbacks=[TwoCtrlC()])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_cli_reports_preemption_with_exit_code(tmp_path: Path, capsys, monkeypatch) -> None:
    from speedup import run as run_module
    from speedup.cli import main

    original = run_module.run_config

    def with_signal(cfg: DictConfig, extra_callbacks: Iterable[Callback] = (), **kw: Any) -> dict:
        return original(cfg, extra_callbacks=[SignalAt(3, signal.SIGTERM)], **kw)

    monkeypatch.setattr(run_module, "run_config", with_signal)
    code = main(["run", "quickstart", "--smoke", f"run_dir={tmp_path}", "progress_bar=false"])
    assert code == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "SIGTERM: stopped at step 3 after saving" in err and "ep0-ba3" in err


def test_export_hugging_face_model_loads_with_from_pretrained(tmp_path: Path) -> None:
    import transformers

    from speedup.export import export_model

    cfg = load_config("stdlib-gpt", [f"run_dir={tmp_path / 'run'}", "progress_bar=false"], True)
    run_config(cfg)
    export_model(tmp_path / "run", out=tmp_path / "hf")
    net = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    saved = final_weights(tmp_path / "run")
    state = net.state_dict()
    assert state.keys() == {k.removeprefix("net.") for k in saved}
    for name, tensor in state.items():
        assert torch.equal(tensor, saved[f"net.{name}"]), name


def test_export_of_a_weight_standardized_model_loads_into_the_plain_network(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from speedup.export import export_model
    from speedup.models.vision import CifarResNet

    cfg = composed(
        tmp_path / "run", "max_duration=6ba", "~algorithms", "algorithms.weight_standardization={}"
    )
    run_config(cfg)
    trainer = build_trainer(cfg)
    trainer.load_checkpoint(tmp_path / "run")
    trained = trainer.state.model.eval()
    tensors = load_file(str(export_model(tmp_path / "run")))
    assert not any("parametrizations" in k for k in tensors)
    net = CifarResNet(3, num_classes=10, width=4).eval()
    net.load_state_dict(tensors)  # strict: exactly the plain network's keys
    inputs = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(inputs), trained.net(inputs), rtol=1e-4, atol=1e-5)


def test_export_of_a_factorized_gpt2_loads_into_the_plain_architecture(tmp_path: Path) -> None:
    import transformers

    from speedup.export import export_model

    overrides = [
        f"run_dir={tmp_path / 'run'}",
        "progress_bar=false",
        "max_duration=4ba",
        "algorithms.factorize.min_features=64",
        "algorithms.factorize.latent_features=16",
    ]
    cfg = load_config("stdlib-gpt", overrides, smoke=True)
    run_config(cfg)
    trainer = build_trainer(cfg)
    trainer.load_checkpoint(tmp_path / "run")
    factorize = next(a for a in trainer.state.algorithms if a.name == "factorize")
    assert factorize.replaced and factorize.transposed  # GPT-2's Conv1D layers were split
    export_model(tmp_path / "run", out=tmp_path / "hf")
    net = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, net.config.vocab_size, (2, 16))
    with torch.no_grad():
        expected = trainer.state.model.eval().net(input_ids=ids).logits
        torch.testing.assert_close(net(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
