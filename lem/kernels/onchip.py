"""The on-chip GPU tier: one Triton launch runs all T forward steps, one all T backward steps.

Each program owns BB batch rows for the whole sequence (rows never interact). It loads the four
H x H recurrent weight blocks once, before its time loop; Triton keeps them on chip (in shared
memory as the operand of tl.dot, which the loop reuses), so a step reads from global memory only
its inputs and writes only its outputs. That needs 4·H² weights per program. Where only two blocks
fit (float32 H 128 on A100 and H100, half precision H 128 on the RTX cards), the two candidate
blocks stay on chip and the two gate blocks are read from L2 every step, KC rows at a time, with
their inputs read back from what the step before wrote (STREAM). The dispatcher (gpu.py) sends a
call here only where `shared_memory` of one of the two is within the GPU's shared memory per
block (an upper bound that tests/kernels/test_fit.py checks against what Triton allocates).

Layouts (gpu.py): u_proj and the saved activations are (T, B, 4H) in the order reference.GPU_BLOCKS,
[gate y, gate z, cand z, cand y]; ys, zs are (T + 1, B, H) with y_0, z_0 as step 0. With per-row
lengths (HAS_LEN), a row's y and z stay as they are from step lengths[b] on (tl.where), and its
gradients of u_proj there are zero.
"""
import triton
import triton.language as tl

from .launch import launch, tanh


@triton.jit
def _block(ptr, row0, j, H, TRANSPOSE: tl.constexpr):
    """Rows row0 .. row0 + H of a row-major (?, H) matrix, as [in, out] when TRANSPOSE, padded with 0."""
    m = (j[:, None] < H) & (j[None, :] < H)
    if TRANSPOSE:
        return tl.load(ptr + (row0 + j[None, :]) * H + j[:, None], mask=m, other=0.0)
    return tl.load(ptr + (row0 + j[:, None]) * H + j[None, :], mask=m, other=0.0)


@triton.jit
def _lengths(len_ptr, b, B):
    """(BB, 1) lengths of rows b (0 for rows past B)."""
    return tl.load(len_ptr + b, mask=b < B, other=0)[:, None]


@triton.jit
def _streamed_dot(x_ptr, ld, mask_ptr, b, B, H, w_ptr, row0, zero, HAS_MASK: tl.constexpr, TRANSPOSE: tl.constexpr,
                  BB: tl.constexpr, HP: tl.constexpr, KC: tl.constexpr):
    """zero + x @ a weight block read from global memory (L2) KC rows at a time, for the gate blocks
    where they are not kept in shared memory (STREAM): x is rows b of a row-major (·, ld) matrix, its
    first H columns (times the mask where HAS_MASK), taken in the weights' dtype; the block as in
    _block. A loop, not unrolled: unrolled, every chunk's loads were in flight at once and spilled."""
    j = tl.arange(0, HP)
    acc = zero
    for k0 in range(0, HP, KC):
        k = k0 + tl.arange(0, KC)
        xm = (b[:, None] < B) & (k[None, :] < H)
        x = tl.load(x_ptr + b[:, None] * ld + k[None, :], mask=xm, other=0.0)
        if HAS_MASK:
            x = x * tl.load(mask_ptr + b[:, None] * H + k[None, :], mask=xm, other=0.0)
        wm = (k[:, None] < H) & (j[None, :] < H)
        if TRANSPOSE:
            w = tl.load(w_ptr + (row0 + j[None, :]) * H + k[:, None], mask=wm, other=0.0)
        else:
            w = tl.load(w_ptr + (row0 + k[:, None]) * H + j[None, :], mask=wm, other=0.0)
        acc = tl.dot(x.to(w.dtype), w, acc, input_precision="ieee")
    return acc


@triton.jit
def _load4(ptr, H, ok):
    """The four (BB, HP) blocks of H columns at ptr, ptr + H, ptr + 2H, ptr + 3H (0 outside ok)."""
    return (tl.load(ptr, mask=ok, other=0.0), tl.load(ptr + H, mask=ok, other=0.0),
            tl.load(ptr + 2 * H, mask=ok, other=0.0), tl.load(ptr + 3 * H, mask=ok, other=0.0))


@triton.jit
def _store4(ptr, v0, v1, v2, v3, H, ok):
    """v0 .. v3 into the four blocks of H columns at ptr (see _load4)."""
    tl.store(ptr, v0, mask=ok)
    tl.store(ptr + H, v1, mask=ok)
    tl.store(ptr + 2 * H, v2, mask=ok)
    tl.store(ptr + 3 * H, v3, mask=ok)


