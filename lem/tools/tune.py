"""Hyper-parameter search on Optuna (docs/tuning.md):

    python -m lem.tools.tune EXPERIMENT --model lem|lstm|gru --trials N [--trial-epochs E]
        [--storage URL] [--study-name NAME] [--pruner median|hyperband|none] [--resume]
        [--seeds S1 S2 S3] [--report] [train.py flags ...]

The experiment's Task declares what is searched (Task.search_space) and on which split
(Task.tune_split, validation: never the test split unless the experiment says why). Every trial
is a normal run of the experiment's train.py, with the flags given here and the trial's values,
in <study folder>/trial_<n> (config.json, log.jsonl, summary.json, lock, checkpoints); each
epoch's metric feeds the pruner, a pruned trial's run ends with status "pruned", a NaN trial is
pruned. The objective is the trial's best value on that split.

The study folder is <experiment>/tune/<model> (or --out-dir/<model>; --study-name names it
instead), with the study in its study.db (SQLite) unless --storage names another Optuna storage:
an RDB URL (postgresql://..., mysql://...), or "journal:FILE" for Optuna's journal file on a
shared file system. The same command started in several processes or machines works one study
together; --trials N counts the study's trials in all. A worker killed mid-trial leaves that trial
RUNNING: --resume takes it over and continues its run folder from its checkpoint.

After the study, --seeds re-runs its best configuration once per seed for the reported figure,
at the run's --epochs (the paper's unless given; --trial-epochs shortens the trials only), in
<study folder>/best/<run name>, each with a tuned.json naming the study and trial; study.json
sums the study up and history.png / importances.png are Optuna's plots of it.
"""
import argparse
import contextlib
import fcntl
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

try:
    import optuna
except ImportError as e:  # an optional dependency of the experiments, not of the layer
    raise ImportError("python -m lem.tools.tune needs optuna: pip install optuna (see requirements.txt)") from e

from .. import atomic, checkout
from ..train import cli, loop, rundir
from . import experiments

TOOL_FLAGS_NOT_PASSED = ("--run-name", "--seeds", "--resume", "--model", "--out-dir")


