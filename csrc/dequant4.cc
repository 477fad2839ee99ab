// Native CPU kernel for bitsandbytes NF4/FP4 dequantization, registered with XLA through jax.ffi.
//
// out[i] = dtype(fl32(code[nibble(i)] * absmax[i / blocksize])): one float32 multiply, one round-to-nearest-even
// cast, exactly bitsandbytes' default torch kernel (bitsandbytes/backends/default/ops.py,
// _dequantize_4bit_compute); byte k holds element 2k in its high nibble and 2k+1 in its low nibble.
//
// Why a native kernel: XLA:CPU (jax 0.10) writes the interleaved nibble halves with one scalar store per element;
// here a block's 16 possible outputs are computed once (16 multiplies in one AVX-512 register) and every 16 bytes
// of the packed input become 32 outputs through one in-register permute (vpermw / vpermps), stored as whole
// vectors. Machines without AVX-512 (and the ragged last block) take a portable scalar loop with the same
// arithmetic. The float32 product keeps subnormals (bnb does; XLA:CPU runs its threads with FTZ/DAZ, so the
// kernel clears those MXCSR bits while it runs and restores them after).
//
// Conversions follow torch (c10/util/BFloat16.h round_to_nearest_even, c10/util/Half.h
// fp16_ieee_from_fp32_value): bf16 NaN -> 0x7FC0, f16 NaN -> sign | 0x7E00.
//
// Built by setup.py as oftjax/quant/_dequant4_cpu*.so and loaded by oftjax/quant/_native.py with ctypes.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "cpu_state.h"
#include "parallel_for.h"
#include "rotate_rows.h"
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

inline uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// c10::detail::round_to_nearest_even
inline uint16_t ToBf16(float f) {
  if (std::isnan(f)) return 0x7FC0;
  const uint32_t u = Bits(f);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// c10::detail::fp16_ieee_from_fp32_value (needs float32 subnormals kept, which the caller ensures)
inline uint16_t ToF16(float f) {
  const float scale_to_inf = FromBits(0x77800000u);   // 0x1.0p+112f
  const float scale_to_zero = FromBits(0x08800000u);  // 0x1.0p-110f
  float base = (std::fabs(f) * scale_to_inf) * scale_to_zero;
  const uint32_t w = Bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = FromBits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = Bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

inline float ToF32(float f) { return f; }


// Elements [start, end) of block `b` with the portable loop; start is even.
template <typename T, T (*Convert)(float)>
void ScalarBlock(const uint8_t* packed, float absmax, const float* code, T* out, int64_t start, int64_t end) {
  T table[16];
  for (int k = 0; k < 16; ++k) table[k] = Convert(code[k] * absmax);
  for (int64_t i = start; i < end; i += 2) {
    const uint8_t byte = packed[i >> 1];
    out[i] = table[byte >> 4];
    if (i + 1 < end) out[i + 1] = table[byte & 15];
  }
}

enum class Kind { kF32, kF16, kBF16 };

#if OFTJAX_X86
#define OFTJAX_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

OFTJAX_AVX512 inline __m256i RoundBf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

OFTJAX_AVX512 inline __m256i RoundF16(__m512 v) {
  const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512i u = _mm512_castps_si512(v);
  const __m512i nan_bits = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x8000)),
                                           _mm512_set1_epi32(0x7E00));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm256_mask_mov_epi16(h, nan, _mm512_cvtepi32_epi16(nan_bits));
}

// 64-byte stores; kStream: non-temporal (needs a 64-byte aligned address), for outputs larger than the cache:
// they skip the read-for-ownership of each line, and the lines would be evicted before use anyway.
template <bool kStream>
OFTJAX_AVX512 inline void Store(void* dst, __m512i v) {
  if constexpr (kStream) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), v);
  } else {
    _mm512_storeu_si512(dst, v);
  }
}

