// Distillation losses between teacher (target) and student (draft) distributions, each fused with
// its gradient with respect to the student logits. T is the temperature applied to both sides.
//   forward-kl  KL(p || q)                                      d/ds = (q - p) / T
//   reverse-kl  KL(q || p)                                      d/ds = q (log q - log p - KL) / T
//   jsd         beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
//   tvd         1/2 sum |p - q|
// For the last three, d/ds_j = q_j (g_j - sum_k q_k g_k) / T with g = dL/dq.
// A sparse teacher (top-k ids and probabilities plus the residual mass) is compared on k + 1 bins:
// the k tokens and "everything else", whose student mass is 1 - sum of the student's top-k mass.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace osd {

enum class DistillKind : int32_t { ForwardKL = 0, ReverseKL = 1, JSD = 2, TVD = 3 };

// Parses "forward-kl" | "reverse-kl" | "jsd" | "tvd" (RangeError naming `what` otherwise).
DistillKind parse_distill_kind(const std::string& name, const std::string& what = "kind");

struct DistillInput {
  DistillKind kind = DistillKind::ForwardKL;
  const float* student = nullptr;  // rows x V logits
  int32_t rows = 0;
  int32_t vocab = 0;
  float temperature = 1.0f;
  float beta = 0.5f;                // JSD mixing weight, in (0, 1)
  const uint8_t* mask = nullptr;    // rows; nonzero = the row counts. Null = every row counts.
  // Dense teacher: rows x V logits.
  const float* teacher = nullptr;
  // Sparse teacher (used when teacher is null): rows x k ids and probabilities, plus the residual
  // mass per row (null = 1 - sum of the row's probabilities).
  const int32_t* topk_ids = nullptr;
  const float* topk_probs = nullptr;
  const float* residual = nullptr;
  int32_t k = 0;
};

// Validates the input (RangeError naming the argument): temperature > 0 and finite, beta in (0, 1),
// ids in range and distinct per row, probabilities finite and >= 0 with p + residual = 1 (+-1e-3).
void validate_distill(const DistillInput& in);

// Loss and gradient of one row, the gradient scaled by `scale` (grad may be null).
// Logits must be finite (RangeError naming the row otherwise).
double distill_row(const DistillInput& in, int32_t row, float scale, float* grad);

}  // namespace osd
