// Matrix products over quantised weights with 8-bit activations: a portable reference, AVX2
// kernels and AVX-512 VNNI kernels that compute the same operations (see quant.h for the contract).
//
// The fixed per-output sequence, for a weight row w and an activation row x:
//
//  32-value formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0). x is quantised per 32-value block like llama.cpp's
//  Q8_0 / Q8_1 (q = round-to-nearest-even(x * 127 / amax), d = amax / 127, s = d * sum q), except
//  that d and s stay f32 where llama.cpp rounds them to fp16 (on SmolLM2 this takes the rms error
//  of the log-probabilities against exact f32 arithmetic from 0.175 to 0.144). For each block b in order, with wq the block's integer weights
//  (nibble - 8 for Q4_0, nibble for Q4_1, ...):
//      p[k]   = sum of wq[j] * xq[j] for j = 4k .. 4k+3 and 16+4k .. 16+4k+3   (k = 0..3, exact)
//      acc[k] = acc[k] + (d_w * d_x) * float(p[k])
//      summ   = summ + m_w * s_x                                            (Q4_1, Q5_1 only)
//  result = ((acc0 + acc2) + (acc1 + acc3)) + summ.
//  p[k] pairs value j with value j + 16: the low and the high nibble of one byte in Q4_0 / Q4_1,
//  so that four rows' low nibbles fill one 512-bit vector and their high nibbles another, and each
//  float product and sum covers eight values (llama.cpp's AVX2 order converts per four).
//
//  K-quants (Q3_K, Q4_K, Q5_K, Q6_K). x is quantised per 256 values as llama.cpp's Q8_K (f32 d,
//  int8 q, 16-value sums). Each super-block gives integer weights wq, a scale per 16 values sc,
//  and (Q4_K, Q5_K) a min per 16 values mn with factors D and M:
//      isum = sum over 16-value groups g of sc[g] * sum of wq * xq             (exact)
//      msum = sum over g of mn[g] * bsum_x[g]                                  (exact)
//      acc  = acc + ((d_x * D) * float(isum) - (d_x * M) * float(msum))
//  result = acc.
//
// No FMA contraction anywhere in this file (the portable code must round like the AVX2 code).
// The AVX-512 kernels differ from the AVX2 ones only in how the exact integer sums are formed
// (vpdpbusd / vpdpwssd instead of vpmaddubsw + vpmaddwd): every float operation is the same.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "core/error.h"
#include "core/fp16.h"
#include "core/thread_pool.h"
#include "model/quant.h"
#include "model/quant_formats.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#define OSD_HAVE_X86 1
#endif

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace osd::quant {

using namespace detail;

bool has_int8_kernel(TensorType t) {
  switch (t) {
    case TensorType::Q4_0:
    case TensorType::Q4_1:
    case TensorType::Q5_0:
    case TensorType::Q5_1:
    case TensorType::Q8_0:
    case TensorType::Q3_K:
    case TensorType::Q4_K:
    case TensorType::Q5_K:
    case TensorType::Q6_K:
      return true;
    default:
      return false;
  }
}

namespace {

bool is_k_type(TensorType t) {
  return t == TensorType::Q3_K || t == TensorType::Q4_K || t == TensorType::Q5_K || t == TensorType::Q6_K;
}

// Round to nearest, ties to even, for |v| < 2^22 (the activations are within +-127.5).
inline float round_even(float v) { return (v + 0x1.8p23f) - 0x1.8p23f; }

// ---- Quantised activations ----

struct Acts {
  int64_t cols = 0, nb = 0, ng = 0;  // values, scale blocks (32 or 256 values), 16-value groups per row
  std::vector<int8_t> q;             // n x cols (+ padding)
  std::vector<float> d, s;           // n x nb
  std::vector<int16_t> bsum;         // n x ng (K-quants)
  std::vector<int32_t> gneg;         // n x nb x 4: -(sum of xq over p[k]'s values) (AVX-512, 32-value)
  const int8_t* qrow(int64_t t) const { return q.data() + t * cols; }
  const float* drow(int64_t t) const { return d.data() + t * nb; }
  const float* srow(int64_t t) const { return s.data() + t * nb; }
  const int16_t* brow(int64_t t) const { return bsum.data() + t * ng; }
  const int32_t* grow(int64_t t) const { return gneg.data() + t * nb * 4; }
};

// llama.cpp's quantize_row_q8_1 (AVX2 path) with f32 scales: per 32 values d = amax / 127,
// q = round-even(x * (127 / amax)), s = d * sum q. Non-finite input gives d = s = NaN.
void quantize_acts_q8(const float* x, int64_t cols, int8_t* q, float* d, float* s) {
  for (int64_t b = 0; b < cols / kQK; ++b) {
    const float* xb = x + b * kQK;
    int8_t* qb = q + b * kQK;
    float amax = 0.0f;
    bool finite = true;
    for (int j = 0; j < kQK; ++j) {
      const float a = std::fabs(xb[j]);
      finite = finite && a <= 3.4028234663852886e38f;
      amax = a > amax ? a : amax;
    }
    if (!finite) {
      std::memset(qb, 0, kQK);
      d[b] = s[b] = NAN;
      continue;
    }
    const float df = amax / 127.0f;
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    int sum = 0;
    for (int j = 0; j < kQK; ++j) {
      const int v = static_cast<int>(round_even(xb[j] * id));
      qb[j] = static_cast<int8_t>(v);
      sum += v;
    }
    d[b] = df;
    s[b] = df * static_cast<float>(sum);
  }
}

// llama.cpp's quantize_row_q8_K: per 256 values, iscale = -127 / (the value of largest magnitude),
// q = min(127, round-even(iscale * x)), d = 1 / iscale, and the sums of each 16 values.
void quantize_acts_q8k(const float* x, int64_t cols, int8_t* q, float* d, int16_t* bsum) {
  for (int64_t b = 0; b < cols / kQKK; ++b) {
    const float* xb = x + b * kQKK;
    int8_t* qb = q + b * kQKK;
    float amax = 0.0f, max = 0.0f;
    bool finite = true;
    for (int j = 0; j < kQKK; ++j) {
      const float a = std::fabs(xb[j]);
      finite = finite && a <= 3.4028234663852886e38f;
      if (a > amax) {
        amax = a;
        max = xb[j];
      }
    }
    if (!finite || amax == 0.0f) {
      std::memset(qb, 0, kQKK);
      std::memset(bsum + b * 16, 0, 16 * sizeof(int16_t));
      d[b] = finite ? 0.0f : NAN;
      continue;
    }
    const float iscale = -127.0f / max;
    for (int j = 0; j < kQKK; ++j) {
      const int v = static_cast<int>(round_even(iscale * xb[j]));
      qb[j] = static_cast<int8_t>(v > 127 ? 127 : v);
    }
    for (int g = 0; g < 16; ++g) {
      int sum = 0;
      for (int j = 0; j < 16; ++j) sum += qb[g * 16 + j];
      bsum[b * 16 + g] = static_cast<int16_t>(sum);
    }
    d[b] = 1.0f / iscale;
  }
}

#ifdef OSD_HAVE_X86
void quantize_acts_q8_avx2(const float* x, int64_t cols, int8_t* q, float* d, float* s);
#endif

void quantize_acts(TensorType t, const float* x, int64_t n, int64_t cols, Acts& a, Isa isa, bool offsets) {
  const bool k = is_k_type(t);
  a.cols = cols;
  a.nb = cols / (k ? kQKK : kQK);
  a.ng = k ? cols / 16 : 0;
  a.q.resize(static_cast<size_t>(n * cols) + 64);
  a.d.resize(static_cast<size_t>(n * a.nb));
  a.s.resize(k ? 0 : static_cast<size_t>(n * a.nb));
  a.bsum.resize(static_cast<size_t>(n * a.ng));
  for (int64_t i = 0; i < n; ++i) {
    if (k)
      quantize_acts_q8k(x + i * cols, cols, a.q.data() + i * cols, a.d.data() + i * a.nb, a.bsum.data() + i * a.ng);
#ifdef OSD_HAVE_X86
    else if (isa == Isa::Avx2 || isa == Isa::Avx512)
      quantize_acts_q8_avx2(x + i * cols, cols, a.q.data() + i * cols, a.d.data() + i * a.nb, a.s.data() + i * a.nb);
#endif
    else
      quantize_acts_q8(x + i * cols, cols, a.q.data() + i * cols, a.d.data() + i * a.nb, a.s.data() + i * a.nb);
  }
  // The vector kernels of Q4_0 and Q5_0 (and Q8_0 on AVX-512) read the weights offset to unsigned
  // (w + o) and take o times these sums off again: the same exact integers. Made only when a matrix
  // of the call reads them (offsets).
  a.gneg.resize(!k && offsets ? static_cast<size_t>(n * a.nb * 4) : 0);
  if (!a.gneg.empty())
    for (int64_t i = 0; i < n * a.nb; ++i) {
      const int8_t* q = a.q.data() + i * kQK;
      for (int g = 0; g < 4; ++g)
        a.gneg[i * 4 + g] = -(q[4 * g] + q[4 * g + 1] + q[4 * g + 2] + q[4 * g + 3] + q[16 + 4 * g] +
                              q[17 + 4 * g] + q[18 + 4 * g] + q[19 + 4 * g]);
    }
}

// ---- Weight formats as integers ----

// 32-value formats: wq (int8, element order), d, m. kUnsigned: wq >= 0 (Q4_1, Q5_1).
struct Q4_0T {
  using B = BlockQ4_0;
  static constexpr bool kMin = false;
  static void unpack(const B& b, int8_t* q) {
    for (int j = 0; j < 16; ++j) {
      q[j] = static_cast<int8_t>((b.qs[j] & 0xF) - 8);
      q[j + 16] = static_cast<int8_t>((b.qs[j] >> 4) - 8);
    }
  }
  static uint16_t m(const B&) { return 0; }
};
struct Q4_1T {
  using B = BlockQ4_1;
  static constexpr bool kMin = true;
  static void unpack(const B& b, int8_t* q) {
    for (int j = 0; j < 16; ++j) {
      q[j] = static_cast<int8_t>(b.qs[j] & 0xF);
      q[j + 16] = static_cast<int8_t>(b.qs[j] >> 4);
    }
  }
  static uint16_t m(const B& b) { return b.m; }
};
struct Q5_0T {
  using B = BlockQ5_0;
  static constexpr bool kMin = false;
  static void unpack(const B& b, int8_t* q) {
    uint32_t qh;
    std::memcpy(&qh, b.qh, 4);
    for (int j = 0; j < 16; ++j) {
      q[j] = static_cast<int8_t>(((b.qs[j] & 0xF) | (((qh >> j) & 1) << 4)) - 16);
      q[j + 16] = static_cast<int8_t>(((b.qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16);
    }
  }
  static uint16_t m(const B&) { return 0; }
};
struct Q5_1T {
  using B = BlockQ5_1;
  static constexpr bool kMin = true;
  static void unpack(const B& b, int8_t* q) {
    uint32_t qh;
    std::memcpy(&qh, b.qh, 4);
    for (int j = 0; j < 16; ++j) {
      q[j] = static_cast<int8_t>((b.qs[j] & 0xF) | (((qh >> j) & 1) << 4));
      q[j + 16] = static_cast<int8_t>((b.qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4));
    }
  }
  static uint16_t m(const B& b) { return b.m; }
};
struct Q8_0T {
  using B = BlockQ8_0;
  static constexpr bool kMin = false;
  static void unpack(const B& b, int8_t* q) { std::memcpy(q, b.qs, 32); }
  static uint16_t m(const B&) { return 0; }
};

// K-quants: one super-block as integers.
struct KBlock {
  alignas(32) int8_t q[256];
  int16_t sc[16];
  int16_t mn[16];
  float D, M;
};

void unpack_k(const BlockQ3_K& b, KBlock& k) {
  int8_t sc[16];
  scales_q3_k(b.scales, sc);
  for (int g = 0; g < 16; ++g) k.sc[g] = sc[g], k.mn[g] = 0;
  for (int n = 0; n < 2; ++n)
    for (int j = 0; j < 4; ++j)
      for (int l = 0; l < 32; ++l)
        k.q[128 * n + 32 * j + l] = static_cast<int8_t>(((b.qs[32 * n + l] >> (2 * j)) & 3) -
                                                        ((b.hmask[l] >> (4 * n + j)) & 1 ? 0 : 4));
  k.D = half_to_float(b.d);
  k.M = 0.0f;
}

void unpack_k(const BlockQ4_K& b, KBlock& k) {
  for (int j = 0; j < 8; ++j) {
    uint8_t sc, m;
    scale_min_k4(j, b.scales, &sc, &m);
    k.sc[2 * j] = k.sc[2 * j + 1] = sc;
    k.mn[2 * j] = k.mn[2 * j + 1] = m;
  }
  for (int c = 0; c < 4; ++c)
    for (int l = 0; l < 32; ++l) {
      k.q[64 * c + l] = static_cast<int8_t>(b.qs[32 * c + l] & 0xF);
      k.q[64 * c + 32 + l] = static_cast<int8_t>(b.qs[32 * c + l] >> 4);
    }
  k.D = half_to_float(b.d);
  k.M = half_to_float(b.dmin);
}

void unpack_k(const BlockQ5_K& b, KBlock& k) {
  for (int j = 0; j < 8; ++j) {
    uint8_t sc, m;
    scale_min_k4(j, b.scales, &sc, &m);
    k.sc[2 * j] = k.sc[2 * j + 1] = sc;
    k.mn[2 * j] = k.mn[2 * j + 1] = m;
  }
  for (int c = 0; c < 4; ++c)
    for (int l = 0; l < 32; ++l) {
      k.q[64 * c + l] = static_cast<int8_t>((b.qs[32 * c + l] & 0xF) | (((b.qh[l] >> (2 * c)) & 1) << 4));
      k.q[64 * c + 32 + l] = static_cast<int8_t>((b.qs[32 * c + l] >> 4) | (((b.qh[l] >> (2 * c + 1)) & 1) << 4));
    }
  k.D = half_to_float(b.d);
  k.M = half_to_float(b.dmin);
}

void unpack_k(const BlockQ6_K& b, KBlock& k) {
  for (int g = 0; g < 16; ++g) k.sc[g] = b.scales[g], k.mn[g] = 0;
  for (int n = 0; n < 2; ++n) {
    const uint8_t* ql = b.ql + 64 * n;
    const uint8_t* qh = b.qh + 32 * n;
    int8_t* q = k.q + 128 * n;
    for (int l = 0; l < 32; ++l) {
      q[l] = static_cast<int8_t>(((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32);
      q[l + 32] = static_cast<int8_t>(((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32);
      q[l + 64] = static_cast<int8_t>(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
      q[l + 96] = static_cast<int8_t>(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
    }
  }
  k.D = half_to_float(b.d);
  k.M = 0.0f;
}

struct Args {
  const uint8_t* w;
  size_t row_bytes;
  int64_t rows, cols;
  const Acts* a;
  float* y;
};

inline float hsum4(const float* a) { return (a[0] + a[2]) + (a[1] + a[3]); }

// ---- Portable reference kernels: one output at a time ----

template <class T>
void range32_ref(const Args& k, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
  using B = typename T::B;
  const int64_t nb = k.cols / kQK;
  int8_t wq[kQK];
  for (int64_t r = r0; r < r1; ++r) {
    const B* w = reinterpret_cast<const B*>(k.w + static_cast<size_t>(r) * k.row_bytes);
    for (int64_t t = t0; t < t1; ++t) {
      const int8_t* xq = k.a->qrow(t);
      const float* xd = k.a->drow(t);
      const float* xs = T::kMin ? k.a->srow(t) : nullptr;
      float acc[4] = {0, 0, 0, 0};
      float summ = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        T::unpack(w[b], wq);
        const int8_t* yq = xq + b * kQK;
        const float dd = half_to_float(w[b].d) * xd[b];
        for (int l = 0; l < 4; ++l) {
          int p = 0;
          for (int e = 4 * l; e < 4 * l + 4; ++e) p += wq[e] * yq[e] + wq[e + 16] * yq[e + 16];
          acc[l] = acc[l] + dd * static_cast<float>(p);
        }
        if (T::kMin) summ = summ + half_to_float(T::m(w[b])) * xs[b];
      }
      k.y[t * k.rows + r] = hsum4(acc) + summ;
    }
  }
}

template <class B>
void rangek_ref(const Args& k, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
  const int64_t nb = k.cols / kQKK;
  KBlock kb;
  for (int64_t r = r0; r < r1; ++r) {
    const B* w = reinterpret_cast<const B*>(k.w + static_cast<size_t>(r) * k.row_bytes);
    for (int64_t t = t0; t < t1; ++t) {
      const int8_t* xq = k.a->qrow(t);
      const float* xd = k.a->drow(t);
      const int16_t* xb = k.a->brow(t);
      float acc = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        unpack_k(w[b], kb);
        const int8_t* yq = xq + b * kQKK;
        int isum = 0, msum = 0;
        for (int g = 0; g < 16; ++g) {
          int p = 0;
          for (int e = 16 * g; e < 16 * g + 16; ++e) p += kb.q[e] * yq[e];
          isum += kb.sc[g] * p;
          msum += kb.mn[g] * xb[b * 16 + g];
        }
        acc = acc + ((xd[b] * kb.D) * static_cast<float>(isum) - (xd[b] * kb.M) * static_cast<float>(msum));
      }
      k.y[t * k.rows + r] = acc;
    }
  }
}

#ifdef OSD_HAVE_X86
// ---- AVX2 kernels: each output follows the sequence above. ----
#define OSD_AVX2 __attribute__((target("avx2,fma,f16c")))
#define OSD_AVX2_INLINE __attribute__((target("avx2,fma,f16c"), always_inline)) inline

constexpr int kPrefetchBytes = 1024;

OSD_AVX2_INLINE float f16(uint16_t h) { return _cvtsh_ss(h); }

OSD_AVX2_INLINE int hsum_i32_inline(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
  return _mm_cvtsi128_si32(s);
}

// The AVX2 form of quantize_acts_q8, with the same values: max and integer sums are exact, the
// product x * id rounds the same, and _mm256_round_ps rounds to nearest even like round_even.
OSD_AVX2 void quantize_acts_q8_avx2(const float* x, int64_t cols, int8_t* q, float* d, float* s) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t b = 0; b < cols / kQK; ++b) {
    const float* xb = x + b * kQK;
    __m256 v[4];
    __m256 mx = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      v[j] = _mm256_loadu_ps(xb + 8 * j);
      mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[j]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    if (!(amax <= 3.4028234663852886e38f)) {  // inf or NaN somewhere (max_ps may have dropped a NaN)
      quantize_acts_q8(xb, kQK, q + b * kQK, d + b, s + b);
      continue;
    }
    bool nan = false;
    for (int j = 0; j < 4; ++j) nan = nan || _mm256_movemask_ps(_mm256_cmp_ps(v[j], v[j], _CMP_UNORD_Q)) != 0;
    if (nan) {
      quantize_acts_q8(xb, kQK, q + b * kQK, d + b, s + b);
      continue;
    }
    const float df = amax / 127.0f;
    const __m256 id = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
    __m256i i[4];
    for (int j = 0; j < 4; ++j)
      i[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const int sum = hsum_i32_inline(_mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3])));
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
    p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * kQK), p);
    d[b] = df;
    s[b] = df * static_cast<float>(sum);
  }
}

// 0x10 in byte j where bit j of the 32-bit qh is set.
OSD_AVX2_INLINE __m256i high_bits32(const uint8_t* qh) {
  uint32_t x;
  std::memcpy(&x, qh, 4);
  const __m256i shuf = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3,
                                        3, 3, 3, 3);
  const __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(x)), shuf);
  const __m256i bit = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ULL));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
  return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

