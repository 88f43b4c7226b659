"""Timing of the layer and of the experiments' epochs: python -m lem.tools.bench kernels | epoch.

    python -m lem.tools.bench kernels                        # every configuration, CPU and (if present) CUDA
    python -m lem.tools.bench kernels --devices cuda         # CUDA: the reference loop, each GPU tier, nn.LSTM (cuDNN)
    python -m lem.tools.bench kernels --configs fhn smnist_h128 --devices cpu --threads 1
    python -m lem.tools.bench kernels --configs smnist_h256 ptb_char --amp bf16   # + rows under torch.autocast(bf16)
    python -m lem.tools.bench epoch smnist --synthetic --batches 6 --nhid 256   # one epoch of an experiment
    python -m lem.tools.bench epoch ptb --level char --synthetic --no-eval      # PTB: training tokens/s

kernels: the LEM layer alone. For each configuration and device, wall times (median of several
runs after a warm-up; the backends take turns in every round, so that other load on a shared
machine hits all of them alike) with their ratios to nn.LSTM of the same hidden size:
  - each row's precision: our backends multiply in strict float32 (torch's default for cuBLAS, and
    the on-chip tier's tl.dot); nn.LSTM is timed in strict float32 ("nn.LSTM", the row the ratios
    take) and, on CUDA, at torch's default, where cuDNN multiplies in TF32 ("nn.LSTM default");
    on CUDA the stepwise tier with its CUDA graphs ("stepwise") and launching step by step
    ("stepwise eager");
  - forward+backward (also against the reference loop), and the memory the autograd graph holds
    for backward (CPU) or the peak allocated memory (CUDA);
  - forward only, with grad mode on (what a training forward keeps) and under torch.no_grad()
    (evaluation), and the peak memory each adds: on CUDA the peak allocated, on CPU the growth of
    the process's peak resident set (Linux VmHWM, reset through /proc/self/clear_refs) over a call
    started with the allocators' caches handed back.

epoch: an experiment's real Task, made from its own train.py flags (the paper's settings unless
given after the experiment's name, --backend and --device included) exactly as training makes it,
its model and Adam; times --batches training steps of the harness (lem.train.loop.train_step) after
--warmup ones, and one evaluation of the splits an epoch evaluates (lem.train.loop.evaluate), by the wall
clock and by this process's CPU time, and adds them up to one epoch. Also: the part of a step spent
outside the model (reading the batch, the loss), timed by replaying the model's output. With
--synthetic the task's files are replaced by random data of the real sizes (Task.synthetic).

Google12's feature extraction is timed by google12/time_features.py.
"""
import argparse
import contextlib
import ctypes
import gc
import os
import re
import statistics
import sys
import time

import torch
import torch.nn as nn

from .. import checkout, kernels
from ..kernels import cpu
from ..nn import LEM
from ..train import cli, loop
from ..train.cli import at_least
from . import experiments

