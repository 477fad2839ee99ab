// Native CPU kernels for causal (optionally sliding-window) multi-head attention with grouped key/value heads,
// forward and backward, registered with XLA through jax.ffi. float32, AVX-512, head dim a multiple of 16 up to
// 128.
//
// Layouts are the projections' own: q and o [B, S, H, D], k and v [B, S, KV, D]; query head h reads kv head
// h / (H / KV) (HF's repeat_kv). With rope, q and k are first rotated by the rotary tables cos, sin [B, S, D]
// (HF's apply_rotary_pos_emb, q * cos + rotate_half(q) * sin; the gradients go back through it), so the
// rotated q and k are never written out. With s_ij = scale * (q_i . k_j) over the allowed keys j (j <= i, and
// j > i - window with a window):
//   OftjaxAttention:      o_i = sum_j p_ij v_j,  p_ij = exp(s_ij - m_i) / l_i,  lse_i = m_i + log(l_i)
//   OftjaxAttentionGrad:  from q, k, v, lse and do: p_ij = exp(s_ij - lse_i) recomputed,
//                         dp_ij = do_i . v_j,  ds_ij = p_ij (dp_ij - delta_i),  delta_i = sum_j p_ij dp_ij
//                         (= do_i . o_i, FlashAttention's form, without reading o),
//                         dq_i = scale sum_j ds_ij k_j,  dk_j = scale sum_i ds_ij q_i,  dv_j = sum_i p_ij do_i
// Scores, softmax and every sum are float32 (as HF's eager attention computes softmax in float32); exp is a
// degree-6 polynomial after range reduction (Cephes expf, ~1 ulp).
//
// Why a native kernel: XLA:CPU runs the blocked attention of oftjax/models/_attention.py as many small ops per
// layer (head transposes, score blocks, masks, softmax, products, gradient scatters), a large share of the CPU
// train step (benchmarks/profile_train.py; figures in benchmarks/RESULTS.md). Here one pass per query tile
// keeps scores and probabilities of 32 query rows in L1/L2, reads q/k/v in place and never materialises the
// [S, S] matrices.
//
// Work and determinism: the forward splits over (batch, query head, 32-row query tile); the backward over
// (batch, kv head), each unit running its query heads and tiles in a fixed order and owning its dk, dv and
// dq rows, so every result is one thread's sums in a fixed order (the same bits on every run).
//
// Built by setup.py as oftjax/models/_attention_cpu*.so and loaded by oftjax/models/_native_attention.py.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "parallel_for.h"
#include "simd_exp.h"
#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define OFTJAX_ATTN_X86 1
#else
#define OFTJAX_ATTN_X86 0
#endif

namespace ffi = xla::ffi;
using oftjax::ParallelFor;

