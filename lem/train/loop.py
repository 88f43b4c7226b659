"""The one training harness behind every experiment's train.py.

An experiment subclasses `Task` (its data, model, loss, metric and paper defaults) and calls
`run(MyTask)`. The harness does the rest: arguments (spelled dash-case, the reference code's
underscore spellings accepted too), seeding, device, Adam, lr step decay, gradient clipping,
evaluation and model selection on validation, result logs, checkpoints (the one before kept),
exact resume, one process per run folder (its lock), clean stop on Ctrl-C/SIGTERM, on a failed
save and on NaN, a DataError turned into its message alone; under torchrun, data-parallel
training over several processes (lem/distributed.py). lem.bench times the same Task and step.

Training is cut into epochs; each epoch is a list of cheap batch keys (index tensors, seeds)
fixed by (seed, epoch) alone, so a resumed run replays exactly the batches it would have seen.
"""
import argparse
import contextlib
import inspect
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from . import atomic, distributed, kernels, runlog
from .data import DataError, data_dir as resolve_data_dir
from .model import LEM


class Task:
    """What an experiment states. Subclass it in <experiment>/train.py."""

    name = None               # the experiment folder, e.g. "fitzhugh_nagumo"
    metric = None             # key of evaluate()'s dict used for model selection and reports
    higher_is_better = False
    paper = None              # the paper's figure (SPEC §2): LEM's, or {model: figure} where the paper
                              # reports its baselines too
    baseline = None           # the metric of a trivial predictor, drawn beside the curves (adding: 0.167)
    defaults = {}             # paper hyper-parameters of the common flags (SPEC §3)
    eval_splits = ("valid", "test")
    models = ("lem", "lstm", "gru")   # what --model offers
    epoch = "one pass over the training set"  # what --epochs counts (the unit of the logs and of lr decay)
    load = None               # the function that reads the data, when __init__ reads files through self.load;
    synthetic = None          # then a stand-in of the same signature and real shapes, random values
                              # (python -m lem.bench epoch --synthetic times a task without its files)

    @staticmethod
    def add_arguments(parser):
        """Flags only this experiment has."""

    def __init__(self, args, device):
        """Read the data (a DataError says what is missing or corrupt). args: the parsed flags;
        build_model() passes args.backend to every LEM layer it makes."""
        self.args, self.device = args, device

    def run_name(self):
        a = self.args
        return f"{a.model}_h{a.nhid}_seed{a.seed}"

    def num_epochs(self):
        return self.args.epochs

    def build_model(self):
        raise NotImplementedError

    def train_batches(self, epoch):
        """The keys of this epoch's batches, in order; loss() turns one into a loss."""
        raise NotImplementedError

    def loss(self, model, batch):
        """The mean loss over one batch. Under torchrun an index batch arrives as this process's
        share; a batch drawn inside loss() (from a seed) should keep its share with lem.share."""
        raise NotImplementedError

    def evaluate(self, model, split):
        """A dict of metrics on one split; must hold self.metric."""
        raise NotImplementedError

    def after_step(self, model):
        """Called after every optimizer step (e.g. to update a weight average)."""

    def after_evaluation(self, epoch, metrics):
        """Called after the evaluation that closes epoch `epoch` (1-based), before the checkpoint."""

    def state_dict(self):
        """Task state a checkpoint must keep beyond model, optimizer and RNGs."""
        return {}

    def load_state_dict(self, state):
        pass

    def start(self, run_dir):
        """Called with the run folder before training (and on --resume): files a run needs
        beside its logs go there, e.g. psMNIST's permutation."""


