"""sMNIST, psMNIST and noisy CIFAR-10: the files torchvision reads, the pixel sequences, the
messages for missing or corrupt data, and each train.py end to end on tiny files in the exact
on-disk formats of the real downloads."""
from importlib import import_module
import gzip
import hashlib
import json
import pickle
import socket
import struct
import sys

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR10, MNIST

from lem.train import cli
from helpers import read_run, run_train
from lem.data import DataError
from lem.data.images import load_cifar10, load_mnist, split_train_valid

smnist_data = import_module("smnist.data")
psmnist_data = import_module("psmnist.data")
cifar_data = import_module("noisy_cifar.data")


# ---- tiny datasets in the real on-disk formats ----

def idx_bytes(array):
    """An IDX file as on yann.lecun.com: magic 0x0000 08 <ndim> (uint8), big-endian sizes, data."""
    return struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_mnist(root, n_train=60, n_test=20, gz=True, raw=True, seed=0):
    """<root>/MNIST/raw as torchvision leaves it after a download: the .gz files and their unpacked copies."""
    rng = np.random.RandomState(seed)
    folder = root / "MNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        files = {f"{prefix}-images-idx3-ubyte": rng.randint(0, 256, (n, 28, 28)).astype(np.uint8),
                 f"{prefix}-labels-idx1-ubyte": rng.randint(0, 10, n).astype(np.uint8)}
        for name, array in files.items():
            if raw:
                (folder / name).write_bytes(idx_bytes(array))
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))
    return folder


