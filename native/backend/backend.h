// The backend contract: every op the engine exposes, with one CPU reference implementation and,
// where it pays, a CUDA implementation with the same signature and the same semantics (down to the
// Philox draws). Pointers are host pointers; a device backend stages them itself.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "distill/adamw.h"
#include "distill/losses.h"
#include "spec/verify.h"

namespace osd {

// B chains, each with its own length g_b, packed back to back.
struct ChainBatch {
  const float* target = nullptr;    // sum_b (g_b + 1) rows x V
  const float* draft = nullptr;     // sum_b g_b rows x V (null when every sequence is greedy)
  const int32_t* tokens = nullptr;  // sum_b g_b
  const int32_t* lengths = nullptr;  // B values g_b >= 0
  const uint64_t* streams = nullptr;  // B Philox streams
  const Sampling* sampling = nullptr;  // B sampling settings
  int32_t batch = 0;
  int32_t vocab = 0;
  uint64_t seed = 0;
};

// Sequence b writes its tokens at out_tokens[sum_{b' < b} (g_b' + 1)], and its counts to accepted[b].
struct ChainBatchOut {
  int32_t* accepted = nullptr;  // B
  int32_t* tokens = nullptr;    // sum_b (g_b + 1)
};

// Checks lengths, tokens and sampling of a chain batch (RangeError naming the argument).
void validate_chain_batch(const ChainBatch& in);

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;

  virtual void verify_chain_batch(const ChainBatch& in, ChainBatchOut& out, Fault fault = Fault::None) = 0;
  virtual TreeResult verify_tree(const TreeInput& in, const Sampling& s, TreeChildren mode, uint64_t seed,
                                 uint64_t stream, int32_t* path, int32_t* out, Fault fault = Fault::None) = 0;
  // Mean loss over counted rows; grad (rows x V, may be null) is the gradient of that mean.
  virtual double distill_loss(const DistillInput& in, float* grad) = 0;
  virtual void adamw_step(float* params, const float* grads, float* m, float* v, size_t n,
                          const AdamWConfig& c) = 0;
  virtual double global_norm(const float* x, size_t n) = 0;
};

Backend& cpu_backend();

}  // namespace osd
