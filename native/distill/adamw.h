// AdamW (Loshchilov & Hutter) over flat float buffers, with PyTorch's conventions: decoupled weight
// decay p -= lr * wd * p, then the bias-corrected Adam update.
#pragma once
#include <cstddef>
#include <cstdint>

namespace osd {

struct AdamWConfig {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.01f;
  int64_t step = 1;         // 1-based step number used for bias correction
  float grad_scale = 1.0f;  // multiplies every gradient first (global-norm clipping)
};

// Validates the configuration (RangeError naming the field).
void validate_adamw(const AdamWConfig& c);

// Updates params, m and v in place over [begin, end).
void adamw_update(float* params, const float* grads, float* m, float* v, size_t begin, size_t end,
                  const AdamWConfig& c);

// Sum of squares in double (for the global gradient norm).
double sum_squares(const float* x, size_t begin, size_t end);

}  // namespace osd
