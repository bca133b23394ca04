"""The torch-Dataset loader resumes mid-epoch sample-exactly, augmentation included, without
loading what it skips, and independently of the number of workers."""

from __future__ import annotations

import random

import pytest
import torch

from speedup.data.loaders import (
    DataInfo,
    DataSplits,
    ResumableBatchSampler,
    ResumableDataLoader,
    TensorBatchLoader,
    TensorDictDataset,
    build_dataloaders,
)


def jitter(sample: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-sample augmentation drawing from torch's and python's global RNGs."""
    out = dict(sample)
    out["inputs"] = sample["inputs"] + torch.rand(3)
    out["coin"] = torch.tensor(random.random())
    return out


def mask(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Batch augmentation (like MLM masking or random flips) drawing from the global RNGs."""
    out = dict(batch)
    out["mask"] = torch.rand(len(batch["index"])) < 0.5
    out["scale"] = torch.full((len(batch["index"]),), random.uniform(0.5, 2.0))
    return out


class CountingDataset(TensorDictDataset):
    """Records every index it loads (in the process that loads it)."""

    def __init__(self, n: int) -> None:
        inputs = torch.arange(3 * n, dtype=torch.float32).view(n, 3)
        super().__init__({"inputs": inputs, "index": torch.arange(n)}, transform=jitter)
        self.loaded: list[int] = []

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        self.loaded.append(index)
        return super().__getitem__(index)


def make_loader(n: int = 22, batch_size: int = 4, **kwargs) -> ResumableDataLoader:
    options = {"shuffle": True, "seed": 7, "transform": mask, "pin_memory": False, **kwargs}
    return ResumableDataLoader(CountingDataset(n), batch_size, **options)


def epoch(loader: ResumableDataLoader, index: int, start: int = 0) -> list[dict]:
    loader.set_epoch(index)
    if start:
        loader.start_at(start)
    return list(loader)


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


@pytest.mark.parametrize("start", [1, 3, 5])
def test_resume_matches_uninterrupted_epoch_and_loads_nothing_skipped(start):
    whole = epoch(make_loader(), 2)
    assert len(whole) == 6  # 22 samples in batches of 4: five full, one of 2
    # Augmentation is really random: per-sample noise and batch masks vary.
    noise = torch.cat([b["inputs"] - b["inputs"].floor() for b in whole])
    assert noise.unique().numel() > 50
    assert len({tuple(b["mask"].tolist()) for b in whole}) > 1

    fresh = make_loader()  # as after a restart: a new loader, set to epoch 2, batch `start`
    resumed = epoch(fresh, 2, start)
    assert_same(resumed, whole[start:])
    expected = torch.cat([b["index"] for b in whole[start:]]).tolist()
    assert fresh.dataset.dataset.loaded == expected  # the skipped samples were never loaded

    # start_at is one-shot: the next iteration is the whole epoch again.
    assert_same(list(fresh), whole)


def test_workers_give_identical_batches():
    in_process = make_loader(num_workers=0)
    workers = make_loader(num_workers=2)
    assert workers.persistent_workers and not in_process.persistent_workers
    for index in (0, 1):
        assert_same(epoch(workers, index), epoch(in_process, index))
    assert_same(epoch(workers, 1, start=2), epoch(in_process, 1)[2:])
    assert workers.dataset.dataset.loaded == []  # loaded in the workers, not here


def test_epochs_differ_and_set_epoch_reproduces():
    loader = make_loader()
    first, second = epoch(loader, 0), epoch(loader, 1)
    order = [b["index"].tolist() for b in first]
    assert order != [b["index"].tolist() for b in second]
    assert sorted(sum(order, [])) == list(range(22))
    assert_same(epoch(loader, 0), first)
    assert_same(epoch(loader, 1), second)
    # The same order as the in-memory loader with the same (seed, epoch).
    tensors = {"index": torch.arange(22)}
    memory = TensorBatchLoader(tensors, 4, shuffle=True, seed=7)
    memory.set_epoch(1)
    assert [b["index"].tolist() for b in memory] == [b["index"].tolist() for b in second]
    # Another seed, another order.
    assert [b["index"].tolist() for b in epoch(make_loader(seed=8), 0)] != order


@pytest.mark.parametrize(
    ("n", "batch_size", "drop_last", "sizes"),
    [
        (22, 4, True, [4] * 5),
        (22, 4, False, [4] * 5 + [2]),
        (20, 4, True, [4] * 5),
        (3, 4, True, []),
    ],
)
def test_drop_last_and_len(n, batch_size, drop_last, sizes):
    loader = make_loader(n, batch_size, drop_last=drop_last)
    assert len(loader) == len(sizes) and loader.batch_size == batch_size
    assert loader.drop_last is drop_last
    assert [len(b["index"]) for b in loader] == sizes
    if sizes:
        loader.start_at(len(sizes) - 1)
        assert [len(b["index"]) for b in loader] == sizes[-1:]
        assert len(loader) == len(sizes)  # len stays the epoch's, also after a resume


def test_eval_order_is_in_order():
    loader = make_loader(shuffle=False)
    assert torch.cat([b["index"] for b in epoch(loader, 3)]).tolist() == list(range(22))


def test_global_rng_untouched_and_irrelevant():
    torch.manual_seed(123)
    random.seed(123)
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    batches = epoch(make_loader(), 0)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == python_state
    # The global seed plays no part in order or augmentation.
    torch.manual_seed(456)
    random.seed(456)
    assert_same(epoch(make_loader(), 0), batches)


def test_sampler_yields_keys_without_loading():
    sampler = ResumableBatchSampler(10, 3, shuffle=True, seed=1)
    sampler.set_epoch(4)
    batches = list(sampler)
    assert [len(b) for b in batches] == [3, 3, 3, 1]
    sampler.set_epoch(4)
    sampler.start_at(2)
    assert list(sampler) == batches[2:]
    seeds = [key.seed for batch in batches for key in batch]
    assert len(set(seeds)) == 10 and all(0 <= s < 2**64 for s in seeds)


def test_build_dataloaders_uses_the_resumable_loader_for_datasets():
    info = DataInfo(kind="signal", input_shape=(3,))
    splits = DataSplits(CountingDataset(12), CountingDataset(5), info, train_transform=mask)
    train, evaluation = build_dataloaders(splits, batch_size=4, eval_batch_size=2, seed=3)
    assert isinstance(train, ResumableDataLoader) and isinstance(evaluation, ResumableDataLoader)
    assert len(train) == 3 and len(evaluation) == 3
    assert torch.cat([b["index"] for b in evaluation]).tolist() == [0, 1, 2, 3, 4]
    assert "mask" in next(iter(train)) and "mask" not in next(iter(evaluation))
