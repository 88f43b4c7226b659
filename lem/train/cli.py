"""The command line every train.py shares: the common flags with the paper's defaults (each
experiment adds its own), and the command that repeats a run (config.json's "rerun").

Flags are spelled dash-case (--grad-norm); the reference code's underscore spelling (--grad_norm)
is accepted too. Every flag is checked as it is parsed (the types below; together in parse_args),
so a bad one stops with one line and exit code 2 before any data is read; --resume checks that the
flags that change the numbers are the run's own (check_same_arguments).
"""
import argparse
import math
import os
from pathlib import Path

import torch

from .. import kernels
from ..data import data_dir as resolve_data_dir
from . import distributed, rundir
from .task import SEARCHABLE


class Parser(argparse.ArgumentParser):
    """Flags are spelled dash-case (--grad-norm); each one's underscore spelling (--grad_norm, the
    reference code's and older run records') is accepted as well. The value lands in args.grad_norm."""

    def add_argument(self, *names, **kwargs):
        spellings = [n for name in names for n in dict.fromkeys(
            (name, "--" + name[2:].replace("-", "_")) if name.startswith("--") else (name,))]
        return super().add_argument(*spellings, **kwargs)


def integer(text, allowed):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None


def at_least(low):
    """An argparse type: an int that is at least low."""
    def parse(text):
        value = integer(text, f"an integer >= {low}")
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = "int"  # argparse names the type in its message for a non-number
    return parse


def between(low, high):
    """An argparse type: an int in [low, high]."""
    def parse(text):
        value = integer(text, f"an integer in [{low}, {high}]")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer in [{low}, {high}], got {value}")
        return value
    parse.__name__ = "int"
    return parse


def finite(text):
    """A float that is a number (not nan or inf); argparse names a non-number 'invalid float value'."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive(text):
    """An argparse type: a finite float > 0 (a learning rate, Δt, a time limit)."""
    value = finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return value


def non_negative(text):
    """An argparse type: a finite float >= 0 (a clipping norm where 0 means off, a penalty)."""
    value = finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return value


positive.__name__ = non_negative.__name__ = finite.__name__ = "float"


def probability(text):
    """An argparse type: a dropout probability, in [0, 1)."""
    value = float(text)
    if not 0.0 <= value < 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def device_name(text):
    """An argparse type: auto, or a device torch.device parses and this machine has (cpu, cuda,
    cuda:N, mps). The text itself is kept (records hold what was typed)."""
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: expected auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA GPU that torch {torch.__version__} "
                                             f"can use; give --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} GPU(s), "
                                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text}: MPS is not available on this machine; give --device cpu")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text}: the harness trains on auto, cpu, cuda, cuda:N or mps")
    return text


device_name.__name__ = "device"
SEED_RANGE = (0, 2**32 - 1)  # what np.random.seed takes (torch.manual_seed takes more)


COMMON_DEFAULTS = {"model": "lem", "nhid": 128, "epochs": 100, "batch": 128, "lr": 1e-3, "dt": 1.0, "seed": 5544,
                   "grad_norm": 0.0, "lr_decay_epoch": None}


def build_parser(task_cls):
    """The parser of task_cls's train.py: the common flags, with Task.defaults in place of
    COMMON_DEFAULTS, then the experiment's own (Task.add_arguments)."""
    d = {**COMMON_DEFAULTS, **task_cls.defaults}
    p = Parser(description=f"Train on {task_cls.name} (defaults: the paper's settings, docs/paper.md §3)",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=d["model"], choices=task_cls.models)
    p.add_argument("--nhid", type=at_least(1), default=d["nhid"], help="hidden units")
    p.add_argument("--epochs", type=at_least(1), default=d["epochs"], help=f"epochs to train; an epoch: {task_cls.epoch}")
    p.add_argument("--batch", type=at_least(1), default=d["batch"])
    p.add_argument("--lr", type=positive, default=d["lr"])
    p.add_argument("--dt", type=positive, default=d["dt"], help="LEM's Δt")
    p.add_argument("--seed", type=between(*SEED_RANGE), default=d["seed"])
    p.add_argument("--seeds", type=between(*SEED_RANGE), nargs="+", default=None,
                   help="one run per seed, one after another (summarise with python -m lem.tools.results)")
    p.add_argument("--grad-norm", type=non_negative, default=d["grad_norm"], help="gradient-norm clip, 0 = off")
    p.add_argument("--lr-decay-epoch", type=at_least(1), default=d["lr_decay_epoch"], help="lr/10 from this epoch on")
    p.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--backend", default="auto", choices=kernels.BACKENDS,
                   help="how LEM layers run their time loop (docs/kernels.md)")
    p.add_argument("--data-dir", default=None, help="data folder (default: $LEM_DATA, else data/ at the root of the checkout, else ./data)")
    p.add_argument("--out-dir", default=None, help="where run folders go (default: <experiment>/results)")
    p.add_argument("--run-name", default=None, help="default: <model>_h<nhid>_seed<seed>")
    p.add_argument("--resume", action="store_true", help="continue the run of the same name from its checkpoint")
    p.add_argument("--amp", default="none", choices=("none", "bf16"),
                   help="mixed precision: train and evaluate under torch.autocast(bfloat16) (docs/kernels.md)")
    p.add_argument("--max-time", type=non_negative, default=None,
                   help="stop cleanly (resumable) after this many seconds; 0: after the first step")
    task_cls.add_arguments(p)
    unknown = set(task_cls.defaults) - {a.dest for a in p._actions}
    if unknown:
        raise TypeError(f"{task_cls.__name__}.defaults names no flag of its parser: {', '.join(sorted(unknown))}")
    unsearchable = set(task_cls.search) - set(SEARCHABLE)
    if unsearchable:
        raise TypeError(f"{task_cls.__name__}.search names what Task.search_space does not search: "
                        f"{', '.join(sorted(unsearchable))} (override search_space to search it)")
    return p


