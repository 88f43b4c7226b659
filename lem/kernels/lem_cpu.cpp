// Fused CPU LEM (SPEC §1): the whole time loop of forward and backward in one C++ call.
//
// Per step only the two recurrent products (y_{n-1} -> hid2hid, z_n -> transform_z) go through
// ATen GEMMs; everything elementwise is one plain loop per half-step. The input projection of
// all T steps is computed before the call (one GEMM), backward recomputes the gate
// pre-activations of all steps with two big GEMMs, and the weight gradients are two GEMMs after
// the loop. Only y_1..y_T and z_1..z_T are kept from the forward.
//
// Layouts (chunks of H): u_proj (T, B, 4H) = [gate y, gate z, cand y, cand z] of inp2hid;
// hid2hid (3H) = [gate y, gate z, cand z]; transform_z (H) = cand y.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

template <typename T> inline T sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }

// Rows of the batch are independent: split them over threads when the step is big enough.
template <typename F> inline void for_rows(int64_t B, int64_t H, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) f(b);
  });
}

template <typename scalar_t>
void forward_loop(const at::Tensor& u_proj, const at::Tensor& w_hh_t, const at::Tensor& b_hh,
                  const at::Tensor& w_tz_t, const at::Tensor& b_tz, const at::Tensor& mask, double dt_,
                  at::Tensor& y, at::Tensor& z, at::Tensor& ys, at::Tensor& zs, bool keep_z) {
  const int64_t T = u_proj.size(0), B = u_proj.size(1), H = y.size(1);
  const scalar_t dt = static_cast<scalar_t>(dt_);
  const bool masked = mask.defined();
  at::Tensor ym = masked ? y * mask : y;           // y_{n-1} as it enters hid2hid
  at::Tensor h = at::empty({B, 3 * H}, y.options());
  at::Tensor q = at::empty({B, H}, y.options());
  const scalar_t* bh = b_hh.data_ptr<scalar_t>();
  const scalar_t* bz = b_tz.data_ptr<scalar_t>();
  const scalar_t* mk = masked ? mask.data_ptr<scalar_t>() : nullptr;
  for (int64_t n = 0; n < T; ++n) {
    at::mm_out(h, ym, w_hh_t);
    const scalar_t* u = u_proj[n].data_ptr<scalar_t>();
    scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* hp = h.data_ptr<scalar_t>();
    for_rows(B, H, [&](int64_t b) {  // z_n = (1 − Δt_n) z_{n-1} + Δt_n tanh(...)
      const scalar_t* ub = u + b * 4 * H;
      const scalar_t* hb = hp + b * 3 * H;
      scalar_t* zb = zp + b * H;
      for (int64_t j = 0; j < H; ++j) {
        scalar_t dtz = dt * sigmoid(ub[H + j] + hb[H + j] + bh[H + j]);
        scalar_t cz = std::tanh(ub[3 * H + j] + hb[2 * H + j] + bh[2 * H + j]);
        zb[j] = (scalar_t(1) - dtz) * zb[j] + dtz * cz;
      }
    });
    at::mm_out(q, z, w_tz_t);
    scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* ymp = ym.data_ptr<scalar_t>();
    const scalar_t* qp = q.data_ptr<scalar_t>();
    for_rows(B, H, [&](int64_t b) {  // y_n = (1 − Δt̄_n) y_{n-1} + Δt̄_n tanh(Wy z_n + ...)
      const scalar_t* ub = u + b * 4 * H;
      const scalar_t* hb = hp + b * 3 * H;
      scalar_t* yb = yp + b * H;
      for (int64_t j = 0; j < H; ++j) {
        scalar_t dty = dt * sigmoid(ub[j] + hb[j] + bh[j]);
        scalar_t cy = std::tanh(qp[b * H + j] + bz[j] + ub[2 * H + j]);
        yb[j] = (scalar_t(1) - dty) * yb[j] + dty * cy;
        if (masked) ymp[b * H + j] = yb[j] * mk[b * H + j];
      }
    });
    ys[n].copy_(y);
    if (keep_z) zs[n].copy_(z);
  }
}