def parse_arguments(argv):
    """(the tool's options, the train.py flags that pass through to every run)."""
    p = argparse.ArgumentParser(prog="python -m lem.tools.tune", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment")
    p.add_argument("--model", required=True)
    p.add_argument("--trials", type=cli.at_least(1), required=True, help="trials of the study in all (every worker)")
    p.add_argument("--trial-epochs", type=cli.at_least(1), default=None,
                   help="--epochs of each trial (default: the run's --epochs); --seeds re-runs use the run's")
    p.add_argument("--storage", default=None,
                   help="an Optuna storage URL, or journal:FILE (default: SQLite in the study folder)")
    p.add_argument("--study-name", default=None, help="default: <experiment>-<model>")
    p.add_argument("--out-dir", default=None, help="where study folders go (default: <experiment>/tune)")
    p.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median")
    p.add_argument("--warmup-epochs", type=cli.at_least(0), default=5,
                   help="median pruner: epochs before a trial may be pruned")
    p.add_argument("--startup-trials", type=cli.at_least(0), default=5, help="median pruner: trials never pruned")
    p.add_argument("--sampler-seed", type=int, default=None,
                   help="seed of the TPE sampler (one worker: a reproducible study)")
    p.add_argument("--nhid-choices", type=cli.at_least(1), nargs="+", default=None,
                   help="search --nhid among these (default: fixed, so parameter budgets stay comparable)")
    p.add_argument("--resume", action="store_true", help="also continue the trials that killed workers left running")
    p.add_argument("--report", action="store_true",
                   help="only write study.json and the plots of the study as it stands (trials left running included)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="after the study, one run of its best configuration per seed")
    opts, flags = p.parse_known_args(argv)
    passed = [f for f in flags if f.split("=")[0].replace("_", "-") in TOOL_FLAGS_NOT_PASSED]
    if passed:
        p.error(f"{', '.join(passed)}: the tool sets this for every run")
    return opts, flags


@dataclass
class Study:
    """One worker's view of the study: the Optuna study, where its runs go, how they are made."""
    opts: argparse.Namespace
    task_cls: type
    flags: list              # train.py flags of every run
    args: argparse.Namespace  # what train.py makes of them
    folder: Path
    root: Path
    study: object = None

    @property
    def split(self):
        return self.task_cls.tune_split

    def trial_folder(self, number):
        return self.folder / f"trial_{number}"

    def run_argv(self, params, epochs=None):
        """train.py's argv of a run with these searched values."""
        argv = [*self.flags, "--model", self.opts.model]
        for name, value in params.items():
            argv += [f"--{name.replace('_', '-')}", str(value)]
        return argv + (["--epochs", str(epochs)] if epochs else [])


def objective_split(task_cls):
    """The split the study selects on, or a clear refusal."""
    split = task_cls.tune_split
    if split not in task_cls.eval_splits:
        raise SystemExit(f"{task_cls.name} evaluates {', '.join(task_cls.eval_splits)} only, not its tune_split "
                         f"{split!r}: tuning needs a validation split (selecting on test would report a tuned test figure)")
    return split


def study_folder(opts, root):
    base = Path(opts.out_dir) if opts.out_dir else root / opts.experiment / "tune"
    return base / (opts.study_name or opts.model)


def make_storage(url, folder):
    """The Optuna storage a --storage value names (default: SQLite in the study folder)."""
    if url is None:
        url = f"sqlite:///{folder / 'study.db'}"
    if url.startswith("journal:"):
        backend = optuna.storages.journal.JournalFileBackend(url[len("journal:"):])
        return optuna.storages.JournalStorage(backend)
    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else None  # several workers wait for the file
    return optuna.storages.RDBStorage(url, engine_kwargs=engine)


def make_pruner(opts):
    if opts.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=opts.startup_trials, n_warmup_steps=opts.warmup_epochs)
    if opts.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    return optuna.pruners.NopPruner()


def settings(s):
    """What every worker of one study must agree on."""
    return {"experiment": s.opts.experiment, "model": s.opts.model, "train_flags": s.flags,
            "trial_epochs": s.opts.trial_epochs, "nhid_choices": s.opts.nhid_choices, "split": s.split,
            "metric": s.task_cls.metric}


def open_study(s):
    """Create the study, or join it (the same settings) when it exists."""
    name = s.opts.study_name or f"{s.opts.experiment}-{s.opts.model}"
    with folder_lock(s.folder / "ask.lock"):
        s.study = optuna.create_study(
            study_name=name, storage=make_storage(s.opts.storage, s.folder), load_if_exists=True,
            direction="maximize" if s.task_cls.higher_is_better else "minimize",
            sampler=optuna.samplers.TPESampler(seed=s.opts.sampler_seed), pruner=make_pruner(s.opts))
        recorded = s.study.user_attrs.get("settings")
        if recorded is None:
            s.study.set_user_attr("settings", settings(s))
        elif recorded != settings(s):
            differ = {k: (recorded.get(k), v) for k, v in settings(s).items() if recorded.get(k) != v}
            raise SystemExit(f"study {name!r} was started with other settings: "
                             + "; ".join(f"{k}: {old} there, {new} here" for k, (old, new) in differ.items()))


@contextlib.contextmanager
def folder_lock(path):
    """An exclusive lock on path held by this block; workers on one study folder wait for each other."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def claim_trial(s, number):
    """The lock of trial_<number>'s folder (made if need be), or None when a live worker holds it."""
    folder = s.trial_folder(number)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return rundir.lock(folder / "trial.lock")
    except BlockingIOError:
        return None


def stale_trials(s):
    """Trials left RUNNING by killed workers whose folders this machine sees: each (trial, lock)."""
    taken = []
    for t in s.study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING]):
        if not s.trial_folder(t.number).is_dir():
            continue  # a worker elsewhere, whose folders this machine does not see
        fd = claim_trial(s, t.number)
        if fd is not None:
            taken.append((optuna.trial.Trial(s.study, t._trial_id), fd))  # the same trial, continued here
    return taken