// Whole blocks [b0, b1) (absmax[b - b0] scales block b), 16-bit outputs; blocksize a multiple of 32.
template <Kind K, bool kStream>
OFTJAX_AVX512 void Avx512Blocks16(const uint8_t* packed, const float* absmax, const float* code, uint16_t* out,
                                  int64_t blocksize, int64_t b0, int64_t b1) {
  const __m512 c = _mm512_loadu_ps(code);
  const __m512i low4 = _mm512_set1_epi32(15);
  for (int64_t b = b0; b < b1; ++b) {
    const __m512 v = _mm512_mul_ps(c, _mm512_set1_ps(absmax[b - b0]));
    const __m512i table = _mm512_zextsi256_si512(K == Kind::kBF16 ? RoundBf16(v) : RoundF16(v));
    const uint8_t* p = packed + b * (blocksize / 2);
    uint16_t* o = out + b * blocksize;
    for (int64_t j = 0; j < blocksize / 2; j += 16) {
      const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j)));
      // dword k = (high nibble) | (low nibble) << 16: as 16-bit words, the output order hi0 lo0 hi1 lo1 ...
      const __m512i idx = _mm512_or_si512(_mm512_srli_epi32(d, 4), _mm512_slli_epi32(_mm512_and_si512(d, low4), 16));
      Store<kStream>(o + 2 * j, _mm512_permutexvar_epi16(idx, table));
    }
  }
  if constexpr (kStream) _mm_sfence();
}

// Whole blocks [b0, b1) (absmax[b - b0] scales block b), float32 outputs; blocksize a multiple of 16.
template <bool kStream>
OFTJAX_AVX512 void Avx512BlocksF32(const uint8_t* packed, const float* absmax, const float* code, float* out,
                                   int64_t blocksize, int64_t b0, int64_t b1) {
  const __m512 c = _mm512_loadu_ps(code);
  const __m256i low4 = _mm256_set1_epi32(15);
  for (int64_t b = b0; b < b1; ++b) {
    const __m512 table = _mm512_mul_ps(c, _mm512_set1_ps(absmax[b - b0]));
    const uint8_t* p = packed + b * (blocksize / 2);
    float* o = out + b * blocksize;
    for (int64_t j = 0; j < blocksize / 2; j += 8) {
      const __m256i d = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + j)));
      const __m256i pairs = _mm256_or_si256(_mm256_srli_epi32(d, 4), _mm256_slli_epi32(_mm256_and_si256(d, low4), 16));
      const __m512 values = _mm512_permutexvar_ps(_mm512_cvtepu16_epi32(pairs), table);
      Store<kStream>(o + 2 * j, _mm512_castps_si512(values));
    }
  }
  if constexpr (kStream) _mm_sfence();
}

#endif

// Faults in the pages of out[begin, end) with one system call, before the kernel writes them. A fresh output
// buffer (XLA maps large buffers afresh) otherwise takes one page fault per 4 KiB on first write, which costs
// more than the dequantize itself; one system call per chunk is cheaper than a fault per page. Used when huge
// pages are not advised (with them, the walk over already-present pages costs more than the few faults it
// saves). Best effort: present pages are left as they are; kernels without MADV_POPULATE_WRITE (Linux < 5.14)
// just fault on write as before.
void Prefault(void* out, int64_t begin_byte, int64_t end_byte) {
#if defined(__linux__) && defined(MADV_POPULATE_WRITE)
  static const int64_t page = sysconf(_SC_PAGESIZE);
  const uintptr_t base = reinterpret_cast<uintptr_t>(out);
  const uintptr_t lo = (base + begin_byte + page - 1) / page * page;  // whole pages inside the range only
  const uintptr_t hi = (base + end_byte) / page * page;
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_POPULATE_WRITE);
#else
  (void)out, (void)begin_byte, (void)end_byte;
#endif
}

// Asks Linux to back the 2 MiB-aligned interior of out[0, bytes) with transparent huge pages (madvise mode
// THP, the default on most distributions): a fresh 32 MiB output then takes 16 faults instead of 8192
// (benchmarks/RESULTS.md has the effect on a 4096 x 4096 bf16 dequantize). The same hint glibc gives its heap
// with glibc.malloc.hugetlb=1; it only affects how the range is backed. Off with OFTJAX_HUGEPAGES=0.
void AdviseHugePages(void* out, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t base = reinterpret_cast<uintptr_t>(out);
  const uintptr_t lo = (base + kHuge - 1) / kHuge * kHuge, hi = (base + bytes) / kHuge * kHuge;
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)out, (void)bytes;
#endif
}

