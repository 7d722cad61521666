// Branch-free float math that compilers vectorise. exp_approx has a relative error below 2e-7
// (1.8e-7) over the float range (checked against std::exp in test_kernels), returns 0 below -87.3
// and saturates above 88.3.
#pragma once
#include <cmath>
#include <cstdint>

#include "philox.h"  // OSD_HD

namespace osd {

// exp(x) = 2^n * exp(r), n = x log2(e) rounded to the nearest integer, r = x - n ln2 in about
// [-ln2/2, ln2/2]: exp(r) = 1 + r + r^2 c(r), c a degree-3 polynomial fitted for the least largest
// relative error on that interval (1.1e-7 in exact arithmetic, 1.8e-7 as evaluated). r takes one
// multiply-add with ln2 rounded to float, which adds |n| * 1.9e-9 (up to 2.4e-7 at the bottom of the
// range, 4e-8 for x > -15; 3.9e-7 in all, checked against std::exp in test_kernels): a second,
// low-order multiply-add would cancel it, and cost the exp-bound loops 15% (the FMA ports bound them).
// n comes from one multiply-add too: adding 1.5 * 2^23 rounds x log2(e) at units, ties to even, and
// leaves n in the low mantissa bits (kExpShift). Every step is one fused multiply-add, rounded once:
// the same bits from std::fmaf, the x86 FMA instructions and CUDA's fmaf (the build never contracts
// anything else, -ffp-contract=off). exp_poly is shared with the GPU's exp_fast (cuda/common.cuh).
constexpr float kExpShift = 12582912.0f;  // 1.5 * 2^23

OSD_HD float exp_poly(float x, float n) {
  const float r = fmaf(-n, 0.693147182464599609375f, x);
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
  const float n = fmaf(x, 1.44269504088896341f, kExpShift) - kExpShift;
  const float p = exp_poly(x, n);
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  return lo <= -87.3f ? 0.0f : p * scale;
}

}  // namespace osd

#if defined(__GNUC__) && !defined(__CUDACC__)
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string_view>
#if defined(__x86_64__)
#include <xmmintrin.h>  // _mm_stream_ps, _mm_sfence (SSE: the x86-64 baseline)
#endif
// ---- Host SIMD: float lanes as GCC/Clang vector types ----------------------------------------
// Hot loops are written once, as templates over the vector type, and compiled several times
// (OSD_SIMD_CLONES): for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and the baseline; the loader
// picks one. Inside, simd_wide() picks the width: 16 lanes (one zmm) where the CPU has AVX-512,
// 8 lanes otherwise. With one instruction per 16 lanes the core keeps twice as many exps in flight:
// the exp-bound loops ran 2x faster on an AVX-512 EPYC (0.21 -> 0.105 ns per exp over a
// 32000-entry row). Without AVX-512, GCC splits 16-lane vectors into scalar code, hence 8 there.
// The kernels accumulate in 32 lanes (entry j in lane j % 32) at either width, so both widths
// give the same bits. Every operation is defined lane by lane and the build does not contract
// a * b + c into an FMA (-ffp-contract=off); the exp's fused multiply-adds are explicit (vfma, one
// rounding in every clone), so every clone computes the bits the scalar code computes. (GCC's own
// vectorisation of the scalar loops if-converts exp_approx's clamps into about twice the
// instructions; spelling the lanes out is what makes the exp-bound loops fast.)
// OSD_SIMD_ONLY=3 (x86-64-v3, 8 lanes) or =1 (the baseline) builds one clone only, so that a
// machine with AVX-512 can test and time the others (test_kernels must pass with each).
// ThreadSanitizer builds get the 8-lane clone alone: a program with target_clones' resolvers
// crashed before main under TSan (they run before its runtime starts).
#if defined(__SANITIZE_THREAD__) && !defined(OSD_SIMD_ONLY)
#define OSD_SIMD_ONLY 3
#endif
#if defined(OSD_SIMD_ONLY) && OSD_SIMD_ONLY == 3
#define OSD_SIMD_CLONES __attribute__((target("arch=x86-64-v3")))
#elif defined(OSD_SIMD_ONLY)
#define OSD_SIMD_CLONES
#elif defined(__x86_64__) && !defined(__clang__)
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
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

