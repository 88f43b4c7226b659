"""The reported runs under docs/runs: the README's results table is what lem.tools.results prints from
them, they name no folder of the machine that ran them, and a committed run re-runs to its figures."""
from importlib import import_module
import json
import os
import re
import sys
from pathlib import Path

import pytest

from lem.tools import reproduce, results

from helpers import REPO
RUNS = REPO / "docs" / "runs"
TABLE_START = "<!-- python -m lem.tools.results --markdown docs/runs -->"
TABLE_END = "<!-- end of table -->"


def readme_table():
    text = (REPO / "README.md").read_text()
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    return text[start:end].strip()


def test_readme_results_table_is_what_lem_results_prints(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    results.main(["docs/runs", "--markdown"])
    assert readme_table() == capsys.readouterr().out.strip()


def strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


def test_run_records_hold_no_absolute_paths():
    files = sorted(RUNS.rglob("*.json")) + sorted(RUNS.rglob("*.jsonl"))
    assert files, "no run records under docs/runs"
    for file in files:
        lines = file.read_text().splitlines() if file.suffix == ".jsonl" else [file.read_text()]
        for text in strings([json.loads(line) for line in lines]):
            for word in text.split():
                assert not (os.path.isabs(word) or re.match(r"[A-Za-z]:\\", word)), f"{file}: {text!r}"


def test_run_records_are_whole():
    for summary_file in RUNS.rglob("summary.json"):
        folder = summary_file.parent
        tuned = {"tuned.json"} & {p.name for p in folder.iterdir()}  # a re-run of a study's best (docs/tuning.md)
        assert {p.name for p in folder.iterdir()} == {"config.json", "log.jsonl", "summary.json", *tuned}, folder
        summary = json.loads(summary_file.read_text())
        records = reproduce.read_records(folder)
        # a run stopped by --max-time ("interrupted") is reported as far as it got; one killed ("running") is
        # not; a study's trial may have been pruned
        ends = ("finished", "interrupted", "pruned") if results.is_trial({"folder": folder}) else ("finished", "interrupted")
        assert summary["status"] in ends, folder
        assert summary["epochs_done"] == len(records), folder


@pytest.mark.parametrize("run", ["fitzhugh_nagumo/lem_h16_seed1234", "fitzhugh_nagumo/lstm_h16_seed1234"])
def test_committed_fitzhugh_nagumo_run_reproduces_its_first_epochs(run, tmp_path_factory):
    """Same machine kind, same backend: the first two epochs give the recorded figures exactly
    (the whole run: python -m lem.tools.reproduce docs/runs/<run>). The trajectories are solved once
    for both runs (seed 1234)."""
    recorded = reproduce.read_records(RUNS / run)
    repeated = reproduce.rerun(RUNS / run, epochs=2, data_dir=tmp_path_factory.getbasetemp() / "fhn_data")
    assert len(repeated) == 2
    assert reproduce.differences(recorded, repeated) == []


def test_rerun_command_parses_back_to_the_run_and_paths_are_recorded_portably(monkeypatch):
    from lem.train import cli, rundir

    module = import_module("fitzhugh_nagumo.train")
    task_cls = module.FitzHughNagumo
    parser = cli.build_parser(task_cls)
    args = parser.parse_args(["--model", "gru", "--seeds", "3", "4", "--lr", "0.5", "--backend", "reference",
                              "--max-time", "60", "--data-dir", "/somewhere", "--n_test", "8"])
    args.seed = 4  # what run() passes to train() for the second seed
    argv = cli.rerun_command(task_cls, args)
    assert argv[0] == "fitzhugh_nagumo/train.py"
    again = vars(parser.parse_args(argv[1:]))
    for key, value in vars(args).items():
        if key not in cli.RUN_ONLY_FLAGS - {"backend"}:
            assert again[key] == value, key
    assert "--seeds" not in argv and "--max-time" not in argv and "--data-dir" not in argv

    assert rundir.portable(REPO / "data" / "fitzhugh_nagumo", REPO) == "data/fitzhugh_nagumo"
    assert rundir.portable("/somewhere/else", REPO) == "/somewhere/else" and rundir.portable(None, REPO) is None