// Blocks [b0, b1) of the output; only the last block of the tensor may be ragged. absmax[b - b0] scales block b.
void RunBlocks(Kind kind, const uint8_t* packed, const float* absmax, const float* code, void* out, int64_t n,
               int64_t blocksize, int64_t b0, int64_t b1, bool vector, bool stream, bool prefault) {
  if (prefault) {
    const int64_t width = kind == Kind::kF32 ? 4 : 2;
    Prefault(out, b0 * blocksize * width, std::min(n, b1 * blocksize) * width);
  }
  const int64_t whole_end = std::min(b1, n / blocksize);  // blocks entirely inside [0, n)
  int64_t b = b0;
  if (vector && whole_end > b0) {
#if OFTJAX_X86
    switch (kind) {
      case Kind::kBF16:
        (stream ? Avx512Blocks16<Kind::kBF16, true> : Avx512Blocks16<Kind::kBF16, false>)(
            packed, absmax, code, static_cast<uint16_t*>(out), blocksize, b0, whole_end);
        break;
      case Kind::kF16:
        (stream ? Avx512Blocks16<Kind::kF16, true> : Avx512Blocks16<Kind::kF16, false>)(
            packed, absmax, code, static_cast<uint16_t*>(out), blocksize, b0, whole_end);
        break;
      case Kind::kF32:
        (stream ? Avx512BlocksF32<true> : Avx512BlocksF32<false>)(packed, absmax, code, static_cast<float*>(out),
                                                                  blocksize, b0, whole_end);
        break;
    }
    b = whole_end;
#endif
  }
  for (; b < b1; ++b) {
    const int64_t start = b * blocksize, end = std::min(n, start + blocksize);
    switch (kind) {
      case Kind::kBF16:
        ScalarBlock<uint16_t, ToBf16>(packed, absmax[b - b0], code, static_cast<uint16_t*>(out), start, end);
        break;
      case Kind::kF16:
        ScalarBlock<uint16_t, ToF16>(packed, absmax[b - b0], code, static_cast<uint16_t*>(out), start, end);
        break;
      case Kind::kF32:
        ScalarBlock<float, ToF32>(packed, absmax[b - b0], code, static_cast<float*>(out), start, end);
        break;
    }
  }
}

constexpr int64_t kValuesPerChunk = 1 << 16;
constexpr int64_t kStreamBytes = int64_t{16} << 20;

// Double quantization: absmax[b] = fl32(fl32(dynamic[q[b]] * nested[b / 256]) + offset), bnb's
// dequantize_blockwise then `+ offset` (two roundings: the build passes -ffp-contract=off, so no FMA).
constexpr int64_t kNestedBlocksize = 256;

struct Nested {
  const uint8_t* q;
  const float* nested;
  const float* dynamic;
  float offset;

  // absmax of blocks [b0, b1) into out[0, b1 - b0)
  void Absmax(int64_t b0, int64_t b1, float* out) const {
    for (int64_t b = b0; b < b1; ++b) {
      const float scaled = dynamic[q[b]] * nested[b / kNestedBlocksize];
      out[b - b0] = scaled + offset;
    }
  }
};

ffi::Error Dequant4(ffi::ThreadPool& pool, const ffi::Buffer<ffi::U8>& packed, const float* absmax,
                    const Nested* nested, const ffi::Buffer<ffi::F32>& code, ffi::Result<ffi::AnyBuffer>& out,
                    int64_t blocksize, bool vectorize, bool hugepages) {
  Kind kind;
  switch (out->element_type()) {
    case ffi::DataType::F32:
      kind = Kind::kF32;
      break;
    case ffi::DataType::F16:
      kind = Kind::kF16;
      break;
    case ffi::DataType::BF16:
      kind = Kind::kBF16;
      break;
    default:
      return ffi::Error::InvalidArgument("oftjax_dequant4: output dtype must be float32, float16 or bfloat16");
  }
  const int64_t n = static_cast<int64_t>(out->element_count());
  const int64_t nb = (n + blocksize - 1) / blocksize;
  if (static_cast<int64_t>(packed.element_count()) * 2 < n) {
    return ffi::Error::InvalidArgument("oftjax_dequant4: packed holds " + std::to_string(packed.element_count()) +
                                       " bytes, expected at least " + std::to_string((n + 1) / 2));
  }
  if (code.element_count() != 16) {
    return ffi::Error::InvalidArgument("oftjax_dequant4: code must have 16 values");
  }
  const bool vector = vectorize && HasAvx512() && blocksize % 32 == 0;
  const int64_t out_bytes = n * (kind == Kind::kF32 ? 4 : 2);
  // Non-temporal stores for outputs over half the last-level cache of a typical CPU: they skip the
  // read-for-ownership of lines that would be evicted before use; smaller outputs stay in cache for the matmul
  // that reads them.
  const bool stream = out_bytes >= kStreamBytes && reinterpret_cast<uintptr_t>(out->untyped_data()) % 64 == 0;
  const uint8_t* p = packed.typed_data();
  const float* c = code.typed_data();
  void* o = out->untyped_data();
  if (hugepages) AdviseHugePages(o, out_bytes);
  const int64_t blocks_per_chunk = std::max<int64_t>(1, kValuesPerChunk / blocksize);
  const int64_t chunks = (nb + blocks_per_chunk - 1) / blocks_per_chunk;
  const Nested nest = nested ? *nested : Nested{};
  auto work = [=](int64_t chunk) {
    KeepSubnormals keep;  // per thread: MXCSR is thread state
    const int64_t b0 = chunk * blocks_per_chunk, b1 = std::min(nb, b0 + blocks_per_chunk);
    if (nested == nullptr) {
      RunBlocks(kind, p, absmax + b0, c, o, n, blocksize, b0, b1, vector, stream, !hugepages);
      return;
    }
    std::unique_ptr<float[]> local(new float[b1 - b0]);
    nest.Absmax(b0, b1, local.get());
    RunBlocks(kind, p, local.get(), c, o, n, blocksize, b0, b1, vector, stream, !hugepages);
  };
  if (chunks <= 1) {
    work(0);
  } else {
    ParallelFor(pool, chunks, work);
  }
  return ffi::Error::Success();
}

