// Native CPU kernel for y = x W^T with a bitsandbytes NF4/FP4 weight W [N, K] read from its packed bytes,
// registered with XLA through jax.ffi. For decoding: x has a few rows (M <= 16).
//
// Each weight element is fl32(code[nibble] * absmax[block]), the product dequant4.cc writes (subnormal products
// kept: the kernel clears FTZ/DAZ while it runs; double-quantized absmax rebuilt as dequant4.cc does), but the
// float32 weight is never written out: every 32 weights of a row (16 packed bytes) become two vectors through
// two in-register permutes of the block's 16 values (vpermps) and are multiplied into the M accumulators at
// once. The weight is read once per call, ~0.5 byte per parameter, where dequantize-then-matmul writes and
// reads 4 bytes per parameter.
//
// Summation order (the same in both paths, so the AVX-512 path and the portable scalar loop give the same
// bits): output (m, n) sums x[m, k] * w[n, k] in 16 lanes, k's lane being (k % 32) / 2; with M <= 8 each lane
// has two partial sums (even k, odd k), with M > 8 one. Each partial sum adds its terms in increasing k with
// fused multiply-adds; then the two partials are added lane by lane and the 16 lanes reduced pairwise (lane
// i + lane i + 8, then i + 4, i + 2, i + 1). Only the order differs from the dot of the dequantized weight.
//
// The AVX-512 path needs K and the blocksize to be multiples of 32 (every 32-weight group then starts a byte
// and lies in one block); other shapes and machines without AVX-512 take the scalar loop, which is slower than
// dequantizing and a GEMM: oftjax/cpu_kernels/_matmul4.py calls the kernel only where the AVX-512 path runs,
// and the scalar loop when a test forces it (vectorize=false).
//
// Built by setup.py as oftjax/cpu_kernels/_matmul4_cpu*.so and loaded by oftjax/cpu_kernels/_matmul4.py.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "cpu_state.h"
#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define OFTJAX_X86 1
#else
#define OFTJAX_X86 0
#endif

namespace ffi = xla::ffi;
using oftjax::HasAvx512;
using oftjax::KeepSubnormals;
using oftjax::ParallelFor;

namespace {

constexpr int kMaxRows = 16;            // rows of x the kernel takes
constexpr int64_t kItemWeights = 1 << 15;  // weights per work item (16 KiB packed)
constexpr int64_t kNestedBlocksize = 256;


// The operands of one call; scale[b - b0] is block b's absmax for the rows of a work item.
struct Problem {
  const float* x;  // [M, K]
  const uint8_t* packed;
  const float* code;  // [16]
  float* y;           // [M, N]
  int64_t M, N, K, blocksize;
};

// Partial sums per lane: two (even k, odd k) for up to 8 rows of x, one above (registers).
constexpr int Partials(int m) { return m <= 8 ? 2 : 1; }

// The pairwise reduction of 16 lanes (the order the AVX-512 path's Reduce16 uses).
inline float ReduceLanes(const float* v) {
  float a[8], b[4];
  for (int i = 0; i < 8; ++i) a[i] = v[i] + v[i + 8];
  for (int i = 0; i < 4; ++i) b[i] = a[i] + a[i + 4];
  const float c0 = b[0] + b[2], c1 = b[1] + b[3];
  return c0 + c1;
}

// Rows [n0, n1) of y with the portable loop, any K and blocksize.
void ScalarRows(const Problem& p, const float* scale, int64_t b0, int64_t n0, int64_t n1) {
  const int64_t M = p.M, K = p.K, bs = p.blocksize;
  const int parts = M <= 8 ? 2 : 1;
  std::vector<float> acc(static_cast<size_t>(M * 2 * 16));
  float table[16];
  for (int64_t n = n0; n < n1; ++n) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    const int64_t e0 = n * K;
    int64_t block = -1, block_end = 0;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t e = e0 + k;
      if (e >= block_end || block < 0) {
        block = e / bs;
        block_end = (block + 1) * bs;
        for (int i = 0; i < 16; ++i) table[i] = p.code[i] * scale[block - b0];
      }
      const uint8_t byte = p.packed[e >> 1];
      const float w = table[(e & 1) ? (byte & 15) : (byte >> 4)];
      const int64_t slot = (parts == 2 ? (k & 1) * 16 : 0) + (k % 32) / 2;
      for (int64_t m = 0; m < M; ++m) {
        float& a = acc[static_cast<size_t>(m * 32 + slot)];
        a = std::fma(p.x[m * K + k], w, a);
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      float v[16];
      const float* a = &acc[static_cast<size_t>(m * 32)];
      for (int i = 0; i < 16; ++i) v[i] = parts == 2 ? a[i] + a[16 + i] : a[i];
      p.y[m * p.N + n] = ReduceLanes(v);
    }
  }
}

