"""Speed of the LEM backends against the reference loop and nn.LSTM (docs/kernels.md).

    python -m lem.bench                      # every configuration, CPU and (if present) CUDA
    python -m lem.bench --configs fhn smnist_h128 --devices cpu --threads 1

For each configuration and device: forward+backward and forward-only wall time (median of
several runs after a warm-up), their ratios to the reference loop and to nn.LSTM of the same
hidden size, and the memory the autograd graph holds for backward (CPU) or the peak allocated
memory (CUDA).
"""
import argparse
import statistics
import time

import torch
import torch.nn as nn

from . import kernels
from .model import LEM

# name: (T, B, H, I), SPEC §3
CONFIGS = {
    "smnist_h128": (784, 128, 128, 1),
    "smnist_h256": (784, 128, 256, 1),
    "fhn": (1000, 32, 16, 1),
    "eigenworms": (17984, 8, 32, 6),
    "ptb_char": (150, 128, 1024, 200),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats, budget_s):
    """Median wall time of fn() over up to `repeats` runs after one warm-up (fewer if slow)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - start
    times = []
    for _ in range(max(1, min(repeats, int(budget_s / max(first, 1e-9))))):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def saved_bytes(fn):
    """Bytes of the distinct tensors the autograd graph keeps for backward during fn()."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


def measure(module, x, repeats=5, budget_s=20.0):
    """(forward+backward s, forward s, memory bytes) of module on input x."""
    device = x.device

    def forward_backward():
        module(x)[0].sum().backward()

    def forward():
        with torch.no_grad():
            module(x)

    fb = timed(forward_backward, device, repeats, budget_s)
    f = timed(forward, device, repeats, budget_s)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        forward_backward()
        memory = torch.cuda.max_memory_allocated(device)
    else:
        memory, _ = saved_bytes(lambda: module(x))
    return fb, f, memory


def backends_for(device):
    names = ["reference", "cpp"] if device.type == "cpu" else ["reference", "triton"]
    return [n for n in names if n == "reference" or kernels.resolve(n, device) == n]


def bench_config(name, device, repeats, budget_s):
    T, B, H, I = CONFIGS[name]
    torch.manual_seed(0)
    x = torch.randn(T, B, I, device=device)
    rows = {}
    for backend in backends_for(device):
        if backend == "triton" and H > kernels.gpu_max_h():
            continue  # LEM would run it on the reference loop
        rows[backend] = measure(LEM(I, H, backend=backend).to(device), x, repeats, budget_s)
    rows["nn.LSTM"] = measure(nn.LSTM(I, H).to(device), x, repeats, budget_s)
    return rows


def table(name, device, rows):
    T, B, H, I = CONFIGS[name]
    ref, lstm = rows["reference"], rows["nn.LSTM"]
    mem = "peak MB" if device.type == "cuda" else "saved MB"
    lines = [f"\n{name} (T {T}, B {B}, H {H}, I {I}) on {device.type}",
             f"| backend | fwd+bwd ms | fwd ms | speed-up vs reference fwd+bwd / fwd | vs nn.LSTM fwd+bwd / fwd | {mem} |",
             "|---|---|---|---|---|---|"]
    for backend, (fb, f, memory) in rows.items():
        lines.append(f"| {backend} | {fb * 1e3:.1f} | {f * 1e3:.1f} | {ref[0] / fb:.2f}x / {ref[1] / f:.2f}x | "
                     f"{lstm[0] / fb:.2f}x / {lstm[1] / f:.2f}x | {memory / 2**20:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when present")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    p.add_argument("--budget", type=float, default=20.0, help="fewer repeats when one run would exceed this many s")
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