def parse_args(task_cls, argv=None):
    """The flags of one invocation of task_cls's train.py (argv: default sys.argv[1:]), each checked
    alone by its type and together here, before any data is read or folder written: a bad one stops
    with argparse's one line naming it, exit code 2."""
    parser = build_parser(task_cls)
    args = parser.parse_args(argv)
    args.data_dir = str(resolve_data_dir(args.data_dir))
    problem = data_dir_problem(Path(args.data_dir)) or backend_problem(args.backend, args.device)
    if args.seeds is not None and len(set(args.seeds)) < len(args.seeds):
        repeated = sorted({s for s in args.seeds if args.seeds.count(s) > 1})
        problem = f"argument --seeds: each seed once, got {' '.join(map(str, repeated))} more than once"
    if problem:
        parser.error(problem)
    return args


def device_type(device):
    """cpu or cuda (or mps): what --device (auto included) trains on."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def backend_problem(backend, device):
    """Why --backend cannot run on --device, if it cannot (the device rules of lem.kernels.resolve)."""
    kind = device_type(device)
    given = f"--device {device}" + (f" ({kind})" if device == "auto" else "")
    if backend == "cpp" and kind != "cpu":
        return f"argument --backend: cpp runs on CPU only, got {given}; give --backend auto, triton or reference"
    if backend in kernels.GPU_BACKENDS and kind != "cuda" and not kernels.triton_interpreted():
        return (f"argument --backend: {backend} runs on CUDA GPUs (or under TRITON_INTERPRET=1), got {given}; "
                f"give --backend auto, cpp or reference")
    return None


def data_dir_problem(path):
    """Why the data folder cannot be used (a file, or neither writable nor creatable), if it cannot.
    Nothing is created here: a run makes the folder when it first writes there."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    where = "--data-dir (or $LEM_DATA)"
    if not existing.is_dir():
        named = "is a file" if existing == path else f"cannot be made: {existing} is a file"
        return f"argument {where}: {path} {named}; expected a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        named = "is not writable" if existing == path else f"cannot be made: {existing} is not writable"
        return f"argument {where}: {path} {named} (data and its caches are written there)"
    return None


RUN_ONLY_FLAGS = {"resume", "device", "max_time", "data_dir", "out_dir", "seeds", "backend", "run_name"}


def rerun_command(task_cls, args):
    """The command line (argv) that repeats this run: the experiment's train.py (relative to the
    checkout) with every hyper-parameter spelled out, this seed and this backend; what
    lem.tools.reproduce runs."""
    argv = [f"{task_cls.name}/train.py"]
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


def recorded_flags(task_cls, args, root):
    """What config.json records of a run's flags: every one (folders relative to the checkout
    `root`) and the command that repeats the run."""
    return {"args": rundir.portable_args(vars(args), root), "rerun": rerun_command(task_cls, args)}


# Flags that may differ between the segments of one run (each resume's are kept in config.json's
# "segments"); every other flag changes the numbers and must stay as the run was started.
RESUMABLE_FLAGS = {"resume", "max_time", "data_dir", "out_dir", "seeds", "run_name"}


def numbers_flags(args):
    """A run's flags as --resume compares them: --device as the kind it trains on (cpu, cuda: one GPU
    or another of the same run may continue it), --backend auto as the backend it picks there, and
    without the RESUMABLE_FLAGS."""
    kind = device_type(args.get("device") or "auto")
    backend = args.get("backend")
    if backend == "auto":
        backend = {"cpu": "cpp", "cuda": "triton"}.get(kind, "reference")
    return {**{k: v for k, v in args.items() if k not in RESUMABLE_FLAGS}, "device": kind, "backend": backend}


def check_same_arguments(saved, given):
    """Stop (exit 1, one line) when the flags of a --resume would change the numbers of the run whose
    checkpoint holds `saved`; given: this invocation's flags (device: the one it trains on)."""
    saved, given = numbers_flags(saved), numbers_flags(given)
    changed = {k: (saved.get(k), v) for k, v in given.items() if k in saved and saved[k] != v}
    if changed:
        distributed.fail("--resume with other arguments than the run was started with: "
                         + ", ".join(f"--{k.replace('_', '-')} {new} (run has {old})" for k, (old, new) in changed.items())
                         + ". They change the numbers, so the run would no longer be one run: resume with its own "
                           "flags (config.json's \"rerun\"), or give --run-name for a new run.")
