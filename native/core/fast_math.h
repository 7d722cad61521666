// Branch-free float math that compilers vectorise. exp_approx has a relative error below 2e-7
// over the float range (checked against std::exp in test_kernels) and returns 0 below -87.3 (and saturates above 88.3).
#pragma once
#include <cmath>
#include <cstdint>

#include "philox.h"  // OSD_HD

namespace osd {

OSD_HD float exp_approx(float x) {
  // exp(x) = 2^n * exp(r), r = x - n ln2 in [-ln2/2, ln2/2]; degree-6 polynomial for exp(r).
  const float lo = x;
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  float n = floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  float p = 1.3888889e-3f;
  p = p * r + 8.3333333e-3f;
  p = p * r + 4.1666667e-2f;
  p = p * r + 1.6666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  return lo <= -87.3f ? 0.0f : p * scale;
}

}  // namespace osd