namespace {

constexpr int64_t kTile = 32;     // query rows per tile
constexpr int64_t kKeyStep = 64;  // score columns per micro-kernel call (4 vectors)
constexpr int64_t kMaxHeadDim = 128;

struct Dims {
  int64_t B, S, H, KV, D;
  float scale;
  int64_t window;     // 0: plain causal
  const float* cos;   // rotary tables [B, S, D] applied to q and k inside the kernels; null: none
  const float* sin;
  int64_t q_row() const { return H * D; }   // stride between sequence positions in q / o / do / dq
  int64_t kv_row() const { return KV * D; }  // in k / v / dk / dv
  int64_t lo(int64_t i) const { return window > 0 ? std::max<int64_t>(0, i - window + 1) : 0; }
};

inline int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

#if OFTJAX_ATTN_X86
#define OFTJAX_AVX512 __attribute__((target("avx512f")))

bool HasAvx512() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

// HF's apply_rotary_pos_emb on one row: out = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1];
// products and sum rounded separately, as torch computes them. D / 2 is a multiple of 8.
OFTJAX_AVX512 inline void Rope(const float* x, const float* c, const float* s, int64_t D, float* out) {
  const int64_t h = D / 2;
  for (int64_t d = 0; d < h; d += 8) {
    const __m256 x1 = _mm256_loadu_ps(x + d), x2 = _mm256_loadu_ps(x + d + h);
    _mm256_storeu_ps(out + d, _mm256_sub_ps(_mm256_mul_ps(x1, _mm256_loadu_ps(c + d)),
                                            _mm256_mul_ps(x2, _mm256_loadu_ps(s + d))));
    _mm256_storeu_ps(out + d + h, _mm256_add_ps(_mm256_mul_ps(x2, _mm256_loadu_ps(c + d + h)),
                                                _mm256_mul_ps(x1, _mm256_loadu_ps(s + d + h))));
  }
}

// Its transpose, for gradients: out = g * cos + rotate_half^T(g * sin), rotate_half^T(z) = [z2, -z1].
OFTJAX_AVX512 inline void RopeTranspose(const float* g, const float* c, const float* s, int64_t D, float* out) {
  const int64_t h = D / 2;
  for (int64_t d = 0; d < h; d += 8) {
    const __m256 g1 = _mm256_loadu_ps(g + d), g2 = _mm256_loadu_ps(g + d + h);
    _mm256_storeu_ps(out + d, _mm256_add_ps(_mm256_mul_ps(g1, _mm256_loadu_ps(c + d)),
                                            _mm256_mul_ps(g2, _mm256_loadu_ps(s + d + h))));
    _mm256_storeu_ps(out + d + h, _mm256_sub_ps(_mm256_mul_ps(g2, _mm256_loadu_ps(c + d + h)),
                                                _mm256_mul_ps(g1, _mm256_loadu_ps(s + d))));
  }
}

// Row j of batch b with the rotary embedding applied (or copied when there is none); transpose: its
// transpose, taking a gradient back through it.
OFTJAX_AVX512 inline void RotatedRow(const float* x, const Dims& dm, int64_t b, int64_t j, float* out,
                                     bool transpose = false) {
  if (dm.cos == nullptr) {
    std::memcpy(out, x, sizeof(float) * dm.D);
    return;
  }
  const int64_t t = (b * dm.S + j) * dm.D;
  (transpose ? RopeTranspose : Rope)(x, dm.cos + t, dm.sin + t, dm.D, out);
}

using oftjax::Exp;  // simd_exp.h (x <= 0 here: scores minus their row maximum or log-sum-exp)

// out[r][c] = alpha * sum_d a_r[d] * T[d][c] for R rows and columns [c0, c0 + 16 * NC): T is [D, ldt] (a
// transposed key or value block, zero past the last key), a_r = rows[r].
template <int R, int NC>
OFTJAX_AVX512 void DotRowsMicro(const float* const* rows, const float* T, int64_t ldt, int64_t D, float alpha,
                                float* out, int64_t ldo, int64_t c0) {
  __m512 acc[R][NC];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NC; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const float* t = T + d * ldt + c0;
    __m512 tv[NC];
    for (int v = 0; v < NC; ++v) tv[v] = _mm512_loadu_ps(t + 16 * v);
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(rows[r][d]);
      for (int v = 0; v < NC; ++v) acc[r][v] = _mm512_fmadd_ps(a, tv[v], acc[r][v]);
    }
  }
  const __m512 s = _mm512_set1_ps(alpha);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NC; ++v) _mm512_storeu_ps(out + r * ldo + c0 + 16 * v, _mm512_mul_ps(acc[r][v], s));
}

template <int R>
OFTJAX_AVX512 void DotRowsGroup(const float* const* rows, const float* T, int64_t ldt, int64_t D, float alpha,
                                float* out, int64_t ldo, int64_t ncols) {
  int64_t c = 0;
  for (; c + kKeyStep <= ncols; c += kKeyStep) DotRowsMicro<R, 4>(rows, T, ldt, D, alpha, out, ldo, c);
  switch ((ncols - c) / 16) {
    case 3: DotRowsMicro<R, 3>(rows, T, ldt, D, alpha, out, ldo, c); break;
    case 2: DotRowsMicro<R, 2>(rows, T, ldt, D, alpha, out, ldo, c); break;
    case 1: DotRowsMicro<R, 1>(rows, T, ldt, D, alpha, out, ldo, c); break;
    default: break;
  }
}

