// x BD(R) for rows of x: the AVX-512 micro-kernel shared by rotate.cc (OFT rotations of activations and
// weights) and dequant4.cc (a 4-bit weight dequantized and rotated in one pass).
#ifndef OFTJAX_CSRC_ROTATE_ROWS_H_
#define OFTJAX_CSRC_ROTATE_ROWS_H_

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define OFTJAX_ROTATE_ROWS_X86 1
#define OFTJAX_ROTATE_AVX512 __attribute__((target("avx512f")))
#else
#define OFTJAX_ROTATE_ROWS_X86 0
#endif

namespace oftjax {

constexpr int64_t kMaxRotateBlock = 64;  // block sizes b = 16 * NV for NV in 1..4 (larger: XLA's GEMMs do better)

#if OFTJAX_ROTATE_ROWS_X86
// Token rows per pass over a block: as many as keep the accumulators and the block row within the 32 vector
// registers; nv <= 4.
constexpr int RowsPerPass(int nv) { return std::min(8, 24 / nv - 1); }

// y rows [t0, t1) = x BD(R) for b = 16 * NV; R[n][k][c] multiplies x's column n*b + k into y's column n*b + c.
// Each output is sum_k x[k] * R[k][c] accumulated in k order with fused multiply-adds. x and y rows are r * b
// floats long. Stream: y is written with non-temporal stores (y 64-byte aligned; the caller fences).
template <int NV, int TT, bool Stream>
OFTJAX_ROTATE_AVX512 void RotateRowsTile(const float* __restrict x, const float* __restrict R, float* __restrict y,
                                         int64_t r, int64_t t0, int64_t t1, int64_t n0, int64_t n1) {
  constexpr int B = 16 * NV;
  const int64_t d = r * B;
  for (int64_t n = n0; n < n1; ++n) {
    const float* Rn = R + n * B * B;
    for (int64_t t = t0; t < t1; t += TT) {
      __m512 acc[TT][NV];
      for (int tt = 0; tt < TT; ++tt)
        for (int v = 0; v < NV; ++v) acc[tt][v] = _mm512_setzero_ps();
      for (int k = 0; k < B; ++k) {
        const float* row = Rn + k * B;
        for (int v = 0; v < NV; ++v) {
          const __m512 rv = _mm512_loadu_ps(row + 16 * v);
          for (int tt = 0; tt < TT; ++tt)
            acc[tt][v] = _mm512_fmadd_ps(_mm512_set1_ps(x[(t + tt) * d + n * B + k]), rv, acc[tt][v]);
        }
      }
      for (int tt = 0; tt < TT; ++tt) {
        for (int v = 0; v < NV; ++v) {
          float* out = y + (t + tt) * d + n * B + 16 * v;
          if constexpr (Stream) {
            _mm512_stream_ps(out, acc[tt][v]);
          } else {
            _mm512_storeu_ps(out, acc[tt][v]);
          }
        }
      }
    }
  }
}

template <int NV, bool Stream>
OFTJAX_ROTATE_AVX512 void RotateRowsNV(const float* x, const float* R, float* y, int64_t r, int64_t t0, int64_t t1,
                                       int64_t n0, int64_t n1) {
  constexpr int TT = RowsPerPass(NV);
  const int64_t whole = t0 + (t1 - t0) / TT * TT;
  RotateRowsTile<NV, TT, Stream>(x, R, y, r, t0, whole, n0, n1);
  if constexpr (TT > 1) RotateRowsTile<NV, 1, Stream>(x, R, y, r, whole, t1, n0, n1);
}

using RotateRowsFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t, int64_t);

template <bool Stream, int... NV>
constexpr std::array<RotateRowsFn, sizeof...(NV)> RotateRowsTable(std::integer_sequence<int, NV...>) {
  return {&RotateRowsNV<NV + 1, Stream>...};
}
inline constexpr auto kRotateRows =
    RotateRowsTable<false>(std::make_integer_sequence<int, kMaxRotateBlock / 16>{});
inline constexpr auto kRotateRowsStream =
    RotateRowsTable<true>(std::make_integer_sequence<int, kMaxRotateBlock / 16>{});
#endif

inline bool RotateRowsAvx512() {
#if OFTJAX_ROTATE_ROWS_X86
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
#else
  return false;
#endif
}

// The block sizes the kernel runs on this machine.
inline bool RotateRowsSupported(int64_t b) {
  return RotateRowsAvx512() && b > 0 && b % 16 == 0 && b <= kMaxRotateBlock;
}

// y rows [t0, t1) = x BD(R) over blocks [n0, n1), for a supported block size b (RotateRowsSupported).
// stream: write y with non-temporal stores, for an output read back only after other work (y must be 64-byte
// aligned, which b = 16 * NV keeps for every row and block when y is; the caller fences: StreamFence).
inline void RotateRows(const float* x, const float* R, float* y, int64_t r, int64_t b, int64_t t0, int64_t t1,
                       int64_t n0, int64_t n1, bool stream = false) {
#if OFTJAX_ROTATE_ROWS_X86
  (stream ? kRotateRowsStream : kRotateRows)[b / 16 - 1](x, R, y, r, t0, t1, n0, n1);
#endif
}

// Orders a thread's non-temporal stores before what it does next (e.g. reporting its work done).
inline void StreamFence() {
#if OFTJAX_ROTATE_ROWS_X86
  _mm_sfence();
#endif
}

}  // namespace oftjax

#endif  // OFTJAX_CSRC_ROTATE_ROWS_H_
