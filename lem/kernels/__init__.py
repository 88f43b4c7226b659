"""Backends of the LEM time loop; all compute SPEC §1 exactly (docs/kernels.md).

    reference  the autograd loop in lem/model.py (the ground truth of the tests)
    cpp        fused CPU path: forward and backward loops in C++ (lem_cpu.cpp), built on first use
    triton     fused GPU path: one Triton kernel for the forward, one for the backward (gpu.py)
    auto       cpp for CPU tensors, triton for CUDA tensors

A fused path that cannot be built falls back to `reference` with one warning. The Triton kernels
keep all recurrent weights on chip, so they take float32 and H <= gpu.MAX_H; other calls that
would go to them run on `reference` (cuBLAS per step).
"""
import os
import warnings

import torch

BACKENDS = ("auto", "reference", "cpp", "triton")
_broken = {}  # backend -> the error that made it unusable in this process


def check_backend(name):
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def triton_interpreted():
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve(name, device, hidden_size=1, dtype=torch.float32):
    """The backend that runs a call with tensors on `device`."""
    check_backend(name)
    if name == "auto":
        name = "triton" if device.type == "cuda" else "cpp" if device.type == "cpu" else "reference"
    if name == "cpp" and device.type != "cpu":
        raise ValueError(f"backend 'cpp' runs on CPU tensors, got tensors on {device}")
    if name == "triton" and device.type != "cuda" and not triton_interpreted():
        raise ValueError(f"backend 'triton' runs on CUDA tensors (or CPU ones under TRITON_INTERPRET=1), got {device}")
    if name != "reference" and not _usable(name):
        return "reference"
    if name == "triton" and (dtype != torch.float32 or hidden_size > gpu_max_h()):
        return "reference"
    return name


def _usable(name):
    if name not in _broken:
        try:
            if name == "cpp":
                from . import cpu
                cpu.load()
            else:
                from . import gpu
                gpu.load()
            _broken[name] = None
        except Exception as error:  # a compiler or import failure of any kind: fall back, never fail
            _broken[name] = error
            warnings.warn(f"LEM backend {name!r} is unavailable ({type(error).__name__}: {str(error).strip()[:300]}); "
                          f"using the slower 'reference' loop instead", RuntimeWarning, stacklevel=4)
    return _broken[name] is None


def gpu_max_h():
    """Largest hidden size the Triton kernels take (their weights must fit on chip)."""
    from .gpu import MAX_H
    return MAX_H


def fused(name, x, inp2hid, y0, z0, hid2hid, transform_z, mask, dt):
    """ys (T, B, H), z_T of the fused backend `name` (already resolved) for x (T, B, I)."""
    args = (y0, z0, hid2hid.weight, hid2hid.bias, transform_z.weight, transform_z.bias, mask, dt)
    if name == "cpp":
        from .cpu import lem_cpu
        return lem_cpu(x, inp2hid.weight, inp2hid.bias, *args)  # it does the input projection itself
    from .gpu import lem_triton
    return lem_triton(inp2hid(x), *args)
