// Fused CPU LEM (docs/paper.md §1): the whole layer, forward and backward, in one C++ call each.
//
// The input projection x W_in^T is computed as the loop goes (per step and block of rows, or per block
// of steps), never as one (T, B, 4H) buffer. Per step the two recurrent products (y_{n-1} into
// hid2hid, z_n into transform_z) follow; the elementwise work of a step is one plain loop per half-step.
// Two strategies for those products:
//   - small H: batch rows are independent over the whole sequence, so each thread takes some rows
//     and runs all T steps for them with hand-written mat-vecs (weights stay in L1/L2, no
//     per-step synchronisation or library call);
//   - larger H: one ATen GEMM per product and step over the whole batch.
// Forward keeps, per step, y_n, z_n and the four activations (two gates, two candidates), so backward
// computes no exp/tanh and no recurrent product of the forward again: it runs only the reverse loop
// (one product back through transform_z and one through hid2hid per step) and then forms the weight
// gradients as GEMMs over all T·B rows. The bias gradients are summed inside the loop.
//
// Layouts (chunks of H, the table in lem/kernels/reference.py): inp2hid (4H), the saved activations and
// d u_proj = INP2HID_BLOCKS [gate y, gate z, cand y, cand z]; hid2hid (3H) = [gate y, gate z, cand z];
// transform_z (H) = cand y.
//
// Per-row lengths (a PackedSequence, lem/nn.py): row b runs lengths[b] steps; after them its y and
// z stay as they are (the outputs repeat y), its activations are not computed, and in backward
// its rows of d u_proj are zero (so the weight gradients get nothing from those steps) while
// dL/dy_n flows unchanged into the frozen state. Every loop takes this as a template flag LEN,
// so without lengths the code (and every bit it computes) is what it was without them.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <list>
#include <mutex>
#include <type_traits>
#include <vector>
#if defined(__SSE2__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

constexpr int64_t kRowwiseMaxH = 64;  // up to this H the per-row strategy beats per-step GEMMs

// Flush-to-zero and denormals-are-zero for the calling thread while alive. Gradients through long
// sequences decay into denormal floats (below 1.2e-38), on which x86 arithmetic is many times slower
// (measured in docs/kernels.md). Results change only for values below 1.2e-38.
struct FlushDenormals {
#if defined(__SSE2__)
  unsigned csr = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(csr | 0x8040); }  // FTZ (bit 15) | DAZ (bit 6)
  ~FlushDenormals() { _mm_setcsr(csr); }
#endif
};

// ---- a cache of the large (T, B, ·) buffers ----
// A training loop asks for the same large sizes in every iteration, and fresh memory from the kernel
// costs a page fault and a page clear per page: at sMNIST size (T 784, B 128, H 128) that was about a
// third of a forward+backward. Like PyTorch's CUDA caching allocator, buffers freed by their tensors
// wait here for the next request of the same size (least recently freed ones go first beyond
// kCacheBytes; cpu.empty_cache() hands all back). New blocks are 2 MiB aligned and backed by
// transparent huge pages where Linux offers them (one fault per 2 MiB instead of per 4 KiB).
class LargeBuffers {
 public:
  static constexpr size_t kMinBytes = size_t(1) << 20, kCacheBytes = size_t(2) << 30, kHuge = size_t(2) << 20;

  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& opt) {
    const size_t nbytes = c10::multiply_integers(sizes) * opt.dtype().itemsize();
    if (nbytes < kMinBytes) return at::empty(sizes, opt);  // small ones: malloc reuses its heap anyway
    void* p = take(nbytes);
    if (!p) p = fresh(nbytes);
    return at::from_blob(p, sizes, [this, nbytes](void* q) { give(q, nbytes); }, opt);
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& block : free_) std::free(block.second);
    free_.clear();
    cached_ = 0;
  }

 private:
  void* take(size_t nbytes) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->first != nbytes) continue;
      void* p = it->second;
      free_.erase(it);
      cached_ -= nbytes;
      return p;
    }
    return nullptr;
  }

  void give(void* p, size_t nbytes) {  // the deleter of the tensors from empty(); any thread
    std::lock_guard<std::mutex> lock(mu_);
    free_.emplace_front(nbytes, p);
    cached_ += nbytes;
    while (cached_ > kCacheBytes) {
      cached_ -= free_.back().first;
      std::free(free_.back().second);
      free_.pop_back();
    }
  }

  static void* fresh(size_t nbytes) {
    const size_t rounded = (nbytes + kHuge - 1) / kHuge * kHuge;
    void* p = nullptr;
    TORCH_CHECK(posix_memalign(&p, kHuge, rounded) == 0, "lem_cpu: out of memory allocating ", nbytes, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, rounded, MADV_HUGEPAGE);  // a hint: failure is harmless
#endif
    return p;
  }

  std::mutex mu_;
  std::list<std::pair<size_t, void*>> free_;  // most recently freed first
  size_t cached_ = 0;
};

LargeBuffers& large_buffers() {
  static auto* buffers = new LargeBuffers;  // never destroyed: tensors may outlive static destruction
  return *buffers;
}

at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& opt) { return large_buffers().empty(sizes, opt); }

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

// float32 rounded to bfloat16 (to nearest even; a NaN stays a NaN) and back, in integer arithmetic
// that the loops vectorise (ATen's dtype-converting copy_ was slower: docs/kernels.md, low precision)
inline c10::BFloat16 round_to_low(float v, c10::BFloat16*) {
  const uint32_t u = __builtin_bit_cast(uint32_t, v);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return c10::BFloat16((u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t(0x7FC0) : uint16_t(rounded), c10::BFloat16::from_bits());
}
inline c10::Half round_to_low(float v, c10::Half*) { return c10::Half(v); }
inline float widen(c10::BFloat16 v) { return __builtin_bit_cast(float, uint32_t(v.x) << 16); }
inline float widen(c10::Half v) { return static_cast<float>(v); }
template <typename T> inline T widen(T v) { return v; }
// v in the products' dtype P (the loop's own: v itself)
template <typename P, typename T> inline P to_products(T v) {
  if constexpr (std::is_same_v<P, T>) return v; else return round_to_low(v, static_cast<P*>(nullptr));
}

// Calls f(b0, full) for blocks of RB rows (full) and then the leftover single rows.
template <int RB, typename F> inline void for_row_blocks(int64_t B, int64_t work_per_row, const F& f) {
  const int64_t blocks = B / RB, grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(work_per_row, 1));
  at::parallel_for(0, blocks, grain, [&](int64_t i0, int64_t i1) {
    FlushDenormals ftz;
    for (int64_t i = i0; i < i1; ++i) f(i * RB, true);
  });
  for (int64_t b = blocks * RB; b < B; ++b) f(b, false);
}

template <typename F> inline void for_rows(int64_t B, int64_t work_per_row, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(work_per_row, 1));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) { FlushDenormals ftz; f(b0, b1); });
}

