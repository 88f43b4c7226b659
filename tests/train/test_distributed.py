"""torchrun on CPU (gloo): two processes train like one process with the same global batch."""
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO, read_run, run_train, train_env
from lem.train import cli, distributed, loop, rundir, task

# 12 trajectories in batches of 5, 5, 2: shares of 3 and 2 samples, so the loss weights matter
FHN = ["--n-train", 12, "--n-valid", 4, "--n-test", 4, "--nhid", 8, "--batch", 5, "--epochs", 2]
ADDING = ["--seq-length", 20, "--max-iter", 200, "--test-size", 40, "--nhid", 8, "--batch", 10]
RUN_FILES = {"checkpoint.pt", "checkpoint.prev.pt", "config.json", "log.jsonl", "log.txt", "summary.json", "run.lock"}


def torchrun(experiment, *args, out_dir, data_dir, nproc=2, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(REPO / experiment / "train.py"), *map(str, args),
           "--out-dir", str(out_dir), "--data-dir", str(data_dir), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=train_env())
    assert proc.returncode == 0 or not check, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def curve(log):
    return [(r["epoch"], r["step"], {s: r[s] for s in ("valid", "test") if s in r}) for r in log]


def assert_same_curve(log, reference, rel):
    assert [(e, s) for e, s, _ in curve(log)] == [(e, s) for e, s, _ in curve(reference)]
    for (_, _, got), (_, _, want) in zip(curve(log), curve(reference)):
        for split, metrics in want.items():
            assert got[split] == pytest.approx(metrics, rel=rel), (got, want)


def test_two_processes_follow_the_single_process_curve(tmp_path):
    data = tmp_path / "data"
    run_train("fitzhugh_nagumo", *FHN, out_dir=tmp_path / "one", data_dir=data)
    proc = torchrun("fitzhugh_nagumo", *FHN, out_dir=tmp_path / "two", data_dir=data)

    _, _, reference = read_run(tmp_path / "one" / "lem_h8_seed1234")
    summary, config, log = read_run(tmp_path / "two" / "lem_h8_seed1234")
    assert_same_curve(log, reference, rel=1e-5)
    assert summary["status"] == "finished" and summary["steps"] == 6 and config["processes"] == 2

    one = torch.load(tmp_path / "one" / "lem_h8_seed1234" / "checkpoint.pt", weights_only=False)
    two = torch.load(tmp_path / "two" / "lem_h8_seed1234" / "checkpoint.pt", weights_only=False)
    assert list(two["model"]) == list(one["model"])  # the plain module's keys, no "module." prefix
    for name, value in one["model"].items():
        torch.testing.assert_close(two["model"][name], value, rtol=1e-4, atol=1e-6)
    assert len(two["rng_ranks"]) == 2 and "rng_ranks" not in one

    # one set of files, one voice: only rank 0 writes and prints
    assert {p.name for p in (tmp_path / "two").rglob("*") if p.is_file()} == RUN_FILES
    assert proc.stdout.count("epoch=1 ") == 1 and proc.stdout.count("done:") == 1


def test_seed_batches_split_and_a_distributed_run_resumes(tmp_path):
    run_train("adding", *ADDING, out_dir=tmp_path / "one", data_dir=tmp_path)
    torchrun("adding", *ADDING, "--max-time", 0, out_dir=tmp_path / "two", data_dir=tmp_path)
    run_dir = tmp_path / "two" / "lem_T20_h8_seed5544"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["state"]["step"] == 1 and len(ckpt["rng_ranks"]) == 2  # both processes stopped together

    torchrun("adding", *ADDING, "--resume", out_dir=tmp_path / "two", data_dir=tmp_path)
    _, _, reference = read_run(tmp_path / "one" / "lem_T20_h8_seed5544")
    summary, _, log = read_run(run_dir)
    assert summary["status"] == "finished"
    assert_same_curve(log, reference, rel=1e-4)


def test_a_refused_torchrun_job_stops_every_process(tmp_path):
    run_dir = tmp_path / "lem_h8_seed1234"
    run_dir.mkdir()
    lock = rundir.lock_folder(run_dir)  # this test process trains the run, as far as anyone knows
    try:
        proc = torchrun("fitzhugh_nagumo", *FHN, out_dir=tmp_path, data_dir=tmp_path / "data", check=False)
    finally:
        os.close(lock)
    assert proc.returncode != 0  # and every process stopped: no time-out
    assert proc.stderr.count(f"{run_dir} is in use: process {os.getpid()} is training this run") == 1
    assert proc.stderr.count("Traceback") <= 1  # torchrun's own failure report; no worker's
    assert os.listdir(run_dir) == [rundir.LOCK_FILE]


def test_one_process_splits_nothing():
    idx = torch.tensor([4, 0, 3])
    assert distributed.local_batch(idx) == (idx, 1.0)
    assert distributed.local_batch(7) == (7, 1.0)
    x = torch.randn(5, 3)
    assert distributed.share(x, dim=0) is x


def test_shares_weights_and_the_other_ranks_silence(monkeypatch, tmp_path):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "anyone", bool)  # a collective: no process group here
    idx = torch.arange(10, 18)  # 8 samples over 3 processes: 3, 3, 2
    part, weight = distributed.local_batch(idx)
    assert part.tolist() == [11, 14, 17] and weight == pytest.approx(3 * 3 / 8)
    part, weight = distributed.local_batch(torch.tensor([5]))  # nothing left for rank 1
    assert part.tolist() == [5] and weight == 0.0
    assert distributed.local_batch(12345) == (12345, 1.0)  # a seed goes whole to every process
    assert distributed.share(torch.arange(6), dim=0).tolist() == [1, 4]
    assert distributed.share(torch.zeros(2, 6), dim=1).shape == (2, 2)
    with pytest.raises(ValueError, match="does not split evenly over 3 processes"):
        distributed.share(torch.zeros(50, 2))

    class Tiny(task.Task):
        name, metric = "tiny", "mse"

    run = rundir.Run(tmp_path / "run", Tiny)
    state = {"epoch": 0, "step": 0, "elapsed": 0.0, "best": None, "history": []}
    run.write_logs([])
    summary = run.write_summary(state, "running", {"args": {"model": "lem", "seed": 1}})
    assert summary["status"] == "running" and not (tmp_path / "run").exists()


def test_torchrun_gives_each_process_its_own_gpu(monkeypatch):
    assert loop.pick_device("cuda") == torch.device("cuda")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert loop.pick_device("cuda") == torch.device("cuda", 3)
    assert loop.pick_device("cpu") == torch.device("cpu")
