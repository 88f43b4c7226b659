"""MNIST and CIFAR-10 decoded into uint8 tensors, for sMNIST, psMNIST and noisy CIFAR-10
(docs/paper.md §3.6-3.8; the task they share: lem/train/image_task.py).

Files live where torchvision puts them, under one data folder (lem.data.data_dir()):
    <data>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
    <data>/cifar-10-batches-py/{data_batch_1..5,test_batch}
torchvision downloads them from its own mirrors and checks their md5. Without network and
without the files, or with a corrupt file, loading stops with a `DataError` naming the files,
the folder and the URLs to fetch by hand. Also: the seeded train/valid split, and random
stand-ins of the real sizes for timing without the files (synthetic_mnist, synthetic_cifar10).
"""
import pickle
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import CIFAR10, MNIST
from torchvision.datasets.mnist import read_image_file, read_label_file
from torchvision.datasets.utils import check_md5

from .cache import DataError


MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _mnist_by_hand(raw):
    urls = "\n".join(f"  {MNIST.mirrors[0]}{name}" for name, _ in MNIST.resources)
    others = f"\n(same files at: {', '.join(MNIST.mirrors[1:])})" if len(MNIST.mirrors) > 1 else ""
    return f"Fetch these files by hand and put them (gzipped or unpacked) into {raw}:\n{urls}{others}"


def _mnist_download(root):
    """Have torchvision fetch (or unpack) whatever of the four MNIST files is missing."""
    raw = Path(root) / "MNIST" / "raw"
    needed = [name for pair in MNIST_FILES.values() for name in pair]
    if all((raw / name).is_file() for name in needed):
        return
    for gz, md5 in MNIST.resources:
        if (raw / gz).is_file() and not (raw / gz.removesuffix(".gz")).is_file() and not check_md5(raw / gz, md5):
            raise DataError(f"MNIST: {raw / gz} is corrupt or truncated (md5 is not {md5}); delete it.\n"
                            + _mnist_by_hand(raw))
    try:
        MNIST(root, train=True, download=True)
    except Exception as e:
        if not all((raw / name).is_file() for name in needed):
            missing = ", ".join(name for name in needed if not (raw / name).is_file())
            raise DataError(f"MNIST: {missing} not found in {raw}, and the download failed:\n  "
                            f"{str(e).strip().replace(chr(10), chr(10) + '  ')}\n" + _mnist_by_hand(raw)) from None
        # the files are there: reading them below says which one is bad


def _read_mnist_file(reader, path):
    try:
        return reader(str(path))
    except Exception as e:
        raise DataError(f"MNIST: cannot decode {path} ({type(e).__name__}: {str(e) or 'bad header or size'}); "
                        f"the file is corrupt or truncated: delete it.\n{_mnist_by_hand(path.parent)}") from None


def load_mnist(root):
    """{'train': (images, labels), 'test': ...}: images uint8 (N, 28, 28), labels int64 in 0..9."""
    root = Path(root)
    raw = root / "MNIST" / "raw"
    _mnist_download(root)
    splits = {}
    for split, (image_file, label_file) in MNIST_FILES.items():
        images = _read_mnist_file(read_image_file, raw / image_file)
        labels = _read_mnist_file(read_label_file, raw / label_file)
        _check_decoded("MNIST", raw / image_file, images, labels, (28, 28), _mnist_by_hand(raw))
        splits[split] = (images, labels)
    return splits


def _cifar_by_hand(root):
    return (f"Fetch {CIFAR10.url} (md5 {CIFAR10.tgz_md5}) by hand into {root} and unpack it there "
            f"(tar xzf {CIFAR10.filename}), which makes {Path(root) / CIFAR10.base_folder}.")


def _read_cifar_batch(path, by_hand):
    """One python batch file of the CIFAR-10 archive: a pickled dict with 'data' (N, 3072) uint8
    in channel-major order and 'labels'."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        images = torch.from_numpy(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        return images, torch.as_tensor(entry["labels"], dtype=torch.int64)
    except Exception as e:
        raise DataError(f"CIFAR-10: cannot decode {path} ({type(e).__name__}: {e}); the file is corrupt or "
                        f"truncated: delete {Path(path).parent} and unpack the archive again.\n{by_hand}") from None


def load_cifar10(root):
    """{'train': (images, labels), 'test': ...}: images uint8 (N, 3, 32, 32), labels int64 in 0..9."""
    root = Path(root)
    folder = root / CIFAR10.base_folder
    by_hand = _cifar_by_hand(root)
    files = {"train": [name for name, _ in CIFAR10.train_list], "test": [name for name, _ in CIFAR10.test_list]}
    needed = files["train"] + files["test"]
    if not all((folder / name).is_file() for name in needed):
        archive = root / CIFAR10.filename
        if archive.is_file() and not check_md5(archive, CIFAR10.tgz_md5):
            raise DataError(f"CIFAR-10: {archive} is corrupt or truncated (md5 is not {CIFAR10.tgz_md5}); "
                            f"delete it.\n{by_hand}")
        try:
            CIFAR10(root, train=True, download=True)
        except Exception as e:
            missing = ", ".join(name for name in needed if not (folder / name).is_file())
            if missing:
                raise DataError(f"CIFAR-10: {missing} not found in {folder}, and the download failed:\n  "
                                f"{str(e).strip()}\n{by_hand}") from None
    splits = {}
    for split, names in files.items():
        parts = [_read_cifar_batch(folder / name, by_hand) for name in names]
        images, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        _check_decoded("CIFAR-10", folder / names[0], images, labels, (3, 32, 32), by_hand)
        splits[split] = (images, labels)
    return splits


def _check_decoded(dataset, path, images, labels, shape, by_hand):
    problem = None
    if tuple(images.shape[1:]) != shape:
        problem = f"images of shape {tuple(images.shape[1:])}, expected {shape}"
    elif len(images) != len(labels) or len(images) == 0:
        problem = f"{len(images)} images but {len(labels)} labels"
    elif labels.min() < 0 or labels.max() > 9:
        problem = f"labels outside 0..9 (min {labels.min().item()}, max {labels.max().item()})"
    if problem:
        raise DataError(f"{dataset}: {path} and its companion files hold {problem}: corrupt data.\n{by_hand}")


def split_train_valid(n, n_valid, seed):
    """Index tensors (train, valid) of a random split of range(n), by torch's random_split with
    torch.Generator().manual_seed(seed), independent of the global RNG."""
    if not 0 < n_valid < n:
        raise DataError(f"the training set has {n} images: --valid-size must be between 1 and {n - 1}, got {n_valid}")
    train, valid = torch.utils.data.random_split(range(n), [n - n_valid, n_valid],
                                                 generator=torch.Generator().manual_seed(seed))
    return torch.tensor(train.indices), torch.tensor(valid.indices)


def synthetic(shape, n_train, n_test):
    """A stand-in for load_mnist / load_cifar10 of the real sizes, random pixels and labels
    (python -m lem.tools.bench epoch --synthetic: timing without the files)."""
    def load(root):
        g = torch.Generator().manual_seed(0)
        return {split: (torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g),
                        torch.randint(0, 10, (n,), generator=g))
                for split, n in (("train", n_train), ("test", n_test))}
    return load


synthetic_mnist = synthetic((28, 28), 60000, 10000)
synthetic_cifar10 = synthetic((3, 32, 32), 50000, 10000)
