"""The fused GPU path (Triton, compiled on first use; no nvcc): which tier runs a call, and the work
both tiers share (docs/kernels.md).

    onchip    one launch for all T forward steps, one for all T backward steps; the recurrent
              weights stay in shared memory (onchip.py). Only where they fit the GPU.
    stepwise  per step a cuBLAS GEMM per recurrent product and a Triton kernel per half-step
              (stepwise.py). Any H.

Both tiers take the same buffers, so either backward can follow either forward:
    u      (T, B, 4H)   the input projection x W_inᵀ of all steps, one GEMM before the loop, with the
                        blocks in reference.GPU_BLOCKS order [gate y, gate z, cand z, cand y]: the
                        first 3H are hid2hid's rows, the last H transform_z's (inp2hid's rows are
                        reordered to it); all biases are summed into one float32 (4H) vector
    ys, zs (T + 1, B, H) float32, y_0 and z_0 as step 0
    acts   (T, B, 4H)   float32 σ(gate y), σ(gate z), tanh(cand z), tanh(cand y) of every step: what
                        the derivatives need (as the CPU path keeps), so backward computes no exp/tanh
                        and repeats no product of the forward
After backward's loop, the weight gradients are single GEMMs over all T·B rows. Per-row lengths and
missing biases (bias=False: a zero bias vector) are taken by both tiers.

The forward and backward are the torch.library operators lem::gpu_forward and lem::gpu_backward
(fake implementations and autograd registered), so that torch.compile puts a call into its graph as
one node. The fall to the next tier happens inside them, so it works in a compiled graph too.

Precision: the products take their inputs in the GEMM dtype, float32 or, under torch.autocast, the
autocast dtype (bfloat16/float16, with float32 accumulation); state, gates and their derivatives are
float32. The outputs are in the GEMM dtype, as nn.LSTM's are under autocast.
"""
import contextlib
import warnings
from collections import namedtuple
from typing import Optional

import torch
from torch import Tensor

from . import backward_can_follow, gemm_dtype, onchip, reference, stepwise

TIERS = {"onchip": onchip, "stepwise": stepwise}  # fastest first
GPU = namedtuple("GPU", "capability shared_memory")  # e.g. (86, 101376): sm_86, bytes per block (opt-in)
INTERPRETER_GPU = GPU(90, 232448)  # what the dispatcher assumes under TRITON_INTERPRET=1: an H100
_failed = {}  # (tier, capability, H, gemm dtype) -> the error of its failed launch


def load():
    """Raises if Triton cannot be used here (the caller falls back to the reference loop)."""
    import triton
    return triton.__version__


def gpu_of(device):
    if device.type != "cuda":
        return INTERPRETER_GPU
    p = torch.cuda.get_device_properties(device)
    return GPU(p.major * 10 + p.minor, p.shared_memory_per_block_optin)


def tiers(name, device, H, dtype, gpu=None):
    """The tiers to try for a call, best first: `name` is 'triton' (the dispatcher's choice) or a
    tier. 'onchip' only where its weights fit the GPU's shared memory per block."""
    gemm = gemm_dtype(device, dtype)
    if gemm is None:
        return []
    gpu = gpu or gpu_of(device)
    fits = onchip.stream_gates(H, gemm, gpu.shared_memory) is not None
    if name == "onchip" and not fits:
        least = onchip.shared_memory(H, gemm, stream=True)
        raise ValueError(f"backend 'onchip' needs {least:,} B of shared memory per block at H = {H} in {gemm}, this GPU "
                         f"has {gpu.shared_memory:,} B; use 'triton' or 'stepwise'")
    return _usable_from("stepwise" if name == "stepwise" or not fits else "onchip", gpu, H, gemm)


def _usable_from(tier, gpu, H, gemm):
    """`tier` and the tiers below it, less those that failed at this size and dtype on this GPU."""
    names = list(TIERS)[list(TIERS).index(tier):]
    return [t for t in names if (t, gpu.capability, H, gemm) not in _failed]


class NoTierLaunched(RuntimeError):
    """Every GPU tier failed to compile or launch a call (each warned): eager calls then run the
    reference loop."""


