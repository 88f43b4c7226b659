"""The training loop behind every experiment's train.py (lem.train.run).

Seeding, device, Adam, lr step decay, gradient clipping, evaluation and model selection on
validation, result logs, checkpoints (the one before kept), exact resume, one process per run
folder, clean stop on Ctrl-C/SIGTERM, on a failed save and on NaN, a DataError turned into its
message alone; under torchrun, data-parallel training (lem/train/distributed.py).
"""
import contextlib
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .. import checkout
from ..data import DataError
from . import cli, distributed, rundir
from .distributed import fail


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
    """First Ctrl-C or SIGTERM asks the loop to save and stop after the current step; `signum` is
    the signal that asked (the run then exits with 128 + signum, as a shell reports a signal)."""

    def __init__(self):
        self.requested = False
        self.signum = None

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum
        if distributed.is_main():
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint and stopping after this step", file=sys.stderr)

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


def is_better(task_cls, value, best_value):
    if best_value is None:
        return True
    return value > best_value if task_cls.higher_is_better else value < best_value


def precision(task):
    """The autocast context of --amp (bfloat16 products, float32 state and sums), or none."""
    amp = getattr(task.args, "amp", "none")
    return torch.autocast(task.device.type, torch.bfloat16, enabled=amp == "bf16")


def train_step(task, model, optimizer, batch, grad_norm, train_model=None):
    """One optimizer step on one batch key, as training takes it: this process's share of the batch,
    the task's loss (under --amp's autocast), backward, gradient-norm clipping (grad_norm > 0), Adam,
    the task's after_step. train_model: what computes the loss (under torchrun the DDP wrapper of
    model). Returns the batch's loss (its mean over processes); a non-finite one is returned without
    a step."""
    key, weight = distributed.local_batch(batch)
    with precision(task):
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
    with torch.no_grad(), precision(task):
        metrics = {split: task.evaluate(model, split) for split in task.eval_splits}
    model.train()
    return metrics


def run(task_cls, argv=None):
    """Parse arguments and train one run per seed. Returns the list of summary dicts."""
    args = cli.parse_args(task_cls, argv)
    distributed.start(pick_device(args.device))
    try:
        return [train(task_cls, type(args)(**{**vars(args), "seed": seed})) for seed in args.seeds or [args.seed]]
    finally:
        distributed.stop()


def train(task_cls, args):
    """Train, evaluate, log one run, holding its folder. Returns its summary dict; exits 1 on NaN.
    The run folder defaults to <experiment>/results/<run name> in the checkout; a Task that is no
    experiment package of a checkout (a user's own) needs --out-dir."""
    folder = checkout.experiment_dir(task_cls.name) if task_cls.name else None
    if folder is None and args.out_dir is None:
        fail(f"{task_cls.__name__} is not an experiment of a checkout (no package {task_cls.name!r}): give --out-dir")
    root = folder.parent if folder is not None else checkout.root() or Path.cwd()
    check_memory(task_cls, args)
    task = make_task(task_cls, args)
    out = rundir.Run(Path(args.out_dir or folder / "results") / (args.run_name or task.run_name()), task_cls)
    with out.claimed(args.resume):
        return fit(task, out, args, root)


def check_memory(task_cls, args):
    """Stop with one line, before anything is allocated, when what the run needs at the least
    (Task.memory_needs) is more than its device has free."""
    needs = task_cls.memory_needs(args)
    device = pick_device(args.device)
    free = free_memory(device) if needs else None
    if free is not None and sum(needs.values()) > free:
        biggest = max(needs, key=needs.get)
        fail(f"this run needs at least {gib(sum(needs.values()))} of memory, more than the {gib(free)} free on "
             f"{device}: " + "; ".join(f"{what} {gib(n)}" for what, n in needs.items())
             + f". Make {' or '.join(biggest.split(' (')[0].split(' x '))} smaller.")


def gib(n):
    return f"{n / 2**30:.3g} GiB"


def free_memory(device):
    """Bytes free for a run on device: the GPU's free memory; on CPU the system's available memory
    (/proc/meminfo's MemAvailable), or less where this process's cgroup limits it. None: unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    free = []
    try:
        with open("/proc/meminfo") as f:
            free += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    try:  # cgroup v2: the container's limit less what it uses
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            free.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(free) if free else None


def make_task(task_cls, args):
    """The Task of a run, made as for training: denormals flushed, RNGs seeded, its data read once
    per file system (under torchrun). Data missing or corrupt (DataError): its message, exit 1."""
    device = pick_device(args.device)
    # Gradients through long sequences decay into denormal floats, which slow CPU matmuls many times
    # (sMNIST/nCIFAR backward, README); flushing them (|x| < 1.2e-38) to zero is harmless for training.
    torch.set_flush_denormal(True)
    seed_everything(args.seed)
    try:
        return distributed.one_by_one(lambda: task_cls(args, device))
    except DataError as e:
        fail(f"{task_cls.name}: {e}")


def make_model(task, args):
    """The task's model on its device, and Adam over its parameters."""
    model = task.build_model().to(task.device)
    return model, torch.optim.Adam(model.parameters(), lr=args.lr)


