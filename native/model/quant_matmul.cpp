// Matrix products over quantised weights with 8-bit activations: a portable reference, AVX2
// kernels and AVX-512 VNNI kernels that compute the same operations (see quant.h for the contract).
//
// The fixed per-output sequence, for a weight row w and an activation row x:
//
//  32-value formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL). x is quantised per 32-value block like llama.cpp's
//  Q8_0 / Q8_1 (q = round-to-nearest-even(x * 127 / amax), d = amax / 127, s = d * sum q), except
//  that d and s stay f32 where llama.cpp rounds them to fp16 (on SmolLM2 this takes the rms error
//  of the log-probabilities against exact f32 arithmetic from 0.175 to 0.144). For each block b in
//  order, with wq the block's integer weights (nibble - 8 for Q4_0, nibble for Q4_1, the table's
//  value at the nibble for IQ4_NL, ...):
//      isum = sum of wq[j] * xq[j] over the block's 32 values                   (exact)
//      acc  = acc + (d_w * d_x) * float(isum)                         (Q4_0, Q5_0, Q8_0, IQ4_NL)
//      acc  = acc + ((d_w * d_x) * float(isum) + m_w * s_x)                    (Q4_1, Q5_1)
//  result = acc.
//  One float chain per output, whose integer sums cover a whole block: the vector kernels hold 16
//  rows in one vector, a lane each (the 16-row packed layout below), so each float operation
//  serves 16 outputs.
//
//  256-value formats (Q2_K .. Q6_K, IQ4_XS). x is quantised per 256 values as llama.cpp's Q8_K
//  (f32 d, int8 q, 16-value sums). Each super-block gives integer weights wq, a scale per 16 values
//  sc (IQ4_XS: its sub-block's, on both halves), and (Q2_K, Q4_K, Q5_K) a min per 16 values mn with
//  factors D and M (M = 0 and mn = 0 for the others):
//      isum = sum over 16-value groups g of sc[g] * sum of wq * xq             (exact)
//      msum = sum over g of mn[g] * bsum_x[g]                                  (exact)
//      acc  = acc + ((d_x * D) * float(isum) - (d_x * M) * float(msum))
//  result = acc.
//  Every format has a 16-row packed layout that the AVX2 and AVX-512 kernels read (below, per
//  format); the portable kernels read the file's layout.
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
    case TensorType::Q2_K:
    case TensorType::IQ4_NL:
    case TensorType::IQ4_XS:
      return true;
    default:
      return false;
  }
}