// Rows per work item of Dequant4Rotate: a multiple of the rotation's 8-row pass, about 64 KiB of scratch.
int64_t RotateItemRows(int64_t d) { return std::max<int64_t>(8, 16384 / std::max<int64_t>(d, 1) / 8 * 8); }

// A 4-bit weight [rows, d] dequantized to float32 and rotated, W BD(R) with R [d / b, b, b], in one pass: each
// work item dequantizes a few rows into a scratch buffer (in cache) and rotates them into the output, so the
// float32 weight itself is never written to memory and read back. Same arithmetic as Dequant4 then rotate.cc's
// OftjaxRotate (the dequantize with subnormal products kept, the rotation under the caller's floating-point
// mode, the same micro-kernel): the same bits.
ffi::Error Dequant4Rotate(ffi::ThreadPool& pool, const ffi::Buffer<ffi::U8>& packed, const float* absmax,
                          const Nested* nested, const ffi::Buffer<ffi::F32>& code, const ffi::Buffer<ffi::F32>& R,
                          ffi::Result<ffi::Buffer<ffi::F32>>& out, int64_t blocksize, bool vectorize) {
  const auto od = out->dimensions(), rd = R.dimensions();
  if (od.size() != 2 || rd.size() != 3 || rd[1] != rd[2] || rd[0] * rd[1] != od[1]) {
    return ffi::Error::InvalidArgument("oftjax_dequant4_rotate: the output must be [rows, d] and the rotation "
                                       "blocks [r, b, b] with r * b = d");
  }
  const int64_t rows = od[0], d = od[1], r = rd[0], b = rd[1];
  if (!oftjax::RotateRowsSupported(b)) {
    return ffi::Error::InvalidArgument("oftjax_dequant4_rotate: block size " + std::to_string(b) +
                                       " needs AVX-512 and a multiple of 16 up to " +
                                       std::to_string(oftjax::kMaxRotateBlock));
  }
  const int64_t n = rows * d, nb = (n + blocksize - 1) / blocksize;
  if (static_cast<int64_t>(packed.element_count()) * 2 < n) {
    return ffi::Error::InvalidArgument("oftjax_dequant4_rotate: packed holds " +
                                       std::to_string(packed.element_count()) + " bytes, expected at least " +
                                       std::to_string((n + 1) / 2));
  }
  if (code.element_count() != 16) {
    return ffi::Error::InvalidArgument("oftjax_dequant4_rotate: code must have 16 values");
  }
  const bool vector = vectorize && HasAvx512() && blocksize % 32 == 0;
  const uint8_t* p = packed.typed_data();
  const float *c = code.typed_data(), *Rp = R.typed_data();
  float* o = out->typed_data();
  const Nested nest = nested ? *nested : Nested{};
  const int64_t item_rows = RotateItemRows(d), items = (rows + item_rows - 1) / item_rows;
  auto work = [=](int64_t item) {
    thread_local std::vector<float> scratch, local;
    const int64_t r0 = item * item_rows, r1 = std::min(rows, r0 + item_rows);
    const int64_t e0 = r0 * d, e1 = r1 * d;  // the rows' elements, inside blocks [b0, b1)
    const int64_t b0 = e0 / blocksize, b1 = std::min(nb, (e1 + blocksize - 1) / blocksize);
    scratch.resize(static_cast<size_t>((b1 - b0) * blocksize));
    {
      KeepSubnormals keep;
      const float* scale = absmax == nullptr ? nullptr : absmax + b0;
      if (nested != nullptr) {
        local.resize(static_cast<size_t>(b1 - b0));
        nest.Absmax(b0, b1, local.data());
        scale = local.data();
      }
      // blocks b0.. relative to b0: the packed bytes from block b0 on, outputs from scratch[0]
      const int64_t n_local = std::min(n, b1 * blocksize) - b0 * blocksize;
      RunBlocks(Kind::kF32, p + b0 * (blocksize / 2), scale, c, scratch.data(), n_local, blocksize, 0, b1 - b0, vector,
                false, false);
    }
    oftjax::RotateRows(scratch.data() + (e0 - b0 * blocksize), Rp, o + e0, r, b, 0, r1 - r0, 0, r);
  };
  if (items <= 1) {
    if (items == 1) work(0);
  } else {
    ParallelFor(pool, items, work);
  }
  return ffi::Error::Success();
}