// Two rows' low-half values (j < 16) in one 256-bit vector and their high-half values in another,
// a 128-bit lane per row. kShift: the offset o = 2^kShift that makes signed weights unsigned (-1:
// none); Q8_0 keeps its signed bytes (w + 128 would overflow vpmaddubsw's pair sums).
OSD_AVX2_INLINE void nibbles2(const uint8_t* a, const uint8_t* b, __m256i& lo, __m256i& hi) {
  const __m256i x = _mm256_set_m128i(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)),
                                     _mm_loadu_si128(reinterpret_cast<const __m128i*>(a)));
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  lo = _mm256_and_si256(x, low4);
  hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), low4);
}
OSD_AVX2_INLINE void fifth_bits2(const uint8_t* qa, const uint8_t* qb, __m256i& lo, __m256i& hi) {
  const __m256i a = high_bits32(qa), b = high_bits32(qb);
  lo = _mm256_or_si256(lo, _mm256_permute2x128_si256(a, b, 0x20));
  hi = _mm256_or_si256(hi, _mm256_permute2x128_si256(a, b, 0x31));
}
struct Q4_0W {
  using B = BlockQ4_0;
  static constexpr bool kMin = false;
  static constexpr int kShift = 3;
  static constexpr bool kSignedBytes = false;
  OSD_AVX2_INLINE static void unpack2(const B* a, const B* b, __m256i& lo, __m256i& hi) { nibbles2(a->qs, b->qs, lo, hi); }
};
struct Q4_1W {
  using B = BlockQ4_1;
  static constexpr bool kMin = true;
  static constexpr int kShift = -1;
  static constexpr bool kSignedBytes = false;
  OSD_AVX2_INLINE static void unpack2(const B* a, const B* b, __m256i& lo, __m256i& hi) { nibbles2(a->qs, b->qs, lo, hi); }
};
struct Q5_0W {
  using B = BlockQ5_0;
  static constexpr bool kMin = false;
  static constexpr int kShift = 4;
  static constexpr bool kSignedBytes = false;
  OSD_AVX2_INLINE static void unpack2(const B* a, const B* b, __m256i& lo, __m256i& hi) {
    nibbles2(a->qs, b->qs, lo, hi);
    fifth_bits2(a->qh, b->qh, lo, hi);
  }
};
struct Q5_1W {
  using B = BlockQ5_1;
  static constexpr bool kMin = true;
  static constexpr int kShift = -1;
  static constexpr bool kSignedBytes = false;
  OSD_AVX2_INLINE static void unpack2(const B* a, const B* b, __m256i& lo, __m256i& hi) {
    nibbles2(a->qs, b->qs, lo, hi);
    fifth_bits2(a->qh, b->qh, lo, hi);
  }
};
struct Q8_0W {
  using B = BlockQ8_0;
  static constexpr bool kMin = false;
  static constexpr int kShift = -1;
  static constexpr bool kSignedBytes = true;
  OSD_AVX2_INLINE static void unpack2(const B* a, const B* b, __m256i& lo, __m256i& hi) {
    lo = _mm256_set_m128i(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b->qs)),
                          _mm_loadu_si128(reinterpret_cast<const __m128i*>(a->qs)));
    hi = _mm256_set_m128i(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b->qs + 16)),
                          _mm_loadu_si128(reinterpret_cast<const __m128i*>(a->qs + 16)));
  }
};