// out[r][c] for `nrows` rows and, per group of 4 rows, the columns below RoundUp(max hi, 16) (hi[r]: the end
// of row r's allowed keys); each row's columns below RoundUp(hi[r], 16) are always among them. The other
// columns of out are left as they were.
OFTJAX_AVX512 void DotRows(const float* const* rows, int64_t nrows, const float* T, int64_t ldt, int64_t D,
                           float alpha, float* out, int64_t ldo, const int64_t* hi) {
  int64_t r = 0;
  for (; r + 4 <= nrows; r += 4) {
    const int64_t ncols = RoundUp(*std::max_element(hi + r, hi + r + 4), 16);
    DotRowsGroup<4>(rows + r, T, ldt, D, alpha, out + r * ldo, ldo, ncols);
  }
  for (; r < nrows; ++r) DotRowsGroup<1>(rows + r, T, ldt, D, alpha, out + r * ldo, ldo, RoundUp(hi[r], 16));
}

// out_r = sum_{c in [c_lo, c_hi)} A[r][c] * M(c) for R rows, M(c) a D-vector (D = 16 * ND); overwrite.
template <int R, int ND>
OFTJAX_AVX512 void CombineMicro(const float* A, int64_t lda, const float* M, int64_t ldm, int64_t c_lo, int64_t c_hi,
                                float* const* out) {
  __m512 acc[R][ND];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < ND; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t c = c_lo; c < c_hi; ++c) {
    const float* m = M + c * ldm;
    __m512 mv[ND];
    for (int v = 0; v < ND; ++v) mv[v] = _mm512_loadu_ps(m + 16 * v);
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * lda + c]);
      for (int v = 0; v < ND; ++v) acc[r][v] = _mm512_fmadd_ps(a, mv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < ND; ++v) _mm512_storeu_ps(out[r] + 16 * v, acc[r][v]);
}

// acc(c) += sum_r A[r][c] * M_r for columns c in [c_lo, c_hi) (4 at a time), rows r in [r0, nrows): acc(c) is
// a D-vector at acc + c * D (contiguous scratch).
template <int C, int ND>
OFTJAX_AVX512 void AccumulateMicro(const float* A, int64_t lda, const float* const* M, int64_t r0, int64_t nrows,
                                   int64_t c, float* acc_base) {
  constexpr int D = 16 * ND;
  __m512 acc[C][ND];
  for (int j = 0; j < C; ++j)
    for (int v = 0; v < ND; ++v) acc[j][v] = _mm512_loadu_ps(acc_base + (c + j) * D + 16 * v);
  for (int64_t r = r0; r < nrows; ++r) {
    __m512 mv[ND];
    for (int v = 0; v < ND; ++v) mv[v] = _mm512_loadu_ps(M[r] + 16 * v);
    for (int j = 0; j < C; ++j) {
      const __m512 a = _mm512_set1_ps(A[r * lda + c + j]);
      for (int v = 0; v < ND; ++v) acc[j][v] = _mm512_fmadd_ps(a, mv[v], acc[j][v]);
    }
  }
  for (int j = 0; j < C; ++j)
    for (int v = 0; v < ND; ++v) _mm512_storeu_ps(acc_base + (c + j) * D + 16 * v, acc[j][v]);
}

template <int ND>
struct Kernels {
  // accumulators + loaded vectors within the 32 vector registers
  static constexpr int kRows = ND <= 4 ? 4 : 2;
  static constexpr int kCols = ND <= 4 ? 4 : 2;

  // out_r = sum_c A[r][c] M(c) over each row's own column range [c_lo[r], c_hi[r]) (zeros elsewhere in A make
  // a shared range exact: rows are grouped and summed over the union of their ranges).
  OFTJAX_AVX512 static void Combine(const float* A, int64_t lda, int64_t nrows, const float* M, int64_t ldm,
                                    const int64_t* c_lo, const int64_t* c_hi, float* const* out) {
    int64_t r = 0;
    for (; r + kRows <= nrows; r += kRows) {
      const int64_t lo = *std::min_element(c_lo + r, c_lo + r + kRows);
      const int64_t hi = *std::max_element(c_hi + r, c_hi + r + kRows);
      CombineMicro<kRows, ND>(A + r * lda, lda, M, ldm, lo, hi, out + r);
    }
    for (; r < nrows; ++r) CombineMicro<1, ND>(A + r * lda, lda, M, ldm, c_lo[r], c_hi[r], out + r);
  }

