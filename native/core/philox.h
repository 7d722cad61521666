// Philox 4x32-10 (Salmon et al., SC'11), the counter-based generator behind every random decision.
// A draw is keyed by (seed, stream) and addressed by (position, lane), so the CPU and the GPU
// produce the same numbers for the same decision no matter how work is scheduled.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define OSD_HD __host__ __device__ __forceinline__
#else
#define OSD_HD inline
#endif

namespace osd {

struct Philox4 {
  uint32_t v[4];
};

OSD_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

// Counter = (position, lane, stream_lo, stream_hi); key = (seed_lo, seed_hi).
OSD_HD Philox4 philox4x32_10(uint64_t seed, uint64_t stream, uint32_t position, uint32_t lane) {
  uint32_t c0 = position, c1 = lane, c2 = static_cast<uint32_t>(stream), c3 = static_cast<uint32_t>(stream >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, hi1;
    uint32_t lo0 = mulhilo32(0xD2511F53u, c0, &hi0);
    uint32_t lo1 = mulhilo32(0xCD9E8D57u, c2, &hi1);
    uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// A uniform double in [0, 1) with 53 random bits, from two 32-bit words.
OSD_HD double u53(uint32_t a, uint32_t b) {
  return (static_cast<double>(a >> 5) * 67108864.0 + static_cast<double>(b >> 6)) * (1.0 / 9007199254740992.0);
}

// The lanes used by verification and sampling. Node i of a draft (chain position i) is tested
// with the draw at position i + 1, lane kLaneAccept; a token sampled from logits row r
// (a residual, a bonus, or plain sampling) uses position r, lane kLaneSample.
constexpr uint32_t kLaneAccept = 0;
constexpr uint32_t kLaneSample = 1;

OSD_HD double philox_uniform(uint64_t seed, uint64_t stream, uint32_t position, uint32_t lane) {
  Philox4 r = philox4x32_10(seed, stream, position, lane);
  return u53(r.v[0], r.v[1]);
}

}  // namespace osd
