// Native CPU kernels for SwiGLU's activation, h = silu(gate) * up, forward and backward, registered with XLA
// through jax.ffi.
//
//   OftjaxSwiglu:      h = (gate * s) * up                                   with s = 1 / (1 + exp(-gate))
//   OftjaxSwigluGrad:  d gate = (dh * up) * (s * (1 + gate * (1 - s))),  d up = dh * (gate * s)
//
// The backward is torch's silu_backward formula (oftjax.models._llama.swiglu); the products are rounded in the
// order written, as the XLA formulation does. exp is simd_exp.h's (Cephes expf, ~1 ulp) and 1 / (1 + e) a
// correctly rounded division, so results are float32 rounding apart from XLA's logistic (which XLA:CPU
// vectorizes 8 floats wide; this runs 16 wide and costs about a multiply's memory traffic).
//
// Built by setup.py as oftjax/models/_swiglu_cpu*.so and loaded by oftjax/models/_native_swiglu.py.

#include <algorithm>
#include <cstdint>
#include <string>

#include "parallel_for.h"
#include "simd_exp.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using oftjax::ParallelFor;

namespace {

constexpr int64_t kChunk = 16384;  // elements per work item (64 KiB of each operand)

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define OFTJAX_SWIGLU_X86 1
#define OFTJAX_AVX512 __attribute__((target("avx512f")))

OFTJAX_AVX512 inline __m512 Sigmoid(__m512 g) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, oftjax::ExpAny(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}

// The lanes of the last, partial vector (all 16 before it).
OFTJAX_AVX512 inline __mmask16 Tail(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

OFTJAX_AVX512 void Forward(const float* gate, const float* up, float* h, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; i += 16) {
    const __mmask16 m = Tail(i1 - i);
    const __m512 g = _mm512_maskz_loadu_ps(m, gate + i);
    const __m512 u = _mm512_maskz_loadu_ps(m, up + i);
    _mm512_mask_storeu_ps(h + i, m, _mm512_mul_ps(_mm512_mul_ps(g, Sigmoid(g)), u));
  }
}

OFTJAX_AVX512 void Backward(const float* gate, const float* up, const float* dh, float* dgate, float* dup,
                            int64_t i0, int64_t i1) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = i0; i < i1; i += 16) {
    const __mmask16 m = Tail(i1 - i);
    const __m512 g = _mm512_maskz_loadu_ps(m, gate + i);
    const __m512 u = _mm512_maskz_loadu_ps(m, up + i);
    const __m512 d = _mm512_maskz_loadu_ps(m, dh + i);
    const __m512 s = Sigmoid(g);
    // s * (1 + gate * (1 - s)): the multiply and the add rounded separately (no fused multiply-add), as XLA
    const __m512 slope = _mm512_mul_ps(s, _mm512_add_ps(one, _mm512_mul_ps(g, _mm512_sub_ps(one, s))));
    _mm512_mask_storeu_ps(dgate + i, m, _mm512_mul_ps(_mm512_mul_ps(d, u), slope));
    _mm512_mask_storeu_ps(dup + i, m, _mm512_mul_ps(d, _mm512_mul_ps(g, s)));
  }
}
#else
#define OFTJAX_SWIGLU_X86 0
#endif

bool Avx512() {
#if OFTJAX_SWIGLU_X86
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
#else
  return false;
#endif
}

ffi::Error CheckSame(const char* target, const ffi::Buffer<ffi::F32>& gate, size_t n, const char* what) {
  if (!Avx512()) return ffi::Error::InvalidArgument(std::string(target) + ": needs AVX-512");
  if (n != gate.element_count()) {
    return ffi::Error::InvalidArgument(std::string(target) + ": " + what + " must have gate's shape (" +
                                       std::to_string(gate.element_count()) + " elements)");
  }
  return ffi::Error::Success();
}

ffi::Error SwigluImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> gate, ffi::Buffer<ffi::F32> up,
                      ffi::ResultBuffer<ffi::F32> h) {
  if (auto e = CheckSame("oftjax_swiglu", gate, up.element_count(), "up"); e.failure()) return e;
  if (auto e = CheckSame("oftjax_swiglu", gate, h->element_count(), "h"); e.failure()) return e;
#if OFTJAX_SWIGLU_X86
  const int64_t n = static_cast<int64_t>(gate.element_count());
  const float *gp = gate.typed_data(), *up_ = up.typed_data();
  float* hp = h->typed_data();
  ParallelFor(pool, (n + kChunk - 1) / kChunk,
              [=](int64_t c) { Forward(gp, up_, hp, c * kChunk, std::min(n, (c + 1) * kChunk)); });
#endif
  return ffi::Error::Success();
}

ffi::Error SwigluGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> gate, ffi::Buffer<ffi::F32> up,
                          ffi::Buffer<ffi::F32> dh, ffi::ResultBuffer<ffi::F32> dgate,
                          ffi::ResultBuffer<ffi::F32> dup) {
  for (auto [n, what] : {std::pair<size_t, const char*>{up.element_count(), "up"}, {dh.element_count(), "dh"},
                         {dgate->element_count(), "d gate"}, {dup->element_count(), "d up"}}) {
    if (auto e = CheckSame("oftjax_swiglu_grad", gate, n, what); e.failure()) return e;
  }
#if OFTJAX_SWIGLU_X86
  const int64_t n = static_cast<int64_t>(gate.element_count());
  const float *gp = gate.typed_data(), *up_ = up.typed_data(), *dp = dh.typed_data();
  float *dgp = dgate->typed_data(), *dup_ = dup->typed_data();
  ParallelFor(pool, (n + kChunk - 1) / kChunk, [=](int64_t c) {
    Backward(gp, up_, dp, dgp, dup_, c * kChunk, std::min(n, (c + 1) * kChunk));
  });
#endif
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OftjaxSwiglu, SwigluImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // gate
                                  .Arg<ffi::Buffer<ffi::F32>>()  // up, gate's shape
                                  .Ret<ffi::Buffer<ffi::F32>>());  // h, gate's shape

XLA_FFI_DEFINE_HANDLER_SYMBOL(OftjaxSwigluGrad, SwigluGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // gate
                                  .Arg<ffi::Buffer<ffi::F32>>()  // up
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dh, the cotangent of h
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d gate
                                  .Ret<ffi::Buffer<ffi::F32>>());  // d up

// 1 when the kernels run on this machine (AVX-512); the argument is unused (the loaders' Supports(int64)).
extern "C" int OftjaxSwigluSupports(int64_t) { return Avx512() ? 1 : 0; }