// out[r][j] = sum_k v[r][k] m[k][j] for R rows at once (row stride of v: ldv, default K), m (K, N)
// row-major; tiles of R x (48, 16 or 8) outputs stay in registers while the weights stream from L1.
#if defined(__AVX2__) && defined(__FMA__)
// The float case with explicit AVX2 tiles of R x 16 and R x 8 outputs (on AVX-512 CPUs only the
// columns the AVX-512 tiles leave); the compiler's own vectorisation of the generic loop below mixed
// in scalar FMAs and shuffles.
template <int R>
inline int64_t rows_vecmat_avx2(const float* __restrict v, const float* __restrict m,
                                float* __restrict out, int64_t K, int64_t N, int64_t ldv, int64_t j0) {
  for (; j0 + 16 <= N; j0 += 16) {
    __m256 a0[R], a1[R];
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
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
    for (int r = 0; r < R; ++r) a[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
      const __m256 w = _mm256_loadu_ps(m + k * N + j0);
      for (int r = 0; r < R; ++r) a[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(v + r * ldv + k), w, a[r]);
    }
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + r * N + j0, a[r]);
  }
  return j0;  // columns done; the caller finishes the rest
}
#endif

#if defined(__AVX512F__)
// With AVX-512: tiles of R x 48 outputs (3R accumulators; the 32 vector registers hold them), then
// R x 16 with the sum over k split into even and odd k, so that enough independent FMA chains hide
// the FMA latency in the narrow products of the backward (N = H). InOrder leaves the R x 16 tiles out
// (the AVX2 ones sum in order).
template <int R, bool InOrder>
inline int64_t rows_vecmat_avx512(const float* __restrict v, const float* __restrict m,
                                  float* __restrict out, int64_t K, int64_t N, int64_t ldv) {
  int64_t j0 = 0;
  for (; j0 + 48 <= N; j0 += 48) {
    __m512 a0[R], a1[R], a2[R];
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = a2[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
      const float* mk = m + k * N + j0;
      const __m512 w0 = _mm512_loadu_ps(mk), w1 = _mm512_loadu_ps(mk + 16), w2 = _mm512_loadu_ps(mk + 32);
      for (int r = 0; r < R; ++r) {
        const __m512 x = _mm512_set1_ps(v[r * ldv + k]);
        a0[r] = _mm512_fmadd_ps(x, w0, a0[r]);
        a1[r] = _mm512_fmadd_ps(x, w1, a1[r]);
        a2[r] = _mm512_fmadd_ps(x, w2, a2[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm512_storeu_ps(out + r * N + j0, a0[r]);
      _mm512_storeu_ps(out + r * N + j0 + 16, a1[r]);
      _mm512_storeu_ps(out + r * N + j0 + 32, a2[r]);
    }
  }
  if constexpr (InOrder) return j0;
  for (; j0 + 16 <= N; j0 += 16) {
    __m512 even[R], odd[R];
    for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 2 <= K; k += 2) {
      const __m512 w0 = _mm512_loadu_ps(m + k * N + j0), w1 = _mm512_loadu_ps(m + (k + 1) * N + j0);
      for (int r = 0; r < R; ++r) {
        even[r] = _mm512_fmadd_ps(_mm512_set1_ps(v[r * ldv + k]), w0, even[r]);
        odd[r] = _mm512_fmadd_ps(_mm512_set1_ps(v[r * ldv + k + 1]), w1, odd[r]);
      }
    }
    if (k < K) {
      const __m512 w = _mm512_loadu_ps(m + k * N + j0);
      for (int r = 0; r < R; ++r) even[r] = _mm512_fmadd_ps(_mm512_set1_ps(v[r * ldv + k]), w, even[r]);
    }
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * N + j0, _mm512_add_ps(even[r], odd[r]));
  }
  return j0;  // columns done; the AVX2 tiles go on from here
}
#endif

// InOrder: every output is the sum over k = 0, 1, ... in that order, one FMA per term, which is what
// MKL's sgemm computes for many rows: the input projection (x W_in^T) gets the bits of the one GEMM
// over all T·B rows the kernel ran before it was done step by step.
template <int R, bool InOrder = false, typename T>
inline void rows_vecmat(const T* __restrict v, const T* __restrict m, T* __restrict out,
                        int64_t K, int64_t N, int64_t ldv = 0) {
  if (ldv == 0) ldv = K;
  constexpr int W = 8;
  int64_t j0 = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<T, float>) {
#if defined(__AVX512F__)
    j0 = rows_vecmat_avx512<R, InOrder>(v, m, out, K, N, ldv);
#endif
    j0 = rows_vecmat_avx2<R>(v, m, out, K, N, ldv, j0);
  }
#endif
  for (; j0 + W <= N; j0 += W) {
    T acc[R][W];
    for (int r = 0; r < R; ++r)
      for (int jj = 0; jj < W; ++jj) acc[r][jj] = T(0);
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
      T acc = T(0);
      for (int64_t k = 0; k < K; ++k) acc += v[r * ldv + k] * m[k * N + j0];
      out[r * N + j0] = acc;
    }
}

// ---- the elementwise half-steps of one batch row ----
// u: the row's 4H of x W_in^T; h: its y_{n-1} ⊙ mask times W_hh^T (3H); bias: all biases summed in
// the chunk order of u_proj (4H, docs/paper.md §1: both linears' biases add up); act: the row's 4H saved
// activations [σ gate y, σ gate z, tanh cand y, tanh cand z], the same order.
// Backward needs only these four values per unit, so it does no exp/tanh of its own.
// (h and q in the products' dtype P: see forward_gemm)
template <typename T, typename P>
inline void fwd_z(const T* __restrict u, const P* __restrict h, const T* __restrict bias, const T* __restrict zp,
                  T* __restrict z, T* __restrict act, int64_t H, T dt) {
  for (int64_t j = 0; j < H; ++j) {  // z_n = (1 − Δt_n) z_{n-1} + Δt_n tanh(Wz y + Vz u + bz)
    const T s = sigmoid(u[H + j] + widen(h[H + j]) + bias[H + j]);
    const T c = tanh_(u[3 * H + j] + widen(h[2 * H + j]) + bias[3 * H + j]);
    z[j] = (T(1) - dt * s) * zp[j] + dt * s * c;
    act[H + j] = s;
    act[3 * H + j] = c;
  }
}

// q: the row's z_n times W_tz^T (H)
template <typename T, typename P>
inline void fwd_y(const T* __restrict u, const P* __restrict h, const T* __restrict bias, const P* __restrict q,
                  const T* __restrict yp, T* __restrict y, T* __restrict act, int64_t H, T dt) {
  for (int64_t j = 0; j < H; ++j) {  // y_n = (1 − Δt̄_n) y_{n-1} + Δt̄_n tanh(Wy z_n + Vy u + by)
    const T s = sigmoid(u[j] + widen(h[j]) + bias[j]);
    const T c = tanh_(u[2 * H + j] + widen(q[j]) + bias[2 * H + j]);
    y[j] = (T(1) - dt * s) * yp[j] + dt * s * c;
    act[j] = s;
    act[2 * H + j] = c;
  }
}

// g_y: dL/dy_n (in), becomes the leak part of dL/dy_{n-1}; writes the y parts of the row's d u_proj
// (gate y at 0, cand y at 2H, which is also d transform_z-output).
template <typename T, typename P>
inline void bwd_y(const T* __restrict act, const T* __restrict yp, T* __restrict g_y, P* __restrict dU, int64_t H, T dt) {
  for (int64_t j = 0; j < H; ++j) {
    const T s = act[j], c = act[2 * H + j], g = g_y[j];
    dU[j] = to_products<P>(g * (c - yp[j]) * dt * s * (T(1) - s));
    dU[2 * H + j] = to_products<P>(g * dt * s * (T(1) - c * c));
    g_y[j] = g * (T(1) - dt * s);
  }
}

