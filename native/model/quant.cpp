// Dequantisation and quantisation of the GGML block formats, bit for bit as gguf-py computes them.
#include "model/quant.h"

#include <cmath>
#include <cstring>
#include <string>

#include "core/error.h"
#include "core/fp16.h"
#include "model/quant_formats.h"

// Each dequantised value is d * q (+ m, or - dmin * m) with one rounding per operation, as numpy
// does; a fused multiply-add would round once and differ in the last bit.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace osd::quant {

using namespace detail;

bool can_dequantize(TensorType t) {
  switch (t) {
    case TensorType::F32:
    case TensorType::F16:
    case TensorType::BF16:
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

bool can_quantize(TensorType t) {
  switch (t) {
    case TensorType::F32:
    case TensorType::F16:
    case TensorType::BF16:
    case TensorType::Q4_0:
    case TensorType::Q4_1:
    case TensorType::Q5_0:
    case TensorType::Q5_1:
    case TensorType::Q8_0:
    case TensorType::Q2_K:
    case TensorType::IQ4_NL:
    case TensorType::IQ4_XS:
      return true;
    default:
      return false;
  }
}

const char* store_type_names() { return "F32, F16, BF16, Q8_0, Q5_0, Q5_1, Q4_0, Q4_1, IQ4_NL, IQ4_XS or Q2_K"; }

size_t bytes_for(TensorType t, int64_t n) {
  const gguf::TypeInfo& ti = gguf::type_info(t);
  if (n < 0 || n % ti.block_size != 0)
    throw_range(std::to_string(n) + " values of type " + ti.name + " are not a whole number of " +
                std::to_string(ti.block_size) + "-value blocks");
  return static_cast<size_t>(n / ti.block_size) * ti.block_bytes;
}

namespace {

inline float h2f(uint16_t h) { return half_to_float(h); }

// The blocks at p (block fields are 2-byte aligned: GGUF tensor data is 32-byte aligned and every
// block size is even).
template <class B>
inline const B* blocks(const void* p) {
  return static_cast<const B*>(p);
}

void dequant_q4_0(const BlockQ4_0* b, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i, y += kQK) {
    const float d = h2f(b[i].d);
    for (int j = 0; j < 16; ++j) {
      y[j] = d * static_cast<float>((b[i].qs[j] & 0xF) - 8);
      y[j + 16] = d * static_cast<float>((b[i].qs[j] >> 4) - 8);
    }
  }
}

void dequant_q4_1(const BlockQ4_1* b, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i, y += kQK) {
    const float d = h2f(b[i].d), m = h2f(b[i].m);
    for (int j = 0; j < 16; ++j) {
      y[j] = d * static_cast<float>(b[i].qs[j] & 0xF) + m;
      y[j + 16] = d * static_cast<float>(b[i].qs[j] >> 4) + m;
    }
  }
}

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

void dequant_q5_0(const BlockQ5_0* b, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i, y += kQK) {
    const float d = h2f(b[i].d);
    const uint32_t qh = load_u32(b[i].qh);
    for (int j = 0; j < 16; ++j) {
      const int x0 = ((b[i].qs[j] & 0xF) | (((qh >> j) & 1) << 4)) - 16;
      const int x1 = ((b[i].qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16;
      y[j] = d * static_cast<float>(x0);
      y[j + 16] = d * static_cast<float>(x1);
    }
  }
}

void dequant_q5_1(const BlockQ5_1* b, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i, y += kQK) {
    const float d = h2f(b[i].d), m = h2f(b[i].m);
    const uint32_t qh = load_u32(b[i].qh);
    for (int j = 0; j < 16; ++j) {
      const int x0 = (b[i].qs[j] & 0xF) | (((qh >> j) & 1) << 4);
      const int x1 = (b[i].qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
      y[j] = d * static_cast<float>(x0) + m;
      y[j + 16] = d * static_cast<float>(x1) + m;
    }
  }
}

void dequant_q8_0(const BlockQ8_0* b, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i, y += kQK) {
    const float d = h2f(b[i].d);
    for (int j = 0; j < 32; ++j) y[j] = d * static_cast<float>(b[i].qs[j]);
  }
}

void dequant_q3_k(const BlockQ3_K* b, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i) {
    const float d = h2f(b[i].d);
    int8_t sc[16];
    scales_q3_k(b[i].scales, sc);
    // Value 128 n + 32 j + l: bits 2j of qs[32 n + l], high bit (4 n + j) of hmask[l] (clear = -4).
    for (int n = 0; n < 2; ++n)
      for (int j = 0; j < 4; ++j)
        for (int half = 0; half < 2; ++half) {
          const float dl = d * static_cast<float>(sc[8 * n + 2 * j + half]);
          for (int l = 16 * half; l < 16 * half + 16; ++l) {
            const int q = ((b[i].qs[32 * n + l] >> (2 * j)) & 3) - ((b[i].hmask[l] >> (4 * n + j)) & 1 ? 0 : 4);
            *y++ = dl * static_cast<float>(q);
          }
        }
  }
}