# name: (T, B, H, I), docs/paper.md §3
CONFIGS = {
    "smnist_h128": (784, 128, 128, 1),
    "smnist_h256": (784, 128, 256, 1),
    "fhn": (1000, 32, 16, 1),
    "fhn_b256": (1000, 256, 16, 1),  # evaluation-sized batch
    "fhn_2layer_bidir": (1000, 32, 16, 1),
    "eigenworms": (17984, 8, 32, 6),
    "ptb_char": (150, 128, 1024, 200),
}
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # --amp
# configurations that are stacks (the same arguments for LEM and nn.LSTM); the others: one layer
STACKS = {"fhn_2layer_bidir": dict(num_layers=2, bidirectional=True)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(fns, device, repeats, budget_s):
    """Median wall time of each fn after one warm-up each. The fns take turns in every round so
    that load from other processes on a shared machine hits all of them alike; fewer rounds when
    one round would exceed budget_s."""
    def once(fn):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - start

    round_s = sum(once(fn) for fn in fns.values())
    times = {name: [] for name in fns}
    for _ in range(max(1, min(repeats, int(budget_s / max(round_s, 1e-9))))):
        for name, fn in fns.items():
            times[name].append(once(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def saved_bytes(fn):
    """Bytes of the distinct tensors the autograd graph keeps for backward during fn()."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


def memory(module, x):
    """Peak allocated bytes of forward+backward (CUDA), or bytes kept for backward (CPU)."""
    if x.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(x.device)
        module(x)[0].sum().backward()
        return torch.cuda.max_memory_allocated(x.device)
    return saved_bytes(lambda: module(x))[0]


def peak_bytes(fn, device):
    """Peak memory fn() adds (see the module docstring); None where it cannot be measured."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        return torch.cuda.max_memory_allocated(device) - start
    try:
        cpu.empty_cache()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        start = _status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        fn()
        return (_status_kb("VmHWM") - start) * 1024
    except (OSError, AttributeError):  # not Linux with glibc
        return None


def _status_kb(key):
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1))


def forward_backward(module, x):
    return lambda: module(x)[0].sum().backward()


def forward_train(module, x):
    """A forward with grad mode on (the parameters require grad): it keeps what a backward needs."""
    return lambda: module(x)


def forward_only(module, x):
    def run():
        with torch.no_grad():
            module(x)
    return run


def backends_for(device, H):
    """The loops to time: the reference, and on CPU the fused one, on CUDA (or CPU tensors under
    TRITON_INTERPRET=1, as the GPU check's dry run) every GPU tier that runs at H."""
    gpu = device.type == "cuda" or kernels.triton_interpreted()
    names = ["reference", "onchip", "stepwise"] if gpu else ["reference", "cpp"]
    return [n for n in names if n == "reference" or runs(n, device, H)]


def runs(backend, device, H):
    try:
        return kernels.resolve(backend, device, H) == backend
    except ValueError:  # 'onchip' where the weights do not fit this GPU
        return False


@contextlib.contextmanager
def tf32(allowed):
    """cuBLAS's and cuDNN's float32 products in TF32 (allowed) or strict float32 inside the block."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


LSTM_DEFAULT = "nn.LSTM default"  # cuDNN at torch's default flags: TF32 products


STEPWISE_EAGER = "stepwise eager"  # the stepwise tier launching step by step, without its CUDA graphs


def timed_rows(device, H, I, stack):
    """{row: (module, TF32 allowed, CUDA graphs on)}: every backend and nn.LSTM in strict float32
    (what our products compute); on CUDA also nn.LSTM at torch's default, under which cuDNN
    multiplies in TF32, and the stepwise tier without its CUDA graphs."""
    rows = {backend: (LEM(I, H, **stack, backend=backend).to(device), False, True) for backend in backends_for(device, H)}
    if device.type == "cuda" and "stepwise" in rows:
        rows[STEPWISE_EAGER] = (rows["stepwise"][0], False, False)
    rows["nn.LSTM"] = (nn.LSTM(I, H, **stack).to(device), False, True)
    if device.type == "cuda":
        rows[LSTM_DEFAULT] = (nn.LSTM(I, H, **stack).to(device), torch.backends.cudnn.allow_tf32, True)
    return rows


def precision(row, device, allowed):
    """What a row's float32 products are: on CUDA cuBLAS and cuDNN follow the TF32 flags, the on-chip
    tier's tl.dot is strict (input_precision="ieee"); on CPU every product is float32."""
    return "TF32" if device.type == "cuda" and allowed and row != "onchip" else "fp32"


@contextlib.contextmanager
def row_settings(allowed, graphs):
    """TF32 allowed or not; with graphs False, the stepwise tier's CUDA graphs off inside the block."""
    with tf32(allowed), (contextlib.nullcontext() if graphs else graphs_off()):
        yield


@contextlib.contextmanager
def graphs_off():
    from .kernels import stepwise  # here, not at the top: it needs Triton
    before, stepwise.GRAPHS.enabled = stepwise.GRAPHS.enabled, False
    try:
        yield
    finally:
        stepwise.GRAPHS.enabled = before


def graphs_report():
    from .kernels import stepwise
    g = stepwise.GRAPHS
    off = "" if g.enabled else "; a capture failed, graphs off"
    return f"(stepwise CUDA graphs so far: {g.captures} captured, {g.replays} replays{off})"


def under(settings, fn):
    def run():
        with row_settings(*settings):
            return fn()
    return run


class Autocast(nn.Module):
    """`module` run under torch.autocast(dtype) on its input's device: a row of the table."""

    def __init__(self, module, dtype):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, x):
        with torch.autocast(x.device.type, self.dtype):
            return self.module(x)


def amp_label(dtype):
    return f"autocast {str(dtype).removeprefix('torch.')}"