// g_z: dL/dz_n (in, already including Wy^T dq), becomes dL/dz_{n-1}; writes the z parts (gate z at H,
// cand z at 3H).
template <typename T, typename P>
inline void bwd_z(const T* __restrict act, const T* __restrict zp, T* __restrict g_z, P* __restrict dU, int64_t H, T dt) {
  for (int64_t j = 0; j < H; ++j) {
    const T s = act[H + j], c = act[3 * H + j], g = g_z[j];
    dU[H + j] = to_products<P>(g * (c - zp[j]) * dt * s * (T(1) - s));
    dU[3 * H + j] = to_products<P>(g * dt * s * (T(1) - c * c));
    g_z[j] = g * (T(1) - dt * s);
  }
}

template <typename T> inline void times_mask(const T* __restrict v, const T* __restrict mask, T* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = v[i] * mask[i];
}

struct Sizes { int64_t T, B, H; };

// The forward's pointers. x (T, B, I) is the input; ys, zs (T, B, H) and acts (T, B, 4H) are
// written step by step. Without a backward to feed, zs and acts are null: z_n and the activations go
// to scratch, and z_T ends in z_tmp (2, B, H) (see lem_forward).
template <typename T> struct Forward {
  const T *x, *y0, *z0, *bias, *mask;
  const int64_t* len;  // per-row lengths, or null
  int64_t I;
  T dt;
  T *ys, *zs, *acts, *z_tmp;
};

// f(std::integral_constant<int, HC>) with HC = H for the sizes of the paper's small models, else 0.
template <typename F> inline void with_fixed_h(int64_t H, const F& f) {
  switch (H) {
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    default: f(std::integral_constant<int, 0>{});
  }
}

// rows(R, b0) for every block of R rows of the forward: blocks of 8 rows run faster than blocks of 4
// (more independent FMA chains per weight load, docs/kernels.md) when there are enough of them to keep
// every thread busy, else blocks of 4; leftover rows one by one. Every row's arithmetic is the same.
template <typename F> void forward_row_blocks(int64_t B, int64_t work_per_row, const F& rows) {
  auto blocks_of = [&](auto r_const) {
    for_row_blocks<decltype(r_const)::value>(B, work_per_row, [&](int64_t b0, bool full) {
      if (full) rows(r_const, b0); else rows(std::integral_constant<int, 1>{}, b0);
    });
  };
  if (B >= 8 * at::get_num_threads()) blocks_of(std::integral_constant<int, 8>{});
  else blocks_of(std::integral_constant<int, 4>{});
}

// The per-row strategy (H <= kRowwiseMaxH). HC > 0 fixes H at compile time: with known trip
// counts the tiny inner loops unroll and vectorise fully (docs/kernels.md); HC = 0 is any H.
// win_t (I, 4H), whh_t (H, 3H) and wtz_t (H, H) are the transposed weights. Each step's input
// projection is computed here for the R rows (in k order, so it has the bits of one big GEMM), so
// nothing of size T·B·4H is written or read.
template <typename T, int HC, bool LEN>
void forward_rows(Sizes s, const Forward<T>& f, const T* win_t, const T* whh_t, const T* wtz_t) {
  const int64_t Tn = s.T, B = s.B, H = HC > 0 ? HC : s.H, I = f.I;
  // rows b0..b0+R-1 over all T steps; the R rows of one step are contiguous in every (T, B, ·) buffer
  auto rows = [&](auto r_const, int64_t b0) {
    constexpr int R = decltype(r_const)::value;
    T u[R * 4 * kRowwiseMaxH], h[R * 3 * kRowwiseMaxH], q[R * kRowwiseMaxH], ym[R * kRowwiseMaxH];
    T a_own[R * 4 * kRowwiseMaxH], z_own[2][R * kRowwiseMaxH];
    const T* mb = f.mask ? f.mask + b0 * H : nullptr;
    const T* yp = f.y0 + b0 * H;
    const T* zp = f.z0 + b0 * H;
    const int64_t* len = LEN ? f.len + b0 : nullptr;
    // with lengths, every row of the block runs up to step n_all, some up to n_end, none after
    const int64_t n_all = LEN ? *std::min_element(len, len + R) : Tn;
    const int64_t n_end = LEN ? *std::max_element(len, len + R) : Tn;
    auto step = [&](int64_t n, auto some_ended) {
      constexpr bool ENDED = decltype(some_ended)::value;  // check each row's length at this step
      const int64_t row = n * B + b0;
      T* y = f.ys + row * H;
      T* z = f.zs ? f.zs + row * H : z_own[n & 1];
      T* a = f.acts ? f.acts + row * 4 * H : a_own;
      rows_vecmat<R, true>(f.x + row * I, win_t, u, I, 4 * H);
      if (mb) times_mask(yp, mb, ym, R * H);
      rows_vecmat<R>(mb ? ym : yp, whh_t, h, H, 3 * H);
      for (int r = 0; r < R; ++r) {
        if (ENDED && n >= len[r]) std::memcpy(z + r * H, zp + r * H, H * sizeof(T));  // frozen: z_n = z_{n-1}
        else fwd_z(u + r * 4 * H, h + r * 3 * H, f.bias, zp + r * H, z + r * H, a + r * 4 * H, H, f.dt);
      }
      rows_vecmat<R>(z, wtz_t, q, H, H);
      for (int r = 0; r < R; ++r) {
        if (ENDED && n >= len[r]) std::memcpy(y + r * H, yp + r * H, H * sizeof(T));
        else fwd_y(u + r * 4 * H, h + r * 3 * H, f.bias, q + r * H, yp + r * H, y + r * H, a + r * 4 * H, H, f.dt);
      }
      yp = y;
      zp = z;
    };
    int64_t n = 0;
    for (; n < n_all; ++n) step(n, std::false_type{});
    for (; n < n_end; ++n) step(n, std::true_type{});
    for (; n < Tn; ++n) {  // (LEN only) every row of the block has ended: y and z repeat
      const int64_t row = n * B + b0;
      std::memcpy(f.ys + row * H, yp, R * H * sizeof(T));
      yp = f.ys + row * H;
      if (f.zs) {
        std::memcpy(f.zs + row * H, zp, R * H * sizeof(T));
        zp = f.zs + row * H;
      }
    }
    if (!f.zs) std::memcpy(f.z_tmp + b0 * H, zp, R * H * sizeof(T));  // z_T of these rows
  };
  forward_row_blocks(B, Tn * 8 * H * H, rows);
}

// The per-step GEMM strategy (H > kRowwiseMaxH): the GEMMs write into (B, ·) scratch that stays in cache.
// The input projection runs as one GEMM per block of steps (about kProjectionBytes of it, so it
// stays in L2, but at least kProjectionRows rows; the last block takes the leftover steps too), into a
// buffer reused by every block. MKL's sgemm gives these blocks the bits of one GEMM over all T·B rows
// (checked on the experiments' shapes); with very few rows it may pick kernels that sum in another order.
constexpr int64_t kProjectionBytes = int64_t(1) << 20, kProjectionRows = 256;

// With lengths, live[n] is 1 + the last row still running at step n: the rows after it have all
// ended, so the step's GEMMs take only the first live[n] rows (all of a PackedSequence's running
// rows, which come longest first).
std::vector<int64_t> live_rows(const int64_t* len, int64_t T, int64_t B) {
  std::vector<int64_t> live(T, 0);
  for (int64_t b = 0; b < B; ++b) live[len[b] - 1] = std::max(live[len[b] - 1], b + 1);
  for (int64_t n = T - 1; n > 0; --n) live[n - 1] = std::max(live[n - 1], live[n]);
  return live;
}

