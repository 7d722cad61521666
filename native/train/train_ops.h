// The training ops on the CPU, f32: each forward op with its backward. The forward ops compute
// exactly what the inference pass (model/sequence.cpp) computes, bit for bit, so a model trained
// here decodes the way it trained; the backward ops are checked against central finite differences
// in test/native/test_train.cpp.
//
// Layout: a batch of N = B x T tokens is a row-major [N x width] matrix; token n of the batch is
// position n % T of sequence n / T. Weights are row-major [out x in], as stored in GGUF.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "distill/losses.h"
#include "model/model.h"

namespace osd {
class ThreadPool;
}

namespace osd::train {

// The pool the training ops run on: default_pool() (shared with decoding) unless
// set_train_threads(n > 0) gave training its own n threads, so that a training step running off
// the decoding thread does not queue behind, or hold up, decoding's parallel_for calls (each pool
// runs one parallel_for at a time). n = 0 goes back to sharing. Safe to call at any time: a step
// already running may finish on the pool it had. train_threads() is n (0 when shared).
ThreadPool& train_pool();
void set_train_threads(int threads);
int train_threads();

// ---- Matrix products ----

// Y[n x out] = X[n x in] W^T. Every element is the same dot product, reduced in the same order,
// as osd::matmul over an F32 matrix (register-blocked when AVX2 is available), so the result is
// bitwise what inference computes.
void linear_forward(const float* w, int64_t out, int64_t in, const float* x, int64_t n, float* y);

// C[M x N] = A B (or C += A B when accumulate), with A(i, k) = a[i * a_rs + k * a_cs] (so A or
// its transpose can be passed without a copy), B row-major with row stride ldb, C with ldc.
// Each element of C is summed by one thread in increasing k, so results do not depend on the
// thread count.
void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_rs, int64_t a_cs, const float* b, int64_t ldb,
          float* c, int64_t ldc, bool accumulate);

// Backward of y = x W^T over n rows: dx = dy W (dx += dy W when accumulate_dx; skipped when
// dx is null) and dw += dy^T x (skipped when dw is null).
void linear_backward(const float* w, int64_t out, int64_t in, const float* x, const float* dy, int64_t n, float* dx,
                     bool accumulate_dx, float* dw);

// ---- RMSNorm ----

// y = w * (x * r) with r = 1 / sqrt(mean(x^2) + eps), per row; r goes to rstd[row].
void rmsnorm_forward(const float* x, const float* w, int64_t n, int64_t dim, float eps, float* y, float* rstd);
// dx (= or +=) dL/dx; dw += dL/dw.
void rmsnorm_backward(const float* x, const float* w, const float* rstd, const float* dy, int64_t n, int64_t dim,
                      float* dx, bool accumulate_dx, float* dw);

// ---- RoPE ----

// cos and sin per (position, pair), computed exactly as osd::rope computes them.
struct RopeTable {
  int64_t head_dim = 0;
  int64_t positions = 0;
  bool neox = false;
  float theta = 0.0f, freq_scale = 0.0f;
  std::vector<float> cos, sin;  // positions x head_dim / 2
};
RopeTable rope_table(const ModelConfig& c, int64_t positions);
// Rotates one head vector in place; bitwise equal to osd::rope.
void rope_apply(const RopeTable& t, float* v, int64_t pos);
// The transpose (inverse) rotation, which is the backward of rope_apply.
void rope_backward(const RopeTable& t, float* dv, int64_t pos);
// Rotates every head of every token of an [B*T x heads*head_dim] matrix (position n % T).
void rope_rows(const RopeTable& t, float* x, int64_t n, int64_t seq, int64_t heads, bool backward);

// ---- Causal attention with grouped-query heads ----

struct AttnShape {
  int32_t batch = 0, seq = 0;
  int32_t n_heads = 0, n_kv_heads = 0, head_dim = 0;
};
// q, out: [B*T x H*hd]; k, v: [B*T x KVH*hd]; probs: [B x H x T x T], row i holding the softmax
// over keys 0..i. Bitwise equal to the attention in Sequence::evaluate.
void attention_forward(const AttnShape& s, const float* q, const float* k, const float* v, float* probs, float* out);
// dq, dk, dv are overwritten.
void attention_backward(const AttnShape& s, const float* q, const float* k, const float* v, const float* probs,
                        const float* dout, float* dq, float* dk, float* dv);

// ---- SwiGLU ----

// h = silu(gate) * up (osd::swiglu); its backward writes dgate and dup.
void swiglu_backward(const float* gate, const float* up, const float* dh, int64_t n, float* dgate, float* dup);

// ---- LM head fused with the loss ----

// What the logits of each of n rows are scored against.
struct LossTargets {
  // Next-token cross-entropy when set: n ids, -1 = the row does not count.
  const int32_t* targets = nullptr;
  // Otherwise distillation: kind, temperature, beta, mask and the teacher (dense logits or
  // sparse top-k) of an n-row DistillInput; its student, rows and vocab fields are ignored.
  DistillInput distill;
  // A sparse teacher's entries per row (n counts, each <= distill.k; the rest of the row's k are
  // valid ids that are not scored), or null for k each. A restricted head's rows keep fewer.
  const int32_t* topk_count = nullptr;
};

// Checks n rows of targets or teacher against a vocabulary (RangeError naming the entry).
void validate_loss_targets(const LossTargets& t, int64_t n, int64_t vocab);

// Rows that count: targets >= 0 (cross-entropy) or mask set (distillation; all when no mask).
std::vector<int64_t> counted_rows(const LossTargets& t, int64_t n);

// Mean loss over the counted rows of logits = x W^T (x: n x dim, W: vocab x dim). Logits are
// made `chunk` counted rows at a time, turned into the loss gradient in place, and folded into
// dx (n x dim, overwritten; rows that do not count get 0) and dw (vocab x dim, accumulated), so
// only chunk x vocab logits exist at once. dx and dw may be null (loss only).
double head_loss(const float* x, int64_t n, const float* w, int64_t vocab, int64_t dim, const LossTargets& t,
                 int64_t chunk, float* dx, float* dw);

}  // namespace osd::train
