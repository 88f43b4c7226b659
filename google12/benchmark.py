"""How fast Google12's two halves run here: feature extraction (clips/s) and training (s/epoch).

    python google12/benchmark.py                       # 2000 clips, 20 training batches, on the CPU
    python google12/benchmark.py --device cuda

Extraction runs the real code (read WAV, log-mel, cast) on synthetic clips written in the archive's
format (16 kHz 16-bit mono): 90 % of 1 s, 10 % shorter, each of its own length (the worst case for
batching by length). Training: the paper's model and batch (LEM, H 128, batch 100, 126 × 80 inputs),
timed for --batches steps and extrapolated to one epoch: 853 batches (84,843 word clips + ~400 silence
segments) plus evaluating valid (9,981) and test (11,005).

Each figure is given twice: by the wall clock, and by this process's CPU time (what an otherwise idle
core would take; the two differ on a shared machine).
"""
import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch
import torch.nn.functional as F

import lem
from data import compute_features

TRAIN_BATCHES, EVAL_CLIPS = 853, 9_981 + 11_005


def synthetic_clips(folder, n, seed=0):
    rng = np.random.default_rng(seed)
    clips = []
    for i in range(n):
        length = 16000 if rng.random() < 0.9 else int(rng.integers(8000, 16000))
        path = folder / f"{i:08x}_nohash_0.wav"
        soundfile.write(path, rng.normal(0, 0.1, length).astype(np.float32), 16000, subtype="PCM_16")
        clips.append((path, 0, None, 0))
    return clips


def time_extraction(n, device):
    with tempfile.TemporaryDirectory() as tmp:
        clips = synthetic_clips(Path(tmp), n)
        compute_features(clips[:64], device)  # warm-up
        wall, cpu = time.perf_counter(), time.process_time()
        compute_features(clips, device)
        return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)


def clock(device):
    """(wall, cpu) seconds, after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return np.array([time.perf_counter(), time.process_time()])


def time_training(n_batches, device, batch=100):
    torch.manual_seed(0)
    x = torch.randn(1000, 126, 80).half().to(device)  # features as cached: float16, batch-first
    y = torch.randint(0, 12, (1000,), device=device)
    model = lem.RNNModel("lem", 80, 128, 12, dt=1.0, input_dropout=0.03).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.00089)
    batches = [torch.randperm(1000, device=device)[:batch] for _ in range(n_batches + 2)]
    data_s = step_s = 0.0
    for i, idx in enumerate(batches):
        t0 = clock(device)
        inputs, targets = x[idx].float().transpose(0, 1), y[idx]  # what Google12.loss does before the model
        t1 = clock(device)
        loss = F.cross_entropy(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= 2:  # the first two are warm-up
            data_s = data_s + t1 - t0
            step_s = step_s + clock(device) - t1
    model.eval()
    with torch.no_grad():
        for _ in range(2):  # the first chunk is a warm-up (buffer allocation), the second is timed
            t0 = clock(device)
            model(x.float().transpose(0, 1))  # Google12.evaluate's chunk of 1000 clips
            eval_s = (clock(device) - t0) / 1000 * EVAL_CLIPS
    return data_s / n_batches, step_s / n_batches, eval_s


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=2000)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, {torch.get_num_threads()} torch threads")
    rates = time_extraction(args.clips, device)
    times = time_training(args.batches, device)
    for k, clock_name in enumerate(("wall clock", "CPU time")):
        rate = rates[k]
        data_s, step_s, eval_s = (t[k] for t in times)
        print(f"{clock_name}: feature extraction {rate:.0f} clips/s over {args.clips} clips "
              f"(all 105,829 + ~400 silence clips: {106_230 / rate / 60:.1f} min, once)")
        print(f"{clock_name}: training step (batch 100, H 128, T 126) {step_s * 1e3:.1f} ms, reading its batch "
              f"{data_s * 1e3:.2f} ms; one epoch: {TRAIN_BATCHES * step_s:.0f} s training + "
              f"{TRAIN_BATCHES * data_s:.1f} s reading batches + {eval_s:.0f} s evaluating valid and test "
              f"= {TRAIN_BATCHES * (step_s + data_s) + eval_s:.0f} s")


if __name__ == "__main__":
    main()
