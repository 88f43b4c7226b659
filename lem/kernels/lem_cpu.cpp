// Fused CPU LEM (SPEC §1): the whole time loop of forward and backward in one C++ call.
//
// The input projection of all T steps comes in precomputed (one GEMM, u_proj). Per step only the
// two recurrent products (y_{n-1} into hid2hid, z_n into transform_z) remain; the elementwise work
// of a step is one plain loop per half-step. Two strategies for those products:
//   - small H: batch rows are independent over the whole sequence, so each thread takes some rows
//     and runs all T steps for them with hand-written mat-vecs (weights stay in L1/L2, no
//     per-step synchronisation or library call);
//   - larger H: one ATen GEMM per product and step over the whole batch.
// Forward also keeps the recurrent products of every step (they are written straight into the saved
// buffers), so backward runs only the reverse loop and then forms the weight gradients as two GEMMs
// over T·B rows.
//
// Layouts (chunks of H): u_proj (T, B, 4H) = [gate y, gate z, cand y, cand z] of inp2hid;
// hid2hid (3H) = [gate y, gate z, cand z]; transform_z (H) = cand y.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kRowwiseMaxH = 64;  // up to this H the per-row strategy beats per-step GEMMs

// Flush-to-zero and denormals-are-zero for the calling thread while alive. Gradients through long
// sequences decay into denormal floats (below 1.2e-38), which x86 handles ~100x slower: a backward
// with the loss on the last step only (sMNIST) took 4.6x longer without this. Results change only
// for values below 1.2e-38.
struct FlushDenormals {
#if defined(__SSE2__)
  unsigned csr = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(csr | 0x8040); }  // FTZ (bit 15) | DAZ (bit 6)
  ~FlushDenormals() { _mm_setcsr(csr); }
#endif
};

// exp for float as plain arithmetic (Cephes' polynomial, ~2 ulp), so the elementwise loops
// vectorise; double keeps the libm functions.
inline float exp_(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // n = round(x / ln 2) as an int conversion of a positive number, which vectorises
  const float n = static_cast<float>(static_cast<int32_t>(x * 1.44269504088896341f + 128.5f)) - 128.0f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  const float scale = __builtin_bit_cast(float, bits);
  return p * scale;
}
inline double exp_(double x) { return std::exp(x); }
template <typename T> inline T sigmoid(T x) { return T(1) / (T(1) + exp_(-x)); }
inline float tanh_(float x) { return 2.0f / (1.0f + exp_(-2.0f * x)) - 1.0f; }
inline double tanh_(double x) { return std::tanh(x); }

// Calls f(b0, full) for blocks of kRowBlock rows (full) and then the leftover single rows.
constexpr int kRowBlock = 4;
template <typename F> inline void for_row_blocks(int64_t B, int64_t work_per_row, const F& f) {
  const int64_t blocks = B / kRowBlock, grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(work_per_row, 1));
  at::parallel_for(0, blocks, grain, [&](int64_t i0, int64_t i1) {
    FlushDenormals ftz;
    for (int64_t i = i0; i < i1; ++i) f(i * kRowBlock, true);
  });
  for (int64_t b = blocks * kRowBlock; b < B; ++b) f(b, false);
}

template <typename F> inline void for_rows(int64_t B, int64_t work_per_row, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(work_per_row, 1));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) { FlushDenormals ftz; f(b0, b1); });
}