void dequant_q4_k(const BlockQ4_K* b, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i) {
    const float d = h2f(b[i].d), dmin = h2f(b[i].dmin);
    const uint8_t* q = b[i].qs;
    for (int j = 0; j < 8; j += 2, q += 32) {
      uint8_t sc, m;
      scale_min_k4(j, b[i].scales, &sc, &m);
      const float d1 = d * static_cast<float>(sc), m1 = dmin * static_cast<float>(m);
      scale_min_k4(j + 1, b[i].scales, &sc, &m);
      const float d2 = d * static_cast<float>(sc), m2 = dmin * static_cast<float>(m);
      for (int l = 0; l < 32; ++l) *y++ = d1 * static_cast<float>(q[l] & 0xF) - m1;
      for (int l = 0; l < 32; ++l) *y++ = d2 * static_cast<float>(q[l] >> 4) - m2;
    }
  }
}

void dequant_q5_k(const BlockQ5_K* b, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i) {
    const float d = h2f(b[i].d), dmin = h2f(b[i].dmin);
    const uint8_t* ql = b[i].qs;
    const uint8_t* qh = b[i].qh;
    int u1 = 1, u2 = 2;
    for (int j = 0; j < 8; j += 2, ql += 32, u1 <<= 2, u2 <<= 2) {
      uint8_t sc, m;
      scale_min_k4(j, b[i].scales, &sc, &m);
      const float d1 = d * static_cast<float>(sc), m1 = dmin * static_cast<float>(m);
      scale_min_k4(j + 1, b[i].scales, &sc, &m);
      const float d2 = d * static_cast<float>(sc), m2 = dmin * static_cast<float>(m);
      for (int l = 0; l < 32; ++l) *y++ = d1 * static_cast<float>((ql[l] & 0xF) + (qh[l] & u1 ? 16 : 0)) - m1;
      for (int l = 0; l < 32; ++l) *y++ = d2 * static_cast<float>((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
    }
  }
}

void dequant_q6_k(const BlockQ6_K* b, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i) {
    const float d = h2f(b[i].d);
    const uint8_t* ql = b[i].ql;
    const uint8_t* qh = b[i].qh;
    const int8_t* sc = b[i].scales;
    for (int n = 0; n < 256; n += 128, y += 128, ql += 64, qh += 32, sc += 8) {
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
        const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        y[l + 0] = d * static_cast<float>(sc[is + 0]) * static_cast<float>(q1);
        y[l + 32] = d * static_cast<float>(sc[is + 2]) * static_cast<float>(q2);
        y[l + 64] = d * static_cast<float>(sc[is + 4]) * static_cast<float>(q3);
        y[l + 96] = d * static_cast<float>(sc[is + 6]) * static_cast<float>(q4);
      }
    }
  }
}

