"""The fused GPU path (Triton, compiled on first use; no nvcc): which tier runs a call, and the work
both tiers share (docs/kernels.md).

    onchip    one launch for all T forward steps, one for all T backward steps; the recurrent
              weights stay in shared memory (onchip.py). Only where they fit the GPU.
    stepwise  per step a cuBLAS GEMM per recurrent product and a Triton kernel per half-step
              (stepwise.py). Any H.

Both tiers take the same buffers, so either backward can follow either forward:
    u      (T, B, 4H)   the input projection x W_inᵀ of all steps, one GEMM before the loop, with the
                        gate/candidate blocks as [gate y, gate z, cand z, cand y]: the first 3H are
                        hid2hid's rows, the last H transform_z's (inp2hid's own order swaps the two
                        candidates); all biases are summed into one float32 (4H) vector
    ys, zs (T + 1, B, H) float32, y_0 and z_0 as step 0
    acts   (T, B, 4H)   float32 σ(gate y), σ(gate z), tanh(cand z), tanh(cand y) of every step: what
                        the derivatives need (as the CPU path keeps), so backward computes no exp/tanh
                        and repeats no product of the forward
After backward's loop, the weight gradients are single GEMMs over all T·B rows.

Precision: the products take their inputs in the GEMM dtype, float32 or, under torch.autocast, the
autocast dtype (bfloat16/float16, with float32 accumulation); state, gates and their derivatives are
float32. The outputs are in the GEMM dtype, as nn.LSTM's are under autocast.
"""
import warnings
from collections import namedtuple

import torch

from . import gemm_dtype, onchip, stepwise

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
    fits = onchip.shared_memory(H, gemm) <= gpu.shared_memory
    if name == "onchip" and not fits:
        raise ValueError(f"backend 'onchip' needs {onchip.shared_memory(H, gemm):,} B of shared memory per block at "
                         f"H = {H} in {gemm}, this GPU has {gpu.shared_memory:,} B; use 'triton' or 'stepwise'")
    names = ["stepwise"] if name == "stepwise" or not fits else ["onchip", "stepwise"]
    return [t for t in names if (t, gpu.capability, H, gemm) not in _failed]


def run(name, x, w_in, b_in, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, dt):
    """ys, z_T of tier `name` or, if its kernels fail to compile or launch, of the next tier down
    (one warning each); None when all failed (the caller runs the reference loop)."""
    gpu, gemm = gpu_of(x.device), gemm_dtype(x.device, x.dtype)
    for tier in tiers(name, x.device, y0.size(1), x.dtype, gpu):
        try:
            return FusedLEMGPU.apply(tier, gemm, gpu, x, w_in, b_in, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, dt)
        except torch.OutOfMemoryError:
            raise  # not the tier's fault: the next one needs no less memory
        except Exception as error:  # Triton's OutOfResources, a compiler or driver error
            _fail(tier, gpu, y0.size(1), gemm, error)
    return None


def _fail(tier, gpu, H, gemm, error):
    _failed[(tier, gpu.capability, H, gemm)] = error
    warnings.warn(f"LEM GPU tier {tier!r} failed at H = {H} in {gemm} on sm_{gpu.capability} "
                  f"({type(error).__name__}: {str(error).strip()[:300]}); using the next tier down",
                  RuntimeWarning, stacklevel=4)


def _swap_candidates(t):
    """[gate y, gate z, cand y, cand z] blocks along dim 0 <-> [gate y, gate z, cand z, cand y]."""
    g_y, g_z, c_1, c_2 = t.chunk(4)
    return torch.cat([g_y, g_z, c_2, c_1])


def forward(tier, gemm, x, w_in, b_in, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, dt, keep):
    """ys, zs (T + 1, B, H) and acts of the layer (module docstring); without keep, zs is (1, B, H)
    holding z_T and acts is None. A plain function of tensors: the autograd wrapper is FusedLEMGPU."""
    T, B, I = x.shape
    H = y0.size(1)
    u = torch.mm(x.reshape(T * B, I).to(gemm), _swap_candidates(w_in).to(gemm).t()).view(T, B, 4 * H)
    bias = (_swap_candidates(b_in) + torch.cat([b_hh, b_tz])).float()
    ys = y0.new_empty(T + 1, B, H, dtype=torch.float32)
    zs = y0.new_empty(T + 1 if keep else 1, B, H, dtype=torch.float32)
    ys[0], zs[0] = y0, z0
    acts = ys.new_empty(T, B, 4 * H) if keep else None
    TIERS[tier].forward(u, bias, w_hh.to(gemm).contiguous(), w_tz.to(gemm).contiguous(), _float(mask), ys, zs, acts,
                        float(dt))
    return ys, zs, acts