// out[r][j] = bias[j] + sum_k v[r][k] m[k][j] for R rows at once (row stride of v: ldv, default K),
// m (K, N) row-major, bias may be null; tiles of R x 8 outputs stay in registers while the weights stream from L1.
#if defined(__AVX2__) && defined(__FMA__)
// The float case with explicit AVX2 tiles of R x 16 outputs (2R accumulators); the compiler's
// own vectorisation of the generic loop below mixed in scalar FMAs and shuffles.
template <int R>
inline int64_t rows_vecmat_avx2(const float* __restrict v, const float* __restrict m, const float* __restrict bias,
                                float* __restrict out, int64_t K, int64_t N, int64_t ldv) {
  int64_t j0 = 0;
  for (; j0 + 16 <= N; j0 += 16) {
    __m256 a0[R], a1[R];
    const __m256 b0 = bias ? _mm256_loadu_ps(bias + j0) : _mm256_setzero_ps();
    const __m256 b1 = bias ? _mm256_loadu_ps(bias + j0 + 8) : _mm256_setzero_ps();
    for (int r = 0; r < R; ++r) { a0[r] = b0; a1[r] = b1; }
    for (int64_t k = 0; k < K; ++k) {
      const __m256 w0 = _mm256_loadu_ps(m + k * N + j0), w1 = _mm256_loadu_ps(m + k * N + j0 + 8);
      for (int r = 0; r < R; ++r) {
        const __m256 x = _mm256_broadcast_ss(v + r * ldv + k);
        a0[r] = _mm256_fmadd_ps(x, w0, a0[r]);
        a1[r] = _mm256_fmadd_ps(x, w1, a1[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(out + r * N + j0, a0[r]);
      _mm256_storeu_ps(out + r * N + j0 + 8, a1[r]);
    }
  }
  for (; j0 + 8 <= N; j0 += 8) {
    __m256 a[R];
    const __m256 b = bias ? _mm256_loadu_ps(bias + j0) : _mm256_setzero_ps();
    for (int r = 0; r < R; ++r) a[r] = b;
    for (int64_t k = 0; k < K; ++k) {
      const __m256 w = _mm256_loadu_ps(m + k * N + j0);
      for (int r = 0; r < R; ++r) a[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(v + r * ldv + k), w, a[r]);
    }
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + r * N + j0, a[r]);
  }
  return j0;  // columns done; the caller finishes the rest
}
#endif

template <int R, typename T>
inline void rows_vecmat(const T* __restrict v, const T* __restrict m, const T* __restrict bias, T* __restrict out,
                        int64_t K, int64_t N, int64_t ldv = 0) {
  if (ldv == 0) ldv = K;
  constexpr int W = 8;
  int64_t j0 = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<T, float>) j0 = rows_vecmat_avx2<R>(v, m, bias, out, K, N, ldv);
#endif
  for (; j0 + W <= N; j0 += W) {
    T acc[R][W];
    for (int r = 0; r < R; ++r)
      for (int jj = 0; jj < W; ++jj) acc[r][jj] = bias ? bias[j0 + jj] : T(0);
    for (int64_t k = 0; k < K; ++k) {
      const T* mk = m + k * N + j0;
      for (int r = 0; r < R; ++r) {
        const T vk = v[r * ldv + k];
        for (int jj = 0; jj < W; ++jj) acc[r][jj] += vk * mk[jj];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int jj = 0; jj < W; ++jj) out[r * N + j0 + jj] = acc[r][jj];
  }
  for (; j0 < N; ++j0)
    for (int r = 0; r < R; ++r) {
      T acc = bias ? bias[j0] : T(0);
      for (int64_t k = 0; k < K; ++k) acc += v[r * ldv + k] * m[k * N + j0];
      out[r * N + j0] = acc;
    }
}

// ---- the elementwise half-steps of one batch row (u: 4H, h: 3H hidden part incl. bias) ----
template <typename T> inline void fwd_z(const T* __restrict u, const T* __restrict h, T* __restrict z, int64_t H, T dt) {
  for (int64_t j = 0; j < H; ++j) {  // z_n = (1 − Δt_n) z_{n-1} + Δt_n tanh(Wz y + Vz u + bz)
    T dtz = dt * sigmoid(u[H + j] + h[H + j]);
    T cz = tanh_(u[3 * H + j] + h[2 * H + j]);
    z[j] = (T(1) - dtz) * z[j] + dtz * cz;
  }
}

template <typename T> inline void fwd_y(const T* __restrict u, const T* __restrict h, const T* __restrict q, T* __restrict y, T* __restrict ym, const T* __restrict mask, int64_t H, T dt) {
  for (int64_t j = 0; j < H; ++j) {  // y_n = (1 − Δt̄_n) y_{n-1} + Δt̄_n tanh(Wy z_n + Vy u + by); q = Wy z_n + b
    T dty = dt * sigmoid(u[j] + h[j]);
    T cy = tanh_(q[j] + u[2 * H + j]);
    y[j] = (T(1) - dty) * y[j] + dty * cy;
  }
  if (mask) for (int64_t j = 0; j < H; ++j) ym[j] = y[j] * mask[j];
  else std::memcpy(ym, y, H * sizeof(T));
}

// g_y: dL/dy_n (in), becomes the leak part of dL/dy_{n-1}; writes dq (H) and da_gate_y (first H of dA).
template <typename T> inline void bwd_y(const T* __restrict u, const T* __restrict ah, const T* __restrict q, const T* __restrict yprev, T* __restrict g_y, T* __restrict dq, T* __restrict dA,
                                        int64_t H, T dt) {
  for (int64_t j = 0; j < H; ++j) {
    T s = sigmoid(u[j] + ah[j]);
    T cy = tanh_(q[j] + u[2 * H + j]);
    T g = g_y[j], dty = dt * s;
    dq[j] = g * dty * (T(1) - cy * cy);
    dA[j] = g * (cy - yprev[j]) * dt * s * (T(1) - s);
    g_y[j] = g * (T(1) - dty);
  }
}

// g_z: dL/dz_n (in, already including Wy^T dq), becomes dL/dz_{n-1}; writes the z parts of dA
// (a row of d u_proj: gate z at H, cand z at 3H).
template <typename T> inline void bwd_z(const T* __restrict u, const T* __restrict ah, const T* __restrict zprev, T* __restrict g_z, T* __restrict dA, int64_t H, T dt) {
  for (int64_t j = 0; j < H; ++j) {
    T s = sigmoid(u[H + j] + ah[H + j]);
    T cz = tanh_(u[3 * H + j] + ah[2 * H + j]);
    T g = g_z[j], dtz = dt * s;
    dA[H + j] = g * (cz - zprev[j]) * dt * s * (T(1) - s);
    dA[3 * H + j] = g * dtz * (T(1) - cz * cz);
    g_z[j] = g * (T(1) - dtz);
  }
}

struct Sizes { int64_t T, B, H; };

// f(std::integral_constant<int, HC>) with HC = H for the sizes of the paper's small models, else 0.
template <typename F> inline void with_fixed_h(int64_t H, const F& f) {
  switch (H) {
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    default: f(std::integral_constant<int, 0>{});
  }
}

// The per-row strategy (H <= kRowwiseMaxH). HC > 0 fixes H at compile time: with known trip
// counts the tiny inner loops unroll and vectorise fully (3x faster at H = 16); HC = 0 is any H.
template <typename T, int HC>
void forward_rows(Sizes s, const T* u, const T* whh, const T* b_hh, const T* wtz, const T* b_tz, const T* mask, T dt,
                  T* y, T* z, T* ys, T* zs, T* hs, T* qs) {
  const int64_t Tn = s.T, B = s.B, H = HC > 0 ? HC : s.H;
    // rows b0..b0+R-1 over all T steps; y, z of those rows are contiguous in the (B, H) state
    auto rows = [&](auto r_const, int64_t b0) {
      constexpr int R = decltype(r_const)::value;
      T h_own[R * 3 * kRowwiseMaxH], q_own[R * kRowwiseMaxH], ym[R * kRowwiseMaxH];
      T* yb = y + b0 * H; T* zb = z + b0 * H;
      const T* mb = mask ? mask + b0 * H : nullptr;
      for (int64_t i = 0; i < R * H; ++i) ym[i] = mb ? yb[i] * mb[i] : yb[i];
      for (int64_t n = 0; n < Tn; ++n) {
        const int64_t row = n * B + b0;
        T* h = hs ? hs + row * 3 * H : h_own;  // the R rows of step n are contiguous in hs, qs
        T* q = qs ? qs + row * H : q_own;
        rows_vecmat<R>(ym, whh, b_hh, h, H, 3 * H);
        for (int r = 0; r < R; ++r) fwd_z(u + (row + r) * 4 * H, h + r * 3 * H, zb + r * H, H, dt);
        rows_vecmat<R>(zb, wtz, b_tz, q, H, H);
        for (int r = 0; r < R; ++r)
          fwd_y(u + (row + r) * 4 * H, h + r * 3 * H, q + r * H, yb + r * H, ym + r * H, mb ? mb + r * H : nullptr, H, dt);
        std::memcpy(ys + row * H, yb, R * H * sizeof(T));
        if (zs) std::memcpy(zs + row * H, zb, R * H * sizeof(T));
      }
    };
    for_row_blocks(B, Tn * 8 * H * H, [&](int64_t b0, bool full) {
      if (full) rows(std::integral_constant<int, kRowBlock>{}, b0); else rows(std::integral_constant<int, 1>{}, b0);
    });
}

// y, z: (B, H) states in/out; ys (T, B, H); zs (T, B, H) or null.
template <typename T>
void forward_loop(Sizes s, const T* u, const at::Tensor& w_hh, const T* b_hh, const at::Tensor& w_tz, const T* b_tz,
                  const T* mask, T dt, T* y, T* z, T* ys, T* zs, T* hs, T* qs, const at::TensorOptions& opt) {
  const int64_t Tn = s.T, B = s.B, H = s.H;
  if (H <= kRowwiseMaxH) {
    const at::Tensor w_hh_t = w_hh.t().contiguous(), w_tz_t = w_tz.t().contiguous();
    with_fixed_h(H, [&](auto hc) {
      forward_rows<T, decltype(hc)::value>(s, u, w_hh_t.data_ptr<T>(), b_hh, w_tz_t.data_ptr<T>(), b_tz, mask, dt, y, z, ys, zs, hs, qs);
    });
    return;
  }
  at::Tensor h_own = at::empty({B, 3 * H}, opt), q_own = at::empty({B, H}, opt), ym = at::empty({B, H}, opt);
  const at::Tensor w_hh_t = w_hh.t(), w_tz_t = w_tz.t();
  const at::Tensor zt = at::from_blob(z, {B, H}, opt);
  T* ymp = ym.data_ptr<T>();
  for (int64_t i = 0; i < B * H; ++i) ymp[i] = mask ? y[i] * mask[i] : y[i];
  for (int64_t n = 0; n < Tn; ++n) {
    const T* un = u + n * B * 4 * H;
    T* hp = hs ? hs + n * B * 3 * H : h_own.data_ptr<T>();  // GEMMs write straight into hs, qs
    T* qp = qs ? qs + n * B * H : q_own.data_ptr<T>();
    at::Tensor h = at::from_blob(hp, {B, 3 * H}, opt), q = at::from_blob(qp, {B, H}, opt);
    at::addmm_out(h, at::from_blob(const_cast<T*>(b_hh), {3 * H}, opt), ym, w_hh_t);
    for_rows(B, H, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) fwd_z(un + b * 4 * H, hp + b * 3 * H, z + b * H, H, dt);
    });
    at::addmm_out(q, at::from_blob(const_cast<T*>(b_tz), {H}, opt), zt, w_tz_t);
    for_rows(B, H, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        fwd_y(un + b * 4 * H, hp + b * 3 * H, qp + b * H, y + b * H, ymp + b * H, mask ? mask + b * H : nullptr, H, dt);
    });
    std::memcpy(ys + n * B * H, y, B * H * sizeof(T));
    if (zs) std::memcpy(zs + n * B * H, z, B * H * sizeof(T));
  }
}