template <typename scalar_t>
void backward_loop(const at::Tensor& grad_ys, const at::Tensor& u_proj, const at::Tensor& a_h,
                   const at::Tensor& q_all, const at::Tensor& y_prev, const at::Tensor& z_prev,
                   const at::Tensor& w_hh, const at::Tensor& w_tz, const at::Tensor& mask, double dt_,
                   at::Tensor& dy, at::Tensor& dz, at::Tensor& dA, at::Tensor& dQ) {
  // a_h: hid2hid(y_{n-1} ⊙ mask) with bias, all steps (T, B, 3H); q_all: Wy z_n + b + Vy u_n (T, B, H).
  // dy, dz enter as dL/dy_T (beyond grad_ys) and dL/dz_T and leave as dL/dy_0, dL/dz_0.
  const int64_t T = u_proj.size(0), B = u_proj.size(1), H = dy.size(1);
  const scalar_t dt = static_cast<scalar_t>(dt_);
  const bool masked = mask.defined();
  const scalar_t* mk = masked ? mask.data_ptr<scalar_t>() : nullptr;
  at::Tensor dz_from_y = at::empty({B, H}, dy.options());
  at::Tensor dym = at::zeros({B, H}, dy.options());
  scalar_t* dyp = dy.data_ptr<scalar_t>();
  scalar_t* dzp = dz.data_ptr<scalar_t>();
  for (int64_t n = T - 1; n >= 0; --n) {
    const scalar_t* u = u_proj[n].data_ptr<scalar_t>();
    const scalar_t* ah = a_h[n].data_ptr<scalar_t>();
    const scalar_t* qn = q_all[n].data_ptr<scalar_t>();
    const scalar_t* yprev = y_prev[n].data_ptr<scalar_t>();
    const scalar_t* zprev = z_prev[n].data_ptr<scalar_t>();
    const scalar_t* gy = grad_ys[n].data_ptr<scalar_t>();
    const scalar_t* dymp = dym.data_ptr<scalar_t>();
    scalar_t* dAn = dA[n].data_ptr<scalar_t>();
    scalar_t* dQn = dQ[n].data_ptr<scalar_t>();
    for_rows(B, H, [&](int64_t b) {  // through y_n = (1 − Δt̄) y_{n-1} + Δt̄ tanh(q)
      for (int64_t j = 0; j < H; ++j) {
        const int64_t i = b * H + j;
        // dL/dy_n: from the output, from y_{n+1}'s leak and (masked) from hid2hid of step n+1
        scalar_t g = gy[i] + dyp[i] + (masked ? dymp[i] * mk[i] : dymp[i]);
        scalar_t s = sigmoid(u[b * 4 * H + j] + ah[b * 3 * H + j]);
        scalar_t cy = std::tanh(qn[i]);
        scalar_t dty = dt * s;
        dQn[i] = g * dty * (scalar_t(1) - cy * cy);
        dAn[b * 3 * H + j] = g * (cy - yprev[i]) * dt * s * (scalar_t(1) - s);
        dyp[i] = g * (scalar_t(1) - dty);
      }
    });
    at::mm_out(dz_from_y, dQ[n], w_tz);
    const scalar_t* dzy = dz_from_y.data_ptr<scalar_t>();
    for_rows(B, H, [&](int64_t b) {  // through z_n = (1 − Δt) z_{n-1} + Δt tanh(c)
      for (int64_t j = 0; j < H; ++j) {
        const int64_t i = b * H + j;
        scalar_t g = dzp[i] + dzy[i];
        scalar_t s = sigmoid(u[b * 4 * H + H + j] + ah[b * 3 * H + H + j]);
        scalar_t cz = std::tanh(u[b * 4 * H + 3 * H + j] + ah[b * 3 * H + 2 * H + j]);
        scalar_t dtz = dt * s;
        dAn[b * 3 * H + H + j] = g * (cz - zprev[i]) * dt * s * (scalar_t(1) - s);
        dAn[b * 3 * H + 2 * H + j] = g * dtz * (scalar_t(1) - cz * cz);
        dzp[i] = g * (scalar_t(1) - dtz);
      }
    });
    at::mm_out(dym, dA[n], w_hh);
  }
  dy.add_(masked ? dym * mask : dym);
}

at::Tensor opt_mask(const c10::optional<at::Tensor>& mask) {
  return mask.has_value() && mask->defined() ? mask->contiguous() : at::Tensor();
}

void check(const at::Tensor& u_proj, const at::Tensor& y0) {
  TORCH_CHECK(u_proj.device().is_cpu(), "lem_cpu: tensors must be on the CPU");
  TORCH_CHECK(u_proj.dim() == 3 && u_proj.size(2) == 4 * y0.size(1), "lem_cpu: u_proj must be (T, B, 4H)");
}

}  // namespace

