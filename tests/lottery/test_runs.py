"""A lottery level interrupted mid-run resumes from its own checkpoint, exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import CountBatches, CrashAt
from speedup.lottery.runs import initial_weights, train_run

from speedup.config import load_config

OVERRIDES = [
    "model.widths=[64,64]",
    "max_duration=20ba",
    "checkpoint.interval=4ba",
    "eval_interval=10ba",
    "deterministic=true",
    "threads=1",
]


def test_an_interrupted_level_resumes_mid_run_to_the_same_weights(tmp_path) -> None:
    cfg = load_config("mnist1d-lottery-mlp", OVERRIDES, smoke=True)
    start = initial_weights(cfg)
    masks = {
        name: torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) > 0.5
        for name, w in start.items()
        if name.endswith("weight") and w.dim() == 2
    }
    args = {"weights": start, "masks": masks, "start_batch": 3}
    straight = train_run(cfg, tmp_path / "straight", **args)
    with pytest.raises(RuntimeError, match="crash at step 11"):
        train_run(cfg, tmp_path / "level", **args, callbacks=[CrashAt(11)])
    counter = CountBatches()
    resumed = train_run(cfg, tmp_path / "level", **args, callbacks=[counter])
    assert counter.loaded == 20 - 8  # from the step-8 checkpoint, not from step 3 again
    assert resumed["steps"] == straight["steps"] == 20
    assert resumed["metrics"] == straight["metrics"]
    a, b = straight.final_weights, resumed.final_weights
    for name in a:
        assert torch.equal(a[name], b[name]), name
    pruned = [name for name in masks if name.startswith("net.")]
    for name in pruned:  # the masks held through the resume: pruned weights still zero
        assert not b[name][~masks[name]].any()