template <typename T, int HC>
void backward_rows(Sizes s, const T* grad_ys, const T* u, const T* a_h, const T* q_all, const T* y0, const T* ys,
                   const T* z0, const T* zs, const T* whh4, const T* wtz, const T* mask, T dt, T* g_y, T* g_z, T* dU) {
  const int64_t Tn = s.T, B = s.B, H = HC > 0 ? HC : s.H;
    auto rows = [&](auto r_const, int64_t b0) {
      constexpr int R = decltype(r_const)::value;
      T dzy[R * kRowwiseMaxH], dym[R * kRowwiseMaxH];
      T* gy = g_y + b0 * H; T* gz = g_z + b0 * H;
      const T* mb = mask ? mask + b0 * H : nullptr;
      std::fill(dym, dym + R * H, T(0));
      for (int64_t n = Tn - 1; n >= 0; --n) {
        const int64_t row = n * B + b0;  // R consecutive rows of step n
        const T* yp = (n ? ys + (n - 1) * B * H : y0) + b0 * H;  // y_{n-1}, z_{n-1} of these rows
        const T* zp = (n ? zs + (n - 1) * B * H : z0) + b0 * H;
        for (int64_t i = 0; i < R * H; ++i) gy[i] += grad_ys[row * H + i] + (mb ? dym[i] * mb[i] : dym[i]);
        for (int r = 0; r < R; ++r)
          bwd_y(u + (row + r) * 4 * H, a_h + (row + r) * 3 * H, q_all + (row + r) * H, yp + r * H,
                gy + r * H, dU + (row + r) * 4 * H + 2 * H, dU + (row + r) * 4 * H, H, dt);
        rows_vecmat<R>(dU + row * 4 * H + 2 * H, wtz, static_cast<const T*>(nullptr), dzy, H, H, 4 * H);
        for (int64_t i = 0; i < R * H; ++i) gz[i] += dzy[i];
        for (int r = 0; r < R; ++r)
          bwd_z(u + (row + r) * 4 * H, a_h + (row + r) * 3 * H, zp + r * H, gz + r * H,
                dU + (row + r) * 4 * H, H, dt);
        rows_vecmat<R>(dU + row * 4 * H, whh4, static_cast<const T*>(nullptr), dym, 4 * H, H);
      }
      for (int64_t i = 0; i < R * H; ++i) gy[i] += mb ? dym[i] * mb[i] : dym[i];
    };
    for_row_blocks(B, Tn * 8 * H * H, [&](int64_t b0, bool full) {
      if (full) rows(std::integral_constant<int, kRowBlock>{}, b0); else rows(std::integral_constant<int, 1>{}, b0);
    });
}