// Rows r .. r + nr - 1 (nr <= 4; a short group repeats its last row and drops its outputs) for
// tokens t .. t + NT - 1, two rows per vector: the AVX2 form of rows8_avx512 below (see there why).
// Against one row at a time on 8-lane sums (the kernel before the pairing of j and j + 16), with
// AVX-512 turned off on this machine, SmolLM2-135M Q4_1: 1 token 3.9-4.1 -> 3.7 ms, 5 tokens
// 12.6-12.9 -> 9.2-10.0 ms, 17 tokens 38.6-38.9 -> 29.3-29.9 ms. Its setup (row and token
// pointers) is written out as rows8_avx512's is: shared through helpers, 5-token passes measured
// 5% slower on AVX-512.
template <class T, int NT>
OSD_AVX2 void rows4_avx2(const Args& k, int64_t r, int nr, int64_t t) {
  using B = typename T::B;
  constexpr bool kSignedBytes = T::kSignedBytes;
  const int64_t nb = k.cols / kQK;
  const B* w[4];
  for (int i = 0; i < 4; ++i)
    w[i] = reinterpret_cast<const B*>(k.w + static_cast<size_t>(r + std::min(i, nr - 1)) * k.row_bytes);
  const int8_t* xq[NT];
  const float* xd[NT];
  const float* xs[NT];
  const int32_t* xg[NT];
  for (int n = 0; n < NT; ++n) {
    xq[n] = k.a->qrow(t + n), xd[n] = k.a->drow(t + n);
    xs[n] = T::kMin ? k.a->srow(t + n) : nullptr;
    xg[n] = T::kShift >= 0 ? k.a->grow(t + n) : nullptr;
  }
  __m256 acc[2][NT];
  __m128 summ[NT];
  for (int n = 0; n < NT; ++n) {
    summ[n] = _mm_setzero_ps();
    acc[0][n] = acc[1][n] = _mm256_setzero_ps();
  }
  const __m256i ones = _mm256_set1_epi16(1), spread0 = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1),
                spread1 = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);
  const size_t ahead = 8 * k.row_bytes;  // two groups on (measured: one group ahead lands too late)
  for (int64_t b = 0; b < nb; ++b) {
    uint32_t h[4];
    for (int i = 0; i < 4; ++i) {
      _mm_prefetch(reinterpret_cast<const char*>(w[i] + b) + ahead, _MM_HINT_T0);
      std::memcpy(&h[i], w[i] + b, 4);
    }
    const __m128i dm = _mm_setr_epi32(static_cast<int>(h[0]), static_cast<int>(h[1]), static_cast<int>(h[2]),
                                      static_cast<int>(h[3]));
    const __m128i low16 = _mm_set1_epi32(0xFFFF);
    const __m128 dw = _mm_cvtph_ps(_mm_packus_epi32(_mm_and_si128(dm, low16), dm));
    const __m128 mw = T::kMin ? _mm_cvtph_ps(_mm_packus_epi32(_mm_srli_epi32(dm, 16), dm)) : _mm_setzero_ps();
    __m256i lo0, hi0, lo1, hi1;
    T::unpack2(w[0] + b, w[1] + b, lo0, hi0);
    T::unpack2(w[2] + b, w[3] + b, lo1, hi1);
    __m256i alo0 = lo0, ahi0 = hi0, alo1 = lo1, ahi1 = hi1;
    if (kSignedBytes) {
      alo0 = _mm256_sign_epi8(lo0, lo0), ahi0 = _mm256_sign_epi8(hi0, hi0);
      alo1 = _mm256_sign_epi8(lo1, lo1), ahi1 = _mm256_sign_epi8(hi1, hi1);
    }
    const __m256 dws0 = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(dw), spread0);
    const __m256 dws1 = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(dw), spread1);
    for (int n = 0; n < NT; ++n) {
      if (T::kMin) summ[n] = _mm_add_ps(summ[n], _mm_mul_ps(mw, _mm_set1_ps(xs[n][b])));
      const __m256 dx = _mm256_set1_ps(xd[n][b]);
      const __m256i ylo = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xq[n] + b * kQK)));
      const __m256i yhi = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xq[n] + b * kQK + 16)));
      __m256i p0, p1;
      if (kSignedBytes) {
        // |w| * sign(y, w); vpmaddubsw's pair sums stay within int16 (|w| <= 128, |y| <= 127).
        p0 = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(alo0, _mm256_sign_epi8(ylo, lo0)), ones),
                              _mm256_madd_epi16(_mm256_maddubs_epi16(ahi0, _mm256_sign_epi8(yhi, hi0)), ones));
        p1 = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(alo1, _mm256_sign_epi8(ylo, lo1)), ones),
                              _mm256_madd_epi16(_mm256_maddubs_epi16(ahi1, _mm256_sign_epi8(yhi, hi1)), ones));
      } else {
        // Unsigned values <= 31: the low and high pair sums add within int16 (<= 4 * 31 * 127).
        p0 = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo0, ylo), _mm256_maddubs_epi16(hi0, yhi)), ones);
        p1 = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo1, ylo), _mm256_maddubs_epi16(hi1, yhi)), ones);
        if (T::kShift >= 0) {
          const __m256i off = _mm256_slli_epi32(
              _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xg[n] + b * 4))),
              T::kShift >= 0 ? T::kShift : 0);
          p0 = _mm256_add_epi32(p0, off);
          p1 = _mm256_add_epi32(p1, off);
        }
      }
      acc[0][n] = _mm256_add_ps(acc[0][n], _mm256_mul_ps(_mm256_mul_ps(dws0, dx), _mm256_cvtepi32_ps(p0)));
      acc[1][n] = _mm256_add_ps(acc[1][n], _mm256_mul_ps(_mm256_mul_ps(dws1, dx), _mm256_cvtepi32_ps(p1)));
    }
  }
  for (int n = 0; n < NT; ++n) {
    alignas(32) float a[16];
    alignas(16) float sm[4];
    _mm256_store_ps(a, acc[0][n]);
    _mm256_store_ps(a + 8, acc[1][n]);
    _mm_store_ps(sm, summ[n]);
    float* y = k.y + (t + n) * k.rows + r;
    for (int i = 0; i < nr; ++i) y[i] = hsum4(a + 4 * i) + sm[i];
  }
}

