"""python -m lem.tools.tune: a study survives a SIGKILL mid-trial, two workers share one study,
pruned and NaN trials end their runs cleanly, the tuned re-runs show in lem.tools.results."""
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from helpers import REPO, train_env  # noqa: E402
from lem.tools import results, tune  # noqa: E402

TINY_FHN = ["--n-train", "8", "--n-valid", "4", "--n-test", "4", "--nhid", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fhn_data")


def tune_command(out_dir, data_dir, *extra):
    return [sys.executable, "-m", "lem.tools.tune", "fitzhugh_nagumo", "--model", "lem", *TINY_FHN,
            "--out-dir", str(out_dir), "--data-dir", str(data_dir), *map(str, extra)]


def start(command, log):
    return subprocess.Popen(command, cwd=REPO, env=train_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)


def finish(proc, log, timeout=600):
    assert proc.wait(timeout=timeout) == 0, Path(log).read_text()[-4000:]
    return Path(log).read_text()


def load_study(folder, name="fitzhugh_nagumo-lem", storage=None):
    return optuna.load_study(study_name=name, storage=storage or f"sqlite:///{folder / 'study.db'}")


def epochs_logged(folder):
    file = folder / "log.jsonl"
    return [json.loads(line)["epoch"] for line in file.read_text().splitlines()] if file.exists() else []


def wait_for(condition, proc, what, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the study ended before {what}"
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.02)


def test_study_killed_mid_trial_resumes_that_trial_and_runs_none_twice(tmp_path, data_dir, monkeypatch):
    folder, epochs = tmp_path / "lem", 25
    command = tune_command(tmp_path, data_dir, "--trials", 3, "--epochs", epochs, "--pruner", "none", "--sampler-seed", 0)
    proc = start(command, tmp_path / "first.log")
    wait_for(lambda: len(epochs_logged(folder / "trial_1")) >= 3, proc, "trial 1 three epochs in")
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    before = {t.number: t for t in load_study(folder).get_trials()}
    assert before[0].state.name == "COMPLETE" and before[1].state.name == "RUNNING" and 2 not in before
    trial_0_log = (folder / "trial_0" / "log.jsonl").read_text()
    killed_at = len(epochs_logged(folder / "trial_1"))
    monkeypatch.chdir(REPO)
    tune.main([*command[3:], "--report"])  # the study as it stands, nothing run
    report = json.loads((folder / "study.json").read_text())
    assert report["states"] == {"COMPLETE": 1, "RUNNING": 1} and not report["finished"]
    assert len(load_study(folder).get_trials()) == 2

    out = finish(start(command, tmp_path / "plain.log"), tmp_path / "plain.log")
    assert "--resume continues them" in out and "trial 1" not in out.replace("trials [1]", "")
    out = finish(start([*command, "--resume"], tmp_path / "resume.log"), tmp_path / "resume.log")

    after = {t.number: t for t in load_study(folder).get_trials()}
    assert sorted(after) == [0, 1, 2] and all(t.state.name == "COMPLETE" for t in after.values())
    assert after[0].value == before[0].value and (folder / "trial_0" / "log.jsonl").read_text() == trial_0_log
    assert after[1].params == before[1].params
    resumed_at = int(re.search(rf"resumed {re.escape(str(folder / 'trial_1'))} at epoch (\d+)", out).group(1))
    assert resumed_at in (killed_at, killed_at + 1)  # its checkpoint is saved just before its log
    for n in range(3):
        assert epochs_logged(folder / f"trial_{n}") == list(range(1, epochs + 1))
        assert json.loads((folder / f"trial_{n}" / "summary.json").read_text())["status"] == "finished"
    assert sorted(p.name for p in folder.glob("trial_*")) == ["trial_0", "trial_1", "trial_2"]
    study = json.loads((folder / "study.json").read_text())
    assert study["finished"] and study["states"] == {"COMPLETE": 3}
    assert study["best"]["value"] == min(t.value for t in after.values())
    assert (folder / "history.png").stat().st_size > 0 and (folder / "importances.png").stat().st_size > 0


def test_two_workers_on_one_journal_storage_share_one_study(tmp_path, data_dir):
    journal = tmp_path / "shared.journal"
    command = tune_command(tmp_path, data_dir, "--trials", 6, "--epochs", 60, "--pruner", "none",
                           "--storage", f"journal:{journal}")
    first, second = start(command, tmp_path / "a.log"), start(command, tmp_path / "b.log")  # the same command, twice
    logs = [finish(first, tmp_path / "a.log"), finish(second, tmp_path / "b.log")]

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    trials = load_study(None, storage=storage).get_trials()
    assert sorted(t.number for t in trials) == list(range(6)) and all(t.state.name == "COMPLETE" for t in trials)
    ran = [{n for n in range(6) if f"trial {n}: best" in log} for log in logs]
    assert ran[0] and ran[1] and ran[0].isdisjoint(ran[1]) and ran[0] | ran[1] == set(range(6))


class Pruning:
    """A trial whose pruner stops it at its second epoch."""

    def __init__(self):
        self.reported = []

    def report(self, value, step):
        self.reported.append(step)

    def should_prune(self):
        return len(self.reported) >= 2


def test_pruned_run_ends_its_folder_cleanly(tmp_path, data_dir):
    from fitzhugh_nagumo.train import FitzHughNagumo

    trial = Pruning()
    argv = [*TINY_FHN, "--epochs", "10", "--out-dir", str(tmp_path), "--data-dir", str(data_dir), "--run-name", "t"]
    summary, stopped = tune.train(tune.reporting(FitzHughNagumo, trial, "valid"), argv, tmp_path / "t")
    assert stopped is None and summary["status"] == "pruned" and summary["epochs_done"] == 2
    assert trial.reported == [1, 2] and epochs_logged(tmp_path / "t") == [1, 2]
    assert (tmp_path / "t" / "checkpoint.pt").exists()
    assert json.loads((tmp_path / "t" / "summary.json").read_text())["status"] == "pruned"


def test_nan_trial_is_pruned_not_fatal(tmp_path, data_dir, monkeypatch, capsys):
    import torch
    from fitzhugh_nagumo.train import FitzHughNagumo

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(FitzHughNagumo, "loss", lambda self, model, idx: torch.tensor(float("nan"), requires_grad=True))
    tune.main(["fitzhugh_nagumo", "--model", "gru", "--trials", "2", *TINY_FHN, "--epochs", "3",
               "--out-dir", str(tmp_path), "--data-dir", str(data_dir)])
    trials = load_study(tmp_path / "gru", "fitzhugh_nagumo-gru").get_trials()
    assert [t.state.name for t in trials] == ["PRUNED", "PRUNED"]
    assert all(t.user_attrs["ended"] == "nan" for t in trials)
    with pytest.raises(SystemExit, match="not finished|no complete trial"):
        tune.main(["fitzhugh_nagumo", "--model", "gru", "--trials", "2", *TINY_FHN, "--epochs", "3",
                   "--out-dir", str(tmp_path), "--data-dir", str(data_dir), "--seeds", "1"])


def test_given_flags_are_not_searched_and_a_joined_study_keeps_its_settings(tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(REPO)

    def command(lr):
        return ["fitzhugh_nagumo", "--model", "lem", "--trials", "2", *TINY_FHN, "--epochs", "2", "--lr", lr,
                "--out-dir", str(tmp_path), "--data-dir", str(data_dir)]
    tune.main(command("0.02"))
    trials = load_study(tmp_path / "lem").get_trials()
    assert len(trials) == 2 and all(set(t.params) == {"batch", "dt"} for t in trials)
    assert all(json.loads((tmp_path / "lem" / f"trial_{t.number}" / "config.json").read_text())["args"]["lr"] == 0.02
               for t in trials)
    with pytest.raises(SystemExit, match="other settings: train_flags"):
        tune.main(command("0.03"))


def test_tuned_reruns_sit_beside_default_runs_in_results(tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    study_args = ["fitzhugh_nagumo", "--model", "lstm", "--trials", "2", "--trial-epochs", "2", "--pruner", "hyperband",
                  *TINY_FHN, "--epochs", "3", "--out-dir", str(tmp_path / "tune"), "--data-dir", str(data_dir)]
    tune.main([*study_args, "--seeds", "7", "8"])
    default = ["--model", "lstm", *TINY_FHN, "--epochs", "3", "--data-dir", str(data_dir),
               "--out-dir", str(tmp_path / "results")]
    from fitzhugh_nagumo.train import FitzHughNagumo
    for seed in ("7", "8"):
        tune.train(FitzHughNagumo, [*default, "--seed", seed], tmp_path / "results")
    best = tmp_path / "tune" / "lstm" / "best"
    assert [epochs_logged(best / f"lstm_seed{s}") for s in (7, 8)] == [[1, 2, 3]] * 2  # full length, not --trial-epochs
    capsys.readouterr()

    results.main([str(tmp_path), "--markdown"])
    header, _, *body = [[c.strip() for c in line[1:-1].split("|")] for line in capsys.readouterr().out.strip().splitlines()]
    rows = [dict(zip(header, row)) for row in body]
    assert len(rows) == 2 and [r["seeds"] for r in rows] == ["2", "2"]
    best_trial = json.loads((tmp_path / "tune" / "lstm" / "study.json").read_text())["best"]["number"]
    assert sorted(r["tuned"] for r in rows) == ["-", f"fitzhugh_nagumo-lstm, trial {best_trial} of 2"]
    results.main([str(tmp_path), "--trials"])
    assert capsys.readouterr().out.count("\nfitzhugh_nagumo") == 4


def test_a_task_without_validation_is_refused_and_adding_seeds_must_be_new(tmp_path, monkeypatch):
    from lem.train import Task

    class TestOnly(Task):
        name, metric, eval_splits = "x", "mse", ("test",)

    with pytest.raises(SystemExit, match="needs a validation split"):
        tune.objective_split(TestOnly)
    monkeypatch.chdir(REPO)
    tiny_adding = ["adding", "--model", "lem", "--trials", "1", "--seq-length", "10", "--max-iter", "200", "--nhid", "4",
                   "--test-size", "20", "--device", "cpu", "--out-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match="--seeds 5544"):
        tune.main([*tiny_adding, "--seeds", "5544", "1"])
    summary = json.loads((tmp_path / "lem" / "study.json").read_text())
    assert summary["split"] == "test" and summary["states"] == {"COMPLETE": 1}