def shuffled_batches(n, batch_size, seed, epoch):
    """Index batches of a random permutation of range(n), fixed by (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return list(torch.randperm(n, generator=generator).split(batch_size))


def batches_in_order(n, batch_size):
    return list(torch.arange(n).split(batch_size))


class Parser(argparse.ArgumentParser):
    """Flags are spelled dash-case (--grad-norm); each one's underscore spelling (--grad_norm, the
    reference code's and older run records') is accepted as well. The value lands in args.grad_norm."""

    def add_argument(self, *names, **kwargs):
        spellings = [n for name in names for n in dict.fromkeys(
            (name, "--" + name[2:].replace("-", "_")) if name.startswith("--") else (name,))]
        return super().add_argument(*spellings, **kwargs)


def at_least(low):
    """An argparse type: an int that is at least low."""
    def parse(text):
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = "int"  # argparse names the type in its message for a non-number
    return parse


def probability(text):
    """An argparse type: a dropout probability, in [0, 1)."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def build_parser(task_cls):
    d = {"model": "lem", "nhid": 128, "epochs": 100, "batch": 128, "lr": 1e-3, "dt": 1.0, "seed": 5544,
         "grad_norm": 0.0, "lr_decay_epoch": None, **task_cls.defaults}
    p = Parser(description=f"Train on {task_cls.name} (defaults: the paper's settings, SPEC §3)",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=d["model"], choices=task_cls.models)
    p.add_argument("--nhid", type=at_least(1), default=d["nhid"], help="hidden units")
    p.add_argument("--epochs", type=at_least(1), default=d["epochs"], help=f"epochs to train; an epoch: {task_cls.epoch}")
    p.add_argument("--batch", type=at_least(1), default=d["batch"])
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--dt", type=float, default=d["dt"], help="LEM's Δt")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="one run per seed, one after another (summarise with python -m lem.results)")
    p.add_argument("--grad-norm", type=float, default=d["grad_norm"], help="gradient-norm clip, 0 = off")
    p.add_argument("--lr-decay-epoch", type=int, default=d["lr_decay_epoch"], help="lr/10 from this epoch on")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--backend", default="auto", choices=kernels.BACKENDS,
                   help="how LEM layers run their time loop (docs/kernels.md)")
    p.add_argument("--data-dir", default=None, help="data folder (default: $LEM_DATA, else data/ at the repository root)")
    p.add_argument("--out-dir", default=None, help="where run folders go (default: <experiment>/results)")
    p.add_argument("--run-name", default=None, help="default: <model>_h<nhid>_seed<seed>")
    p.add_argument("--resume", action="store_true", help="continue the run of the same name from its checkpoint")
    p.add_argument("--max-time", type=float, default=None, help="stop cleanly (resumable) after this many seconds")
    task_cls.add_arguments(p)
    return p


def parse_args(task_cls, argv=None):
    """The flags of one invocation of task_cls's train.py (argv: default sys.argv[1:])."""
    args = build_parser(task_cls).parse_args(argv)
    args.data_dir = str(resolve_data_dir(args.data_dir))
    return args


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        name = f"cuda:{distributed.local_rank()}"  # torchrun: one GPU per process
    return torch.device(name)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