namespace {

// The 256-value formats: Q8_K activations.
bool is_k_type(TensorType t) {
  return t == TensorType::Q2_K || t == TensorType::Q3_K || t == TensorType::Q4_K || t == TensorType::Q5_K ||
         t == TensorType::Q6_K || t == TensorType::IQ4_XS;
}

// Round to nearest, ties to even, for |v| < 2^22 (the activations are within +-127.5).
inline float round_even(float v) { return (v + 0x1.8p23f) - 0x1.8p23f; }

// ---- Quantised activations ----

struct Acts {
  int64_t cols = 0, nb = 0, ng = 0;  // values, scale blocks (32 or 256 values), 16-value groups per row
  std::vector<int8_t> q;             // n x cols (+ padding)
  std::vector<float> d, s;           // n x nb
  std::vector<int16_t> bsum;         // n x ng (K-quants)
  std::vector<int32_t> gneg;         // n x nb: -(sum of the block's 32 xq) (vector kernels of signed formats)
  const int8_t* qrow(int64_t t) const { return q.data() + t * cols; }
  const float* drow(int64_t t) const { return d.data() + t * nb; }
  const float* srow(int64_t t) const { return s.data() + t * nb; }
  const int16_t* brow(int64_t t) const { return bsum.data() + t * ng; }
  const int32_t* grow(int64_t t) const { return gneg.data() + t * nb; }
};

// 127 / amax, or 0 for a block of zeros, or of values so small (amax < 127 / FLT_MAX) that it
// overflows: such a block quantises to zeros (converting x * inf to int would be undefined).
inline float inverse_scale(float amax) {
  const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
  return id <= 3.4028234663852886e38f ? id : 0.0f;
}

// A Q8_K block that quantises to zeros: all zero, or so small that 127 / amax overflows.
inline bool zero_block_k(float amax) { return !(127.0f / amax <= 3.4028234663852886e38f); }

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
    const float id = inverse_scale(amax);
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
    if (!finite || zero_block_k(amax)) {
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
void quantize_acts_q8k_avx2(const float* x, int64_t cols, int8_t* q, float* d, int16_t* bsum);
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
#ifdef OSD_HAVE_X86
    if (k && (isa == Isa::Avx2 || isa == Isa::Avx512))
      quantize_acts_q8k_avx2(x + i * cols, cols, a.q.data() + i * cols, a.d.data() + i * a.nb, a.bsum.data() + i * a.ng);
    else
#endif
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
  a.gneg.resize(!k && offsets ? static_cast<size_t>(n * a.nb) : 0);
  for (size_t i = 0; i < a.gneg.size(); ++i) {
    const int8_t* q = a.q.data() + i * kQK;
    int sum = 0;
    for (int j = 0; j < kQK; ++j) sum += q[j];
    a.gneg[i] = -sum;
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
struct IQ4_NLT {
  using B = BlockIQ4_NL;
  static constexpr bool kMin = false;
  static void unpack(const B& b, int8_t* q) {
    for (int j = 0; j < 16; ++j) {
      q[j] = kIq4Values[b.qs[j] & 0xF];
      q[j + 16] = kIq4Values[b.qs[j] >> 4];
    }
  }
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

void unpack_k(const BlockQ2_K& b, KBlock& k) {
  for (int g = 0; g < 16; ++g) k.sc[g] = b.scales[g] & 0xF, k.mn[g] = b.scales[g] >> 4;
  for (int n = 0; n < 2; ++n)
    for (int j = 0; j < 4; ++j)
      for (int l = 0; l < 32; ++l) k.q[128 * n + 32 * j + l] = static_cast<int8_t>((b.qs[32 * n + l] >> (2 * j)) & 3);
  k.D = half_to_float(b.d);
  k.M = half_to_float(b.dmin);
}

// IQ4_XS: the table's values as weights, each sub-block's scale on both of its 16-value groups.
void unpack_k(const BlockIQ4_XS& b, KBlock& k) {
  for (int s = 0; s < 8; ++s) {
    k.sc[2 * s] = k.sc[2 * s + 1] = static_cast<int16_t>(iq4xs_scale(b, s));
    k.mn[2 * s] = k.mn[2 * s + 1] = 0;
    for (int j = 0; j < 16; ++j) {
      k.q[32 * s + j] = kIq4Values[b.qs[16 * s + j] & 0xF];
      k.q[32 * s + 16 + j] = kIq4Values[b.qs[16 * s + j] >> 4];
    }
  }
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
  const uint8_t* packed;  // w in the 16-row layout (vector kernels of the 32-value formats)
};

// ---- The 16-row packed layout of the 32-value formats ----
//
// Rows go in groups of 16 (the last group repeats its last row). A group holds, block after block,
// the 16 rows' block b interleaved so that one vector load gives the same bytes of every row:
//   d[16] (f16), then m[16] (f16; Q4_1, Q5_1), then the fifth bits (Q5_0, Q5_1) as masks lo[4] and
//   hi[4] (u64: bit 4i + k of lo[c] is row i's fifth bit of value 4c + k, of hi[c] of value
//   16 + 4c + k), then the quants in 4-byte chunks, chunk c of row i at 64c + 4i: four chunks of
//   the 16 nibble bytes (Q4, Q5: byte j holds values j and j + 16), or eight of the 32 bytes (Q8_0).
// A group-block is 16 blocks' bytes, so the layout takes the size of the rows (padded to 16).
struct P4_0 {
  using B = BlockQ4_0;
  static constexpr bool kMin = false, kHigh = false;
  static constexpr int kChunks = 4;
};
struct P4_1 {
  using B = BlockQ4_1;
  static constexpr bool kMin = true, kHigh = false;
  static constexpr int kChunks = 4;
};
struct P5_0 {
  using B = BlockQ5_0;
  static constexpr bool kMin = false, kHigh = true;
  static constexpr int kChunks = 4;
};
struct P5_1 {
  using B = BlockQ5_1;
  static constexpr bool kMin = true, kHigh = true;
  static constexpr int kChunks = 4;
};
struct P8_0 {
  using B = BlockQ8_0;
  static constexpr bool kMin = false, kHigh = false;
  static constexpr int kChunks = 8;
};
// IQ4_NL: Q4_0's layout, its nibbles indexing kIq4Values (one vpshufb per vector in the kernels).
struct PIQ4_NL {
  using B = BlockIQ4_NL;
  static constexpr bool kMin = false, kHigh = false;
  static constexpr int kChunks = 4;
};
template <class P> constexpr bool kTable = std::is_same<P, PIQ4_NL>::value;

template <class P>
struct Packed {
  static constexpr int kMOff = 32;
  static constexpr int kHOff = 32 + (P::kMin ? 32 : 0);
  static constexpr int kQOff = kHOff + (P::kHigh ? 64 : 0);
  static constexpr int kBytes = kQOff + 64 * P::kChunks;  // one group-block
  static_assert(kBytes == 16 * static_cast<int>(sizeof(typename P::B)), "a group-block is 16 blocks");
};

constexpr int kGroup = 16;

int64_t groups_of(int64_t rows) { return (rows + kGroup - 1) / kGroup; }

template <class P>
void pack_group(const uint8_t* w, size_t row_bytes, int64_t rows, int64_t nb, int64_t g, uint8_t* out) {
  using B = typename P::B;
  using L = Packed<P>;
  // Row by row (each row read once, in order); a row's blocks land L::kBytes apart.
  for (int i = 0; i < kGroup; ++i) {
    const B* row = reinterpret_cast<const B*>(w + static_cast<size_t>(std::min(g * kGroup + i, rows - 1)) * row_bytes);
    for (int64_t b = 0; b < nb; ++b) {
      const B& blk = row[b];
      uint8_t* o = out + b * L::kBytes;
      std::memcpy(o + 2 * i, &blk.d, 2);
      const uint8_t* qs = reinterpret_cast<const uint8_t*>(blk.qs);
      for (int c = 0; c < P::kChunks; ++c) std::memcpy(o + L::kQOff + 64 * c + 4 * i, qs + 4 * c, 4);
      if constexpr (P::kMin) std::memcpy(o + L::kMOff + 2 * i, &blk.m, 2);
      if constexpr (P::kHigh) {
        // Row i's fifth bits of values 4c + j (lo[c]) and 16 + 4c + j (hi[c]) go to bits 4i + j.
        uint32_t qh;
        std::memcpy(&qh, blk.qh, 4);
        for (int c = 0; c < 8; ++c) {
          uint64_t m;
          std::memcpy(&m, o + L::kHOff + 8 * c, 8);
          if (i == 0) m = 0;
          m |= static_cast<uint64_t>((qh >> (4 * c)) & 0xF) << (4 * i);
          std::memcpy(o + L::kHOff + 8 * c, &m, 8);
        }
      }
    }
  }
}

// Q4_K and Q5_K in 16-row groups, for the AVX-512 kernels (the other kernels read the file's
// layout). Per super-block: d[16], dmin[16] (f16), the six-bit scales sc[8][16] and mins mn[8][16]
// unpacked to bytes (sub-block j of row i at 16j + i), then the quants in 4-byte chunks as above,
// chunk k of row i at 64k + 4i (byte 4k + e of a row holds value 64(k / 8) + 4(k % 8) + e in its
// low nibble and that + 32 in its high one), then Q5_K's qh the same way (8 chunks). Q4_K: 2,368
// bytes for 16 super-blocks' 2,304; Q5_K: 2,880 for 2,816.
template <class B>
struct PackedK4 {
  static constexpr bool kHigh = std::is_same<B, BlockQ5_K>::value;
  static constexpr int kDOff = 0, kMOff = 32, kScOff = 64, kMnOff = 192, kQOff = 320, kHOff = kQOff + 64 * 32;
  static constexpr int kBytes = kHOff + (kHigh ? 64 * 8 : 0);
};

template <class B>
void pack_group_k4(const uint8_t* w, size_t row_bytes, int64_t rows, int64_t nb, int64_t g, uint8_t* out) {
  using L = PackedK4<B>;
  for (int i = 0; i < kGroup; ++i) {
    const B* row = reinterpret_cast<const B*>(w + static_cast<size_t>(std::min(g * kGroup + i, rows - 1)) * row_bytes);
    for (int64_t b = 0; b < nb; ++b) {
      const B& blk = row[b];
      uint8_t* o = out + b * L::kBytes;
      std::memcpy(o + L::kDOff + 2 * i, &blk.d, 2);
      std::memcpy(o + L::kMOff + 2 * i, &blk.dmin, 2);
      for (int j = 0; j < 8; ++j) scale_min_k4(j, blk.scales, o + L::kScOff + 16 * j + i, o + L::kMnOff + 16 * j + i);
      for (int k = 0; k < 32; ++k) std::memcpy(o + L::kQOff + 64 * k + 4 * i, blk.qs + 4 * k, 4);
      if constexpr (L::kHigh)
        for (int k = 0; k < 8; ++k) std::memcpy(o + L::kHOff + 64 * k + 4 * i, blk.qh + 4 * k, 4);
    }
  }
}

// Q6_K in 16-row groups, for the AVX-512 kernel: per super-block d[16] (f16), the scales sc[16][16]
// (int8, group g of row i at 16g + i), then ql in 4-byte chunks (chunk k of row i at 64k + 4i) and
// qh the same way: the file's 3,360 bytes per 16 super-blocks, reordered.
struct PackedQ6K {
  static constexpr int kDOff = 0, kScOff = 32, kLOff = 288, kHOff = 288 + 64 * 32;
  static constexpr int kBytes = kHOff + 64 * 16;
};

void pack_group_q6k(const uint8_t* w, size_t row_bytes, int64_t rows, int64_t nb, int64_t g, uint8_t* out) {
  using L = PackedQ6K;
  for (int i = 0; i < kGroup; ++i) {
    const BlockQ6_K* row = reinterpret_cast<const BlockQ6_K*>(w + static_cast<size_t>(std::min(g * kGroup + i, rows - 1)) * row_bytes);
    for (int64_t b = 0; b < nb; ++b) {
      const BlockQ6_K& blk = row[b];
      uint8_t* o = out + b * L::kBytes;
      std::memcpy(o + L::kDOff + 2 * i, &blk.d, 2);
      for (int j = 0; j < 16; ++j) o[L::kScOff + 16 * j + i] = static_cast<uint8_t>(blk.scales[j]);
      for (int k = 0; k < 32; ++k) std::memcpy(o + L::kLOff + 64 * k + 4 * i, blk.ql + 4 * k, 4);
      for (int k = 0; k < 16; ++k) std::memcpy(o + L::kHOff + 64 * k + 4 * i, blk.qh + 4 * k, 4);
    }
  }
}

// Q2_K and Q3_K in 16-row groups: per super-block d[16] (f16), then Q2_K's dmin[16] (f16) and its
// scale bytes as they are (scale low, min high nibble; group g of row i at 16g + i), or Q3_K's
// six-bit scales unpacked to int8 (the same places); then the two-bit quants in 4-byte chunks,
// chunk k of row i at 64k + 4i (byte 4k + e of a row holds values 128(k / 8) + 32j + 4(k % 8) + e at
// bits 2j), then Q3_K's hmask the same way (8 chunks). Q2_K: the file's 1,344 bytes per 16
// super-blocks; Q3_K: 1,824 for 1,760.
template <class B>
struct PackedK2 {
  static constexpr bool kMin = std::is_same<B, BlockQ2_K>::value;
  static constexpr int kDOff = 0, kMOff = 32, kScOff = kMin ? 64 : 32, kQOff = kScOff + 256, kHOff = kQOff + 64 * 16;
  static constexpr int kBytes = kHOff + (kMin ? 0 : 64 * 8);
};

template <class B>
void pack_group_k2(const uint8_t* w, size_t row_bytes, int64_t rows, int64_t nb, int64_t g, uint8_t* out) {
  using L = PackedK2<B>;
  for (int i = 0; i < kGroup; ++i) {
    const B* row = reinterpret_cast<const B*>(w + static_cast<size_t>(std::min(g * kGroup + i, rows - 1)) * row_bytes);
    for (int64_t b = 0; b < nb; ++b) {
      const B& blk = row[b];
      uint8_t* o = out + b * L::kBytes;
      std::memcpy(o + L::kDOff + 2 * i, &blk.d, 2);
      for (int k = 0; k < 16; ++k) std::memcpy(o + L::kQOff + 64 * k + 4 * i, blk.qs + 4 * k, 4);
      if constexpr (L::kMin) {
        std::memcpy(o + L::kMOff + 2 * i, &blk.dmin, 2);
        for (int j = 0; j < 16; ++j) o[L::kScOff + 16 * j + i] = blk.scales[j];
      } else {
        int8_t sc[16];
        scales_q3_k(blk.scales, sc);
        for (int j = 0; j < 16; ++j) o[L::kScOff + 16 * j + i] = static_cast<uint8_t>(sc[j]);
        for (int k = 0; k < 8; ++k) std::memcpy(o + L::kHOff + 64 * k + 4 * i, blk.hmask + 4 * k, 4);
      }
    }
  }
}

// IQ4_XS in 16-row groups: per super-block d[16] (f16), the sub-block scales sc[8][16] (int8,
// ls - 32; sub-block s of row i at 16s + i), then the quants in 4-byte chunks, chunk k of row i at
// 64k + 4i (byte 4k + e of a row: value 32(k / 4) + 4(k % 4) + e in its low nibble, that + 16 in its
// high one): 2,208 bytes for 16 super-blocks' 2,176.
struct PackedIQ4XS {
  static constexpr int kDOff = 0, kScOff = 32, kQOff = 160;
  static constexpr int kBytes = kQOff + 64 * 32;
};

void pack_group_iq4xs(const uint8_t* w, size_t row_bytes, int64_t rows, int64_t nb, int64_t g, uint8_t* out) {
  using L = PackedIQ4XS;
  for (int i = 0; i < kGroup; ++i) {
    const BlockIQ4_XS* row = reinterpret_cast<const BlockIQ4_XS*>(w + static_cast<size_t>(std::min(g * kGroup + i, rows - 1)) * row_bytes);
    for (int64_t b = 0; b < nb; ++b) {
      const BlockIQ4_XS& blk = row[b];
      uint8_t* o = out + b * L::kBytes;
      std::memcpy(o + L::kDOff + 2 * i, &blk.d, 2);
      for (int s = 0; s < 8; ++s) o[L::kScOff + 16 * s + i] = static_cast<uint8_t>(static_cast<int8_t>(iq4xs_scale(blk, s)));
      for (int k = 0; k < 32; ++k) std::memcpy(o + L::kQOff + 64 * k + 4 * i, blk.qs + 4 * k, 4);
    }
  }
}

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
      float acc = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        T::unpack(w[b], wq);
        const int8_t* yq = xq + b * kQK;
        int isum = 0;
        for (int j = 0; j < kQK; ++j) isum += wq[j] * yq[j];
        float term = (half_to_float(w[b].d) * xd[b]) * static_cast<float>(isum);
        if (T::kMin) term = term + half_to_float(T::m(w[b])) * xs[b];
        acc = acc + term;
      }
      k.y[t * k.rows + r] = acc;
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
// fn(std::integral_constant<int, n>{}) for a run-time n in 1 .. kMax (the kernels' token counts).
template <int kMax, class Fn>
void with_tokens(int64_t n, Fn&& fn) {
  if constexpr (kMax > 1) {
    if (n >= kMax) return fn(std::integral_constant<int, kMax>{});
    return with_tokens<kMax - 1>(n, fn);
  } else {
    fn(std::integral_constant<int, 1>{});
  }
}

// Tokens [t0, t1) in as few passes of up to kMax as there must be, of equal size (9 tokens with
// kMax 8: 5 + 4, not 8 + 1; a pass of one token costs about a whole one-token product: 2048 x 2048
// Q4_0, one thread, 9 tokens 181 -> 157-163 us, 17 tokens 321 -> 276-292 us): fn(nt, t) with nt a
// std::integral_constant.
template <int kMax, class Fn>
void by_passes(int64_t t0, int64_t t1, Fn&& fn) {
  if (t1 <= t0) return;
  const int64_t passes = (t1 - t0 + kMax - 1) / kMax, per = (t1 - t0 + passes - 1) / passes;
  for (int64_t t = t0; t < t1; t += per) with_tokens<kMax>(std::min(per, t1 - t), [&](auto nt) { fn(nt, t); });
}

// Rows r0 .. r1 - 1 (r0 a multiple of 16) a group at a time, each group's tokens in by_passes:
// kernel(nt, g, nr, t), so the group's weights stay in L1 while every pass reads them.
template <int kMax, class Kernel>
void by_groups(int64_t r0, int64_t r1, int64_t t0, int64_t t1, Kernel&& kernel) {
  for (int64_t r = r0; r < r1; r += kGroup) {
    const int nr = static_cast<int>(std::min<int64_t>(kGroup, r1 - r));
    by_passes<kMax>(t0, t1, [&](auto nt, int64_t t) { kernel(nt, r / kGroup, nr, t); });
  }
}

// by_groups for the AVX2 kernels, which take a group's rows in two halves of 8 (a lane each):
// kernel(nt, g, h, nr, t), each half's blocks kept in L1 while every pass reads them.
template <int kMax, class Kernel>
void by_halves(int64_t r0, int64_t r1, int64_t t0, int64_t t1, Kernel&& kernel) {
  for (int64_t r = r0; r < r1; r += kGroup) {
    const int nr = static_cast<int>(std::min<int64_t>(kGroup, r1 - r));
    for (int h = 0; h < (nr > 8 ? 2 : 1); ++h)
      by_passes<kMax>(t0, t1, [&](auto nt, int64_t t) { kernel(nt, r / kGroup, h, nr, t); });
  }
}

// ---- AVX2 kernels: each output follows the sequence above. ----
#define OSD_AVX2 __attribute__((target("avx2,fma,f16c")))
#define OSD_AVX2_INLINE __attribute__((target("avx2,fma,f16c"), always_inline)) inline

// A later group-block's bytes at p into L1 (a hint: it never faults, also past the end).
OSD_AVX2_INLINE void prefetch_block(const uint8_t* p, int bytes) {
  for (int l = 0; l < bytes; l += 64) _mm_prefetch(reinterpret_cast<const char*>(p) + l, _MM_HINT_T0);
}

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
    const __m256 id = _mm256_set1_ps(inverse_scale(amax));
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

// The AVX2 form of quantize_acts_q8k, with the same values: the largest magnitude and the first
// entry that has it, the same float product iscale * x, rounded to nearest even, capped at 127.
OSD_AVX2 void quantize_acts_q8k_avx2(const float* x, int64_t cols, int8_t* q, float* d, int16_t* bsum) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t b = 0; b < cols / kQKK; ++b) {
    const float* xb = x + b * kQKK;
    __m256 mx = _mm256_setzero_ps();
    __m256 bad = _mm256_setzero_ps();
    for (int j = 0; j < 32; ++j) {
      const __m256 v = _mm256_loadu_ps(xb + 8 * j);
      mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v));
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(v, v), _mm256_setzero_ps(), _CMP_NEQ_UQ));  // NaN or +-inf
    }
    if (_mm256_movemask_ps(bad)) {
      quantize_acts_q8k(xb, kQKK, q + b * kQKK, d + b, bsum + b * 16);
      continue;
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    if (zero_block_k(amax)) {
      std::memset(q + b * kQKK, 0, kQKK);
      std::memset(bsum + b * 16, 0, 16 * sizeof(int16_t));
      d[b] = 0.0f;
      continue;
    }
    int first = 0;
    while (std::fabs(xb[first]) != amax) ++first;
    const float iscale = -127.0f / xb[first];
    const __m256 is = _mm256_set1_ps(iscale);
    const __m256i cap = _mm256_set1_epi32(127);
    for (int g = 0; g < 16; ++g) {
      const __m256i i0 = _mm256_min_epi32(cap, _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(is, _mm256_loadu_ps(xb + 16 * g)),
                                                                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
      const __m256i i1 = _mm256_min_epi32(cap, _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(is, _mm256_loadu_ps(xb + 16 * g + 8)),
                                                                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
      bsum[b * 16 + g] = static_cast<int16_t>(hsum_i32_inline(_mm256_add_epi32(i0, i1)));
      const __m128i p = _mm_packs_epi16(_mm_packs_epi32(_mm256_castsi256_si128(i0), _mm256_extracti128_si256(i0, 1)),
                                        _mm_packs_epi32(_mm256_castsi256_si128(i1), _mm256_extracti128_si256(i1, 1)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * kQKK + 16 * g), p);
    }
    d[b] = 1.0f / iscale;
  }
}

// 0x10 in byte j where bit j of m is set.
OSD_AVX2_INLINE __m256i high_bits32(uint32_t m) {
  const __m256i shuf = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3,
                                        3, 3, 3, 3);
  const __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(m)), shuf);
  const __m256i bit = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ULL));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
  return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