template <class T>
OSD_AVX2 void range32_avx2(const Args& k, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
  // Four rows at a time; their weights stay in L1 while every 4-token chunk uses them.
  for (int64_t r = r0; r < r1; r += 4) {
    const int nr = static_cast<int>(std::min<int64_t>(4, r1 - r));
    for (int64_t t = t0; t < t1; t += 4) {
      switch (std::min<int64_t>(4, t1 - t)) {
        case 4: rows4_avx2<T, 4>(k, r, nr, t); break;
        case 3: rows4_avx2<T, 3>(k, r, nr, t); break;
        case 2: rows4_avx2<T, 2>(k, r, nr, t); break;
        default: rows4_avx2<T, 1>(k, r, nr, t); break;
      }
    }
  }
}

// K-quants: a super-block unpacked into int8 weights plus, per 32 weights, the int16 scale vector
// that multiplies their pair sums (the scale of each 16-weight group, in the lanes of its pairs),
// and the per-group mins of Q4_K / Q5_K laid out against the activations' 16-value sums.
struct KBlockV {
  alignas(32) int8_t q[256];
  __m256i scv[8];
  __m256i mnv;
  float D, M;
};

// The 8 six-bit scales and 8 six-bit mins of Q4_K / Q5_K (as scale_min_k4), as 16 int16 lanes:
// scales in 0..7, mins in 8..15.
OSD_AVX2_INLINE __m256i scales_mins_k4(const uint8_t* s) {
  uint32_t u[4];
  std::memcpy(u, s, 12);
  constexpr uint32_t kMask1 = 0x3f3f3f3f, kMask2 = 0x0f0f0f0f, kMask3 = 0x03030303;
  u[3] = ((u[2] >> 4) & kMask2) | (((u[1] >> 6) & kMask3) << 4);
  const uint32_t m = u[1] & kMask1;
  u[1] = (u[2] & kMask2) | (((u[0] >> 6) & kMask3) << 4);
  u[2] = m;
  u[0] &= kMask1;
  return _mm256_cvtepu8_epi16(_mm_setr_epi32(static_cast<int>(u[0]), static_cast<int>(u[1]), static_cast<int>(u[2]),
                                              static_cast<int>(u[3])));
}

// Q4_K / Q5_K: chunk c (32 weights) is sub-block c, one scale for all its pairs.
OSD_AVX2_INLINE void scales_k4_avx2(const uint8_t* s, KBlockV& k) {
  const __m256i sm = scales_mins_k4(s);  // int16: sc0..sc7 | m0..m7 (lanes of 128 bits: sc0..7, m0..7)
  const __m128i sc = _mm256_castsi256_si128(sm), mn = _mm256_extracti128_si256(sm, 1);
  const __m256i sc2 = _mm256_broadcastsi128_si256(sc);
  for (int c = 0; c < 8; ++c) {
    const __m256i pick = _mm256_set1_epi16(static_cast<short>((2 * c + 1) << 8 | (2 * c)));
    k.scv[c] = _mm256_shuffle_epi8(sc2, pick);
  }
  // mins per 16-value group: m0 m0 m1 m1 ... m7 m7
  k.mnv = _mm256_set_m128i(_mm_unpackhi_epi16(mn, mn), _mm_unpacklo_epi16(mn, mn));
}

