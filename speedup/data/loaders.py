"""Dataloaders: a fast in-memory batch loader, and the bridge to torch's DataLoader."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

__all__ = [
    "DataInfo",
    "DataSplits",
    "ResumableBatchSampler",
    "ResumableDataLoader",
    "SampleKey",
    "TensorBatchLoader",
    "TensorDictDataset",
    "build_dataloaders",
]


@dataclass(frozen=True)
class DataInfo:
    """What a model builder needs to know about the data."""

    kind: str  # "image", "signal", "text": algorithms declare the data kinds they apply to
    input_shape: tuple[int, ...]
    num_classes: int | None = None
    tokens_per_sample: int | None = None


@dataclass
class DataSplits:
    """A dataset's train and eval splits: dicts of equal-length tensors, or torch Datasets."""

    train: dict[str, torch.Tensor] | Dataset
    eval: dict[str, torch.Tensor] | Dataset | None
    info: DataInfo
    #: Applied to each collated training batch on the host (e.g. MLM masking); it must draw
    #: randomness from torch's global RNG so seeding and resume make it reproducible.
    train_transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    #: Applied to each eval batch (e.g. uint8 -> normalised float); must be deterministic.
    eval_transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None


def _common_length(tensors: dict[str, torch.Tensor]) -> int:
    lengths = {len(t) for t in tensors.values()}
    if len(lengths) != 1:
        raise ValueError(f"tensors have different lengths: {sorted(lengths)}")
    return lengths.pop()


class TensorDictDataset(Dataset):
    """Per-sample view of in-memory tensors, yielding dicts (for a torch DataLoader).

    ``transform`` (optional) is applied to each sample dict; a batch transform belongs in the
    DataLoader's collate instead."""

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    ) -> None:
        self.tensors = tensors
        self.length = _common_length(tensors)
        self.transform = transform

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = {k: t[index] for k, t in self.tensors.items()}
        return self.transform(sample) if self.transform is not None else sample


def _epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of an epoch: a function of ``(seed, epoch)`` only, so any epoch can be
    recreated without replaying the earlier ones (shared by both loaders, which therefore visit
    samples in the same order)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_samples, generator=generator)


class _EpochBatches:
    """What both resumable loaders share: ``num_samples`` in batches of ``batch_size`` (the
    global batch, split across ``world_size`` ranks), an epoch that picks the shuffle, and the
    batch a resumed iteration begins at."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        seed: int,
        rank: int,
        world_size: int,
    ) -> None:
        _check_shard(batch_size, rank, world_size)
        self.rank, self.world_size = rank, world_size
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = 0
        self._start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def start_at(self, batch: int) -> None:
        """Make the next iteration (once) begin at batch ``batch`` of the current epoch, with
        the same order as an uninterrupted epoch (sample-exact resume, nothing replayed)."""
        self._start = batch

    def __len__(self) -> int:
        """Batches in a whole epoch (also while a resumed iteration yields fewer)."""
        full, rest = divmod(self.num_samples, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1


class TensorBatchLoader(_EpochBatches):
    """Batches from tensors already in memory, by slicing: no per-sample collation.

    Shuffling draws a permutation from a generator seeded by ``(seed, epoch)``, so the order of
    any epoch is reproducible without replaying earlier epochs; call ``set_epoch`` before
    iterating, as with a DistributedSampler. In a distributed run ``batch_size`` is the global
    batch: every rank walks the same global batches and takes its ``rank``-th slice of each, so
    the ranks together see exactly the batches of a single-process run.
    """

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        num_samples = _common_length(tensors)
        super().__init__(num_samples, batch_size, shuffle, drop_last, seed, rank, world_size)
        self.tensors = tensors
        self.transform = transform

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = _epoch_order(self.num_samples, self.seed, self.epoch) if self.shuffle else None
        first, self._start = self._start, 0
        for i in range(first, len(self)):
            start = i * self.batch_size
            stop = min(start + self.batch_size, self.num_samples)
            if order is None and self.world_size == 1:
                batch = {k: t[start:stop] for k, t in self.tensors.items()}
            else:
                index = order[start:stop] if order is not None else torch.arange(start, stop)
                if self.world_size > 1:
                    index = index.tensor_split(self.world_size)[self.rank]
                batch = {k: t[index] for k, t in self.tensors.items()}
            yield batch if self.transform is None else self.transform(batch)


def _check_shard(batch_size: int, rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    if batch_size % world_size:
        raise ValueError(
            f"data.batch_size {batch_size} is the global batch and must divide evenly across "
            f"{world_size} processes (per process: {batch_size / world_size:g})"
        )


def shard(split: Any, rank: int, world_size: int) -> Any:
    """Rank ``rank``'s contiguous share of ``split`` (dict of tensors or Dataset): evaluation
    data is split once, each rank evaluates its share and the metric sums are reduced."""
    if world_size == 1 or split is None:
        return split
    n = len(next(iter(split.values()))) if isinstance(split, dict) else len(split)
    bounds = [n * r // world_size for r in range(world_size + 1)]
    lo, hi = bounds[rank], bounds[rank + 1]
    if isinstance(split, dict):
        return {k: v[lo:hi] for k, v in split.items()}
    from torch.utils.data import Subset

    return Subset(split, range(lo, hi))


# -- the torch Dataset path: resumable, with augmentation seeded per sample ---------------------

_MASK64 = (1 << 64) - 1
_BATCH_SALT = 0xBA7C4


def _derive(base: int, value: int) -> int:
    """A 64-bit seed from ``base`` and ``value`` (a splitmix64 finaliser): neighbouring values
    give unrelated seeds, and distinct values under one base give distinct seeds."""
    x = (base ^ (value * 0x9E3779B97F4A7C15)) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _seed_rngs(seed: int) -> None:
    """Seed torch's CPU RNG and python's ``random`` (not ``torch.manual_seed``, which would also
    reseed CUDA's generators)."""
    torch.default_generator.manual_seed(seed)
    random.seed(seed)


@contextlib.contextmanager
def _rngs_restored() -> Iterator[None]:
    """Restore torch's CPU RNG and python's ``random`` on exit, in the main process only.

    With ``num_workers=0`` the seeded loading runs in the training process, whose RNG must come
    out as it went in; a worker process has no state worth keeping, so it skips the cost."""
    if get_worker_info() is not None:
        yield
        return
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)


