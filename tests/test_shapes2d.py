"""Shapes-2D: deterministic, cached, balanced, correctly transformed, and not trivial."""

import pytest
import torch

# The training whose wall-clock benchmarks/shapes2d_cnn.py measures; tests check its outcome.
from speedup.benchmarks.shapes2d_cnn import train_and_test
from torch.utils.data import DataLoader

from speedup.data import DATASETS
from speedup.data.shapes2d import (
    CLASS_NAMES,
    BatchToFloat,
    Shapes2DDataset,
    cache_path,
    generate_shapes2d,
    load_shapes2d,
    shapes2d,
)
from speedup.models.nets import MLP, SmallCNN2d


def test_generation_is_deterministic_and_seeded():
    a = generate_shapes2d(64, 32, seed=3)
    b = generate_shapes2d(64, 32, seed=3)
    assert torch.equal(a["inputs"], b["inputs"]) and torch.equal(a["targets"], b["targets"])
    c = generate_shapes2d(64, 32, seed=4)
    assert not torch.equal(a["inputs"], c["inputs"])
    test = generate_shapes2d(64, 32, seed=3, split="test")
    assert not torch.equal(a["inputs"], test["inputs"]), "splits use independent streams"


def test_cache_round_trip_is_exact_and_keyed_by_every_setting(tmp_path):
    settings = dict(resolution=32, num_classes=10, num_train=40, num_test=20, seed=1)
    train, test = load_shapes2d(**settings, cache_dir=tmp_path)
    files = list(tmp_path.glob("shapes2d-*.pt"))
    assert len(files) == 1
    assert torch.equal(train["inputs"], generate_shapes2d(40, 32, seed=1)["inputs"])
    assert torch.equal(test["inputs"], generate_shapes2d(20, 32, seed=1, split="test")["inputs"])
    cached_train, cached_test = load_shapes2d(**settings, cache_dir=tmp_path)
    assert torch.equal(cached_train["inputs"], train["inputs"])
    assert torch.equal(cached_test["targets"], test["targets"])
    loaded = torch.load(files[0], weights_only=True)
    assert torch.equal(loaded["train"]["inputs"], train["inputs"])
    load_shapes2d(**{**settings, "seed": 2}, cache_dir=tmp_path)
    load_shapes2d(**settings, difficulty=0.5, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("shapes2d-*.pt"))) == 3
    assert not list(tmp_path.glob("*.tmp")), "atomic write leaves no temp file"


def test_corrupt_cache_file_is_regenerated(tmp_path):
    settings = {
        "version": 1,
        "resolution": 32,
        "num_classes": 10,
        "num_train": 8,
        "num_test": 4,
        "seed": 0,
        "difficulty": 1.0,
    }
    path = cache_path(settings, tmp_path)
    path.write_bytes(b"not a checkpoint")
    train, _ = load_shapes2d(32, 10, 8, 4, 0, 1.0, cache_dir=tmp_path)
    assert torch.equal(train["inputs"], generate_shapes2d(8, 32)["inputs"])
    assert torch.load(path, weights_only=True)["train"]["inputs"].shape == (8, 3, 32, 32)


@pytest.mark.parametrize("resolution", [32, 64])
def test_shapes_and_dtypes(resolution):
    data = generate_shapes2d(30, resolution, num_classes=16)
    assert data["inputs"].shape == (30, 3, resolution, resolution)
    assert data["inputs"].dtype == torch.uint8
    assert data["targets"].dtype == torch.int64
    assert int(data["targets"].min()) >= 0 and int(data["targets"].max()) < 16
    assert data["inputs"].float().std() > 20, "images are not blank"


def test_other_resolutions_and_bad_arguments():
    assert generate_shapes2d(4, 96)["inputs"].shape == (4, 3, 96, 96)
    with pytest.raises(ValueError, match="num_classes"):
        generate_shapes2d(4, 32, num_classes=len(CLASS_NAMES) + 1)
    with pytest.raises(ValueError, match="resolution"):
        generate_shapes2d(4, 4)


def test_classes_are_exactly_balanced_and_shuffled():
    targets = generate_shapes2d(1003, 32, num_classes=12)["targets"]
    counts = torch.bincount(targets, minlength=12)
    assert int(counts.max() - counts.min()) <= 1 and int(counts.sum()) == 1003
    assert not torch.equal(targets[:24], torch.arange(24) % 12)


