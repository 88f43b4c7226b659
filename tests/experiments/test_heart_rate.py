"""Heart rate (docs/paper.md §3.5): Monash regression .ts files written here in the archive's format,
the BIDMC32HR archive served from 127.0.0.1, the split, the cache and train.py end to end."""
from importlib import import_module
import functools
import io
import threading
import zipfile
from argparse import Namespace
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from helpers import read_run, run_train
from lem.data import DataError

data = import_module("heart_rate.data")


def write_ts(path, name, series, targets):
    """A regression .ts file as in the Monash archive: one case a line, channels ':'-separated, target last."""
    lengths = {len(s[0]) for s in series}
    header = [f"@problemName {name}", "@timeStamps false", "@missing false", "@univariate false",
              f"@dimensions {len(series[0])}", f"@equalLength {str(len(lengths) == 1).lower()}"]
    header += [f"@seriesLength {lengths.pop()}"] if len(lengths) == 1 else []
    header += ["@targetlabel true", "@data"]
    lines = [":".join(",".join(f"{v:.6f}" for v in ch) for ch in s) + f":{t:.4f}" for s, t in zip(series, targets)]
    path.write_text("#Synthetic file in the format of the Monash regression archive\n" + "\n".join(header + lines) + "\n")
    return path


def make_pair(folder, name, n_train=14, n_test=6, length=12, seed=0):
    """Two channels (like PPG and ECG); the target is a rate readable from the signal."""
    rng = np.random.default_rng(seed)
    paths = []
    for part, n in (("TRAIN", n_train), ("TEST", n_test)):
        rate = rng.uniform(60, 100, n)
        t = np.arange(length)
        series = [[np.sin(r / 60 * t), rng.normal(size=length)] for r in rate]
        folder.mkdir(parents=True, exist_ok=True)
        paths.append(write_ts(folder / f"{name}_{part}.ts", name, series, rate))
    return paths


def test_split_is_the_reference_random_split():
    idx = data.split(7949)
    assert [len(idx[p]) for p in ("train", "valid", "test")] == [5565, 1192, 1192]
    gen = lambda: torch.Generator().manual_seed(123456)
    train, rest = torch.utils.data.random_split(range(7949), [5565, 2384], generator=gen())
    test, valid = torch.utils.data.random_split(rest, [1192, 1192], generator=gen())
    assert idx["train"].tolist() == list(train) and idx["test"].tolist() == list(test)
    assert idx["valid"].tolist() == list(valid)


def test_ts_pair_is_parsed_merged_split_and_reprocessed_when_changed(tmp_path):
    train_file, test_file = make_pair(tmp_path / "src", "Tiny")
    splits = data.load_splits(tmp_path / "data", train_file, test_file)
    x, y, lengths = splits["train"]
    assert x.shape == (12, 14, 2) and x.dtype == torch.float32 and lengths.tolist() == [12] * 14
    assert sorted(len(splits[p][1]) for p in ("valid", "test")) == [3, 3]
    all_y = torch.cat([splits[p][1] for p in ("train", "valid", "test")])
    targets = [float(line.rsplit(":", 1)[1]) for f in (train_file, test_file)
               for line in f.read_text().splitlines() if line[0] not in "#@"]
    assert sorted(all_y.tolist()) == pytest.approx(sorted(targets), abs=1e-3)
    assert (tmp_path / "data" / "heart_rate" / "Tiny.json").exists()
    text = train_file.read_text().splitlines()
    text[-1] = text[-1].rsplit(":", 1)[0] + ":123.0"
    train_file.write_text("\n".join(text) + "\n")
    changed = data.load_splits(tmp_path / "data", train_file, test_file)
    assert 123.0 in torch.cat([changed[p][1] for p in ("train", "valid", "test")]).tolist()


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        data.load_splits(tmp_path, tmp_path / "X_TRAIN.ts", tmp_path / "X_TEST.ts")
    (tmp_path / "X_TRAIN.ts").write_text("@problemName X\n@data\n1,2,3:x:y\n")
    (tmp_path / "X_TEST.ts").write_text("")
    with pytest.raises(ValueError, match="X_TRAIN.ts: not a readable regression .ts file"):
        data.load_splits(tmp_path, tmp_path / "X_TRAIN.ts", tmp_path / "X_TEST.ts")


