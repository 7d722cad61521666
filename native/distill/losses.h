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

// The fast path of distill_row for forward KL against a dense teacher, in the blocked scheme of
// spec/sampling.h (blocks of 2048 entries, each reduced in 32 lanes, blocks combined in order), so
// the result does not depend on threads. Pass 1 reads each block once (its maxima, then from L1 its
// exp terms and their sums, the student's kept in grad and the teacher's in scratch) and yields the
// loss; pass 2 (only with grad) turns the kept terms into the gradient with no further exp: two exps
// per entry instead of four. Blocks run over the thread pool when called outside it.
//   per block b: bs_b, bt_b block maxima; es_j = exp_approx((s_j - bs_b) it), et_j likewise;
//     Ss_b = lane_sum(es), St_b = lane_sum(et), D_b = lane_sum(et_j d_j),
//     d_j = ((t_j - bt_b) - (s_j - bs_b)) it;
//   cs_b = exp_approx((bs_b - ms) it), ct_b likewise; zs = sum_b double(Ss_b cs_b), zt likewise;
//   loss = sum_b double(ct_b) (D_b + St_b k_b) / zt + log zs - log zt,
//     k_b = ((bt_b - mt) - (bs_b - ms)) it in double;
//   grad_j = gscale (es_j float(cs_b / zs) - et_j float(ct_b / zt)), gscale = scale / T.
// With `stream`, es_j go to scratch too and pass 2 writes grad with non-temporal stores (the same
// values): for gradients larger than the caches, which are then not read for ownership.
double forward_kl_row_blocked(const DistillInput& in, int32_t row, float scale, float* grad, bool stream = false);


// The fast path of distill_row for reverse KL, JSD and TVD against a dense teacher, in the same
// blocked scheme: pass 1 as above (the teacher's exp terms in scratch); pass 2 forms per entry
//   q_j = es_j float(cs_b / zs), p_j = et_j float(ct_b / zt), a_j = (s_j - ms) it, b_j = (t_j - mt) it,
//   d_j = log q_j - log p_j = (a_j - b_j) - float(log zs - log zt),
// the loss terms and g_j = dL/dq_j in float (JSD's log m relative to the larger side, so that its
// argument stays in [min(beta, 1 - beta), 1]), summed per block and in block order in double;
// pass 3 writes gscale float(cs_b / zs) es_j (g_j - E_q[g]). Three exps per entry for JSD, two for
// the others (against two double exps, and for JSD two more and a log, in distill_row).
// `stream` as forward_kl_row_blocked's (pass 3 writes grad past the caches).
double divergence_row_blocked(const DistillInput& in, int32_t row, float scale, float* grad, bool stream = false);

// The fast path of distill_row for a sparse teacher: the student's exp terms once (kept in grad),
// its rest mass summed directly with the top-k terms set aside, the k + 1 bins as distill_row
// scores them, and outside the top-k the gradient as q_j times one constant: one float exp per
// entry against about three double exps. A row whose rest mass falls below float's range (the
// top-k hold nearly everything) goes to distill_row, which sums the rest relative to its own max.
double sparse_row_fast(const DistillInput& in, int32_t row, float scale, float* grad);

// The CPU backend's row: forward_kl_row_blocked, divergence_row_blocked or sparse_row_fast.
// Blocks run over the thread pool when called outside it (dense teachers).
// `stream`: the gradient is larger than the caches (forward_kl_row_blocked, divergence_row_blocked).
double distill_row_fast(const DistillInput& in, int32_t row, float scale, float* grad, bool stream = false);

}  // namespace osd