@triton.jit
def _biases(bias_ptr, j, H):
    """The summed biases of the four blocks [gate y, gate z, cand z, cand y], each (1, HP)."""
    jm = j < H
    return (tl.load(bias_ptr + j, mask=jm, other=0.0)[None, :], tl.load(bias_ptr + H + j, mask=jm, other=0.0)[None, :],
            tl.load(bias_ptr + 2 * H + j, mask=jm, other=0.0)[None, :],
            tl.load(bias_ptr + 3 * H + j, mask=jm, other=0.0)[None, :])


# _forward: KEEP: zs (T + 1, B, H) and acts are written for backward; else zs is (1, B, H), z_0 in,
# z_T out. STREAM: the two gate blocks are read from L2 every step (_streamed_dot), their input
# y_{n-1} read back from ys; only the candidate blocks stay in shared memory.
@triton.jit
def _forward(u_ptr, bias_ptr, whh_ptr, wtz_ptr, mask_ptr, len_ptr, ys_ptr, zs_ptr, acts_ptr, T, B, H, dt,
             HAS_MASK: tl.constexpr, HAS_LEN: tl.constexpr, KEEP: tl.constexpr, BB: tl.constexpr, HP: tl.constexpr,
             STREAM: tl.constexpr, KC: tl.constexpr):
    GEMM: tl.constexpr = whh_ptr.dtype.element_ty  # the dtype the products take (float32, or the autocast one)
    b = tl.program_id(0) * BB + tl.arange(0, BB)
    j = tl.arange(0, HP)
    ok = (b[:, None] < B) & (j[None, :] < H)
    bh = b[:, None] * H + j[None, :]
    b4 = b[:, None] * 4 * H + j[None, :]
    if not STREAM:
        w_gy = _block(whh_ptr, 0, j, H, True)  # hid2hid rows [gate y, gate z, cand z] as [in, out]
        w_gz = _block(whh_ptr, H, j, H, True)
    w_cz = _block(whh_ptr, 2 * H, j, H, True)
    w_cy = _block(wtz_ptr, 0, j, H, True)
    b_gy, b_gz, b_cz, b_cy = _biases(bias_ptr, j, H)
    y = tl.load(ys_ptr + bh, mask=ok, other=0.0)
    z = tl.load(zs_ptr + bh, mask=ok, other=0.0)
    if HAS_MASK:
        keep = tl.load(mask_ptr + bh, mask=ok, other=0.0)
    if HAS_LEN:
        n_b = _lengths(len_ptr, b, B)
    if STREAM:  # a zero Triton cannot see as a constant: on a constant one it folds the loaded
        # pre-activation into the FMA tl.dot's accumulator, and at HP 128 ptxas then spills KiBs
        zero = tl.zeros((BB, HP), dtype=tl.float32) * (H > 0).to(tl.float32)
    else:
        zero = tl.zeros((BB, HP), dtype=tl.float32)
    for t in range(T):
        step = tl.cast(t, tl.int64) * B * H  # offsets of step t in (·, B, H) and (·, B, 4H) buffers: 64-bit
        u = u_ptr + 4 * step + b4
        ym = (y * keep if HAS_MASK else y).to(GEMM)
        if STREAM:
            tl.debug_barrier()  # y_{n-1}, stored to ys by every thread of the program, is read back below
            p_gy = _streamed_dot(ys_ptr + step, H, mask_ptr, b, B, H, whh_ptr, 0, zero, HAS_MASK, True, BB, HP, KC)
            p_gz = _streamed_dot(ys_ptr + step, H, mask_ptr, b, B, H, whh_ptr, H, zero, HAS_MASK, True, BB, HP, KC)
        else:
            p_gy = tl.dot(ym, w_gy, zero, input_precision="ieee")
            p_gz = tl.dot(ym, w_gz, zero, input_precision="ieee")
        s_y = tl.sigmoid(tl.load(u, mask=ok, other=0.0).to(tl.float32) + b_gy + p_gy)
        s_z = tl.sigmoid(tl.load(u + H, mask=ok, other=0.0).to(tl.float32) + b_gz + p_gz)
        c_z = tanh(tl.load(u + 2 * H, mask=ok, other=0.0).to(tl.float32) + b_cz
                   + tl.dot(ym, w_cz, zero, input_precision="ieee"))
        if HAS_LEN:
            z = tl.where(t < n_b, z + dt * s_z * (c_z - z), z)
        else:
            z = z + dt * s_z * (c_z - z)
        c_y = tanh(tl.load(u + 3 * H, mask=ok, other=0.0).to(tl.float32) + b_cy
                    + tl.dot(z.to(GEMM), w_cy, zero, input_precision="ieee"))
        if HAS_LEN:
            y = tl.where(t < n_b, y + dt * s_y * (c_y - y), y)
        else:
            y = y + dt * s_y * (c_y - y)
        tl.store(ys_ptr + step + B * H + bh, y, mask=ok)
        if KEEP:
            tl.store(zs_ptr + step + B * H + bh, z, mask=ok)
            _store4(acts_ptr + 4 * step + b4, s_y, s_z, c_z, c_y, H, ok)
    if not KEEP:
        tl.store(zs_ptr + bh, z, mask=ok)