  // Rows r whose query precedes column c's key (r < c - row_offset; row_offset = the tile's first query minus
  // the first key column) hold zeros in A (the causal mask) and are skipped.
  OFTJAX_AVX512 static void Accumulate(const float* A, int64_t lda, const float* const* M, int64_t nrows,
                                       int64_t row_offset, int64_t c_lo, int64_t c_hi, float* acc) {
    const auto first = [&](int64_t c) { return std::max<int64_t>(0, c - row_offset); };
    int64_t c = c_lo;
    for (; c + kCols <= c_hi; c += kCols) AccumulateMicro<kCols, ND>(A, lda, M, first(c), nrows, c, acc);
    for (; c < c_hi; ++c) AccumulateMicro<1, ND>(A, lda, M, first(c), nrows, c, acc);
  }
};

// T[d][j] = x[j][d] for a 16 x 16 block: x's rows at row stride ld, T's at ldt.
OFTJAX_AVX512 inline void Transpose16(const float* x, int64_t ld, float* T, int64_t ldt) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(x + i * ld);
  for (int i = 0; i < 8; ++i) {  // t[2i], t[2i+1], lane L: rows 2i, 2i+1 interleaved at columns 4L..4L+3
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i+m], lane L: column 4L+m of rows 4i..4i+3
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int m = 0; m < 4; ++m) {  // gather lane L of r[m], r[4+m], r[8+m], r[12+m]: column 4L+m, rows 0..15
    const __m512 a0 = _mm512_shuffle_f32x4(r[m], r[4 + m], 0x44), a1 = _mm512_shuffle_f32x4(r[m], r[4 + m], 0xEE);
    const __m512 b0 = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0x44);
    const __m512 b1 = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0xEE);
    _mm512_storeu_ps(T + m * ldt, _mm512_shuffle_f32x4(a0, b0, 0x88));
    _mm512_storeu_ps(T + (4 + m) * ldt, _mm512_shuffle_f32x4(a0, b0, 0xDD));
    _mm512_storeu_ps(T + (8 + m) * ldt, _mm512_shuffle_f32x4(a1, b1, 0x88));
    _mm512_storeu_ps(T + (12 + m) * ldt, _mm512_shuffle_f32x4(a1, b1, 0xDD));
  }
}

// Transposes rows j in [j0, j1) of x (row stride ld, D values each, D a multiple of 16) into T[d][j - j0]
// (ldt columns, zero past j1 - j0).
OFTJAX_AVX512 void TransposeRows(const float* x, int64_t ld, int64_t j0, int64_t j1, int64_t D, float* T,
                                 int64_t ldt) {
  const int64_t n = j1 - j0, whole = n / 16 * 16;
  for (int64_t j = 0; j < whole; j += 16)
    for (int64_t d = 0; d < D; d += 16) Transpose16(x + (j0 + j) * ld + d, ld, T + d * ldt + j, ldt);
  if (whole < n) {  // the last rows, zero-padded to 16
    alignas(64) float pad[16 * kMaxHeadDim] = {};
    for (int64_t j = whole; j < n; ++j) std::memcpy(pad + (j - whole) * D, x + (j0 + j) * ld, sizeof(float) * D);
    for (int64_t d = 0; d < D; d += 16) Transpose16(pad + d, D, T + d * ldt + whole, ldt);
  }
  const int64_t filled = RoundUp(n, 16);
  for (int64_t d = 0; d < D; ++d) std::fill(T + d * ldt + filled, T + (d + 1) * ldt, 0.0f);
}

