"""Every bad flag, file and fault ends in one clear line (issue 25): a flag is refused at parse time
(argparse's exit code 2, the flag, the value and what is allowed), a run that cannot go on stops
with exit code 1 and its reason, nothing is written where nothing should be, and no traceback."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import lem.train
from lem import atomic
from lem.tools import experiments, results
from lem.train import cli, loop, rundir
from helpers import REPO, read_run, run_train, train_env

ADDING = ["--seq-length", "10", "--max-iter", "2", "--test-size", "4", "--nhid", "4", "--backend", "reference"]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
NOT_INTERPRETED = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="Triton runs on CPU here")

# (experiment, flags, what the one line says)
BAD_FLAGS = [
    ("adding", ["--lr", "nan"], "argument --lr: must be a finite number, got nan"),
    ("adding", ["--lr", "-1"], "argument --lr: must be a finite number > 0, got -1.0"),
    ("adding", ["--dt", "0"], "argument --dt: must be a finite number > 0, got 0.0"),
    ("adding", ["--dt", "inf"], "argument --dt: must be a finite number, got inf"),
    ("adding", ["--dt", "nan"], "argument --dt: must be a finite number, got nan"),
    ("adding", ["--seed", "-1"], "argument --seed: must be an integer in [0, 4294967295], got -1"),
    ("adding", ["--seed", "1e20"], "argument --seed: must be an integer in [0, 4294967295], got '1e20'"),
    ("adding", ["--seed", str(2**32)], "argument --seed: must be an integer in [0, 4294967295], got 4294967296"),
    ("adding", ["--seeds", "1", "2", "1"], "argument --seeds: each seed once, got 1 more than once"),
    ("adding", ["--max-time", "nan"], "argument --max-time/--max_time: must be a finite number, got nan"),
    ("adding", ["--max-time", "-1"], "argument --max-time/--max_time: must be a finite number >= 0, got -1.0"),
    ("adding", ["--grad-norm", "-1"], "argument --grad-norm/--grad_norm: must be a finite number >= 0, got -1.0"),
    ("adding", ["--lr-decay-epoch", "-5"], "argument --lr-decay-epoch/--lr_decay_epoch: must be at least 1, got -5"),
    ("adding", ["--device", "nonsense"], "argument --device: 'nonsense' is not a device: expected auto, cpu, cuda"),
    ("adding", ["--device", "meta"], "argument --device: meta: the harness trains on auto, cpu, cuda, cuda:N or mps"),
    pytest.param("fitzhugh_nagumo", ["--device", "cuda"], "argument --device: cuda: this machine has no CUDA GPU",
                 marks=NO_GPU),
    pytest.param("adding", ["--device", "cpu", "--backend", "triton"],
                 "argument --backend: triton runs on CUDA GPUs (or under TRITON_INTERPRET=1), got --device cpu;",
                 marks=NOT_INTERPRETED),
    ("adding", ["--seq-length", "1"], "argument --seq-length/--seq_length: must be at least 2, got 1"),
    ("adding", ["--test-size", "5e6"], "argument --test-size/--test_size: must be an integer >= 1, got '5e6'"),
    ("ptb", ["--l2", "-0.1"], "argument --l2: must be a finite number >= 0, got -0.1"),
    ("ptb", ["--dropout-in", "1.5"], "argument --dropout-in/--dropout_in: must be in [0, 1), got 1.5"),
    ("google12", ["--sha256", "abc"], "argument --sha256: must be 64 hexadecimal digits or 'none', got 'abc'"),
    ("smnist", ["--valid-size", "0"], "argument --valid-size/--valid_size: must be at least 1, got 0"),
]


def refusal(experiment, argv, tmp_path, capsys):
    """(exit code, the last line on stderr) of an in-process train.py run that must stop, checking
    that it stopped without a traceback and without writing anything under tmp_path."""
    with pytest.raises(SystemExit) as stop:
        loop.run(experiments.task_class(experiment), [*argv, "--out-dir", str(tmp_path / "out")]
                 + ([] if "--data-dir" in argv else ["--data-dir", str(tmp_path / "data")]))
    err = capsys.readouterr().err
    assert "Traceback" not in err and not (tmp_path / "out").exists() and not (tmp_path / "data").exists()
    code = stop.value.code
    if isinstance(code, int):  # argparse: usage, then "<prog>: error: <the line>"
        return code, err.strip().splitlines()[-1].split(": error: ", 1)[-1]
    return 1, str(code)


@pytest.mark.parametrize("experiment,argv,line", BAD_FLAGS,
                         ids=[" ".join(getattr(c, "values", c)[1]) for c in BAD_FLAGS])
def test_a_bad_flag_is_one_line_naming_it_with_exit_code_2(experiment, argv, line, tmp_path, capsys):
    code, last = refusal(experiment, argv, tmp_path, capsys)
    assert code == 2 and last.startswith(line), last


def test_a_data_dir_that_is_a_file_or_read_only_is_refused(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("")
    for data_dir, says in ((tmp_path / "file", "is a file; expected a folder"),
                           (tmp_path / "file" / "sub", f"cannot be made: {tmp_path / 'file'} is a file; expected a folder")):
        code, last = refusal("adding", ["--data-dir", str(data_dir)], tmp_path, capsys)
        assert code == 2 and last == f"argument --data-dir (or $LEM_DATA): {data_dir} {says}"
    monkeypatch.setattr(cli.os, "access", lambda path, mode: False)  # as a user who may not write there
    code, last = refusal("adding", ["--data-dir", str(tmp_path)], tmp_path, capsys)
    assert code == 2 and last.endswith(f"{tmp_path} is not writable (data and its caches are written there)")


@pytest.mark.parametrize("saved,given,accepted", [
    ({"device": "cuda:0", "backend": "auto"}, {"device": "cuda:1", "backend": "triton"}, True),  # another GPU
    ({"device": "cpu", "backend": "auto"}, {"device": "cpu", "backend": "cpp"}, True),  # what auto picked
    ({"device": "cuda:0", "backend": "auto"}, {"device": "cpu", "backend": "auto"}, False),
    ({"device": "cpu", "backend": "cpp"}, {"device": "cpu", "backend": "reference"}, False),
    ({"device": "cpu", "backend": "cpp", "max_time": 5}, {"device": "cpu", "backend": "cpp", "max_time": 9}, True),
])
def test_resume_compares_the_device_kind_and_the_backend_it_runs(saved, given, accepted):
    if accepted:
        cli.check_same_arguments(saved, given)
    else:
        with pytest.raises(SystemExit, match="--resume with other arguments than the run was started with: --"):
            cli.check_same_arguments(saved, given)


def test_resume_with_another_backend_refuses_and_each_segment_is_recorded(tmp_path, capsys):
    argv = [*ADDING, "--max-iter", "200", "--out-dir", str(tmp_path), "--data-dir", str(tmp_path), "--device", "cpu"]
    lem.train.run(experiments.task_class("adding"), [*argv, "--max-time", "0"])  # stops after one step
    run_dir = tmp_path / "lem_T10_h4_seed5544"
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    with pytest.raises(SystemExit) as stop:
        lem.train.run(experiments.task_class("adding"), [*argv, "--resume", "--backend", "cpp"])
    assert str(stop.value.code).startswith("--resume with other arguments than the run was started with: "
                                           "--backend cpp (run has reference). They change the numbers")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    summary, = lem.train.run(experiments.task_class("adding"), [*argv, "--resume", "--max-time", "600"])
    config = json.loads((run_dir / "config.json").read_text())
    assert summary["status"] == "finished" and config["args"]["max_time"] == 0  # the run as started
    first, second = config["segments"]
    assert first["ended"] == "interrupted" and first["max_time"] == 0 and first["from"] == {"epoch": 0, "batch": 0}
    assert second["ended"] == "finished" and second["max_time"] == 600 and second["from"] == {"epoch": 0, "batch": 1}
    assert "--max-time" not in config["rerun"] and "--backend" in config["rerun"]


def test_a_killed_segment_is_recorded_as_killed_on_resume(tmp_path, capsys):
    argv = [*ADDING, "--max-iter", "200", "--out-dir", str(tmp_path), "--data-dir", str(tmp_path), "--device", "cpu"]
    lem.train.run(experiments.task_class("adding"), [*argv, "--max-time", "0"])
    run_dir = tmp_path / "lem_T10_h4_seed5544"
    config = json.loads((run_dir / "config.json").read_text())  # what a kill -9 mid-epoch leaves:
    del config["segments"][-1]["ended"]  # a segment that never ended and a summary saying running
    atomic.write_json(run_dir / "config.json", config)
    atomic.write_json(run_dir / "summary.json", {**json.loads((run_dir / "summary.json").read_text()),
                                                 "status": "running"})
    lem.train.run(experiments.task_class("adding"), [*argv, "--resume"])
    assert "note: the run's last process ended without closing it (killed)" in capsys.readouterr().err
    segments = json.loads((run_dir / "config.json").read_text())["segments"]
    assert [s["ended"] for s in segments] == ["killed", "finished"]


def start_adding(out, *extra):
    cmd = [sys.executable, str(REPO / "adding" / "train.py"), *ADDING, "--max-iter", "100000",
           "--out-dir", str(out), "--data-dir", str(out), "--device", "cpu", *extra]
    return subprocess.Popen(cmd, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_removing_run_lock_lets_no_second_trainer_in_and_sigterm_exits_143(tmp_path):
    run_dir = tmp_path / "lem_T10_h4_seed5544"
    first = start_adding(tmp_path)
    deadline = time.time() + 120
    while not (run_dir / "log.jsonl").exists():  # it trains, and holds the folder
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.05)
    (run_dir / rundir.LOCK_FILE).unlink()  # "a stale lock"
    second = run_train("adding", *ADDING, "--max-iter", "100000", "--resume", out_dir=tmp_path, data_dir=tmp_path,
                       check=False)
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert second.stderr.strip() == second.stderr.strip().splitlines()[-1]  # one line
    assert second.stderr.startswith(f"{run_dir} is in use: process (PID unknown: run.lock was removed) is training")
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    assert read_run(run_dir)[0]["status"] == "interrupted"


def test_a_run_beyond_the_machine_stops_before_allocating(tmp_path):
    proc = run_train("adding", "--seq-length", 10**8, out_dir=tmp_path, data_dir=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("this run needs at least ") and "--seq-length x --test-size (the test set) 745 GiB" in \
        proc.stderr and proc.stderr.strip().endswith("Make --seq-length or --batch or --nhid smaller.")
    assert list(tmp_path.iterdir()) == []


def test_a_model_beyond_the_machine_stops_before_allocating_in_any_experiment(tmp_path, capsys):
    """The base Task counts the recurrent weights with their gradients and Adam's moments: a huge
    --nhid stops before the data are made or a folder is written (FitzHugh-Nagumo would solve its
    ODEs first), naming the flag."""
    code, line = refusal("fitzhugh_nagumo", ["--nhid", "1000000", "--device", "cpu"], tmp_path, capsys)
    assert code == 1 and line.startswith("this run needs at least ") and line.endswith("Make --nhid smaller.")
    assert "--nhid (the recurrent weights, their gradients and Adam's two moments) 5.96e+04 GiB" in line


def test_a_nan_before_any_checkpoint_says_so(tmp_path, capsys):
    task_cls = experiments.task_class("adding")
    with pytest.raises(SystemExit) as stop:
        lem.train.run(task_cls, [*ADDING, "--lr", "1e30", "--max-iter", "50", "--out-dir", str(tmp_path),
                                 "--data-dir", str(tmp_path), "--device", "cpu"])
    assert stop.value.code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.match(r"loss is (nan|inf) at epoch 1, batch \d+: stopping; no checkpoint was saved yet", line), line


def test_records_have_the_umask_mode_and_a_damaged_one_is_skipped_by_results(tmp_path, capsys):
    lem.train.run(experiments.task_class("adding"), [*ADDING, "--out-dir", str(tmp_path), "--data-dir", str(tmp_path),
                                                     "--device", "cpu"])
    run_dir = tmp_path / "lem_T10_h4_seed5544"
    modes = {p.name: p.stat().st_mode & 0o777 for p in run_dir.iterdir()}
    assert set(modes.values()) == {0o666 & ~atomic.umask()}, modes
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "summary.json").write_text('{"experiment": "add')  # cut short
    capsys.readouterr()
    results.main([str(tmp_path)])
    out, err = capsys.readouterr()
    assert err == f"skipping {tmp_path / 'broken'}: summary.json does not parse (JSONDecodeError: " \
                  f"Unterminated string starting at: line 1 column 16 (char 15))\n"
    assert "adding" in out
    with open(run_dir / "log.jsonl", "a") as log:
        log.write('{"epoch": 2, "st')  # a log line cut short
    assert len(results.read_log(run_dir)) == 1
    assert capsys.readouterr().err == f"{run_dir / 'log.jsonl'}: line 2 does not parse; the curve ends at line 1\n"


def test_an_error_in_training_leaves_the_summary_saying_failed(tmp_path):
    adding = experiments.task_class("adding")

    class Crashing(adding):
        def loss(self, model, batch_seed):  # the 101st iteration (epoch 2) runs out of memory
            if batch_seed % 1_000_003 >= 100:
                raise RuntimeError("out of memory (a stand-in)")
            return super().loss(model, batch_seed)

    with pytest.raises(RuntimeError, match="a stand-in"):
        lem.train.run(Crashing, [*ADDING, "--max-iter", "200", "--out-dir", str(tmp_path), "--data-dir", str(tmp_path),
                                 "--device", "cpu"])
    summary = read_run(tmp_path / "lem_T10_h4_seed5544")[0]
    assert summary["status"] == "failed" and summary["error"] == "RuntimeError: out of memory (a stand-in)"
    assert summary["epochs_done"] == 1  # and the epoch before it is kept: --resume continues from there