// Scales per 16 weights (Q3_K, Q6_K): chunk c holds groups 2c and 2c+1.
OSD_AVX2_INLINE void scales_16_avx2(const int8_t* sc16, KBlockV& k) {
  for (int c = 0; c < 8; ++c) k.scv[c] = _mm256_set_m128i(_mm_set1_epi16(sc16[2 * c + 1]), _mm_set1_epi16(sc16[2 * c]));
  k.mnv = _mm256_setzero_si256();
}

OSD_AVX2 void unpack_kv(const BlockQ4_K& b, KBlockV& k) {
  scales_k4_avx2(b.scales, k);
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int c = 0; c < 4; ++c) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qs + 32 * c));
    _mm256_store_si256(reinterpret_cast<__m256i*>(k.q + 64 * c), _mm256_and_si256(v, low));
    _mm256_store_si256(reinterpret_cast<__m256i*>(k.q + 64 * c + 32), _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
  }
  k.D = f16(b.d);
  k.M = f16(b.dmin);
}

OSD_AVX2 void unpack_kv(const BlockQ5_K& b, KBlockV& k) {
  scales_k4_avx2(b.scales, k);
  const __m256i low = _mm256_set1_epi8(0x0F), sixteen = _mm256_set1_epi8(0x10);
  const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qh));
  for (int c = 0; c < 4; ++c) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qs + 32 * c));
    const __m256i m0 = _mm256_set1_epi8(static_cast<char>(1 << (2 * c)));
    const __m256i m1 = _mm256_set1_epi8(static_cast<char>(1 << (2 * c + 1)));
    const __m256i h0 = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, m0), m0), sixteen);
    const __m256i h1 = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, m1), m1), sixteen);
    _mm256_store_si256(reinterpret_cast<__m256i*>(k.q + 64 * c), _mm256_or_si256(_mm256_and_si256(v, low), h0));
    _mm256_store_si256(reinterpret_cast<__m256i*>(k.q + 64 * c + 32),
                       _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), low), h1));
  }
  k.D = f16(b.d);
  k.M = f16(b.dmin);
}

OSD_AVX2 void unpack_kv(const BlockQ6_K& b, KBlockV& k) {
  scales_16_avx2(b.scales, k);
  const __m256i low = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(0x30), off = _mm256_set1_epi8(32);
  for (int n = 0; n < 2; ++n) {
    const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.ql + 64 * n));
    const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.ql + 64 * n + 32));
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qh + 32 * n));
    int8_t* q = k.q + 128 * n;
    const __m256i a = _mm256_or_si256(_mm256_and_si256(l0, low), _mm256_and_si256(_mm256_slli_epi16(h, 4), two));
    const __m256i bb = _mm256_or_si256(_mm256_and_si256(l1, low), _mm256_and_si256(_mm256_slli_epi16(h, 2), two));
    const __m256i c = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low), _mm256_and_si256(h, two));
    const __m256i d = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low),
                                      _mm256_and_si256(_mm256_srli_epi16(h, 2), two));
    _mm256_store_si256(reinterpret_cast<__m256i*>(q), _mm256_sub_epi8(a, off));
    _mm256_store_si256(reinterpret_cast<__m256i*>(q + 32), _mm256_sub_epi8(bb, off));
    _mm256_store_si256(reinterpret_cast<__m256i*>(q + 64), _mm256_sub_epi8(c, off));
    _mm256_store_si256(reinterpret_cast<__m256i*>(q + 96), _mm256_sub_epi8(d, off));
  }
  k.D = f16(b.d);
  k.M = 0.0f;
}

OSD_AVX2 void unpack_kv(const BlockQ3_K& b, KBlockV& k) {
  int8_t sc[16];
  scales_q3_k(b.scales, sc);
  scales_16_avx2(sc, k);
  const __m256i three = _mm256_set1_epi8(3), four = _mm256_set1_epi8(4), zero = _mm256_setzero_si256();
  const __m256i hm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.hmask));
  for (int n = 0; n < 2; ++n) {
    const __m256i qs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qs + 32 * n));
    for (int j = 0; j < 4; ++j) {
      const __m256i v = _mm256_and_si256(_mm256_srli_epi16(qs, 2 * j), three);
      const __m256i m = _mm256_set1_epi8(static_cast<char>(1 << (4 * n + j)));
      const __m256i clear = _mm256_cmpeq_epi8(_mm256_and_si256(hm, m), zero);
      _mm256_store_si256(reinterpret_cast<__m256i*>(k.q + 128 * n + 32 * j),
                         _mm256_sub_epi8(v, _mm256_and_si256(clear, four)));
    }
  }
  k.D = f16(b.d);
  k.M = 0.0f;
}

template <class B>
constexpr bool kHasMin = std::is_same<B, BlockQ4_K>::value || std::is_same<B, BlockQ5_K>::value;

template <class B, int RN>
OSD_AVX2 void tilek_avx2(const Args& k, const KBlockV& kb, int64_t b, int64_t t, float* acc) {
  const int8_t* yq[RN];
  for (int j = 0; j < RN; ++j) yq[j] = k.a->qrow(t + j) + b * kQKK;
  __m256i sumi[RN];
  for (int j = 0; j < RN; ++j) sumi[j] = _mm256_setzero_si256();
  for (int c = 0; c < 8; ++c) {
    const __m256i wq = _mm256_load_si256(reinterpret_cast<const __m256i*>(kb.q + 32 * c));
    const __m256i wa = _mm256_sign_epi8(wq, wq);
    for (int j = 0; j < RN; ++j) {
      const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(yq[j] + 32 * c));
      const __m256i p16 = _mm256_maddubs_epi16(wa, _mm256_sign_epi8(y, wq));
      sumi[j] = _mm256_add_epi32(sumi[j], _mm256_madd_epi16(p16, kb.scv[c]));
    }
  }
  for (int j = 0; j < RN; ++j) {
    const int isum = hsum_i32_inline(sumi[j]);
    int msum = 0;
    if (kHasMin<B>) {
      const __m256i bs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(k.a->brow(t + j) + b * 16));
      msum = hsum_i32_inline(_mm256_madd_epi16(bs, kb.mnv));
    }
    const float dx = k.a->drow(t + j)[b];
    acc[j] = acc[j] + ((dx * kb.D) * static_cast<float>(isum) - (dx * kb.M) * static_cast<float>(msum));
  }
}

template <class B>
OSD_AVX2 void rangek_avx2(const Args& k, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
  const int64_t nb = k.cols / kQKK;
  KBlockV kb;
  constexpr int kTokens = 4;
  for (int64_t r = r0; r < r1; ++r) {
    const B* w = reinterpret_cast<const B*>(k.w + static_cast<size_t>(r) * k.row_bytes);
    for (int64_t t = t0; t < t1; t += kTokens) {
      const int rn = static_cast<int>(std::min<int64_t>(kTokens, t1 - t));
      float acc[kTokens] = {};
      for (int64_t b = 0; b < nb; ++b) {
        _mm_prefetch(reinterpret_cast<const char*>(w + b) + kPrefetchBytes, _MM_HINT_T0);
        unpack_kv(w[b], kb);
        switch (rn) {
          case 4: tilek_avx2<B, 4>(k, kb, b, t, acc); break;
          case 3: tilek_avx2<B, 3>(k, kb, b, t, acc); break;
          case 2: tilek_avx2<B, 2>(k, kb, b, t, acc); break;
          default: tilek_avx2<B, 1>(k, kb, b, t, acc); break;
        }
      }
      for (int j = 0; j < rn; ++j) k.y[(t + j) * k.rows + r] = acc[j];
    }
  }
}