// The first n rows of a (B, ·) scratch tensor (the tensor itself when n is all of them)
at::Tensor first_rows(const at::Tensor& t, int64_t n) { return n == t.size(0) ? t : t.narrow(0, 0, n); }

bool is_low(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

// out = a · w (add: out += a · w) for out in the loop's dtype and w (K, N) in the products' dtype. Where
// that is the loop's own, one at::mm_out / addmm_. Under mixed precision (w in bfloat16 or float16, the
// loop in float32) a is rounded into a scratch buffer of w's dtype, unless it is in it already, and the
// product goes into another one, then is widened into out: at::mm on CPU writes its result in its inputs'
// dtype (torch 2.9 has no CPU kernel of aten::mm.dtype); inside, oneDNN sums in float32 (on AMX tiles
// for bfloat16 where the CPU has them). The scratch holds up to `rows` rows of a.
class Product {
 public:
  Product(at::Tensor w, int64_t rows) : w_(std::move(w)), rows_(rows) {}

  void operator()(at::Tensor out, const at::Tensor& a, bool add = false) {
    if (out.scalar_type() == w_.scalar_type()) {
      if (add) out.addmm_(a, w_); else at::mm_out(out, a, w_);
    } else if (w_.scalar_type() == at::kBFloat16) {
      mixed<c10::BFloat16>(out, a, add);
    } else {
      mixed<c10::Half>(out, a, add);
    }
  }

 private:
  template <typename L> void mixed(const at::Tensor& out, const at::Tensor& a, bool add) {
    TORCH_CHECK(out.scalar_type() == at::kFloat && a.stride(1) == 1 && out.stride(1) == 1, "lem_cpu: a mixed product's layout");
    const int64_t n = a.size(0), K = w_.size(0), N = w_.size(1);
    if (!p_low_.defined()) p_low_ = at::empty({rows_, N}, w_.options());
    at::Tensor a_low = a;
    if (a.scalar_type() == at::kFloat) {
      if (!a_low_.defined()) a_low_ = at::empty({rows_, K}, w_.options());
      const float* src = a.data_ptr<float>();
      L* dst = a_low_.data_ptr<L>();
      const int64_t ld = a.stride(0);
      for_rows(n, K, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b)
          for (int64_t k = 0; k < K; ++k) dst[b * K + k] = round_to_low(src[b * ld + k], dst);
      });
      a_low = first_rows(a_low_, n);
    }
    at::Tensor p = first_rows(p_low_, n);
    at::mm_out(p, a_low, w_);
    const L* q = p.data_ptr<L>();
    float* o = out.data_ptr<float>();
    const int64_t ld = out.stride(0);
    for_rows(n, N, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        if (add) for (int64_t j = 0; j < N; ++j) o[b * ld + j] += widen(q[b * N + j]);
        else for (int64_t j = 0; j < N; ++j) o[b * ld + j] = widen(q[b * N + j]);
      }
    });
  }

  at::Tensor w_, a_low_, p_low_;
  int64_t rows_;
};

// out = v ⊙ mask (mask null: v) in the products' dtype: a GEMM input
template <typename T, typename P> inline void gemm_input(const T* __restrict v, const T* __restrict mask, P* __restrict out, int64_t n) {
  if (mask) for (int64_t i = 0; i < n; ++i) out[i] = to_products<P>(v[i] * mask[i]);
  else for (int64_t i = 0; i < n; ++i) out[i] = to_products<P>(v[i]);
}

// x2 (T·B, I) is x in the products' dtype P; w_in_t (I, 4H), w_hh_t (H, 3H), w_tz_t (H, H) the transposed
// weights in it. With P = T the products read y_{n-1} (or y_{n-1} ⊙ mask) and z_n where the loop wrote
// them; under mixed precision the loop also writes both, rounded, into (B, H) buffers of P, and the
// step's loops read the products' results in P (at::mm writes them in its inputs' dtype).
template <typename T, typename P, bool LEN>
void forward_gemm(Sizes s, const Forward<T>& f, const at::Tensor& x2, const at::Tensor& w_in_t, const at::Tensor& w_hh_t,
                  const at::Tensor& w_tz_t, const at::TensorOptions& opt) {
  constexpr bool MIXED = !std::is_same_v<T, P>;
  const int64_t Tn = s.T, B = s.B, H = s.H;
  const int64_t steps = std::clamp<int64_t>(std::max(kProjectionBytes / (B * 4 * H * int64_t(sizeof(T))),
                                                     (kProjectionRows + B - 1) / B), 1, Tn);
  const int64_t last_block = (Tn / steps - 1) * steps;  // first step of the last block
  const auto p_opt = opt.dtype(c10::CppTypeToScalarType<P>::value);
  at::Tensor u_block = at::empty({(Tn - last_block) * B, 4 * H}, opt);
  at::Tensor h = at::empty({B, 3 * H}, p_opt), q = at::empty({B, H}, p_opt), ym = at::empty({B, H}, p_opt);
  at::Tensor z_low = MIXED ? at::empty({B, H}, p_opt) : at::Tensor();
  // without a backward, each thread writes the activations of all its rows into one 4H scratch (in L1)
  at::Tensor scratch = f.acts ? at::Tensor() : at::empty({at::get_num_threads(), 4 * H}, opt);
  Product projection(w_in_t, u_block.size(0));
  P *hp = h.data_ptr<P>(), *qp = q.data_ptr<P>(), *ymp = ym.data_ptr<P>(), *zlp = MIXED ? z_low.data_ptr<P>() : nullptr;
  auto acts_of = [&](int64_t n, int64_t b) {
    return f.acts ? f.acts + (n * B + b) * 4 * H : scratch.data_ptr<T>() + at::get_thread_num() * 4 * H;
  };
  const T* yp = f.y0;
  const T* zp = f.z0;
  const T* u_steps = nullptr;  // the projection of step n is u_steps + n * B * 4H
  const std::vector<int64_t> live = LEN ? live_rows(f.len, Tn, B) : std::vector<int64_t>();
  const bool y_copy = MIXED || f.mask;  // the products read y_{n-1} from ym
  if (y_copy) gemm_input(yp, f.mask, ymp, B * H);
  for (int64_t n = 0; n < Tn; ++n) {
    if (n % steps == 0 && n <= last_block) {
      const int64_t rows = (n == last_block ? Tn - n : steps) * B;
      at::Tensor u_rows = u_block.narrow(0, 0, rows);
      projection(u_rows, x2.narrow(0, n * B, rows));
      u_steps = u_block.data_ptr<T>() - n * B * 4 * H;
    }
    const T* u = u_steps + n * B * 4 * H;
    T* y = f.ys + n * B * H;
    T* z = f.zs ? f.zs + n * B * H : f.z_tmp + (n & 1) * B * H;
    const int64_t Bn = LEN ? live[n] : B;  // the rows from Bn on have ended
    at::Tensor h_rows = first_rows(h, Bn), q_rows = first_rows(q, Bn);
    P* y_in = y_copy ? ymp : reinterpret_cast<P*>(const_cast<T*>(yp));  // (not y_copy: P is T)
    if (Bn) at::mm_out(h_rows, at::from_blob(y_in, {Bn, H}, p_opt), w_hh_t);
    for_rows(B, H, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        if (LEN && n >= f.len[b]) std::memcpy(z + b * H, zp + b * H, H * sizeof(T));  // frozen: z_n = z_{n-1}
        else fwd_z(u + b * 4 * H, hp + b * 3 * H, f.bias, zp + b * H, z + b * H, acts_of(n, b), H, f.dt);
        if (MIXED) gemm_input<T, P>(z + b * H, nullptr, zlp + b * H, H);
      }
    });
    if (Bn) at::mm_out(q_rows, at::from_blob(MIXED ? zlp : reinterpret_cast<P*>(z), {Bn, H}, p_opt), w_tz_t);
    for_rows(B, H, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        if (LEN && n >= f.len[b]) std::memcpy(y + b * H, yp + b * H, H * sizeof(T));
        else fwd_y(u + b * 4 * H, hp + b * 3 * H, f.bias, qp + b * H, yp + b * H, y + b * H, acts_of(n, b), H, f.dt);
        if (y_copy) gemm_input(y + b * H, f.mask ? f.mask + b * H : nullptr, ymp + b * H, H);  // the next step's GEMM input
      }
    });
    yp = y;
    zp = z;
  }
}

