"""python -m lem.tools.results: the Markdown table and the learning-curve plot, on run folders the harness writes."""
import json
import re

import pytest
from PIL import Image

from lem import atomic
from lem.tools import results
from lem.train import rundir, task


class Sequences(task.Task):
    name, metric, paper = "fitzhugh_nagumo", "rmse", 0.002


class Adding(task.Task):
    name, metric, paper, eval_splits = "adding", "mse", "1e-4 ... 1e-5", ("test",)


class Compared(task.Task):
    name, metric, paper, baseline = "compared", "rmse", {"lem": 0.002, "lstm": 0.012}, 0.5


def write_run(folder, task_cls, seed, values, model="lem", **args):
    """A run folder as loop.train leaves it, with one record per value of the metric."""
    history = []
    for epoch, value in enumerate(values, 1):
        record = {"epoch": epoch, "step": 10 * epoch, "lr": 1e-3, "time_s": float(epoch)}
        for split in task_cls.eval_splits:
            record[split] = {task_cls.metric: value}
        history.append(record)
    state = {"epoch": len(values), "step": 10 * len(values), "elapsed": 1.0, "history": history,
             "best": min(history, key=lambda r: r["valid"][task_cls.metric]) if "valid" in task_cls.eval_splits else None}
    config = {"args": {"model": model, "nhid": 16, "seed": seed, "lr": 1e-3, **args}, "experiment": task_cls.name}
    run = rundir.Run(folder, task_cls)
    atomic.write_json(folder / "config.json", config)
    run.write_logs(history)
    run.write_summary(state, "finished", config)


@pytest.fixture
def runs_dir(tmp_path):
    write_run(tmp_path / "fhn" / "lem_h16_seed1", Sequences, 1, [0.3, 0.1, 0.05])
    write_run(tmp_path / "fhn" / "lem_h16_seed2", Sequences, 2, [0.2, 0.08, 0.01, 0.004])
    write_run(tmp_path / "adding" / "lem_T20_h16_seed1", Adding, 1, [0.17, 0.01])
    return tmp_path


def test_markdown_table_has_one_row_per_experiment(runs_dir, capsys):
    results.main([str(runs_dir), "--markdown"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines)
    cells = [[c.strip() for c in line[1:-1].split("|")] for line in lines]
    header, rule, *body = cells
    assert all(re.fullmatch(r":?-{3,}:?", c) for c in rule) and len(rule) == len(header)
    assert all(len(row) == len(header) for row in body)
    rows = {row[header.index("experiment")]: dict(zip(header, row)) for row in body}
    assert set(rows) == {"fitzhugh_nagumo", "adding"} and len(body) == 2
    assert rows["fitzhugh_nagumo"]["seeds"] == "2" and rows["fitzhugh_nagumo"]["paper"] == "0.002"
    # test at the best validation epoch: 0.05 and 0.004
    assert rows["fitzhugh_nagumo"]["test (mean ± std)"] == results.format_value(0.027, 0.0325269)


def test_plot_writes_a_png_with_one_curve_per_run_and_the_paper_dashed(runs_dir, tmp_path):
    png = tmp_path / "curves.png"
    results.main([str(runs_dir), "--plot", str(png)])
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (1200, 400)  # two panels, 6 x 4 inches each at 100 dpi

    fig = results.plot(results.load_runs([runs_dir]), tmp_path / "again.png", x_axis="step")
    panels = {ax.get_title(): ax for ax in fig.axes}
    assert set(panels) == {"fitzhugh_nagumo", "adding"}
    fhn, adding = panels["fitzhugh_nagumo"], panels["adding"]
    solid = [line for line in fhn.get_lines() if line.get_linestyle() == "-"]
    dashed = [line for line in fhn.get_lines() if line.get_linestyle() == "--"]
    assert sorted(line.get_label() for line in solid) == ["lem_h16_seed1", "lem_h16_seed2"]
    assert [line.get_ydata()[0] for line in dashed] == [0.002]
    assert list(solid[0].get_xdata()) in ([10, 20, 30], [10, 20, 30, 40])
    assert fhn.get_ylabel() == "valid rmse" and fhn.get_yscale() == "log"
    assert len(adding.get_lines()) == 3 and adding.get_ylabel() == "test mse"  # one run, the paper's 1e-4 and 1e-5


def test_paper_values():
    assert results.paper_values(0.002) == [0.002]
    assert results.paper_values("1e-4 ... 1e-5") == [1e-4, 1e-5]
    assert results.paper_values("92.3 %") == [92.3]
    assert results.paper_values(None) == []


def test_paper_figure_is_the_runs_own_models_and_settings_are_told_apart(tmp_path, capsys):
    write_run(tmp_path / "lem_1", Compared, 1, [0.1, 0.01], backend="cpp")
    write_run(tmp_path / "lem_2", Compared, 2, [0.1, 0.03], backend="reference")  # same setting, other backend
    write_run(tmp_path / "lstm_1", Compared, 1, [0.2, 0.1], model="lstm")
    write_run(tmp_path / "gru_1", Compared, 1, [0.2, 0.1], model="gru")
    write_run(tmp_path / "add_short", Adding, 1, [0.1], seq_length=200)
    write_run(tmp_path / "add_long", Adding, 1, [0.2], seq_length=2000)
    summaries = {f.parent.name: json.loads(f.read_text()) for f in tmp_path.rglob("summary.json")}
    assert [summaries[k]["paper"] for k in ("lem_1", "lstm_1", "gru_1", "add_short")] == [0.002, 0.012, None, "1e-4 ... 1e-5"]
    assert summaries["lem_1"]["baseline"] == 0.5 and summaries["add_short"]["baseline"] is None

    results.main([str(tmp_path), "--markdown"])
    header, _, *body = [[c.strip() for c in line[1:-1].split("|")] for line in capsys.readouterr().out.strip().splitlines()]
    rows = [dict(zip(header, row)) for row in body]
    assert [(r["experiment"], r["model"], r["setting"], r["seeds"], r["paper"]) for r in rows] == [
        ("adding", "lem", "seq_length=200", "1", "1e-4 ... 1e-5"), ("adding", "lem", "seq_length=2000", "1", "1e-4 ... 1e-5"),
        ("compared", "lem", "-", "2", "0.002"), ("compared", "lstm", "-", "1", "0.012"), ("compared", "gru", "-", "1", "-")]

    fig = results.plot(results.load_runs([tmp_path]), tmp_path / "curves.png")
    compared = {ax.get_title(): ax for ax in fig.axes}["compared"]
    colours = {line.get_label(): line.get_color() for line in compared.get_lines()}
    assert colours["lem_1"] == colours["lem_2"] != colours["lstm_1"] != colours["gru_1"]
    references = {line.get_label(): (line.get_ydata()[0], line.get_linestyle()) for line in compared.get_lines()
                  if line.get_linestyle() != "-"}
    assert references == {"paper, lem: 0.002": (0.002, "--"), "paper, lstm: 0.012": (0.012, "--"),
                          "baseline: 0.5": (0.5, ":")}
