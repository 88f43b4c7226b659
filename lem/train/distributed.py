"""Several processes, one run: what the harness needs under torchrun (docs/distributed.md).

    torchrun --standalone --nproc_per_node 4 fitzhugh_nagumo/train.py

Every process builds the same task and model and walks the same list of batch keys; the
harness gives each process its share of every batch (`share`), and DistributedDataParallel
averages the gradients. --batch stays the global batch, so N processes follow the optimisation
path of one process up to float rounding. Without torchrun (WORLD_SIZE unset) every function
here is the identity of a single process and no process group is made.
"""
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

_cpu_group = None  # gloo group for small CPU-side messages; waits long (rank 0 may be downloading)


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def local_rank():
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main():
    return rank() == 0


def start(device):
    """Join the torchrun job if this process is part of one: nccl on GPUs, gloo on CPU."""
    global _cpu_group
    if int(os.environ.get("WORLD_SIZE", 1)) == 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    _cpu_group = dist.new_group(backend="gloo", timeout=timedelta(hours=6))


def stop():
    global _cpu_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _cpu_group = None


def one_by_one(build):
    """build() on rank 0 first, then on the first process of every other node, then on the rest:
    a data set is downloaded or cached once per file system, never by two processes at once."""
    if world_size() == 1:
        return build()
    turn = 0 if rank() == 0 else 1 if local_rank() == 0 else 2
    for t in range(3):
        if t == turn:
            result = build()
        dist.barrier(group=_cpu_group)
    return result


def share(batch, dim=0):
    """This process's share of a batch along dim: every world_size-th sample from the rank-th.

    For a task that draws its batch inside loss() from a seed key (index batches are split by the
    harness, see local_batch). Such a batch must split evenly: the harness cannot weight shares
    of a batch it never sees."""
    world = world_size()
    if world == 1:
        return batch
    if batch.shape[dim] % world:
        raise ValueError(f"a batch of {batch.shape[dim]} samples does not split evenly over {world} processes: "
                         f"use a --batch divisible by the number of processes")
    return batch[(slice(None),) * dim + (slice(rank(), None, world),)]


def local_batch(key):
    """(this process's part of a batch key, the weight of its loss).

    An index batch (1-D tensor or array) is split: process r gets key[r::world]. Its loss is a
    mean over its n_r samples, so weighting it by world · n_r / n makes DDP's gradient average
    the gradient of the mean over all n samples, also when n does not divide evenly. A process
    left without samples runs one sample with weight 0 (DDP needs every process in every step).
    Any other key (a seed) goes whole to every process; see `share`."""
    world = world_size()
    if world == 1 or getattr(key, "ndim", 0) != 1:
        return key, 1.0
    part = key[rank()::world]
    if len(part) == 0:
        return key[:1], 0.0
    return part, world * len(part) / len(key)


def wrap(model, device):
    """The model DDP trains under torchrun (the plain model otherwise); checkpoints keep the plain one."""
    if world_size() == 1:
        return model
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def mean(value):
    """Mean over processes of a tensor (the weighted losses: their mean is the global batch's loss)."""
    if world_size() == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / world_size()


def anyone(flag):
    """True on every process if flag is true on any (stop requests, time limits): all stop together."""
    if world_size() == 1:
        return bool(flag)
    flag = torch.tensor([int(bool(flag))])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_cpu_group)
    return bool(flag.item())


def gather(obj):
    """[obj of rank 0, obj of rank 1, ...] on every process (pickled over the CPU group)."""
    if world_size() == 1:
        return [obj]
    objs = [None] * world_size()
    dist.all_gather_object(objs, obj, group=_cpu_group)
    return objs


def fail(message):
    """Stop with exit code 1 and no traceback: rank 0 prints message, the other processes stop quietly."""
    sys.exit(message if is_main() else 1)