void dequant_q2_k(const BlockQ2_K* b, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i) {
    const float d = h2f(b[i].d), dmin = h2f(b[i].dmin);
    // Value 128 n + 32 j + l: bits 2j of qs[32 n + l]; group (value / 16) scale and min.
    for (int n = 0; n < 2; ++n)
      for (int j = 0; j < 4; ++j)
        for (int half = 0; half < 2; ++half) {
          const uint8_t sc = b[i].scales[8 * n + 2 * j + half];
          const float dl = d * static_cast<float>(sc & 0xF), ml = dmin * static_cast<float>(sc >> 4);
          for (int l = 16 * half; l < 16 * half + 16; ++l)
            *y++ = dl * static_cast<float>((b[i].qs[32 * n + l] >> (2 * j)) & 3) - ml;
        }
  }
}

// 32 values of IQ4_NL nibbles (the layout of BlockIQ4_NL::qs) times dl.
void dequant_iq4(const uint8_t* qs, float dl, float* y) {
  for (int j = 0; j < 16; ++j) {
    y[j] = dl * static_cast<float>(kIq4Values[qs[j] & 0xF]);
    y[j + 16] = dl * static_cast<float>(kIq4Values[qs[j] >> 4]);
  }
}

void dequant_iq4_nl(const BlockIQ4_NL* b, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i, y += kQK) dequant_iq4(b[i].qs, h2f(b[i].d), y);
}

void dequant_iq4_xs(const BlockIQ4_XS* b, int64_t nb, float* y) {
  for (int64_t i = 0; i < nb; ++i) {
    const float d = h2f(b[i].d);
    for (int s = 0; s < 8; ++s, y += kQK) dequant_iq4(b[i].qs + 16 * s, d * static_cast<float>(iq4xs_scale(b[i], s)), y);
  }
}

// ---- Quantisers (gguf-py's numpy code, operation for operation) ----

// Q4_0 / Q5_0: d = (the value of largest magnitude, first one on ties) / -levels;
// q = trunc(float32(float64(x) * float64(1/d) + (levels + 0.5))), clipped to [0, 2 levels - 1].
// (gguf-py evaluates the product and sum in float64 to emulate the FMA llama.cpp's C compiles to.)
template <int kLevels>
void symmetric_block(const float* x, float* d_out, uint8_t* q) {
  float amax = 0.0f, max = 0.0f;
  for (int j = 0; j < kQK; ++j)
    if (std::fabs(x[j]) > amax) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  const float d = max / -static_cast<float>(kLevels);
  const float id = d == 0.0f ? 0.0f : 1.0f / d;
  for (int j = 0; j < kQK; ++j) {
    const double v = static_cast<double>(x[j]) * static_cast<double>(id) + (kLevels + 0.5);
    // Clipped as a float, so that no cast sees a value out of int's range (or a NaN: 0).
    float t = std::trunc(static_cast<float>(v));
    t = t >= 0.0f ? (t <= 2 * kLevels - 1 ? t : 2 * kLevels - 1) : 0.0f;
    q[j] = static_cast<uint8_t>(t);
  }
  *d_out = d;
}

// Q4_1 / Q5_1: d = (max - min) / levels, q = trunc((x - min) * (1/d) + 0.5) in float32, clipped.
template <int kLevels>
void affine_block(const float* x, float* d_out, float* m_out, uint8_t* q) {
  float mn = x[0], mx = x[0];
  for (int j = 1; j < kQK; ++j) {
    mn = x[j] < mn ? x[j] : mn;
    mx = x[j] > mx ? x[j] : mx;
  }
  const float d = (mx - mn) / static_cast<float>(kLevels);
  const float id = d == 0.0f ? 0.0f : 1.0f / d;
  for (int j = 0; j < kQK; ++j) {
    float t = std::trunc((x[j] - mn) * id + 0.5f);
    t = t >= 0.0f ? (t <= kLevels ? t : kLevels) : 0.0f;  // as above
    q[j] = static_cast<uint8_t>(t);
  }
  *d_out = d;
  *m_out = mn;
}