def run(tier, x, w_in, b_in, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, lengths, dt):
    """ys, z_T of tier `tier` or, if its kernels fail to compile or launch, of the next tier down
    (one warning each); None when all failed (the caller runs the reference loop). Keeps the
    activations only when a backward can follow (grad mode on and some input requires grad)."""
    gemm = gemm_dtype(x.device, x.dtype)
    keep = backward_can_follow(x, w_in, b_in, y0, z0, w_hh, b_hh, w_tz, b_tz, mask)
    forward = gpu_forward if torch.compiler.is_compiling() else _EagerForward.apply
    try:
        ys, zs, _ = forward(tier, gemm, x, w_in, b_in, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, lengths, dt, keep)
    except NoTierLaunched:
        return None
    return ys[1:].to(gemm), zs[-1].to(gemm)


def _fail(tier, gpu, H, gemm, error):
    _failed[(tier, gpu.capability, H, gemm)] = error
    warnings.warn(f"LEM GPU tier {tier!r} failed at H = {H} in {gemm} on sm_{gpu.capability} "
                  f"({type(error).__name__}: {str(error).strip()[:300]}); using the next tier down",
                  RuntimeWarning, stacklevel=4)


def _first_that_launches(tier, gemm, device, H, fn):
    """fn(t) of the first tier t from `tier` down whose kernels compile and launch (see _fail), with
    `device` the current CUDA device (Triton launches on the current one, not on its tensors')."""
    gpu = gpu_of(device)
    with torch.autocast(device.type, enabled=False), _on(device):
        for t in _usable_from(tier, gpu, H, gemm):
            try:
                return fn(t)
            except (torch.OutOfMemoryError, torch.AcceleratorError):
                raise  # not the tier's fault: the next one needs no less memory, or the device has failed
            except Exception as error:  # Triton's OutOfResources, a compiler or driver error
                _raise_if_the_device_failed(device)
                _fail(t, gpu, H, gemm, error)
    raise NoTierLaunched(f"no LEM GPU tier from {tier!r} down launched at H = {H} in {gemm} on sm_{gpu.capability}")