class SampleKey(NamedTuple):
    """Which sample to load, and the seed its random transforms draw from.

    Carrying the seed in the key keeps the worker-side dataset stateless, so augmentation does
    not depend on which worker loads a sample, or on how many samples came before it."""

    index: int
    seed: int


class ResumableBatchSampler(_EpochBatches, Sampler[list[SampleKey]]):
    """Batches of :class:`SampleKey` whose order and seeds are functions of ``(seed, epoch)``.

    The shuffle uses the same permutation as :class:`TensorBatchLoader`; the seed of the sample
    at position ``p`` of epoch ``e`` is derived from ``(seed, e, p)``. So ``set_epoch`` recreates
    any epoch, and ``start_at(k)`` begins at batch ``k`` without producing (and so without
    anyone loading) the batches before it.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        super().__init__(num_samples, batch_size, shuffle, drop_last, seed, rank, world_size)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        # Read the state here, at iter() time, rather than on the first next(): worker
        # prefetching (or a caller preparing the next epoch) may come between the two.
        first, self._start = self._start, 0
        if self.shuffle:
            order = _epoch_order(self.num_samples, self.seed, self.epoch).tolist()
        else:
            order = range(self.num_samples)
        base = _derive(_derive(0x5EED, self.seed), self.epoch)
        return self._batches(order, base, first)

    def _batches(self, order: Any, base: int, first: int) -> Iterator[list[SampleKey]]:
        size = self.batch_size
        for b in range(first, len(self)):
            stop = min((b + 1) * size, self.num_samples)
            positions = range(b * size, stop)
            if self.world_size > 1:  # this rank's slice of the global batch
                n = len(positions)
                lo = n * self.rank // self.world_size
                hi = n * (self.rank + 1) // self.world_size
                positions = positions[lo:hi]
            yield [SampleKey(order[p], _derive(base, p)) for p in positions]


class _SeededDataset(Dataset):
    """Loads ``dataset[key.index]`` with the RNG seeded from ``key.seed`` (per-sample random
    transforms inside ``__getitem__`` then draw the same numbers in any worker, on any resume);
    returns ``(seed, sample)`` so the collate can seed the batch transform too."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitems__(self, keys: list[SampleKey]) -> list[tuple[int, Any]]:
        # DataLoader fetches a whole batch through here: one save and restore per batch.
        samples = []
        with _rngs_restored():
            for index, seed in keys:
                _seed_rngs(seed)
                samples.append((seed, self.dataset[index]))
        return samples

    def __getitem__(self, key: SampleKey) -> tuple[int, Any]:
        return self.__getitems__([key])[0]