def bench_config(name, device, repeats, budget_s, amp=None):
    """{backend: {"fwd+bwd", "fwd train", "fwd no_grad": s, "memory", "peak train", "peak no_grad": bytes}}
    for one configuration; amp (a dtype): also each fused backend and nn.LSTM under torch.autocast(amp)."""
    T, B, H, I = CONFIGS[name]
    torch.manual_seed(0)
    x = torch.randn(T, B, I, device=device)
    timed = timed_rows(device, H, I, STACKS.get(name, {}))
    if amp is not None:
        for k in [k for k in timed if k not in ("reference", STEPWISE_EAGER, LSTM_DEFAULT)]:
            module, allowed, graphs = timed[k]
            timed[f"{k} {amp_label(amp)}"] = (Autocast(module, amp), allowed, graphs)
    modes = {"fwd+bwd": forward_backward, "fwd train": forward_train, "fwd no_grad": forward_only}
    rows = {k: {"precision": amp_label(amp) if " autocast " in k else precision(k, device, allowed)}
            for k, (m, allowed, _) in timed.items()}
    for mode, make in modes.items():
        fns = {k: under(settings, make(m, x)) for k, (m, *settings) in timed.items()}
        for k, seconds in interleaved_medians(fns, device, repeats, budget_s).items():
            rows[k][mode] = seconds
    for k, (m, *settings) in timed.items():
        with row_settings(*settings):
            rows[k]["memory"] = memory(m, x)
            rows[k]["peak train"] = peak_bytes(forward_train(m, x), device)
            rows[k]["peak no_grad"] = peak_bytes(forward_only(m, x), device)
    return rows


def megabytes(n):
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def table(name, device, rows):
    T, B, H, I = CONFIGS[name]
    ref, lstm = rows["reference"], rows["nn.LSTM"]
    mem = "peak MB" if device.type == "cuda" else "saved MB"
    stack = "".join(f", {k} {v}" for k, v in STACKS.get(name, {}).items())
    lines = [f"\n{name} (T {T}, B {B}, H {H}, I {I}{stack}) on {device.type}, load average {os.getloadavg()[0]:.1f} at the end; vs nn.LSTM: against its strict fp32 row",
             f"| backend | fwd+bwd ms | speed-up vs reference | vs nn.LSTM | {mem} | precision |",
             "|---|---|---|---|---|---|"]
    for backend, r in rows.items():
        fb = r["fwd+bwd"]
        lines.append(f"| {backend} | {fb * 1e3:.1f} | {ref['fwd+bwd'] / fb:.2f}x | {lstm['fwd+bwd'] / fb:.2f}x | "
                     f"{megabytes(r['memory'])} | {r['precision']} |")
    lines += ["", "| backend | forward | ms | speed-up vs reference | vs nn.LSTM | peak MB | precision |",
              "|---|---|---|---|---|---|---|"]
    for backend, r in rows.items():
        for mode, label in (("train", "grad mode on"), ("no_grad", "no_grad")):
            f = r[f"fwd {mode}"]
            lines.append(f"| {backend} | {label} | {f * 1e3:.1f} | {ref[f'fwd {mode}'] / f:.2f}x | "
                         f"{lstm[f'fwd {mode}'] / f:.2f}x | {megabytes(r[f'peak {mode}'])} | {r['precision']} |")
    return "\n".join(lines + amp_speedups(rows))


def amp_speedups(rows):
    """One line per row under autocast: its speed-ups over the same module in float32."""
    lines = []
    for k, r in rows.items():
        base = rows.get(k.split(" autocast ")[0]) if " autocast " in k else None
        if base is not None:
            ratios = ", ".join(f"{mode} {base[mode] / r[mode]:.2f}x" for mode in ("fwd+bwd", "fwd train", "fwd no_grad"))
            lines.append(f"{k} vs its float32: {ratios}")
    return [""] + lines if lines else []


def kernels_main(args):
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'}; TF32 allowed by default: "
          f"cuBLAS {torch.backends.cuda.matmul.allow_tf32}, cuDNN {torch.backends.cudnn.allow_tf32}")
    for device in map(torch.device, devices):
        for name in args.configs:
            print(table(name, device, bench_config(name, device, args.repeats, args.budget, AMP_DTYPES.get(args.amp))),
                  flush=True)
            if device.type == "cuda":
                print(graphs_report(), flush=True)


def clock(device):
    """(wall, CPU time of this process) in s, once the device has finished its queued work."""
    sync(device)
    return time.perf_counter(), time.process_time()


def since(start, device):
    """(wall, CPU) seconds since start = clock(device)."""
    return tuple(now - then for now, then in zip(clock(device), start))


def medians(times):
    """Median (wall, CPU) of a list of (wall, CPU)."""
    return tuple(statistics.median(column) for column in zip(*times))


def detached(output):
    return output.detach() if isinstance(output, torch.Tensor) else type(output)(map(detached, output))