OSD_AVX2_INLINE __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// Keeps v a running sum: an empty asm that GCC must assume changes v. Without it GCC reassociates
// the unrolled sums of several tokens into trees, whose partial sums spill the 16 ymm registers
// (one thread, 2048 x 2048: 4-token Q4_0 passes 194 -> 152 us, 2-token Q4_K 124 -> 92 us).
template <int NT> OSD_AVX2_INLINE void keep_sum(__m256i& v) {
  if constexpr (NT > 1) asm("" : "+x"(v));
}

// Prefetch distance in group-blocks, about a group of SmolLM2's rows (AVX-512, 5-token passes:
// 4.2-4.8 ms with none, 3.7-3.9 at 4, 3.4-3.5 at 16, 3.8 at 32).
constexpr int kAhead = 16;

// Offsets o = 2^kShift that make the signed nibble formats unsigned (-1: unsigned already). Q8_0's
// bytes stay signed on AVX2: w + 128 would overflow vpmaddubsw's pair sums.
template <class P> constexpr int kShift2 = std::is_same<P, P4_0>::value ? 3 : std::is_same<P, P5_0>::value ? 4 : -1;

// Stores a half-group's outputs: acc[n] holds rows 8h .. 8h + 7 for token t + n (nr rows valid in the group).
template <int NT>
OSD_AVX2_INLINE void store_half_avx2(const Args& k, int64_t g, int h, int nr, int64_t t, const __m256* acc) {
  const int valid = std::min(8, nr - 8 * h);
  for (int n = 0; n < NT; ++n) {
    float* y = k.y + (t + n) * k.rows + g * kGroup + 8 * h;
    if (valid == 8) {
      _mm256_storeu_ps(y, acc[n]);
    } else {
      alignas(32) float a[8];
      _mm256_store_ps(a, acc[n]);
      for (int i = 0; i < valid; ++i) y[i] = a[i];
    }
  }
}

// Packed rows 8h .. 8h + 7 of a group (h = 0, 1), a lane per row, for tokens t .. t + NT - 1.
// Nibble formats: u8 x s8 pair sums (vpmaddubsw) add in int16, which holds 16 products of values
// <= 15 (Q4) or 8 of values <= 31 (Q5), then vpmaddwd makes each row's int32. Q8_0: |w| times
// sign(x, w), whose pair sums stay within int16 (|w| <= 128, |x| <= 127). IQ4_NL: its table's
// values (|w| <= 127) the same way, each pair sum widened at once (two would overflow int16).
template <class P, int NT>
OSD_AVX2 void half_avx2(const Args& k, int64_t g, int h, int nr, int64_t t) {
  using L = Packed<P>;
  constexpr int kShift = kShift2<P>;
  const int64_t nb = k.cols / kQK;
  const uint8_t* grp = k.packed + g * nb * L::kBytes;
  const int8_t* xq[NT];
  const float* xd[NT];
  const float* xs[NT];
  const int32_t* xg[NT];
  for (int n = 0; n < NT; ++n) {
    xq[n] = k.a->qrow(t + n), xd[n] = k.a->drow(t + n);
    xs[n] = P::kMin ? k.a->srow(t + n) : nullptr;
    xg[n] = kShift >= 0 ? k.a->grow(t + n) : nullptr;
  }
  __m256 acc[NT];
  for (int n = 0; n < NT; ++n) acc[n] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1), low4 = _mm256_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* q = grp + b * L::kBytes;
    if (h == 0)  // the second half reads the same lines again, from cache
      prefetch_block(q + kAhead * L::kBytes, L::kBytes);
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16 * h)));
    __m256i isum[NT];
    if constexpr (P::kChunks == 8) {
      for (int n = 0; n < NT; ++n) isum[n] = _mm256_setzero_si256();
      for (int c = 0; c < 8; ++c) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + L::kQOff + 64 * c + 32 * h));
        const __m256i aw = _mm256_sign_epi8(w, w);
        for (int n = 0; n < NT; ++n) {
          const __m256i x = _mm256_sign_epi8(bcast4(xq[n] + b * kQK + 4 * c), w);
          isum[n] = _mm256_add_epi32(isum[n], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, x), ones));
          keep_sum<NT>(isum[n]);
        }
      }
    } else {
      __m256i s16[NT];
      for (int n = 0; n < NT; ++n) s16[n] = _mm256_setzero_si256(), isum[n] = _mm256_setzero_si256();
      for (int c = 0; c < 4; ++c) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + L::kQOff + 64 * c + 32 * h));
        __m256i lo = _mm256_and_si256(x, low4), hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), low4);
        if constexpr (kTable<P>) {
          const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kIq4Values)));
          lo = _mm256_shuffle_epi8(table, lo);
          hi = _mm256_shuffle_epi8(table, hi);
          const __m256i alo = _mm256_sign_epi8(lo, lo), ahi = _mm256_sign_epi8(hi, hi);
          for (int n = 0; n < NT; ++n) {
            const __m256i xl = _mm256_sign_epi8(bcast4(xq[n] + b * kQK + 4 * c), lo);
            const __m256i xh = _mm256_sign_epi8(bcast4(xq[n] + b * kQK + 16 + 4 * c), hi);
            isum[n] = _mm256_add_epi32(isum[n], _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(alo, xl), ones),
                                                                 _mm256_madd_epi16(_mm256_maddubs_epi16(ahi, xh), ones)));
            keep_sum<NT>(isum[n]);
          }
          continue;
        }
        if constexpr (P::kHigh) {
          uint64_t ml, mh;
          std::memcpy(&ml, q + L::kHOff + 8 * c, 8);
          std::memcpy(&mh, q + L::kHOff + 32 + 8 * c, 8);
          lo = _mm256_or_si256(lo, high_bits32(static_cast<uint32_t>(ml >> (32 * h))));
          hi = _mm256_or_si256(hi, high_bits32(static_cast<uint32_t>(mh >> (32 * h))));
        }
        for (int n = 0; n < NT; ++n) {
          const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, bcast4(xq[n] + b * kQK + 4 * c)),
                                             _mm256_maddubs_epi16(hi, bcast4(xq[n] + b * kQK + 16 + 4 * c)));
          s16[n] = _mm256_add_epi16(s16[n], p);
          keep_sum<NT>(s16[n]);
          if (!P::kHigh ? c == 3 : (c & 1) == 1) {
            isum[n] = _mm256_add_epi32(isum[n], _mm256_madd_epi16(s16[n], ones));
            s16[n] = _mm256_setzero_si256();
          }
        }
      }
      if constexpr (kShift >= 0)
        for (int n = 0; n < NT; ++n) isum[n] = _mm256_add_epi32(isum[n], _mm256_set1_epi32(xg[n][b] * (1 << kShift)));
    }
    const __m256 mw = P::kMin ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + L::kMOff + 16 * h)))
                              : _mm256_setzero_ps();
    for (int n = 0; n < NT; ++n) {
      __m256 term = _mm256_mul_ps(_mm256_mul_ps(dw, _mm256_set1_ps(xd[n][b])), _mm256_cvtepi32_ps(isum[n]));
      if (P::kMin) term = _mm256_add_ps(term, _mm256_mul_ps(mw, _mm256_set1_ps(xs[n][b])));
      acc[n] = _mm256_add_ps(acc[n], term);
    }
  }
  store_half_avx2<NT>(k, g, h, nr, t, acc);
}