// forward_gemm with products in P (mixed precision: float32 loops only)
template <typename T, typename P, bool LEN>
void forward_gemm_low(Sizes s, const Forward<T>& f, const at::Tensor& x2, const at::Tensor& w_in_t,
                      const at::Tensor& w_hh_t, const at::Tensor& w_tz_t, const at::TensorOptions& opt) {
  if constexpr (std::is_same_v<T, float>) forward_gemm<T, P, LEN>(s, f, x2, w_in_t, w_hh_t, w_tz_t, opt);
  else TORCH_CHECK(false, "lem_cpu: mixed precision runs float32 loops");
}

// The backward's pointers. g_y, g_z (B, H) enter as 0 and dL/dz_T and leave as dL/dy_0, dL/dz_0;
// dU = d u_proj (T, B, 4H) is written row by row, and its rows are summed over T into db (B, 4H) while
// they are in cache (the bias gradients are the column sums of dU).
// Under mixed precision (the GEMM strategy) dU is in the products' dtype P.
template <typename T, typename P = T> struct Backward {
  const T *grad_ys, *acts, *y0, *ys, *z0, *zs, *mask;
  const int64_t* len;  // per-row lengths, or null
  T dt;
  T *g_y, *g_z;
  P* dU;
  T* db;
};

template <typename T, typename P> inline void add_to(T* __restrict acc, const P* __restrict v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += widen(v[i]);
}

// whh4 (4H, H): W_hh with a zero block where a d u_proj row has its cand-y column, so dU rows go in as they are
template <typename T, int HC, bool LEN>
void backward_rows(Sizes s, const Backward<T>& g, const T* whh4, const T* wtz) {
  const int64_t Tn = s.T, B = s.B, H = HC > 0 ? HC : s.H;
  auto rows = [&](auto r_const, int64_t b0) {
    constexpr int R = decltype(r_const)::value;
    T dzy[R * kRowwiseMaxH], dym[R * kRowwiseMaxH];
    T* gy = g.g_y + b0 * H;
    T* gz = g.g_z + b0 * H;
    const T* mb = g.mask ? g.mask + b0 * H : nullptr;
    const int64_t* len = LEN ? g.len + b0 : nullptr;
    // with lengths, every row of the block runs up to step n_all, some up to n_end, none after
    const int64_t n_all = LEN ? *std::min_element(len, len + R) : Tn;
    const int64_t n_end = LEN ? *std::max_element(len, len + R) : Tn;
    std::fill(dym, dym + R * H, T(0));
    auto step = [&](int64_t n, auto some_ended) {
      constexpr bool ENDED = decltype(some_ended)::value;  // check each row's length at this step
      const int64_t row = n * B + b0;  // R consecutive rows of step n
      const T* yp = (n ? g.ys + (n - 1) * B * H : g.y0) + b0 * H;  // y_{n-1}, z_{n-1} of these rows
      const T* zp = (n ? g.zs + (n - 1) * B * H : g.z0) + b0 * H;
      const T* a = g.acts + row * 4 * H;
      T* dU = g.dU + row * 4 * H;
      for (int64_t i = 0; i < R * H; ++i) gy[i] += g.grad_ys[row * H + i] + (mb ? dym[i] * mb[i] : dym[i]);
      for (int r = 0; r < R; ++r) {
        if (ENDED && n >= len[r]) std::fill(dU + r * 4 * H, dU + (r + 1) * 4 * H, T(0));  // frozen row
        else bwd_y(a + r * 4 * H, yp + r * H, gy + r * H, dU + r * 4 * H, H, g.dt);
      }
      rows_vecmat<R>(dU + 2 * H, wtz, dzy, H, H, 4 * H);
      for (int64_t i = 0; i < R * H; ++i) gz[i] += dzy[i];
      for (int r = 0; r < R; ++r) {
        if (!(ENDED && n >= len[r])) bwd_z(a + r * 4 * H, zp + r * H, gz + r * H, dU + r * 4 * H, H, g.dt);
      }
      add_to(g.db + b0 * 4 * H, dU, R * 4 * H);
      rows_vecmat<R>(dU, whh4, dym, 4 * H, H);
    };
    for (int64_t n = Tn - 1; n >= n_end; --n) {  // (LEN only) every row frozen: dL/dy_n goes on unchanged
      const int64_t row = n * B + b0;
      for (int64_t i = 0; i < R * H; ++i) gy[i] += g.grad_ys[row * H + i];
      std::fill(g.dU + row * 4 * H, g.dU + (row + R) * 4 * H, T(0));
    }
    for (int64_t n = n_end - 1; n >= n_all; --n) step(n, std::true_type{});
    for (int64_t n = n_all - 1; n >= 0; --n) step(n, std::false_type{});
    for (int64_t i = 0; i < R * H; ++i) gy[i] += mb ? dym[i] * mb[i] : dym[i];
  };
  for_row_blocks<4>(B, Tn * 8 * H * H, [&](int64_t b0, bool full) {
    if (full) rows(std::integral_constant<int, 4>{}, b0); else rows(std::integral_constant<int, 1>{}, b0);
  });
}