# _backward: gy, gz (B, H): dL/dz_T in gz on entry; dL/dy_0, dL/dz_0 on exit. du = dL/du_proj
# (T, B, 4H). STREAM as in _forward: the streamed blocks' inputs, d gate y and d gate z, are read
# back from du.
@triton.jit
def _backward(gys_ptr, acts_ptr, ys_ptr, zs_ptr, whh_ptr, wtz_ptr, mask_ptr, len_ptr, du_ptr, gy_ptr, gz_ptr, T, B, H,
              dt, HAS_MASK: tl.constexpr, HAS_LEN: tl.constexpr, BB: tl.constexpr, HP: tl.constexpr,
              STREAM: tl.constexpr, KC: tl.constexpr):
    GEMM: tl.constexpr = du_ptr.dtype.element_ty
    b = tl.program_id(0) * BB + tl.arange(0, BB)
    j = tl.arange(0, HP)
    ok = (b[:, None] < B) & (j[None, :] < H)
    bh = b[:, None] * H + j[None, :]
    b4 = b[:, None] * 4 * H + j[None, :]
    if not STREAM:
        w_gy = _block(whh_ptr, 0, j, H, False)  # as [out, in]: dL/d(in) = dL/d(out) @ W
        w_gz = _block(whh_ptr, H, j, H, False)
    w_cz = _block(whh_ptr, 2 * H, j, H, False)
    w_cy = _block(wtz_ptr, 0, j, H, False)
    gy = tl.zeros((BB, HP), dtype=tl.float32)  # dL/dy_n through the leaky carry
    gz = tl.load(gz_ptr + bh, mask=ok, other=0.0)
    dym = tl.zeros((BB, HP), dtype=tl.float32)  # dL/d(y_n ⊙ mask) through hid2hid of step n + 1
    if HAS_MASK:
        keep = tl.load(mask_ptr + bh, mask=ok, other=0.0)
    if HAS_LEN:
        n_b = _lengths(len_ptr, b, B)
    zero = tl.zeros((BB, HP), dtype=tl.float32)  # the streamed products' start
    for i in range(T):
        step = tl.cast(T - 1 - i, tl.int64) * B * H
        s_y, s_z, c_z, c_y = _load4(acts_ptr + 4 * step + b4, H, ok)
        g = tl.load(gys_ptr + step + bh, mask=ok, other=0.0).to(tl.float32) + gy + (dym * keep if HAS_MASK else dym)
        d_cy = (g * dt * s_y * (1.0 - c_y * c_y)).to(GEMM)
        d_gy = (g * (c_y - tl.load(ys_ptr + step + bh, mask=ok, other=0.0)) * dt * s_y * (1.0 - s_y)).to(GEMM)
        gy = g * (1.0 - dt * s_y)
        if HAS_LEN:  # a row that has ended: no gradient of u_proj, dL/dy and dL/dz go on unchanged
            live = T - 1 - i < n_b
            d_cy = tl.where(live, d_cy, 0.0).to(GEMM)
            d_gy = tl.where(live, d_gy, 0.0).to(GEMM)
            gy = tl.where(live, gy, g)
        gz = gz + tl.dot(d_cy, w_cy, input_precision="ieee")
        d_gz = (gz * (c_z - tl.load(zs_ptr + step + bh, mask=ok, other=0.0)) * dt * s_z * (1.0 - s_z)).to(GEMM)
        d_cz = (gz * dt * s_z * (1.0 - c_z * c_z)).to(GEMM)
        if HAS_LEN:
            d_gz = tl.where(live, d_gz, 0.0).to(GEMM)
            d_cz = tl.where(live, d_cz, 0.0).to(GEMM)
            gz = tl.where(live, gz * (1.0 - dt * s_z), gz)
        else:
            gz = gz * (1.0 - dt * s_z)
        _store4(du_ptr + 4 * step + b4, d_gy, d_gz, d_cz, d_cy, H, ok)
        if STREAM:
            tl.debug_barrier()  # this step's d u, stored above by every thread of the program, is read back below
            p_gy = _streamed_dot(du_ptr + 4 * step, 4 * H, mask_ptr, b, B, H, whh_ptr, 0, zero, False, False, BB, HP, KC)
            p_gz = _streamed_dot(du_ptr + 4 * step + H, 4 * H, mask_ptr, b, B, H, whh_ptr, H, zero, False, False, BB, HP,
                                 KC)
            dym = p_gy + p_gz + tl.dot(d_cz, w_cz, input_precision="ieee")
        else:
            dym = (tl.dot(d_gy, w_gy, input_precision="ieee") + tl.dot(d_gz, w_gz, input_precision="ieee")
                   + tl.dot(d_cz, w_cz, input_precision="ieee"))
    tl.store(gy_ptr + bh, gy + (dym * keep if HAS_MASK else dym), mask=ok)
    tl.store(gz_ptr + bh, gz, mask=ok)