// a_h: hid2hid(y_{n-1} ⊙ mask) + bias of all steps (T, B, 3H); q_all: Wy z_n + b (T, B, H), both saved by forward.
// g_y, g_z (B, H): enter as 0 and dL/dz_T, leave as dL/dy_0, dL/dz_0. Writes dU = d u_proj (T, B, 4H).
template <typename T>
void backward_loop(Sizes s, const T* grad_ys, const T* u, const T* a_h, const T* q_all, const T* y0, const T* ys,
                   const T* z0, const T* zs, const at::Tensor& w_hh, const at::Tensor& w_tz, const T* mask, T dt, T* g_y,
                   T* g_z, T* dU, const at::TensorOptions& opt) {
  const int64_t Tn = s.T, B = s.B, H = s.H;
  if (H <= kRowwiseMaxH) {
    // W_hh with a zero block where d u_proj has the cand-y column (dQ), so dU rows go in as they are
    const at::Tensor w4 = at::cat({w_hh.narrow(0, 0, 2 * H), at::zeros({H, H}, opt), w_hh.narrow(0, 2 * H, H)});
    with_fixed_h(H, [&](auto hc) {
      backward_rows<T, decltype(hc)::value>(s, grad_ys, u, a_h, q_all, y0, ys, z0, zs, w4.data_ptr<T>(),
                                            w_tz.data_ptr<T>(), mask, dt, g_y, g_z, dU);
    });
    return;
  }
  at::Tensor dzy = at::empty({B, H}, opt), dym = at::zeros({B, H}, opt);
  T* dzyp = dzy.data_ptr<T>(); T* dymp = dym.data_ptr<T>();
  for (int64_t n = Tn - 1; n >= 0; --n) {
    const int64_t r0 = n * B;
    const T* yp = n ? ys + (n - 1) * B * H : y0;  // y_{n-1}, z_{n-1}
    const T* zp = n ? zs + (n - 1) * B * H : z0;
    for_rows(B, H, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r = r0 + b;
        T* gy = g_y + b * H;
        const T* dymb = dymp + b * H;
        if (mask) for (int64_t j = 0; j < H; ++j) gy[j] += grad_ys[r * H + j] + dymb[j] * mask[b * H + j];
        else for (int64_t j = 0; j < H; ++j) gy[j] += grad_ys[r * H + j] + dymb[j];
        bwd_y(u + r * 4 * H, a_h + r * 3 * H, q_all + r * H, yp + b * H, gy, dU + r * 4 * H + 2 * H, dU + r * 4 * H, H, dt);
      }
    });
    at::mm_out(dzy, at::from_blob(dU + r0 * 4 * H + 2 * H, {B, H}, {4 * H, 1}, opt), w_tz);
    for_rows(B, H, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r = r0 + b;
        T* gz = g_z + b * H;
        for (int64_t j = 0; j < H; ++j) gz[j] += dzyp[b * H + j];
        bwd_z(u + r * 4 * H, a_h + r * 3 * H, zp + b * H, gz, dU + r * 4 * H, H, dt);
      }
    });
    // [gate y, gate z] and cand z of this step's d u_proj rows (strided views) into W_hh
    at::mm_out(dym, at::from_blob(dU + r0 * 4 * H, {B, 2 * H}, {4 * H, 1}, opt), w_hh.narrow(0, 0, 2 * H));
    dym.addmm_(at::from_blob(dU + r0 * 4 * H + 3 * H, {B, H}, {4 * H, 1}, opt), w_hh.narrow(0, 2 * H, H));
  }
  for (int64_t i = 0; i < B * H; ++i) g_y[i] += mask ? dymp[i] * mask[i] : dymp[i];
}

