"""The training harness through real train.py runs: logs, resume after SIGKILL/SIGTERM, NaN guard,
one process per run folder, damaged checkpoints and failed saves."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import lem.train
from lem.tools import results
from lem.train import cli, loop, rundir, task
from helpers import REPO, read_run, run_train, train_env

# The reference loop keeps these runs slow enough (~1 s an epoch) for a signal to land mid-run.
FHN_TINY = ["--n-train", 16, "--n-valid", 8, "--n-test", 8, "--nhid", 8, "--batch", 4, "--backend", "reference"]


def metrics_only(log):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in log]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def fhn_reference_dir(tmp_path_factory, data_dir):
    """The folder of a FitzHugh-Nagumo run that was never stopped (read only: copy it to change it)."""
    out = tmp_path_factory.mktemp("fhn_ref")
    run_train("fitzhugh_nagumo", *FHN_TINY, "--epochs", 4, out_dir=out, data_dir=data_dir)
    return out / "lem_h8_seed1234"


@pytest.fixture(scope="module")
def fhn_reference(fhn_reference_dir):
    return read_run(fhn_reference_dir)


def test_fitzhugh_nagumo_run_writes_every_log_file(fhn_reference):
    summary, config, log = fhn_reference
    assert summary["status"] == "finished" and summary["epochs_done"] == 4 and summary["steps"] == 16
    assert summary["metric"] == "rmse" and summary["paper"] == 0.002
    best = min(log, key=lambda r: r["valid"]["rmse"])
    assert summary["best_epoch"] == best["epoch"] and summary["test"] == best["test"]["rmse"]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    assert config["args"]["lr"] == 0.00904 and config["args"]["dt"] == 1.0 and config["args"]["seed"] == 1234
    assert config["versions"]["torch"] == torch.__version__ and config["device"] == "cpu"


def test_adding_run_end_to_end(tmp_path):
    run_train("adding", "--seq-length", 20, "--max-iter", 150, "--test-size", 40, "--nhid", 8,
              out_dir=tmp_path, data_dir=tmp_path)
    summary, config, log = read_run(tmp_path / "lem_T20_h8_seed5544")
    assert [r["step"] for r in log] == [100, 150]  # test MSE every 100 iterations, and at the end
    assert summary["status"] == "finished" and summary["test"] == log[-1]["test"]["mse"]
    assert (tmp_path / "lem_T20_h8_seed5544" / "log.txt").read_text().count("test_mse=") == 2


ADDING_TINY = ["--seq-length", 20, "--max-iter", 100, "--test-size", 40, "--nhid", 8]


@pytest.mark.parametrize("model", ["lstm", "gru"])
def test_baselines_run_through_the_same_pipeline(tmp_path, model):
    run_train("adding", *ADDING_TINY, "--model", model, out_dir=tmp_path, data_dir=tmp_path)
    summary, _, _ = read_run(tmp_path / f"{model}_T20_h8_seed5544")
    assert summary["model"] == model and summary["status"] == "finished"


def start_train(out, data_dir, *extra):
    cmd = [sys.executable, str(REPO / "fitzhugh_nagumo" / "train.py"), *map(str, FHN_TINY), "--epochs", "4",
           "--out-dir", str(out), "--data-dir", str(data_dir), "--device", "cpu", *extra]
    return subprocess.Popen(cmd, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_records(log_file, n, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log_file.exists() and len(log_file.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise TimeoutError(log_file)


def test_sigkill_then_resume_gives_the_same_numbers(tmp_path, data_dir, fhn_reference):
    proc = start_train(tmp_path, data_dir)
    wait_for_records(tmp_path / "lem_h8_seed1234" / "log.jsonl", 2, proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not after it finished
    resumed = run_train("fitzhugh_nagumo", *FHN_TINY, "--epochs", 4, "--resume", out_dir=tmp_path, data_dir=data_dir)
    assert "resumed" in resumed.stdout
    summary, config, log = read_run(tmp_path / "lem_h8_seed1234")
    ref_summary, _, ref_log = fhn_reference
    assert [s["ended"] for s in config["segments"]] == ["killed", "finished"]
    assert metrics_only(log) == metrics_only(ref_log)
    assert summary["test"] == ref_summary["test"] and summary["status"] == "finished"


def test_sigterm_mid_epoch_saves_and_resumes_exactly(tmp_path, data_dir, fhn_reference):
    proc = start_train(tmp_path, data_dir)
    wait_for_records(tmp_path / "lem_h8_seed1234" / "log.jsonl", 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr  # stopped by a signal, as a shell reports it
    summary, _, _ = read_run(tmp_path / "lem_h8_seed1234")
    assert summary["status"] == "interrupted" and "--resume" in stderr
    ckpt = torch.load(tmp_path / "lem_h8_seed1234" / "checkpoint.pt", weights_only=False)
    assert ckpt["state"]["step"] < 16
    run_train("fitzhugh_nagumo", *FHN_TINY, "--epochs", 4, "--resume", out_dir=tmp_path, data_dir=data_dir)
    summary, _, log = read_run(tmp_path / "lem_h8_seed1234")
    assert metrics_only(log) == metrics_only(fhn_reference[2])
    assert summary["test"] == fhn_reference[0]["test"]


def files_of(run_dir):
    """The bytes of every file in run_dir but its lock (which holds the PID of its latest holder)."""
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name != rundir.LOCK_FILE}


def test_a_second_process_on_a_run_stops_and_leaves_the_first_alone(tmp_path, data_dir, fhn_reference):
    run_dir = tmp_path / "lem_h8_seed1234"
    first = start_train(tmp_path, data_dir)
    wait_for_records(run_dir / "config.json", 1, first)  # it holds the folder, no checkpoint yet
    first.send_signal(signal.SIGSTOP)  # and stays there, still holding it, while the second tries
    try:
        before = files_of(run_dir)
        second = run_train("fitzhugh_nagumo", *FHN_TINY, "--epochs", 4, out_dir=tmp_path, data_dir=data_dir, check=False)
        assert files_of(run_dir) == before
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert f"{run_dir} is in use: process {first.pid} is training this run" in second.stderr
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    summary, _, log = read_run(run_dir)
    assert summary["status"] == "finished" and metrics_only(log) == metrics_only(fhn_reference[2])


def copy_run(reference_dir, out):
    """A copy of a finished 4-epoch run: checkpoint.pt at epoch 4, checkpoint.prev.pt at epoch 3."""
    run_dir = out / reference_dir.name
    shutil.copytree(reference_dir, run_dir)
    return run_dir


def truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def test_resume_continues_from_the_previous_checkpoint_when_the_newest_is_truncated(
        tmp_path, data_dir, fhn_reference_dir, fhn_reference):
    run_dir = copy_run(fhn_reference_dir, tmp_path)
    truncate(run_dir / "checkpoint.pt")
    (run_dir / ".log.jsonl.cut.tmp").write_text("{")  # what a kill -9 in the middle of a write leaves
    resumed = run_train("fitzhugh_nagumo", *FHN_TINY, "--epochs", 4, "--resume", out_dir=tmp_path, data_dir=data_dir)
    warning = [line for line in resumed.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1
    assert warning[0].startswith(f"warning: {run_dir / 'checkpoint.pt'} does not load: truncated or damaged (")
    assert warning[0].endswith(", kept as checkpoint.damaged.pt; continuing from checkpoint.prev.pt (epoch 3, batch 0)")
    summary, _, log = read_run(run_dir)
    assert metrics_only(log) == metrics_only(fhn_reference[2]) and summary["test"] == fhn_reference[0]["test"]
    # epoch 4's save replaced no checkpoint: the good one before it is kept, not the damaged one
    assert torch.load(run_dir / "checkpoint.prev.pt", weights_only=False)["state"]["epoch"] == 3
    assert (run_dir / "checkpoint.damaged.pt").exists() and not list(run_dir.glob(".*.tmp"))


def test_resume_without_the_newest_checkpoint_continues_from_the_previous(tmp_path, data_dir, fhn_reference_dir):
    run_dir = copy_run(fhn_reference_dir, tmp_path)
    (run_dir / "checkpoint.pt").unlink()
    resumed = run_train("fitzhugh_nagumo", *FHN_TINY, "--epochs", 4, "--resume", "--max-time", 0,
                        out_dir=tmp_path, data_dir=data_dir)
    assert (f"warning: {run_dir / 'checkpoint.pt'} is missing; continuing from checkpoint.prev.pt (epoch 3, batch 0)"
            in resumed.stderr)
    summary, _, log = read_run(run_dir)  # stopped after one step: the logs are those of epoch 3's checkpoint
    assert summary["status"] == "interrupted" and summary["epochs_done"] == 3 and len(log) == 3


def test_resume_stops_when_neither_checkpoint_loads(tmp_path, data_dir, fhn_reference_dir):
    run_dir = copy_run(fhn_reference_dir, tmp_path)
    truncate(run_dir / "checkpoint.pt")
    truncate(run_dir / "checkpoint.prev.pt")
    before = files_of(run_dir)
    resumed = run_train("fitzhugh_nagumo", *FHN_TINY, "--epochs", 4, "--resume", out_dir=tmp_path, data_dir=data_dir,
                        check=False)
    assert resumed.returncode == 1 and "Traceback" not in resumed.stderr
    message = resumed.stderr.strip()
    assert message.startswith("--resume: neither checkpoint of this run loads: ") and "\n" not in message
    assert f"{run_dir / 'checkpoint.pt'} does not load" in message
    assert f"{run_dir / 'checkpoint.prev.pt'} does not load" in message
    assert files_of(run_dir) == before


def test_existing_run_needs_resume_and_resume_needs_same_arguments(tmp_path):
    run_train("adding", *ADDING_TINY, out_dir=tmp_path, data_dir=tmp_path)
    again = run_train("adding", *ADDING_TINY, out_dir=tmp_path, data_dir=tmp_path, check=False)
    assert again.returncode != 0 and "--resume" in again.stderr
    other = run_train("adding", *ADDING_TINY, "--lr", 0.1, "--resume", out_dir=tmp_path, data_dir=tmp_path, check=False)
    assert other.returncode != 0 and "--lr 0.1" in other.stderr
    missing = run_train("adding", *ADDING_TINY, "--resume", "--run-name", "nothing",
                        out_dir=tmp_path, data_dir=tmp_path, check=False)
    assert missing.returncode != 0 and "no checkpoint" in missing.stderr


class Regression(lem.train.Task):
    """Linear regression: an in-process run in milliseconds."""
    name = "regression"
    metric = "mse"
    defaults = dict(nhid=4, batch=8, epochs=5, lr=0.01)

    def __init__(self, args, device):
        super().__init__(args, device)
        self.x = torch.randn(32, 3)
        self.y = self.x.sum(1, keepdim=True)
        self.epoch = 0

    def build_model(self):
        return torch.nn.Linear(3, 1)

    def train_batches(self, epoch):
        self.epoch = epoch
        return lem.train.shuffled_batches(32, self.args.batch, self.args.seed, epoch)

    def loss(self, model, idx):
        return F.mse_loss(model(self.x[idx]), self.y[idx])

    def evaluate(self, model, split):
        return {"mse": F.mse_loss(model(self.x), self.y).item()}


class ExplodingTask(Regression):
    """Linear regression whose loss turns NaN at the third epoch."""

    def loss(self, model, idx):
        loss = super().loss(model, idx)
        return loss * float("nan") if self.epoch == 2 else loss


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        lem.train.run(ExplodingTask, ["--out-dir", str(tmp_path), "--data-dir", str(tmp_path), "--device", "cpu"])
    assert stop.value.code == 1
    assert "loss is nan at epoch 3" in capsys.readouterr().err
    run_dir = tmp_path / "lem_h4_seed5544"
    summary, _, log = read_run(run_dir)
    assert summary["status"] == "nan" and len(log) == 2
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["state"]["epoch"] == 2
    assert all(torch.isfinite(p).all() for p in ckpt["model"].values())


@pytest.mark.parametrize("failing", ["checkpoint.pt", "log.jsonl"])
def test_a_failed_save_stops_the_run_and_keeps_the_last_good_files(tmp_path, monkeypatch, failing):
    argv = ["--data-dir", str(tmp_path), "--device", "cpu", "--epochs", "4"]
    lem.train.run(Regression, ["--out-dir", str(tmp_path / "reference"), *argv])
    run_dir = tmp_path / "lem_h4_seed5544"
    real_fsync, writes = os.fsync, []

    def fsync(fd):  # the disk is full when the third one of the failing file is written
        if f".{failing}." in os.readlink(f"/proc/self/fd/{fd}"):
            writes.append(fd)
            if len(writes) == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(SystemExit) as stop:
        lem.train.run(Regression, ["--out-dir", str(tmp_path), *argv])
    what = "checkpoint.pt" if failing == "checkpoint.pt" else "log.jsonl and log.txt"
    assert str(stop.value.code).startswith(f"could not write {what} in {run_dir}: No space left on device. ")
    summary, _, log = read_run(run_dir)
    assert summary["epochs_done"] == 2 and len(log) == 2 and not list(run_dir.glob(".*.tmp"))
    assert summary["status"] == "failed" and summary["error"] == stop.value.code
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=False)["state"]["epoch"]
    assert saved == (2 if failing == "checkpoint.pt" else 3)

    monkeypatch.undo()  # space again: the run continues to the numbers of one never stopped
    lem.train.run(Regression, ["--out-dir", str(tmp_path), "--resume", *argv])
    _, _, reference = read_run(tmp_path / "reference" / "lem_h4_seed5544")
    assert metrics_only(read_run(run_dir)[2]) == metrics_only(reference)


def test_run_lock_holds_the_pid_and_excludes_a_second_holder(tmp_path):
    path = tmp_path / "run.lock"
    fd = rundir.lock(path)
    try:
        assert path.read_text() == f"{os.getpid()}\n"
        with pytest.raises(BlockingIOError):
            rundir.lock(path)  # another open file of the same process counts as another holder
    finally:
        os.close(fd)
    os.close(rundir.lock(path))  # free again once closed


def test_a_file_system_without_locks_runs_with_a_warning(tmp_path, monkeypatch, capsys):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(rundir.fcntl, "flock", no_locks)
    summary = lem.train.run(Regression, ["--out-dir", str(tmp_path), "--data-dir", str(tmp_path), "--device", "cpu",
                                   "--epochs", "1"])[0]
    assert summary["status"] == "finished"
    assert f"warning: cannot lock {tmp_path / 'lem_h4_seed5544' / rundir.LOCK_FILE}" in capsys.readouterr().err


def test_resume_checks_what_it_loads(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {}, "state": {}}, path)
    with pytest.raises(ValueError, match="is not a whole checkpoint: it lacks optimizer, task, rng, args"):
        rundir.load_checkpoint(path, rundir.CHECKPOINT_KEYS)


def test_seeds_and_results_table(tmp_path, capsys):
    run_train("adding", *ADDING_TINY, "--seeds", 1, 2, out_dir=tmp_path, data_dir=tmp_path)
    run_train("adding", *ADDING_TINY, "--model", "gru", out_dir=tmp_path, data_dir=tmp_path)
    tests = [read_run(tmp_path / f"lem_T20_h8_seed{s}")[0]["test"] for s in (1, 2)]
    rows = results.summarise(results.load_runs([tmp_path]))
    assert [(r["model"], r["seeds"]) for r in rows] == [("lem", 2), ("gru", 1)]  # LEM first, then the baselines
    lem_row = rows[0]
    assert lem_row["mean"] == pytest.approx(sum(tests) / 2)
    assert lem_row["std"] == pytest.approx(abs(tests[0] - tests[1]) / 2 ** 0.5)
    results.main([str(tmp_path)])
    table = capsys.readouterr().out
    assert "adding" in table and "1e-4 ... 1e-5" in table and f"{lem_row['mean']:.4g}" in table


def test_the_backend_flag_trains_the_same_model(tmp_path):
    """--backend cpp and --backend reference train the same adding model to the same figure (here, not
    with the kernel tests: those run in CI's venv that has only the layer's dependencies)."""
    finals = {}
    for backend in ("reference", "cpp"):
        run_train("adding", "--seq-length", 20, "--max-iter", 200, "--test-size", 40, "--nhid", 8, "--batch", 10,
                  "--backend", backend, out_dir=tmp_path / backend, data_dir=tmp_path)
        finals[backend] = read_run(tmp_path / backend / "lem_T20_h8_seed5544")[0]["test"]
    assert finals["cpp"] == pytest.approx(finals["reference"], rel=1e-3)
