"""Time Google12's feature extraction (data.py's compute_features: read WAV, log-mel, cast) on
synthetic clips in the archive's format (16 kHz 16-bit mono): 90 % of 1 s, 10 % shorter, each of
its own length (the worst case for batching by length).

    python google12/time_features.py --clips 2000 [--device cpu] [--threads 2]
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the checkout first on sys.path, so `google12` imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import soundfile
import torch

from google12.data import SIZES, compute_features


def synthetic_clips(folder, n, seed=0):
    """n WAV files as the archive holds them: 90 % of 1 s, 10 % shorter; [(path, 0, None, label 0)]."""
    rng = np.random.default_rng(seed)
    clips = []
    for i in range(n):
        length = 16000 if rng.random() < 0.9 else int(rng.integers(8000, 16000))
        path = Path(folder) / f"{i:08x}_nohash_0.wav"
        soundfile.write(path, rng.normal(0, 0.1, length).astype(np.float32), 16000, subtype="PCM_16")
        clips.append((path, 0, None, 0))
    return clips


def clips_per_second(clips, device):
    """(wall, CPU) clips per second of compute_features over clips, after a warm-up."""
    compute_features(clips[:64], device)
    wall, cpu = time.perf_counter(), time.process_time()
    compute_features(clips, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return len(clips) / (time.perf_counter() - wall), len(clips) / (time.process_time() - cpu)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=2000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        rates = clips_per_second(synthetic_clips(tmp, args.clips), device)
    total = sum(SIZES.values())
    print(f"Google12 feature extraction on {device}, {torch.get_num_threads()} torch threads, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, {args.clips} clips")
    for rate, name in zip(rates, ("wall clock", "CPU time")):
        print(f"  {name}: {rate:.0f} clips/s; all {total:,} clips of the three splits: {total / rate / 60:.1f} min, once")


if __name__ == "__main__":
    main()