// With lengths, the rows from live[n] on have ended at step n: the GEMMs skip them, and their rows of
// dym stay zero (from the start of the reverse loop to step n they have been frozen all along).
template <typename T, typename P, bool LEN>
void backward_gemm(Sizes s, const Backward<T, P>& g, const at::Tensor& w_hh, const at::Tensor& w_tz, const at::TensorOptions& opt) {
  const int64_t Tn = s.T, B = s.B, H = s.H;
  const auto p_opt = opt.dtype(c10::CppTypeToScalarType<P>::value);
  at::Tensor dzy = at::empty({B, H}, opt), dym = at::zeros({B, H}, opt);
  Product from_y(w_tz, B), gates_to_y(w_hh.narrow(0, 0, 2 * H), B), cand_z_to_y(w_hh.narrow(0, 2 * H, H), B);
  T *dzyp = dzy.data_ptr<T>(), *dymp = dym.data_ptr<T>();
  const std::vector<int64_t> live = LEN ? live_rows(g.len, Tn, B) : std::vector<int64_t>();
  for (int64_t n = Tn - 1; n >= 0; --n) {
    const int64_t r0 = n * B, Bn = LEN ? live[n] : B;
    const T* yp = n ? g.ys + (n - 1) * B * H : g.y0;  // y_{n-1}, z_{n-1}
    const T* zp = n ? g.zs + (n - 1) * B * H : g.z0;
    P* dU = g.dU + r0 * 4 * H;
    for_rows(B, H, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        T* gy = g.g_y + b * H;
        const T* grad = g.grad_ys + (r0 + b) * H;
        const T* dymb = dymp + b * H;
        if (g.mask) for (int64_t j = 0; j < H; ++j) gy[j] += grad[j] + dymb[j] * g.mask[b * H + j];
        else for (int64_t j = 0; j < H; ++j) gy[j] += grad[j] + dymb[j];
        if (LEN && n >= g.len[b]) std::fill(dU + b * 4 * H, dU + (b + 1) * 4 * H, P(0.0f));  // frozen row
        else bwd_y(g.acts + (r0 + b) * 4 * H, yp + b * H, gy, dU + b * 4 * H, H, g.dt);
      }
    });
    at::Tensor dzy_rows = first_rows(dzy, Bn), dym_rows = first_rows(dym, Bn);
    if (Bn) from_y(dzy_rows, at::from_blob(dU + 2 * H, {Bn, H}, {4 * H, 1}, p_opt));
    for_rows(B, H, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        if (LEN && n >= g.len[b]) continue;  // z_n = z_{n-1}: dL/dz_n goes on unchanged
        T* gz = g.g_z + b * H;
        for (int64_t j = 0; j < H; ++j) gz[j] += dzyp[b * H + j];
        bwd_z(g.acts + (r0 + b) * 4 * H, zp + b * H, gz, dU + b * 4 * H, H, g.dt);
        add_to(g.db + b * 4 * H, dU + b * 4 * H, 4 * H);
      }
    });
    // [gate y, gate z] and cand z of this step's d u_proj rows (strided views) into W_hh
    if (!Bn) continue;
    gates_to_y(dym_rows, at::from_blob(dU, {Bn, 2 * H}, {4 * H, 1}, p_opt));
    cand_z_to_y(dym_rows, at::from_blob(dU + 3 * H, {Bn, H}, {4 * H, 1}, p_opt), true);
  }
  for (int64_t i = 0; i < B * H; ++i) g.g_y[i] += g.mask ? dymp[i] * g.mask[i] : dymp[i];
}

// The state-dropout mask in the loop's dtype, or an undefined tensor
// backward_gemm with d u_proj in the products' dtype P (mixed precision: float32 loops only)
template <typename T, typename P, bool LEN>
void backward_gemm_low(Sizes s, const Backward<T, P>& g, const at::Tensor& w_hh, const at::Tensor& w_tz,
                       const at::TensorOptions& opt) {
  if constexpr (std::is_same_v<T, float>) backward_gemm<T, P, LEN>(s, g, w_hh, w_tz, opt);
  else TORCH_CHECK(false, "lem_cpu: mixed precision runs float32 loops");
}

at::Tensor opt_mask(const c10::optional<at::Tensor>& mask, const at::TensorOptions& opt) {
  return mask.has_value() && mask->defined() ? mask->to(opt).contiguous() : at::Tensor();
}

template <typename T> T* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; }

// A bias in the loop's dtype, or zeros where the layer has none (bias=False)
at::Tensor bias_or_zeros(const c10::optional<at::Tensor>& b, int64_t n, const at::TensorOptions& opt) {
  return b.has_value() && b->defined() ? b->to(opt) : at::zeros({n}, opt);
}

// Whether gemm asks for mixed precision: products in bfloat16 or float16, the loop in float32
bool mixed_precision(const c10::optional<at::ScalarType>& gemm) { return gemm.has_value() && is_low(*gemm); }

// The weight gradients under mixed precision: lem_backward's GEMMs over all T·B rows with their inputs
// rounded to the products' dtype `low` (as autocast's backward of nn.Linear takes them), each oriented
// as oneDNN's bfloat16 kernels run it fastest (d u_proj^T on the left), widened to float32. Returns
// d x (empty unless needs_dx), d w_in, d w_hh, d w_tz.
std::vector<at::Tensor> weight_grads_low(const at::Tensor& d_u, const at::Tensor& x, const at::Tensor& w_in,
                                         const at::Tensor& y0, const at::Tensor& ys, const at::Tensor& zs,
                                         const at::Tensor& mask, at::ScalarType low, bool needs_dx) {
  const int64_t T = ys.size(0), B = ys.size(1), H = ys.size(2);
  const at::Tensor dU2 = d_u.view({T * B, 4 * H}).to(low);
  at::Tensor ym_prev = at::cat({y0.unsqueeze(0), ys.narrow(0, 0, T - 1)});  // y_{n-1} ⊙ mask
  if (mask.defined()) ym_prev.mul_(mask);
  const at::Tensor d_whh4 = at::mm(dU2.t(), ym_prev.view({T * B, H}).to(low));  // (4H, H); cand y's rows are W_tz's
  const at::Tensor d_whh = at::cat({d_whh4.narrow(0, 0, 2 * H), d_whh4.narrow(0, 3 * H, H)}).to(at::kFloat);
  const at::Tensor d_wtz = at::mm(dU2.narrow(1, 2 * H, H).t(), zs.view({T * B, H}).to(low)).to(at::kFloat);
  const at::Tensor d_win = at::mm(dU2.t(), x.reshape({T * B, x.size(2)}).to(low)).to(at::kFloat);
  const at::Tensor d_x = needs_dx ? at::mm(dU2, w_in.to(low)).view(x.sizes()) : at::empty({0}, x.options());
  return {d_x, d_win, d_whh, d_wtz};
}

// The weight gradients in the loop's dtype: GEMMs over all T·B rows, formed transposed ((y_{n-1} ⊙ mask)^T
// dA is the faster orientation for MKL's long-K products, docs/kernels.md). Returns as weight_grads_low.
std::vector<at::Tensor> weight_grads(const at::Tensor& d_u, const at::Tensor& x, const at::Tensor& w_in,
                                     const at::Tensor& y0, const at::Tensor& ys, const at::Tensor& zs,
                                     const at::Tensor& mask, bool needs_dx) {
  const int64_t T = ys.size(0), B = ys.size(1), H = ys.size(2);
  const auto opt = ys.options();
  const at::Tensor dU2 = d_u.view({T * B, 4 * H}), ys2 = ys.view({T * B, H});
  const at::Tensor ym_prev = mask.defined() ? at::cat({y0.unsqueeze(0), ys.narrow(0, 0, T - 1)}).mul_(mask).view({T * B, H})
                                            : at::Tensor();
  // W_hh: (y_{n-1} ⊙ mask)^T d u_proj with all 4H columns, one pass over d u_proj; its cand-y block
  // (H columns, which belong to W_tz) is dropped after
  at::Tensor d_whh4_t = at::empty({H, 4 * H}, opt);
  if (ym_prev.defined()) {
    at::mm_out(d_whh4_t, ym_prev.t(), dU2);
  } else {  // y_{n-1} = y0, then ys shifted by one step: no copy
    at::mm_out(d_whh4_t, y0.t(), dU2.narrow(0, 0, B));
    if (T > 1) d_whh4_t.addmm_(ys2.narrow(0, 0, (T - 1) * B).t(), dU2.narrow(0, B, (T - 1) * B));
  }
  const at::Tensor d_whh_t = at::cat({d_whh4_t.narrow(1, 0, 2 * H), d_whh4_t.narrow(1, 3 * H, H)}, 1);
  const at::Tensor d_wtz = at::mm(zs.view({T * B, H}).t(), dU2.narrow(1, 2 * H, H)).t().contiguous();
  const at::Tensor x2 = x.reshape({T * B, x.size(2)});
  const at::Tensor d_win = at::mm(x2.t(), dU2).t().contiguous();
  const at::Tensor d_x = needs_dx ? at::mm(dU2, w_in).view(x.sizes()) : at::empty({0}, opt);
  return {d_x, d_win, d_whh_t.t().contiguous(), d_wtz};
}

