"""Seconds per EigenWorms epoch at the paper's settings on this machine, from synthetic data of
the real shape (T = 17984, 6 channels; 181 train series in batches of 8, 39 valid + 39 test).

    OMP_NUM_THREADS=1 python eigenworms/time_epoch.py --batches 2

Times --batches training steps (forward, backward, Adam) and one evaluation of 39 series, each after
an untimed warm-up one, then extrapolates: epoch = 23 steps + 2 evaluations. An estimate from a few
batches, not a full epoch.
"""
import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

import lem

T, CHANNELS, CLASSES, N_TRAIN, N_EVAL = 17984, 6, 5, 181, 39

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--batches", type=int, default=2)
p.add_argument("--model", default="lem", choices=["lem", "lstm", "gru"])
p.add_argument("--device", default="cpu")
args = p.parse_args()

torch.manual_seed(0)
model = lem.RNNModel(args.model, CHANNELS, 32, CLASSES, dt=0.00017).to(args.device)
optimizer = torch.optim.Adam(model.parameters(), lr=0.00609)
x = torch.randn(T, 8, CHANNELS, device=args.device)
y = torch.randint(0, CLASSES, (8,), device=args.device)


def train_step():
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def evaluate():
    with torch.no_grad():
        model(torch.randn(T, N_EVAL, CHANNELS, device=args.device))


train_step()  # warm-up, not timed: loads the compiled kernel, allocates the buffers an epoch reuses
step_times = []
cpu_start = time.process_time()
for _ in range(args.batches):
    start = time.perf_counter()
    train_step()
    step_times.append(time.perf_counter() - start)
cpu_step = (time.process_time() - cpu_start) / args.batches
evaluate()  # warm-up
start = time.perf_counter()
evaluate()
eval_time = time.perf_counter() - start

steps = math.ceil(N_TRAIN / 8)
step = sum(step_times) / len(step_times)
print(f"{args.model} on {args.device} ({torch.get_num_threads()} threads): training step {step:.2f} s "
      f"(each: {', '.join(f'{t:.2f}' for t in step_times)}), evaluation of {N_EVAL} series {eval_time:.2f} s")
print(f"CPU time of this process per training step: {cpu_step:.2f} s (wall time above includes waiting "
      f"for a shared CPU; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
print(f"extrapolated epoch: {steps} steps x {step:.2f} s + 2 x {eval_time:.2f} s = {steps * step + 2 * eval_time:.1f} s")