class StopRequest:
    """First Ctrl-C or SIGTERM asks the loop to save and stop after the current step."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if distributed.is_main():
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint and stopping after this step", file=sys.stderr)

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


LOCK_FILE = "run.lock"
CHECKPOINT_KEYS = ("model", "optimizer", "task", "rng", "state", "args")


def fail(message):
    """Stop with exit code 1 and no traceback: rank 0 prints message, the other processes stop quietly."""
    sys.exit(message if distributed.is_main() else 1)


class Run:
    """The run folder <experiment>/results/<run-name>/ and everything written into it (by rank 0 only).

    While a process trains the run, it (rank 0 under torchrun) holds the folder's lock: one
    process per run. A failed write stops every process and leaves the files it replaced whole."""

    def __init__(self, folder, task_cls):
        self.folder = Path(folder)
        self.task_cls = task_cls
        self.checkpoint = self.folder / "checkpoint.pt"
        self.previous = self.folder / "checkpoint.prev.pt"  # the one before, for when the newest is damaged
        self._lock = None

    @contextlib.contextmanager
    def claimed(self, resume):
        """Hold the run folder. Every process stops (rank 0 says why) when another process trains
        this run, when the folder holds a run and resume is off, or holds no checkpoint and it is on."""
        try:
            problem = self._claim(resume) if distributed.is_main() else None
            if distributed.anyone(problem is not None):
                fail(problem)
            yield
        finally:
            if self._lock is not None:
                os.close(self._lock)  # releases the lock (--seeds: the next run has its own folder)
                self._lock = None

    def _claim(self, resume):
        """Take the folder's lock before anything is written there; what forbids training here, if anything."""
        if resume and not self.folder.is_dir():
            return f"--resume: no checkpoint at {self.checkpoint}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return f"cannot make the run folder {self.folder}: {e.strerror or e}"
        lock = self.folder / LOCK_FILE
        try:
            self._lock = runlog.lock(lock)
        except BlockingIOError:
            holder = lock.read_text().strip() or "(PID not yet written)"
            return (f"{self.folder} is in use: process {holder} is training this run and holds its lock ({lock}). "
                    f"Two processes on one run would overwrite each other's checkpoint and logs, so this one stops. "
                    f"Wait for that process to end (--resume then continues the run), or give this one "
                    f"another --run-name or --seed.")
        except OSError as e:  # a file system without locks, e.g. Lustre mounted with -o noflock
            print(f"warning: cannot lock {lock} ({e.strerror}); nothing keeps a second process off this run",
                  file=sys.stderr)
        else:
            atomic.remove_leftovers(self.folder)
        saved = self.checkpoint.exists() or self.previous.exists()
        if saved and not resume:
            return f"{self.folder} already holds a run: pass --resume to continue it, or --run-name for a new one"
        if resume and not saved:
            return f"--resume: no checkpoint at {self.checkpoint}"
        return None

    def write(self, what, write):
        """write() on rank 0. If it fails (disk full, read-only folder), every process stops."""
        error = None
        if distributed.is_main():
            try:
                write()
            except OSError as e:
                error = (f"could not write {what} in {self.folder}: {e.strerror or e}. The run stops here; "
                         f"its last good checkpoint and logs are kept. Make room (or make the folder writable), "
                         f"then continue with the same command and --resume.")
        if distributed.anyone(error is not None):
            fail(error)

    def save_checkpoint(self, make):
        """Write make() as checkpoint.pt; the checkpoint it replaces becomes checkpoint.prev.pt."""
        self.write(self.checkpoint.name, lambda: atomic.rotate_checkpoint(self.checkpoint, make(), self.previous))

    def load_checkpoint(self, device):
        """The newest checkpoint that loads whole: checkpoint.pt, else (saying so) checkpoint.prev.pt.
        A damaged checkpoint.pt is then set aside as checkpoint.damaged.pt, so that the next save
        keeps checkpoint.prev.pt instead of rotating the damaged file onto it."""
        try:
            return runlog.load_checkpoint(self.checkpoint, CHECKPOINT_KEYS, device)
        except ValueError as e:
            newest = str(e)
        try:
            ckpt = runlog.load_checkpoint(self.previous, CHECKPOINT_KEYS, device)
        except ValueError as e:
            fail(f"--resume: neither checkpoint of this run loads: {newest}; {e}. Move the folder away to start "
                 f"the run anew.")
        damaged = self.folder / "checkpoint.damaged.pt"
        set_aside = distributed.is_main() and self.checkpoint.exists()

        def move():
            if set_aside:
                os.replace(self.checkpoint, damaged)
        self.write(damaged.name, move)  # on every process, as write stops them all if it fails
        if set_aside:
            newest += f", kept as {damaged.name}"
        if distributed.is_main():
            state = ckpt["state"]
            print(f"warning: {newest}; continuing from {self.previous.name} (epoch {state['epoch']}, "
                  f"batch {state['batch']})", file=sys.stderr)
        return ckpt

    def write_config(self, config):
        self.write("config.json", lambda: atomic.write_json(self.folder / "config.json", config))

    def write_logs(self, history):
        def write():
            atomic.write_text(self.folder / "log.jsonl", "".join(json.dumps(r) + "\n" for r in history))
            atomic.write_text(self.folder / "log.txt", "".join(runlog.format_record(r) + "\n" for r in history))
        self.write("log.jsonl and log.txt", write)

    def write_summary(self, state, status, config):
        t = self.task_cls
        best = state["best"]
        last = state["history"][-1] if state["history"] else None
        selected = best if "valid" in t.eval_splits else last
        summary = {
            "experiment": t.name, "model": config["args"]["model"], "seed": config["args"]["seed"],
            "run_name": self.folder.name, "metric": t.metric, "higher_is_better": t.higher_is_better,
            "paper": paper_figure(t, config["args"]["model"]), "baseline": t.baseline,
            "status": status, "epochs_done": state["epoch"], "steps": state["step"],
            "wall_time_s": round(state["elapsed"], 1),
            "best_epoch": selected["epoch"] if selected else None,
            "valid": selected["valid"][t.metric] if selected and "valid" in selected else None,
            "test": selected["test"][t.metric] if selected and "test" in selected else None,
            "last": last,
        }
        self.write("summary.json", lambda: atomic.write_json(self.folder / "summary.json", summary))
        return summary


def paper_figure(task_cls, model):
    """The paper's figure for `model`: Task.paper is LEM's figure, or a dict by model."""
    if isinstance(task_cls.paper, dict):
        return task_cls.paper.get(model)
    return task_cls.paper if model == "lem" else None


RUN_ONLY_FLAGS = {"resume", "device", "max_time", "data_dir", "out_dir", "seeds", "backend", "run_name"}