class Replay(nn.Module):
    """Stands in for a model and returns what it returned: task.loss(Replay(out), key) is a step's
    work outside the model (reading the batch, building its inputs, the loss)."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output


def epoch_main(args, argv):
    task_cls = experiments.task_class(args.experiment, argv)
    if args.synthetic:
        if task_cls.synthetic is None:
            raise SystemExit(f"{args.experiment} reads no data files (its data are generated): leave out --synthetic")
        task_cls = type(task_cls.__name__, (task_cls,), {"load": staticmethod(task_cls.synthetic)})
    a = cli.parse_args(task_cls, argv)
    task = loop.make_task(task_cls, a)
    device = task.device
    model, optimizer = loop.make_model(task, a)
    epoch_keys = task.train_batches(0)
    keys, epoch = list(epoch_keys), 1
    while len(keys) < args.warmup + args.batches:
        keys, epoch = keys + task.train_batches(epoch), epoch + 1
    last = {}
    model.register_forward_hook(lambda module, inputs, output: last.update(output=detached(output)))
    steps, outside = [], []
    for i, key in enumerate(keys[:args.warmup + args.batches]):
        start = clock(device)
        loop.train_step(task, model, optimizer, key, a.grad_norm)
        step = since(start, device)
        start = clock(device)
        task.loss(Replay(last["output"]), key)
        if i >= args.warmup:
            steps.append(step)
            outside.append(since(start, device))
        print(f"{step[0]:.2f}", end=" ", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    step, rest = medians(steps), medians(outside)
    print(f"{args.experiment}{' (synthetic data)' if args.synthetic else ''}: model {a.model}, H {a.nhid}, batch {a.batch}, "
          f"backend {a.backend}, {device}, {torch.get_num_threads()} torch threads, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"  training step: {step[0]:.3f} s wall, {step[1]:.3f} s CPU (median of {args.batches} after {args.warmup} "
          f"warm-up; each, wall: {' '.join(f'{t[0]:.3f}' for t in steps)}); outside the model (batch, loss): "
          f"{rest[0] * 1e3:.2f} ms, {100 * rest[0] / step[0]:.2f} % of it")
    if hasattr(a, "bptt"):  # a language model: a step reads batch x bptt tokens
        print(f"  training tokens/s: {a.batch * a.bptt / step[0]:,.0f} wall, {a.batch * a.bptt / step[1]:,.0f} CPU "
              f"(batch {a.batch} x bptt {a.bptt} per step)")
    total = [len(epoch_keys) * t for t in step]
    if not args.no_eval:
        start = clock(device)
        loop.evaluate(task, model)
        evaluation = since(start, device)
        print(f"  evaluation of {', '.join(task.eval_splits)}: {evaluation[0]:.1f} s wall, {evaluation[1]:.1f} s CPU")
        total = [t + e for t, e in zip(total, evaluation)]
    print(f"  one epoch ({len(epoch_keys)} steps{'' if args.no_eval else ' + evaluation'}): {total[0]:.1f} s = "
          f"{total[0] / 60:.1f} min wall, {total[1]:.1f} s = {total[1] / 60:.1f} min CPU", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lem.tools.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    k = sub.add_parser("kernels", help="the LEM backends against the reference loop and nn.LSTM")
    k.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    k.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when present")
    k.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    k.add_argument("--amp", choices=list(AMP_DTYPES), default=None,
                   help="also the fused backends and nn.LSTM under torch.autocast in this dtype")
    k.add_argument("--budget", type=float, default=60.0,
                   help="fewer repeats when they would take more than this many s per configuration")
    e = sub.add_parser("epoch", allow_abbrev=False, usage="python -m lem.tools.bench epoch EXPERIMENT [options] [train.py flags]",
                       help="one epoch of an experiment; flags after its name go to its train.py")
    e.add_argument("experiment", help="an experiment folder of the checkout: smnist, ptb, ...")
    e.add_argument("--batches", type=at_least(1), default=5, help="timed training steps (median)")
    e.add_argument("--warmup", type=at_least(0), default=2, help="untimed training steps first")
    e.add_argument("--synthetic", action="store_true", help="random data of the real sizes instead of the files")
    e.add_argument("--no-eval", action="store_true", help="leave out the evaluation (e.g. PTB's, minutes long)")
    for q in (k, e):
        q.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args, rest = p.parse_known_args(argv)
    if args.command != "epoch" and rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "kernels":
        kernels_main(args)
    else:
        try:
            epoch_main(args, rest)
        except checkout.NotACheckout as e:
            p.exit(2, f"{p.prog}: {e}\n")
        except ValueError as e:
            p.error(str(e))


if __name__ == "__main__":
    main()