template <class V> struct SimdInt;
template <> struct SimdInt<f32x8> { typedef i32x8 type; };
template <> struct SimdInt<f32x16> { typedef i32x16 type; };
template <class V> using ivec = typename SimdInt<V>::type;  // the int32 lanes of V (compare results)
template <class V> constexpr int kLanes = sizeof(V) / sizeof(float);
constexpr int kSimdGroup = 32;  // the kernels' accumulator lanes: entry j goes to lane j % 32

// Whether to run 16 lanes: where this CPU runs the x86-64-v4 clone (the question its resolver
// asks). OSD_SIMD_LANES=8 in the environment keeps 8 lanes there too (ctest runs test_kernels both
// ways, so CI on an AVX-512 machine tests both), and simd_force_lanes() does so in one process.
inline std::atomic<int>& simd_lanes_forced() {
  static std::atomic<int> lanes{0};
  return lanes;
}
inline bool simd_wide() {
#if defined(__x86_64__) && !defined(__clang__) && !defined(OSD_SIMD_ONLY)
  static const bool v4 = __builtin_cpu_supports("x86-64-v4");
  static const bool env8 = std::getenv("OSD_SIMD_LANES") && std::string_view(std::getenv("OSD_SIMD_LANES")) == "8";
  const int forced = simd_lanes_forced().load(std::memory_order_relaxed);
  return v4 && (forced ? forced == 16 : !env8);
#else
  return false;
#endif
}
// For tests: 8 or 16 lanes from now on (16 only where the v4 clone runs), 0 for the default.
inline void simd_force_lanes(int lanes) { simd_lanes_forced().store(lanes, std::memory_order_relaxed); }

// fn<f32x16>(args) where this CPU runs the x86-64-v4 clone, else fn<f32x8>(args). Used inside the
// cloned functions: each clone compiles both widths and runs the one that suits it.
#define OSD_SIMD_WIDTH(fn, ...) (::osd::simd_wide() ? fn<::osd::f32x16>(__VA_ARGS__) : fn<::osd::f32x8>(__VA_ARGS__))

