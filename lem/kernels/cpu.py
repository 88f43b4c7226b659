"""The fused CPU path: lem_cpu.cpp compiled on first use with torch.utils.cpp_extension (ninja + g++,
no step for the user to run) into torch's extension cache, then reused by every later process.

Its forward and backward are the torch.library operators lem::cpu_forward and lem::cpu_backward
(with fake implementations and autograd), so that torch.compile puts a call into its graph as
one node instead of breaking the graph there.
"""
import hashlib
import importlib.util
import logging
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from . import backward_can_follow, gemm_dtype, reference

SOURCE = Path(__file__).with_name("lem_cpu.cpp")
BUILD_DIR = None  # None: torch's cache ($TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions/<python>_<cuda>)
_module = None
STALE_LOCK_S = 15 * 60  # a build takes minutes (docs/kernels.md): a lock this old was left by a killed one


class BuildError(RuntimeError):
    """The C++ build failed; the message names the log file that holds the compiler's full output."""


def load():
    """The compiled extension: the one built before for this source, these flags, this torch and
    this Python, else built now (announced on stderr, with its time when done). Raises BuildError (or whatever
    stopped the build) when it cannot be had: the caller falls back."""
    global _module
    if _module is None:
        flags = compiler_flags()
        name = build_name(flags)
        folder = build_folder(name)
        _module = _import_built(name, folder) or _build(name, folder, flags)
    return _module


def compiler_flags():
    # -fno-trapping-math -fno-math-errno let the exp/tanh loops vectorise. -fopenmp: at::parallel_for
    # is OpenMP inside torch's headers, so without it every call runs on one thread (the OpenMP
    # runtime, libgomp.so.1, is the one torch has loaded already)
    return ["-O3", "-fno-trapping-math", "-fno-math-errno", "-fopenmp", *_simd_flags()]


def build_name(flags):
    """lem_cpu_<hash of the source's content, the flags, torch's version and the Python ABI>: a new
    environment with the same torch reuses a build, and one found under this name was made from
    exactly this source (two checkouts whose sources differ never share one). Not the source's
    path: a checkout and a pip-installed copy of the same source share their build."""
    key = b"\0".join([SOURCE.read_bytes(), " ".join(flags).encode(), torch.__version__.encode(),
                      sys.implementation.cache_tag.encode()])
    return f"lem_cpu_{hashlib.sha1(key).hexdigest()[:12]}"


def build_folder(name):
    """Where the build named `name` lives (created if missing)."""
    if BUILD_DIR is not None:
        folder = Path(BUILD_DIR)
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    return Path(_cpp_extension()._get_build_directory(name, False))


def _cpp_extension():
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # its "no CUDA" notice
    from torch.utils import cpp_extension
    return cpp_extension