def test_registered_dataset_and_info(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEEDUP_CACHE", str(tmp_path))
    assert DATASETS.get("shapes2d") is shapes2d and shapes2d.kind == "image"
    splits = shapes2d(resolution=48, num_classes=14, num_train=28, num_test=14)
    assert splits.info.input_shape == (3, 48, 48) and splits.info.num_classes == 14
    assert splits.info.kind == "image"
    assert len(splits.train["targets"]) == 28 and len(splits.eval["targets"]) == 14
    assert list(tmp_path.glob("shapes2d-*.pt")), "honours $SPEEDUP_CACHE"


def test_flip_is_a_horizontal_flip_and_normalisation_inverts():
    images = generate_shapes2d(64, 32)["inputs"]
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    plain = BatchToFloat(mean, std)({"inputs": images})["inputs"]
    assert plain.dtype == torch.float32 and plain.shape == images.shape
    back = BatchToFloat(mean, std).denormalize(plain)
    assert torch.allclose(back, images.float() / 255.0, atol=1e-6)
    torch.manual_seed(0)
    flipped = BatchToFloat(mean, std, flip=True)({"inputs": images})["inputs"]
    is_flip = torch.tensor([torch.equal(f, p.flip(-1)) for f, p in zip(flipped, plain)])
    is_same = torch.tensor([torch.equal(f, p) for f, p in zip(flipped, plain)])
    assert bool((is_flip | is_same).all()), "each image is either flipped or untouched"
    assert 10 < int(is_flip.sum()) < 54, "about half the images are flipped"
    torch.manual_seed(0)
    again = BatchToFloat(mean, std, flip=True)({"inputs": images})["inputs"]
    assert torch.equal(flipped, again), "flips come from torch's global RNG"
    single = BatchToFloat(mean, std)({"inputs": images[0]})["inputs"]
    assert torch.equal(single, plain[0])


def test_dataset_view_through_a_dataloader(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEEDUP_CACHE", str(tmp_path))
    splits = shapes2d(num_train=20, num_test=10)
    view = Shapes2DDataset(splits.train)
    assert len(view) == 20
    sample = view[3]
    assert torch.equal(sample["inputs"], splits.train["inputs"][3])
    assert int(sample["targets"]) == int(splits.train["targets"][3])
    loader = DataLoader(
        Shapes2DDataset(splits.eval), batch_size=4, collate_fn=_collate(splits.eval_transform)
    )
    batch = next(iter(loader))
    expected = splits.eval_transform({k: v[:4] for k, v in splits.eval.items()})
    assert torch.equal(batch["inputs"], expected["inputs"])
    transformed = Shapes2DDataset(splits.eval, splits.eval_transform)[0]
    assert torch.equal(transformed["inputs"], expected["inputs"][0])


def _collate(transform):
    from torch.utils.data import default_collate

    return lambda samples: transform(default_collate(samples))


def _splits(tmp_path, monkeypatch, num_train, num_test):
    monkeypatch.setenv("SPEEDUP_CACHE", str(tmp_path))
    return shapes2d(num_train=num_train, num_test=num_test)


def test_pixels_alone_do_not_solve_it_but_a_small_cnn_learns(tmp_path, monkeypatch):
    """Logistic regression on pixels stays near chance (measured 11.5%); a small CNN trained
    for ten short epochs is far above it (measured 44%): the classes live in spatial structure,
    not in colour statistics."""
    splits = _splits(tmp_path, monkeypatch, num_train=4000, num_test=500)
    torch.manual_seed(0)
    linear = train_and_test(MLP(3 * 32 * 32, 10, ()), splits, epochs=4, lr=3e-3, batch_size=64)
    torch.manual_seed(0)
    cnn = train_and_test(SmallCNN2d(3, 10, channels=8), splits, epochs=10, lr=6e-3, batch_size=64)
    assert linear < 0.2, f"logistic regression on pixels: {linear:.3f} (chance 0.1)"
    assert cnn > max(0.3, linear + 0.2), f"small CNN {cnn:.3f} vs logistic {linear:.3f}"


@pytest.mark.slow
def test_small_cnn_reaches_measured_accuracy(tmp_path, monkeypatch):
    """SmallCNN (16 channels), 15 epochs of the default 10k images: measured 83.2% test
    accuracy; assert 78%, and that the task is not saturated. How long it takes (37 s of
    training on 2 CPU cores, bound 6 minutes) is measured by benchmarks/shapes2d_cnn.py."""
    splits = _splits(tmp_path, monkeypatch, num_train=10000, num_test=2000)
    torch.manual_seed(0)
    accuracy = train_and_test(SmallCNN2d(3, 10, channels=16), splits, epochs=15, lr=3e-3)
    assert 0.78 <= accuracy < 0.99, f"accuracy {accuracy:.3f}"
