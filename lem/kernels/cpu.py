"""The fused CPU path: lem_cpu.cpp compiled on first use with torch.utils.cpp_extension (ninja + g++,
no step for the user to run) into torch's extension cache, then reused by every later process."""
import hashlib
import logging
import os
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("lem_cpu.cpp")
BUILD_DIR = None  # None: torch's cache ($TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions)
_module = None


def load():
    """The compiled extension; raises whatever the compiler raised (the caller falls back)."""
    global _module
    if _module is None:
        build_dir = BUILD_DIR
        if build_dir is not None:
            os.makedirs(build_dir, exist_ok=True)
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # its "no CUDA" notice
        from torch.utils import cpp_extension
        flags = ["-O3", "-fno-trapping-math", "-fno-math-errno", *_simd_flags()]  # lets the exp/tanh loops vectorise
        # The name carries the hash of the source, its path and the flags: two checkouts never share
        # (or race on) one cached build, which ninja would rebuild whenever the other one loads it.
        digest = hashlib.sha1(SOURCE.read_bytes() + str(SOURCE.resolve()).encode() + " ".join(flags).encode()).hexdigest()[:12]
        _module = cpp_extension.load(name=f"lem_cpu_{digest}", sources=[str(SOURCE)], build_directory=build_dir,
                                     extra_cflags=flags, verbose=False)
    return _module


def _simd_flags():
    """The vector units this CPU has (the build is cached per machine, and the flags are part of its
    name): AVX2/FMA, and AVX-512 with 512-bit vectors where the CPU has it."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    if not {"avx2", "fma"} <= flags:
        return []
    if {"avx512f", "avx512vl", "avx512dq", "avx512bw"} <= flags:
        return ["-mavx2", "-mfma", "-mavx512f", "-mavx512vl", "-mavx512dq", "-mavx512bw", "-mprefer-vector-width=512"]
    return ["-mavx2", "-mfma"]


class FusedLEMCPU(torch.autograd.Function):
    """(x, W_in, b_in, y0, z0, W_hh, b_hh, W_tz, b_tz, mask) -> (ys, z_T): the whole layer, input
    projection included. Forward keeps y_n, z_n and the four gate/candidate activations of every step
    for the backward (see lem_cpu.cpp); the input projection itself is not kept."""

    @staticmethod
    def forward(ctx, x, w_in, b_in, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, dt):
        ys, zs, acts = load().forward(x, w_in, b_in, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, dt, True)
        ctx.dt = dt
        ctx.save_for_backward(x, w_in, y0, z0, w_hh, w_tz, mask, ys, zs, acts)
        return ys, zs[-1]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ys, grad_zT):
        x, w_in, y0, z0, w_hh, w_tz, mask, ys, zs, acts = ctx.saved_tensors
        grads = load().backward(grad_ys, grad_zT, acts, ys, zs, x, w_in, y0, z0, w_hh, w_tz, mask, ctx.dt,
                                ctx.needs_input_grad[0])
        return (*grads, None, None)


def forward_only(x, w_in, b_in, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, dt):
    """(ys, z_T) without anything kept for a backward: no per-step z_n or activations are written.
    The same bits as FusedLEMCPU's forward."""
    ys, z_T = load().forward(x, w_in, b_in, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, dt, False)
    return ys, z_T[0]


def lem_cpu(x, w_in, b_in, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, dt):
    """The layer; keeps activations only when a backward can follow (grad mode on and some input
    requires grad), else runs forward_only."""
    inputs = (x, w_in, b_in, y0, z0, w_hh, b_hh, w_tz, b_tz, mask)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return FusedLEMCPU.apply(*inputs, dt)
    return forward_only(*inputs, dt)


def empty_cache():
    """Frees the large buffers the fused CPU path keeps for reuse (see LargeBuffers in lem_cpu.cpp)."""
    if _module is not None:
        _module.empty_cache()