// Rows r0 .. r1 - 1 (r0 a multiple of 16), up to 6 tokens a pass: a 5-token verification is one
// pass (one thread, 2048 x 2048 Q4_0: 241 -> 180 us against 4 + 1); eight tokens spilled registers.
template <class P>
OSD_AVX2 void range32_avx2(const Args& k, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
  by_halves<6>(r0, r1, t0, t1, [&](auto nt, int64_t g, int h, int nr, int64_t t) { half_avx2<P, decltype(nt)::value>(k, g, h, nr, t); });
}

// The K-quant float step of rangek_ref for 8 rows, block b, NT tokens: acc + ((dx * D) * isum -
// (dx * M) * msum), D the rows' fp16 factors at d, M the mins' at m (null: no mins, M and msum 0,
// the zero min term rangek_ref includes).
template <int NT>
OSD_AVX2_INLINE void k_block256(const Args& k, int64_t t, int64_t b, const uint8_t* d, const uint8_t* m,
                                const __m256i* isum, const __m256i* msum, __m256* acc) {
  const __m256 D = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d)));
  const __m256 M = m ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m))) : _mm256_setzero_ps();
  for (int n = 0; n < NT; ++n) {
    const __m256 x = _mm256_set1_ps(k.a->drow(t + n)[b]);
    const __m256i ms = m ? msum[n] : _mm256_setzero_si256();
    acc[n] = _mm256_add_ps(acc[n], _mm256_sub_ps(_mm256_mul_ps(_mm256_mul_ps(x, D), _mm256_cvtepi32_ps(isum[n])),
                                                  _mm256_mul_ps(_mm256_mul_ps(x, M), _mm256_cvtepi32_ps(ms))));
  }
}

// Eight unsigned bytes as int32 lanes.
OSD_AVX2_INLINE __m256i bytes8_avx2(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// Q4_K and Q5_K on the packed layout with AVX2: packed rows 8h .. 8h + 7, a lane each, for up to
// two tokens (the sums of four tokens would not fit the 16 registers). vpmaddubsw pair sums add in
// int16: 16 products of values <= 15 (Q4_K) or 8 of values <= 31 (Q5_K) before vpmaddwd makes the
// sub-block's int32 sums; then the same integers and float operations as the AVX-512 kernel.
// Against the kernel they replaced (a row at a time, unpacked per row), 2048 x 2048 random weights
// in cache, one thread: Q4_K 1 token 195 -> 83 us, 5 tokens 642 -> 330 us; Q5_K 249 -> 137 and 770 -> 473 us.
template <class B, int NT>
OSD_AVX2 void half_k4_avx2(const Args& k, int64_t g, int h, int nr, int64_t t) {
  using L = PackedK4<B>;
  const int64_t nb = k.cols / kQKK;
  const uint8_t* grp = k.packed + g * nb * L::kBytes;
  __m256 acc[NT];
  for (int n = 0; n < NT; ++n) acc[n] = _mm256_setzero_ps();
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* q = grp + b * L::kBytes;
    if (h == 0)
      prefetch_block(q + 2 * L::kBytes, L::kBytes);
    __m256i isum[NT], msum[NT];
    for (int n = 0; n < NT; ++n) isum[n] = msum[n] = _mm256_setzero_si256();
    for (int c = 0; c < 4; ++c) {
      __m256i slo[NT], shi[NT], plo[NT], phi[NT];
      for (int n = 0; n < NT; ++n) slo[n] = shi[n] = plo[n] = phi[n] = _mm256_setzero_si256();
      for (int e = 0; e < 8; ++e) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + L::kQOff + 64 * (8 * c + e) + 32 * h));
        __m256i lo = _mm256_and_si256(x, low4), hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), low4);
        if constexpr (L::kHigh) {
          const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + L::kHOff + 64 * e + 32 * h));
          const __m256i one = _mm256_set1_epi8(1);
          lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * c), one), 4));
          hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * c + 1), one), 4));
        }
        for (int n = 0; n < NT; ++n) {
          const int8_t* xq = k.a->qrow(t + n) + b * kQKK + 64 * c + 4 * e;
          plo[n] = _mm256_add_epi16(plo[n], _mm256_maddubs_epi16(lo, bcast4(xq)));
          phi[n] = _mm256_add_epi16(phi[n], _mm256_maddubs_epi16(hi, bcast4(xq + 32)));
          keep_sum<NT>(plo[n]);
          keep_sum<NT>(phi[n]);
          if (!L::kHigh ? e == 7 : (e & 3) == 3) {
            slo[n] = _mm256_add_epi32(slo[n], _mm256_madd_epi16(plo[n], ones));
            shi[n] = _mm256_add_epi32(shi[n], _mm256_madd_epi16(phi[n], ones));
            plo[n] = phi[n] = _mm256_setzero_si256();
          }
        }
      }
      const __m256i sc0 = bytes8_avx2(q + L::kScOff + 16 * (2 * c) + 8 * h), sc1 = bytes8_avx2(q + L::kScOff + 16 * (2 * c + 1) + 8 * h);
      const __m256i mn0 = bytes8_avx2(q + L::kMnOff + 16 * (2 * c) + 8 * h), mn1 = bytes8_avx2(q + L::kMnOff + 16 * (2 * c + 1) + 8 * h);
      for (int n = 0; n < NT; ++n) {
        const int16_t* bs = k.a->brow(t + n) + b * 16 + 4 * c;
        isum[n] = _mm256_add_epi32(isum[n], _mm256_add_epi32(_mm256_mullo_epi32(slo[n], sc0), _mm256_mullo_epi32(shi[n], sc1)));
        msum[n] = _mm256_add_epi32(msum[n], _mm256_add_epi32(_mm256_mullo_epi32(mn0, _mm256_set1_epi32(bs[0] + bs[1])),
                                                              _mm256_mullo_epi32(mn1, _mm256_set1_epi32(bs[2] + bs[3]))));
      }
    }
    k_block256<NT>(k, t, b, q + L::kDOff + 16 * h, q + L::kMOff + 16 * h, isum, msum, acc);
  }
  store_half_avx2<NT>(k, g, h, nr, t, acc);
}

// Q6_K likewise: w + 32 (<= 63) pair sums add in int16 two chunks at a time (4 products a lane,
// <= 32004). Measured as above: 227 -> 124 us and 712 -> 415 us.
template <int NT>
OSD_AVX2 void half_q6k_avx2(const Args& k, int64_t g, int h8, int nr, int64_t t) {
  using L = PackedQ6K;
  const int64_t nb = k.cols / kQKK;
  const uint8_t* grp = k.packed + g * nb * L::kBytes;
  __m256 acc[NT];
  for (int n = 0; n < NT; ++n) acc[n] = _mm256_setzero_ps();
  const __m256i low4 = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(0x30), ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* q = grp + b * L::kBytes;
    if (h8 == 0)
      prefetch_block(q + 2 * L::kBytes, L::kBytes);
    __m256i isum[NT];
    for (int n = 0; n < NT; ++n) isum[n] = _mm256_setzero_si256();
    for (int h = 0; h < 2; ++h)
      for (int p = 0; p < 2; ++p)
        for (int st = 0; st < 2; ++st) {
          const int glo = 8 * h + 2 * st + p, ghi = glo + 4;
          __m256i slo[NT], shi[NT], plo[NT], phi[NT];
          for (int n = 0; n < NT; ++n) {
            const int16_t* bs = k.a->brow(t + n) + b * 16;
            slo[n] = _mm256_set1_epi32(-32 * bs[glo]);
            shi[n] = _mm256_set1_epi32(-32 * bs[ghi]);
            plo[n] = phi[n] = _mm256_setzero_si256();
          }
          for (int e = 0; e < 4; ++e) {
            const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + L::kLOff + 64 * (16 * h + 8 * st + 4 * p + e) + 32 * h8));
            const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + L::kHOff + 64 * (8 * h + 4 * p + e) + 32 * h8));
            __m256i lo = _mm256_and_si256(x, low4), hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), low4);
            if (st == 0) {
              lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(hb, 4), two));
              hi = _mm256_or_si256(hi, _mm256_and_si256(hb, two));
            } else {
              lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(hb, 2), two));
              hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_srli_epi16(hb, 2), two));
            }
            for (int n = 0; n < NT; ++n) {
              const int8_t* xq = k.a->qrow(t + n) + b * kQKK + 128 * h + 32 * st + 16 * p + 4 * e;
              plo[n] = _mm256_add_epi16(plo[n], _mm256_maddubs_epi16(lo, bcast4(xq)));
              phi[n] = _mm256_add_epi16(phi[n], _mm256_maddubs_epi16(hi, bcast4(xq + 64)));
              if (e & 1) {
                slo[n] = _mm256_add_epi32(slo[n], _mm256_madd_epi16(plo[n], ones));
                shi[n] = _mm256_add_epi32(shi[n], _mm256_madd_epi16(phi[n], ones));
                plo[n] = phi[n] = _mm256_setzero_si256();
              }
            }
          }
          const __m256i sclo = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + L::kScOff + 16 * glo + 8 * h8)));
          const __m256i schi = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + L::kScOff + 16 * ghi + 8 * h8)));
          for (int n = 0; n < NT; ++n)
            isum[n] = _mm256_add_epi32(isum[n], _mm256_add_epi32(_mm256_mullo_epi32(slo[n], sclo), _mm256_mullo_epi32(shi[n], schi)));
        }
    k_block256<NT>(k, t, b, q + L::kDOff + 16 * h8, nullptr, isum, nullptr, acc);
  }
  store_half_avx2<NT>(k, g, h8, nr, t, acc);
}

