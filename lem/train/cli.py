"""The command line every train.py shares: the common flags with the paper's defaults (each
experiment adds its own), and the command that repeats a run (config.json's "rerun").

Flags are spelled dash-case (--grad-norm); the reference code's underscore spelling (--grad_norm)
is accepted too.
"""
import argparse

from .. import kernels
from ..data import data_dir as resolve_data_dir
from . import distributed, rundir


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
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--dt", type=float, default=d["dt"], help="LEM's Δt")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="one run per seed, one after another (summarise with python -m lem.tools.results)")
    p.add_argument("--grad-norm", type=float, default=d["grad_norm"], help="gradient-norm clip, 0 = off")
    p.add_argument("--lr-decay-epoch", type=int, default=d["lr_decay_epoch"], help="lr/10 from this epoch on")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--backend", default="auto", choices=kernels.BACKENDS,
                   help="how LEM layers run their time loop (docs/kernels.md)")
    p.add_argument("--data-dir", default=None, help="data folder (default: $LEM_DATA, else data/ at the repository root)")
    p.add_argument("--out-dir", default=None, help="where run folders go (default: <experiment>/results)")
    p.add_argument("--run-name", default=None, help="default: <model>_h<nhid>_seed<seed>")
    p.add_argument("--resume", action="store_true", help="continue the run of the same name from its checkpoint")
    p.add_argument("--amp", default="none", choices=("none", "bf16"),
                   help="mixed precision: train and evaluate under torch.autocast(bfloat16) (docs/kernels.md)")
    p.add_argument("--max-time", type=float, default=None, help="stop cleanly (resumable) after this many seconds")
    task_cls.add_arguments(p)
    unknown = set(task_cls.defaults) - {a.dest for a in p._actions}
    if unknown:
        raise TypeError(f"{task_cls.__name__}.defaults names no flag of its parser: {', '.join(sorted(unknown))}")
    return p


def parse_args(task_cls, argv=None):
    """The flags of one invocation of task_cls's train.py (argv: default sys.argv[1:])."""
    args = build_parser(task_cls).parse_args(argv)
    args.data_dir = str(resolve_data_dir(args.data_dir))
    return args


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


def check_same_arguments(saved, given):
    changed = {k: (saved.get(k), v) for k, v in given.items() if k not in RUN_ONLY_FLAGS and saved.get(k) != v}
    if changed:
        distributed.fail("--resume with other arguments than the run was started with: "
                 + ", ".join(f"--{k.replace('_', '-')} {new} (run has {old})" for k, (old, new) in changed.items()))
