"""Backends of the LEM time loop; all compute SPEC §1 exactly (docs/kernels.md).

    reference  the autograd loop in lem/model.py (the ground truth of the tests)
    cpp        fused CPU path: forward and backward loops in C++ (lem_cpu.cpp), built on first use
    triton     fused GPU path (gpu.py), in the fastest of its tiers that fits the call and the GPU:
    onchip       one Triton launch for all T steps, weights in shared memory (onchip.py)
    stepwise     per step cuBLAS GEMMs and fused Triton elementwise kernels, any H (stepwise.py)
    auto       cpp for CPU tensors, triton for CUDA tensors

A fused path that cannot be built falls back to `reference` with one warning; a GPU tier whose
kernels fail to compile or launch falls to the next tier down (onchip, stepwise, reference), with
one warning. The GPU tiers run float32, bfloat16 and float16 inputs, and torch.autocast; float64
runs on `reference`. `cpp` runs float32 and float64, and bfloat16, float16 and torch.autocast in mixed
precision (cpu.mixed_gemm; docs/kernels.md, "Low precision on CPU").
"""
import os
import warnings

import torch

BACKENDS = ("auto", "reference", "cpp", "triton", "onchip", "stepwise")
GPU_BACKENDS = ("triton", "onchip", "stepwise")
GEMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the GPU tiers run
_broken = {}  # backend -> the error that made it unusable in this process


def check_backend(name):
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def triton_interpreted():
    return os.environ.get("TRITON_INTERPRET") == "1"


def gemm_dtype(device, dtype):
    """The dtype of the recurrent products (and of the layer's outputs) for inputs of `dtype`: under
    torch.autocast its dtype, as nn.LSTM's outputs are; None for float64 (no GPU tier runs it)."""
    if dtype in GEMM_DTYPES and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype if dtype in GEMM_DTYPES else None


def resolve(name, device, hidden_size=1, dtype=torch.float32, gpu=None):
    """The backend (for GPU tensors: the tier) that runs a call with tensors of `dtype` on `device`.
    gpu: a gpu.GPU(capability, shared memory per block) to decide for instead of the device's own
    (e.g. GPU(86, 101376): what would run on an RTX 30xx)."""
    check_backend(name)
    if name == "auto":
        name = "triton" if device.type == "cuda" else "cpp" if device.type == "cpu" else "reference"
    if name == "cpp" and device.type != "cpu":
        raise ValueError(f"backend 'cpp' runs on CPU tensors, got tensors on {device}")
    if name in GPU_BACKENDS and device.type != "cuda" and not triton_interpreted():
        raise ValueError(f"backend {name!r} runs on CUDA tensors (or CPU ones under TRITON_INTERPRET=1), got {device}")
    if name == "reference" or not _usable("cpp" if name == "cpp" else "triton"):
        return "reference"
    if name == "cpp":
        return name
    from .gpu import tiers
    found = tiers(name, device, hidden_size, dtype, gpu)
    return found[0] if found else "reference"


# torch.compile runs resolve() once while tracing and puts its answer into the graph as a constant
# (the device, size and dtype it depends on are guarded by the graph anyway; a tier that fails later
# is left by the GPU operator itself, inside the graph), instead of tracing the build, the GPU query
# and the tier tables. This is what torch.compiler.assume_constant_result(resolve) does, without
# importing torch._dynamo with lem (~2 s); tests/test_compile.py checks that it still is.
resolve._dynamo_marked_constant = True


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


def backward_can_follow(*tensors):
    """Whether autograd will record a call on these tensors (grad mode on and one of them requires
    grad): only then do the fused paths keep activations for a backward."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def fused(name, x, inp2hid, y0, z0, hid2hid, transform_z, mask, dt, lengths=None):
    """ys (T, B, H), z_T of the fused backend `name` (as resolved) for x (T, B, I); lengths None or
    (B,) int64 on x's device (see LEM._reference_loop); linears without bias are taken as zero bias.
    None when the GPU tier and every tier below it failed to launch: then the caller runs the
    reference loop."""
    args = (x, inp2hid.weight, inp2hid.bias, y0, z0, hid2hid.weight, hid2hid.bias, transform_z.weight,
            transform_z.bias, mask, lengths, dt)
    if name == "cpp":
        from .cpu import lem_cpu
        return lem_cpu(*args)
    from . import gpu
    return gpu.run(name, *args)