at::Tensor opt_mask(const c10::optional<at::Tensor>& mask) {
  return mask.has_value() && mask->defined() ? mask->contiguous() : at::Tensor();
}

template <typename T> T* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; }

void check(const at::Tensor& u_proj, const at::Tensor& y0) {
  TORCH_CHECK(u_proj.device().is_cpu(), "lem_cpu: tensors must be on the CPU");
  TORCH_CHECK(u_proj.dim() == 3 && u_proj.size(0) > 0 && u_proj.size(2) == 4 * y0.size(1),
              "lem_cpu: u_proj must be (T, B, 4H) with T > 0");
}

}  // namespace

// Returns ys (T, B, H), zs (T, B, H) and the saved products hs (T, B, 3H), qs (T, B, H) when keep_z,
// else ys and only z_T as (1, B, H).
std::vector<at::Tensor> lem_forward(at::Tensor u_proj, at::Tensor y0, at::Tensor z0, at::Tensor w_hh,
                                    at::Tensor b_hh, at::Tensor w_tz, at::Tensor b_tz,
                                    c10::optional<at::Tensor> mask_opt, double dt, bool keep_z) {
  check(u_proj, y0);
  u_proj = u_proj.contiguous(); w_hh = w_hh.contiguous(); w_tz = w_tz.contiguous();
  b_hh = b_hh.contiguous(); b_tz = b_tz.contiguous();
  const Sizes s{u_proj.size(0), u_proj.size(1), y0.size(1)};
  const at::Tensor mask = opt_mask(mask_opt);
  at::Tensor y = y0.contiguous().clone(), z = z0.contiguous().clone();
  at::Tensor ys = at::empty({s.T, s.B, s.H}, y.options());
  at::Tensor zs = keep_z ? at::empty({s.T, s.B, s.H}, y.options()) : at::Tensor();
  at::Tensor hs = keep_z ? at::empty({s.T, s.B, 3 * s.H}, y.options()) : at::Tensor();
  at::Tensor qs = keep_z ? at::empty({s.T, s.B, s.H}, y.options()) : at::Tensor();
  FlushDenormals ftz;
  AT_DISPATCH_FLOATING_TYPES(u_proj.scalar_type(), "lem_forward", [&] {
    forward_loop<scalar_t>(s, u_proj.data_ptr<scalar_t>(), w_hh, b_hh.data_ptr<scalar_t>(), w_tz,
                           b_tz.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(mask), static_cast<scalar_t>(dt),
                           y.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), ys.data_ptr<scalar_t>(),
                           ptr_or_null<scalar_t>(zs), ptr_or_null<scalar_t>(hs), ptr_or_null<scalar_t>(qs),
                           y.options());
  });
  if (keep_z) return {ys, zs, hs, qs};
  return {ys, z.unsqueeze(0)};
}