void pack_nibbles(const uint8_t* q, uint8_t* qs) {
  for (int j = 0; j < 16; ++j) qs[j] = static_cast<uint8_t>((q[j] & 0xF) | ((q[j + 16] & 0xF) << 4));
}

void pack_high_bits(const uint8_t* q, uint8_t* qh) {
  uint32_t h = 0;
  for (int j = 0; j < kQK; ++j) h |= static_cast<uint32_t>((q[j] >> 4) & 1) << j;
  std::memcpy(qh, &h, 4);
}

// numpy's np_roundf in gguf-py: round half away from zero.
inline float round_half_away(float v) {
  const float a = std::fabs(v);
  const float fl = std::floor(a);
  const float r = fl + std::floor(2.0f * (a - fl));
  return v < 0 ? -r : r;
}

// ---- Q2_K and IQ4 quantisers: this package's own (gguf-py has none) ----
// Plain round to nearest on scales from each block's range: valid blocks that llama.cpp reads as
// this package does, though less accurate than llama.cpp's quantize tool, which searches the
// scales (and weighs them by an importance matrix when given one).

// round(v) clamped to [lo, hi], lo for NaN, with no out-of-range cast.
inline int clamp_round(float v, int lo, int hi) {
  const float r = round_half_away(v);
  return r >= static_cast<float>(lo) ? (r <= static_cast<float>(hi) ? static_cast<int>(r) : hi) : lo;
}

// The entry of kIq4Values nearest to v (the lower one on ties; index 8, value 1, for NaN).
int nearest_iq4(float v) {
  if (!(v == v)) return 8;
  int best = 0;
  for (int k = 1; k < 16; ++k)
    if (std::fabs(v - kIq4Values[k]) < std::fabs(v - kIq4Values[best])) best = k;
  return best;
}

// The value of largest magnitude among n (the first on ties).
float signed_amax(const float* x, int n) {
  float amax = 0.0f, max = 0.0f;
  for (int j = 0; j < n; ++j)
    if (std::fabs(x[j]) > amax) amax = std::fabs(x[j]), max = x[j];
  return max;
}

// 32 values as IQ4 nibbles for the block scale dl (BlockIQ4_NL::qs layout).
void iq4_nibbles(const float* x, float dl, uint8_t* qs) {
  const float id = dl != 0.0f ? 1.0f / dl : 0.0f;
  for (int j = 0; j < 16; ++j)
    qs[j] = static_cast<uint8_t>(nearest_iq4(x[j] * id) | (nearest_iq4(x[j + 16] * id) << 4));
}

void quantize_iq4_nl(const float* x, BlockIQ4_NL& b) {
  // The value of largest magnitude lands on -127, the table's end.
  b.d = float_to_half(signed_amax(x, kQK) / -127.0f);
  iq4_nibbles(x, h2f(b.d), b.qs);
}

void quantize_iq4_xs(const float* x, BlockIQ4_XS& b) {
  float s[8];
  for (int i = 0; i < 8; ++i) s[i] = signed_amax(x + kQK * i, kQK) / -127.0f;
  b.d = float_to_half(signed_amax(s, 8) / -32.0f);
  const float d = h2f(b.d), id = d != 0.0f ? 1.0f / d : 0.0f;
  b.scales_h = 0;
  std::memset(b.scales_l, 0, sizeof b.scales_l);
  for (int i = 0; i < 8; ++i) {
    // The sub-block's scale rounded away from zero, so that its largest value stays on the table.
    const float r = s[i] * id;
    const int ls = clamp_round(r >= 0.0f ? std::ceil(r) : std::floor(r), -32, 31) + 32;
    b.scales_l[i / 2] = static_cast<uint8_t>(b.scales_l[i / 2] | ((ls & 0xF) << (4 * (i % 2))));
    b.scales_h = static_cast<uint16_t>(b.scales_h | ((ls >> 4) << (2 * i)));
    iq4_nibbles(x + kQK * i, d * static_cast<float>(iq4xs_scale(b, i)), b.qs + 16 * i);
  }
}

