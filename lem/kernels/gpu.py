"""The fused GPU path in Triton (compiled to a CUDA kernel on first use, no nvcc).

One launch runs all T forward steps, one runs all T backward steps. Each program owns a block of
batch rows; the recurrent weights are loaded once before its time loop and stay on chip. As on
the CPU path, the input projection of all steps is one GEMM before the kernel, backward
recomputes the gate pre-activations with two GEMMs, and the weight gradients are GEMMs after it.
The whole (H x 4H) weight set must fit a program's registers/shared memory: H <= MAX_H.
Run on CPU tensors under TRITON_INTERPRET=1 (how the tests check it).
"""
import torch
import triton
import triton.language as tl

MAX_H = 128
BLOCK_B = 16  # rows per program (tl.dot needs >= 16)


def load():
    """Raises if Triton cannot be used here (the caller falls back to the reference loop)."""
    return triton.__version__


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _w(ptr, row0, rows, cols, H, TRANSPOSE: tl.constexpr):
    """The (H, H) block rows row0.. of a row-major (?, H) weight, as [in, out] if TRANSPOSE."""
    r, c = rows[:, None], cols[None, :]
    m = (r < H) & (c < H)
    if TRANSPOSE:
        return tl.load(ptr + (row0 + c) * H + r, mask=m, other=0.0)
    return tl.load(ptr + (row0 + r) * H + c, mask=m, other=0.0)


@triton.jit
def _lem_fwd(u_ptr, y_ptr, z_ptr, whh_ptr, bhh_ptr, wtz_ptr, btz_ptr, mask_ptr, ys_ptr, zs_ptr,
             T, B, H, dt, HAS_MASK: tl.constexpr, BB: tl.constexpr, HP: tl.constexpr):
    b = tl.program_id(0) * BB + tl.arange(0, BB)
    j = tl.arange(0, HP)
    row_ok = b[:, None] < B
    ok = row_ok & (j[None, :] < H)
    bh = b[:, None] * H + j[None, :]
    w_gy = _w(whh_ptr, 0, j, j, H, True)  # hid2hid rows [gate y, gate z, cand z], as [in, out]
    w_gz = _w(whh_ptr, H, j, j, H, True)
    w_cz = _w(whh_ptr, 2 * H, j, j, H, True)
    w_y = _w(wtz_ptr, 0, j, j, H, True)
    jm = j < H
    b_gy = tl.load(bhh_ptr + j, mask=jm, other=0.0)[None, :]
    b_gz = tl.load(bhh_ptr + H + j, mask=jm, other=0.0)[None, :]
    b_cz = tl.load(bhh_ptr + 2 * H + j, mask=jm, other=0.0)[None, :]
    b_y = tl.load(btz_ptr + j, mask=jm, other=0.0)[None, :]
    y = tl.load(y_ptr + bh, mask=ok, other=0.0)
    z = tl.load(z_ptr + bh, mask=ok, other=0.0)
    if HAS_MASK:
        keep = tl.load(mask_ptr + bh, mask=ok, other=0.0)
    for t in range(T):
        u = u_ptr + (t * B + b[:, None]) * 4 * H + j[None, :]
        ym = y * keep if HAS_MASK else y
        dty = dt * tl.sigmoid(tl.load(u, mask=ok, other=0.0) + tl.dot(ym, w_gy, input_precision="ieee") + b_gy)
        dtz = dt * tl.sigmoid(tl.load(u + H, mask=ok, other=0.0) + tl.dot(ym, w_gz, input_precision="ieee") + b_gz)
        cz = _tanh(tl.load(u + 3 * H, mask=ok, other=0.0) + tl.dot(ym, w_cz, input_precision="ieee") + b_cz)
        z = (1.0 - dtz) * z + dtz * cz
        cy = _tanh(tl.load(u + 2 * H, mask=ok, other=0.0) + tl.dot(z, w_y, input_precision="ieee") + b_y)
        y = (1.0 - dty) * y + dty * cy
        tl.store(ys_ptr + t * B * H + bh, y, mask=ok)
        tl.store(zs_ptr + t * B * H + bh, z, mask=ok)