def abandoned(s):
    """The numbers of the trials that stale_trials would take over, left alone."""
    return [t.number for t in s.study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING])
            if s.trial_folder(t.number).is_dir() and not locked(s.trial_folder(t.number) / "trial.lock")]


def locked(path):
    """Whether a live process holds the lock file path."""
    try:
        os.close(rundir.lock(path))
        return False
    except BlockingIOError:
        return True


def next_trial(s):
    """A new trial and its folder's lock, or None once the study holds --trials trials."""
    with folder_lock(s.folder / "ask.lock"):
        if len(s.study.get_trials(deepcopy=False)) >= s.opts.trials:
            return None
        trial = s.study.ask()
        if trial.number >= s.opts.trials:  # a worker on another machine asked at the same moment
            trial.set_user_attr("surplus", True)
            s.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return None
        fd = claim_trial(s, trial.number)
        if fd is None:
            raise SystemExit(f"{s.trial_folder(trial.number)} is held by another process: is the worker of an "
                             f"older study of that folder still running?")
        return trial, fd


class FixedFlags:
    """A trial as search_space sees it: flags given on the command line keep their value and are
    not searched; --nhid-choices adds nhid to the search."""

    def __init__(self, trial, fixed):
        self.trial, self.fixed = trial, fixed

    def _draw(self, how, name, *args, **kwargs):
        return self.fixed[name] if name in self.fixed else getattr(self.trial, how)(name, *args, **kwargs)

    def suggest_float(self, name, *args, **kwargs):
        return self._draw("suggest_float", name, *args, **kwargs)

    def suggest_int(self, name, *args, **kwargs):
        return self._draw("suggest_int", name, *args, **kwargs)

    def suggest_categorical(self, name, *args, **kwargs):
        return self._draw("suggest_categorical", name, *args, **kwargs)


def given_flags(s):
    """The dests of the train.py flags given on the command line, with their values."""
    given = set()
    for action in cli.build_parser(s.task_cls)._actions:
        if any(f.split("=")[0] in action.option_strings for f in s.flags):
            given.add(action.dest)
    return {dest: getattr(s.args, dest) for dest in given}


def searched_values(s, trial):
    """The trial's values of the searched flags (the same on a trial taken over: Optuna keeps them)."""
    fixed = given_flags(s)
    params = s.task_cls.search_space(FixedFlags(trial, fixed), s.opts.model)
    if s.opts.nhid_choices:
        params["nhid"] = trial.suggest_categorical("nhid", s.opts.nhid_choices)
    return {k: v for k, v in params.items() if k not in fixed}


def reporting(task_cls, trial, split):
    """task_cls whose every evaluation reports the split's metric to the trial and ends the run
    as "pruned" when the pruner says so or the metric is not finite."""

    class Reporting(task_cls):
        def after_evaluation(self, epoch, metrics):
            stop = super().after_evaluation(epoch, metrics)
            value = metrics[split][self.metric]
            if not math.isfinite(value):
                return "pruned"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a continued trial reports its replayed epochs again
                trial.report(value, epoch)
            return stop or ("pruned" if trial.should_prune() else None)

    Reporting.__name__ = Reporting.__qualname__ = task_cls.__name__
    return Reporting


def has_checkpoint(folder):
    return (folder / "checkpoint.pt").exists() or (folder / "checkpoint.prev.pt").exists()


def train(task_cls, argv, folder):
    """One run of train.py in this process: (its summary, or the one it left in folder; the
    message it stopped with, if it stopped by sys.exit: a NaN, a data or file error)."""
    try:
        (summary,) = loop.run(task_cls, argv)
        return summary, None
    except SystemExit as e:
        file = folder / "summary.json"
        return (json.loads(file.read_text()) if file.exists() else None), e.code


