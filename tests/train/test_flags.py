"""No flag does nothing. Every flag every train.py --help lists reaches the config its run writes
and the command recorded to repeat it; every underscore spelling lands where the dash-case one
does; and two real runs read every flag they were given."""
import argparse
import re

import pytest

from lem.tools import experiments
from lem.train import cli, loop
from lem.nn import LEM
from helpers import REPO

TASKS = [(name, argv) for name in experiments.names() for argv in ([], ["--level", "char"])
         if name == "ptb" or not argv]


def listed_flags(parser):
    """The flags parser's --help lists, in order."""
    return list(dict.fromkeys(re.findall(r"(?<![\w-])--[a-z][\w-]*", parser.format_help())))


def other_value(action, flag):
    """(argv tail, expected value) giving flag a value that is not its default, or None where the
    flag has no other value (PTB's --model lem)."""
    if isinstance(action, argparse.BooleanOptionalAction):
        return [], not flag.startswith("--no-")
    if isinstance(action, argparse._StoreTrueAction):
        return [], True
    if action.choices:
        others = [c for c in action.choices if c != action.default]
        return ([others[0]], others[0]) if others else None
    if action.nargs == "+":
        return ["3", "4"], [3, 4]
    kind = getattr(action.type, "__name__", None)
    if kind == "int":
        value = (action.default or 0) + 2
        return [str(value)], value
    if kind in ("float", "probability"):
        return ["0.25"], 0.25
    if kind == "device":
        return ["cpu"], "cpu"
    if kind == "sha256":
        return ["none"], "none"
    return ["/tmp/lem-flag-value"], "/tmp/lem-flag-value"  # a folder, a URL, a name: any text


@pytest.mark.parametrize("name,level", TASKS, ids=[" ".join([n, *a]) for n, a in TASKS])
def test_every_listed_flag_reaches_the_recorded_config_and_rerun_command(name, level):
    task_cls = experiments.task_class(name, level)
    parser = cli.build_parser(task_cls)
    flags = listed_flags(parser)
    assert set(flags) == {s for a in parser._actions for s in a.option_strings if s != "-h"}  # --help hides none
    defaults = cli.recorded_flags(task_cls, cli.parse_args(task_cls, level), REPO)["args"]
    for flag in flags:
        action = parser._option_string_actions[flag]
        if flag in ("-h", "--help") or other_value(action, flag) is None:
            continue
        tail, expected = other_value(action, flag)
        args = cli.parse_args(task_cls, [*level, flag, *tail])
        recorded = cli.recorded_flags(task_cls, args, REPO)
        assert recorded["args"][action.dest] == expected, flag
        if action.dest != "level":  # --level char with the word class: only that flag differs
            assert {k: v for k, v in recorded["args"].items() if k != action.dest} == \
                   {k: v for k, v in defaults.items() if k != action.dest}, flag
        if action.dest not in cli.RUN_ONLY_FLAGS - {"backend"}:  # the rerun command repeats it
            again = cli.parse_args(task_cls, recorded["rerun"][1:])
            assert cli.recorded_flags(task_cls, again, REPO)["args"] == recorded["args"], flag
        if "_" in action.dest:  # the spelling of the reference code and older run records
            assert any(s == "--" + s[2:].replace("-", "_") and "_" in s for s in action.option_strings), flag
            assert flag.startswith("--no-") or action.option_strings[0] == "--" + action.dest.replace("_", "-")


def test_flags_are_dash_case_and_the_underscore_spellings_still_parse():
    task_cls = experiments.task_class("fitzhugh_nagumo")
    old = ["--grad_norm", "0.5", "--lr_decay_epoch", "7", "--n_train", "12", "--data_dir", "/tmp/d"]
    new = ["--grad-norm", "0.5", "--lr-decay-epoch", "7", "--n-train", "12", "--data-dir", "/tmp/d"]
    assert vars(cli.parse_args(task_cls, old)) == vars(cli.parse_args(task_cls, new))
    assert "--grad-norm" in cli.rerun_command(task_cls, cli.parse_args(task_cls, old))