#if OFTJAX_X86
#define OFTJAX_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

OFTJAX_AVX512 inline float Reduce16(__m512 v) {
  const __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
  return _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps(c, c, 1)));
}

// x de-interleaved per 32 columns, [16 even columns, 16 odd columns], matching the two weight vectors that
// 16 packed bytes become (high nibbles: even columns, low nibbles: odd ones). K is a multiple of 32.
void Deinterleave(const float* x, int64_t M, int64_t K, float* out) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < K; j += 32) {
      const float* src = x + m * K + j;
      float* dst = out + m * K + j;
      for (int t = 0; t < 16; ++t) {
        dst[t] = src[2 * t];
        dst[16 + t] = src[2 * t + 1];
      }
    }
  }
}

// Rows [n0, n1) of y for MT rows of x (de-interleaved, xs), K and blocksize multiples of 32.
template <int MT>
OFTJAX_AVX512 void Avx512Rows(const Problem& p, const float* xs, const float* scale, int64_t b0, int64_t n0,
                              int64_t n1) {
  constexpr int A = Partials(MT);
  const __m512 c = _mm512_loadu_ps(p.code);
  const int64_t K = p.K, bs = p.blocksize;
  for (int64_t n = n0; n < n1; ++n) {
    __m512 acc[A][MT];
    for (int a = 0; a < A; ++a) {
      for (int m = 0; m < MT; ++m) acc[a][m] = _mm512_setzero_ps();
    }
    const int64_t e0 = n * K;
    for (int64_t j = 0; j < K;) {
      const int64_t block = (e0 + j) / bs, end = std::min(K, (block + 1) * bs - e0);
      const __m512 table = _mm512_mul_ps(c, _mm512_set1_ps(scale[block - b0]));
      for (; j < end; j += 32) {
        const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.packed + (e0 + j) / 2)));
        const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(d, 4), table);  // even columns
        const __m512 lo = _mm512_permutexvar_ps(d, table);  // odd columns (vpermps reads the index's low 4 bits)
        for (int m = 0; m < MT; ++m) {
          const float* xm = xs + m * K + j;
          acc[0][m] = _mm512_fmadd_ps(_mm512_loadu_ps(xm), hi, acc[0][m]);
          acc[A - 1][m] = _mm512_fmadd_ps(_mm512_loadu_ps(xm + 16), lo, acc[A - 1][m]);
        }
      }
    }
    for (int m = 0; m < MT; ++m) {
      const __m512 v = A == 2 ? _mm512_add_ps(acc[0][m], acc[A - 1][m]) : acc[0][m];
      p.y[m * p.N + n] = Reduce16(v);
    }
  }
}

using RowsFn = void (*)(const Problem&, const float*, const float*, int64_t, int64_t, int64_t);

template <int... Ms>
RowsFn PickRows(int m, std::integer_sequence<int, Ms...>) {
  RowsFn fn = nullptr;
  ((fn = (m == Ms + 1 ? &Avx512Rows<Ms + 1> : fn)), ...);
  return fn;
}