@pytest.fixture
def archive_server(tmp_path):
    """The regression archive (BIDMC32HR and another dataset) served over HTTP from 127.0.0.1."""
    members = {}
    for name in ("BIDMC32HR", "AppliancesEnergy"):
        for f in make_pair(tmp_path / "made" / name, name, n_train=10, n_test=5, length=16):
            members[f"{name}/{f.name}"] = f.read_bytes()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for member, content in members.items():
            z.writestr(member, content)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / data.ARCHIVE_NAME).write_bytes(buffer.getvalue())
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", members
    server.shutdown()
    server.server_close()


def test_bidmc32hr_is_downloaded_and_only_its_files_extracted(tmp_path, archive_server):
    base, members = archive_server
    files = data.bidmc32hr_files(tmp_path / "data", url=base + data.ARCHIVE_NAME)
    folder = tmp_path / "data" / "heart_rate"
    assert [f.read_bytes() for f in files] == [members["BIDMC32HR/BIDMC32HR_TRAIN.ts"], members["BIDMC32HR/BIDMC32HR_TEST.ts"]]
    assert sorted(p.name for p in (folder / "BIDMC32HR").iterdir()) == ["BIDMC32HR_TEST.ts", "BIDMC32HR_TRAIN.ts"]
    assert not (folder / "AppliancesEnergy").exists()
    with pytest.raises(DataError, match="404") as e:
        data.bidmc32hr_files(tmp_path / "other", url=base + "missing.zip")
    assert str(tmp_path / "other" / "heart_rate") in str(e.value)


def heart_rate_task(data_dir, train_file=None, test_file=None):
    train = import_module("heart_rate.train")
    args = Namespace(data_dir=str(data_dir), train_file=train_file, test_file=test_file, eval_batch=2,
                     model="lem", nhid=4, dt=0.1)
    return train.HeartRate(args, torch.device("cpu"))


def test_rmse_is_over_the_whole_split(tmp_path):
    task = heart_rate_task(tmp_path / "data", *make_pair(tmp_path / "src", "Tiny"))
    zero = lambda x, lengths: torch.zeros(x.size(1), 1)
    y = task.splits["valid"][1]
    assert task.evaluate(zero, "valid")["rmse"] == pytest.approx(y.pow(2).mean().sqrt().item(), rel=1e-6)


def test_bidmc32hr_placed_by_hand_is_the_default(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "PAPER_COUNT", 14)  # a small stand-in for its 7949 series
    make_pair(tmp_path / "data" / "heart_rate" / "BIDMC32HR", "BIDMC32HR", n_train=10, n_test=4)
    task = heart_rate_task(tmp_path / "data")  # no --train-file: BIDMC32HR, found without a download
    assert sum(len(task.splits[p][1]) for p in ("train", "valid", "test")) == 14
    assert (tmp_path / "data" / "heart_rate" / "BIDMC32HR.json").exists()
    assert not (tmp_path / "data" / "heart_rate" / data.ARCHIVE_NAME).exists()
    monkeypatch.setattr(data, "PAPER_COUNT", 15)  # one series short of the paper's count: an error naming the files
    (tmp_path / "data" / "heart_rate" / "BIDMC32HR.pt").unlink()
    with pytest.raises(DataError, match="BIDMC32HR has 15 series .*BIDMC32HR_TRAIN.ts and .*BIDMC32HR_TEST.ts hold 10 \\+ 4"):
        heart_rate_task(tmp_path / "data")


def test_train_end_to_end_on_a_ts_pair(tmp_path):
    train_file, test_file = make_pair(tmp_path / "src", "Tiny", n_train=20, n_test=8)
    out = tmp_path / "runs"
    run_train("heart_rate", "--train-file", train_file, "--test-file", test_file, "--epochs", 2, "--nhid", 8,
              "--batch", 4, out_dir=out, data_dir=tmp_path / "data")
    summary, config, log = read_run(out / "Tiny_lem_h8_seed5544")
    assert summary["status"] == "finished" and len(log) == 2 and config["args"]["lr_decay_epoch"] == 250
    assert np.isfinite(summary["test"]) and summary["metric"] == "rmse"