void quantize_q2_k(const float* x, BlockQ2_K& b) {
  // Per 16 values: min m = max(0, -min x) and scale (max x + m) / 3; then both as 4 bits of the
  // super-block's d and dmin.
  float scale[16], mn[16], smax = 0.0f, mmax = 0.0f;
  for (int g = 0; g < 16; ++g) {
    float lo = 0.0f, hi = 0.0f;
    for (int j = 16 * g; j < 16 * g + 16; ++j) lo = x[j] < lo ? x[j] : lo, hi = x[j] > hi ? x[j] : hi;
    mn[g] = -lo;
    scale[g] = (hi - lo) / 3.0f;
    smax = scale[g] > smax ? scale[g] : smax;
    mmax = mn[g] > mmax ? mn[g] : mmax;
  }
  b.d = float_to_half(smax / 15.0f);
  b.dmin = float_to_half(mmax / 15.0f);
  const float d = h2f(b.d), dmin = h2f(b.dmin);
  const float id = d > 0.0f ? 1.0f / d : 0.0f, im = dmin > 0.0f ? 1.0f / dmin : 0.0f;
  uint8_t q[kQKK];
  for (int g = 0; g < 16; ++g) {
    const int sc = clamp_round(scale[g] * id, 0, 15), m = clamp_round(mn[g] * im, 0, 15);
    b.scales[g] = static_cast<uint8_t>(sc | (m << 4));
    const float dl = d * static_cast<float>(sc), ml = dmin * static_cast<float>(m);
    const float il = dl > 0.0f ? 1.0f / dl : 0.0f;
    for (int j = 16 * g; j < 16 * g + 16; ++j) q[j] = static_cast<uint8_t>(clamp_round((x[j] + ml) * il, 0, 3));
  }
  std::memset(b.qs, 0, sizeof b.qs);
  for (int n = 0; n < 2; ++n)
    for (int j = 0; j < 4; ++j)
      for (int l = 0; l < 32; ++l) b.qs[32 * n + l] = static_cast<uint8_t>(b.qs[32 * n + l] | (q[128 * n + 32 * j + l] << (2 * j)));
}

}  // namespace

void dequantize(TensorType t, const void* src, int64_t n, float* dst) {
  const int64_t blocks_size = gguf::type_info(t).block_size;
  bytes_for(t, n);  // checks n
  const int64_t nb = n / blocks_size;
  switch (t) {
    case TensorType::F32:
      std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
      return;
    case TensorType::F16: {
      const auto* h = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(h[i]);
      return;
    }
    case TensorType::BF16: {
      const auto* h = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(h[i]);
      return;
    }
    case TensorType::Q4_0: return dequant_q4_0(blocks<BlockQ4_0>(src), nb, dst);
    case TensorType::Q4_1: return dequant_q4_1(blocks<BlockQ4_1>(src), nb, dst);
    case TensorType::Q5_0: return dequant_q5_0(blocks<BlockQ5_0>(src), nb, dst);
    case TensorType::Q5_1: return dequant_q5_1(blocks<BlockQ5_1>(src), nb, dst);
    case TensorType::Q8_0: return dequant_q8_0(blocks<BlockQ8_0>(src), nb, dst);
    case TensorType::Q3_K: return dequant_q3_k(blocks<BlockQ3_K>(src), nb, dst);
    case TensorType::Q4_K: return dequant_q4_k(blocks<BlockQ4_K>(src), nb, dst);
    case TensorType::Q5_K: return dequant_q5_k(blocks<BlockQ5_K>(src), nb, dst);
    case TensorType::Q6_K: return dequant_q6_k(blocks<BlockQ6_K>(src), nb, dst);
    case TensorType::Q2_K: return dequant_q2_k(blocks<BlockQ2_K>(src), nb, dst);
    case TensorType::IQ4_NL: return dequant_iq4_nl(blocks<BlockIQ4_NL>(src), nb, dst);
    case TensorType::IQ4_XS: return dequant_iq4_xs(blocks<BlockIQ4_XS>(src), nb, dst);
    default:
      throw_range(std::string("no dequantiser for type ") + gguf::type_info(t).name);
  }
}

