"""The large-H GPU tier (the recipe of cuDNN's standard RNN algorithm and of haste): per step one
cuBLAS GEMM for each recurrent product and one fused Triton kernel for the elementwise work of
each half-step. Any H runs here; the weights are read from global memory (L2) every step.

Forward, step n:  h = (y_{n-1} ⊙ mask) W_hhᵀ        GEMM into a (B, 3H) buffer
                  gates, z_n                     _forward_z
                  q = z_n W_yᵀ                   GEMM into a (B, H) buffer
                  y_n                            _forward_y (also writes y_n ⊙ mask for the next GEMM)
Backward mirrors it with the transposed products (dL/dz_n += dL/dq W_y, dL/d(y ⊙ mask) = dL/da W_hh).
All buffers exist before the time loop, which neither allocates nor synchronises with the host,
so that a whole loop is captured in a CUDA graph and replayed (Graphs, below) instead of launching
4·T kernels from Python.
Layouts as in onchip.py. With per-row lengths (HAS_LEN) the elementwise kernels keep a row's y and z
as they are from step lengths[b] on and write zero gradients of u_proj there; the GEMMs still take
every row (skipping ended rows would need their count on the host, a synchronisation per step).
"""
import warnings
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from .launch import launch, tanh

BLOCK = 512  # (row, column) elements per program of the elementwise kernels


