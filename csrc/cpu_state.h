// CPU state shared by the 4-bit kernels (dequant4.cc, matmul4.cc): whether the AVX-512 paths can run, and
// keeping float32 subnormals (bitsandbytes keeps them; XLA's threads may run with FTZ/DAZ set).
#ifndef OFTJAX_CSRC_CPU_STATE_H_
#define OFTJAX_CSRC_CPU_STATE_H_

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace oftjax {

// Clears FTZ/DAZ for the lifetime of the object (x86; MXCSR is per-thread state); elsewhere a no-op.
class KeepSubnormals {
 public:
#if defined(__x86_64__) || defined(_M_X64)
  KeepSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ & ~0x8040u); }
  ~KeepSubnormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#endif
};

// Whether this CPU runs the kernels' AVX-512 paths (F, BW, VL, DQ).
inline bool HasAvx512() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has;
#else
  return false;
#endif
}

}  // namespace oftjax

#endif  // OFTJAX_CSRC_CPU_STATE_H_