void quantize(TensorType t, const float* src, int64_t n, void* dst) {
  if (!can_quantize(t)) throw_range(std::string("no quantiser for type ") + gguf::type_info(t).name);
  bytes_for(t, n);  // checks n
  const int64_t nb = n / gguf::type_info(t).block_size;
  uint8_t q[kQK];
  float d, m;
  switch (t) {
    case TensorType::F32:
      std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
      return;
    case TensorType::F16: {
      auto* h = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) h[i] = float_to_half(src[i]);
      return;
    }
    case TensorType::BF16: {
      auto* h = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) h[i] = float_to_bf16(src[i]);
      return;
    }
    case TensorType::Q4_0: {
      auto* b = static_cast<BlockQ4_0*>(dst);
      for (int64_t i = 0; i < nb; ++i) {
        symmetric_block<8>(src + i * kQK, &d, q);
        b[i].d = float_to_half(d);
        pack_nibbles(q, b[i].qs);
      }
      return;
    }
    case TensorType::Q5_0: {
      auto* b = static_cast<BlockQ5_0*>(dst);
      for (int64_t i = 0; i < nb; ++i) {
        symmetric_block<16>(src + i * kQK, &d, q);
        b[i].d = float_to_half(d);
        pack_high_bits(q, b[i].qh);
        pack_nibbles(q, b[i].qs);
      }
      return;
    }
    case TensorType::Q4_1: {
      auto* b = static_cast<BlockQ4_1*>(dst);
      for (int64_t i = 0; i < nb; ++i) {
        affine_block<15>(src + i * kQK, &d, &m, q);
        b[i].d = float_to_half(d);
        b[i].m = float_to_half(m);
        pack_nibbles(q, b[i].qs);
      }
      return;
    }
    case TensorType::Q5_1: {
      auto* b = static_cast<BlockQ5_1*>(dst);
      for (int64_t i = 0; i < nb; ++i) {
        affine_block<31>(src + i * kQK, &d, &m, q);
        b[i].d = float_to_half(d);
        b[i].m = float_to_half(m);
        pack_high_bits(q, b[i].qh);
        pack_nibbles(q, b[i].qs);
      }
      return;
    }
    case TensorType::Q8_0: {
      auto* b = static_cast<BlockQ8_0*>(dst);
      for (int64_t i = 0; i < nb; ++i) {
        const float* x = src + i * kQK;
        float amax = 0.0f;
        for (int j = 0; j < kQK; ++j) amax = std::fabs(x[j]) > amax ? std::fabs(x[j]) : amax;
        const float dd = amax / 127.0f;
        const float id = dd == 0.0f ? 0.0f : 1.0f / dd;
        b[i].d = float_to_half(dd);
        for (int j = 0; j < kQK; ++j) {
          const float r = round_half_away(x[j] * id);  // within [-127, 127] for finite input
          b[i].qs[j] = static_cast<int8_t>(r >= -127.0f ? (r <= 127.0f ? r : 127.0f) : -127.0f);
        }
      }
      return;
    }
    case TensorType::Q2_K:
      for (int64_t i = 0; i < nb; ++i) quantize_q2_k(src + i * kQKK, static_cast<BlockQ2_K*>(dst)[i]);
      return;
    case TensorType::IQ4_NL:
      for (int64_t i = 0; i < nb; ++i) quantize_iq4_nl(src + i * kQK, static_cast<BlockIQ4_NL*>(dst)[i]);
      return;
    case TensorType::IQ4_XS:
      for (int64_t i = 0; i < nb; ++i) quantize_iq4_xs(src + i * kQKK, static_cast<BlockIQ4_XS*>(dst)[i]);
      return;
    default:
      break;
  }
}

}  // namespace osd::quant
