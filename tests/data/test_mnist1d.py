"""Procedural MNIST-1D: determinism, cache, file loader, and task difficulty."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from speedup.data.mnist1d import generate_mnist1d, load_mnist1d, load_mnist1d_file
from speedup.models.nets import MLP, Conv1dNet


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype
        assert torch.equal(a[key], b[key]), key


def test_shapes_and_dtypes() -> None:
    data = generate_mnist1d(num_samples=250, length=40, seed=3)
    assert set(data) == {"inputs", "targets"}
    assert data["inputs"].shape == (250, 1, 40)
    assert data["inputs"].dtype == torch.float32
    assert data["targets"].shape == (250,)
    assert data["targets"].dtype == torch.int64
    assert torch.isfinite(data["inputs"]).all()
    assert data["inputs"].is_contiguous()
    assert generate_mnist1d(num_samples=20, length=72)["inputs"].shape == (20, 1, 72)


def test_classes_balanced_and_shuffled() -> None:
    targets = generate_mnist1d(num_samples=1000, seed=0)["targets"]
    assert torch.equal(torch.bincount(targets, minlength=10), torch.full((10,), 100))
    assert not torch.equal(targets, torch.arange(1000) % 10)
    counts = torch.bincount(generate_mnist1d(num_samples=1005)["targets"], minlength=10)
    assert counts.sum() == 1005 and counts.max() - counts.min() <= 1


def test_same_settings_give_identical_tensors() -> None:
    _assert_same(generate_mnist1d(500, seed=7), generate_mnist1d(500, seed=7))


def test_different_seed_or_noise_differs() -> None:
    a = generate_mnist1d(200, seed=0)
    b = generate_mnist1d(200, seed=1)
    assert not torch.equal(a["inputs"], b["inputs"])
    assert not torch.equal(a["targets"], b["targets"])
    c = generate_mnist1d(200, seed=0, noise=0.0)
    assert torch.equal(a["targets"], c["targets"])
    assert not torch.equal(a["inputs"], c["inputs"])


def test_noise_free_samples_follow_their_template() -> None:
    # Without noise (shear, width, amplitude, offset and shift still random), a sample's
    # nearest neighbour under circular cross-correlation is mostly of its own class
    # (measured 0.71; chance is 0.1): the templates are distinct.
    data = generate_mnist1d(400, noise=0.0, seed=0)
    x = data["inputs"][:, 0].double().numpy()
    y = data["targets"].numpy()
    x = x - x.mean(1, keepdims=True)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    # max circular cross-correlation between every pair, via FFT
    f = np.fft.rfft(x, axis=1)
    corr = np.fft.irfft(f[:, None, :] * np.conj(f[None, :, :]), n=x.shape[1], axis=2).max(2)
    np.fill_diagonal(corr, -np.inf)
    nearest = corr.argmax(1)
    assert (y[nearest] == y).mean() > 0.55


def test_cache_roundtrip_identical(tmp_path: Path) -> None:
    train, test = load_mnist1d(num_train=300, num_test=100, seed=5, cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1
    assert files[0].name.startswith("mnist1d-") and files[0].suffix == ".pt"
    assert train["inputs"].shape == (300, 1, 40) and test["inputs"].shape == (100, 1, 40)

    # Split of one generated set, in order.
    full = generate_mnist1d(400, seed=5)
    _assert_same(train, {k: v[:300] for k, v in full.items()})
    _assert_same(test, {k: v[300:] for k, v in full.items()})

    # Second call loads from the cache (no regeneration) and gives identical tensors.
    mtime = files[0].stat().st_mtime_ns
    train2, test2 = load_mnist1d(num_train=300, num_test=100, seed=5, cache_dir=tmp_path)
    assert files[0].stat().st_mtime_ns == mtime
    _assert_same(train, train2)
    _assert_same(test, test2)
    assert torch.load(files[0], weights_only=True).keys() == {"inputs", "targets"}


def test_cache_is_used_and_keyed_by_settings(tmp_path: Path) -> None:
    train, _ = load_mnist1d(num_train=50, num_test=10, seed=0, cache_dir=tmp_path)
    (path,) = tmp_path.iterdir()
    # Tamper with the cached file: a cache hit must return the stored tensors.
    stored = torch.load(path, weights_only=True)
    torch.save({k: v.clone() for k, v in stored.items()} | {"inputs": stored["inputs"] + 1}, path)
    cached, _ = load_mnist1d(num_train=50, num_test=10, seed=0, cache_dir=tmp_path)
    assert torch.equal(cached["inputs"], train["inputs"] + 1)

    load_mnist1d(num_train=50, num_test=10, seed=1, cache_dir=tmp_path)
    load_mnist1d(num_train=50, num_test=10, seed=0, noise=0.5, cache_dir=tmp_path)
    load_mnist1d(num_train=40, num_test=20, seed=0, cache_dir=tmp_path)  # same total, same set
    load_mnist1d(num_train=50, num_test=10, length=30, seed=0, cache_dir=tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 4, names
    assert not [n for n in names if n.endswith(".tmp")]


def test_corrupt_cache_is_regenerated(tmp_path: Path) -> None:
    train, _ = load_mnist1d(num_train=30, num_test=10, seed=2, cache_dir=tmp_path)
    (path,) = tmp_path.iterdir()
    path.write_bytes(b"not a torch file")
    again, _ = load_mnist1d(num_train=30, num_test=10, seed=2, cache_dir=tmp_path)
    _assert_same(train, again)
    assert torch.load(path, weights_only=True)["inputs"].shape == (40, 1, 40)


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPEEDUP_CACHE", str(tmp_path / "env-cache"))
    load_mnist1d(num_train=20, num_test=10)
    assert len(list((tmp_path / "env-cache").glob("mnist1d-*.pt"))) == 1


def test_file_loader_reads_original_pickle(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    raw = {
        "x": rng.standard_normal((30, 40)),
        "y": rng.integers(0, 10, 30),
        "x_test": rng.standard_normal((12, 40)),
        "y_test": rng.integers(0, 10, 12),
        "t": np.linspace(-5, 5, 40),
        "templates": {},
    }
    path = tmp_path / "mnist1d_data.pkl"
    with open(path, "wb") as f:
        pickle.dump(raw, f)
    train, test = load_mnist1d_file(path)
    assert train["inputs"].shape == (30, 1, 40) and train["inputs"].dtype == torch.float32
    assert test["inputs"].shape == (12, 1, 40)
    assert train["targets"].dtype == torch.int64 and test["targets"].shape == (12,)
    assert torch.allclose(train["inputs"][:, 0].double(), torch.from_numpy(raw["x"]), atol=1e-6)
    assert torch.equal(test["targets"], torch.from_numpy(raw["y_test"]).long())


def test_file_loader_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "mnist1d_data.pkl"
    with pytest.raises(FileNotFoundError) as info:
        load_mnist1d_file(path)
    assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_mnist1d_file(str(path))


def test_file_loader_rejects_other_pickles(tmp_path: Path) -> None:
    path = tmp_path / "other.pkl"
    with open(path, "wb") as f:
        pickle.dump({"x": np.zeros((2, 40))}, f)
    with pytest.raises(KeyError, match="y_test"):
        load_mnist1d_file(path)


def _fit(model: torch.nn.Module, train: dict, test: dict, steps: int, lr: float) -> float:
    """Adam on random minibatches of 256; returns test accuracy."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    x, y = train["inputs"], train["targets"]
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (256,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (model(test["inputs"]).argmax(1) == test["targets"]).float().mean().item()


def test_cnn_learns_and_task_is_not_trivial(tmp_path: Path) -> None:
    # Measured (seed 0): Conv1dNet 600 steps -> 0.912; logistic regression 400 steps -> 0.317.
    train, test = load_mnist1d(seed=0, cache_dir=tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is as fast, and robust on busy machines
    try:
        start = time.perf_counter()
        torch.manual_seed(0)
        cnn_acc = _fit(Conv1dNet(), train, test, steps=600, lr=1e-2)
        torch.manual_seed(0)
        linear_acc = _fit(MLP(40, 10, widths=()), train, test, steps=400, lr=1e-2)
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    assert cnn_acc > 0.85, (cnn_acc, elapsed)
    assert linear_acc < 0.5, linear_acc
    assert cnn_acc - linear_acc > 0.35, (cnn_acc, linear_acc)