#endif

// Double quantization: absmax[b] = fl32(fl32(dynamic[q[b]] * nested[b / 256]) + offset), as dequant4.cc
// (two roundings: the build passes -ffp-contract=off).
struct Nested {
  const uint8_t* q;
  const float* nested;
  const float* dynamic;
  float offset;

  void Absmax(int64_t b0, int64_t b1, float* out) const {
    for (int64_t b = b0; b < b1; ++b) {
      const float scaled = dynamic[q[b]] * nested[b / kNestedBlocksize];
      out[b - b0] = scaled + offset;
    }
  }
};

ffi::Error Matmul4(ffi::ThreadPool& pool, const Problem& p, const float* absmax, const Nested* nested,
                   bool vectorize) {
  if (p.M == 0 || p.N == 0) return ffi::Error::Success();
  if (p.K == 0) {
    std::fill(p.y, p.y + p.M * p.N, 0.0f);
    return ffi::Error::Success();
  }
  const int64_t nb = (p.N * p.K + p.blocksize - 1) / p.blocksize;
  std::vector<float> xs;
#if OFTJAX_X86
  RowsFn rows_fn = nullptr;
  if (vectorize && HasAvx512() && p.K % 32 == 0 && p.blocksize % 32 == 0) {
    rows_fn = PickRows(static_cast<int>(p.M), std::make_integer_sequence<int, kMaxRows>{});
    xs.resize(static_cast<size_t>(p.M * p.K));
    Deinterleave(p.x, p.M, p.K, xs.data());
  }
#endif
  const float* xsp = xs.data();
  const Nested nest = nested ? *nested : Nested{};
  const int64_t item_rows = std::max<int64_t>(1, kItemWeights / p.K);
  const int64_t items = (p.N + item_rows - 1) / item_rows;
  auto work = [&, xsp](int64_t item) {
    thread_local std::vector<float> local;
    KeepSubnormals keep;  // per thread: MXCSR is thread state
    const int64_t n0 = item * item_rows, n1 = std::min(p.N, n0 + item_rows);
    const int64_t b0 = n0 * p.K / p.blocksize, b1 = std::min(nb, (n1 * p.K + p.blocksize - 1) / p.blocksize);
    const float* scale = absmax == nullptr ? nullptr : absmax + b0;
    if (nested != nullptr) {
      local.resize(static_cast<size_t>(b1 - b0));
      nest.Absmax(b0, b1, local.data());
      scale = local.data();
    }
#if OFTJAX_X86
    if (rows_fn != nullptr) {
      rows_fn(p, xsp, scale, b0, n0, n1);
      return;
    }
#endif
    ScalarRows(p, scale, b0, n0, n1);
  };
  if (items <= 1) {
    work(0);
  } else {
    ParallelFor(pool, items, work);
  }
  return ffi::Error::Success();
}

ffi::Error Invalid(const std::string& what) { return ffi::Error::InvalidArgument("oftjax_matmul4: " + what); }

ffi::Error CheckCount(const char* what, size_t got, int64_t expected) {
  if (static_cast<int64_t>(got) != expected) {
    return Invalid(std::string(what) + " has " + std::to_string(got) + " values, expected " +
                   std::to_string(expected));
  }
  return ffi::Error::Success();
}