def best_value(folder, split, metric, higher_is_better):
    """The best finite value of split's metric in the run's log.jsonl, or None."""
    values = [r[split][metric] for r in loop_records(folder) if math.isfinite(r[split][metric])]
    return (max if higher_is_better else min)(values) if values else None


def loop_records(folder):
    file = folder / "log.jsonl"
    return [json.loads(line) for line in file.read_text().splitlines()] if file.exists() else []


def run_trial(s, trial, fd):
    """Train the trial's run (continued from its checkpoint if it has one) and tell Optuna how it ended."""
    folder = s.trial_folder(trial.number)
    try:
        params = searched_values(s, trial)
        trial.set_user_attr("run_folder", rundir.portable(folder, s.root))
        argv = [*s.run_argv(params, s.opts.trial_epochs), "--out-dir", str(s.folder), "--run-name", folder.name]
        resume = has_checkpoint(folder)
        print(f"trial {trial.number}{' (continued)' if resume else ''}: {params}", flush=True)
        summary, stopped = train(reporting(s.task_cls, trial, s.split), argv + (["--resume"] if resume else []), folder)
        tell(s, trial, folder, summary, stopped)
    finally:
        os.close(fd)


def tell(s, trial, folder, summary, stopped):
    status = summary["status"] if summary else None
    if status == "interrupted":
        raise SystemExit(f"stopped; trial {trial.number} stays RUNNING: continue the study with --resume")
    if status not in ("finished", "pruned", "nan"):
        s.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise SystemExit(f"trial {trial.number} failed ({folder}): {stopped}")
    value = best_value(folder, s.split, s.task_cls.metric, s.task_cls.higher_is_better)
    if status == "finished" and value is not None:
        s.study.tell(trial, value)
        print(f"trial {trial.number}: best {s.split} {s.task_cls.metric} {value:.6g}", flush=True)
    else:
        trial.set_user_attr("ended", status)
        s.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        print(f"trial {trial.number}: {status} after {summary['epochs_done']} epochs", flush=True)


def work(s):
    """Run trials until the study holds --trials of them; with --resume first the stale ones."""
    if s.opts.resume:
        for trial, fd in stale_trials(s):
            run_trial(s, trial, fd)
    elif left := abandoned(s):
        print(f"trials {left} were left running by a killed worker: --resume continues them", file=sys.stderr)
    while (claimed := next_trial(s)) is not None:
        run_trial(s, *claimed)


def trial_record(s, t):
    """One line of study.json: the trial as Optuna and its run folder tell it."""
    file = s.trial_folder(t.number) / "summary.json"
    summary = json.loads(file.read_text()) if file.exists() else {}
    return {"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
            "ended": t.user_attrs.get("ended", summary.get("status")), "epochs_done": summary.get("epochs_done"),
            "wall_time_s": summary.get("wall_time_s"), "run_folder": t.user_attrs.get("run_folder")}