def test_adding_honours_epochs_and_ptb_offers_only_lem():
    adding = experiments.task_class("adding")
    task = adding(cli.parse_args(adding, ["--seq-length", "4", "--test-size", "2", "--max-iter", "250"]), None)
    assert task.num_epochs() == 3  # 100 + 100 + 50 iterations
    task.args.epochs = 2
    assert task.num_epochs() == 2
    with pytest.raises(SystemExit):
        cli.build_parser(experiments.task_class("ptb")).parse_args(["--model", "lstm"])


class Reads(argparse.Namespace):
    """Flags that remember being read (not through vars(): recording a flag is not using it)."""
    names = set()

    def __getattribute__(self, name):
        if not name.startswith("_"):
            Reads.names.add(name)
        return super().__getattribute__(name)


@pytest.mark.parametrize("name,argv", [
    ("fitzhugh_nagumo", ["--n-train", "8", "--n-valid", "4", "--n-test", "4", "--nhid", "4", "--epochs", "1"]),
    ("adding", ["--seq-length", "10", "--max-iter", "150", "--epochs", "1", "--test-size", "8", "--nhid", "4"]),
])
def test_a_real_run_reads_every_flag(name, argv, tmp_path, monkeypatch):
    task_cls = experiments.task_class(name)
    parse = cli.parse_args
    monkeypatch.setattr(cli, "parse_args", lambda cls, a=None: Reads(**vars(parse(cls, a))))
    Reads.names = set()
    summary, = loop.run(task_cls, [*argv, "--backend", "reference", "--out-dir", str(tmp_path),
                                      "--data-dir", str(tmp_path), "--device", "cpu"])
    assert summary["status"] == "finished" and summary["epochs_done"] == 1
    dests = {a.dest for a in cli.build_parser(task_cls)._actions if a.dest != "help"}
    # adding draws its data in memory: --data-dir has no files to find (lem.tools.reproduce passes it to every run)
    assert dests - Reads.names == ({"data_dir"} if name == "adding" else set())


def test_every_layer_takes_the_backend_flag_and_defaults_name_flags():
    adding = experiments.task_class("adding")
    args = cli.parse_args(adding, ["--seq-length", "4", "--test-size", "2", "--backend", "reference"])
    task = adding(args, None)
    assert {m.backend for m in loop.make_model(task, args)[0].modules() if isinstance(m, LEM)} == {"reference"}
    misspelt = type("Misspelt", (adding,), {"defaults": {**adding.defaults, "grad_nrom": 1.0}})
    with pytest.raises(TypeError, match="grad_nrom"):
        cli.build_parser(misspelt)
    misspelt = type("Misspelt", (adding,), {"search": {**adding.search, "bacth": (8, 16)}})
    with pytest.raises(TypeError, match="bacth"):
        cli.build_parser(misspelt)


def test_declared_search_ranges_draw_what_the_hand_written_spaces_drew():
    """FitzHugh-Nagumo's and adding's `search` give the search spaces their studies under docs/runs
    were drawn from (lr, batch, then Δt for LEM), so those studies re-run as recorded."""
    optuna = pytest.importorskip("optuna")
    for name, want in [("fitzhugh_nagumo", {"lr": (1e-3, 5e-2), "batch": (16, 32, 64), "dt": (0.1, 2.0)}),
                       ("adding", {"lr": (5e-4, 1e-2), "batch": (25, 50, 100), "dt": (0.005, 0.1)})]:
        trial = optuna.create_study().ask()
        experiments.task_class(name).search_space(trial, "lem")
        d = trial.distributions
        assert list(d) == ["lr", "batch", "dt"] and d["lr"].log and d["dt"].log
        assert ((d["lr"].low, d["lr"].high), tuple(d["batch"].choices), (d["dt"].low, d["dt"].high)) == \
            (want["lr"], want["batch"], want["dt"])