def backward(tier, gemm, grad_ys, grad_zT, acts, ys, zs, x, w_in, w_hh, w_tz, mask, dt, needs_dx):
    """dL/d(x, w_in, b_in, y0, z0, w_hh, b_hh, w_tz, b_tz) (float32 or the GEMM dtype; d x None unless
    needs_dx) from what forward kept. grad_ys and grad_zT may be None (no gradient reached them)."""
    T, B, H = acts.size(0), acts.size(1), ys.size(2)
    grad_ys = ys.new_zeros(T, B, H, dtype=gemm) if grad_ys is None else grad_ys.contiguous()
    gy = ys.new_zeros(B, H)
    gz = ys.new_zeros(B, H) if grad_zT is None else grad_zT.float().contiguous().clone()
    du = ys.new_empty(T, B, 4 * H, dtype=gemm)
    mask = _float(mask)
    TIERS[tier].backward(grad_ys, acts, ys, zs, w_hh.to(gemm).contiguous(), w_tz.to(gemm).contiguous(), mask,
                         du, gy, gz, float(dt))
    # weight gradients: one GEMM each over all T·B rows
    du2, x2 = du.view(T * B, 4 * H), x.reshape(T * B, -1).to(gemm)
    ym = (ys[:-1] if mask is None else ys[:-1] * mask).to(gemm).view(T * B, H)  # y_{n-1} ⊙ mask
    d_whh = du2[:, :3 * H].t() @ ym
    d_wtz = du2[:, 3 * H:].t() @ zs[1:].to(gemm).view(T * B, H)
    d_win = _swap_candidates(du2.t() @ x2)
    d_x = (du2 @ _swap_candidates(w_in).to(gemm)).view(x.shape) if needs_dx else None
    d_b = du2.sum(0, dtype=torch.float32)  # every bias gets the column sums of d u
    return d_x, d_win, _swap_candidates(d_b), gy, gz, d_whh, d_b[:3 * H], d_wtz, d_b[3 * H:]


def _float(mask):
    return None if mask is None else mask.float().contiguous()


class FusedLEMGPU(torch.autograd.Function):
    """apply(tier, gemm, gpu, x, W_in, b_in, y0, z0, W_hh, b_hh, W_tz, b_tz, mask, dt) -> (ys, z_T):
    the layer run by one GPU tier with its products in the dtype `gemm`; `gpu` (a GPU) names the
    device in a failure's warning. After the first three, the arguments of cpu.FusedLEMCPU."""

    @staticmethod
    def forward(ctx, tier, gemm, gpu, x, w_in, b_in, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, dt):
        keep = any(ctx.needs_input_grad)
        with torch.autocast(x.device.type, enabled=False):
            ys, zs, acts = forward(tier, gemm, x, w_in, b_in, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, dt, keep)
        ctx.tier, ctx.gemm, ctx.gpu, ctx.dt = tier, gemm, gpu, dt
        ctx.dtypes = [t.dtype for t in (x, w_in, b_in, y0, z0, w_hh, b_hh, w_tz, b_tz)]  # of the gradients
        ctx.save_for_backward(x, w_in, w_hh, w_tz, mask, ys, zs, acts)
        return ys[1:].to(gemm), zs[-1].to(gemm)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ys, grad_zT):
        x, w_in, w_hh, w_tz, mask, ys, zs, acts = ctx.saved_tensors
        args = (ctx.gemm, grad_ys, grad_zT, acts, ys, zs, x, w_in, w_hh, w_tz, mask, ctx.dt, ctx.needs_input_grad[3])
        with torch.autocast(x.device.type, enabled=False):
            try:
                grads = backward(ctx.tier, *args)
            except Exception as error:  # the tiers keep the same tensors: the stepwise backward can take over
                if ctx.tier == "stepwise" or isinstance(error, torch.OutOfMemoryError):
                    raise
                _fail(ctx.tier, ctx.gpu, ys.size(2), ctx.gemm, error)
                grads = backward("stepwise", *args)
        return (None, None, None, *(None if g is None else g.to(d) for g, d in zip(grads, ctx.dtypes)), None, None)