bool cpu_has_avx2() {
  // F16C through cpuid (leaf 1, ecx bit 29): clang's __builtin_cpu_supports does not know "f16c".
  static const bool yes = [] {
    unsigned a, b, c, d;
    const bool f16c = __get_cpuid(1, &a, &b, &c, &d) && ((c >> 29) & 1);
    return f16c && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return yes;
}

// ---- AVX-512 kernels (F + BW + VL + VNNI) ----
// The integer sums are formed by VNNI: vpdpbusd adds the four u8 x s8 products of each 32-bit
// lane in one instruction where AVX2 needs vpmaddubsw + vpmaddwd, and vpdpwssd folds the K-quants'
// scale products into the running sum. Both are exact (no saturation; vpmaddubsw never saturates
// here either, as |w| <= 128 and |x| <= 127), so the integers equal the AVX2 ones, and the float
// operations, in order, are those of the portable kernels. The AVX2 helpers inline here: their ISA
// is a subset.
#define OSD_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#define OSD_AVX512_INLINE __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"), always_inline)) inline

// 32-value formats, eight rows at a time: each block's four-row vectors hold the rows' low-half
// values (j < 16) in one 512-bit vector and their high-half values in another, a 128-bit lane per
// row, so two vpdpbusd form p[k] of four rows, a lane each (the contract's pairing of j and j + 16
// is what makes the Q4 nibbles load this way: one load, a shift and two masks for four rows). The
// rows' scales convert as one vector, dw * dx and m_w * s_x run with a lane per row, and the rows
// are unpacked once per block for up to eight tokens. The signed formats (Q4_0, Q5_0, Q8_0) are
// read offset to unsigned (w + o, o = 8, 16, 128) with o times the activations' sums of each p[k]
// (Acts::gneg, shifted) as the starting sum: the same exact integers. Per lane the float
// operations are those of the portable kernel, in order.
// Measured against the kernels this replaced (eight four-value sums per 32 values, a row or two
// tokens per vector from five tokens on, and a prefetch 1 KB along each row), SmolLM2-135M Q4_1,
// one evaluate after a 64-token prefix, medians of 100, alternating: 1 token 3.6-3.8 -> 3.1-3.2 ms,
// 5 tokens 8.2-8.3 -> 5.1-5.2 ms, 17 tokens 24.6-25.7 -> 15.0-15.3 ms; prefill of 512 tokens
// 606-629 -> 452-468 ms.
OSD_AVX512_INLINE __m512i load4x16(const void* a, const void* b, const void* c, const void* d) {
  __m512i x = _mm512_castsi128_si512(_mm_loadu_si128(static_cast<const __m128i*>(a)));
  x = _mm512_inserti32x4(x, _mm_loadu_si128(static_cast<const __m128i*>(b)), 1);
  x = _mm512_inserti32x4(x, _mm_loadu_si128(static_cast<const __m128i*>(c)), 2);
  return _mm512_inserti32x4(x, _mm_loadu_si128(static_cast<const __m128i*>(d)), 3);
}

// Four rows' low-nibble and high-nibble values, a 128-bit lane per row.
OSD_AVX512_INLINE void nibbles4(const uint8_t* const* qs, __m512i& lo, __m512i& hi) {
  const __m512i x = load4x16(qs[0], qs[1], qs[2], qs[3]), low4 = _mm512_set1_epi8(0x0F);
  lo = _mm512_and_si512(x, low4);
  hi = _mm512_and_si512(_mm512_srli_epi16(x, 4), low4);
}

// Adds the fifth bits (0x10) of Q5_0 / Q5_1: bits 0-15 of each row's qh to its low lane, 16-31 to
// its high lane.
OSD_AVX512_INLINE void fifth_bits4(const uint8_t* const* qh, __m512i& lo, __m512i& hi) {
  uint64_t mlo = 0, mhi = 0;
  for (int i = 0; i < 4; ++i) {
    uint32_t h;
    std::memcpy(&h, qh[i], 4);
    mlo |= static_cast<uint64_t>(h & 0xFFFF) << (16 * i);
    mhi |= static_cast<uint64_t>(h >> 16) << (16 * i);
  }
  const __m512i bit = _mm512_set1_epi8(0x10);
  lo = _mm512_mask_add_epi8(lo, mlo, lo, bit);
  hi = _mm512_mask_add_epi8(hi, mhi, hi, bit);
}

struct Q4_0R {
  using B = BlockQ4_0;
  static constexpr bool kMin = false;
  static constexpr int kShift = 3;  // o = 8
  OSD_AVX512_INLINE static void unpack4(const B* const* w, __m512i& lo, __m512i& hi) {
    const uint8_t* qs[4] = {w[0]->qs, w[1]->qs, w[2]->qs, w[3]->qs};
    nibbles4(qs, lo, hi);
  }
};
struct Q4_1R {
  using B = BlockQ4_1;
  static constexpr bool kMin = true;
  static constexpr int kShift = -1;  // unsigned already
  OSD_AVX512_INLINE static void unpack4(const B* const* w, __m512i& lo, __m512i& hi) {
    const uint8_t* qs[4] = {w[0]->qs, w[1]->qs, w[2]->qs, w[3]->qs};
    nibbles4(qs, lo, hi);
  }
};
struct Q5_0R {
  using B = BlockQ5_0;
  static constexpr bool kMin = false;
  static constexpr int kShift = 4;  // o = 16
  OSD_AVX512_INLINE static void unpack4(const B* const* w, __m512i& lo, __m512i& hi) {
    const uint8_t* qs[4] = {w[0]->qs, w[1]->qs, w[2]->qs, w[3]->qs};
    const uint8_t* qh[4] = {w[0]->qh, w[1]->qh, w[2]->qh, w[3]->qh};
    nibbles4(qs, lo, hi);
    fifth_bits4(qh, lo, hi);
  }
};
struct Q5_1R {
  using B = BlockQ5_1;
  static constexpr bool kMin = true;
  static constexpr int kShift = -1;
  OSD_AVX512_INLINE static void unpack4(const B* const* w, __m512i& lo, __m512i& hi) {
    const uint8_t* qs[4] = {w[0]->qs, w[1]->qs, w[2]->qs, w[3]->qs};
    const uint8_t* qh[4] = {w[0]->qh, w[1]->qh, w[2]->qh, w[3]->qh};
    nibbles4(qs, lo, hi);
    fifth_bits4(qh, lo, hi);
  }
};
struct Q8_0R {
  using B = BlockQ8_0;
  static constexpr bool kMin = false;
  static constexpr int kShift = 7;  // o = 128
  OSD_AVX512_INLINE static void unpack4(const B* const* w, __m512i& lo, __m512i& hi) {
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));  // w + 128 as unsigned bytes
    lo = _mm512_xor_si512(load4x16(w[0]->qs, w[1]->qs, w[2]->qs, w[3]->qs), flip);
    hi = _mm512_xor_si512(load4x16(w[0]->qs + 16, w[1]->qs + 16, w[2]->qs + 16, w[3]->qs + 16), flip);
  }
};

