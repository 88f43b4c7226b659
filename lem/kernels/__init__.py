"""Backends of the LEM time loop; all compute docs/paper.md §1 exactly (docs/kernels.md).

    reference  the autograd loop (reference.py), run by lem/nn.py on the layer's own Linears; the
               ground truth of the tests, and what the fused backends' autograd formulas recompute
               through for second derivatives and torch.func transforms
    cpp        fused CPU path: forward and backward loops in C++ (lem_cpu.cpp), built on first use
    triton     fused GPU path (gpu.py), in the fastest of its tiers that fits the call and the GPU:
    onchip       one Triton launch for all T steps, weights in shared memory (onchip.py)
    stepwise     per step cuBLAS GEMMs and fused Triton elementwise kernels, any H (stepwise.py)
    auto       cpp for CPU tensors, triton for CUDA tensors

A call that the fused kernels cannot serve exactly (hooks on the inner Linears, a Linear with a
forward of its own, vmap: see fused) runs `reference` with one warning per layer; on meta tensors
every backend runs it (shapes only). A fused path that cannot be built falls back to `reference`
with one warning; a GPU tier whose
kernels fail to compile or launch falls to the next tier down (onchip, stepwise, reference), with
one warning. The GPU tiers run float32, bfloat16 and float16 inputs, and torch.autocast; float64
runs on `reference`. `cpp` runs float32 and float64, and bfloat16, float16 and torch.autocast in mixed
precision (cpu.mixed_gemm; docs/kernels.md, "Low precision on CPU").
"""
import os
import sys
import warnings
import weakref

import torch
from torch._C._functorch import TransformType, peek_interpreter_stack
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.autograd import forward_ad
from torch.nn.modules import module as module_hooks

BACKENDS = ("auto", "reference", "cpp", "triton", "onchip", "stepwise")
GPU_BACKENDS = ("triton", "onchip", "stepwise")
GEMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the GPU tiers run
JIT_REFUSAL = (
    "LEM cannot be recorded by torch.jit.trace (nor by torch.onnx.export with dynamo=False, which traces "
    "with it): the trace would hold the time loop unrolled at the traced length, or the fused kernels as "
    "constants, and give wrong outputs for other inputs without a word. torch.export.export records it: "
    "for any sequence length on the fused backends (one lem:: operator per layer and direction; give "
    "dynamic_shapes for the time dimension), at the exported length on 'reference'. torch.compile compiles it.")
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
    if dtype in GEMM_DTYPES and autocast_enabled(device):
        return torch.get_autocast_dtype(device.type)
    return dtype if dtype in GEMM_DTYPES else None


def autocast_enabled(device):
    """torch.is_autocast_enabled for the device's type, False on meta, which autocast does not know
    (torch.amp.is_autocast_available would ask, but torch.compile cannot trace it)."""
    return device.type != "meta" and torch.is_autocast_enabled(device.type)


def resolve(name, device, hidden_size=1, dtype=torch.float32, gpu=None):
    """The backend (for GPU tensors: the tier) that runs a call with tensors of `dtype` on `device`.
    gpu: a gpu.GPU(capability, shared memory per block) to decide for instead of the device's own
    (e.g. GPU(86, 101376): what would run on an RTX 30xx)."""
    check_backend(name)
    if torch.jit.is_tracing():
        raise RuntimeError(JIT_REFUSAL)
    if device.type == "meta":
        return "reference"  # shapes only: every backend's are the reference loop's
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
# importing torch._dynamo with lem (seconds: docs/kernels.md); tests/layer/test_compile.py checks that it still is.
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
            warnings.warn(f"LEM backend {name!r} is unavailable ({type(error).__name__}: {_first_line(error)}); "
                          f"using the slower 'reference' loop instead", RuntimeWarning, stacklevel=_callers_level())
    return _broken[name] is None


def _first_line(error):
    """The error's message up to its first line break (a failed C++ build's says where its log is)."""
    lines = str(error).strip().splitlines()
    return lines[0] + (" ..." if len(lines) > 1 else "") if lines else "no message"


def _callers_level():
    """The warnings stacklevel of the first frame outside lem and torch (nn.Module.__call__,
    torch.compile): the user's call, whichever of lem's functions the first call went through."""
    lem_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    internal = tuple(os.path.join(folder, "") for folder in (lem_dir, os.path.dirname(os.path.abspath(torch.__file__))))
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(internal):
        frame, level = frame.f_back, level + 1
    return level