// Q2_K and Q3_K on the packed layout with AVX2: packed rows 8h .. 8h + 7, a lane each, for NT
// tokens. Values u (Q2_K: 0 .. 3; Q3_K: the two bits plus 4 where hmask's bit is set, 0 .. 7, w = u
// - 4) in u8 x s8 pair sums that add in int16 over a group's 16 values (<= 7112), per-group sums
// starting at -4 times the activations' group sums for Q3_K; times the group scales into isum, and
// Q2_K's mins times the activations' group sums into msum: rangek_ref's integers, then its floats.
template <class B, int NT>
OSD_AVX2 void half_k2_avx2(const Args& k, int64_t g, int h8, int nr, int64_t t) {
  using L = PackedK2<B>;
  const int64_t nb = k.cols / kQKK;
  const uint8_t* grp = k.packed + g * nb * L::kBytes;
  __m256 acc[NT];
  for (int n = 0; n < NT; ++n) acc[n] = _mm256_setzero_ps();
  const __m256i three = _mm256_set1_epi8(3), four = _mm256_set1_epi8(4), ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* q = grp + b * L::kBytes;
    if (h8 == 0)
      prefetch_block(q + 2 * L::kBytes, L::kBytes);
    __m256i isum[NT], msum[NT];
    for (int n = 0; n < NT; ++n) isum[n] = msum[n] = _mm256_setzero_si256();
    // Values 128 hn + 32 j + 16 hl + l (l < 16): chunks 8 hn + 4 hl + m (bytes l = 4m + e), bits 2j;
    // group 8 hn + 2 j + hl.
    for (int hn = 0; hn < 2; ++hn)
      for (int hl = 0; hl < 2; ++hl) {
        __m256i p16[NT][4];
        for (int n = 0; n < NT; ++n)
          for (int j = 0; j < 4; ++j) p16[n][j] = _mm256_setzero_si256();
        for (int m = 0; m < 4; ++m) {
          const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + L::kQOff + 64 * (8 * hn + 4 * hl + m) + 32 * h8));
          __m256i hb = _mm256_setzero_si256();
          if constexpr (!L::kMin) hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + L::kHOff + 64 * (4 * hl + m) + 32 * h8));
          for (int j = 0; j < 4; ++j) {
            __m256i v = _mm256_and_si256(_mm256_srli_epi16(x, 2 * j), three);
            if constexpr (!L::kMin) {
              const __m256i bit = _mm256_set1_epi8(static_cast<char>(1 << (4 * hn + j)));
              v = _mm256_or_si256(v, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hb, bit), bit), four));
            }
            for (int n = 0; n < NT; ++n) {
              p16[n][j] = _mm256_add_epi16(p16[n][j], _mm256_maddubs_epi16(v, bcast4(k.a->qrow(t + n) + b * kQKK + 128 * hn + 32 * j + 16 * hl + 4 * m)));
              keep_sum<NT>(p16[n][j]);
            }
          }
        }
        for (int j = 0; j < 4; ++j) {
          const int gi = 8 * hn + 2 * j + hl;
          const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + L::kScOff + 16 * gi + 8 * h8));
          const __m256i sc = L::kMin ? _mm256_and_si256(_mm256_cvtepu8_epi32(raw), _mm256_set1_epi32(0xF)) : _mm256_cvtepi8_epi32(raw);
          for (int n = 0; n < NT; ++n) {
            const int16_t bsg = k.a->brow(t + n)[b * 16 + gi];
            __m256i sg = _mm256_madd_epi16(p16[n][j], ones);
            if constexpr (!L::kMin) sg = _mm256_add_epi32(sg, _mm256_set1_epi32(-4 * bsg));
            isum[n] = _mm256_add_epi32(isum[n], _mm256_mullo_epi32(sg, sc));
            if constexpr (L::kMin)
              msum[n] = _mm256_add_epi32(msum[n], _mm256_mullo_epi32(_mm256_srli_epi32(_mm256_cvtepu8_epi32(raw), 4), _mm256_set1_epi32(bsg)));
          }
        }
      }
    k_block256<NT>(k, t, b, q + L::kDOff + 16 * h8, L::kMin ? q + L::kMOff + 16 * h8 : nullptr, isum, msum, acc);
  }
  store_half_avx2<NT>(k, g, h8, nr, t, acc);
}

// IQ4_XS on the packed layout with AVX2: packed rows 8h .. 8h + 7, a lane each, for NT tokens. Per
// sub-block the table's values (|w| <= 127) times the activations, |w| times sign(x, w) with each
// pair sum widened at once, then times the sub-block's scale (vpmulld): rangek_ref's integers (the
// scale of both 16-value groups of a sub-block is the same), then its float operations.
template <int NT>
OSD_AVX2 void half_iq4xs_avx2(const Args& k, int64_t g, int h8, int nr, int64_t t) {
  using L = PackedIQ4XS;
  const int64_t nb = k.cols / kQKK;
  const uint8_t* grp = k.packed + g * nb * L::kBytes;
  __m256 acc[NT];
  for (int n = 0; n < NT; ++n) acc[n] = _mm256_setzero_ps();
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kIq4Values)));
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* q = grp + b * L::kBytes;
    if (h8 == 0)
      prefetch_block(q + 2 * L::kBytes, L::kBytes);
    __m256i isum[NT];
    for (int n = 0; n < NT; ++n) isum[n] = _mm256_setzero_si256();
    for (int sb = 0; sb < 8; ++sb) {
      __m256i ss[NT];
      for (int n = 0; n < NT; ++n) ss[n] = _mm256_setzero_si256();
      for (int m = 0; m < 4; ++m) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + L::kQOff + 64 * (4 * sb + m) + 32 * h8));
        const __m256i lo = _mm256_shuffle_epi8(table, _mm256_and_si256(x, low4));
        const __m256i hi = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(x, 4), low4));
        const __m256i alo = _mm256_sign_epi8(lo, lo), ahi = _mm256_sign_epi8(hi, hi);
        for (int n = 0; n < NT; ++n) {
          const int8_t* xq = k.a->qrow(t + n) + b * kQKK + 32 * sb + 4 * m;
          const __m256i pl = _mm256_madd_epi16(_mm256_maddubs_epi16(alo, _mm256_sign_epi8(bcast4(xq), lo)), ones);
          const __m256i ph = _mm256_madd_epi16(_mm256_maddubs_epi16(ahi, _mm256_sign_epi8(bcast4(xq + 16), hi)), ones);
          ss[n] = _mm256_add_epi32(ss[n], _mm256_add_epi32(pl, ph));
        }
      }
      const __m256i sc = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + L::kScOff + 16 * sb + 8 * h8)));
      for (int n = 0; n < NT; ++n) isum[n] = _mm256_add_epi32(isum[n], _mm256_mullo_epi32(ss[n], sc));
    }
    k_block256<NT>(k, t, b, q + L::kDOff + 16 * h8, nullptr, isum, nullptr, acc);
  }
  store_half_avx2<NT>(k, g, h8, nr, t, acc);
}

// Rows r0 .. r1 - 1 (r0 a multiple of 16) of a packed K-quant: halves of 8 rows, two tokens at a time.
template <void (*F1)(const Args&, int64_t, int, int, int64_t), void (*F2)(const Args&, int64_t, int, int, int64_t)>
OSD_AVX2 void range_k_avx2(const Args& k, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
  for (int64_t r = r0; r < r1; r += kGroup) {
    const int nr = static_cast<int>(std::min<int64_t>(kGroup, r1 - r));
    for (int h = 0; h < (nr > 8 ? 2 : 1); ++h)
      for (int64_t t = t0; t < t1; t += 2) {
        if (t + 1 < t1) F2(k, r / kGroup, h, nr, t);
        else F1(k, r / kGroup, h, nr, t);
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
// GCC 12's AVX-512 headers fill unused lanes from a self-initialised "undefined" vector, which its
// own -Wmaybe-uninitialized then flags in every caller (fixed in GCC 13): silenced for the kernels.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// 32-value formats, a packed group of 16 rows at a time, a lane per row: one load gives a 4-byte
// chunk of every row, and a vpdpbusd per chunk adds its four products to each row's block sum, so
// the block's integer sum, its scale products and the running float sum are formed for 16 rows per
// instruction. The group is unpacked once per block for up to eight tokens. The signed formats
// (Q4_0, Q5_0, Q8_0, IQ4_NL) are read offset to unsigned (w + o, o = 8, 16, 128, 128) with o times
// the activations' block sums (Acts::gneg, shifted) as the starting sum: the same exact integers.
// Measured against the kernels this replaced (eight rows in the GGUF layout, four sums of eight
// products per row and block), SmolLM2-135M Q4_1, one evaluate after a 64-token prefix, 2 threads,
// medians of 100, alternating: 1 token 2.79-2.89 -> 2.34-2.58 ms, 5 tokens 4.65-4.79 -> 3.15-3.97
// ms, 17 tokens 14.0-14.3 -> 8.6-10.1 ms; prefill of 512 tokens 1268-1281 -> 1787-1831 tokens/s.
// With AVX-512 turned off (the AVX2 kernels): 1 token 3.4-4.0 -> 2.9-3.0 ms, 5 tokens 8.9-9.6 ->
// 6.8-7.0 ms, 17 tokens 29.1-29.6 -> 21.3-21.5 ms.
template <class P> constexpr int kShift512 = std::is_same<P, P4_0>::value ? 3
                                             : std::is_same<P, P5_0>::value ? 4
                                             : std::is_same<P, P8_0>::value || kTable<P> ? 7
                                                                                         : -1;
// IQ4_NL's table plus 128 (unsigned for vpdpbusd; the activations' sums take 128 times them off).
alignas(16) constexpr uint8_t kIq4Unsigned[16] = {1, 24, 45, 63, 79, 93, 106, 118, 129, 141, 153, 166, 181, 197, 217, 241};
constexpr bool iq4_unsigned_ok() {
  for (int i = 0; i < 16; ++i)
    if (kIq4Unsigned[i] != kIq4Values[i] + 128) return false;
  return true;
}
static_assert(iq4_unsigned_ok(), "kIq4Unsigned is kIq4Values + 128");

OSD_AVX512_INLINE __m512i bcast4_512(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// k_block256 for 16 rows.
template <int NT>
OSD_AVX512_INLINE void k_block512(const Args& k, int64_t t, int64_t b, const uint8_t* d, const uint8_t* m,
                                  const __m512i* isum, const __m512i* msum, __m512* acc) {
  const __m512 D = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d)));
  const __m512 M = m ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(m))) : _mm512_setzero_ps();
  for (int n = 0; n < NT; ++n) {
    const __m512 x = _mm512_set1_ps(k.a->drow(t + n)[b]);
    const __m512i ms = m ? msum[n] : _mm512_setzero_si512();
    acc[n] = _mm512_add_ps(acc[n], _mm512_sub_ps(_mm512_mul_ps(_mm512_mul_ps(x, D), _mm512_cvtepi32_ps(isum[n])),
                                                  _mm512_mul_ps(_mm512_mul_ps(x, M), _mm512_cvtepi32_ps(ms))));
  }
}