// Scores of the tile's rows -> probabilities in place: P[r][c] for key ka + c; zero outside the allowed keys.
// With lse_out: softmax (forward; the rows' log-sum-exp written there), else exp(s - lse_in) (backward).
OFTJAX_AVX512 void Probabilities(float* P, int64_t ldp, int64_t i0, int64_t nrows, int64_t ka, const Dims& dm,
                                 const float* lse_in, float* lse_out) {
  const bool normalize = lse_out != nullptr;
  for (int64_t r = 0; r < nrows; ++r) {
    const int64_t i = i0 + r, lo = dm.lo(i) - ka, hi = i - ka + 1;  // allowed columns [lo, hi)
    float* p = P + r * ldp;
    std::fill(p, p + lo, 0.0f);
    std::fill(p + hi, p + ldp, 0.0f);
    float m;
    if (normalize) {
      __m512 mv = _mm512_set1_ps(-INFINITY);
      int64_t c = lo;
      for (; c + 16 <= hi; c += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(p + c));
      m = _mm512_reduce_max_ps(mv);
      for (; c < hi; ++c) m = std::max(m, p[c]);
    } else {
      m = lse_in[r];
    }
    const __m512 mb = _mm512_set1_ps(m);
    __m512 sv = _mm512_setzero_ps();
    int64_t c = lo;
    for (; c + 16 <= hi; c += 16) {
      const __m512 e = Exp(_mm512_sub_ps(_mm512_loadu_ps(p + c), mb));
      _mm512_storeu_ps(p + c, e);
      sv = _mm512_add_ps(sv, e);
    }
    if (c < hi) {
      const __mmask16 k = static_cast<__mmask16>((1u << (hi - c)) - 1u);
      const __m512 e = _mm512_maskz_mov_ps(k, Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p + c), mb)));
      _mm512_mask_storeu_ps(p + c, k, e);
      sv = _mm512_add_ps(sv, e);
    }
    if (!normalize) continue;
    const float l = _mm512_reduce_add_ps(sv);
    const __m512 lv = _mm512_set1_ps(l);
    for (c = lo; c + 16 <= hi; c += 16) _mm512_storeu_ps(p + c, _mm512_div_ps(_mm512_loadu_ps(p + c), lv));
    for (; c < hi; ++c) p[c] /= l;
    lse_out[r] = m + std::log(l);
  }
}

struct Scratch {
  std::vector<float> kt, vt, p, dp, dk, dv;  // kt, vt: the backward's transposed keys and values
  std::vector<float> krot, qrot, dqt;        // rotated keys [S, D], a tile's rotated queries and dq [kTile, D]
  std::vector<const float*> rows, rows2;
  std::vector<float*> outs;
  std::vector<int64_t> lo, hi;

  // The per-tile buffers both passes use, for head dim D.
  void ReserveTile(int64_t D) {
    qrot.resize(kTile * D);
    rows.resize(kTile);
    outs.resize(kTile);
    lo.resize(kTile);
    hi.resize(kTile);
  }
};

// Query rows [i0, i1) of head h, n = i1 - i0; key columns from ka (a multiple of kKeyStep), width columns.
struct Tile {
  int64_t i1, n, ka, width;
};

// Starts the tile at query row i0 of (b, h): its queries rotated into s.qrot (s.rows[r] points at row r) and
// each row's allowed keys [s.lo[r], s.hi[r]) as columns counted from ka. Both passes use the same tiles.
OFTJAX_AVX512 Tile BeginTile(const float* q, const Dims& dm, int64_t b, int64_t h, int64_t i0, Scratch& s) {
  const int64_t i1 = std::min(dm.S, i0 + kTile), ka = dm.lo(i0) / kKeyStep * kKeyStep;
  const Tile t{i1, i1 - i0, ka, RoundUp(i1 - ka, 16)};
  for (int64_t r = 0; r < t.n; ++r) {
    RotatedRow(q + ((b * dm.S + i0 + r) * dm.H + h) * dm.D, dm, b, i0 + r, s.qrot.data() + r * dm.D);
    s.rows[r] = s.qrot.data() + r * dm.D;
    s.lo[r] = dm.lo(i0 + r) - ka;
    s.hi[r] = i0 + r - ka + 1;
  }
  return t;
}

// kt: the keys of (b, kv head) transposed, [D, ldk] (ldk = S rounded up to kKeyStep, zero past S).
template <int ND>
OFTJAX_AVX512 void ForwardTile(const float* q, const float* kt, int64_t ldk, const float* v, float* o, float* lse,
                               const Dims& dm, int64_t b, int64_t h, int64_t i0, Scratch& s) {
  const int64_t D = dm.D, kh = h / (dm.H / dm.KV);
  const float* vb = v + (b * dm.S) * dm.kv_row() + kh * D;
  s.ReserveTile(D);
  const Tile t = BeginTile(q, dm, b, h, i0, s);
  const int64_t n = t.n, ka = t.ka, width = t.width;
  s.p.resize(kTile * width);
  for (int64_t r = 0; r < n; ++r) s.outs[r] = o + ((b * dm.S + i0 + r) * dm.H + h) * D;
  DotRows(s.rows.data(), n, kt + ka, ldk, D, dm.scale, s.p.data(), width, s.hi.data());
  Probabilities(s.p.data(), width, i0, n, ka, dm, nullptr, lse + (b * dm.H + h) * dm.S + i0);
  Kernels<ND>::Combine(s.p.data(), width, n, vb + ka * dm.kv_row(), dm.kv_row(), s.lo.data(), s.hi.data(),
                       s.outs.data());
}

