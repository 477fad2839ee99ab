// exp for AVX-512 vectors (Cephes expf, ~1 ulp), shared by attention.cc (softmax) and swiglu.cc (sigmoid).
#ifndef OFTJAX_CSRC_SIMD_EXP_H_
#define OFTJAX_CSRC_SIMD_EXP_H_

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

namespace oftjax {

// exp(x) for x <= 88.72 (scores minus their row maximum, log-sum-exps): a degree-6 polynomial after range
// reduction; below -87.34 the input is clamped (result ~1.2e-38 rather than a denormal or 0). NaN in, NaN out:
// max_ps/min_ps return their second operand when either is NaN, so x goes second in every clamp.
__attribute__((target("avx512f"))) inline __m512 Exp(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-87.33654f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// exp(x) for any x: +inf above ~88.72 (the input is clamped to 89 first, so the range reduction stays exact).
__attribute__((target("avx512f"))) inline __m512 ExpAny(__m512 x) {
  return Exp(_mm512_min_ps(_mm512_set1_ps(89.0f), x));
}

}  // namespace oftjax

#endif
#endif  // OFTJAX_CSRC_SIMD_EXP_H_