def _build(name, folder, flags):
    """cpp_extension.load, announced on stderr with its time; when it fails, the compiler's output
    goes to a log file that the BuildError names."""
    cpp_extension = _cpp_extension()
    _check_build_lock(folder / "lock")
    print(f"lem: building the fused CPU kernel, once, about 1-2 min, in {folder}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        module = cpp_extension.load(name=name, sources=[str(SOURCE)], build_directory=str(folder),
                                    extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # the compiler's error, or no compiler or ninja at all
        log = _write_build_log(folder, error)
        print(f"lem: the build of the fused CPU kernel failed after {time.perf_counter() - start:.0f} s",
              file=sys.stderr, flush=True)
        raise BuildError(f"building {SOURCE} failed; the compiler's full output is in {log}") from error
    print(f"lem: built the fused CPU kernel in {time.perf_counter() - start:.0f} s: {module.__file__}",
          file=sys.stderr, flush=True)
    return module


def _write_build_log(folder, error):
    """The path of a log holding the whole failure (cpp_extension puts the compiler's output in the
    exception's message): the build folder's build.log, or a temporary file if that is not writable."""
    text = "".join(traceback.format_exception(error))
    try:
        log = Path(folder) / "build.log"
        log.write_text(text)
    except OSError:
        with tempfile.NamedTemporaryFile("w", prefix="lem_cpu_build_", suffix=".log", delete=False) as f:
            f.write(text)
        log = Path(f.name)
    return log


def _import_built(name, folder):
    """The extension built earlier under this name, imported without cpp_extension.load, which runs
    ninja and takes its build lock (a second or more of every run's start, docs/kernels.md); None when
    there is none to import."""
    path = Path(folder) / f"{name}.so"
    if not path.exists():
        return None
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except ImportError:  # e.g. a build cut off mid-link: cpp_extension.load rebuilds it
        return None


def _check_build_lock(lock):
    """cpp_extension.load waits, silently and without end, while its build folder holds a lock
    file; a build killed mid-way (Ctrl-C on a first run) leaves one behind. A lock older than any
    build takes is removed with a warning; a younger one is announced, naming the file to delete
    if no other process is building."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        warnings.warn(f"removing {lock}: left {age / 60:.0f} min ago by a build of the CPU kernel that did not finish")
        lock.unlink(missing_ok=True)
    else:
        print(f"lem: waiting for {lock}: another process is building the CPU kernel (if none is, delete "
              f"that file)", file=sys.stderr, flush=True)


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


def _forward(x: Tensor, w_in: Tensor, b_in: Optional[Tensor], y0: Tensor, z0: Tensor, w_hh: Tensor,
                b_hh: Optional[Tensor], w_tz: Tensor, b_tz: Optional[Tensor], mask: Optional[Tensor],
                lengths: Optional[Tensor], dt: float, keep: bool,
                gemm: Optional[torch.dtype]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The whole layer, input projection included: ys (T, B, H), z_T (B, H), and for a backward
    (keep) zs (T, B, H) and the four gate/candidate activations of every step acts (T, B, 4H); without
    keep two empty tensors instead, and nothing of size T·B other than ys is written. gemm: None, or
    bfloat16/float16 for mixed precision (see mixed_gemm): then all four are float32."""
    return tuple(load().forward(x, w_in, b_in, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, lengths, dt, keep, gemm))


cpu_forward = torch.library.custom_op("lem::cpu_forward", _forward, mutates_args=(), device_types="cpu")


@cpu_forward.register_fake
def _(x, w_in, b_in, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, lengths, dt, keep, gemm):
    T, B, H = x.size(0), x.size(1), y0.size(1)
    new = lambda *shape: y0.new_empty(shape, dtype=y0.dtype if gemm is None else torch.float32)
    if not keep:
        return new(T, B, H), new(B, H), new(0), new(0)
    return new(T, B, H), new(B, H), new(T, B, H), new(T, B, 4 * H)


def _backward(grad_ys: Optional[Tensor], grad_zT: Optional[Tensor], acts: Tensor, ys: Tensor, zs: Tensor,
                 x: Tensor, w_in: Tensor, y0: Tensor, z0: Tensor, w_hh: Tensor, w_tz: Tensor, mask: Optional[Tensor],
                 lengths: Optional[Tensor], dt: float, needs_dx: bool, gemm: Optional[torch.dtype]) -> list[Tensor]:
    """dL/d(x, w_in, b_in, y0, z0, w_hh, b_hh, w_tz, b_tz) from what cpu_forward kept (d x empty
    unless needs_dx), each in its tensor's dtype (a bias in its weight's); grad_ys, grad_zT None where
    no gradient reached them."""
    return list(load().backward(grad_ys, grad_zT, acts, ys, zs, x, w_in, y0, z0, w_hh, w_tz, mask, lengths, dt, needs_dx,
                                gemm))


cpu_backward = torch.library.custom_op("lem::cpu_backward", _backward, mutates_args=(), device_types="cpu")


@cpu_backward.register_fake
def _(grad_ys, grad_zT, acts, ys, zs, x, w_in, y0, z0, w_hh, w_tz, mask, lengths, dt, needs_dx, gemm):
    H = y0.size(1)
    return [x.new_empty(x.shape if needs_dx else (0,)), w_in.new_empty(w_in.shape), w_in.new_empty(4 * H),
            y0.new_empty(y0.shape), z0.new_empty(z0.shape), w_hh.new_empty(w_hh.shape), w_hh.new_empty(3 * H),
            w_tz.new_empty(w_tz.shape), w_tz.new_empty(H)]


def _setup_context(ctx, inputs, output):
    x, w_in, b_in, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, lengths, dt, keep, gemm = inputs
    ys, z_T, zs, acts = output
    ctx.dt, ctx.gemm = dt, gemm
    ctx.save_for_backward(x, w_in, b_in, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, lengths, ys, zs, acts)
    ctx.mark_non_differentiable(zs, acts)
    ctx.set_materialize_grads(False)  # no zero-filled (T, B, ·) gradients for outputs the loss does not reach


def _backward_with(backward):
    """The autograd formula of cpu_forward: the C++ backward, or, where its result would not be
    differentiable (a backward with create_graph=True) or its inputs have no storage (torch.func
    transforms), autograd through the reference loop (reference.recomputed_grads)."""
    def formula(ctx, grad_ys, grad_zT, _grad_zs, _grad_acts):
        *inputs, ys, zs, acts = ctx.saved_tensors
        needs = ctx.needs_input_grad[:11]
        grad_dtype = ys.dtype  # the fused outputs' (float32 under mixed precision)
        if torch.is_grad_enabled() or reference.functorch_wrapped(grad_ys, grad_zT, *inputs):
            # the products in the dtype the forward took them in; float32 outputs under mixed precision
            with torch.autocast("cpu", dtype=ctx.gemm or torch.bfloat16, enabled=ctx.gemm is not None):
                grads = reference.recomputed_grads(inputs, needs, lambda ys, zs: (ys.to(grad_dtype), zs[-1].to(grad_dtype)),
                                                   (grad_ys, grad_zT), ctx.dt)
            return (*grads, None, None, None)
        x, w_in, _, y0, z0, w_hh, _, w_tz, _, mask, lengths = inputs
        grads = backward(grad_ys, grad_zT, acts, ys, zs, x, w_in, y0, z0, w_hh, w_tz, mask, lengths, ctx.dt, needs[0],
                         ctx.gemm)
        return (*(g if needed else None for g, needed in zip(grads, needs)), None, None, None, None, None)
    return formula


cpu_forward.register_autograd(_backward_with(cpu_backward), setup_context=_setup_context)


class _EagerForward(torch.autograd.Function):
    """cpu_forward and its autograd formula without the operator around them, for calls outside
    torch.compile: calling a custom operator imports torch._dynamo (seconds, once per process: docs/kernels.md)."""
    forward = staticmethod(_forward)
    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward_with(_backward))


def mixed_gemm(x):
    """The dtype the products take their inputs in when it is not the loop's own: bfloat16 or float16
    for such inputs, or under torch.autocast its dtype (kernels.gemm_dtype, as the GPU tiers); then the
    state, the gates and every sum are float32. None: float32 or float64 throughout."""
    gemm = gemm_dtype(x.device, x.dtype)
    return gemm if gemm in (torch.bfloat16, torch.float16) else None


def lem_cpu(x, w_in, b_in, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, lengths, dt):
    """(ys, z_T) of the layer (biases may be None, lengths None or (B,) int64), float32 under mixed
    precision (see mixed_gemm). Keeps the activations only when a backward can follow (grad mode on and
    some input requires grad)."""
    keep = backward_can_follow(x, w_in, b_in, y0, z0, w_hh, b_hh, w_tz, b_tz, mask)
    forward = cpu_forward if torch.compiler.is_compiling() else _EagerForward.apply
    ys, z_T, _, _ = forward(x, w_in, b_in, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, lengths, dt, keep, mixed_gemm(x))
    return ys, z_T


def empty_cache():
    """Frees the large buffers the fused CPU path keeps for reuse (see LargeBuffers in lem_cpu.cpp)."""
    if _module is not None:
        _module.empty_cache()