def write_summary(s):
    """study.json: the settings, every trial, the best; returns it."""
    trials = [t for t in s.study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
    records = [trial_record(s, t) for t in trials]
    states = {state: sum(r["state"] == state for r in records) for state in sorted({r["state"] for r in records})}
    complete = [r for r in records if r["state"] == "COMPLETE"]
    pick = max if s.task_cls.higher_is_better else min
    best = pick(complete, key=lambda r: r["value"]) if complete else None
    summary = {"study": s.study.study_name, "storage": storage_label(s), **settings(s),
               "direction": "maximize" if s.task_cls.higher_is_better else "minimize",
               "trials": len(records), "states": states,
               "finished": len(records) >= s.opts.trials and "RUNNING" not in states,
               "trial_wall_time_s": round(sum(r["wall_time_s"] or 0.0 for r in records), 1),
               "best": best, "trial_list": records}
    atomic.write_json(s.folder / "study.json", summary)
    return summary


def storage_label(s):
    """The storage as study.json records it: no password, no folder of this machine."""
    url = s.opts.storage
    if url is None:
        return "sqlite:///<study folder>/study.db"
    if url.startswith("journal:"):
        return "journal:" + rundir.portable(url[len("journal:"):], s.root)
    head, at, tail = url.rpartition("@")
    return (head.split("://")[0] + "://...@" + tail) if at else url


def save_plots(s):
    """Optuna's optimisation history and parameter importances beside the study, as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    complete = [t for t in s.study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    for name, draw, needs in (("history", plots.plot_optimization_history, 1),
                              ("importances", plots.plot_param_importances, 2)):
        if len(complete) < needs or (name == "importances" and len(complete[0].params) < 2):
            print(f"{name}.png: not drawn ({len(complete)} complete trials)")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna.visualization.matplotlib is marked experimental
            ax = draw(s.study)
        ax.figure.savefig(s.folder / f"{name}.png", dpi=100, bbox_inches="tight")
        plt.close(ax.figure)


def rerun_best(s, summary):
    """One run of the best configuration per --seeds seed (full length) in <study folder>/best."""
    best = summary["best"]
    if not summary["finished"] or best is None:
        raise SystemExit(f"--seeds: the study is not finished ({summary['states']}, {summary['trials']} of "
                         f"{s.opts.trials} trials) or has no complete trial; run it to the end first")
    if s.split == "test" and s.args.seed in s.opts.seeds:
        raise SystemExit(f"--seeds {s.args.seed}: the study selected on that seed's eval set, so its re-run "
                         f"would report a figure it was tuned on; give other seeds")
    marker = {"study": s.study.study_name, "trial": best["number"], "trials": summary["trials"],
              "objective": {s.split: best["value"]}, "params": best["params"]}
    for seed in s.opts.seeds:
        folder = s.folder / "best" / f"{s.opts.model}_seed{seed}"
        argv = [*s.run_argv(best["params"]), "--seed", str(seed), "--out-dir", str(folder.parent), "--run-name", folder.name]
        run_seed(s, argv, folder, marker)


def run_seed(s, argv, folder, marker):
    done = folder / "summary.json"
    if (folder / "tuned.json").exists() and json.loads((folder / "tuned.json").read_text()) != marker:
        raise SystemExit(f"{folder} holds the re-run of another best trial: move it away to re-run this one")
    if done.exists() and json.loads(done.read_text())["status"] == "finished":
        print(f"{folder}: done already")
        return
    folder.mkdir(parents=True, exist_ok=True)
    atomic.write_json(folder / "tuned.json", marker)
    summary, stopped = train(s.task_cls, argv + (["--resume"] if has_checkpoint(folder) else []), folder)
    if summary is None or summary["status"] != "finished":
        print(f"{folder}: {summary['status'] if summary else 'failed'} ({stopped or 'continue with --resume'})",
              file=sys.stderr)


def main(argv=None):
    opts, flags = parse_arguments(argv)
    try:
        root = checkout.required_root()
        task_cls = experiments.task_class(opts.experiment, flags)
    except (checkout.NotACheckout, ValueError) as e:
        print(f"python -m lem.tools.tune: {e}", file=sys.stderr)
        sys.exit(2)
    objective_split(task_cls)
    if opts.model not in task_cls.models:
        raise SystemExit(f"--model must be one of {', '.join(task_cls.models)}, got {opts.model!r}")
    args = cli.parse_args(task_cls, [*flags, "--model", opts.model])
    s = Study(opts, task_cls, flags, args, study_folder(opts, root), root)
    s.folder.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    open_study(s)
    started = time.time()
    if not opts.report:
        work(s)
    summary = write_summary(s)
    save_plots(s)
    print(f"study {s.study.study_name}: {summary['trials']} trials {summary['states']} in {s.folder} "
          f"(this worker: {time.time() - started:.0f} s); best: {summary['best']}")
    if opts.seeds and not opts.report:
        rerun_best(s, summary)


if __name__ == "__main__":
    main()
