// Forward with stored activations and the full backward pass of the llama decoder, over a batch
// of B causal sequences of T tokens. The forward computes exactly the function of the inference
// pass (Sequence::evaluate): the logits are bitwise equal for the same weights.
#pragma once
#include <cstdint>
#include <vector>

#include "train/params.h"
#include "train/train_ops.h"

namespace osd::train {

// B sequences x T tokens, row-major; every sequence starts at position 0.
struct Batch {
  int32_t batch = 0;
  int32_t seq_len = 0;
  const int32_t* tokens = nullptr;  // B*T input ids
  // The loss on the B*T output positions: next-token cross-entropy (loss.targets, -1 = skip)
  // or distillation (loss.distill: teacher logits B*T x vocab, or a top-k teacher; mask).
  LossTargets loss;
};

// Checks shapes and ids (RangeError naming the argument).
void validate_batch(const ModelConfig& c, const Batch& b);

// Activations kept by forward() for backward(), plus backward's scratch; reused across calls.
struct Activations {
  struct Layer {
    std::vector<float> x;             // N x D, the layer's input (residual stream)
    std::vector<float> xn1, rstd1;    // attention norm output and 1/rms
    std::vector<float> q, k, v;       // after bias (and qwen3's head norms) and RoPE
    std::vector<float> q_pre, k_pre;  // qwen3: before the head norms (else empty)
    std::vector<float> rstd_q, rstd_k;  // qwen3: 1/rms per token and head
    std::vector<float> probs;         // B x H x T x T softmax
    std::vector<float> att;           // N x QD attention output
    std::vector<float> x2;            // N x D, residual after attention
    std::vector<float> xn2, rstd2;    // FFN norm output and 1/rms
    std::vector<float> gate, up, h;   // N x F
  };
  int32_t batch = 0, seq_len = 0;
  ModelConfig config;  // the shapes the buffers were sized for
  std::vector<Layer> layers;
  std::vector<float> x_final, xn_final, rstd_final;
  RopeTable rope;
  // Backward scratch.
  std::vector<float> dx, dxn, dq, dk, dv, datt, dgate, dup, dh, dq_pre, dk_pre;

  void resize(const ModelConfig& c, int32_t batch, int32_t seq_len);
};

struct ForwardOptions {
  int64_t head_chunk = 64;  // rows of logits made at once by the fused LM head + loss
};

// Forward over the batch; returns the mean loss over counted positions. Keeps what backward needs.
double forward(const Params& p, const Batch& b, Activations& a, const ForwardOptions& o = {});

// Forward then backward: grads (same layout as p, p.size() floats) receives d loss / d params
// (overwritten). Returns the loss.
double forward_backward(const Params& p, const Batch& b, Activations& a, float* grads, const ForwardOptions& o = {});

// Logits of every position (B*T x vocab), for tests and evaluation of small batches.
void forward_logits(const Params& p, const int32_t* tokens, int32_t batch, int32_t seq_len, float* logits);

}  // namespace osd::train