def _on(device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _raise_if_the_device_failed(device):
    """A sticky asynchronous CUDA error (an illegal address, say) may reach us as Triton's own
    RuntimeError at a launch: then the device is unusable for every tier and the reference loop
    too, and synchronising raises torch.AcceleratorError, which goes to the caller."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to_gpu_order(t):
    """inp2hid's rows (or their gradient) in the tiers' order of blocks (reference.GPU_BLOCKS)."""
    return reference.reorder(t, reference.INP2HID_BLOCKS, reference.GPU_BLOCKS)


def _to_inp2hid_order(t):
    return reference.reorder(t, reference.GPU_BLOCKS, reference.INP2HID_BLOCKS)


def _bias(b_in, b_hh, b_tz, H, like):
    """All biases summed in the tiers' order, float32 (4H); zeros for a layer without biases."""
    if b_in is None:
        return like.new_zeros(4 * H, dtype=torch.float32)
    return (_to_gpu_order(b_in) + torch.cat([b_hh, b_tz])).float()


def forward(tier, gemm, x, w_in, b_in, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, lengths, dt, keep):
    """ys, zs (T + 1, B, H) and acts of the layer (module docstring); without keep, zs is (1, B, H)
    holding z_T and acts is None. A plain function of tensors, one tier: gpu_forward wraps it."""
    T, B, I = x.shape
    H = y0.size(1)
    u = torch.mm(x.reshape(T * B, I).to(gemm), _to_gpu_order(w_in).to(gemm).t()).view(T, B, 4 * H)
    ys = y0.new_empty(T + 1, B, H, dtype=torch.float32)
    zs = y0.new_empty(T + 1 if keep else 1, B, H, dtype=torch.float32)
    ys[0], zs[0] = y0, z0
    acts = ys.new_empty(T, B, 4 * H) if keep else None
    TIERS[tier].forward(u, _bias(b_in, b_hh, b_tz, H, ys), w_hh.to(gemm).contiguous(), w_tz.to(gemm).contiguous(),
                        _float(mask), _lengths(lengths), ys, zs, acts, float(dt))
    return ys, zs, acts


def backward(tier, gemm, grad_ys, grad_zT, acts, ys, zs, x, w_in, w_hh, w_tz, mask, lengths, dt, needs_dx):
    """dL/d(x, w_in, b_in, y0, z0, w_hh, b_hh, w_tz, b_tz) (float32 or the GEMM dtype; d x None unless
    needs_dx) from what forward kept. grad_ys and grad_zT may be None (no gradient reached them)."""
    T, B, H = acts.size(0), acts.size(1), ys.size(2)
    grad_ys = ys.new_zeros(T, B, H, dtype=gemm) if grad_ys is None else grad_ys.contiguous()
    gy = ys.new_zeros(B, H)
    gz = ys.new_zeros(B, H) if grad_zT is None else grad_zT.float().contiguous().clone()
    du = ys.new_empty(T, B, 4 * H, dtype=gemm)
    mask = _float(mask)
    TIERS[tier].backward(grad_ys, acts, ys, zs, w_hh.to(gemm).contiguous(), w_tz.to(gemm).contiguous(), mask,
                         _lengths(lengths), du, gy, gz, float(dt))
    # weight gradients: one GEMM each over all T·B rows
    du2, x2 = du.view(T * B, 4 * H), x.reshape(T * B, -1).to(gemm)
    ym = (ys[:-1] if mask is None else ys[:-1] * mask).to(gemm).view(T * B, H)  # y_{n-1} ⊙ mask
    d_whh = du2[:, :3 * H].t() @ ym
    d_wtz = du2[:, 3 * H:].t() @ zs[1:].to(gemm).view(T * B, H)
    d_win = _to_inp2hid_order(du2.t() @ x2)
    d_x = (du2 @ _to_gpu_order(w_in).to(gemm)).view(x.shape) if needs_dx else None
    d_b = du2.sum(0, dtype=torch.float32)  # every bias gets the column sums of d u
    return d_x, d_win, _to_inp2hid_order(d_b), gy, gz, d_whh, d_b[:3 * H].clone(), d_wtz, d_b[3 * H:].clone()


def _float(mask):
    return None if mask is None else mask.float().contiguous()


def _lengths(lengths):
    return None if lengths is None else lengths.contiguous()


@torch.library.custom_op("lem::gpu_forward", mutates_args=())
def gpu_forward(tier: str, gemm: torch.dtype, x: Tensor, w_in: Tensor, b_in: Optional[Tensor], y0: Tensor, z0: Tensor,
                w_hh: Tensor, b_hh: Optional[Tensor], w_tz: Tensor, b_tz: Optional[Tensor], mask: Optional[Tensor],
                lengths: Optional[Tensor], dt: float, keep: bool) -> tuple[Tensor, Tensor, Tensor]:
    """forward()'s ys, zs and acts (an empty tensor without keep) of `tier` or, where its kernels fail
    to compile or launch, of the next tier down; NoTierLaunched when none did."""
    def run_tier(t):
        ys, zs, acts = forward(t, gemm, x, w_in, b_in, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, lengths, dt, keep)
        return ys, zs, ys.new_empty(0) if acts is None else acts
    return _first_that_launches(tier, gemm, x.device, y0.size(1), run_tier)


@gpu_forward.register_fake
def _(tier, gemm, x, w_in, b_in, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, lengths, dt, keep):
    T, B, H = x.size(0), x.size(1), y0.size(1)
    new = lambda *shape: y0.new_empty(shape, dtype=torch.float32)
    return new(T + 1, B, H), new(T + 1 if keep else 1, B, H), new(T, B, 4 * H) if keep else new(0)


@torch.library.custom_op("lem::gpu_backward", mutates_args=())
def gpu_backward(tier: str, gemm: torch.dtype, grad_ys: Optional[Tensor], grad_zT: Optional[Tensor], acts: Tensor,
                 ys: Tensor, zs: Tensor, x: Tensor, w_in: Tensor, w_hh: Tensor, w_tz: Tensor, mask: Optional[Tensor],
                 lengths: Optional[Tensor], dt: float, needs_dx: bool) -> list[Tensor]:
    """backward() of `tier` or the next tier down that launches (the tiers keep the same tensors, so
    any backward can follow any forward); d x an empty tensor unless needs_dx."""
    def run_tier(t):
        grads = backward(t, gemm, grad_ys, grad_zT, acts, ys, zs, x, w_in, w_hh, w_tz, mask, lengths, dt, needs_dx)
        return [x.new_empty(0) if g is None else g for g in grads]
    return _first_that_launches(tier, gemm, x.device, ys.size(2), run_tier)


@gpu_backward.register_fake
def _(tier, gemm, grad_ys, grad_zT, acts, ys, zs, x, w_in, w_hh, w_tz, mask, lengths, dt, needs_dx):
    H = ys.size(2)
    g = lambda shape: x.new_empty(shape, dtype=gemm)
    f = lambda shape: x.new_empty(shape, dtype=torch.float32)
    return [x.new_empty(0) if not needs_dx else g(x.shape), g(w_in.shape), f(4 * H), f((x.size(1), H)),
            f((x.size(1), H)), g(w_hh.shape), f(3 * H), g(w_tz.shape), f(H)]


def _setup_context(ctx, inputs, output):
    tier, gemm, x, w_in, b_in, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, lengths, dt, keep = inputs
    ys, zs, acts = output
    ctx.tier, ctx.gemm, ctx.dt = tier, gemm, dt
    ctx.dtypes = [None if t is None else t.dtype for t in (x, w_in, b_in, y0, z0, w_hh, b_hh, w_tz, b_tz)]  # of the gradients
    ctx.save_for_backward(x, w_in, b_in, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, lengths, ys, zs, acts)
    ctx.mark_non_differentiable(acts)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_ys, grad_zs, _grad_acts):
    """The tiers' backward, or autograd through the reference loop where its result would not be
    differentiable (create_graph=True) or its inputs have no storage (torch.func transforms)."""
    *inputs, ys, zs, acts = ctx.saved_tensors
    if torch.is_grad_enabled() or reference.functorch_wrapped(grad_ys, grad_zs, *inputs):
        return (None, None, *_recomputed_grads(ctx, inputs, grad_ys, grad_zs), None, None)
    x, w_in, _, _, _, w_hh, _, w_tz, _, mask, lengths = inputs
    grads = gpu_backward(ctx.tier, ctx.gemm, None if grad_ys is None else grad_ys[1:],
                         None if grad_zs is None else grad_zs[-1], acts, ys, zs, x, w_in, w_hh, w_tz, mask, lengths,
                         ctx.dt, ctx.needs_input_grad[2])
    grads = [g.to(d) if needed else None for g, d, needed in zip(grads, ctx.dtypes, ctx.needs_input_grad[2:])]
    return (None, None, *grads, None, None, None, None)