// Returns ys (T, B, H), zs (T, B, H) when keep_z else only z_T as (1, B, H).
std::vector<at::Tensor> lem_forward(at::Tensor u_proj, at::Tensor y0, at::Tensor z0, at::Tensor w_hh,
                                    at::Tensor b_hh, at::Tensor w_tz, at::Tensor b_tz,
                                    c10::optional<at::Tensor> mask_opt, double dt, bool keep_z) {
  check(u_proj, y0);
  u_proj = u_proj.contiguous();
  const int64_t T = u_proj.size(0), B = u_proj.size(1), H = y0.size(1);
  at::Tensor mask = opt_mask(mask_opt);
  at::Tensor y = y0.contiguous().clone(), z = z0.contiguous().clone();
  at::Tensor ys = at::empty({T, B, H}, y.options());
  at::Tensor zs = keep_z ? at::empty({T, B, H}, y.options()) : at::Tensor();
  at::Tensor w_hh_t = w_hh.t().contiguous(), w_tz_t = w_tz.t().contiguous();
  AT_DISPATCH_FLOATING_TYPES(u_proj.scalar_type(), "lem_forward", [&] {
    forward_loop<scalar_t>(u_proj, w_hh_t, b_hh.contiguous(), w_tz_t, b_tz.contiguous(), mask, dt, y, z, ys, zs,
                           keep_z);
  });
  return {ys, keep_z ? zs : z.unsqueeze(0)};
}

// Returns d u_proj (T, B, 4H), d y0, d z0, d w_hh, d b_hh, d w_tz, d b_tz.
std::vector<at::Tensor> lem_backward(at::Tensor grad_ys, at::Tensor grad_zT, at::Tensor u_proj, at::Tensor ys,
                                     at::Tensor zs, at::Tensor y0, at::Tensor z0, at::Tensor w_hh,
                                     at::Tensor b_hh, at::Tensor w_tz, at::Tensor b_tz,
                                     c10::optional<at::Tensor> mask_opt, double dt) {
  check(u_proj, y0);
  u_proj = u_proj.contiguous();
  grad_ys = grad_ys.contiguous();
  const int64_t T = u_proj.size(0), B = u_proj.size(1), H = y0.size(1);
  at::Tensor mask = opt_mask(mask_opt);
  w_hh = w_hh.contiguous();
  w_tz = w_tz.contiguous();
  at::Tensor y_prev = at::cat({y0.unsqueeze(0), ys.narrow(0, 0, T - 1)}).contiguous();
  at::Tensor z_prev = at::cat({z0.unsqueeze(0), zs.narrow(0, 0, T - 1)}).contiguous();
  at::Tensor ym_prev = mask.defined() ? y_prev * mask : y_prev;
  // gate pre-activations of all steps, recomputed in bulk (SPEC §1 with the chunk orders above)
  at::Tensor a_h = at::addmm(b_hh, ym_prev.view({T * B, H}), w_hh.t()).view({T, B, 3 * H});
  at::Tensor q_all = at::addmm(b_tz, zs.contiguous().view({T * B, H}), w_tz.t()).view({T, B, H})
                         .add_(u_proj.narrow(2, 2 * H, H));
  at::Tensor dy = at::zeros({B, H}, y0.options());
  at::Tensor dz = grad_zT.defined() ? grad_zT.contiguous().clone() : at::zeros({B, H}, y0.options());
  at::Tensor dA = at::empty({T, B, 3 * H}, y0.options());
  at::Tensor dQ = at::empty({T, B, H}, y0.options());
  AT_DISPATCH_FLOATING_TYPES(u_proj.scalar_type(), "lem_backward", [&] {
    backward_loop<scalar_t>(grad_ys, u_proj, a_h, q_all, y_prev, z_prev, w_hh, w_tz, mask, dt, dy, dz, dA, dQ);
  });
  // weight gradients: one GEMM each over all T·B rows
  at::Tensor dA2 = dA.view({T * B, 3 * H}), dQ2 = dQ.view({T * B, H});
  at::Tensor d_w_hh = at::mm(dA2.t(), ym_prev.view({T * B, H}));
  at::Tensor d_w_tz = at::mm(dQ2.t(), zs.contiguous().view({T * B, H}));
  at::Tensor d_u = at::cat({dA.narrow(2, 0, 2 * H), dQ, dA.narrow(2, 2 * H, H)}, 2);
  return {d_u, dy, dz, d_w_hh, dA2.sum(0), d_w_tz, dQ2.sum(0)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &lem_forward, "fused LEM forward (CPU)");
  m.def("backward", &lem_backward, "fused LEM backward (CPU)");
}