// The shapes of x [M, K], y [M, N] and the packed weight; fills p.
ffi::Error CheckProblem(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::U8>& packed,
                        const ffi::Buffer<ffi::F32>& code, ffi::Result<ffi::Buffer<ffi::F32>>& y,
                        int64_t blocksize, Problem* p) {
  const auto xd = x.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || yd.size() != 2 || xd[0] != yd[0]) {
    return Invalid("x must be [M, K] and y [M, N]");
  }
  if (xd[0] > kMaxRows) {
    return Invalid("x has " + std::to_string(xd[0]) + " rows, at most " + std::to_string(kMaxRows));
  }
  if (blocksize <= 0 || blocksize % 2 != 0) {
    return Invalid("blocksize must be even and positive, got " + std::to_string(blocksize));
  }
  *p = Problem{x.typed_data(), packed.typed_data(), code.typed_data(), y->typed_data(), xd[0], yd[1], xd[1],
               blocksize};
  if (static_cast<int64_t>(packed.element_count()) * 2 < p->N * p->K) {
    return Invalid("packed holds " + std::to_string(packed.element_count()) + " bytes, expected at least " +
                   std::to_string((p->N * p->K + 1) / 2));
  }
  return CheckCount("code", code.element_count(), 16);
}

int64_t Blocks(const Problem& p) { return (p.N * p.K + p.blocksize - 1) / p.blocksize; }

ffi::Error Matmul4Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> packed,
                       ffi::Buffer<ffi::F32> absmax, ffi::Buffer<ffi::F32> code,
                       ffi::Result<ffi::Buffer<ffi::F32>> y, int64_t blocksize, bool vectorize) {
  Problem p;
  if (auto e = CheckProblem(x, packed, code, y, blocksize, &p); e.failure()) return e;
  if (auto e = CheckCount("absmax", absmax.element_count(), Blocks(p)); e.failure()) return e;
  return Matmul4(pool, p, absmax.typed_data(), nullptr, vectorize);
}

ffi::Error Matmul4NestedImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> packed,
                             ffi::Buffer<ffi::U8> qabsmax, ffi::Buffer<ffi::F32> nested_absmax,
                             ffi::Buffer<ffi::F32> offset, ffi::Buffer<ffi::F32> dynamic,
                             ffi::Buffer<ffi::F32> code, ffi::Result<ffi::Buffer<ffi::F32>> y, int64_t blocksize,
                             bool vectorize) {
  Problem p;
  if (auto e = CheckProblem(x, packed, code, y, blocksize, &p); e.failure()) return e;
  const int64_t nb = Blocks(p), n2 = (nb + kNestedBlocksize - 1) / kNestedBlocksize;
  if (auto e = CheckCount("absmax", qabsmax.element_count(), nb); e.failure()) return e;
  if (auto e = CheckCount("nested_absmax", nested_absmax.element_count(), n2); e.failure()) return e;
  if (auto e = CheckCount("offset", offset.element_count(), 1); e.failure()) return e;
  if (auto e = CheckCount("dynamic code", dynamic.element_count(), 256); e.failure()) return e;
  const Nested nested{qabsmax.typed_data(), nested_absmax.typed_data(), dynamic.typed_data(),
                      offset.typed_data()[0]};
  return Matmul4(pool, p, nullptr, &nested, vectorize);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OftjaxMatmul4, Matmul4Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, K], M <= 16
                                  .Arg<ffi::Buffer<ffi::U8>>()   // packed bytes (at least ceil(N K / 2))
                                  .Arg<ffi::Buffer<ffi::F32>>()  // absmax [ceil(N K / blocksize)]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // code table [16]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y = x W^T [M, N]
                                  .Attr<int64_t>("blocksize")
                                  .Attr<bool>("vectorize"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(OftjaxMatmul4Nested, Matmul4NestedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, K], M <= 16
                                  .Arg<ffi::Buffer<ffi::U8>>()   // packed bytes (at least ceil(N K / 2))
                                  .Arg<ffi::Buffer<ffi::U8>>()   // absmax codes [ceil(N K / blocksize)]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // nested absmax [ceil(blocks / 256)]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // offset []
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dynamic 8-bit code [256]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // code table [16]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y = x W^T [M, N]
                                  .Attr<int64_t>("blocksize")
                                  .Attr<bool>("vectorize"));

// 1 when this machine runs the AVX-512 path (reported by oftjax.cpu_kernels.info()).
extern "C" int OftjaxMatmul4HasAvx512() { return HasAvx512() ? 1 : 0; }