@triton.jit
def _rows_cols(B, H, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    return i, i < B * H, i // H, i % H


@triton.jit
def _live(len_ptr, n, b, ok):
    """Whether the rows b still run at step n."""
    return n < tl.load(len_ptr + b, mask=ok, other=0)


@triton.jit(do_not_specialize=["n"])  # one compiled kernel for every step
def _forward_z(u_ptr, bias_ptr, h_ptr, len_ptr, zs_ptr, zg_ptr, acts_ptr, n, z_stride, a_stride, B, H, dt,
               HAS_LEN: tl.constexpr, BLOCK: tl.constexpr):
    # z_{n-1} at zs[n·z_stride], z_n to zs[(n+1)·z_stride] (z_stride 0: one buffer updated in place);
    # zg: z_n in the GEMM dtype for q; acts[n·a_stride] gets σ(gate y), σ(gate z), tanh(cand z)
    i, ok, b, j = _rows_cols(B, H, BLOCK)
    step = n.to(tl.int64) * B * H
    u = u_ptr + 4 * step + b * 4 * H + j
    h = h_ptr + b * 3 * H + j
    s_y = tl.sigmoid(tl.load(u, mask=ok).to(tl.float32) + tl.load(bias_ptr + j, mask=ok) + tl.load(h, mask=ok).to(tl.float32))
    s_z = tl.sigmoid(tl.load(u + H, mask=ok).to(tl.float32) + tl.load(bias_ptr + H + j, mask=ok)
                     + tl.load(h + H, mask=ok).to(tl.float32))
    c_z = tanh(tl.load(u + 2 * H, mask=ok).to(tl.float32) + tl.load(bias_ptr + 2 * H + j, mask=ok)
               + tl.load(h + 2 * H, mask=ok).to(tl.float32))
    z = tl.load(zs_ptr + step * z_stride + i, mask=ok)
    if HAS_LEN:
        z = tl.where(_live(len_ptr, n, b, ok), z + dt * s_z * (c_z - z), z)
    else:
        z = z + dt * s_z * (c_z - z)
    tl.store(zs_ptr + (step + B * H) * z_stride + i, z, mask=ok)
    tl.store(zg_ptr + i, z.to(zg_ptr.dtype.element_ty), mask=ok)
    a = acts_ptr + 4 * step * a_stride + b * 4 * H + j
    tl.store(a, s_y, mask=ok)
    tl.store(a + H, s_z, mask=ok)
    tl.store(a + 2 * H, c_z, mask=ok)


@triton.jit(do_not_specialize=["n"])
def _forward_y(u_ptr, bias_ptr, q_ptr, ys_ptr, ymg_ptr, mask_ptr, len_ptr, acts_ptr, n, a_stride, B, H, dt,
               HAS_MASK: tl.constexpr, HAS_LEN: tl.constexpr, BLOCK: tl.constexpr):
    # y_{n-1} at ys[n], y_n to ys[n + 1]; ymg: y_n ⊙ mask in the GEMM dtype for the next step's h
    i, ok, b, j = _rows_cols(B, H, BLOCK)
    step = n.to(tl.int64) * B * H
    a = acts_ptr + 4 * step * a_stride + b * 4 * H + j
    c_y = tanh(tl.load(u_ptr + 4 * step + b * 4 * H + 3 * H + j, mask=ok).to(tl.float32)
               + tl.load(bias_ptr + 3 * H + j, mask=ok) + tl.load(q_ptr + i, mask=ok).to(tl.float32))
    y = tl.load(ys_ptr + step + i, mask=ok)
    if HAS_LEN:
        y = tl.where(_live(len_ptr, n, b, ok), y + dt * tl.load(a, mask=ok) * (c_y - y), y)
    else:
        y = y + dt * tl.load(a, mask=ok) * (c_y - y)
    tl.store(ys_ptr + step + B * H + i, y, mask=ok)
    tl.store(a + 3 * H, c_y, mask=ok)
    if HAS_MASK:
        y = y * tl.load(mask_ptr + i, mask=ok)
    tl.store(ymg_ptr + i, y.to(ymg_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["n"])
def _backward_y(gys_ptr, acts_ptr, ys_ptr, gy_ptr, dym_ptr, mask_ptr, len_ptr, du_ptr, n, B, H, dt,
                HAS_MASK: tl.constexpr, HAS_LEN: tl.constexpr, BLOCK: tl.constexpr):
    # gy: dL/dy_n through the leaky carry, in and out; dym: dL/d(y_n ⊙ mask) from step n + 1's GEMM
    i, ok, b, j = _rows_cols(B, H, BLOCK)
    step = n.to(tl.int64) * B * H
    a = acts_ptr + 4 * step + b * 4 * H + j
    s_y = tl.load(a, mask=ok)
    c_y = tl.load(a + 3 * H, mask=ok)
    dym = tl.load(dym_ptr + i, mask=ok).to(tl.float32)
    if HAS_MASK:
        dym = dym * tl.load(mask_ptr + i, mask=ok)
    g = tl.load(gys_ptr + step + i, mask=ok).to(tl.float32) + tl.load(gy_ptr + i, mask=ok) + dym
    if HAS_LEN:  # a row that has ended: no gradient of u_proj, dL/dy goes on unchanged
        live = _live(len_ptr, n, b, ok)
    du = du_ptr + 4 * step + b * 4 * H + j
    d_gy = g * (c_y - tl.load(ys_ptr + step + i, mask=ok)) * dt * s_y * (1.0 - s_y)
    tl.store(du, (tl.where(live, d_gy, 0.0) if HAS_LEN else d_gy).to(du_ptr.dtype.element_ty), mask=ok)
    d_cy = g * dt * s_y * (1.0 - c_y * c_y)
    tl.store(du + 3 * H, (tl.where(live, d_cy, 0.0) if HAS_LEN else d_cy).to(du_ptr.dtype.element_ty), mask=ok)
    gy = g * (1.0 - dt * s_y)
    tl.store(gy_ptr + i, tl.where(live, gy, g) if HAS_LEN else gy, mask=ok)


@triton.jit(do_not_specialize=["n"])
def _backward_z(acts_ptr, zs_ptr, gz_ptr, dzy_ptr, len_ptr, du_ptr, n, B, H, dt, HAS_LEN: tl.constexpr,
                BLOCK: tl.constexpr):
    # gz: dL/dz_n, in (without the path through q, dzy) and out (as dL/dz_{n-1} through the carry)
    i, ok, b, j = _rows_cols(B, H, BLOCK)
    step = n.to(tl.int64) * B * H
    a = acts_ptr + 4 * step + b * 4 * H + j
    s_z = tl.load(a + H, mask=ok)
    c_z = tl.load(a + 2 * H, mask=ok)
    gz = tl.load(gz_ptr + i, mask=ok) + tl.load(dzy_ptr + i, mask=ok).to(tl.float32)  # dzy: 0 where ended
    if HAS_LEN:  # a row that has ended: no gradient of u_proj, dL/dz goes on unchanged
        live = _live(len_ptr, n, b, ok)
    du = du_ptr + 4 * step + b * 4 * H + j
    d_gz = gz * (c_z - tl.load(zs_ptr + step + i, mask=ok)) * dt * s_z * (1.0 - s_z)
    tl.store(du + H, (tl.where(live, d_gz, 0.0) if HAS_LEN else d_gz).to(du_ptr.dtype.element_ty), mask=ok)
    d_cz = gz * dt * s_z * (1.0 - c_z * c_z)
    tl.store(du + 2 * H, (tl.where(live, d_cz, 0.0) if HAS_LEN else d_cz).to(du_ptr.dtype.element_ty), mask=ok)
    gz_out = gz * (1.0 - dt * s_z)
    tl.store(gz_ptr + i, tl.where(live, gz_out, gz) if HAS_LEN else gz_out, mask=ok)


def forward(u, bias, w_hh, w_tz, mask, lengths, ys, zs, acts, dt):
    """Fills ys[1:], and zs[1:] and acts when acts is given (else zs (1, B, H) goes from z_0 to z_T)."""
    GRAPHS.run("forward", _forward_loop, (u, bias, w_hh, w_tz, mask, lengths, ys, zs, acts), dt)


def backward(grad_ys, acts, ys, zs, w_hh, w_tz, mask, lengths, du, gy, gz, dt):
    """Fills du (T, B, 4H); gy, gz: dL/dy_0, dL/dz_0 on exit (gz holds dL/dz_T on entry, gy zeros)."""
    GRAPHS.run("backward", _backward_loop, (grad_ys, acts, ys, zs, w_hh, w_tz, mask, lengths, du, gy, gz), dt)


def _forward_loop(u, bias, w_hh, w_tz, mask, lengths, ys, zs, acts, dt):
    T, B, H = u.size(0), u.size(1), ys.size(2)
    keep = acts is not None
    h, q = u.new_empty(B, 3 * H), u.new_empty(B, H)
    zg, ymg = u.new_empty(B, H), u.new_empty(B, H)
    ymg.copy_(ys[0] if mask is None else ys[0] * mask)
    a = acts if keep else ys.new_empty(B, 4 * H)
    w_hh_t, w_tz_t = w_hh.t(), w_tz.t()
    grid = (triton.cdiv(B * H, BLOCK),)
    for n in range(T):
        torch.mm(ymg, w_hh_t, out=h)
        launch(_forward_z, grid, u, bias, h, lengths, zs, zg, a, n, int(keep), int(keep), B, H, dt,
               HAS_LEN=lengths is not None, BLOCK=BLOCK)
        torch.mm(zg, w_tz_t, out=q)
        launch(_forward_y, grid, u, bias, q, ys, ymg, mask, lengths, a, n, int(keep), B, H, dt,
               HAS_MASK=mask is not None, HAS_LEN=lengths is not None, BLOCK=BLOCK)


def _backward_loop(grad_ys, acts, ys, zs, w_hh, w_tz, mask, lengths, du, gy, gz, dt):
    T, B, H = acts.size(0), acts.size(1), ys.size(2)
    dzy, dym = du.new_empty(B, H), du.new_zeros(B, H)
    grid = (triton.cdiv(B * H, BLOCK),)
    for n in reversed(range(T)):
        launch(_backward_y, grid, grad_ys, acts, ys, gy, dym, mask, lengths, du, n, B, H, dt,
               HAS_MASK=mask is not None, HAS_LEN=lengths is not None, BLOCK=BLOCK)
        torch.mm(du[n, :, 3 * H:], w_tz, out=dzy)
        launch(_backward_z, grid, acts, zs, gz, dzy, lengths, du, n, B, H, dt, HAS_LEN=lengths is not None, BLOCK=BLOCK)
        torch.mm(du[n, :, :3 * H], w_hh, out=dym)
    gy += dym if mask is None else dym * mask


class Graphs:
    """CUDA graphs of whole loops: per call 4·T launches from Python become one replay.

    A graph is kept per loop and per call signature: every tensor's address, shape, strides and dtype,
    and dt. A call whose tensors are where a captured call's were (what a training loop's caching
    allocator gives each iteration of the same sizes) replays that graph: it reads and writes those
    same addresses, so it computes what the eager loop would, launch for launch. Scratch buffers are
    allocated during the capture from the graph's own memory pool and kept with it. A signature is
    captured on its second call, so that the first, eager, compiles the kernels (no compile or
    module load happens during a capture), and calls whose tensors never come back cost nothing
    more than a look-up. Eager launches run where graphs are off (`enabled`), off CUDA, inside
    another capture (torch.compile's CUDA graphs) and after a capture fails (one warning, then
    graphs stay off in this process)."""

    def __init__(self, size=16):
        self.enabled, self.size = True, size
        self.graphs, self.seen = OrderedDict(), OrderedDict()  # signature -> (graph, scratch); -> None
        self.captures = self.replays = 0

    def run(self, name, loop, tensors, dt):
        device = tensors[0].device
        if not self.enabled or device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            return loop(*tensors, dt)
        key = (name, dt, device, *[None if t is None else (t.data_ptr(), t.shape, t.stride(), t.dtype) for t in tensors])
        graph = self.graphs.get(key)
        if graph is None and key in self.seen:
            graph = self._capture(key, loop, tensors, dt)
        if graph is None:
            _remember(self.seen, key, None, 4 * self.size)
            return loop(*tensors, dt)
        self.graphs.move_to_end(key)
        graph.replay()
        self.replays += 1

    def _capture(self, key, loop, tensors, dt):
        """The graph of loop(*tensors, dt), kept under key; None (graphs off from now on) if it fails."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                loop(*tensors, dt)
        except Exception as error:  # a cuBLAS or driver call that cannot be captured: launch eagerly
            self.enabled = False
            warnings.warn(f"LEM's stepwise tier could not capture its loop in a CUDA graph ({type(error).__name__}: "
                          f"{str(error).strip()[:300]}); launching step by step", RuntimeWarning, stacklevel=5)
            return None
        _remember(self.graphs, key, graph, self.size)
        self.captures += 1
        return graph


def _remember(cache, key, value, size):
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > size:
        cache.popitem(last=False)


GRAPHS = Graphs()