ffi::Error CheckBlocks(const char* what, size_t got, int64_t expected) {
  if (static_cast<int64_t>(got) != expected) {
    return ffi::Error::InvalidArgument(std::string("oftjax_dequant4: ") + what + " has " + std::to_string(got) +
                                       " values, expected " + std::to_string(expected));
  }
  return ffi::Error::Success();
}

ffi::Error CheckBlocksize(int64_t blocksize) {
  if (blocksize <= 0 || blocksize % 2 != 0) {
    return ffi::Error::InvalidArgument("oftjax_dequant4: blocksize must be even and positive, got " +
                                       std::to_string(blocksize));
  }
  return ffi::Error::Success();
}

// The double-quantized statistics of n values in blocks of blocksize.
ffi::Error CheckNested(const ffi::Buffer<ffi::U8>& qabsmax, const ffi::Buffer<ffi::F32>& nested_absmax,
                       const ffi::Buffer<ffi::F32>& offset, const ffi::Buffer<ffi::F32>& dynamic, size_t n,
                       int64_t blocksize, Nested* nested) {
  const int64_t nb = (static_cast<int64_t>(n) + blocksize - 1) / blocksize;
  const int64_t n2 = (nb + kNestedBlocksize - 1) / kNestedBlocksize;
  if (auto e = CheckBlocks("absmax", qabsmax.element_count(), nb); e.failure()) return e;
  if (auto e = CheckBlocks("nested_absmax", nested_absmax.element_count(), n2); e.failure()) return e;
  if (auto e = CheckBlocks("offset", offset.element_count(), 1); e.failure()) return e;
  if (auto e = CheckBlocks("dynamic code", dynamic.element_count(), 256); e.failure()) return e;
  *nested = Nested{qabsmax.typed_data(), nested_absmax.typed_data(), dynamic.typed_data(), offset.typed_data()[0]};
  return ffi::Error::Success();
}

ffi::Error Dequant4Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> packed, ffi::Buffer<ffi::F32> absmax,
                        ffi::Buffer<ffi::F32> code, ffi::Result<ffi::AnyBuffer> out, int64_t blocksize,
                        bool vectorize, bool hugepages) {
  if (auto e = CheckBlocksize(blocksize); e.failure()) return e;
  const int64_t nb = (static_cast<int64_t>(out->element_count()) + blocksize - 1) / blocksize;
  if (auto e = CheckBlocks("absmax", absmax.element_count(), nb); e.failure()) return e;
  return Dequant4(pool, packed, absmax.typed_data(), nullptr, code, out, blocksize, vectorize, hugepages);
}

ffi::Error Dequant4NestedImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> packed, ffi::Buffer<ffi::U8> qabsmax,
                              ffi::Buffer<ffi::F32> nested_absmax, ffi::Buffer<ffi::F32> offset,
                              ffi::Buffer<ffi::F32> dynamic, ffi::Buffer<ffi::F32> code,
                              ffi::Result<ffi::AnyBuffer> out, int64_t blocksize, bool vectorize, bool hugepages) {
  if (auto e = CheckBlocksize(blocksize); e.failure()) return e;
  Nested nested;
  if (auto e = CheckNested(qabsmax, nested_absmax, offset, dynamic, out->element_count(), blocksize, &nested);
      e.failure()) {
    return e;
  }
  return Dequant4(pool, packed, nullptr, &nested, code, out, blocksize, vectorize, hugepages);
}