// A group's outputs for NT tokens: its nr valid rows of acc[n] into y's row of token t + n.
template <int NT>
OSD_AVX512_INLINE void store_group512(const Args& k, int64_t g, int nr, int64_t t, const __m512* acc) {
  const __mmask16 keep = static_cast<__mmask16>((1u << nr) - 1);
  for (int n = 0; n < NT; ++n) _mm512_mask_storeu_ps(k.y + (t + n) * k.rows + g * kGroup, keep, acc[n]);
}

template <class P, int NT>
OSD_AVX512 void group_avx512(const Args& k, int64_t g, int nr, int64_t t) {
  using L = Packed<P>;
  constexpr int kShift = kShift512<P>;
  const int64_t nb = k.cols / kQK;
  const uint8_t* grp = k.packed + g * nb * L::kBytes;
  const int8_t* xq[NT];
  const float* xd[NT];
  const float* xs[NT];
  const int32_t* xg[NT];
  for (int n = 0; n < NT; ++n) {
    xq[n] = k.a->qrow(t + n), xd[n] = k.a->drow(t + n);
    xs[n] = P::kMin ? k.a->srow(t + n) : nullptr;
    xg[n] = kShift >= 0 ? k.a->grow(t + n) : nullptr;
  }
  __m512 acc[NT];
  for (int n = 0; n < NT; ++n) acc[n] = _mm512_setzero_ps();
  const __m512i low4 = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8(static_cast<char>(0x80)),
                fifth = _mm512_set1_epi8(0x10);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* q = grp + b * L::kBytes;
    prefetch_block(q + kAhead * L::kBytes, L::kBytes);
    const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
    // Chunk c's values: v[c] (Q8_0), or lo[c] = values 4c .. 4c + 3 and hi[c] = 16 + 4c .. 16 + 4c + 3.
    __m512i v[8];
    if constexpr (P::kChunks == 8) {
      for (int c = 0; c < 8; ++c)
        v[c] = _mm512_xor_si512(_mm512_loadu_si512(q + L::kQOff + 64 * c), flip);
    } else {
      for (int c = 0; c < 4; ++c) {
        const __m512i x = _mm512_loadu_si512(q + L::kQOff + 64 * c);
        v[2 * c] = _mm512_and_si512(x, low4);
        v[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(x, 4), low4);
        if constexpr (kTable<P>) {
          const __m512i table = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(kIq4Unsigned)));
          v[2 * c] = _mm512_shuffle_epi8(table, v[2 * c]);
          v[2 * c + 1] = _mm512_shuffle_epi8(table, v[2 * c + 1]);
        }
        if constexpr (P::kHigh) {
          uint64_t ml, mh;
          std::memcpy(&ml, q + L::kHOff + 8 * c, 8);
          std::memcpy(&mh, q + L::kHOff + 32 + 8 * c, 8);
          v[2 * c] = _mm512_or_si512(v[2 * c], _mm512_maskz_mov_epi8(_cvtu64_mask64(ml), fifth));
          v[2 * c + 1] = _mm512_or_si512(v[2 * c + 1], _mm512_maskz_mov_epi8(_cvtu64_mask64(mh), fifth));
        }
      }
    }
    const __m512 mw = P::kMin ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + L::kMOff)))
                              : _mm512_setzero_ps();
    for (int n = 0; n < NT; ++n) {
      const int8_t* x = xq[n] + b * kQK;
      // Two chains (even and odd chunks) halve the wait on vpdpbusd's latency; integers, so exact.
      __m512i s0 = kShift >= 0 ? _mm512_set1_epi32(xg[n][b] * (1 << (kShift >= 0 ? kShift : 0))) : _mm512_setzero_si512();
      __m512i s1 = _mm512_setzero_si512();
      for (int c = 0; c < 4; ++c) {
        if constexpr (P::kChunks == 8) {
          s0 = _mm512_dpbusd_epi32(s0, v[2 * c], bcast4_512(x + 8 * c));
          s1 = _mm512_dpbusd_epi32(s1, v[2 * c + 1], bcast4_512(x + 8 * c + 4));
        } else {
          s0 = _mm512_dpbusd_epi32(s0, v[2 * c], bcast4_512(x + 4 * c));
          s1 = _mm512_dpbusd_epi32(s1, v[2 * c + 1], bcast4_512(x + 16 + 4 * c));
        }
      }
      __m512 term = _mm512_mul_ps(_mm512_mul_ps(dw, _mm512_set1_ps(xd[n][b])), _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)));
      if (P::kMin) term = _mm512_add_ps(term, _mm512_mul_ps(mw, _mm512_set1_ps(xs[n][b])));
      acc[n] = _mm512_add_ps(acc[n], term);
    }
  }
  store_group512<NT>(k, g, nr, t, acc);
}

template <class P>
OSD_AVX512 void range32_avx512(const Args& k, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
  by_groups<8>(r0, r1, t0, t1, [&](auto nt, int64_t g, int nr, int64_t t) { group_avx512<P, decltype(nt)::value>(k, g, nr, t); });
}

// Q4_K and Q5_K on the packed layout, 16 rows a lane each, for tokens t .. t + NT - 1: per chunk of
// 16 rows' four bytes (with Q5_K's fifth bits added), one vpdpbusd adds four low-nibble products
// to the sum of one sub-block and one the four high-nibble products to the next's; each finished pair of sub-block sums times its scales
// (vpmulld) goes into isum, and the mins times the activations' sums into msum: the integers of
// rangek_ref, then its float operations, in order. Q5_K: 262 -> 59 us and 730 -> 192 us as below.
// Up to eight tokens per pass (a 5-token pass split 4 + 1 cost almost two passes): 2048 x 2048 Q4_K
// in cache, one thread, 5 tokens 120 -> 103 us, 6 tokens 132 -> 116 us, 16 tokens 314 -> 300 us.
// Against the kernel it replaced (a row at a time, its super-blocks unpacked per row), 2048 x 2048
// random Q4_K weights in cache, one thread: 1 token 215 -> 45 us, 5 tokens 600 -> 125 us.
template <class B, int NT>
OSD_AVX512 void group_k4_avx512(const Args& k, int64_t g, int nr, int64_t t) {
  using L = PackedK4<B>;
  const int64_t nb = k.cols / kQKK;
  const uint8_t* grp = k.packed + g * nb * L::kBytes;
  __m512 acc[NT];
  for (int n = 0; n < NT; ++n) acc[n] = _mm512_setzero_ps();
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* q = grp + b * L::kBytes;
    prefetch_block(q + 2 * L::kBytes, L::kBytes);
    __m512i isum[NT], msum[NT];
    for (int n = 0; n < NT; ++n) isum[n] = msum[n] = _mm512_setzero_si512();
    for (int c = 0; c < 4; ++c) {  // sub-blocks 2c (low nibbles) and 2c + 1 (high nibbles)
      __m512i slo[NT], shi[NT];
      for (int n = 0; n < NT; ++n) slo[n] = shi[n] = _mm512_setzero_si512();
#pragma GCC unroll 8
      for (int e = 0; e < 8; ++e) {
        const __m512i x = _mm512_loadu_si512(q + L::kQOff + 64 * (8 * c + e));
        __m512i lo = _mm512_and_si512(x, low4), hi = _mm512_and_si512(_mm512_srli_epi16(x, 4), low4);
        if constexpr (L::kHigh) {  // Q5_K: bit 2c of qh[l] is the fifth bit of value 64c + l, bit 2c + 1 of value 64c + 32 + l
          const __m512i hb = _mm512_loadu_si512(q + L::kHOff + 64 * e), one = _mm512_set1_epi8(1);
          lo = _mm512_or_si512(lo, _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(hb, 2 * c), one), 4));
          hi = _mm512_or_si512(hi, _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(hb, 2 * c + 1), one), 4));
        }
        for (int n = 0; n < NT; ++n) {
          const int8_t* xq = k.a->qrow(t + n) + b * kQKK + 64 * c + 4 * e;
          slo[n] = _mm512_dpbusd_epi32(slo[n], lo, bcast4_512(xq));
          shi[n] = _mm512_dpbusd_epi32(shi[n], hi, bcast4_512(xq + 32));
        }
      }
      const __m512i sc0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + L::kScOff + 16 * (2 * c))));
      const __m512i sc1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + L::kScOff + 16 * (2 * c + 1))));
      for (int n = 0; n < NT; ++n)
        isum[n] = _mm512_add_epi32(isum[n], _mm512_add_epi32(_mm512_mullo_epi32(slo[n], sc0), _mm512_mullo_epi32(shi[n], sc1)));
      if constexpr (NT <= 4) {  // the mins times the activations' sums, between the quants' work
        const __m512i mn0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + L::kMnOff + 16 * (2 * c))));
        const __m512i mn1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + L::kMnOff + 16 * (2 * c + 1))));
        for (int n = 0; n < NT; ++n) {
          const int16_t* bs = k.a->brow(t + n) + b * 16 + 4 * c;  // 16-value sums: sub-block j is groups 2j, 2j + 1
          msum[n] = _mm512_add_epi32(msum[n], _mm512_add_epi32(_mm512_mullo_epi32(mn0, _mm512_set1_epi32(bs[0] + bs[1])),
                                                                _mm512_mullo_epi32(mn1, _mm512_set1_epi32(bs[2] + bs[3]))));
        }
      }
    }
    if constexpr (NT > 4) {  // after the quants, so that fewer registers stay live through them
      __m512i mn[8];
      for (int j = 0; j < 8; ++j) mn[j] = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + L::kMnOff + 16 * j)));
      for (int n = 0; n < NT; ++n) {
        const int16_t* bs = k.a->brow(t + n) + b * 16;
        for (int c = 0; c < 4; ++c)
          msum[n] = _mm512_add_epi32(msum[n], _mm512_add_epi32(_mm512_mullo_epi32(mn[2 * c], _mm512_set1_epi32(bs[4 * c] + bs[4 * c + 1])),
                                                                _mm512_mullo_epi32(mn[2 * c + 1], _mm512_set1_epi32(bs[4 * c + 2] + bs[4 * c + 3]))));
      }
    }
    k_block512<NT>(k, t, b, q + L::kDOff, q + L::kMOff, isum, msum, acc);
  }
  store_group512<NT>(k, g, nr, t, acc);
}

