"""Time of one training epoch of sMNIST, psMNIST and noisy CIFAR-10 at the paper's settings.

    python benchmarks/image_epoch_time.py                    # 30 batches each, on the default device
    python benchmarks/image_epoch_time.py --batches 10 --only smnist

Synthetic uint8 images of the real sizes (MNIST 60000 + 10000, CIFAR-10 50000 + 10000) stand in
for the files; everything else is the experiment's own Task: split, batches, sequence
construction on the device, model, Adam and clipping as in the harness. It times `--batches`
training batches after 2 warm-up ones, split into "data" (indexing the uint8 images and building
the float sequences) and "step" (forward, backward, clip, Adam), and one evaluation chunk after a
warm-up one, and extrapolates to a whole epoch.
"""
import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import lem.images  # noqa: E402
from lem.harness import build_parser, pick_device, seed_everything  # noqa: E402

RUNS = {"smnist": ["--nhid", "128"], "smnist_h256": ["--nhid", "256"], "psmnist": [], "noisy_cifar": []}
SIZES = {"smnist": ((60000, 28, 28), 10000), "psmnist": ((60000, 28, 28), 10000), "noisy_cifar": ((50000, 3, 32, 32), 10000)}


def task_class(experiment):
    """The lem.ImageTask subclass in <experiment>/train.py (its `from data import` needs its folder)."""
    folder = REPO / experiment
    sys.modules.pop("data", None)
    sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(f"{experiment}_train", folder / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.path.remove(str(folder))
    return next(v for v in vars(module).values() if isinstance(v, type) and issubclass(v, lem.images.ImageTask)
                and v is not lem.images.ImageTask)


def synthetic(shape, n_test):
    def load(root):
        g = torch.Generator().manual_seed(0)
        return {"train": (torch.randint(0, 256, shape, dtype=torch.uint8, generator=g), torch.randint(0, 10, shape[:1])),
                "test": (torch.randint(0, 256, (n_test, *shape[1:]), dtype=torch.uint8, generator=g),
                         torch.randint(0, 10, (n_test,)))}
    return staticmethod(load)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_experiment(name, flags, n_batches, device_name):
    experiment = name.split("_h")[0]
    cls = task_class(experiment)
    cls.load = synthetic(*SIZES[experiment])
    args = build_parser(cls).parse_args([*flags, "--device", device_name])
    device = pick_device(args.device)
    torch.set_flush_denormal(True)  # as lem.run does
    seed_everything(args.seed)
    task = cls(args, device)
    model = task.build_model().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    images, labels = task.splits["train"]
    batches = task.train_batches(0)
    data_s = step_s = 0.0
    for i, idx in enumerate(batches[:n_batches + 2]):
        sync(device)
        t0 = time.perf_counter()
        idx = idx.to(device)
        x, y = task.sequences(images[idx]), labels[idx]
        sync(device)
        t1 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_norm)
        optimizer.step()
        sync(device)
        t2 = time.perf_counter()
        if i >= 2:  # warm-up batches are not counted
            data_s, step_s = data_s + t1 - t0, step_s + t2 - t1
        print(f"{t2 - t0:.1f}", end=" ", file=sys.stderr, flush=True)
    chunk = task.eval_chunk
    model.eval()
    with torch.no_grad():
        for _ in range(2):  # the first chunk is a warm-up (buffer allocation), the second is timed
            t0 = time.perf_counter()
            model(task.sequences(task.splits["test"][0][:chunk])).argmax(-1)
            sync(device)
            eval_s = time.perf_counter() - t0
    print(file=sys.stderr)
    n_eval = len(task.splits["valid"][1]) + len(task.splits["test"][1])
    per_batch = (data_s + step_s) / n_batches
    train_epoch = per_batch * len(batches)
    print(f"{name:12s} H={args.nhid:<4d} batch={args.batch:<4d} {len(batches)} batches/epoch: "
          f"{per_batch:.3f} s/batch ({n_batches} timed), data {100 * data_s / (data_s + step_s):.2f} % of it; "
          f"training epoch ~{train_epoch / 60:.1f} min, + evaluation of {n_eval} images ~{eval_s * n_eval / chunk / 60:.1f} min",
          flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=30, help="timed training batches per experiment")
    p.add_argument("--only", nargs="+", choices=list(RUNS), default=list(RUNS))
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in a.only:
        time_experiment(name, RUNS[name], a.batches, a.device)


if __name__ == "__main__":
    main()
