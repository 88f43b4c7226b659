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
        # The name carries the source's hash: checkouts with other versions of the kernel never
        # share (or race on) one cached build.
        digest = hashlib.sha1(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:12]
        _module = cpp_extension.load(name=f"lem_cpu_{digest}", sources=[str(SOURCE)], build_directory=build_dir,
                                     extra_cflags=flags, verbose=False)
    return _module


def _simd_flags():
    """AVX2/FMA when this CPU has them (the build is cached per machine)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return []
    return ["-mavx2", "-mfma"] if "avx2" in flags and "fma" in flags else []


class FusedLEMCPU(torch.autograd.Function):
    """(u_proj, y0, z0, W_hh, b_hh, W_tz, b_tz, mask) -> (ys, z_T); u_proj = inp2hid(x) of all steps.
    Forward keeps y_n, z_n and the recurrent products of every step for the backward (see lem_cpu.cpp)."""

    @staticmethod
    def forward(ctx, u_proj, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, dt):
        keep_z = any(ctx.needs_input_grad)
        ys, zs, *products = load().forward(u_proj, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, dt, keep_z)
        ctx.dt = dt
        ctx.save_for_backward(u_proj, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, ys, zs, *products)
        return ys, zs[-1]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ys, grad_zT):
        u_proj, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, ys, zs, a_h, q_all = ctx.saved_tensors
        if grad_ys is None:
            grad_ys = torch.zeros_like(ys)
        grads = load().backward(grad_ys, grad_zT, u_proj, ys, zs, a_h, q_all, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, ctx.dt)
        return (*grads, None, None)


def lem_cpu(u_proj, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, dt):
    return FusedLEMCPU.apply(u_proj, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, dt)
