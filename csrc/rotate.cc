// Native CPU kernels for OFT's block-diagonal rotation of activations, registered with XLA through jax.ffi.
//
// For x [T, r*b] (row-major, float32) and rotation blocks R [r, b, b]:
//   OftjaxRotate:      y[t, n*b + c] = sum_k x[t, n*b + k] * R[n, k, c]     (x BD(R))
//   OftjaxRotateGrad:  dx[t, n*b + k] = sum_c g[t, n*b + c] * R[n, k, c]   (g BD(R)^T)
//                      dR[n, k, c]    = sum_t x[t, n*b + k] * g[t, n*b + c]
//   OftjaxCayleyNeumann:     R[n] = I + sum_k c_k Q[n]^k, Q[n] the skew-symmetric block of parameter row n
//   OftjaxCayleyNeumannGrad: d vec[n] from dR[n] (the series' reverse mode, then the skew map's transpose)
//
// Why a native kernel: XLA:CPU runs x BD(R) as a batched matmul over blocks, which needs x transposed to
// [r, T, b] and the result transposed back; those copies run far below memory bandwidth and cost more than the
// arithmetic (benchmarks/profile_train.py, label oft_rotate). Here each token row's blocks are read and written
// in place: the b x b block stays in L1, a few token rows are rotated per pass over it, and the accumulators of a
// block row stay in vector registers (the block size is a template parameter: 16, 32, 48 and 64; other sizes, and
// machines without AVX-512, take the XLA path). The forward micro-kernel is rotate_rows.h, which dequant4.cc
// also uses to rotate a weight as it is dequantized.
//
// The Cayley-Neumann kernels build the rotation blocks from the trainable parameters (PEFT's series, see
// oftjax/oft/_cayley.py for the coefficients): XLA runs each adapter's build as many small ops (scatter,
// batched b x b matmuls, adds, and their transposes); here one call per direction for all blocks keeps each
// block in L1 and multiplies with the same row micro-kernel (forward: K-1 products for K powers; backward:
// 2(K-1), see SeriesBackward). Sums are in k order with fused multiply-adds; the forward's additions are
// PEFT's, in PEFT's order (R = I; R += 2Q; R += 2Q^2; ...). Figures: benchmarks/RESULTS.md.
//
// Determinism: every output element is one thread's sum in a fixed order. dR sums over tokens in fixed chunks
// of kGradChunk tokens (each chunk's partial sum is written to its own slot), then adds the chunk partials in
// chunk order: the result does not depend on the number of threads or on which thread ran which chunk.
//
// Built by setup.py as oftjax/nn/_rotate_cpu*.so and loaded by oftjax/nn/_native_rotate.py with ctypes.

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "parallel_for.h"
#include "rotate_rows.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using oftjax::ParallelFor;
using oftjax::RotateRows;

namespace {

constexpr int64_t kRowChunk = 32;    // token rows per work item of the forward / dx pass
constexpr int64_t kGradChunk = 128;  // token rows per partial dR sum (fixed: it sets the summation order)
constexpr int64_t kMaxBlock = oftjax::kMaxRotateBlock;

#if OFTJAX_ROTATE_ROWS_X86
#define OFTJAX_AVX512 __attribute__((target("avx512f")))

// Block rows per pass over the tokens (dR), a power of two, so it divides b.
constexpr int BlockRowsPerPass(int nv) { return nv == 1 ? 16 : nv == 2 ? 8 : 4; }

// out[n][k][c] = sum over t in [t0, t1) of x[t, n*b + k] * g[t, n*b + c] (t ascending, fused multiply-adds),
// blocks n in [n0, n1).
template <int NV>
OFTJAX_AVX512 void BlockGramNV(const float* __restrict x, const float* __restrict g, float* __restrict out,
                               int64_t r, int64_t t0, int64_t t1, int64_t n0, int64_t n1) {
  constexpr int B = 16 * NV, KT = BlockRowsPerPass(NV);
  const int64_t d = r * B;
  for (int64_t n = n0; n < n1; ++n) {
    for (int k0 = 0; k0 < B; k0 += KT) {
      __m512 acc[KT][NV];
      for (int kk = 0; kk < KT; ++kk)
        for (int v = 0; v < NV; ++v) acc[kk][v] = _mm512_setzero_ps();
      for (int64_t t = t0; t < t1; ++t) {
        const float* gr = g + t * d + n * B;
        const float* xr = x + t * d + n * B + k0;
        for (int v = 0; v < NV; ++v) {
          const __m512 gv = _mm512_loadu_ps(gr + 16 * v);
          for (int kk = 0; kk < KT; ++kk) acc[kk][v] = _mm512_fmadd_ps(_mm512_set1_ps(xr[kk]), gv, acc[kk][v]);
        }
      }
      for (int kk = 0; kk < KT; ++kk)
        for (int v = 0; v < NV; ++v) _mm512_storeu_ps(out + (n * B + k0 + kk) * B + 16 * v, acc[kk][v]);
    }
  }
}

// (x, g, out, r, t0, t1, n0, n1): token rows [t0, t1), blocks [n0, n1)
using GramFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t, int64_t);