ffi::Error Dequant4RotateImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> packed, ffi::Buffer<ffi::F32> absmax,
                              ffi::Buffer<ffi::F32> code, ffi::Buffer<ffi::F32> R,
                              ffi::Result<ffi::Buffer<ffi::F32>> out, int64_t blocksize, bool vectorize) {
  if (auto e = CheckBlocksize(blocksize); e.failure()) return e;
  const int64_t nb = (static_cast<int64_t>(out->element_count()) + blocksize - 1) / blocksize;
  if (auto e = CheckBlocks("absmax", absmax.element_count(), nb); e.failure()) return e;
  return Dequant4Rotate(pool, packed, absmax.typed_data(), nullptr, code, R, out, blocksize, vectorize);
}

ffi::Error Dequant4NestedRotateImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> packed, ffi::Buffer<ffi::U8> qabsmax,
                                    ffi::Buffer<ffi::F32> nested_absmax, ffi::Buffer<ffi::F32> offset,
                                    ffi::Buffer<ffi::F32> dynamic, ffi::Buffer<ffi::F32> code, ffi::Buffer<ffi::F32> R,
                                    ffi::Result<ffi::Buffer<ffi::F32>> out, int64_t blocksize, bool vectorize) {
  if (auto e = CheckBlocksize(blocksize); e.failure()) return e;
  Nested nested;
  if (auto e = CheckNested(qabsmax, nested_absmax, offset, dynamic, out->element_count(), blocksize, &nested);
      e.failure()) {
    return e;
  }
  return Dequant4Rotate(pool, packed, nullptr, &nested, code, R, out, blocksize, vectorize);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OftjaxDequant4, Dequant4Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U8>>()   // packed bytes (at least ceil(n / 2))
                                  .Arg<ffi::Buffer<ffi::F32>>()  // absmax [ceil(n / blocksize)]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // code table [16]
                                  .Ret<ffi::AnyBuffer>()         // [n] float32 / float16 / bfloat16
                                  .Attr<int64_t>("blocksize")
                                  .Attr<bool>("vectorize")
                                  .Attr<bool>("hugepages"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(OftjaxDequant4Nested, Dequant4NestedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U8>>()   // packed bytes (at least ceil(n / 2))
                                  .Arg<ffi::Buffer<ffi::U8>>()   // absmax codes [ceil(n / blocksize)]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // nested absmax [ceil(blocks / 256)]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // offset []
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dynamic 8-bit code [256]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // code table [16]
                                  .Ret<ffi::AnyBuffer>()         // [n] float32 / float16 / bfloat16
                                  .Attr<int64_t>("blocksize")
                                  .Attr<bool>("vectorize")
                                  .Attr<bool>("hugepages"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(OftjaxDequant4Rotate, Dequant4RotateImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U8>>()   // packed bytes (at least ceil(n / 2))
                                  .Arg<ffi::Buffer<ffi::F32>>()  // absmax [ceil(n / blocksize)]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // code table [16]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // rotation blocks R [r, b, b]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // W BD(R), [rows, r * b] float32
                                  .Attr<int64_t>("blocksize")
                                  .Attr<bool>("vectorize"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(OftjaxDequant4NestedRotate, Dequant4NestedRotateImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U8>>()   // packed bytes (at least ceil(n / 2))
                                  .Arg<ffi::Buffer<ffi::U8>>()   // absmax codes [ceil(n / blocksize)]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // nested absmax [ceil(blocks / 256)]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // offset []
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dynamic 8-bit code [256]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // code table [16]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // rotation blocks R [r, b, b]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // W BD(R), [rows, r * b] float32
                                  .Attr<int64_t>("blocksize")
                                  .Attr<bool>("vectorize"));

// 1 when Dequant4Rotate runs rotation blocks of size b on this machine (AVX-512, b in 16, 32, 48, 64).
extern "C" int OftjaxDequant4RotateSupports(int64_t b) { return oftjax::RotateRowsSupported(b) ? 1 : 0; }

// 1 when this machine runs the AVX-512 path (reported by oftjax.quant.native_info()).
extern "C" int OftjaxDequant4HasAvx512() { return HasAvx512() ? 1 : 0; }