// Q6_K on the packed layout, 16 rows a lane each: the values w + 32 (0 .. 63, from ql's nibble and
// qh's two bits) by vpdpbusd into per-group sums that start at -32 times the activations' 16-value
// sums, so each is exactly sum of w * x over its group; times the group scales into isum. The float
// operations are rangek_ref's, its zero min term included. Against the row-at-a-time kernel,
// 2048 x 2048 random Q6_K weights in cache, one thread: 1 token 249 -> 70 us, 5 tokens 661 -> 177 us.
// Then up to eight tokens per pass instead of four: 5 tokens 166 -> 128 us, 16 tokens 408-429 ->
// 341-355 us (IQ4_XS likewise: 112 -> 92-94 and 315-322 -> 267).
template <int NT>
OSD_AVX512 void group_q6k_avx512(const Args& k, int64_t g, int nr, int64_t t) {
  using L = PackedQ6K;
  const int64_t nb = k.cols / kQKK;
  const uint8_t* grp = k.packed + g * nb * L::kBytes;
  __m512 acc[NT];
  for (int n = 0; n < NT; ++n) acc[n] = _mm512_setzero_ps();
  const __m512i low4 = _mm512_set1_epi8(0x0F), two = _mm512_set1_epi8(0x30);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* q = grp + b * L::kBytes;
    prefetch_block(q + 2 * L::kBytes, L::kBytes);
    __m512i isum[NT];
    for (int n = 0; n < NT; ++n) isum[n] = _mm512_setzero_si512();
    // Half h (128 values), quarter p (16 of its first 32 ql bytes), set s: ql bytes 16p + 4e (s = 0:
    // values 128h + 16p + 4e, + 64 in the high nibbles, fifth and sixth bits from qh bits 0-1 and
    // 4-5) or 32 + 16p + 4e (s = 1: values + 32, + 96; qh bits 2-3 and 6-7).
    for (int h = 0; h < 2; ++h)
      for (int p = 0; p < 2; ++p)
        for (int st = 0; st < 2; ++st) {
          const int glo = 8 * h + 2 * st + p, ghi = glo + 4;  // the 16-value groups of the low and high nibbles
          __m512i slo[NT], shi[NT];
          for (int n = 0; n < NT; ++n) {
            const int16_t* bs = k.a->brow(t + n) + b * 16;
            slo[n] = _mm512_set1_epi32(-32 * bs[glo]);
            shi[n] = _mm512_set1_epi32(-32 * bs[ghi]);
          }
#pragma GCC unroll 4
          for (int e = 0; e < 4; ++e) {
            const __m512i x = _mm512_loadu_si512(q + L::kLOff + 64 * (16 * h + 8 * st + 4 * p + e));
            const __m512i hb = _mm512_loadu_si512(q + L::kHOff + 64 * (8 * h + 4 * p + e));
            __m512i lo = _mm512_and_si512(x, low4), hi = _mm512_and_si512(_mm512_srli_epi16(x, 4), low4);
            if (st == 0) {
              lo = _mm512_or_si512(lo, _mm512_and_si512(_mm512_slli_epi16(hb, 4), two));
              hi = _mm512_or_si512(hi, _mm512_and_si512(hb, two));
            } else {
              lo = _mm512_or_si512(lo, _mm512_and_si512(_mm512_slli_epi16(hb, 2), two));
              hi = _mm512_or_si512(hi, _mm512_and_si512(_mm512_srli_epi16(hb, 2), two));
            }
            for (int n = 0; n < NT; ++n) {
              const int8_t* xq = k.a->qrow(t + n) + b * kQKK + 128 * h + 32 * st + 16 * p + 4 * e;
              slo[n] = _mm512_dpbusd_epi32(slo[n], lo, bcast4_512(xq));
              shi[n] = _mm512_dpbusd_epi32(shi[n], hi, bcast4_512(xq + 64));
            }
          }
          const __m512i sclo = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + L::kScOff + 16 * glo)));
          const __m512i schi = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + L::kScOff + 16 * ghi)));
          for (int n = 0; n < NT; ++n)
            isum[n] = _mm512_add_epi32(isum[n], _mm512_add_epi32(_mm512_mullo_epi32(slo[n], sclo), _mm512_mullo_epi32(shi[n], schi)));
        }
    k_block512<NT>(k, t, b, q + L::kDOff, nullptr, isum, nullptr, acc);
  }
  store_group512<NT>(k, g, nr, t, acc);
}

OSD_AVX512 void range_q6k_avx512(const Args& k, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
  by_groups<8>(r0, r1, t0, t1, [&](auto nt, int64_t g, int nr, int64_t t) { group_q6k_avx512<decltype(nt)::value>(k, g, nr, t); });
}

template <class B>
OSD_AVX512 void range_k4_avx512(const Args& k, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
  by_groups<8>(r0, r1, t0, t1, [&](auto nt, int64_t g, int nr, int64_t t) { group_k4_avx512<B, decltype(nt)::value>(k, g, nr, t); });
}

// Q2_K and Q3_K on the packed layout, 16 rows a lane each (as half_k2_avx2, with vpdpbusd). On a
// random 1024-wide llama (bench_kquant_model), against the row-at-a-time kernel they replaced: Q2_K
// 6.7 -> 1.5 ms per token, Q3_K (with Q6_K embeddings) 8.3-9.1 -> 2.1-2.4 ms; prefill 3x faster.
// Up to four tokens per pass rather than two (2048 x 2048 in cache, one thread): 4 tokens Q2_K
// 108-122 -> 96 us, Q3_K 127-136 -> 98-104 us; 8 tokens 217-233 -> 186-190 and 252-266 -> 194-200.
template <class B, int NT>
OSD_AVX512 void group_k2_avx512(const Args& k, int64_t g, int nr, int64_t t) {
  using L = PackedK2<B>;
  const int64_t nb = k.cols / kQKK;
  const uint8_t* grp = k.packed + g * nb * L::kBytes;
  __m512 acc[NT];
  for (int n = 0; n < NT; ++n) acc[n] = _mm512_setzero_ps();
  const __m512i three = _mm512_set1_epi8(3), four = _mm512_set1_epi8(4);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* q = grp + b * L::kBytes;
    prefetch_block(q + 2 * L::kBytes, L::kBytes);
    __m512i isum[NT], msum[NT];
    for (int n = 0; n < NT; ++n) isum[n] = msum[n] = _mm512_setzero_si512();
    for (int hn = 0; hn < 2; ++hn)
      for (int hl = 0; hl < 2; ++hl) {
        __m512i sg[NT][4];
        for (int n = 0; n < NT; ++n)
          for (int j = 0; j < 4; ++j)
            sg[n][j] = L::kMin ? _mm512_setzero_si512() : _mm512_set1_epi32(-4 * k.a->brow(t + n)[b * 16 + 8 * hn + 2 * j + hl]);
#pragma GCC unroll 4
        for (int m = 0; m < 4; ++m) {
          const __m512i x = _mm512_loadu_si512(q + L::kQOff + 64 * (8 * hn + 4 * hl + m));
          __m512i hb = _mm512_setzero_si512();
          if constexpr (!L::kMin) hb = _mm512_loadu_si512(q + L::kHOff + 64 * (4 * hl + m));
          for (int j = 0; j < 4; ++j) {
            __m512i v = _mm512_and_si512(_mm512_srli_epi16(x, 2 * j), three);
            if constexpr (!L::kMin)
              v = _mm512_or_si512(v, _mm512_maskz_mov_epi8(_mm512_test_epi8_mask(hb, _mm512_set1_epi8(static_cast<char>(1 << (4 * hn + j)))), four));
            for (int n = 0; n < NT; ++n)
              sg[n][j] = _mm512_dpbusd_epi32(sg[n][j], v, bcast4_512(k.a->qrow(t + n) + b * kQKK + 128 * hn + 32 * j + 16 * hl + 4 * m));
          }
        }
        for (int j = 0; j < 4; ++j) {
          const int gi = 8 * hn + 2 * j + hl;
          const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + L::kScOff + 16 * gi));
          const __m512i sc = L::kMin ? _mm512_and_si512(_mm512_cvtepu8_epi32(raw), _mm512_set1_epi32(0xF)) : _mm512_cvtepi8_epi32(raw);
          for (int n = 0; n < NT; ++n) {
            isum[n] = _mm512_add_epi32(isum[n], _mm512_mullo_epi32(sg[n][j], sc));
            if constexpr (L::kMin)
              msum[n] = _mm512_add_epi32(msum[n], _mm512_mullo_epi32(_mm512_srli_epi32(_mm512_cvtepu8_epi32(raw), 4),
                                                                     _mm512_set1_epi32(k.a->brow(t + n)[b * 16 + gi])));
          }
        }
      }
    k_block512<NT>(k, t, b, q + L::kDOff, L::kMin ? q + L::kMOff : nullptr, isum, msum, acc);
  }
  store_group512<NT>(k, g, nr, t, acc);
}

template <class B>
OSD_AVX512 void range_k2_avx512(const Args& k, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
  by_groups<4>(r0, r1, t0, t1, [&](auto nt, int64_t g, int nr, int64_t t) { group_k2_avx512<B, decltype(nt)::value>(k, g, nr, t); });
}

// IQ4_XS on the packed layout, 16 rows a lane each, for tokens t .. t + NT - 1: per sub-block the
// table's values plus 128 (vpdpbusd), 128 times the activations' sums taken off, then times the
// sub-block's scale (vpmulld): rangek_ref's integers, then its float operations.
template <int NT>
OSD_AVX512 void group_iq4xs_avx512(const Args& k, int64_t g, int nr, int64_t t) {
  using L = PackedIQ4XS;
  const int64_t nb = k.cols / kQKK;
  const uint8_t* grp = k.packed + g * nb * L::kBytes;
  __m512 acc[NT];
  for (int n = 0; n < NT; ++n) acc[n] = _mm512_setzero_ps();
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i table = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(kIq4Unsigned)));
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* q = grp + b * L::kBytes;
    prefetch_block(q + 2 * L::kBytes, L::kBytes);
    __m512i isum[NT];
    for (int n = 0; n < NT; ++n) isum[n] = _mm512_setzero_si512();
    for (int sb = 0; sb < 8; ++sb) {
      __m512i ss[NT];
      for (int n = 0; n < NT; ++n) {
        const int16_t* bs = k.a->brow(t + n) + b * 16;
        ss[n] = _mm512_set1_epi32(-128 * (bs[2 * sb] + bs[2 * sb + 1]));
      }
#pragma GCC unroll 4
      for (int m = 0; m < 4; ++m) {
        const __m512i x = _mm512_loadu_si512(q + L::kQOff + 64 * (4 * sb + m));
        const __m512i lo = _mm512_shuffle_epi8(table, _mm512_and_si512(x, low4));
        const __m512i hi = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(x, 4), low4));
        for (int n = 0; n < NT; ++n) {
          const int8_t* xq = k.a->qrow(t + n) + b * kQKK + 32 * sb + 4 * m;
          ss[n] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(ss[n], lo, bcast4_512(xq)), hi, bcast4_512(xq + 16));
        }
      }
      const __m512i sc = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + L::kScOff + 16 * sb)));
      for (int n = 0; n < NT; ++n) isum[n] = _mm512_add_epi32(isum[n], _mm512_mullo_epi32(ss[n], sc));
    }
    k_block512<NT>(k, t, b, q + L::kDOff, nullptr, isum, nullptr, acc);
  }
  store_group512<NT>(k, g, nr, t, acc);
}

