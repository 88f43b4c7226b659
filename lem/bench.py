"""Speed of the LEM backends against the reference loop and nn.LSTM (docs/kernels.md).

    python -m lem.bench                      # every configuration, CPU and (if present) CUDA
    python -m lem.bench --devices cuda       # CUDA: the reference loop, each GPU tier, nn.LSTM (cuDNN)
    python -m lem.bench --configs fhn smnist_h128 --devices cpu --threads 1

For each configuration and device, wall times (median of several runs after a warm-up; the
backends take turns in every round, so that other load on a shared machine hits all of them alike)
with their ratios to nn.LSTM of the same hidden size:
  - forward+backward (also against the reference loop), and the memory the autograd graph holds
    for backward (CPU) or the peak allocated memory (CUDA);
  - forward only, with grad mode on (what a training forward keeps) and under torch.no_grad()
    (evaluation), and the peak memory each adds: on CUDA the peak allocated, on CPU the growth of
    the process's peak resident set (Linux VmHWM, reset through /proc/self/clear_refs) over a call
    started with the allocators' caches handed back.
"""
import argparse
import ctypes
import gc
import re
import statistics
import time

import torch
import torch.nn as nn

from . import kernels
from .kernels import cpu
from .model import LEM

# name: (T, B, H, I), SPEC §3
CONFIGS = {
    "smnist_h128": (784, 128, 128, 1),
    "smnist_h256": (784, 128, 256, 1),
    "fhn": (1000, 32, 16, 1),
    "fhn_b256": (1000, 256, 16, 1),  # evaluation-sized batch
    "fhn_2layer_bidir": (1000, 32, 16, 1),
    "eigenworms": (17984, 8, 32, 6),
    "ptb_char": (150, 128, 1024, 200),
}
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
    """The loops to time: the reference, and on CPU the fused one, on CUDA every GPU tier that runs at H."""
    names = ["reference", "cpp"] if device.type == "cpu" else ["reference", "onchip", "stepwise"]
    return [n for n in names if n == "reference" or runs(n, device, H)]


def runs(backend, device, H):
    try:
        return kernels.resolve(backend, device, H) == backend
    except ValueError:  # 'onchip' where the weights do not fit this GPU
        return False


def bench_config(name, device, repeats, budget_s):
    """{backend: {"fwd+bwd", "fwd train", "fwd no_grad": s, "memory", "peak train", "peak no_grad": bytes}}
    for one configuration."""
    T, B, H, I = CONFIGS[name]
    torch.manual_seed(0)
    x = torch.randn(T, B, I, device=device)
    stack = STACKS.get(name, {})
    modules = {backend: LEM(I, H, **stack, backend=backend).to(device) for backend in backends_for(device, H)}
    modules["nn.LSTM"] = nn.LSTM(I, H, **stack).to(device)
    modes = {"fwd+bwd": forward_backward, "fwd train": forward_train, "fwd no_grad": forward_only}
    rows = {k: {} for k in modules}
    for mode, make in modes.items():
        for k, seconds in interleaved_medians({k: make(m, x) for k, m in modules.items()}, device, repeats, budget_s).items():
            rows[k][mode] = seconds
    for k, m in modules.items():
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
    lines = [f"\n{name} (T {T}, B {B}, H {H}, I {I}{stack}) on {device.type}",
             f"| backend | fwd+bwd ms | speed-up vs reference | vs nn.LSTM | {mem} |", "|---|---|---|---|---|"]
    for backend, r in rows.items():
        fb = r["fwd+bwd"]
        lines.append(f"| {backend} | {fb * 1e3:.1f} | {ref['fwd+bwd'] / fb:.2f}x | {lstm['fwd+bwd'] / fb:.2f}x | "
                     f"{megabytes(r['memory'])} |")
    lines += ["", "| backend | forward | ms | speed-up vs reference | vs nn.LSTM | peak MB |", "|---|---|---|---|---|---|"]
    for backend, r in rows.items():
        for mode, label in (("train", "grad mode on"), ("no_grad", "no_grad")):
            f = r[f"fwd {mode}"]
            lines.append(f"| {backend} | {label} | {f * 1e3:.1f} | {ref[f'fwd {mode}'] / f:.2f}x | "
                         f"{lstm[f'fwd {mode}'] / f:.2f}x | {megabytes(r[f'peak {mode}'])} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when present")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    p.add_argument("--budget", type=float, default=60.0,
                   help="fewer repeats when they would take more than this many s per configuration")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'}")
    for device in map(torch.device, devices):
        for name in args.configs:
            print(table(name, device, bench_config(name, device, args.repeats, args.budget)), flush=True)


if __name__ == "__main__":
    main()