// Returns d u_proj (T, B, 4H), d y0, d z0, d w_hh, d b_hh, d w_tz, d b_tz.
std::vector<at::Tensor> lem_backward(at::Tensor grad_ys, c10::optional<at::Tensor> grad_zT, at::Tensor u_proj,
                                     at::Tensor ys, at::Tensor zs, at::Tensor a_h, at::Tensor q_all, at::Tensor y0, at::Tensor z0, at::Tensor w_hh,
                                     at::Tensor b_hh, at::Tensor w_tz, at::Tensor b_tz,
                                     c10::optional<at::Tensor> mask_opt, double dt) {
  check(u_proj, y0);
  u_proj = u_proj.contiguous(); grad_ys = grad_ys.contiguous(); ys = ys.contiguous(); zs = zs.contiguous();
  y0 = y0.contiguous(); z0 = z0.contiguous();
  w_hh = w_hh.contiguous(); w_tz = w_tz.contiguous();
  const int64_t T = u_proj.size(0), B = u_proj.size(1), H = y0.size(1);
  const at::Tensor mask = opt_mask(mask_opt);
  a_h = a_h.contiguous(); q_all = q_all.contiguous();
  FlushDenormals ftz;
  at::Tensor g_y = at::zeros({B, H}, y0.options());
  at::Tensor g_z = grad_zT.has_value() && grad_zT->defined() ? grad_zT->contiguous().clone() : at::zeros({B, H}, y0.options());
  // the loop writes every gradient of u_proj straight into its place: [gate y, gate z, cand y (dQ), cand z]
  at::Tensor d_u = at::empty({T, B, 4 * H}, y0.options());
  AT_DISPATCH_FLOATING_TYPES(u_proj.scalar_type(), "lem_backward", [&] {
    using T_ = scalar_t;
    backward_loop<T_>({T, B, H}, grad_ys.data_ptr<T_>(), u_proj.data_ptr<T_>(), a_h.data_ptr<T_>(),
                      q_all.data_ptr<T_>(), y0.data_ptr<T_>(), ys.data_ptr<T_>(), z0.data_ptr<T_>(),
                      zs.data_ptr<T_>(), w_hh, w_tz,
                      ptr_or_null<T_>(mask), static_cast<T_>(dt), g_y.data_ptr<T_>(), g_z.data_ptr<T_>(),
                      d_u.data_ptr<T_>(), y0.options());
  });
  // weight gradients: one GEMM each over all T·B rows
  const at::Tensor dU2 = d_u.view({T * B, 4 * H}), ys2 = ys.view({T * B, H});
  const at::Tensor dA_g = dU2.narrow(1, 0, 2 * H), dQ2 = dU2.narrow(1, 2 * H, H), dA_c = dU2.narrow(1, 3 * H, H);
  const at::Tensor ym_prev = mask.defined() ? at::cat({y0.unsqueeze(0), ys.narrow(0, 0, T - 1)}).mul_(mask).view({T * B, H})
                                            : at::Tensor();
  auto times_ym_prev = [&](at::Tensor out, const at::Tensor& d) {  // out = d^T (y_{n-1} ⊙ mask) over all T·B rows
    if (ym_prev.defined()) { at::mm_out(out, d.t(), ym_prev); return; }
    at::mm_out(out, d.narrow(0, 0, B).t(), y0);  // y_{n-1} = y0, then ys shifted by one step: no copy
    if (T > 1) out.addmm_(d.narrow(0, B, (T - 1) * B).t(), ys2.narrow(0, 0, (T - 1) * B));
  };
  at::Tensor d_whh = at::empty({3 * H, H}, y0.options());
  times_ym_prev(d_whh.narrow(0, 0, 2 * H), dA_g);
  times_ym_prev(d_whh.narrow(0, 2 * H, H), dA_c);
  const at::Tensor d_b = dU2.sum(0);  // one pass for both biases: [gate y, gate z | cand y | cand z]
  const at::Tensor d_bhh = at::cat({d_b.narrow(0, 0, 2 * H), d_b.narrow(0, 3 * H, H)});
  return {d_u, g_y, g_z, d_whh, d_bhh, at::mm(dQ2.t(), zs.view({T * B, H})), d_b.narrow(0, 2 * H, H).clone()};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &lem_forward, "fused LEM forward (CPU)");
  m.def("backward", &lem_backward, "fused LEM backward (CPU)");
}
