// The draft loop's sampler (spec/sampling.h): sample_temperature_row, the one-pass fast path, must
// return the token of the reference, sample_row over warp_row, for every row and uniform.
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "check.h"
#include "core/philox.h"
#include "model/draft.h"

using namespace osd;

namespace {

// Deterministic normal-ish logits from Philox (sum of uniforms), scaled.
std::vector<float> row_of(int32_t vocab, float scale, uint64_t seed) {
  std::vector<float> l(static_cast<size_t>(vocab));
  for (int32_t j = 0; j < vocab; ++j) {
    double s = 0;
    for (uint32_t k = 0; k < 4; ++k) s += philox_uniform(seed, 7, static_cast<uint32_t>(j), k);
    l[j] = static_cast<float>((s - 2.0) * scale);
  }
  return l;
}

int32_t reference(const std::vector<float>& l, float temperature, double u) {
  Sampling s;
  s.temperature = temperature;
  const int32_t v = static_cast<int32_t>(l.size());
  const float mx = checked_row_max(l.data(), v, "logits", 0);
  WarpedRow w;
  warp_row(l.data(), v, mx, s, w);
  return sample_row(w, u);
}

}  // namespace

OSD_TEST(fast_dense_sampling_equals_sample_row) {
  int checked = 0, mismatched = 0;
  const double top = 1.0 - std::ldexp(1.0, -53);
  for (int32_t vocab : {1, 2, 7, 8, 9, 31, 100, 4096, 32000})
    for (float scale : {0.01f, 1.0f, 4.0f, 40.0f})
      for (float temperature : {0.05f, 0.8f, 1.0f, 3.0f}) {
        const uint64_t seed = static_cast<uint64_t>(vocab) * 1000 + static_cast<uint64_t>(scale * 10 + temperature * 100);
        std::vector<float> l = row_of(vocab, scale, seed);
        // -Infinity entries have probability 0, and a row may end with them.
        if (vocab > 4) l[1] = l[vocab - 1] = -std::numeric_limits<float>::infinity();
        const int32_t v = vocab;
        const float mx = checked_row_max(l.data(), v, "logits", 0);
        std::vector<double> us = {0.0, 0.5, top};
        for (uint32_t k = 0; k < 40; ++k) us.push_back(philox_uniform(seed, 3, k, 1));
        for (double u : us) {
          const int32_t want = reference(l, temperature, u);
          const int32_t got = sample_temperature_row(l.data(), v, mx, 1.0f / temperature, u);
          ++checked;
          if (got != want) {
            ++mismatched;
            if (mismatched < 5)
              osd_test::fail(__FILE__, __LINE__, "vocab " + std::to_string(vocab) + " scale " + std::to_string(scale) + " T " +
                                                     std::to_string(temperature) + " u " + std::to_string(u) + ": " +
                                                     std::to_string(got) + " vs " + std::to_string(want));
          }
        }
      }
  CHECK_EQ(mismatched, 0);
  CHECK(checked > 5000);
}

OSD_TEST(sample_token_matches_the_reference_for_every_warp) {
  const std::vector<float> l = row_of(4096, 3.0f, 11);
  for (Sampling s : {Sampling{0.0f, 0, 1.0f}, Sampling{0.8f, 0, 1.0f}, Sampling{1.0f, 40, 1.0f}, Sampling{1.0f, 4096, 1.0f},
                     Sampling{0.7f, 0, 0.9f}, Sampling{1.2f, 5, 0.5f}})
    for (uint32_t pos = 0; pos < 50; ++pos) {
      const int32_t got = sample_token(l.data(), 4096, s, 5, 9, pos);
      int32_t want;
      const float mx = checked_row_max(l.data(), 4096, "logits", 0);
      if (s.greedy()) {
        want = argmax_row(l.data(), 4096);
      } else {
        WarpedRow w;
        warp_row(l.data(), 4096, mx, s, w);
        want = sample_row(w, philox_uniform(5, 9, pos, kLaneSample));
      }
      CHECK_EQ(got, want);
    }
  // A bad row is refused with the name it was given.
  std::vector<float> bad = l;
  bad[3] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS(std::exception, sample_token(bad.data(), 4096, Sampling{0.8f, 0, 1.0f}, 0, 0, 0, "draft logits", 2), "draft logits");
}

OSD_TEST_MAIN()