template <int ND>
OFTJAX_AVX512 void BackwardUnit(const float* q, const float* k, const float* v, const float* lse,
                                const float* dout, float* dq, float* dk, float* dv, const Dims& dm, int64_t b,
                                int64_t kh, Scratch& s) {
  const int64_t D = dm.D, S = dm.S, groups = dm.H / dm.KV, width_all = RoundUp(S, kKeyStep);
  const float* kb = k + (b * S) * dm.kv_row() + kh * D;
  const float* vb = v + (b * S) * dm.kv_row() + kh * D;
  s.krot.resize(S * D);
  for (int64_t j = 0; j < S; ++j) RotatedRow(kb + j * dm.kv_row(), dm, b, j, s.krot.data() + j * D);
  // (the forward rotated and transposed the same keys; they are not kept between the two passes)
  s.kt.resize(D * width_all);
  s.vt.resize(D * width_all);
  TransposeRows(s.krot.data(), D, 0, S, D, s.kt.data(), width_all);
  TransposeRows(vb, dm.kv_row(), 0, S, D, s.vt.data(), width_all);
  s.dk.assign(S * D, 0.0f);
  s.dv.assign(S * D, 0.0f);
  s.p.resize(kTile * width_all);
  s.dp.resize(kTile * width_all);
  s.dqt.resize(kTile * D);
  s.rows2.resize(kTile);
  s.ReserveTile(D);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t h = kh * groups + g;
    for (int64_t i0 = 0; i0 < S; i0 += kTile) {
      const Tile t = BeginTile(q, dm, b, h, i0, s);
      const int64_t i1 = t.i1, n = t.n, ka = t.ka, width = t.width;
      const float* kt = s.kt.data() + ka;  // columns ka.. of the transposed keys (row stride width_all)
      const float* vt = s.vt.data() + ka;
      for (int64_t r = 0; r < n; ++r) {
        s.rows2[r] = dout + ((b * S + i0 + r) * dm.H + h) * D;
        s.outs[r] = s.dqt.data() + r * D;
      }
      float* P = s.p.data();
      float* dP = s.dp.data();
      DotRows(s.rows.data(), n, kt, width_all, D, dm.scale, P, width, s.hi.data());
      Probabilities(P, width, i0, n, ka, dm, lse + (b * dm.H + h) * S + i0, nullptr);
      DotRows(s.rows2.data(), n, vt, width_all, D, 1.0f, dP, width, s.hi.data());
      const __m512 sc = _mm512_set1_ps(dm.scale);
      for (int64_t r = 0; r < n; ++r) {
        // DotRows filled the columns below RoundUp(hi, 16) (P is zero outside [lo, hi)); the rest of the row
        // gets a zero score gradient. delta_i = sum_j p_ij dp_ij (= do_i . o_i) from the tile in cache.
        const int64_t filled = RoundUp(s.hi[r], 16);
        float* pr = P + r * width;
        float* dpr = dP + r * width;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t c = 0; c < filled; c += 16)
          acc = _mm512_fmadd_ps(_mm512_loadu_ps(pr + c), _mm512_loadu_ps(dpr + c), acc);
        const __m512 dl = _mm512_set1_ps(_mm512_reduce_add_ps(acc));
        for (int64_t c = 0; c < filled; c += 16) {  // dP <- scale * P * (dP - delta): the score gradient
          const __m512 g2 = _mm512_sub_ps(_mm512_loadu_ps(dpr + c), dl);
          _mm512_storeu_ps(dpr + c, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(pr + c), g2), sc));
        }
        std::fill(dpr + filled, dpr + width, 0.0f);
      }
      const int64_t c_hi = i1 - ka;  // keys past the tile's last row get nothing
      const int64_t c_lo = s.lo[0];
      Kernels<ND>::Accumulate(P, width, s.rows2.data(), n, i0 - ka, c_lo, c_hi, s.dv.data() + ka * D);
      Kernels<ND>::Accumulate(dP, width, s.rows.data(), n, i0 - ka, c_lo, c_hi, s.dk.data() + ka * D);
      Kernels<ND>::Combine(dP, width, n, s.krot.data() + ka * D, D, s.lo.data(), s.hi.data(), s.outs.data());
      for (int64_t r = 0; r < n; ++r) {  // dq back through the rotary embedding
        RotatedRow(s.outs[r], dm, b, i0 + r, dq + ((b * S + i0 + r) * dm.H + h) * D, /*transpose=*/true);
      }
    }
  }
  for (int64_t j = 0; j < S; ++j) {
    RotatedRow(s.dk.data() + j * D, dm, b, j, dk + (b * S + j) * dm.kv_row() + kh * D, /*transpose=*/true);
    std::memcpy(dv + (b * S + j) * dm.kv_row() + kh * D, s.dv.data() + j * D, sizeof(float) * D);
  }
}

