// IEEE 754 half (binary16) and bfloat16 conversions to and from float.
// Bit manipulation (plus one exact multiply), so results do not depend on the rounding mode
// or FTZ/DAZ. float -> half and float -> bf16 round to nearest, ties to even;
// subnormals, infinities and NaNs are handled (NaNs keep their sign and come back quiet).
// These are scalar; SIMD kernels may use F16C / AVX-512 BF16 where present.
#pragma once
#include <cstdint>
#include <cstring>

namespace osd {

namespace fp16_detail {
inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
}  // namespace fp16_detail

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;  // exponent and mantissa
  if (em >= 0x7c00u) return fp16_detail::bits_float(sign | 0x7f800000u | ((em & 0x3ffu) << 13));  // inf, NaN
  if (em >= 0x0400u) return fp16_detail::bits_float(sign | ((em << 13) + (112u << 23)));  // normal: rebias
  // Zero or subnormal: em * 2^-24 is exact in float and never a float subnormal, so FTZ/DAZ
  // cannot change it.
  return fp16_detail::bits_float(sign | fp16_detail::float_bits(static_cast<float>(em) * 0x1p-24f));
}

inline uint16_t float_to_half(float f) {
  const uint32_t x = fp16_detail::float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t abs = x & 0x7fffffffu;
  if (abs > 0x7f800000u)  // NaN: keep the top of the payload, set the quiet bit
    return static_cast<uint16_t>(sign | 0x7e00u | ((abs >> 13) & 0x3ffu));
  if (abs >= 0x47800000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65536 (or inf): overflow to inf
  const int e = static_cast<int>(abs >> 23) - 127 + 15;  // half biased exponent
  if (e >= 1) {
    // Normal half. A carry out of the mantissa bumps the exponent, which is the right result
    // (and yields inf for values that round up past 65504).
    uint32_t h = (static_cast<uint32_t>(e) << 10) | ((abs & 0x7fffffu) >> 13);
    const uint32_t rem = abs & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  if (abs < 0x33000000u) return sign;  // below 2^-25: rounds to zero (2^-25 itself ties to even 0)
  // Subnormal half: value = m * 2^-24 with m = mantissa (with implicit 1) >> (14 - e).
  const uint32_t m = (abs & 0x7fffffu) | 0x800000u;
  const int shift = 14 - e;  // 14..24
  uint32_t h = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1);
  const uint32_t half = 1u << (shift - 1);
  if (rem > half || (rem == half && (h & 1u))) ++h;  // may carry into the smallest normal: still correct
  return static_cast<uint16_t>(sign | h);
}

inline float bf16_to_float(uint16_t b) { return fp16_detail::bits_float(static_cast<uint32_t>(b) << 16); }

inline uint16_t float_to_bf16(float f) {
  const uint32_t x = fp16_detail::float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

}  // namespace osd