// Per-row lengths (B,) in [1, T], int64, or an undefined tensor
at::Tensor opt_lengths(const c10::optional<at::Tensor>& lengths, int64_t T, int64_t B) {
  if (!lengths.has_value() || !lengths->defined()) return at::Tensor();
  const at::Tensor len = lengths->contiguous();
  TORCH_CHECK(len.scalar_type() == at::kLong && len.dim() == 1 && len.size(0) == B,
              "lem_cpu: lengths must be an int64 tensor of shape (B,) = (", B, ",)");
  TORCH_CHECK(B == 0 || (len.min().item<int64_t>() >= 1 && len.max().item<int64_t>() <= T),
              "lem_cpu: lengths must be in [1, T = ", T, "]");
  return len;
}

// f(std::integral_constant<bool, LEN>): the loops compiled with or without per-row lengths
template <typename F> inline void with_lengths(const at::Tensor& len, const F& f) {
  if (len.defined()) f(std::true_type{}); else f(std::false_type{});
}

void check(const at::Tensor& t, int64_t width, const at::Tensor& y0, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "lem_cpu: tensors must be on the CPU");
  TORCH_CHECK(t.dim() == 3 && t.size(0) > 0 && t.size(2) == width * y0.size(1),
              "lem_cpu: ", what, " must be (T, B, ", width, "H) with T > 0");
}

// The weight as lem_forward's products took it under mixed precision: rounded to `low`, and for the
// per-row strategy's float32 products widened back.
at::Tensor rounded_weight(const at::Tensor& w, at::ScalarType low, bool rowwise) {
  return rowwise ? w.to(low).to(at::kFloat) : w.to(low);
}

// The gradient of ys as a dense copy in a cached buffer (the gradient of ys.sum(), say, comes as an
// expanded view), zeros where none reached ys.
at::Tensor dense_or_zeros(const c10::optional<at::Tensor>& g, at::IntArrayRef sizes, const at::TensorOptions& opt) {
  at::Tensor out = empty_large(sizes, opt);
  if (g.has_value() && g->defined()) out.copy_(*g); else out.zero_();
  return out;
}

}  // namespace

// x (T, B, I), w_in (4H, I), the biases b_in (4H), b_hh (3H), b_tz (H) or none, lengths (B,) or none.
// Returns ys (T, B, H), z_T (B, H) and, when keep (for a backward), zs (T, B, H) and the activations
// acts (T, B, 4H), else two empty tensors in their place. keep changes only where z_n and the
// activations are written, never what is computed: ys and z_T are the same bits.
// gemm: the dtype of the products' inputs; none: the tensors' own, float32 or float64, one for all.
// bfloat16 or float16 is mixed precision: the weights are rounded to it once per call and the state
// every step (see Product), while the state, the gates, every sum and all the outputs are float32; x,
// the state and the weights may then come in any floating dtypes (as torch.autocast hands them over).
// The per-row strategy keeps float32 products there, on the rounded weights.
std::vector<at::Tensor> lem_forward(at::Tensor x, at::Tensor w_in, c10::optional<at::Tensor> b_in, at::Tensor y0,
                                    at::Tensor z0, at::Tensor w_hh, c10::optional<at::Tensor> b_hh, at::Tensor w_tz,
                                    c10::optional<at::Tensor> b_tz, c10::optional<at::Tensor> mask_opt,
                                    c10::optional<at::Tensor> lengths_opt, double dt, bool keep,
                                    c10::optional<at::ScalarType> gemm) {
  TORCH_CHECK(x.device().is_cpu(), "lem_cpu: tensors must be on the CPU");
  TORCH_CHECK(x.dim() == 3 && x.size(0) > 0 && w_in.size(0) == 4 * y0.size(1), "lem_cpu: x must be (T, B, I) with T > 0");
  const bool mixed = mixed_precision(gemm);
  TORCH_CHECK(mixed || (x.scalar_type() == y0.scalar_type() && w_in.scalar_type() == y0.scalar_type()),
              "lem_cpu: x, the state and the weights must have one dtype");
  const Sizes s{x.size(0), x.size(1), y0.size(1)};
  const int64_t H = s.H;
  const bool rowwise = H <= kRowwiseMaxH;
  const auto opt = y0.options().dtype(mixed ? at::kFloat : y0.scalar_type());
  // the transposed weights as the products take them
  auto product_weight = [&](const at::Tensor& w) {
    if (!mixed) return rowwise ? w.t().contiguous() : w.contiguous().t();
    return rounded_weight(w, *gemm, rowwise).t().contiguous();
  };
  const at::Tensor w_in_t = product_weight(w_in), w_hh_t = product_weight(w_hh), w_tz_t = product_weight(w_tz);
  x = (mixed ? x.to(rowwise ? at::kFloat : *gemm) : x).contiguous();
  y0 = y0.to(opt).contiguous(); z0 = z0.to(opt).contiguous();
  const at::Tensor b_hh_ = bias_or_zeros(b_hh, 3 * H, opt);
  const at::Tensor bias = bias_or_zeros(b_in, 4 * H, opt) +
                          at::cat({b_hh_.narrow(0, 0, 2 * H), bias_or_zeros(b_tz, H, opt), b_hh_.narrow(0, 2 * H, H)});
  const at::Tensor mask = opt_mask(mask_opt, opt);
  const at::Tensor len = opt_lengths(lengths_opt, s.T, s.B);
  at::Tensor ys = empty_large({s.T, s.B, s.H}, opt);
  at::Tensor zs = keep ? empty_large({s.T, s.B, s.H}, opt) : at::empty({2, s.B, s.H}, opt);
  at::Tensor acts = keep ? empty_large({s.T, s.B, 4 * s.H}, opt) : at::Tensor();
  FlushDenormals ftz;
  AT_DISPATCH_FLOATING_TYPES(y0.scalar_type(), "lem_forward", [&] {
    using T = scalar_t;
    const Forward<T> f{rowwise ? x.data_ptr<T>() : nullptr, y0.data_ptr<T>(), z0.data_ptr<T>(), bias.data_ptr<T>(),
                       ptr_or_null<T>(mask), ptr_or_null<int64_t>(len), x.size(2), static_cast<T>(dt), ys.data_ptr<T>(),
                       keep ? zs.data_ptr<T>() : nullptr, ptr_or_null<T>(acts), keep ? nullptr : zs.data_ptr<T>()};
    with_lengths(len, [&](auto has_len) {
      constexpr bool LEN = decltype(has_len)::value;
      if (rowwise) {
        with_fixed_h(s.H, [&](auto hc) {
          forward_rows<T, decltype(hc)::value, LEN>(s, f, w_in_t.data_ptr<T>(), w_hh_t.data_ptr<T>(), w_tz_t.data_ptr<T>());
        });
      } else {
        const at::Tensor x2 = x.view({s.T * s.B, x.size(2)});
        if (w_hh_t.scalar_type() == at::kBFloat16) {
          forward_gemm_low<T, c10::BFloat16, LEN>(s, f, x2, w_in_t, w_hh_t, w_tz_t, opt);
        } else if (w_hh_t.scalar_type() == at::kHalf) {
          forward_gemm_low<T, c10::Half, LEN>(s, f, x2, w_in_t, w_hh_t, w_tz_t, opt);
        } else {
          forward_gemm<T, T, LEN>(s, f, x2, w_in_t, w_hh_t, w_tz_t, opt);
        }
      }
    });
  });
  if (keep) return {ys, zs[s.T - 1].clone(), zs, acts};
  // without keep, the per-row strategy leaves z_T in zs[0], the GEMM one in zs[(T - 1) % 2]
  const int64_t last = rowwise ? 0 : (s.T - 1) % 2;
  return {ys, zs[last].clone(), at::empty({0}, opt), at::empty({0}, opt)};
}