template <template <int> class F, typename... Args>
void Dispatch(int64_t D, Args&&... args) {
  switch (D / 16) {
    case 1: F<1>::Run(args...); break;
    case 2: F<2>::Run(args...); break;
    case 3: F<3>::Run(args...); break;
    case 4: F<4>::Run(args...); break;
    case 5: F<5>::Run(args...); break;
    case 6: F<6>::Run(args...); break;
    case 7: F<7>::Run(args...); break;
    case 8: F<8>::Run(args...); break;
  }
}

template <int ND>
struct ForwardRun {
  static void Run(const float* q, const float* kt, int64_t ldk, const float* v, float* o, float* lse,
                  const Dims& dm, int64_t b, int64_t h, int64_t i0, Scratch& s) {
    ForwardTile<ND>(q, kt, ldk, v, o, lse, dm, b, h, i0, s);
  }
};

template <int ND>
struct BackwardRun {
  static void Run(const float* q, const float* k, const float* v, const float* lse,
                  const float* dout, float* dq, float* dk, float* dv, const Dims& dm, int64_t b, int64_t kh,
                  Scratch& s) {
    BackwardUnit<ND>(q, k, v, lse, dout, dq, dk, dv, dm, b, kh, s);
  }
};
#else
bool HasAvx512() { return false; }
#endif

bool Supported(int64_t head_dim) {
  return HasAvx512() && head_dim > 0 && head_dim % 16 == 0 && head_dim <= kMaxHeadDim;
}

ffi::Error CheckDims(const char* target, const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k,
                     const ffi::Buffer<ffi::F32>& v, const ffi::Buffer<ffi::F32>& cos,
                     const ffi::Buffer<ffi::F32>& sin, bool rope, float scale, int64_t window, Dims* dm) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  const std::string t(target);
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4) {
    return ffi::Error::InvalidArgument(t + ": q must be [B, S, H, D] and k, v [B, S, KV, D]");
  }
  for (int i = 0; i < 4; ++i) {
    if (kd[i] != vd[i]) return ffi::Error::InvalidArgument(t + ": k and v must have the same shape");
  }
  if (kd[0] != qd[0] || kd[1] != qd[1] || kd[3] != qd[3]) {
    return ffi::Error::InvalidArgument(t + ": q, k and v must agree on batch, sequence and head dim");
  }
  if (kd[2] <= 0 || qd[2] % kd[2] != 0) {
    return ffi::Error::InvalidArgument(t + ": the query heads (" + std::to_string(qd[2]) +
                                       ") must be a multiple of the kv heads (" + std::to_string(kd[2]) + ")");
  }
  if (!Supported(qd[3])) {
    return ffi::Error::InvalidArgument(t + ": head dim " + std::to_string(qd[3]) +
                                       " needs AVX-512 and a multiple of 16 up to " + std::to_string(kMaxHeadDim));
  }
  if (window < 0) return ffi::Error::InvalidArgument(t + ": window must be >= 0 (0: none)");
  const size_t table = static_cast<size_t>(qd[0] * qd[1] * qd[3]);
  if (rope && (cos.element_count() != table || sin.element_count() != table)) {
    return ffi::Error::InvalidArgument(t + ": cos and sin must be [B, S, D] = " + std::to_string(table) +
                                       " values");
  }
  *dm = Dims{qd[0], qd[1], qd[2], kd[2], qd[3], scale, window, rope ? cos.typed_data() : nullptr,
             rope ? sin.typed_data() : nullptr};
  return ffi::Error::Success();
}

