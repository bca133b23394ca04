"""Real image loaders on real file formats written here: ImageFolder PNG trees, CIFAR pickles."""

import pickle
import socket
import tarfile
import threading

import numpy as np
import pytest
import torch

import speedup.data.vision as vision
from speedup.data import DATASETS, DataPathError, build_dataloaders

CLASSES = ["cat", "dog", "emu"]


def write_image_tree(root, per_class=(6, 2), size=40):
    """root/train/<class>/*.png and root/val/<class>/*.png; class i is tinted channel i."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val"), per_class):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
                pixels[..., label] = 255
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory):
    return write_image_tree(tmp_path_factory.mktemp("images"))


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("name", ["imagenet", "image_folder"])
def test_image_folder_batches(image_tree, name, num_workers):
    splits = DATASETS.get(name)(root=str(image_tree), train_resolution=32, eval_resolution=24)
    assert DATASETS.get(name).kind == "image"
    assert splits.info.num_classes == 3 and splits.info.input_shape == (3, 32, 32)
    assert len(splits.train) == 18 and len(splits.eval) == 6
    train, evaluation = build_dataloaders(splits, batch_size=6, num_workers=num_workers)
    batches = list(train)
    assert len(batches) == 3
    for batch in batches:
        assert batch["inputs"].shape == (6, 3, 32, 32) and batch["inputs"].dtype == torch.float32
        assert batch["targets"].dtype == torch.int64
    labels = torch.cat([b["targets"] for b in batches])
    assert sorted(labels.tolist()) == [0] * 6 + [1] * 6 + [2] * 6
    eval_batch = next(iter(evaluation))
    assert eval_batch["inputs"].shape == (6, 3, 24, 24)
    assert eval_batch["targets"].tolist() == [0, 0, 1, 1, 2, 2]  # in order, train's indices
    # Normalised with ImageNet statistics: the tinted channel sits at (1 - mean) / std.
    x, y = eval_batch["inputs"], eval_batch["targets"]
    for i, label in enumerate(y.tolist()):
        top = (1 - vision.IMAGENET_MEAN[label]) / vision.IMAGENET_STD[label]
        assert x[i, label].max() == pytest.approx(top, abs=1e-4)
    low = min(-m / s for m, s in zip(vision.IMAGENET_MEAN, vision.IMAGENET_STD))
    high = max((1 - m) / s for m, s in zip(vision.IMAGENET_MEAN, vision.IMAGENET_STD))
    assert low - 1e-4 <= float(x.min()) < -1.5 and 2.0 < float(x.max()) <= high + 1e-4
    assert abs(float(x.mean())) < 1.0  # random pixels: roughly centred


def test_image_folder_eval_pipeline_resizes_then_center_crops(image_tree):
    from PIL import Image

    splits = DATASETS.get("image_folder")(root=str(image_tree), eval_resolution=28)
    sample = splits.eval[0]
    assert sample["targets"] == 0 and sample["inputs"].shape == (3, 28, 28)
    # same as doing it by hand: short side to round(28 / 0.875) = 32, then the center 28x28
    with Image.open(splits.eval.samples[0][0]) as image:
        rgb = image.convert("RGB")
    from torchvision.transforms import functional as TF

    expected = TF.normalize(
        TF.to_tensor(TF.center_crop(TF.resize(rgb, 32, antialias=True), 28)),
        vision.IMAGENET_MEAN,
        vision.IMAGENET_STD,
    )
    assert torch.allclose(sample["inputs"], expected)


def test_image_folder_custom_dirs_and_no_eval(tmp_path):
    write_image_tree(tmp_path)
    (tmp_path / "train").rename(tmp_path / "fit")
    splits = DATASETS.get("image_folder")(root=str(tmp_path), train_dir="fit", val_dir=None)
    assert splits.eval is None and len(splits.train) == 18


def test_image_folder_missing_paths_name_the_path_and_layout(tmp_path):
    with pytest.raises(DataPathError) as err:
        DATASETS.get("imagenet")(root=str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(err.value) and "<class>" in str(err.value)
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataPathError) as err:
        DATASETS.get("imagenet")(root=str(tmp_path))
    assert str(tmp_path / "val") in str(err.value) and "ImageFolder layout" in str(err.value)
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(DataPathError, match="no images found"):
        DATASETS.get("image_folder")(root=str(tmp_path))


# -- CIFAR-10 -------------------------------------------------------------------------------

LABEL_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer"]
LABEL_NAMES += [b"dog", b"frog", b"horse", b"ship", b"truck"]


def write_cifar(root, per_batch=4, test=6):
    """The official python layout: pickled dicts, b"data" uint8 [N, 3072] (R, G, B planes)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        entry = {b"batch_label": name.encode(), b"labels": labels, b"data": data}
        entry[b"filenames"] = [f"{name}_{i}.png".encode() for i in range(n)]
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
        written[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        meta = {b"label_names": LABEL_NAMES, b"num_cases_per_batch": per_batch}
        pickle.dump(meta, f)
    return written


def test_cifar10_reads_the_official_layout_value_for_value(tmp_path):
    written = write_cifar(tmp_path)
    splits = DATASETS.get("cifar10")(root=str(tmp_path))
    assert DATASETS.get("cifar10").kind == "image"
    assert splits.info.input_shape == (3, 32, 32) and splits.info.num_classes == 10
    train, test = splits.train, splits.eval
    assert train["inputs"].dtype == torch.uint8 and train["inputs"].shape == (20, 3, 32, 32)
    assert train["targets"].dtype == torch.int64
    train_data = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert train["targets"].tolist() == train_labels
    # pixel (c, y, x) of image n is data[n, c * 1024 + y * 32 + x]
    assert train["inputs"][5, 1, 2, 3].item() == train_data[5, 1024 + 2 * 32 + 3]
    assert np.array_equal(train["inputs"].reshape(20, -1).numpy(), train_data)
    data, labels = written["test_batch"]
    assert np.array_equal(test["inputs"].reshape(6, -1).numpy(), data)
    assert test["targets"].tolist() == labels

    # eval transform: normalise only; un-normalising gives back the pixels
    out = splits.eval_transform({k: v[:4] for k, v in test.items()})
    assert out["inputs"].dtype == torch.float32 and out["targets"].tolist() == labels[:4]
    mean = torch.tensor(vision.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(vision.CIFAR10_STD).view(1, 3, 1, 1)
    restored = out["inputs"] * std + mean
    assert torch.allclose(restored, test["inputs"][:4].float() / 255, atol=1e-5, rtol=0)
    assert torch.equal((restored * 255).round().to(torch.uint8), test["inputs"][:4])


def test_cifar10_train_transform_crops_with_padding_and_flips(tmp_path):
    write_cifar(tmp_path)
    splits = DATASETS.get("cifar10")(root=str(tmp_path))
    transform = splits.train_transform
    images = splits.train["inputs"]
    torch.manual_seed(0)
    first = transform({"inputs": images, "targets": splits.train["targets"]})
    torch.manual_seed(0)
    again = transform({"inputs": images, "targets": splits.train["targets"]})
    assert torch.equal(first["inputs"], again["inputs"])  # global RNG: seeding reproduces it
    assert first["inputs"].shape == (20, 3, 32, 32) and first["inputs"].dtype == torch.float32
    # every output is the padded image cropped at some offset, maybe mirrored
    mean = torch.tensor(vision.CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(vision.CIFAR10_STD).view(3, 1, 1)
    pixels = ((first["inputs"] * std + mean) * 255).round().to(torch.uint8)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    moved = 0
    for n in range(20):
        candidates = [
            view
            for dy in range(9)
            for dx in range(9)
            for view in (padded[n, :, dy : dy + 32, dx : dx + 32],)
            for view in (view, view.flip(-1))
        ]
        assert any(torch.equal(pixels[n], c) for c in candidates)
        moved += not torch.equal(pixels[n], images[n])
    assert moved >= 15  # 1 in 162 placements is the identity
    plain = DATASETS.get("cifar10")(root=str(tmp_path), augment=False).train_transform
    assert torch.equal(
        plain({"inputs": images})["inputs"], splits.eval_transform({"inputs": images})["inputs"]
    )


def test_cifar10_through_the_loaders(tmp_path):
    write_cifar(tmp_path)
    splits = DATASETS.get("cifar10")(root=str(tmp_path))
    train, evaluation = build_dataloaders(splits, batch_size=8, eval_batch_size=4)
    batches = list(train)
    assert len(batches) == 2 and batches[0]["inputs"].dtype == torch.float32
    assert [b["inputs"].shape[0] for b in evaluation] == [4, 2]


def test_cifar10_extracts_a_local_archive(tmp_path):
    source = tmp_path / "source"
    written = write_cifar(source)
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    splits = DATASETS.get("cifar10")(root=str(root))
    assert splits.eval["targets"].tolist() == written["test_batch"][1]


def test_cifar10_missing_files_say_where_to_put_them(tmp_path):
    with pytest.raises(DataPathError) as err:
        DATASETS.get("cifar10")(root=str(tmp_path / "cifar"))
    message = str(err.value)
    assert str(tmp_path / "cifar" / "cifar-10-python.tar.gz") in message
    assert str(tmp_path / "cifar" / "cifar-10-batches-py") in message
    assert "download" in message


def test_cifar10_download_offline_fails_after_one_bounded_probe_without_downloading(
    tmp_path, monkeypatch
):
    # Fails fast: one connection attempt, with a timeout, and no download started. How long
    # that takes on this machine is measured by benchmarks/fail_fast.py.
    probes = []

    def unreachable(address, timeout=None, *args, **kwargs):
        probes.append((address, timeout))
        raise OSError(101, "Network is unreachable")

    def download(*args, **kwargs):
        pytest.fail("a download was started")

    import torchvision.datasets.utils

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", download)
    with pytest.raises(DataPathError) as err:
        DATASETS.get("cifar10")(root=str(tmp_path), download=True)
    assert probes == [(("www.cs.toronto.edu", 443), 3.0)]
    message = str(err.value)
    assert "cannot download CIFAR-10" in message and "unreachable" in message
    assert "Network is unreachable" in message
    assert str(tmp_path / "cifar-10-python.tar.gz") in message


def test_the_reachability_probe_gives_up_on_a_connect_that_never_returns(monkeypatch):
    # A DNS lookup can ignore the socket timeout: the probe must answer anyway.
    release = threading.Event()

    def hanging(address, timeout=None, *args, **kwargs):
        release.wait()
        raise OSError("released")

    monkeypatch.setattr(socket, "create_connection", hanging)
    try:
        reason = vision._online("cifar.example", timeout=0.01)
    finally:
        release.set()
    assert reason is not None and reason.startswith("no answer from cifar.example within")