template <int... NV>
constexpr std::array<GramFn, sizeof...(NV)> GramTable(std::integer_sequence<int, NV...>) {
  return {&BlockGramNV<NV + 1>...};
}
constexpr auto kGram = GramTable(std::make_integer_sequence<int, kMaxBlock / 16>{});
#endif

bool Supported(int64_t b) { return oftjax::RotateRowsSupported(b); }

void BlockGram(const float* x, const float* g, float* out, int64_t r, int64_t b, int64_t t0, int64_t t1,
               int64_t n0, int64_t n1) {
#if OFTJAX_ROTATE_ROWS_X86
  kGram[b / 16 - 1](x, g, out, r, t0, t1, n0, n1);
#endif
}

// R^T per block, [r, b, b], into out.
void TransposeBlocks(const float* R, int64_t r, int64_t b, float* out) {
  for (int64_t n = 0; n < r; ++n)
    for (int64_t k = 0; k < b; ++k)
      for (int64_t c = 0; c < b; ++c) out[(n * b + c) * b + k] = R[(n * b + k) * b + c];
}

// Reused per-thread buffers (sized up as needed, never shrunk): a train step makes hundreds of these calls, and
// a fresh allocation of each, from a heap that holds XLA's step buffers, showed up in profiles (_int_malloc).
float* ThreadBuffer(std::vector<float>& buffer, int64_t floats) {
  if (buffer.size() < static_cast<size_t>(floats)) buffer.resize(static_cast<size_t>(floats));
  return buffer.data();
}

// Blocks [count, b, b] (count named by `count` in the message) with a block size the kernels run here.
ffi::Error CheckBlocks(const char* target, ffi::Span<const int64_t> bd, const char* count) {
  if (bd.size() != 3 || bd[1] != bd[2]) {
    return ffi::Error::InvalidArgument(std::string(target) + ": rotation blocks must be [" + count + ", b, b]");
  }
  if (!Supported(bd[1])) {
    return ffi::Error::InvalidArgument(std::string(target) + ": block size " + std::to_string(bd[1]) +
                                       " needs AVX-512 and a multiple of 16 up to " + std::to_string(kMaxBlock));
  }
  return ffi::Error::Success();
}

// Shapes: x (and g) [..., d] with d = r * b; R [r, b, b] with a supported b.
ffi::Error CheckShapes(const char* target, const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& R,
                       int64_t* tokens, int64_t* r, int64_t* b) {
  const auto rd = R.dimensions();
  if (auto e = CheckBlocks(target, rd, "r"); e.failure()) return e;
  const auto xd = x.dimensions();
  if (xd.size() < 1 || xd[xd.size() - 1] != rd[0] * rd[1]) {
    return ffi::Error::InvalidArgument(std::string(target) + ": x's last dimension must be r * b = " +
                                       std::to_string(rd[0] * rd[1]));
  }
  *r = rd[0];
  *b = rd[1];
  *tokens = *r == 0 ? 0 : static_cast<int64_t>(x.element_count()) / (*r * *b);
  return ffi::Error::Success();
}

ffi::Error RotateImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> R,
                      ffi::ResultBuffer<ffi::F32> y) {
  int64_t tokens, r, b;
  if (auto e = CheckShapes("oftjax_rotate", x, R, &tokens, &r, &b); e.failure()) return e;
  if (y->element_count() != x.element_count()) {
    return ffi::Error::InvalidArgument("oftjax_rotate: the output must have x's shape");
  }
  const float* Rp = R.typed_data();
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  const int64_t chunks = (tokens + kRowChunk - 1) / kRowChunk;
  ParallelFor(pool, chunks, [=](int64_t c) {
    RotateRows(xp, Rp, yp, r, b, c * kRowChunk, std::min(tokens, (c + 1) * kRowChunk), 0, r);
  });
  return ffi::Error::Success();
}

