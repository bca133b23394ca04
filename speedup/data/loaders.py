"""Dataloaders: a fast in-memory batch loader, and the bridge to torch's DataLoader."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

__all__ = ["DataInfo", "DataSplits", "TensorBatchLoader", "TensorDictDataset", "build_dataloaders"]


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


class TensorBatchLoader:
    """Batches from tensors already in memory, by slicing: no per-sample collation.

    Shuffling draws a permutation from a generator seeded by ``(seed, epoch)``, so the order of
    any epoch is reproducible without replaying earlier epochs; call ``set_epoch`` before
    iterating, as with a DistributedSampler.
    """

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    ) -> None:
        self.tensors = tensors
        self.num_samples = _common_length(tensors)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.transform = transform
        self.epoch = 0
        self._start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def start_at(self, batch: int) -> None:
        """Make the next iteration begin at batch ``batch`` of the current epoch, with the
        same order as an uninterrupted epoch (sample-exact resume, nothing replayed)."""
        self._start = batch

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = None
        first, self._start = self._start, 0
        for i in range(first, len(self)):
            start = i * self.batch_size
            stop = min(start + self.batch_size, self.num_samples)
            if order is None:
                batch = {k: t[start:stop] for k, t in self.tensors.items()}
            else:
                index = order[start:stop]
                batch = {k: t[index] for k, t in self.tensors.items()}
            yield batch if self.transform is None else self.transform(batch)


class _CollateThen:
    """Default collation followed by a batch transform (picklable, for worker processes)."""

    def __init__(self, transform: Callable[[dict], dict]) -> None:
        self.transform = transform

    def __call__(self, samples: list) -> dict:
        return self.transform(default_collate(samples))


def _loader(
    split: Any,
    batch_size: int,
    shuffle: bool,
    drop_last: bool,
    seed: int,
    num_workers: int,
    transform: Callable[[dict], dict] | None = None,
) -> Any:
    if isinstance(split, dict):
        return TensorBatchLoader(split, batch_size, shuffle, drop_last, seed, transform)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        split,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        generator=generator,
        collate_fn=_CollateThen(transform) if transform else None,
    )


def build_dataloaders(
    splits: DataSplits,
    batch_size: int,
    eval_batch_size: int | None = None,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = True,
) -> tuple[Any, Any]:
    """Train loader (shuffled, seeded) and eval loader (in order) for ``splits``."""
    train = _loader(
        splits.train, batch_size, True, drop_last, seed, num_workers, splits.train_transform
    )
    eval_loader = None
    if splits.eval is not None:
        size = eval_batch_size or batch_size
        eval_loader = _loader(
            splits.eval, size, False, False, seed, num_workers, splits.eval_transform
        )
    return train, eval_loader