def rerun_command(task_cls, args):
    """The command line (argv) that repeats this run: the experiment's train.py with every
    hyper-parameter spelled out, this seed and this backend; what lem.reproduce runs."""
    script = runlog.portable(inspect.getfile(task_cls))
    argv = [script]
    for action in build_parser(task_cls)._actions:
        value, flag = vars(args).get(action.dest), (action.option_strings or [None])[0]
        if flag is None or action.dest in RUN_ONLY_FLAGS - {"backend"} or value is None:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(action, argparse._StoreTrueAction):
            argv += [flag] if value else []
        else:
            argv += [flag, *map(str, value if isinstance(value, list) else [value])]
    return argv


def recorded_flags(task_cls, args):
    """What config.json records of a run's flags: every one (folders relative to the repository)
    and the command that repeats the run."""
    return {"args": runlog.portable_args(vars(args)), "rerun": rerun_command(task_cls, args)}


def check_same_arguments(saved, given):
    changed = {k: (saved.get(k), v) for k, v in given.items() if k not in RUN_ONLY_FLAGS and saved.get(k) != v}
    if changed:
        fail("--resume with other arguments than the run was started with: "
                 + ", ".join(f"--{k.replace('_', '-')} {new} (run has {old})" for k, (old, new) in changed.items()))


def is_better(task_cls, value, best_value):
    if best_value is None:
        return True
    return value > best_value if task_cls.higher_is_better else value < best_value


def train_step(task, model, optimizer, batch, grad_norm, train_model=None):
    """One optimizer step on one batch key, as training takes it: this process's share of the batch,
    the task's loss, backward, gradient-norm clipping (grad_norm > 0), Adam, the task's after_step.
    train_model: what computes the loss (under torchrun the DDP wrapper of model). Returns the
    batch's loss (its mean over processes); a non-finite one is returned without a step."""
    key, weight = distributed.local_batch(batch)
    loss = task.loss(train_model or model, key) * weight
    batch_loss = distributed.mean(loss)
    if not torch.isfinite(batch_loss):
        return batch_loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_norm > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_norm)
    optimizer.step()
    task.after_step(model)
    return batch_loss


def evaluate(task, model):
    model.eval()
    with torch.no_grad():
        metrics = {split: task.evaluate(model, split) for split in task.eval_splits}
    model.train()
    return metrics


def run(task_cls, argv=None):
    """Parse arguments and train one run per seed. Returns the list of summary dicts."""
    args = parse_args(task_cls, argv)
    distributed.start(pick_device(args.device))
    try:
        return [train(task_cls, type(args)(**{**vars(args), "seed": seed})) for seed in args.seeds or [args.seed]]
    finally:
        distributed.stop()


def train(task_cls, args):
    """Train, evaluate, log one run, holding its folder. Returns its summary dict; exits 1 on NaN."""
    experiment_dir = Path(inspect.getfile(task_cls)).resolve().parent
    task = make_task(task_cls, args)
    device = task.device
    out = Run(Path(args.out_dir or experiment_dir / "results") / (args.run_name or task.run_name()), task_cls)
    with out.claimed(args.resume):
        return fit(task, out, args, device)


def make_task(task_cls, args):
    """The Task of a run, made as for training: denormals flushed, RNGs seeded, its data read once
    per file system (under torchrun). Data missing or corrupt (DataError): its message, exit 1."""
    device = pick_device(args.device)
    # Gradients through long sequences decay into denormal floats, which slow CPU matmuls ~10x
    # (sMNIST/nCIFAR backward); flushing them (|x| < 1.2e-38) to zero is harmless for training.
    torch.set_flush_denormal(True)
    seed_everything(args.seed)
    try:
        return distributed.one_by_one(lambda: task_cls(args, device))
    except DataError as e:
        fail(f"{task_cls.name}: {e}")


def make_model(task, args):
    """The task's model on its device, and Adam over its parameters. Every LEM layer in it must run
    --backend: build_model passes args.backend to what it makes (a ValueError otherwise)."""
    model = task.build_model().to(task.device)
    for name, module in model.named_modules():
        if isinstance(module, LEM) and module.backend != args.backend:
            raise ValueError(f"{type(task).__name__}.build_model() made {name or 'its model'} with backend "
                             f"{module.backend!r}, not --backend {args.backend!r}: pass backend=args.backend")
    return model, torch.optim.Adam(model.parameters(), lr=args.lr)


def restore(out, args, device, model, optimizer, task):
    """Load the run's checkpoint into model, optimizer, task and RNGs; returns the loop's state."""
    ckpt = out.load_checkpoint(device)
    check_same_arguments(ckpt["args"], vars(args))
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    task.load_state_dict(ckpt["task"])
    rngs = ckpt.get("rng_ranks", [ckpt["rng"]])
    if distributed.rank() < len(rngs):
        set_rng_state(rngs[distributed.rank()])
    return ckpt["state"]