OSD_AVX512 void range_iq4xs_avx512(const Args& k, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
  by_groups<8>(r0, r1, t0, t1, [&](auto nt, int64_t g, int nr, int64_t t) { group_iq4xs_avx512<decltype(nt)::value>(k, g, nr, t); });
}

#pragma GCC diagnostic pop

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
      case TensorType::Q4_0: return range32_avx512<P4_0>;
      case TensorType::Q4_1: return range32_avx512<P4_1>;
      case TensorType::Q5_0: return range32_avx512<P5_0>;
      case TensorType::Q5_1: return range32_avx512<P5_1>;
      case TensorType::Q8_0: return range32_avx512<P8_0>;
      case TensorType::IQ4_NL: return range32_avx512<PIQ4_NL>;
      case TensorType::Q3_K: return range_k2_avx512<BlockQ3_K>;
      case TensorType::Q2_K: return range_k2_avx512<BlockQ2_K>;
      case TensorType::IQ4_XS: return range_iq4xs_avx512;
      case TensorType::Q4_K: return range_k4_avx512<BlockQ4_K>;
      case TensorType::Q5_K: return range_k4_avx512<BlockQ5_K>;
      case TensorType::Q6_K: return range_q6k_avx512;
      default: break;
    }
  }
  if (isa == Isa::Avx2) {
    switch (t) {
      case TensorType::Q4_0: return range32_avx2<P4_0>;
      case TensorType::Q4_1: return range32_avx2<P4_1>;
      case TensorType::Q5_0: return range32_avx2<P5_0>;
      case TensorType::Q5_1: return range32_avx2<P5_1>;
      case TensorType::Q8_0: return range32_avx2<P8_0>;
      case TensorType::IQ4_NL: return range32_avx2<PIQ4_NL>;
      case TensorType::Q3_K: return range_k_avx2<half_k2_avx2<BlockQ3_K, 1>, half_k2_avx2<BlockQ3_K, 2>>;
      case TensorType::Q2_K: return range_k_avx2<half_k2_avx2<BlockQ2_K, 1>, half_k2_avx2<BlockQ2_K, 2>>;
      case TensorType::IQ4_XS: return range_k_avx2<half_iq4xs_avx2<1>, half_iq4xs_avx2<2>>;
      case TensorType::Q4_K: return range_k_avx2<half_k4_avx2<BlockQ4_K, 1>, half_k4_avx2<BlockQ4_K, 2>>;
      case TensorType::Q5_K: return range_k_avx2<half_k4_avx2<BlockQ5_K, 1>, half_k4_avx2<BlockQ5_K, 2>>;
      case TensorType::Q6_K: return range_k_avx2<half_q6k_avx2<1>, half_q6k_avx2<2>>;
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
    case TensorType::Q2_K: return rangek_ref<BlockQ2_K>;
    case TensorType::IQ4_XS: return rangek_ref<BlockIQ4_XS>;
    case TensorType::IQ4_NL: return range32_ref<IQ4_NLT>;
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
      case TensorType::Q4_0: return kShift512<P4_0> >= 0;
      case TensorType::Q5_0: return kShift512<P5_0> >= 0;
      case TensorType::Q8_0: return kShift512<P8_0> >= 0;
      case TensorType::IQ4_NL: return kShift512<PIQ4_NL> >= 0;
      default: return false;
    }
  if (isa == Isa::Avx2) switch (t) {
      case TensorType::Q4_0: return kShift2<P4_0> >= 0;
      case TensorType::Q5_0: return kShift2<P5_0> >= 0;
      case TensorType::Q8_0: return kShift2<P8_0> >= 0;
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

bool has_packed_layout(TensorType t) { return has_int8_kernel(t); }

bool kernel_reads_packed(TensorType t, Isa isa) {
  return has_packed_layout(t) && isa != Isa::Portable;
}

namespace {

// A format's packer: values per block, bytes per group-block (16 rows' block), and the function
// that packs group g (16 rows, nb blocks each).
struct PackInfo {
  int64_t block_values;
  size_t group_bytes;
  void (*group)(const uint8_t* w, size_t row_bytes, int64_t rows, int64_t nb, int64_t g, uint8_t* out);
};

PackInfo pack_info(TensorType t) {
  switch (t) {
    case TensorType::Q4_0: return {kQK, Packed<P4_0>::kBytes, pack_group<P4_0>};
    case TensorType::Q4_1: return {kQK, Packed<P4_1>::kBytes, pack_group<P4_1>};
    case TensorType::Q5_0: return {kQK, Packed<P5_0>::kBytes, pack_group<P5_0>};
    case TensorType::Q5_1: return {kQK, Packed<P5_1>::kBytes, pack_group<P5_1>};
    case TensorType::Q8_0: return {kQK, Packed<P8_0>::kBytes, pack_group<P8_0>};
    case TensorType::IQ4_NL: return {kQK, Packed<PIQ4_NL>::kBytes, pack_group<PIQ4_NL>};
    case TensorType::Q2_K: return {kQKK, PackedK2<BlockQ2_K>::kBytes, pack_group_k2<BlockQ2_K>};
    case TensorType::Q3_K: return {kQKK, PackedK2<BlockQ3_K>::kBytes, pack_group_k2<BlockQ3_K>};
    case TensorType::Q4_K: return {kQKK, PackedK4<BlockQ4_K>::kBytes, pack_group_k4<BlockQ4_K>};
    case TensorType::Q5_K: return {kQKK, PackedK4<BlockQ5_K>::kBytes, pack_group_k4<BlockQ5_K>};
    case TensorType::Q6_K: return {kQKK, PackedQ6K::kBytes, pack_group_q6k};
    case TensorType::IQ4_XS: return {kQKK, PackedIQ4XS::kBytes, pack_group_iq4xs};
    default: throw_range(std::string("no packed layout for type ") + gguf::type_info(t).name);
  }
}

}  // namespace

size_t packed_bytes(TensorType t, int64_t rows, int64_t cols) {
  const PackInfo info = pack_info(t);
  if (rows <= 0) throw_range("packed_bytes: rows must be > 0");
  bytes_for(t, cols);  // checks cols
  return static_cast<size_t>(cols / info.block_values) * info.group_bytes * static_cast<size_t>(groups_of(rows));
}

void pack_rows(TensorType t, const uint8_t* w, size_t row_bytes, int64_t rows, int64_t cols, uint8_t* dst) {
  packed_bytes(t, rows, cols);
  if (row_bytes != bytes_for(t, cols)) throw_range("pack_rows: row_bytes does not match the row length");
  const PackInfo info = pack_info(t);
  const int64_t nb = cols / info.block_values;
  const size_t per_group = static_cast<size_t>(nb) * info.group_bytes;
  default_pool().parallel_for(static_cast<size_t>(groups_of(rows)), 16, [&](size_t lo, size_t hi) {
    for (size_t g = lo; g < hi; ++g) info.group(w, row_bytes, rows, nb, static_cast<int64_t>(g), dst + g * per_group);
  });
}

void matmul_many(const MatmulTarget* targets, int count, int64_t cols, const float* x, int64_t n, Isa isa) {
  if (!isa_available(isa)) throw_range(std::string("instruction set ") + isa_name(isa) + " is not available on this CPU");
  if (count <= 0 || n <= 0) return;
  std::vector<RangeFn> fns(static_cast<size_t>(count));
  std::vector<const uint8_t*> packed(static_cast<size_t>(count));
  std::vector<std::vector<uint8_t>> packed_here;  // for callers that did not pack (tests, one-off products)
  std::vector<int64_t> first_block(static_cast<size_t>(count) + 1, 0);
  bool offsets = false;
  // Rows are split among threads in blocks of 16, a packed group (over all targets together); tokens
  // are taken 64 at a time so that a block's weights and a chunk of activations stay in cache together.
  constexpr int64_t kRowBlock = kGroup, kTokenChunk = 64;
  for (int i = 0; i < count; ++i) {
    const MatmulTarget& m = targets[i];
    fns[i] = pick(m.type, isa);
    offsets |= reads_offsets(m.type, isa);
    if (is_k_type(m.type) != is_k_type(targets[0].type))
      throw_range("matmul_many: K-quant and 32-value block types cannot share one activation quantisation");
    if (m.row_bytes != bytes_for(m.type, cols)) throw_range("matmul: row_bytes does not match the row length");
    first_block[i + 1] = first_block[i] + (m.rows + kRowBlock - 1) / kRowBlock;
    packed[i] = m.packed;
    if (!packed[i] && kernel_reads_packed(m.type, isa)) {
      packed_here.emplace_back(packed_bytes(m.type, m.rows, cols));
      pack_rows(m.type, m.w, m.row_bytes, m.rows, cols, packed_here.back().data());
      packed[i] = packed_here.back().data();
    }
  }
  thread_local Acts tl_acts;  // reused between calls; workers read the caller's through `acts`
  Acts* const acts = &tl_acts;
  quantize_acts(targets[0].type, x, n, cols, *acts, isa, offsets);
  const int64_t nblocks = first_block[count];
  // One run of consecutive groups per thread: each streams its own part of the weights. Against
  // the pool's default of four chunks per thread, claimed in turn (SmolLM2 after 64 tokens,
  // alternating, 2 threads): 5-token passes 3.1-3.6 -> 3.0-3.35 ms, 2-token 2.5-3.0 -> 2.3-2.6 ms.
  const size_t grain = std::max(grain_for(static_cast<double>(kRowBlock) * cols * n),
                                default_pool().grain_per_thread(static_cast<size_t>(nblocks)));
  default_pool().parallel_for(static_cast<size_t>(nblocks), grain, [&](size_t lo, size_t hi) {
    for (int64_t t0 = 0; t0 < n; t0 += kTokenChunk) {
      const int64_t t1 = std::min(n, t0 + kTokenChunk);
      int i = 0;
      for (int64_t blk = static_cast<int64_t>(lo); blk < static_cast<int64_t>(hi); ++blk) {
        while (blk >= first_block[i + 1]) ++i;
        const MatmulTarget& m = targets[i];
        const Args args{m.w, m.row_bytes, m.rows, cols, acts, m.y, packed[i]};
        const int64_t r0 = (blk - first_block[i]) * kRowBlock;
        fns[i](args, r0, std::min(m.rows, r0 + kRowBlock), t0, t1);
      }
    }
  });
}

void matmul(TensorType t, const uint8_t* w, size_t row_bytes, int64_t rows, int64_t cols, const float* x, int64_t n,
            float* y, Isa isa, const uint8_t* packed) {
  const MatmulTarget target{t, w, row_bytes, rows, y, packed};
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