def restore(out, args, device, model, optimizer, task):
    """Load the run's checkpoint into model, optimizer, task and RNGs; returns the loop's state."""
    ckpt = out.load_checkpoint(device)
    saved = {**ckpt["args"], "device": ckpt.get("device", ckpt["args"].get("device"))}
    cli.check_same_arguments(saved, {**vars(args), "device": str(device)})
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    task.load_state_dict(ckpt["task"])
    rngs = ckpt.get("rng_ranks", [ckpt["rng"]])
    if distributed.rank() < len(rngs):
        set_rng_state(rngs[distributed.rank()])
    return ckpt["state"]


@dataclass
class Training:
    """One run in progress: what fit's steps share. `state` is what a checkpoint keeps of the loop
    (epoch, batch, step, elapsed, best, history); status: finished, interrupted, nan, or what
    Task.after_evaluation returned to end the run (pruned); signum: the signal that interrupted it,
    if one did."""
    task: object
    out: rundir.Run
    args: object
    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_model: nn.Module
    config: dict
    state: dict
    started: float
    status: str = "finished"
    signum: int = None
    main: bool = field(default_factory=distributed.is_main)  # under torchrun only rank 0 prints and writes

    def elapsed(self):
        return time.time() - self.started

    def out_of_time(self):
        return self.args.max_time is not None and self.elapsed() > self.args.max_time

    def save(self):
        rngs = distributed.gather(rng_state())
        ckpt = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "task": self.task.state_dict(), "rng": rngs[0], "state": self.state, "args": vars(self.args),
                "device": str(self.task.device)}
        if len(rngs) > 1:
            ckpt["rng_ranks"] = rngs  # every process's own, for an exact resume on as many processes
        self.out.save_checkpoint(lambda: ckpt)


def start_training(task, out, args, root):
    """The model, optimizer and loop state of a run (from its checkpoint on --resume), its
    config.json written."""
    out.write("the task's files", lambda: task.start(out.folder))
    model, optimizer = make_model(task, args)
    if distributed.rank() > 0:
        seed_everything((args.seed + distributed.rank()) % 2**32)  # same init everywhere, then own dropout masks
    state = {"epoch": 0, "batch": 0, "step": 0, "elapsed": 0.0, "best": None, "history": []}
    if args.resume:
        state = restore(out, args, task.device, model, optimizer, task)
        if distributed.is_main():
            print(f"resumed {out.folder} at epoch {state['epoch']}, batch {state['batch']}")
    config = run_config(task, out, args, root, state, sum(p.numel() for p in model.parameters()))
    out.write_config(config)
    if args.resume:  # the logs as of the checkpoint loaded (it may be the one before the newest)
        out.write_logs(state["history"])
        out.write_summary(state, "running", config)
    return Training(task, out, args, model, optimizer, distributed.wrap(model, task.device), config, state,
                    started=time.time() - state["elapsed"])


def run_config(task, out, args, root, state, parameters):
    """config.json: the flags, the command that repeats the run and the environment of the run as
    started, and "segments": for the start and every --resume since, its command, time, starting
    point, flags that may change on resume (cli.RESUMABLE_FLAGS), environment and how it ended."""
    config = {**cli.recorded_flags(type(task), args, root), "experiment": task.name, "parameters": parameters}
    if not distributed.is_main():
        return config  # only rank 0 writes; the others need the flags (summaries) alone
    config.update(rundir.environment(task.device, root))
    if distributed.world_size() > 1:
        config["processes"] = distributed.world_size()
    segment = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": config["command"],
               "from": {"epoch": state["epoch"], "batch": state["batch"]},
               **{k: config["args"][k] for k in ("max_time", "data_dir", "out_dir")},
               **{k: config[k] for k in ("device", "hardware", "git_commit")}}
    earlier = out.read_config() if args.resume else None
    if earlier is None:
        return {**config, "segments": [segment]}
    segments = earlier.get("segments") or [{"command": earlier.get("command"), "started": None}]
    if "ended" not in segments[-1]:
        segments[-1]["ended"] = out.how_it_ended()
        if segments[-1]["ended"] == "killed":
            print(f"note: the run's last process ended without closing it (killed); its segment is recorded "
                  f"as such in {out.folder / 'config.json'}", file=sys.stderr)
    return {**earlier, "segments": [*segments, segment]}


def set_learning_rate(run, epoch):
    """--lr, or --lr / 10 from --lr-decay-epoch on (docs/paper.md §3)."""
    decay = run.args.lr_decay_epoch is not None and epoch >= run.args.lr_decay_epoch
    for group in run.optimizer.param_groups:
        group["lr"] = run.args.lr / 10 if decay else run.args.lr


