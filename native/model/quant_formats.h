// Block layouts of the GGML quantised formats (as in ggml-common.h), shared by the quantisers,
// the dequantisers and the matrix kernels. Internal to native/model/quant*.cpp.
#pragma once
#include <cstdint>

namespace osd::quant::detail {

constexpr int kQK = 32;    // values per block of the 32-value formats
constexpr int kQKK = 256;  // values per super-block of the K-quants

struct BlockQ4_0 {
  uint16_t d;
  uint8_t qs[16];  // value j in the low nibble of qs[j], value j + 16 in the high nibble
};
struct BlockQ4_1 {
  uint16_t d, m;
  uint8_t qs[16];
};
struct BlockQ5_0 {
  uint16_t d;
  uint8_t qh[4];  // bit j: fifth bit of value j
  uint8_t qs[16];
};
struct BlockQ5_1 {
  uint16_t d, m;
  uint8_t qh[4];
  uint8_t qs[16];
};
struct BlockQ8_0 {
  uint16_t d;
  int8_t qs[32];
};
struct BlockQ3_K {
  uint8_t hmask[32];
  uint8_t qs[64];
  uint8_t scales[12];
  uint16_t d;
};
struct BlockQ4_K {
  uint16_t d, dmin;
  uint8_t scales[12];
  uint8_t qs[128];
};
struct BlockQ5_K {
  uint16_t d, dmin;
  uint8_t scales[12];
  uint8_t qh[32];
  uint8_t qs[128];
};
struct BlockQ6_K {
  uint8_t ql[128];
  uint8_t qh[64];
  int8_t scales[16];
  uint16_t d;
};
struct BlockQ2_K {
  uint8_t scales[16];  // group g (values 16g .. 16g + 15): scale in the low nibble, min in the high one
  uint8_t qs[64];      // value 128n + 32j + l: bits 2j of qs[32n + l]
  uint16_t d, dmin;
};
// The non-linear 4-bit formats: a nibble indexes kIq4Values (llama.cpp's kvalues_iq4nl).
struct BlockIQ4_NL {
  uint16_t d;
  uint8_t qs[16];  // value j in the low nibble of qs[j], value j + 16 in the high nibble
};
struct BlockIQ4_XS {
  uint16_t d;
  uint16_t scales_h;   // bits 2i, 2i + 1: high bits of sub-block i's six-bit scale
  uint8_t scales_l[4]; // nibble i (low first): low bits of sub-block i's scale
  uint8_t qs[128];     // sub-block i (32 values) as an IQ4_NL block's 16 bytes at 16i
};
inline constexpr int8_t kIq4Values[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
static_assert(sizeof(BlockQ2_K) == 84 && sizeof(BlockIQ4_NL) == 18 && sizeof(BlockIQ4_XS) == 136,
              "Q2_K and IQ4 block sizes");

static_assert(sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20 && sizeof(BlockQ5_0) == 22 && sizeof(BlockQ5_1) == 24 &&
                  sizeof(BlockQ8_0) == 34,
              "32-value block sizes");
static_assert(sizeof(BlockQ3_K) == 110 && sizeof(BlockQ4_K) == 144 && sizeof(BlockQ5_K) == 176 && sizeof(BlockQ6_K) == 210,
              "K-quant block sizes");

// The 6-bit scale and min of sub-block j (0..7) of Q4_K / Q5_K.
inline void scale_min_k4(int j, const uint8_t* q, uint8_t* d, uint8_t* m) {
  if (j < 4) {
    *d = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *d = static_cast<uint8_t>((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
    *m = static_cast<uint8_t>((q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4));
  }
}

// The 16 scales of a Q3_K block, each in [-32, 31].
inline void scales_q3_k(const uint8_t* s, int8_t* out) {
  for (int j = 0; j < 16; ++j) {
    const int low = j < 8 ? (s[j] & 0xF) : (s[j - 8] >> 4);
    const int high = (s[8 + (j % 4)] >> (2 * (j / 4))) & 3;
    out[j] = static_cast<int8_t>((low | (high << 4)) - 32);
  }
}

// The scale of IQ4_XS sub-block i (0..7), in [-32, 31].
inline int iq4xs_scale(const BlockIQ4_XS& b, int i) {
  return (((b.scales_l[i / 2] >> (4 * (i % 2))) & 0xF) | (((b.scales_h >> (2 * i)) & 3) << 4)) - 32;
}

}  // namespace osd::quant::detail
