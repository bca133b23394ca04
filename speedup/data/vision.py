"""Real image datasets: ImageNet and any ImageFolder tree, and CIFAR-10 in its python layout.

Nothing here downloads unless asked (``cifar10(download=True)``), and an offline machine
fails in seconds with a message saying which file to put where. torchvision and PIL are
imported inside the functions that need them, so that importing this module stays fast.
"""

from __future__ import annotations

import os
import pickle
import socket
import tarfile
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset

from speedup.data.loaders import DataInfo, DataSplits
from speedup.data.registry import DATASETS
from speedup.errors import DataPathError

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CifarBatchTransform",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolderDataset",
    "read_cifar10",
]

#: Per-channel statistics of the ImageNet-1k training set, as used by torchvision's models.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Per-channel mean and standard deviation of the 50,000 CIFAR-10 training images.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# -- ImageFolder trees ----------------------------------------------------------------------

_FOLDER_LAYOUT = (
    "expected the ImageFolder layout: {root}/{train}/<class>/<image> and "
    "{root}/{val}/<class>/<image> (JPEG or PNG), with the same class folder names in both"
)


class ImageFolderDataset(Dataset):
    """Images under ``root/<class>/``, yielding ``{"inputs": transform(image), "targets": i}``.

    Classes are the sorted sub-folder names, or ``class_to_idx`` when given, so that a
    validation folder missing a class still uses the training split's label indices.
    """

    def __init__(
        self,
        root: str,
        transform: Callable[[Any], torch.Tensor],
        class_to_idx: dict[str, int] | None = None,
    ) -> None:
        self.root = root
        self.transform = transform
        folders = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if class_to_idx is None:
            class_to_idx = {name: i for i, name in enumerate(folders)}
        unknown = [name for name in folders if name not in class_to_idx]
        if unknown:
            raise DataPathError(
                f"{root}: class folder(s) {', '.join(unknown[:5])} are not in the training "
                "split; the train and val folders must use the same class names"
            )
        self.class_to_idx = class_to_idx
        self.samples: list[tuple[str, int]] = []
        for name in folders:
            folder = os.path.join(root, name)
            files = sorted(
                e.name
                for e in os.scandir(folder)
                if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
            )
            label = class_to_idx[name]
            self.samples.extend((os.path.join(folder, f), label) for f in files)
        if not self.samples:
            raise DataPathError(
                f"{root}: no images found; put images in class sub-folders "
                f"({root}/<class>/<image>, extensions {', '.join(IMAGE_EXTENSIONS)})"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        return {"inputs": self.transform(rgb), "targets": label}


def imagenet_transforms(
    train_resolution: int = 224,
    eval_resolution: int = 224,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> tuple[Callable, Callable]:
    """The standard ImageNet pipelines (as in torchvision's reference scripts).

    Train: RandomResizedCrop (scale 0.08-1) + horizontal flip. Eval: resize the short side to
    ``eval_resolution / 0.875`` (256 for 224) and center-crop. Both normalise.
    """
    from torchvision import transforms as T

    normalize = [T.ToTensor(), T.Normalize(mean, std)]
    train = T.Compose(
        [T.RandomResizedCrop(train_resolution, antialias=True), T.RandomHorizontalFlip()]
        + normalize
    )
    resize = round(eval_resolution / 0.875)
    evaluate = T.Compose(
        [T.Resize(resize, antialias=True), T.CenterCrop(eval_resolution)] + normalize
    )
    return train, evaluate


def _folder_splits(
    root: str, train_dir: str, val_dir: str | None, train_resolution: int, eval_resolution: int
) -> DataSplits:
    layout = _FOLDER_LAYOUT.format(root=root, train=train_dir, val=val_dir or "val")
    if not os.path.isdir(root):
        raise DataPathError(f"data.root: {root!r} does not exist; {layout}")
    for sub in (train_dir, val_dir):
        if sub is not None and not os.path.isdir(os.path.join(root, sub)):
            raise DataPathError(f"data.root: {os.path.join(root, sub)!r} does not exist; {layout}")
    train_tf, eval_tf = imagenet_transforms(train_resolution, eval_resolution)
    train = ImageFolderDataset(os.path.join(root, train_dir), train_tf)
    val = None
    if val_dir is not None:
        val = ImageFolderDataset(os.path.join(root, val_dir), eval_tf, train.class_to_idx)
    info = DataInfo(
        kind="image",
        input_shape=(3, train_resolution, train_resolution),
        num_classes=len(train.class_to_idx),
    )
    return DataSplits(train, val, info)


@DATASETS.register("imagenet", kind="image")
def imagenet(
    root: str = "/data/imagenet", train_resolution: int = 224, eval_resolution: int = 224
) -> DataSplits:
    """ImageNet-1k (ILSVRC 2012) in ImageFolder layout: ``root/train/<wnid>/*.JPEG`` and
    ``root/val/<wnid>/*.JPEG`` (the validation images sorted into class folders, as torchvision's
    and most reference scripts expect). Decoding happens per sample, so set
    ``data.num_workers``."""
    return _folder_splits(root, "train", "val", train_resolution, eval_resolution)


@DATASETS.register("image_folder", kind="image")
def image_folder(
    root: str,
    train_dir: str = "train",
    val_dir: str | None = "val",
    train_resolution: int = 224,
    eval_resolution: int = 224,
) -> DataSplits:
    """Any ImageFolder tree (``root/<train_dir>/<class>/<image>``), with ImageNet's
    transforms and statistics; ``val_dir: null`` trains without an eval split."""
    return _folder_splits(root, train_dir, val_dir, train_resolution, eval_resolution)


# -- CIFAR-10 -------------------------------------------------------------------------------

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"


def _unpickle(path: str) -> dict:
    # pickle can run code while loading: these are the official CIFAR files (or files the user
    # put there), trusted local data, exactly as the dataset's own README says to read them.
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _read_batches(folder: str, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    images, labels = [], []
    for name in names:
        entry = _unpickle(os.path.join(folder, name))
        data = torch.as_tensor(entry[b"data"], dtype=torch.uint8)
        images.append(data.reshape(-1, 3, 32, 32))  # rows are R(1024) G(1024) B(1024)
        labels.append(torch.as_tensor(entry[b"labels"], dtype=torch.int64))
    return {"inputs": torch.cat(images), "targets": torch.cat(labels)}


def read_cifar10(folder: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list]:
    """Train and test tensors (uint8 ``[N, 3, 32, 32]``, int64 labels) and the label names
    from an extracted ``cifar-10-batches-py`` folder."""
    train = _read_batches(folder, CIFAR10_TRAIN_FILES)
    test = _read_batches(folder, (CIFAR10_TEST_FILE,))
    names = [f"class_{i}" for i in range(10)]
    meta = os.path.join(folder, "batches.meta")
    if os.path.exists(meta):
        names = [n.decode() if isinstance(n, bytes) else n for n in _unpickle(meta)[b"label_names"]]
    return train, test, names


def _online(host: str, port: int = 443, timeout: float = 3.0) -> str | None:
    """None when ``host`` accepts a connection within ``timeout`` seconds, else the reason.

    The probe runs in a daemon thread so that a hanging DNS lookup (which ignores socket
    timeouts) cannot hold us past ``timeout`` either."""
    result: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as err:
            result.append(f"{type(err).__name__}: {err}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return result[0] if result else f"no answer from {host} within {timeout:.0f} s"


def _extract(archive: str, root: str) -> None:
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(root, filter="data")  # "data" refuses absolute paths and links out


def _download_cifar10(root: str, where: str) -> None:
    host = CIFAR10_URL.split("/")[2]
    reason = _online(host)
    if reason is not None:
        raise DataPathError(
            f"data.download: cannot download CIFAR-10, {host} is unreachable ({reason}); {where}"
        )
    from torchvision.datasets.utils import download_and_extract_archive

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # a stalled transfer fails instead of hanging
    try:
        download_and_extract_archive(
            CIFAR10_URL, root, filename=CIFAR10_ARCHIVE, md5=CIFAR10_ARCHIVE_MD5
        )
    finally:
        socket.setdefaulttimeout(previous)


def _find_cifar10(root: str, download: bool) -> str:
    folder = os.path.join(root, CIFAR10_FOLDER)
    needed = [os.path.join(folder, n) for n in (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE)]
    if all(os.path.isfile(p) for p in needed):
        return folder
    archive = os.path.join(root, CIFAR10_ARCHIVE)
    where = (
        f"put {CIFAR10_ARCHIVE} (from {CIFAR10_URL}) at {archive}, or its extracted folder at "
        f"{folder} (data_batch_1..5, test_batch, batches.meta)"
    )
    if os.path.isfile(archive):
        _extract(archive, root)
    elif download:
        _download_cifar10(root, where)
    missing = [p for p in needed if not os.path.isfile(p)]
    if missing:
        hint = "" if download else "; or set data.download=true on a machine with network"
        raise DataPathError(
            f"data.root: CIFAR-10 not found ({missing[0]} is missing); {where}{hint}"
        )
    return folder


class CifarBatchTransform:
    """uint8 image batch -> normalised float32, optionally after the standard augmentation.

    The augmentation (He et al. 2016, section 4.2) pads 4 zero pixels on each side, takes a
    random 32x32 crop and flips half the images horizontally, per sample, with randomness from
    torch's global RNG (so seeding and resume reproduce it). It runs on the whole batch at
    once by gather indexing: no per-image Python loop.
    """

    def __init__(
        self,
        augment: bool,
        mean: tuple[float, ...] = CIFAR10_MEAN,
        std: tuple[float, ...] = CIFAR10_STD,
        padding: int = 4,
    ) -> None:
        self.augment = augment
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.padding = padding

    def _crop_and_flip(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        p = self.padding
        padded = torch.nn.functional.pad(x, (p, p, p, p)).permute(0, 2, 3, 1)  # N, H, W, C
        offsets = torch.randint(0, 2 * p + 1, (n, 2))
        rows = offsets[:, :1] + torch.arange(h)  # [N, h]
        cols = offsets[:, 1:] + torch.arange(w)  # [N, w]
        flip = torch.rand(n) < 0.5
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        batch = torch.arange(n)[:, None, None]
        crops = padded[batch, rows[:, :, None], cols[:, None, :]]  # [N, h, w, C]
        return crops.permute(0, 3, 1, 2)

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch["inputs"]
        if self.augment:
            x = self._crop_and_flip(x)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        x = (x - self.mean) / self.std
        return {**batch, "inputs": x.contiguous()}


@DATASETS.register("cifar10", kind="image")
def cifar10(root: str = "data/cifar10", download: bool = False, augment: bool = True) -> DataSplits:
    """CIFAR-10 (Krizhevsky 2009): 50,000 training and 10,000 test 32x32 images, 10 classes.

    Reads the official python layout ``root/cifar-10-batches-py/`` (or extracts
    ``root/cifar-10-python.tar.gz``) into uint8 tensors in memory; batches are normalised
    (and, with ``augment``, cropped and flipped) per batch. The batch files are read directly
    rather than through torchvision's CIFAR10 class, which insists on the official MD5 sums.
    """
    train, test, names = read_cifar10(_find_cifar10(root, download))
    info = DataInfo(kind="image", input_shape=(3, 32, 32), num_classes=len(names))
    return DataSplits(
        train,
        test,
        info,
        train_transform=CifarBatchTransform(augment=augment),
        eval_transform=CifarBatchTransform(augment=False),
    )