def train_epoch(run, stop):
    """The batches of the current epoch from state["batch"] on; sets run.status when a NaN loss,
    a stop request or --max-time ends the epoch early."""
    from tqdm import tqdm  # here, not at the top: lem.train's flag types and the kernels bench need no tqdm
    epoch = run.state["epoch"]
    batches = run.task.train_batches(epoch)
    bar = tqdm(range(run.state["batch"], len(batches)), desc=f"epoch {epoch + 1}/{run.task.num_epochs()}",
               leave=False, disable=None if run.main else True)
    for i in bar:
        batch_loss = train_step(run.task, run.model, run.optimizer, batches[i], run.args.grad_norm, run.train_model)
        if not torch.isfinite(batch_loss):
            run.status = "nan"
            if run.main:
                kept = (f"the last good checkpoint ({run.out.checkpoint}) is kept" if run.out.checkpoint.exists()
                        else "no checkpoint was saved yet (the first one is written at the end of epoch 1)")
                print(f"loss is {batch_loss.item()} at epoch {epoch + 1}, batch {i + 1}: stopping; {kept}. "
                      f"A smaller --lr, --dt or a --grad-norm may keep it finite", file=sys.stderr)
            break
        run.state["step"] += 1
        run.state["batch"] = i + 1
        bar.set_postfix(loss=f"{batch_loss.item():.4g}", refresh=False)
        if distributed.anyone(stop.requested or run.out_of_time()) and i + 1 < len(batches):
            run.status = "interrupted"
            break
    bar.close()


def close_epoch(run):
    """Evaluate, select on validation, checkpoint and log the epoch just trained."""
    task, state = run.task, run.state
    metrics = evaluate(task, run.model)
    stop = task.after_evaluation(state["epoch"] + 1, metrics)
    state["elapsed"] = run.elapsed()
    record = {"epoch": state["epoch"] + 1, "step": state["step"], "lr": run.optimizer.param_groups[0]["lr"],
              "time_s": round(state["elapsed"], 2), **metrics}
    if "valid" in metrics and is_better(type(task), metrics["valid"][task.metric],
                                        state["best"] and state["best"]["valid"][task.metric]):
        state["best"] = record
    state["history"].append(record)
    state["epoch"], state["batch"] = state["epoch"] + 1, 0
    run.save()
    run.out.write_logs(state["history"])
    run.out.write_summary(state, "running", run.config)
    if run.main:
        print(rundir.format_record(record), flush=True)
    if stop:
        run.status = stop  # e.g. "pruned" by lem.tools.tune: the run ends here, its epoch kept


def finish(run):
    """The run's last checkpoint (when interrupted), summary and segment end; exit 1 after a NaN,
    128 + the signal's number after a SIGTERM (143) or Ctrl-C (130)."""
    run.state["elapsed"] = run.elapsed()
    if run.status == "interrupted":
        run.save()
        if run.main:
            print(f"stopped; continue with the same command and --resume ({run.out.folder})", file=sys.stderr)
    summary = run.out.write_summary(run.state, run.status, run.config)
    if run.config.get("segments"):  # rank 0's config; every process takes part in the write
        run.config["segments"][-1]["ended"] = run.status
    run.out.write_config(run.config)
    if run.status == "finished" and run.main:
        print(f"done: {run.task.metric} on test = {summary['test']} (paper: {summary['paper']}); logs in {run.out.folder}")
    if run.status == "nan":
        sys.exit(1)
    if run.status == "interrupted" and run.signum is not None:
        sys.exit(128 + run.signum)
    return summary


@contextlib.contextmanager
def recorded_crash(run):
    """An error that escapes the loop (out of memory, a bug) or a second Ctrl-C leaves summary.json
    saying so ("failed" with the error, "interrupted"), not "running", and propagates."""
    try:
        yield
    except KeyboardInterrupt:
        if run.main:
            run.out.record_end("interrupted", "KeyboardInterrupt (a second Ctrl-C): no checkpoint of this step")
        raise
    except Exception as e:
        if run.main:
            run.out.record_end("failed", f"{type(e).__name__}: {str(e).strip()[:300]}")
        raise


def fit(task, out, args, root):
    """The training loop of one run, in the folder this process holds (root: the checkout)."""
    run = start_training(task, out, args, root)
    with StopRequest() as stop, recorded_crash(run):
        while run.state["epoch"] < task.num_epochs() and run.status == "finished":
            set_learning_rate(run, run.state["epoch"])
            train_epoch(run, stop)
            if run.status != "finished":
                break
            close_epoch(run)
            stopping = distributed.anyone(stop.requested or run.out_of_time())
            if stopping and run.state["epoch"] < task.num_epochs():
                run.status = "interrupted"
        run.signum = stop.signum
    return finish(run)