// x in every lane, through its bits: GCC 12 builds a 16-float initialiser (or a loop over the
// lanes) from a scalar it cannot keep in a register as 16 masked inserts on AVX-512; a vector plus
// an integer scalar is one vpbroadcastd, and adding 0 keeps every bit (also of -0 and NaN).
template <class V> OSD_SIMD_INLINE V splat(float x) {
  int32_t bits;
  __builtin_memcpy(&bits, &x, sizeof bits);
  return (V)(ivec<V>{} + bits);
}
template <class V> OSD_SIMD_INLINE V vload(const float* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
template <class V> OSD_SIMD_INLINE void vstore(float* p, const V& v) { __builtin_memcpy(p, &v, sizeof v); }

// a * b + c rounded once, lane by lane: one vfmadd where the clone has FMA (x86-64-v3 and v4); the
// baseline clone calls fmaf per lane (correct, and slow: only pre-AVX2 CPUs run it).
template <class V> OSD_SIMD_INLINE V vfma(const V& a, const V& b, const V& c) {
  V o;
  for (int k = 0; k < kLanes<V>; ++k) o[k] = __builtin_fmaf(a[k], b[k], c[k]);
  return o;
}

// exp_approx on every lane, for the softmax terms exp((l - max) / T), whose arguments are <= 0:
// lane by lane the same operations, so the same bits as exp_approx(x) for every x <= 88.3 (NaN
// aside). It does not saturate above 88.3, and skips exp_approx's clamps: a lane below -87.3
// computes garbage (an out-of-range conversion) that the final select replaces by 0.
template <class V> OSD_SIMD_INLINE V vexp(const V& x) {
  typedef uint32_t U __attribute__((vector_size(sizeof(V))));
  const V y = vfma(x, splat<V>(1.44269504088896341f), splat<V>(kExpShift));
  const V n = y - splat<V>(kExpShift);
  const V r = vfma(-n, splat<V>(0.693147182464599609375f), x);
  V p = splat<V>(8.312524917e-03f);
  p = vfma(p, r, splat<V>(4.189011336e-02f));
  p = vfma(p, r, splat<V>(1.666711447e-01f));
  p = vfma(p, r, splat<V>(4.999923179e-01f));
  p = vfma(p, r, splat<V>(1.0f));
  p = vfma(p, r, splat<V>(1.0f));
  // p * 2^n by adding n to p's exponent field: the multiply's bits wherever the result is normal,
  // which it is for -87.3 < x <= 88.3 (n = -126 only with r > 0, so p >= 1), and an integer add
  // instead of a floating multiply (the multiply ports bound this loop). y's bits shifted by 23 are
  // n's (mod 2^32): those of 1.5 * 2^23 all shift out.
  const U scaled = (U)p + ((U)y << 23);
  return x <= splat<V>(-87.3f) ? V{} : (V)scaled;
}

// Natural log on every lane, for positive normal x: x = m 2^e with m in [sqrt(1/2), sqrt(2)),
// log m = 2 atanh(z) = 2 (z + z^3/3 + ... + z^9/9), z = (m - 1) / (m + 1), |z| <= 0.172 (the next
// term is below 1e-9). Relative error below 3e-7 (test_kernels checks it against std::log); only
// the distillation losses use it, so it promises no bits.
template <class V> OSD_SIMD_INLINE V vlog(const V& x) {
  typedef ivec<V> I;
  const I bits = (I)x;
  const V m1 = (V)((bits & 0x007fffff) | 0x3f800000);  // in [1, 2)
  const I big = m1 > splat<V>(1.41421356f);            // -1 where halved
  const V m = big ? m1 * splat<V>(0.5f) : m1;
  const V e = __builtin_convertvector(((bits >> 23) & 0xff) - 127 - big, V);
  const V f = m - splat<V>(1.0f), z = f / (splat<V>(2.0f) + f), z2 = z * z;
  V p = splat<V>(2.0f / 9.0f);
  p = p * z2 + splat<V>(2.0f / 7.0f);
  p = p * z2 + splat<V>(2.0f / 5.0f);
  p = p * z2 + splat<V>(2.0f / 3.0f);
  p = p * z2 + splat<V>(2.0f);
  // e ln2 in two parts: the high part times e (|e| < 128) is exact.
  return e * splat<V>(0.693145751953125f) + (z * p + e * splat<V>(1.428606765330187045e-06f));
}

// Stores v at p (16-byte aligned) past the caches: SSE's non-temporal store, which every x86-64 clone
// has, per 4 lanes; the write-combining buffers merge a line's stores into one write. Elsewhere a
// plain store. stream_fence() orders them before a later store that publishes the data.
template <class V> OSD_SIMD_INLINE void stream_store(float* p, const V& v) {
#if defined(__x86_64__)
  for (int i = 0; i < kLanes<V>; i += 4) {
    __m128 c;
    __builtin_memcpy(&c, reinterpret_cast<const float*>(&v) + i, sizeof c);
    _mm_stream_ps(p + i, c);
  }
#else
  vstore(p, v);
#endif
}
inline void stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}
// out[j] for j < n: vec(j) gives the L lanes from j on, one(j) the entry j alone (the same bits).
// The whole 64-byte lines of out are written by stream_store, the entries around them by plain stores.
template <class V, class FV, class FS> OSD_SIMD_INLINE void stream_block(float* out, int32_t n, FV&& vec, FS&& one) {
  constexpr int L = kLanes<V>;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(out);
  const int32_t head = addr & 3 ? n : std::min<int32_t>(n, static_cast<int32_t>(((64 - (addr & 63)) & 63) / 4));
  int32_t j = 0;
  for (; j < head; ++j) out[j] = one(j);
  for (; j + 16 <= n; j += 16)
    for (int v = 0; v < 16 / L; ++v) stream_store(out + j + v * L, vec(j + v * L));
  for (; j < n; ++j) out[j] = one(j);
}

// Lane max, NaN-blind (a NaN lane in x leaves m unchanged; callers flag NaN separately).
template <class V> OSD_SIMD_INLINE V vmax(const V& m, const V& x) { return x > m ? x : m; }

// The accumulators of one 32-lane group at width V: kSimdGroup / kLanes<V> vectors, kept in
// registers where the loops over them are unrolled.
template <class V> struct Lanes32 {
  V v[kSimdGroup / kLanes<V>] = {};
  OSD_SIMD_INLINE void spill(float* out) const {
    for (int i = 0; i < kSimdGroup / kLanes<V>; ++i) vstore(out + i * kLanes<V>, v[i]);
  }
};

// Folds 32 lane sums pairwise: a_k += a_(k+16) for k < 16, then k + 8, 4, 2, 1 (a warp's xor
// butterfly); returns a_0.
inline float fold_lanes32(float* a) {
  for (int w = kSimdGroup / 2; w >= 1; w /= 2)
    for (int k = 0; k < w; ++k) a[k] += a[k + w];
  return a[0];
}

}  // namespace osd

#pragma GCC diagnostic pop
#endif