class _SeededCollate:
    """Default collation, then the batch transform seeded from the batch's first sample seed
    (itself a function of ``(seed, epoch, batch)``). Picklable, for worker processes."""

    def __init__(self, transform: Callable[[dict], dict] | None = None) -> None:
        self.transform = transform

    def __call__(self, items: list[tuple[int, Any]]) -> Any:
        batch = default_collate([sample for _, sample in items])
        if self.transform is None:
            return batch
        with _rngs_restored():
            _seed_rngs(_derive(items[0][0], _BATCH_SALT))
            return self.transform(batch)


class ResumableDataLoader(DataLoader):
    """A torch DataLoader that resumes mid-epoch sample-exactly, loading nothing it skips.

    Order, per-sample augmentation (random transforms in ``dataset.__getitem__``) and the batch
    ``transform`` are all functions of ``(seed, epoch, position)``: an epoch resumed with
    ``set_epoch(e); start_at(k)`` yields exactly batches ``k..`` of the uninterrupted epoch, with
    any ``num_workers``. Random transforms must draw from torch's global RNG or python's
    ``random`` (numpy's is not seeded). ``set_epoch``/``start_at`` act on the next ``iter()``.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        num_workers: int = 0,
        transform: Callable[[dict], dict] | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        num_samples = len(dataset)  # type: ignore[arg-type]
        sampler = ResumableBatchSampler(
            num_samples, batch_size, shuffle, drop_last, seed, rank, world_size
        )
        self._resumable_sampler = sampler
        if persistent_workers is None:
            persistent_workers = num_workers > 0
        super().__init__(
            _SeededDataset(dataset),
            batch_sampler=sampler,
            num_workers=num_workers,
            collate_fn=_SeededCollate(transform),
            pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
            persistent_workers=persistent_workers,
            # DataLoader draws its workers' base seed from this; without one it would draw from
            # (and so advance) the global RNG on every iter().
            generator=torch.Generator().manual_seed(seed),
        )
        # Given a batch sampler, DataLoader records batch_size=None and drop_last=False, and
        # guards them after __init__; record the real values, which the Trainer reads.
        object.__setattr__(self, "batch_size", batch_size)
        object.__setattr__(self, "drop_last", drop_last)

    def set_epoch(self, epoch: int) -> None:
        self._resumable_sampler.set_epoch(epoch)

    def start_at(self, batch: int) -> None:
        """Make the next iteration begin at batch ``batch`` of the current epoch, with the
        same order and augmentation as an uninterrupted epoch."""
        self._resumable_sampler.start_at(batch)


def _loader(
    split: Any,
    batch_size: int,
    shuffle: bool,
    drop_last: bool,
    seed: int,
    num_workers: int,
    transform: Callable[[dict], dict] | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Any:
    if isinstance(split, dict):
        return TensorBatchLoader(
            split, batch_size, shuffle, drop_last, seed, transform, rank, world_size
        )
    return ResumableDataLoader(
        split,
        batch_size,
        shuffle,
        drop_last,
        seed,
        num_workers=num_workers,
        transform=transform,
        rank=rank,
        world_size=world_size,
    )


def build_dataloaders(
    splits: DataSplits,
    batch_size: int,
    eval_batch_size: int | None = None,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[Any, Any]:
    """Train loader (shuffled, seeded) and eval loader (in order) for ``splits``.

    Batch sizes are global. With ``world_size`` > 1 the train loader yields this rank's slice
    of each global batch; the eval data is split into contiguous shares, evaluated in batches
    of ``eval_batch_size / world_size`` (rounded up)."""
    train = _loader(
        splits.train,
        batch_size,
        True,
        drop_last,
        seed,
        num_workers,
        splits.train_transform,
        rank,
        world_size,
    )
    eval_loader = None
    if splits.eval is not None:
        size = -(-(eval_batch_size or batch_size) // world_size)
        eval_loader = _loader(
            shard(splits.eval, rank, world_size),
            size,
            False,
            False,
            seed,
            num_workers,
            splits.eval_transform,
        )
    return train, eval_loader