def write_cifar(root, per_batch=20, seed=0):
    """<root>/cifar-10-batches-py as in cifar-10-python.tar.gz: pickled dicts (protocol 2) holding
    'data', uint8 (N, 3072) channel-major, and 'labels', plus batches.meta."""
    rng = np.random.RandomState(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"batch_label": f"{name} of 5", "labels": rng.randint(0, 10, per_batch).tolist(),
                 "data": rng.randint(0, 256, (per_batch, 3072)).astype(np.uint8),
                 "filenames": [f"img_{i}.png" for i in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    meta = {"num_cases_per_batch": per_batch, "num_vis": 3072,
            "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return folder


def md5_resources(folder):
    """MNIST.resources with the md5 of the fixture's .gz files, as torchvision knows the real ones'."""
    return [(name, hashlib.md5((folder / name).read_bytes()).hexdigest()) for name, _ in MNIST.resources]


def closed_port_url():
    """http://127.0.0.1:<port>/ where nothing listens: a download that fails at once, offline."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


# ---- decoding ----

def test_mnist_decodes_raw_and_gz_layouts(tmp_path, monkeypatch):
    write_mnist(tmp_path / "both", n_train=30, n_test=10)
    data = load_mnist(tmp_path / "both")
    assert data["train"][0].shape == (30, 28, 28) and data["train"][0].dtype == torch.uint8
    assert data["test"][1].shape == (10,) and data["test"][1].dtype == torch.int64

    write_mnist(tmp_path / "raw", n_train=30, n_test=10, gz=False)
    assert torch.equal(load_mnist(tmp_path / "raw")["train"][0], data["train"][0])

    # only the .gz files, placed by hand: torchvision unpacks them offline when their md5 is right
    folder = write_mnist(tmp_path / "gz", n_train=30, n_test=10, raw=False)
    monkeypatch.setattr(MNIST, "resources", md5_resources(folder))
    monkeypatch.setattr(MNIST, "mirrors", [closed_port_url()])
    assert torch.equal(load_mnist(tmp_path / "gz")["test"][1], data["test"][1])


def test_cifar_decodes_python_batches(tmp_path):
    folder = write_cifar(tmp_path, per_batch=4)
    data = load_cifar10(tmp_path)
    images, labels = data["train"]
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8 and len(labels) == 20
    with open(folder / "data_batch_2", "rb") as f:
        second = pickle.load(f, encoding="latin1")
    assert torch.equal(images[4].flatten(), torch.from_numpy(second["data"][0]))  # channel-major: R, then G, then B
    assert labels[4].item() == second["labels"][0]


def test_train_valid_split_is_seeded_random_split():
    train, valid = split_train_valid(100, 10, seed=3)
    assert len(train) == 90 and len(valid) == 10
    assert sorted(torch.cat((train, valid)).tolist()) == list(range(100))
    assert torch.equal(split_train_valid(100, 10, seed=3)[1], valid)
    assert not torch.equal(split_train_valid(100, 10, seed=4)[1], valid)
    with pytest.raises(DataError, match="--valid-size must be between 1 and 99"):
        split_train_valid(100, 100, seed=3)


# ---- sequences ----

def test_smnist_reads_pixels_row_by_row():
    images = torch.arange(2 * 784).reshape(2, 28, 28).remainder(256).to(torch.uint8)
    x = smnist_data.pixel_sequences(images)
    assert x.shape == (784, 2, 1) and x.dtype == torch.float32
    assert torch.equal(x[:28, 1, 0], images[1, 0].float() / 255)     # first row first
    assert torch.equal(x[28:56, 0, 0], images[0, 1].float() / 255)   # then the second row
    assert x[783, 1, 0] == images[1, 27, 27].float() / 255


def test_psmnist_permutation_is_fixed_by_the_seed(tmp_path):
    def drawn(seed):
        torch.manual_seed(seed)
        return psmnist_data.draw_permutation()

    p = drawn(5544)
    assert sorted(p.tolist()) == list(range(784))
    assert torch.equal(drawn(5544), p)
    assert not torch.equal(drawn(1), p)

    images = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    x = psmnist_data.permuted_sequences(images, p)
    assert torch.equal(x, smnist_data.pixel_sequences(images)[p])
    assert x[0, 2, 0] == images[2].flatten()[p[0]].float() / 255

    psmnist_data.save_permutation(tmp_path / "permutation.json", p)
    assert torch.equal(psmnist_data.load_permutation(tmp_path / "permutation.json"), p)
    (tmp_path / "bad.json").write_text(json.dumps(list(range(783)) + [0]))
    with pytest.raises(ValueError, match="permutation of 0..783"):
        psmnist_data.load_permutation(tmp_path / "bad.json")


def test_noisy_cifar_rows_then_noise():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(7)
    noise = cifar_data.draw_noise_block()
    torch.manual_seed(7)
    assert torch.equal(noise, torch.randn(968, 96))  # the first draw after seeding

    x = cifar_data.noisy_sequences(images, noise)
    assert x.shape == (1000, 4, 96)
    # step r: row r of red, then green, then blue
    for r, b in ((0, 0), (17, 3), (31, 1)):
        assert torch.equal(x[r, b], torch.cat([images[b, c, r] for c in range(3)]).float() / 255)
    assert torch.equal(x[32:, 0], noise) and torch.equal(x[32:, 3], noise)

    fresh = cifar_data.noisy_sequences(images)
    assert fresh.shape == (1000, 4, 96)
    assert torch.equal(fresh[:32], x[:32])
    assert not torch.equal(fresh[32:, 0], fresh[32:, 1])
    assert 0.9 < fresh[32:].std() < 1.1


# ---- missing and corrupt files ----

def test_mnist_missing_offline_names_files_folder_and_url(tmp_path, monkeypatch):
    mirror = closed_port_url()
    monkeypatch.setattr(MNIST, "mirrors", [mirror])
    with pytest.raises(DataError) as e:
        load_mnist(tmp_path)
    message = str(e.value)
    assert "train-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    assert str(tmp_path / "MNIST" / "raw") in message
    assert f"{mirror}train-images-idx3-ubyte.gz" in message
    assert "download failed" in message


def test_cifar_missing_offline_names_files_folder_and_url(tmp_path, monkeypatch):
    url = closed_port_url() + "cifar-10-python.tar.gz"
    monkeypatch.setattr(CIFAR10, "url", url)
    with pytest.raises(DataError) as e:
        load_cifar10(tmp_path)
    message = str(e.value)
    assert "data_batch_1" in message and "test_batch" in message
    assert str(tmp_path / "cifar-10-batches-py") in message and url in message


def test_train_py_stops_with_the_message_not_a_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(MNIST, "mirrors", [closed_port_url()])
    smnist = import_module("smnist.train")
    with pytest.raises(SystemExit) as e:
        smnist.lem.train.run(smnist.SequentialMNIST, ["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "out"),
                                                "--device", "cpu"])
    assert str(e.value).startswith("smnist: MNIST: ")
    assert "MNIST/raw" in str(e.value) and "Traceback" not in str(e.value)


def test_truncated_mnist_files(tmp_path, monkeypatch):
    folder = write_mnist(tmp_path, n_train=30, n_test=10)
    images = folder / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:3000])
    with pytest.raises(DataError, match="cannot decode .*train-images-idx3-ubyte.*corrupt or truncated") as e:
        load_mnist(tmp_path)
    assert f"{MNIST.mirrors[0]}train-images-idx3-ubyte.gz" in str(e.value)  # where to fetch it by hand

    write_mnist(tmp_path, n_train=30, n_test=10)
    labels = folder / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-3])
    with pytest.raises(DataError, match="cannot decode .*t10k-labels-idx1-ubyte"):
        load_mnist(tmp_path)
    labels.write_bytes(idx_bytes(np.zeros(7, np.uint8)))  # a whole file, but fewer labels than images
    with pytest.raises(DataError, match="10 images but 7 labels"):
        load_mnist(tmp_path)

    # only the .gz files, one truncated: its md5 says so before any download is tried
    monkeypatch.setattr(MNIST, "mirrors", [closed_port_url()])
    gz_only = write_mnist(tmp_path / "gz", raw=False)
    monkeypatch.setattr(MNIST, "resources", md5_resources(gz_only))
    (gz_only / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b\x08")
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz is corrupt or truncated \(md5"):
        load_mnist(tmp_path / "gz")


def test_truncated_cifar_batch(tmp_path):
    folder = write_cifar(tmp_path, per_batch=4)
    batch = folder / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:500])
    with pytest.raises(DataError, match="cannot decode .*data_batch_3.*corrupt or truncated") as e:
        load_cifar10(tmp_path)
    assert CIFAR10.url in str(e.value)


# ---- each train.py end to end, one short epoch ----

def test_smnist_trains_end_to_end(tmp_path):
    write_mnist(tmp_path / "data")
    run_train("smnist", "--nhid", 8, "--epochs", 1, "--batch", 16, "--valid-size", 12,
              out_dir=tmp_path / "out", data_dir=tmp_path / "data")
    summary, config, log = read_run(tmp_path / "out" / "lem_h8_seed5544")
    assert summary["status"] == "finished" and summary["metric"] == "accuracy" and summary["paper"] == 99.5
    assert len(log) == 1 and log[0]["step"] == 3  # 48 training images in batches of 16
    assert 0 <= summary["test"] <= 100 and summary["valid"] == log[0]["valid"]["accuracy"]
    assert config["args"]["lr"] == 0.0018 and config["args"]["grad_norm"] == 1.0 and config["args"]["dt"] == 0.21


def test_psmnist_trains_and_saves_its_permutation(tmp_path):
    write_mnist(tmp_path / "data")
    run_train("psmnist", "--nhid", 8, "--epochs", 1, "--batch", 32, "--valid-size", 12, "--seed", 3,
              out_dir=tmp_path / "out", data_dir=tmp_path / "data")
    saved = psmnist_data.load_permutation(tmp_path / "out" / "lem_h8_seed3" / "permutation.json")
    torch.manual_seed(3)
    assert torch.equal(saved, torch.randperm(784))
    summary, config, _ = read_run(tmp_path / "out" / "lem_h8_seed3")
    assert summary["status"] == "finished" and config["args"]["lr"] == 0.0073 and config["args"]["grad_norm"] == 1.1


def test_noisy_cifar_trains_end_to_end(tmp_path):
    write_cifar(tmp_path / "data", per_batch=8)
    run_train("noisy_cifar", "--nhid", 8, "--epochs", 1, "--batch", 16, "--valid-size", 8,
              out_dir=tmp_path / "out", data_dir=tmp_path / "data")
    summary, config, log = read_run(tmp_path / "out" / "lem_h8_seed5544")
    assert summary["status"] == "finished" and log[0]["step"] == 2  # 32 training images, batches of 16
    assert config["args"]["lr"] == 0.00322 and config["args"]["dt"] == 0.44 and not config["args"]["fresh_noise"]


def test_fresh_noise_evaluates_the_same_noisy_set_each_time(tmp_path, monkeypatch):
    write_cifar(tmp_path, per_batch=4)
    train = import_module("noisy_cifar.train")
    args = cli.build_parser(train.NoisyCIFAR).parse_args(
        ["--data-dir", str(tmp_path), "--valid-size", "4", "--nhid", "4", "--fresh-noise"])
    task = train.NoisyCIFAR(args, torch.device("cpu"))
    model = task.build_model().eval()
    torch.manual_seed(0)
    first = task.evaluate(model, "test")
    rng = torch.get_rng_state()
    assert task.evaluate(model, "test") == first
    assert torch.equal(torch.get_rng_state(), rng)  # training's random stream is left as it was
    images = task.splits["train"][0][:2]
    assert not torch.equal(task.sequences(images)[32:], task.sequences(images)[32:])  # new noise per batch