@triton.jit
def _lem_bwd(gys_ptr, u_ptr, ah_ptr, q_ptr, yprev_ptr, zprev_ptr, whh_ptr, wtz_ptr, mask_ptr, gy_ptr, gz_ptr,
             dA_ptr, dQ_ptr, T, B, H, dt, HAS_MASK: tl.constexpr, BB: tl.constexpr, HP: tl.constexpr):
    # ah: hid2hid(y_{n-1} ⊙ mask) + bias (T, B, 3H); q: Wy z_n + b + Vy u_n (T, B, H)
    b = tl.program_id(0) * BB + tl.arange(0, BB)
    j = tl.arange(0, HP)
    ok = (b[:, None] < B) & (j[None, :] < H)
    bh = b[:, None] * H + j[None, :]
    w_gy = _w(whh_ptr, 0, j, j, H, False)  # as [out, in]: dL/d(in) = dL/d(out) @ W
    w_gz = _w(whh_ptr, H, j, j, H, False)
    w_cz = _w(whh_ptr, 2 * H, j, j, H, False)
    w_y = _w(wtz_ptr, 0, j, j, H, False)
    gy = tl.zeros((BB, HP), dtype=tl.float32)
    gz = tl.load(gz_ptr + bh, mask=ok, other=0.0)
    dym = tl.zeros((BB, HP), dtype=tl.float32)
    if HAS_MASK:
        keep = tl.load(mask_ptr + bh, mask=ok, other=0.0)
    for i in range(T):
        t = T - 1 - i
        r3 = (t * B + b[:, None]) * 3 * H + j[None, :]
        r4 = (t * B + b[:, None]) * 4 * H + j[None, :]
        r1 = t * B * H + bh
        g = tl.load(gys_ptr + r1, mask=ok, other=0.0) + gy + (dym * keep if HAS_MASK else dym)
        s_y = tl.sigmoid(tl.load(u_ptr + r4, mask=ok, other=0.0) + tl.load(ah_ptr + r3, mask=ok, other=0.0))
        cy = _tanh(tl.load(q_ptr + r1, mask=ok, other=0.0))
        dq = g * dt * s_y * (1.0 - cy * cy)
        da_y = g * (cy - tl.load(yprev_ptr + r1, mask=ok, other=0.0)) * dt * s_y * (1.0 - s_y)
        gy = g * (1.0 - dt * s_y)
        gz = gz + tl.dot(dq, w_y, input_precision="ieee")
        s_z = tl.sigmoid(tl.load(u_ptr + r4 + H, mask=ok, other=0.0) + tl.load(ah_ptr + r3 + H, mask=ok, other=0.0))
        cz = _tanh(tl.load(u_ptr + r4 + 3 * H, mask=ok, other=0.0) + tl.load(ah_ptr + r3 + 2 * H, mask=ok, other=0.0))
        da_z = gz * (cz - tl.load(zprev_ptr + r1, mask=ok, other=0.0)) * dt * s_z * (1.0 - s_z)
        da_cz = gz * dt * s_z * (1.0 - cz * cz)
        gz = gz * (1.0 - dt * s_z)
        tl.store(dQ_ptr + r1, dq, mask=ok)
        tl.store(dA_ptr + r3, da_y, mask=ok)
        tl.store(dA_ptr + r3 + H, da_z, mask=ok)
        tl.store(dA_ptr + r3 + 2 * H, da_cz, mask=ok)
        dym = (tl.dot(da_y, w_gy, input_precision="ieee") + tl.dot(da_z, w_gz, input_precision="ieee")
               + tl.dot(da_cz, w_cz, input_precision="ieee"))
    tl.store(gy_ptr + bh, gy + (dym * keep if HAS_MASK else dym), mask=ok)
    tl.store(gz_ptr + bh, gz, mask=ok)


def _launch_args(B, H):
    return (triton.cdiv(B, BLOCK_B),), dict(BB=BLOCK_B, HP=max(16, triton.next_power_of_2(H)))


class FusedLEMTriton(torch.autograd.Function):
    """Same contract as cpu.FusedLEMCPU: (u_proj, y0, z0, W_hh, b_hh, W_tz, b_tz, mask) -> (ys, z_T)."""

    @staticmethod
    def forward(ctx, u_proj, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, dt):
        if u_proj.dtype != torch.float32:
            raise ValueError(f"the Triton LEM kernels run in float32, got {u_proj.dtype}")
        T, B, H = u_proj.size(0), u_proj.size(1), y0.size(1)
        u_proj, y0, z0 = u_proj.contiguous(), y0.contiguous(), z0.contiguous()
        w_hh, w_tz = w_hh.contiguous(), w_tz.contiguous()
        ys, zs = u_proj.new_empty(T, B, H), u_proj.new_empty(T, B, H)
        grid, meta = _launch_args(B, H)
        m = mask.contiguous() if mask is not None else y0
        _lem_fwd[grid](u_proj, y0, z0, w_hh, b_hh, w_tz, b_tz, m, ys, zs, T, B, H, float(dt),
                       HAS_MASK=mask is not None, **meta)
        ctx.dt = dt
        ctx.save_for_backward(u_proj, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, ys, zs)
        return ys, zs[-1]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ys, grad_zT):
        u_proj, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, ys, zs = ctx.saved_tensors
        T, B, H = ys.shape
        grad_ys = torch.zeros_like(ys) if grad_ys is None else grad_ys.contiguous()
        y_prev = torch.cat([y0[None], ys[:-1]])
        z_prev = torch.cat([z0[None], zs[:-1]])
        ym_prev = y_prev if mask is None else y_prev * mask
        a_h = torch.addmm(b_hh, ym_prev.view(T * B, H), w_hh.t()).view(T, B, 3 * H)  # gates, in bulk
        q = (torch.addmm(b_tz, zs.view(T * B, H), w_tz.t()).view(T, B, H) + u_proj[..., 2 * H:3 * H]).contiguous()
        g_y = torch.empty_like(y0)
        g_z = torch.zeros_like(z0) if grad_zT is None else grad_zT.contiguous().clone()
        dA, dQ = u_proj.new_empty(T, B, 3 * H), u_proj.new_empty(T, B, H)
        grid, meta = _launch_args(B, H)
        m = mask.contiguous() if mask is not None else y0
        _lem_bwd[grid](grad_ys, u_proj, a_h, q, y_prev, z_prev, w_hh, w_tz, m, g_y, g_z, dA, dQ, T, B, H,
                       float(ctx.dt), HAS_MASK=mask is not None, **meta)
        dA2, dQ2 = dA.view(T * B, 3 * H), dQ.view(T * B, H)
        d_u = torch.cat([dA[..., :2 * H], dQ, dA[..., 2 * H:]], -1)
        return (d_u, g_y, g_z, dA2.t() @ ym_prev.view(T * B, H), dA2.sum(0), dQ2.t() @ zs.view(T * B, H),
                dQ2.sum(0), None, None)


def lem_triton(u_proj, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, dt):
    return FusedLEMTriton.apply(u_proj, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, dt)