// grad_ys and grad_zT may be undefined (no gradient reached them: zero). Returns d x (empty unless
// needs_dx), d w_in, d b_in, d y0, d z0, d w_hh, d b_hh, d w_tz, d b_tz, each in the dtype of what it is
// the gradient of (a bias in its weight's). gemm: as lem_forward's (acts, ys, zs are then float32); the
// reverse loop's products and the weight gradients' GEMMs then take their inputs in it.
std::vector<at::Tensor> lem_backward(c10::optional<at::Tensor> grad_ys_opt, c10::optional<at::Tensor> grad_zT, at::Tensor acts,
                                     at::Tensor ys, at::Tensor zs, at::Tensor x, at::Tensor w_in, at::Tensor y0, at::Tensor z0,
                                     at::Tensor w_hh, at::Tensor w_tz, c10::optional<at::Tensor> mask_opt,
                                     c10::optional<at::Tensor> lengths_opt, double dt, bool needs_dx,
                                     c10::optional<at::ScalarType> gemm) {
  check(acts, 4, y0, "acts");
  const bool mixed = mixed_precision(gemm);
  const auto opt = acts.options();
  const at::ScalarType x_t = x.scalar_type(), w_in_t = w_in.scalar_type(), y0_t = y0.scalar_type(),
                       z0_t = z0.scalar_type(), w_hh_t = w_hh.scalar_type(), w_tz_t = w_tz.scalar_type();
  acts = acts.contiguous(); ys = ys.contiguous(); zs = zs.contiguous();
  y0 = y0.to(opt).contiguous(); z0 = z0.to(opt).contiguous(); w_hh = w_hh.contiguous(); w_tz = w_tz.contiguous();
  const int64_t T = acts.size(0), B = acts.size(1), H = y0.size(1);
  const Sizes s{T, B, H};
  const bool rowwise = H <= kRowwiseMaxH;
  if (mixed) w_hh = rounded_weight(w_hh, *gemm, rowwise), w_tz = rounded_weight(w_tz, *gemm, rowwise);
  const at::Tensor mask = opt_mask(mask_opt, opt);
  const at::Tensor len = opt_lengths(lengths_opt, T, B);
  FlushDenormals ftz;
  const at::Tensor grad_ys = dense_or_zeros(grad_ys_opt, {T, B, H}, opt);
  at::Tensor g_y = at::zeros({B, H}, opt);
  at::Tensor g_z = grad_zT.has_value() && grad_zT->defined() ? grad_zT->to(opt).contiguous().clone() : at::zeros({B, H}, opt);
  // the loop writes every gradient of u_proj straight into its place: [gate y, gate z, cand y (dQ), cand z]
  // (in the products' dtype under mixed precision with the GEMM strategy, which takes it as it is)
  at::Tensor d_u = empty_large({T, B, 4 * H}, mixed && !rowwise ? opt.dtype(*gemm) : opt);
  at::Tensor db_rows = at::zeros({B, 4 * H}, opt);
  AT_DISPATCH_FLOATING_TYPES(acts.scalar_type(), "lem_backward", [&] {
    using T_ = scalar_t;
    auto pointers = [&](auto* dU) {
      return Backward<T_, std::remove_pointer_t<decltype(dU)>>{
          grad_ys.data_ptr<T_>(), acts.data_ptr<T_>(), y0.data_ptr<T_>(), ys.data_ptr<T_>(), z0.data_ptr<T_>(),
          zs.data_ptr<T_>(), ptr_or_null<T_>(mask), ptr_or_null<int64_t>(len), static_cast<T_>(dt),
          g_y.data_ptr<T_>(), g_z.data_ptr<T_>(), dU, db_rows.data_ptr<T_>()};
    };
    with_lengths(len, [&](auto has_len) {
      constexpr bool LEN = decltype(has_len)::value;
      if (rowwise) {
        const at::Tensor whh4 = at::cat({w_hh.narrow(0, 0, 2 * H), at::zeros({H, H}, opt), w_hh.narrow(0, 2 * H, H)});
        with_fixed_h(H, [&](auto hc) {
          backward_rows<T_, decltype(hc)::value, LEN>(s, pointers(d_u.data_ptr<T_>()), whh4.data_ptr<T_>(),
                                                      w_tz.data_ptr<T_>());
        });
      } else if (d_u.scalar_type() == at::kBFloat16) {
        backward_gemm_low<T_, c10::BFloat16, LEN>(s, pointers(d_u.data_ptr<c10::BFloat16>()), w_hh, w_tz, opt);
      } else if (d_u.scalar_type() == at::kHalf) {
        backward_gemm_low<T_, c10::Half, LEN>(s, pointers(d_u.data_ptr<c10::Half>()), w_hh, w_tz, opt);
      } else {
        backward_gemm<T_, T_, LEN>(s, pointers(d_u.data_ptr<T_>()), w_hh, w_tz, opt);
      }
    });
  });
  const at::Tensor d_b = db_rows.sum(0);  // [gate y, gate z | cand y | cand z]
  const at::Tensor d_bhh = at::cat({d_b.narrow(0, 0, 2 * H), d_b.narrow(0, 3 * H, H)});
  const std::vector<at::Tensor> d_w = mixed ? weight_grads_low(d_u, x, w_in, y0, ys, zs, mask, *gemm, needs_dx)
                                            : weight_grads(d_u, x, w_in, y0, ys, zs, mask, needs_dx);
  return {d_w[0].to(x_t), d_w[1].to(w_in_t), d_b.to(w_in_t), g_y.to(y0_t), g_z.to(z0_t), d_w[2].to(w_hh_t),
          d_bhh.to(w_hh_t), d_w[3].to(w_tz_t), d_b.narrow(0, 2 * H, H).to(w_tz_t).clone()};
}

void empty_cache() { large_buffers().clear(); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &lem_forward, "fused LEM forward (CPU)", py::arg("x"), py::arg("w_in"), py::arg("b_in"), py::arg("y0"),
        py::arg("z0"), py::arg("w_hh"), py::arg("b_hh"), py::arg("w_tz"), py::arg("b_tz"), py::arg("mask"),
        py::arg("lengths"), py::arg("dt"), py::arg("keep"), py::arg("gemm") = py::none());
  m.def("backward", &lem_backward, "fused LEM backward (CPU)", py::arg("grad_ys"), py::arg("grad_zT"), py::arg("acts"),
        py::arg("ys"), py::arg("zs"), py::arg("x"), py::arg("w_in"), py::arg("y0"), py::arg("z0"), py::arg("w_hh"),
        py::arg("w_tz"), py::arg("mask"), py::arg("lengths"), py::arg("dt"), py::arg("needs_dx"),
        py::arg("gemm") = py::none());
  m.def("empty_cache", &empty_cache, "frees the cached large buffers");
}