ffi::Error RotateGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                          ffi::Buffer<ffi::F32> R, ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dR) {
  int64_t tokens, r, b;
  if (auto e = CheckShapes("oftjax_rotate_grad", x, R, &tokens, &r, &b); e.failure()) return e;
  if (g.element_count() != x.element_count() || dx->element_count() != x.element_count() ||
      dR->element_count() != R.element_count()) {
    return ffi::Error::InvalidArgument("oftjax_rotate_grad: g and dx must have x's shape, dR the blocks' shape");
  }
  const int64_t block_elems = r * b * b;
  const int64_t chunks = std::max<int64_t>((tokens + kGradChunk - 1) / kGradChunk, 1);
  thread_local std::vector<float> transposed, partials;
  float* Rtp = ThreadBuffer(transposed, block_elems);
  TransposeBlocks(R.typed_data(), r, b, Rtp);
  // every chunk writes its whole slot (BlockGram stores each block), so no zero fill first
  float* pp = ThreadBuffer(partials, chunks * block_elems);
  const float *xp = x.typed_data(), *gp = g.typed_data();
  float* dxp = dx->typed_data();
  // dx bypasses the caches (non-temporal stores): it is read next by XLA's ops only after the other
  // projections' gradients, and writing it through the caches would first read each line in
  const bool stream = reinterpret_cast<uintptr_t>(dxp) % 64 == 0;
  ParallelFor(pool, chunks, [=](int64_t c) {
    const int64_t t0 = c * kGradChunk, t1 = std::min(tokens, t0 + kGradChunk);
    for (int64_t n = 0; n < r; ++n) {  // block by block: the chunk's g and x columns stay in L1 for both
      RotateRows(gp, Rtp, dxp, r, b, t0, t1, n, n + 1, stream);
      BlockGram(xp, gp, pp + c * block_elems, r, b, t0, t1, n, n + 1);
    }
    oftjax::StreamFence();
  });
  float* out = dR->typed_data();
  if (block_elems > 0) std::memcpy(out, pp, sizeof(float) * static_cast<size_t>(block_elems));
  for (int64_t c = 1; c < chunks; ++c) {
    const float* p = pp + c * block_elems;
    for (int64_t i = 0; i < block_elems; ++i) out[i] += p[i];
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------------------
// Cayley-Neumann rotation blocks from OFT parameters.

// c_1..c_K of R = I + sum_k c_k Q^k for PEFT's num_cayley_neumann_terms t (oftjax/oft/_cayley.py):
// t = 1: none; t = 2: {2}; legacy (PEFT 0.16-0.17): 2 for k = 1..t-1; else {2, 2, 1} for t = 3, 4 and
// 2 for k = 1..t-2, 1 for k = t-1 when t >= 5.
std::vector<float> NeumannCoefficients(int64_t terms, bool legacy) {
  if (terms <= 1) return {};
  if (terms == 2) return {2.0f};
  if (legacy) return std::vector<float>(static_cast<size_t>(terms - 1), 2.0f);
  std::vector<float> c(static_cast<size_t>(std::max<int64_t>(terms - 1, 3)), 2.0f);
  c.back() = 1.0f;
  return c;
}

#if OFTJAX_ROTATE_ROWS_X86
#define OFTJAX_SERIES_TARGET __attribute__((target("avx512f")))  // the element loops below vectorize 16 wide
#else
#define OFTJAX_SERIES_TARGET
#endif

// Q = S - S^T with S's strict upper triangle = vec, row by row (torch.triu_indices order), as skew_from_vec
// computes it (0 - v below the diagonal, v - 0 above, 0 - 0 on it).
OFTJAX_SERIES_TARGET void SkewFromVec(const float* vec, int64_t b, float* Q) {
  for (int64_t i = 0; i < b * b; ++i) Q[i] = 0.0f;
  for (int64_t i = 0, e = 0; i < b; ++i) {
    for (int64_t j = i + 1; j < b; ++j, ++e) {
      Q[i * b + j] = vec[e];
      Q[j * b + i] = 0.0f - vec[e];
    }
  }
}

// C = A B for b x b blocks (the row micro-kernel with one block per row).
void MatMulBlock(const float* A, const float* B, float* C, int64_t b) { RotateRows(A, B, C, 1, b, 0, b, 0, 1); }

// Per-thread scratch: six b x b blocks.
struct SeriesScratch {
  explicit SeriesScratch(int64_t b) : bb(b * b) {
    thread_local std::vector<float> buffer;
    data = ThreadBuffer(buffer, 6 * bb);
  }
  float* Block(int i) { return data + i * bb; }
  int64_t bb;
  float* data;
};

constexpr int64_t kSeriesBlocksPerChunk = 2;  // rotation blocks per work item

// block(i, scratch) for the n rotation blocks, kSeriesBlocksPerChunk per work item, with the thread's scratch.
template <typename Block>
void ForEachSeriesBlock(ffi::ThreadPool& pool, int64_t n, int64_t b, const Block& block) {
  const int64_t chunks = (n + kSeriesBlocksPerChunk - 1) / kSeriesBlocksPerChunk;
  ParallelFor(pool, chunks, [=, &block](int64_t ch) {
    SeriesScratch s(b);
    const int64_t end = std::min(n, (ch + 1) * kSeriesBlocksPerChunk);
    for (int64_t i = ch * kSeriesBlocksPerChunk; i < end; ++i) block(i, s);
  });
}

// R = I + sum_k c[k-1] Q^k with Q^k = Q^(k-1) Q, each term added to R in k order.
OFTJAX_SERIES_TARGET void SeriesForward(const float* vec, int64_t b, const std::vector<float>& c,
                                        SeriesScratch& s, float* R) {
  const int64_t bb = b * b;
  float *Q = s.Block(0), *next = s.Block(1), *spare = s.Block(2);
  SkewFromVec(vec, b, Q);
  for (int64_t i = 0; i < b; ++i)
    for (int64_t j = 0; j < b; ++j) R[i * b + j] = i == j ? 1.0f : 0.0f;
  const float* P = Q;
  for (size_t k = 1; k <= c.size(); ++k) {
    if (k > 1) {
      MatMulBlock(P, Q, next, b);
      P = next;
      std::swap(next, spare);
    }
    const float ck = c[k - 1];
    for (int64_t i = 0; i < bb; ++i) R[i] = R[i] + ck * P[i];  // ck * P is exact (ck is 1 or 2)
  }
}

// d vec from dR. R = I + sum_k c_k Q^k gives dQ = sum_k c_k sum_{j<k} (Q^T)^j dR (Q^T)^(k-1-j), evaluated
// Horner-like from both sides: A_K = c_K dR, A_(k-1) = A_k Q^T + c_(k-1) dR (the right factors) and
// H = A_K, H = A_(k-1) + Q^T H (the left ones), so dQ = H after K-1 steps: 2(K-1) b x b products and no
// powers of Q. Then d vec = dQ - dQ^T on the strict upper triangle (the transpose of Q = S - S^T).
OFTJAX_SERIES_TARGET void SeriesBackward(const float* vec, const float* dR, int64_t b, const std::vector<float>& c,
                                         SeriesScratch& s, float* dvec) {
  const int64_t K = static_cast<int64_t>(c.size()), bb = b * b;
  if (K == 0) {
    for (int64_t e = 0; e < b * (b - 1) / 2; ++e) dvec[e] = 0.0f;
    return;
  }
  float *Q = s.Block(0), *Qt = s.Block(1), *A = s.Block(2), *H = s.Block(3), *right = s.Block(4),
        *left = s.Block(5);
  SkewFromVec(vec, b, Q);
  TransposeBlocks(Q, 1, b, Qt);
  const float cK = c[K - 1];
  for (int64_t i = 0; i < bb; ++i) A[i] = H[i] = cK * dR[i];
  for (int64_t k = K - 1; k >= 1; --k) {
    MatMulBlock(A, Qt, right, b);
    MatMulBlock(Qt, H, left, b);
    const float ck = c[k - 1];
    for (int64_t i = 0; i < bb; ++i) {
      A[i] = right[i] + ck * dR[i];
      H[i] = A[i] + left[i];
    }
  }
  for (int64_t i = 0, e = 0; i < b; ++i)
    for (int64_t j = i + 1; j < b; ++j, ++e) dvec[e] = H[i * b + j] - H[j * b + i];
}

// vec [n, b(b-1)/2] and blocks [n, b, b] with a supported b; returns n and b.
ffi::Error CheckSeriesShapes(const char* target, const ffi::Buffer<ffi::F32>& vec, ffi::Span<const int64_t> bd,
                             int64_t terms, int64_t* n, int64_t* b) {
  if (auto e = CheckBlocks(target, bd, "n"); e.failure()) return e;
  const auto vd = vec.dimensions();
  const int64_t m = bd[1] * (bd[1] - 1) / 2;
  if (vd.size() != 2 || vd[0] != bd[0] || vd[1] != m) {
    return ffi::Error::InvalidArgument(std::string(target) + ": parameters must be [" + std::to_string(bd[0]) +
                                       ", " + std::to_string(m) + "] for blocks of size " + std::to_string(bd[1]));
  }
  if (terms < 1) {
    return ffi::Error::InvalidArgument(std::string(target) + ": terms must be >= 1; got " + std::to_string(terms));
  }
  *n = bd[0];
  *b = bd[1];
  return ffi::Error::Success();
}

ffi::Error CayleyNeumannImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> vec, ffi::ResultBuffer<ffi::F32> R,
                             int64_t terms, bool legacy) {
  int64_t n, b;
  if (auto e = CheckSeriesShapes("oftjax_cayley_neumann", vec, R->dimensions(), terms, &n, &b); e.failure()) {
    return e;
  }
  const std::vector<float> c = NeumannCoefficients(terms, legacy);
  const float* vp = vec.typed_data();
  float* Rp = R->typed_data();
  const int64_t m = b * (b - 1) / 2;
  ForEachSeriesBlock(pool, n, b, [=, &c](int64_t i, SeriesScratch& s) {
    SeriesForward(vp + i * m, b, c, s, Rp + i * b * b);
  });
  return ffi::Error::Success();
}

ffi::Error CayleyNeumannGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> vec, ffi::Buffer<ffi::F32> dR,
                                 ffi::ResultBuffer<ffi::F32> dvec, int64_t terms, bool legacy) {
  int64_t n, b;
  if (auto e = CheckSeriesShapes("oftjax_cayley_neumann_grad", vec, dR.dimensions(), terms, &n, &b); e.failure()) {
    return e;
  }
  if (dvec->element_count() != vec.element_count()) {
    return ffi::Error::InvalidArgument("oftjax_cayley_neumann_grad: d vec must have the parameters' shape");
  }
  const std::vector<float> c = NeumannCoefficients(terms, legacy);
  const float *vp = vec.typed_data(), *gp = dR.typed_data();
  float* dp = dvec->typed_data();
  const int64_t m = b * (b - 1) / 2;
  ForEachSeriesBlock(pool, n, b, [=, &c](int64_t i, SeriesScratch& s) {
    SeriesBackward(vp + i * m, gp + i * b * b, b, c, s, dp + i * m);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OftjaxRotate, RotateImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [..., r * b]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // R [r, b, b]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y, x's shape

XLA_FFI_DEFINE_HANDLER_SYMBOL(OftjaxRotateGrad, RotateGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [..., r * b], the forward's input
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g, the output cotangent, x's shape
                                  .Arg<ffi::Buffer<ffi::F32>>()  // R [r, b, b]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx, x's shape
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dR [r, b, b]

XLA_FFI_DEFINE_HANDLER_SYMBOL(OftjaxCayleyNeumann, CayleyNeumannImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // vec [n, b(b-1)/2]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // R [n, b, b]
                                  .Attr<int64_t>("terms")        // PEFT's num_cayley_neumann_terms
                                  .Attr<bool>("legacy"));        // PEFT 0.16-0.17 series

XLA_FFI_DEFINE_HANDLER_SYMBOL(OftjaxCayleyNeumannGrad, CayleyNeumannGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // vec [n, b(b-1)/2]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dR [n, b, b]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d vec, vec's shape
                                  .Attr<int64_t>("terms")
                                  .Attr<bool>("legacy"));

// 1 when the kernels run for block size b on this machine (AVX-512, b a multiple of 16 up to 64), else 0.
extern "C" int OftjaxRotateSupports(int64_t b) { return Supported(b) ? 1 : 0; }
