#include "distill/adamw.h"

#include <cmath>
#include <string>

#include "core/error.h"

namespace osd {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_THREAD__)  // see fast_math.h
#define OSD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define OSD_CLONES
#endif

void validate_adamw(const AdamWConfig& c) {
  auto check = [](bool ok, const char* name, float v) {
    if (!ok) throw_range(std::string(name) + " is out of range, got " + num_str(v));
  };
  check(std::isfinite(c.lr) && c.lr >= 0.0f, "lr (must be >= 0)", c.lr);
  check(c.beta1 >= 0.0f && c.beta1 < 1.0f, "beta1 (must be in [0, 1))", c.beta1);
  check(c.beta2 >= 0.0f && c.beta2 < 1.0f, "beta2 (must be in [0, 1))", c.beta2);
  check(std::isfinite(c.eps) && c.eps > 0.0f, "eps (must be > 0)", c.eps);
  check(std::isfinite(c.weight_decay) && c.weight_decay >= 0.0f, "weightDecay (must be >= 0)", c.weight_decay);
  if (c.step < 1) throw_range("step (must be an integer >= 1) is out of range, got " + std::to_string(c.step));
  check(std::isfinite(c.grad_scale) && c.grad_scale >= 0.0f, "gradScale (must be >= 0)", c.grad_scale);
}

OSD_CLONES void adamw_update(float* p, const float* g, float* m, float* v, size_t begin, size_t end,
                             const AdamWConfig& c) {
  const float b1 = c.beta1, b2 = c.beta2;
  const float bc1 = static_cast<float>(1.0 - std::pow(static_cast<double>(b1), static_cast<double>(c.step)));
  const float bc2 = static_cast<float>(1.0 - std::pow(static_cast<double>(b2), static_cast<double>(c.step)));
  const float step_size = c.lr / bc1;
  const float inv_sqrt_bc2 = 1.0f / std::sqrt(bc2);
  const float decay = 1.0f - c.lr * c.weight_decay;
  const float gs = c.grad_scale;
  for (size_t i = begin; i < end; ++i) {
    const float gi = g[i] * gs;
    m[i] = b1 * m[i] + (1.0f - b1) * gi;
    v[i] = b2 * v[i] + (1.0f - b2) * gi * gi;
    const float denom = std::sqrt(v[i]) * inv_sqrt_bc2 + c.eps;
    p[i] = p[i] * decay - step_size * m[i] / denom;
  }
}

OSD_CLONES double sum_squares(const float* x, size_t begin, size_t end) {
  double acc[8] = {};
  size_t i = begin;
  for (; i + 8 <= end; i += 8)
    for (int k = 0; k < 8; ++k) acc[k] += static_cast<double>(x[i + k]) * x[i + k];
  double t = 0.0;
  for (; i < end; ++i) t += static_cast<double>(x[i]) * x[i];
  for (double a : acc) t += a;
  return t;
}

}  // namespace osd