def fit(task, out, args, device):
    """The training loop of one run, in the folder this process holds."""
    task_cls = type(task)
    main = distributed.is_main()  # under torchrun only rank 0 prints and writes files
    out.write("the task's files", lambda: task.start(out.folder))

    model, optimizer = make_model(task, args)
    if distributed.rank() > 0:
        seed_everything(args.seed + distributed.rank())  # same init everywhere, then own dropout masks
    state = {"epoch": 0, "batch": 0, "step": 0, "elapsed": 0.0, "best": None, "history": []}
    if args.resume:
        state = restore(out, args, device, model, optimizer, task)
        if main:
            print(f"resumed {out.folder} at epoch {state['epoch']}, batch {state['batch']}")

    config = {**recorded_flags(task_cls, args), "experiment": task_cls.name,
              "parameters": sum(p.numel() for p in model.parameters())}
    if main:
        config.update(runlog.environment(device))
        if distributed.world_size() > 1:
            config["processes"] = distributed.world_size()
    out.write_config(config)
    if args.resume:  # the logs as of the checkpoint loaded (it may be the one before the newest)
        out.write_logs(state["history"])
        out.write_summary(state, "running", config)
    train_model = distributed.wrap(model, device)

    def save():
        rngs = distributed.gather(rng_state())

        def checkpoint():
            ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "task": task.state_dict(),
                    "rng": rngs[0], "state": state, "args": vars(args)}
            if len(rngs) > 1:
                ckpt["rng_ranks"] = rngs  # every process's own, for an exact resume on as many processes
            return ckpt
        out.save_checkpoint(checkpoint)

    status = "finished"
    started = time.time() - state["elapsed"]
    with StopRequest() as stop:
        while state["epoch"] < task.num_epochs() and status == "finished":
            epoch = state["epoch"]
            decay = args.lr_decay_epoch is not None and epoch >= args.lr_decay_epoch
            for group in optimizer.param_groups:
                group["lr"] = args.lr / 10 if decay else args.lr
            batches = task.train_batches(epoch)
            bar = tqdm(range(state["batch"], len(batches)), desc=f"epoch {epoch + 1}/{task.num_epochs()}",
                       leave=False, disable=None if main else True)
            for i in bar:
                batch_loss = train_step(task, model, optimizer, batches[i], args.grad_norm, train_model)
                if not torch.isfinite(batch_loss):
                    status = "nan"
                    if main:
                        print(f"loss is {batch_loss.item()} at epoch {epoch + 1}, batch {i + 1}: stopping; the last "
                              f"good checkpoint ({out.checkpoint}) is kept", file=sys.stderr)
                    break
                state["step"] += 1
                state["batch"] = i + 1
                bar.set_postfix(loss=f"{batch_loss.item():.4g}", refresh=False)
                out_of_time = args.max_time is not None and time.time() - started > args.max_time
                if distributed.anyone(stop.requested or out_of_time) and i + 1 < len(batches):
                    status = "interrupted"
                    break
            bar.close()
            if status != "finished":
                break
            metrics = evaluate(task, model)
            task.after_evaluation(epoch + 1, metrics)
            state["elapsed"] = time.time() - started
            record = {"epoch": epoch + 1, "step": state["step"], "lr": optimizer.param_groups[0]["lr"],
                      "time_s": round(state["elapsed"], 2), **metrics}
            if "valid" in metrics and is_better(task_cls, metrics["valid"][task_cls.metric],
                                                state["best"] and state["best"]["valid"][task_cls.metric]):
                state["best"] = record
            state["history"].append(record)
            state["epoch"], state["batch"] = epoch + 1, 0
            save()
            out.write_logs(state["history"])
            out.write_summary(state, "running", config)
            if main:
                print(runlog.format_record(record), flush=True)
            if distributed.anyone(stop.requested or (args.max_time is not None and time.time() - started > args.max_time)):
                if state["epoch"] < task.num_epochs():
                    status = "interrupted"

    state["elapsed"] = time.time() - started
    if status == "interrupted":
        save()
        if main:
            print(f"stopped; continue with the same command and --resume ({out.folder})", file=sys.stderr)
    summary = out.write_summary(state, status, config)
    if status == "finished" and main:
        print(f"done: {task_cls.metric} on test = {summary['test']} (paper: {summary['paper']}); logs in {out.folder}")
    if status == "nan":
        sys.exit(1)
    return summary