BB = 16  # batch rows per program: the fewest tl.dot takes, so that a batch spreads over the most SMs
KC = 16  # rows of a streamed weight block per tl.dot


def config(H, stream=False):
    """Compile-time sizes and warps of both kernels for hidden size H (checked by lem.kernels.fit)."""
    HP = max(16, triton.next_power_of_2(H))
    return dict(BB=BB, HP=HP, STREAM=stream, KC=min(KC, HP)), 4 if HP <= 32 else 8  # 16 warps made H 64 spill


def shared_memory(H, gemm_dtype, stream=False):
    """Upper bound of the shared memory per block of either kernel, in bytes. All four weight blocks
    on chip: the blocks, four staging tiles of BB x HP float32 for the tl.dot operands, 1 KiB of static
    shared memory (sm_90) and 1 KiB to spare. With the gate blocks streamed: the two candidate blocks,
    two staging tiles, one streamed chunk (KC rows) with its input, and the same 2 KiB. The fit test
    checks both against what Triton allocates on every target."""
    meta = config(H, stream)[0]
    HP, kc, item = meta["HP"], meta["KC"], gemm_dtype.itemsize
    if stream:
        return 2 * HP * HP * item + 2 * BB * HP * 4 + kc * HP * item + BB * kc * 4 + 2048
    return 4 * HP * HP * item + 4 * BB * HP * 4 + 2048


def stream_gates(H, gemm_dtype, limit):
    """Where the weights go on a GPU with `limit` bytes of shared memory per block: False where all
    four blocks fit, True where only the candidate blocks do (the gate blocks are then read from L2
    every step), None where not even those fit (then the stepwise tier runs)."""
    return next((stream for stream in (False, True) if shared_memory(H, gemm_dtype, stream) <= limit), None)


def _config(H, w_hh, device):
    from .gpu import gpu_of  # here: gpu.py imports this module
    limit = (TARGET or gpu_of(device)).shared_memory
    stream = stream_gates(H, w_hh.dtype, limit)
    if stream is None:
        raise ValueError(f"the on-chip kernels need more than {limit:,} B of shared memory at H = {H} in {w_hh.dtype}")
    return config(H, stream)


TARGET = None  # a gpu.GPU to configure the kernels for instead of the tensors' GPU (lem.kernels.fit sets it)


def forward(u, bias, w_hh, w_tz, mask, lengths, ys, zs, acts, dt):
    """Fills ys[1:], and zs[1:] and acts when acts is given (else zs (1, B, H) goes from z_0 to z_T)."""
    T, B, H = u.size(0), u.size(1), ys.size(2)
    meta, num_warps = _config(H, w_hh, u.device)
    launch(_forward, (triton.cdiv(B, BB),), u, bias, w_hh, w_tz, mask, lengths, ys, zs, acts, T, B, H, dt,
           HAS_MASK=mask is not None, HAS_LEN=lengths is not None, KEEP=acts is not None, num_warps=num_warps, **meta)


def backward(grad_ys, acts, ys, zs, w_hh, w_tz, mask, lengths, du, gy, gz, dt):
    """Fills du (T, B, 4H); gy, gz: dL/dy_0, dL/dz_0 on exit (gz holds dL/dz_T on entry)."""
    T, B, H = acts.size(0), acts.size(1), ys.size(2)
    meta, num_warps = _config(H, w_hh, du.device)
    launch(_backward, (triton.cdiv(B, BB),), grad_ys, acts, ys, zs, w_hh, w_tz, mask, lengths, du, gy, gz, T, B, H, dt,
           HAS_MASK=mask is not None, HAS_LEN=lengths is not None, num_warps=num_warps, **meta)