// GCC 12's AVX-512 headers fill unused lanes from a self-initialised "undefined" vector, which its
// own -Wmaybe-uninitialized then flags in every caller (fixed in GCC 13): silenced here only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// Rows r .. r + nr - 1 (nr <= 8; a short group repeats its last row and drops its outputs) for
// tokens t .. t + NT - 1.
template <class T, int NT>
OSD_AVX512 void rows8_avx512(const Args& k, int64_t r, int nr, int64_t t) {
  using B = typename T::B;
  const int64_t nb = k.cols / kQK;
  const B* w[8];
  for (int i = 0; i < 8; ++i)
    w[i] = reinterpret_cast<const B*>(k.w + static_cast<size_t>(r + std::min(i, nr - 1)) * k.row_bytes);
  const int8_t* xq[NT];
  const float* xd[NT];
  const float* xs[NT];
  const int32_t* xg[NT];
  for (int n = 0; n < NT; ++n) {
    xq[n] = k.a->qrow(t + n), xd[n] = k.a->drow(t + n);
    xs[n] = T::kMin ? k.a->srow(t + n) : nullptr;
    xg[n] = T::kShift >= 0 ? k.a->grow(t + n) : nullptr;
  }
  __m512 acc[2][NT];
  __m256 summ[NT];
  for (int n = 0; n < NT; ++n) {
    summ[n] = _mm256_setzero_ps();
    acc[0][n] = acc[1][n] = _mm512_setzero_ps();
  }
  // Lanes 4i .. 4i + 3 of the first vector take row i's scale, of the second row 4 + i's.
  const __m512i spread0 = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const __m512i spread1 = _mm512_add_epi32(spread0, _mm512_set1_epi32(4));
  // The eight rows are read side by side, so a prefetch a fixed distance along a row lands in rows
  // of this group, already on their way: the next group's blocks are fetched instead (with 1 KB
  // along each row, SmolLM2's decoding spent a third of its time waiting for the scales' loads).
  const size_t ahead = 8 * k.row_bytes;
  for (int64_t b = 0; b < nb; ++b) {
    // Each row's d (and m) from the block's first four bytes: d in the low 16 bits.
    uint32_t h[8];
    for (int i = 0; i < 8; ++i) {
      _mm_prefetch(reinterpret_cast<const char*>(w[i] + b) + ahead, _MM_HINT_T0);
      std::memcpy(&h[i], w[i] + b, 4);
    }
    const __m256i dm = _mm256_setr_epi32(static_cast<int>(h[0]), static_cast<int>(h[1]), static_cast<int>(h[2]),
                                         static_cast<int>(h[3]), static_cast<int>(h[4]), static_cast<int>(h[5]),
                                         static_cast<int>(h[6]), static_cast<int>(h[7]));
    const __m256 dw = _mm256_cvtph_ps(_mm256_cvtepi32_epi16(dm));
    const __m256 mw = T::kMin ? _mm256_cvtph_ps(_mm256_cvtepi32_epi16(_mm256_srli_epi32(dm, 16))) : _mm256_setzero_ps();
    const B* w4a[4] = {w[0] + b, w[1] + b, w[2] + b, w[3] + b};
    const B* w4b[4] = {w[4] + b, w[5] + b, w[6] + b, w[7] + b};
    __m512i lo0, hi0, lo1, hi1;
    T::unpack4(w4a, lo0, hi0);
    T::unpack4(w4b, lo1, hi1);
    const __m512 dws0 = _mm512_permutexvar_ps(spread0, _mm512_castps256_ps512(dw));
    const __m512 dws1 = _mm512_permutexvar_ps(spread1, _mm512_castps256_ps512(dw));
    for (int n = 0; n < NT; ++n) {
      if (T::kMin) summ[n] = _mm256_add_ps(summ[n], _mm256_mul_ps(mw, _mm256_set1_ps(xs[n][b])));
      const __m512 dx = _mm512_set1_ps(xd[n][b]);
      const __m512i ylo = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xq[n] + b * kQK)));
      const __m512i yhi = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xq[n] + b * kQK + 16)));
      __m512i start = _mm512_setzero_si512();
      if (T::kShift >= 0)
        start = _mm512_slli_epi32(_mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xg[n] + b * 4))),
                                  T::kShift >= 0 ? T::kShift : 0);
      const __m512 p0 = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_dpbusd_epi32(start, lo0, ylo), hi0, yhi));
      const __m512 p1 = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_dpbusd_epi32(start, lo1, ylo), hi1, yhi));
      acc[0][n] = _mm512_add_ps(acc[0][n], _mm512_mul_ps(_mm512_mul_ps(dws0, dx), p0));
      acc[1][n] = _mm512_add_ps(acc[1][n], _mm512_mul_ps(_mm512_mul_ps(dws1, dx), p1));
    }
  }
  for (int n = 0; n < NT; ++n) {
    alignas(64) float a[32];
    alignas(32) float sm[8];
    _mm512_store_ps(a, acc[0][n]);
    _mm512_store_ps(a + 16, acc[1][n]);
    _mm256_store_ps(sm, summ[n]);
    float* y = k.y + (t + n) * k.rows + r;
    for (int i = 0; i < nr; ++i) y[i] = hsum4(a + 4 * i) + sm[i];
  }
}
#pragma GCC diagnostic pop

template <class T>
OSD_AVX512 void range32_avx512(const Args& k, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
  // Eight rows at a time; their weights stay in L1 while every 8-token chunk uses them.
  for (int64_t r = r0; r < r1; r += 8) {
    const int nr = static_cast<int>(std::min<int64_t>(8, r1 - r));
    for (int64_t t = t0; t < t1; t += 8) {
      switch (std::min<int64_t>(8, t1 - t)) {
        case 8: rows8_avx512<T, 8>(k, r, nr, t); break;
        case 7: rows8_avx512<T, 7>(k, r, nr, t); break;
        case 6: rows8_avx512<T, 6>(k, r, nr, t); break;
        case 5: rows8_avx512<T, 5>(k, r, nr, t); break;
        case 4: rows8_avx512<T, 4>(k, r, nr, t); break;
        case 3: rows8_avx512<T, 3>(k, r, nr, t); break;
        case 2: rows8_avx512<T, 2>(k, r, nr, t); break;
        default: rows8_avx512<T, 1>(k, r, nr, t); break;
      }
    }
  }
}

template <class B, int RN>
OSD_AVX512 void tilek_avx512(const Args& k, const KBlockV& kb, int64_t b, int64_t t, float* acc) {
  const int8_t* yq[RN];
  for (int j = 0; j < RN; ++j) yq[j] = k.a->qrow(t + j) + b * kQKK;
  __m256i sumi[RN];
  for (int j = 0; j < RN; ++j) sumi[j] = _mm256_setzero_si256();
  for (int c = 0; c < 8; ++c) {
    const __m256i wq = _mm256_load_si256(reinterpret_cast<const __m256i*>(kb.q + 32 * c));
    const __m256i wa = _mm256_abs_epi8(wq);
    for (int j = 0; j < RN; ++j) {
      const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(yq[j] + 32 * c));
      const __m256i p16 = _mm256_maddubs_epi16(wa, _mm256_sign_epi8(y, wq));
      sumi[j] = _mm256_dpwssd_epi32(sumi[j], p16, kb.scv[c]);
    }
  }
  for (int j = 0; j < RN; ++j) {
    const int isum = hsum_i32_inline(sumi[j]);
    int msum = 0;
    if (kHasMin<B>) {
      const __m256i bs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(k.a->brow(t + j) + b * 16));
      msum = hsum_i32_inline(_mm256_dpwssd_epi32(_mm256_setzero_si256(), bs, kb.mnv));
    }
    const float dx = k.a->drow(t + j)[b];
    acc[j] = acc[j] + ((dx * kb.D) * static_cast<float>(isum) - (dx * kb.M) * static_cast<float>(msum));
  }
}

template <class B>
OSD_AVX512 void rangek_avx512(const Args& k, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
  const int64_t nb = k.cols / kQKK;
  KBlockV kb;
  constexpr int kTokens = 4;
  for (int64_t r = r0; r < r1; ++r) {
    const B* w = reinterpret_cast<const B*>(k.w + static_cast<size_t>(r) * k.row_bytes);
    for (int64_t t = t0; t < t1; t += kTokens) {
      const int rn = static_cast<int>(std::min<int64_t>(kTokens, t1 - t));
      float acc[kTokens] = {};
      for (int64_t b = 0; b < nb; ++b) {
        _mm_prefetch(reinterpret_cast<const char*>(w + b) + kPrefetchBytes, _MM_HINT_T0);
        unpack_kv(w[b], kb);
        switch (rn) {
          case 4: tilek_avx512<B, 4>(k, kb, b, t, acc); break;
          case 3: tilek_avx512<B, 3>(k, kb, b, t, acc); break;
          case 2: tilek_avx512<B, 2>(k, kb, b, t, acc); break;
          default: tilek_avx512<B, 1>(k, kb, b, t, acc); break;
        }
      }
      for (int j = 0; j < rn; ++j) k.y[(t + j) * k.rows + r] = acc[j];
    }
  }
}