def backward_can_follow(*tensors):
    """Whether autograd will record a call on these tensors (grad mode on and one of them requires
    grad): only then do the fused paths keep activations for a backward."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def fused(name, x, inp2hid, y0, z0, hid2hid, transform_z, mask, dt, lengths=None, owner=None):
    """ys (T, B, H), z_T of the fused backend `name` (as resolved) for x (T, B, I); lengths None or
    (B,) int64 on x's device (see LEM._reference_loop); linears without bias are taken as zero bias.
    None when the caller must run the reference loop instead: when the linears' own forward would not
    be the product of their .weight and .bias (warned once per `owner`, see _why_not_fused), under
    torch.func.vmap or forward-mode AD, or when the GPU tier and every tier below it failed to launch."""
    linears = {"inp2hid": inp2hid, "hid2hid": hid2hid, "transform_z": transform_z}
    reason = _why_not_fused(linears)
    weights = [_weights(linear, x) for linear in linears.values()] if reason is None else None
    if reason is None and not torch.compiler.is_compiling():
        reason = _unfusable_transform([x, y0, z0, mask, *(t for pair in weights for t in pair)])
    if reason is not None:
        _warn_once(owner if owner is not None else inp2hid, reason)
        return None
    args = (x, *weights[0], y0, z0, *weights[1], *weights[2], mask, lengths, dt)
    if name == "cpp":
        from .cpu import lem_cpu
        return lem_cpu(*args)
    from . import gpu
    return gpu.run(name, *args)


def _why_not_fused(linears):
    """Why a fused kernel would not compute what these nn.Linear modules compute in the reference
    loop (None: it would): a forward of their own (a subclass, a dynamically quantized Linear), hooks
    that run around every call (the module's or global ones), or forward pre-hooks other than those
    that only recompute .weight from other parameters (pruning, old weight_norm: run once per call by
    _weights). Parametrizations need nothing: reading .weight computes the parametrized weight."""
    if any((module_hooks._global_forward_pre_hooks, module_hooks._global_forward_hooks,
            module_hooks._global_backward_hooks, module_hooks._global_backward_pre_hooks)):
        return "global module hooks are registered (torch.nn.modules.module.register_module_*_hook), which run " \
               "at every step's Linear calls"
    for name, linear in linears.items():
        if type(linear).forward is not torch.nn.Linear.forward:
            return f"{name} is a {type(linear).__module__}.{type(linear).__qualname__}, with a forward of its own"
        if linear._forward_hooks or linear._backward_hooks or linear._backward_pre_hooks:
            return f"{name} has forward or backward hooks, which run at every step"
        if any(not isinstance(h, _weight_only_pre_hooks()) or key in linear._forward_pre_hooks_with_kwargs
               for key, h in linear._forward_pre_hooks.items()):
            return f"{name} has forward pre-hooks (e.g. nn.utils.spectral_norm's), which run at every step"
    return None


def _weight_only_pre_hooks():
    """Forward pre-hooks that set .weight to a function of other parameters and do nothing else: one
    run per call gives the weight every step of the reference loop uses."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.weight_norm import WeightNorm
    return BasePruningMethod, WeightNorm


def _weights(linear, x):
    """(weight, bias) as linear's forward would use them at this call: its weight-only pre-hooks run
    first (a stale .weight from the previous call is never read)."""
    for hook in linear._forward_pre_hooks.values():
        hook(linear, (x,))
    return linear.weight, linear.bias


def _unfusable_transform(tensors):
    """Why a torch.func transform or forward-mode AD around the call keeps the fused operators from
    it (None: nothing does): they have no batching rule (vmap) and no forward-mode formula (jvp)."""
    transforms = () if peek_interpreter_stack() is None else {i.key() for i in retrieve_all_functorch_interpreters()}
    if TransformType.Vmap in transforms:
        return "the call runs under torch.func.vmap, for which the fused kernels have no batching rule"
    if TransformType.Jvp in transforms or forward_ad._current_level >= 0 and \
            any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        return "the call carries forward-mode tangents (torch.func.jvp, torch.autograd.forward_ad), which the " \
               "fused kernels have no formula for"
    return None


_warned = weakref.WeakKeyDictionary()  # owner module -> the reasons it was warned about


def _warn_once(owner, reason):
    reasons = _warned.setdefault(owner, set())
    if reason not in reasons:
        reasons.add(reason)
        warnings.warn(f"{type(owner).__name__}: {reason}; so that nothing is skipped, this layer runs the slower "
                      f"'reference' loop instead", RuntimeWarning, stacklevel=5)