ffi::Error AttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                         ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                         ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse, float scale,
                         int64_t window, bool rope) {
  Dims dm;
  if (auto e = CheckDims("oftjax_attention", q, k, v, cos, sin, rope, scale, window, &dm); e.failure()) return e;
  if (o->element_count() != q.element_count() || lse->element_count() != static_cast<size_t>(dm.B * dm.H * dm.S)) {
    return ffi::Error::InvalidArgument("oftjax_attention: o must have q's shape and lse [B, H, S]");
  }
#if OFTJAX_ATTN_X86
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = o->typed_data(), *lp = lse->typed_data();
  // the keys of every (batch, kv head), transposed once; then the query tiles
  const int64_t ldk = RoundUp(dm.S, kKeyStep), per = dm.D * ldk;
  std::vector<float> kt(static_cast<size_t>(dm.B * dm.KV * per));
  float* ktp = kt.data();
  ParallelFor(pool, dm.B * dm.KV, [=](int64_t u) {
    const int64_t b = u / dm.KV, kh = u % dm.KV;
    std::vector<float> rows(static_cast<size_t>(dm.S * dm.D));  // the rotated keys, then transposed
    for (int64_t j = 0; j < dm.S; ++j) {
      RotatedRow(kp + (b * dm.S + j) * dm.kv_row() + kh * dm.D, dm, b, j, rows.data() + j * dm.D);
    }
    TransposeRows(rows.data(), dm.D, 0, dm.S, dm.D, ktp + u * per, ldk);
  });
  const int64_t tiles = (dm.S + kTile - 1) / kTile;
  ParallelFor(pool, dm.B * dm.H * tiles, [=](int64_t u) {
    thread_local Scratch s;
    const int64_t b = u / (dm.H * tiles), h = u / tiles % dm.H, t = u % tiles;
    const float* kt_bh = ktp + (b * dm.KV + h / (dm.H / dm.KV)) * per;
    Dispatch<ForwardRun>(dm.D, qp, kt_bh, ldk, vp, op, lp, dm, b, h, t * kTile, s);
  });
#endif
  return ffi::Error::Success();
}

ffi::Error AttentionGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                             ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                             ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                             ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                             ffi::ResultBuffer<ffi::F32> dv, float scale, int64_t window, bool rope) {
  Dims dm;
  if (auto e = CheckDims("oftjax_attention_grad", q, k, v, cos, sin, rope, scale, window, &dm); e.failure()) {
    return e;
  }
  if (dout.element_count() != q.element_count() ||
      dq->element_count() != q.element_count() || dk->element_count() != k.element_count() ||
      dv->element_count() != k.element_count() || lse.element_count() != static_cast<size_t>(dm.B * dm.H * dm.S)) {
    return ffi::Error::InvalidArgument(
        "oftjax_attention_grad: do and dq must have q's shape, dk and dv k's, lse [B, H, S]");
  }
#if OFTJAX_ATTN_X86
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data(), *lp = lse.typed_data(),
              *gp = dout.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  ParallelFor(pool, dm.B * dm.KV, [=](int64_t u) {
    thread_local Scratch s;
    Dispatch<BackwardRun>(dm.D, qp, kp, vp, lp, gp, dqp, dkp, dvp, dm, u / dm.KV, u % dm.KV, s);
  });
#endif
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OftjaxAttention, AttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [B, S, H, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k [B, S, KV, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v [B, S, KV, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cos [B, S, D] (with rope)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // sin [B, S, D] (with rope)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // o [B, S, H, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse [B, H, S]
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")  // 0: plain causal
                                  .Attr<bool>("rope"));     // rotate q and k by cos / sin first

XLA_FFI_DEFINE_HANDLER_SYMBOL(OftjaxAttentionGrad, AttentionGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cos
                                  .Arg<ffi::Buffer<ffi::F32>>()  // sin
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse, the forward's log-sum-exp
                                  .Arg<ffi::Buffer<ffi::F32>>()  // do, the output cotangent
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dv
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Attr<bool>("rope"));

// 1 when the kernels run for this head dim on this machine (AVX-512, a multiple of 16 up to 128), else 0.
extern "C" int OftjaxAttentionSupports(int64_t head_dim) { return Supported(head_dim) ? 1 : 0; }