// AVX512F, BW, VL and VNNI through cpuid (leaf 7: ebx bits 16, 30, 31; ecx bit 11), with the OS
// saving the opmask and zmm state (XCR0 bits 1, 2, 5, 6, 7), besides everything the AVX2 kernels need.
bool cpu_has_avx512() {
  static const bool yes = [] {
    if (!cpu_has_avx2()) return false;
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1)) return false;  // OSXSAVE
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool isa = ((b >> 16) & 1) && ((b >> 30) & 1) && ((b >> 31) & 1) && ((c >> 11) & 1);
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return isa && (lo & 0xE6) == 0xE6;
  }();
  return yes;
}
#else
bool cpu_has_avx2() { return false; }
bool cpu_has_avx512() { return false; }
#endif

using RangeFn = void (*)(const Args&, int64_t, int64_t, int64_t, int64_t);

RangeFn pick(TensorType t, Isa isa) {
#ifdef OSD_HAVE_X86
  if (isa == Isa::Avx512) {
    switch (t) {
      case TensorType::Q4_0: return range32_avx512<Q4_0R>;
      case TensorType::Q4_1: return range32_avx512<Q4_1R>;
      case TensorType::Q5_0: return range32_avx512<Q5_0R>;
      case TensorType::Q5_1: return range32_avx512<Q5_1R>;
      case TensorType::Q8_0: return range32_avx512<Q8_0R>;
      case TensorType::Q3_K: return rangek_avx512<BlockQ3_K>;
      case TensorType::Q4_K: return rangek_avx512<BlockQ4_K>;
      case TensorType::Q5_K: return rangek_avx512<BlockQ5_K>;
      case TensorType::Q6_K: return rangek_avx512<BlockQ6_K>;
      default: break;
    }
  }
  if (isa == Isa::Avx2) {
    switch (t) {
      case TensorType::Q4_0: return range32_avx2<Q4_0W>;
      case TensorType::Q4_1: return range32_avx2<Q4_1W>;
      case TensorType::Q5_0: return range32_avx2<Q5_0W>;
      case TensorType::Q5_1: return range32_avx2<Q5_1W>;
      case TensorType::Q8_0: return range32_avx2<Q8_0W>;
      case TensorType::Q3_K: return rangek_avx2<BlockQ3_K>;
      case TensorType::Q4_K: return rangek_avx2<BlockQ4_K>;
      case TensorType::Q5_K: return rangek_avx2<BlockQ5_K>;
      case TensorType::Q6_K: return rangek_avx2<BlockQ6_K>;
      default: break;
    }
  }
#endif
  switch (t) {
    case TensorType::Q4_0: return range32_ref<Q4_0T>;
    case TensorType::Q4_1: return range32_ref<Q4_1T>;
    case TensorType::Q5_0: return range32_ref<Q5_0T>;
    case TensorType::Q5_1: return range32_ref<Q5_1T>;
    case TensorType::Q8_0: return range32_ref<Q8_0T>;
    case TensorType::Q3_K: return rangek_ref<BlockQ3_K>;
    case TensorType::Q4_K: return rangek_ref<BlockQ4_K>;
    case TensorType::Q5_K: return rangek_ref<BlockQ5_K>;
    case TensorType::Q6_K: return rangek_ref<BlockQ6_K>;
    default: break;
  }
  throw_range(std::string("no int8 matrix kernel for type ") + gguf::type_info(t).name);
}

// Whether the kernel pick(t, isa) reads the activations' offset sums (Acts::gneg).
bool reads_offsets(TensorType t, Isa isa) {
#ifdef OSD_HAVE_X86
  if (isa == Isa::Avx512) switch (t) {
      case TensorType::Q4_0: return Q4_0R::kShift >= 0;
      case TensorType::Q5_0: return Q5_0R::kShift >= 0;
      case TensorType::Q8_0: return Q8_0R::kShift >= 0;
      default: return false;
    }
  if (isa == Isa::Avx2) switch (t) {
      case TensorType::Q4_0: return Q4_0W::kShift >= 0;
      case TensorType::Q5_0: return Q5_0W::kShift >= 0;
      case TensorType::Q8_0: return Q8_0W::kShift >= 0;
      default: return false;
    }
#endif
  (void)t, (void)isa;
  return false;
}

}  // namespace

bool isa_available(Isa isa) {
  return isa == Isa::Portable || (isa == Isa::Avx2 && cpu_has_avx2()) || (isa == Isa::Avx512 && cpu_has_avx512());
}

Isa best_isa() {
  static const Isa best = [] {
    if (!cpu_has_avx2() || std::getenv("OSD_NO_AVX2")) return Isa::Portable;
    if (!cpu_has_avx512() || std::getenv("OSD_NO_AVX512")) return Isa::Avx2;
    return Isa::Avx512;
  }();
  return best;
}

const char* isa_name(Isa isa) { return isa == Isa::Avx512 ? "avx512" : isa == Isa::Avx2 ? "avx2" : "portable"; }

void matmul_many(const MatmulTarget* targets, int count, int64_t cols, const float* x, int64_t n, Isa isa) {
  if (!isa_available(isa)) throw_range(std::string("instruction set ") + isa_name(isa) + " is not available on this CPU");
  if (count <= 0 || n <= 0) return;
  std::vector<RangeFn> fns(static_cast<size_t>(count));
  std::vector<int64_t> first_block(static_cast<size_t>(count) + 1, 0);
  bool offsets = false;
  // Rows are split among threads in blocks of 16 (over all targets together); tokens are taken
  // 64 at a time so that a block's weights and a chunk of activations stay in cache together.
  constexpr int64_t kRowBlock = 16, kTokenChunk = 64;
  for (int i = 0; i < count; ++i) {
    const MatmulTarget& m = targets[i];
    fns[i] = pick(m.type, isa);
    offsets |= reads_offsets(m.type, isa);
    if (is_k_type(m.type) != is_k_type(targets[0].type))
      throw_range("matmul_many: K-quant and 32-value block types cannot share one activation quantisation");
    if (m.row_bytes != bytes_for(m.type, cols)) throw_range("matmul: row_bytes does not match the row length");
    first_block[i + 1] = first_block[i] + (m.rows + kRowBlock - 1) / kRowBlock;
  }
  thread_local Acts tl_acts;  // reused between calls; workers read the caller's through `acts`
  Acts* const acts = &tl_acts;
  quantize_acts(targets[0].type, x, n, cols, *acts, isa, offsets);
  const int64_t nblocks = first_block[count];
  default_pool().parallel_for(static_cast<size_t>(nblocks), grain_for(static_cast<double>(kRowBlock) * cols * n),
                              [&](size_t lo, size_t hi) {
    for (int64_t t0 = 0; t0 < n; t0 += kTokenChunk) {
      const int64_t t1 = std::min(n, t0 + kTokenChunk);
      int i = 0;
      for (int64_t blk = static_cast<int64_t>(lo); blk < static_cast<int64_t>(hi); ++blk) {
        while (blk >= first_block[i + 1]) ++i;
        const MatmulTarget& m = targets[i];
        const Args args{m.w, m.row_bytes, m.rows, cols, acts, m.y};
        const int64_t r0 = (blk - first_block[i]) * kRowBlock;
        fns[i](args, r0, std::min(m.rows, r0 + kRowBlock), t0, t1);
      }
    }
  });
}

void matmul(TensorType t, const uint8_t* w, size_t row_bytes, int64_t rows, int64_t cols, const float* x, int64_t n,
            float* y, Isa isa) {
  const MatmulTarget target{t, w, row_bytes, rows, y};
  matmul_many(&target, 1, cols, x, n, isa);
}

std::vector<float> activation_roundtrip(TensorType t, const float* x, int64_t cols, Isa isa) {
  if (!has_int8_kernel(t)) throw_range(std::string("no int8 matrix kernel for type ") + gguf::type_info(t).name);
  bytes_for(t, cols);
  if (!isa_available(isa)) throw_range(std::string("instruction set ") + isa_name(isa) + " is not available on this CPU");
  Acts a;
  quantize_acts(t, x, 1, cols, a, isa, false);
  std::vector<float> out(static_cast<size_t>(cols));
  const int64_t bs = is_k_type(t) ? kQKK : kQK;
  for (int64_t j = 0; j < cols; ++j) out[j] = a.d[j / bs] * static_cast<float>(a.q[j]);
  return out;
}

}  // namespace osd::quant