def _recomputed_grads(ctx, inputs, grad_ys, grad_zs):
    """reference.recomputed_grads for gpu_forward's outputs: ys and zs with the state as step 0 (zs
    only z_T where no backward was expected), float32, the products in the GEMM dtype as here."""
    x, y0, z0 = inputs[0], inputs[3], inputs[4]

    def outputs_of(ys, zs):
        zs = torch.cat([z0[None].float(), zs.float()]) if grad_zs is None or grad_zs.size(0) > 1 else zs[-1:].float()
        return torch.cat([y0[None].float(), ys.float()]), zs
    # under autocast (the GEMM dtype low, the weights float32: x itself may be low from layer 2 on) the
    # recompute runs its products as the forward did; a low-precision module's are low without it
    with torch.autocast(x.device.type, dtype=ctx.gemm, enabled=ctx.gemm != ctx.dtypes[1]):
        return reference.recomputed_grads(inputs, ctx.needs_input_grad[2:13], outputs_of, (grad_ys, grad_zs), ctx.dt)


gpu_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerForward(torch.autograd.Function):
    """gpu_forward with its autograd formula, for calls outside torch.compile: the operator's own
    autograd has no setup_context that torch.func transforms (grad, jacrev) can use."""
    forward = staticmethod(gpu_forward)
    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)
