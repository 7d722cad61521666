// Branch-free float math that compilers vectorise. exp_approx has a relative error below 2e-7
// (1.8e-7) over the float range (checked against std::exp in test_kernels), returns 0 below -87.3
// and saturates above 88.3.
#pragma once
#include <cmath>
#include <cstdint>

#include "philox.h"  // OSD_HD

namespace osd {

// exp(x) = 2^n * exp(r), r = x - n ln2 in [-ln2/2, ln2/2], n = floor(x log2(e) + 1/2): exp(r) =
// 1 + r + r^2 c(r), c a degree-3 polynomial fitted for the least largest relative error on that
// interval (1.1e-7 in exact arithmetic; 1.8e-7 as evaluated, against 2.3e-7 for the degree-6 Taylor
// series it replaced, which took one more multiply-add: the exp-bound kernels run about 10% faster).
// Every step is one fused multiply-add, rounded once: the same bits from std::fmaf, the x86 FMA
// instructions and CUDA's fmaf (the build never contracts anything else, -ffp-contract=off).
// exp_poly is shared with the GPU's exp_fast (cuda/common.cuh).
OSD_HD float exp_poly(float x, float n) {
  float r = fmaf(-n, 0.693145751953125f, x);
  r = fmaf(-n, 1.428606765330187045e-06f, r);
  float p = 8.312524917e-03f;
  p = fmaf(p, r, 4.189011336e-02f);
  p = fmaf(p, r, 1.666711447e-01f);
  p = fmaf(p, r, 4.999923179e-01f);
  p = fmaf(p, r, 1.0f);
  return fmaf(p, r, 1.0f);
}

OSD_HD float exp_approx(float x) {
  const float lo = x;
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float n = floorf(fmaf(x, 1.44269504088896341f, 0.5f));
  const float p = exp_poly(x, n);
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  return lo <= -87.3f ? 0.0f : p * scale;
}

}  // namespace osd

#if defined(__GNUC__) && !defined(__CUDACC__)
// ---- Host SIMD: eight float lanes as GCC/Clang vector types ----------------------------------
// Hot loops are written once with these types and compiled several times (OSD_SIMD_CLONES): SSE2
// pairs for the baseline, AVX2 for x86-64-v3, AVX-512 (VL) for x86-64-v4; the loader picks one.
// Every operation is defined lane by lane and the build does not contract a * b + c into an FMA
// (-ffp-contract=off); the exp's fused multiply-adds are explicit (fma8, one rounding in every
// clone), so every clone computes the bits the scalar code computes. (GCC's own
// vectorisation of the scalar loops if-converts exp_approx's clamps into about twice the
// instructions; spelling the lanes out is what makes the exp-bound loops fast.)
#if defined(__x86_64__) && !defined(__clang__)
#define OSD_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define OSD_SIMD_CLONES
#endif
// The helpers below are always inlined into their (cloned) callers, so no vector crosses a call
// (they take vectors by reference, and the -Wpsabi note on returning one is silenced here).
#define OSD_SIMD_INLINE __attribute__((always_inline)) inline
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
namespace osd {

typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

OSD_SIMD_INLINE f32x8 splat8(float x) { return f32x8{x, x, x, x, x, x, x, x}; }
OSD_SIMD_INLINE f32x8 load8(const float* p) {
  f32x8 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
OSD_SIMD_INLINE void store8(float* p, const f32x8& v) { __builtin_memcpy(p, &v, sizeof v); }

// a * b + c rounded once, lane by lane: one vfmadd where the clone has FMA (x86-64-v3 and v4); the
// baseline clone calls fmaf per lane (correct, and slow: only pre-AVX2 CPUs run it).
OSD_SIMD_INLINE f32x8 fma8(const f32x8& a, const f32x8& b, const f32x8& c) {
  f32x8 o;
  for (int k = 0; k < 8; ++k) o[k] = __builtin_fmaf(a[k], b[k], c[k]);
  return o;
}

// exp_approx on eight lanes, for the softmax terms exp((l - max) / T), whose arguments are <= 0:
// lane by lane the same operations, so the same bits as exp_approx(x) for every x <= 88.3 (NaN
// aside). It does not saturate above 88.3, and skips exp_approx's clamps: a lane below -87.3
// computes garbage (an out-of-range conversion) that the final select replaces by 0.
OSD_SIMD_INLINE f32x8 exp_approx8(const f32x8& x) {
  typedef uint32_t u32x8 __attribute__((vector_size(32)));
  const f32x8 y = fma8(x, splat8(1.44269504088896341f), splat8(0.5f));
  f32x8 n;
  for (int k = 0; k < 8; ++k) n[k] = floorf(y[k]);  // one vroundps where the target has it
  f32x8 r = fma8(-n, splat8(0.693145751953125f), x);
  r = fma8(-n, splat8(1.428606765330187045e-06f), r);
  f32x8 p = splat8(8.312524917e-03f);
  p = fma8(p, r, splat8(4.189011336e-02f));
  p = fma8(p, r, splat8(1.666711447e-01f));
  p = fma8(p, r, splat8(4.999923179e-01f));
  p = fma8(p, r, splat8(1.0f));
  p = fma8(p, r, splat8(1.0f));
  // p * 2^n by adding n to p's exponent field: the multiply's bits wherever the result is normal,
  // which it is for -87.3 < x <= 88.3 (n = -126 only with r > 0, so p >= 1), and an integer add
  // instead of a floating multiply (the multiply ports bound this loop).
  const u32x8 scaled = (u32x8)p + ((u32x8)__builtin_convertvector(n, i32x8) << 23);
  return x <= splat8(-87.3f) ? f32x8{} : (f32x8)scaled;
}

// Natural log on eight lanes, for positive normal x: x = m 2^e with m in [sqrt(1/2), sqrt(2)),
// log m = 2 atanh(z) = 2 (z + z^3/3 + ... + z^9/9), z = (m - 1) / (m + 1), |z| <= 0.172 (the next
// term is below 1e-9). Relative error below 3e-7 (test_kernels checks it against std::log); only
// the distillation losses use it, so it promises no bits.
OSD_SIMD_INLINE f32x8 log_approx8(const f32x8& x) {
  const i32x8 bits = (i32x8)x;
  const f32x8 m1 = (f32x8)((bits & 0x007fffff) | 0x3f800000);  // in [1, 2)
  const i32x8 big = m1 > splat8(1.41421356f);                   // -1 where halved
  const f32x8 m = big ? m1 * splat8(0.5f) : m1;
  const f32x8 e = __builtin_convertvector(((bits >> 23) & 0xff) - 127 - big, f32x8);
  const f32x8 f = m - splat8(1.0f), z = f / (splat8(2.0f) + f), z2 = z * z;
  f32x8 p = splat8(2.0f / 9.0f);
  p = p * z2 + splat8(2.0f / 7.0f);
  p = p * z2 + splat8(2.0f / 5.0f);
  p = p * z2 + splat8(2.0f / 3.0f);
  p = p * z2 + splat8(2.0f);
  // e ln2 in two parts: the high part times e (|e| < 128) is exact.
  return e * splat8(0.693145751953125f) + (z * p + e * splat8(1.428606765330187045e-06f));
}

// Lane max, NaN-blind (a NaN lane in x leaves m unchanged; callers flag NaN separately).
OSD_SIMD_INLINE f32x8 max8(const f32x8& m, const f32x8& x) { return x > m ? x : m; }

}  // namespace osd

#pragma GCC diagnostic pop
#endif
