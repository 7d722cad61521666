// A sequence: one KV cache over a model, and the forward pass that fills it.
// evaluate() runs many tokens in one pass: a causal chain (a prefill, or a draft chain to verify)
// or a tree, where each token sees the cached prefix and its own ancestors only.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "model/model.h"

namespace osd {

// The KV cache's element type. F16 (the default, as llama.cpp's) halves the cache's memory and the
// bytes attention reads; keys and values are rounded to half once, when stored. F32 keeps them as
// computed (what the training forward computes, bit for bit).
enum class KvType { F32, F16 };
const char* kv_type_name(KvType t);

class Sequence;
struct EvalPart;

// The RoPE angles of n tokens at positions pos: cos and sin (n x head_dim / 2 each) of pos * freq_k,
// freq_k = theta^(-2k / head_dim) * freq_scale / rope_factors[k], computed in double and rounded
// once, as every pass (CPU or device) rotates with them.
void rope_angles(const ModelConfig& c, const int32_t* pos, int32_t n, float* cos_out, float* sin_out);

// A model pass on a device (the CUDA backend's: cuda/model_pass.h). It holds the weights there and
// each sequence's cache; Sequence checks every argument, keeps the lengths and calls it for the math.
// Its results may differ from the CPU engine's by rounding (the CUDA pass's reductions run in
// another order); model/mirror_pass.h's stand-in for tests gives the CPU's bits.
class DevicePass {
 public:
  struct Cache {
    virtual ~Cache() = default;
  };
  virtual ~DevicePass() = default;
  virtual std::string name() const = 0;  // e.g. "cuda: NVIDIA H100 80GB HBM3"
  // A pass of the same device for another model (its weights uploaded): weights given to a model by
  // setWeights, and copies of it, follow it there. Throws with the reason when that fails.
  virtual std::shared_ptr<DevicePass> for_model(const Model& other) const = 0;
  virtual std::unique_ptr<Cache> new_cache(int32_t capacity, KvType kv) = 0;
  // Sequence::evaluate_parts's math: caches[k] is parts[k].seq's cache, holding lengths[k] tokens.
  virtual void evaluate(const EvalPart* parts, Cache* const* caches, const int32_t* lengths, int32_t count) = 0;
  // Sequence::keep_path's copies (arguments already checked).
  virtual void keep_path(Cache& cache, int32_t base, const int32_t* path, int32_t k) = 0;
  // A copy of the first `length` slots of a cache.
  virtual std::unique_ptr<Cache> fork(const Cache& cache, int32_t length) = 0;
};

// One sequence's share of a batched pass (Sequence::evaluate_parts): evaluate()'s arguments.
struct EvalPart {
  Sequence* seq = nullptr;
  const int32_t* tokens = nullptr;
  int32_t n = 0;
  const int32_t* parents = nullptr;
  float* logits = nullptr;
  bool last_only = false;
};

class Sequence {
 public:
  // capacity 0 means the model's context length; the cache grows on demand up to it. The cache is on
  // the model's device pass when it has one (and stays there), else on the CPU.
  explicit Sequence(std::shared_ptr<const Model> model, int32_t capacity = 0, KvType kv = KvType::F16);

  const Model& model() const { return *model_; }
  int32_t length() const { return length_; }
  int32_t capacity() const { return capacity_; }
  KvType kv_type() const { return kv_; }

  // Evaluates n tokens placed after the current length; their KV entries take slots
  // [length, length + n) and length grows by n. parents == null means a causal chain; otherwise
  // parents[i] is -1 (attached to the prefix) or an earlier index in this batch, and token i sits
  // at position length + depth(i). logits receives n x vocab rows, or only the last row when
  // last_only is set (a prefill). Throws Range if the context would overflow or an id is invalid.
  void evaluate(const int32_t* tokens, int32_t n, const int32_t* parents, float* logits, bool last_only = false);

  // evaluate() for several sequences of one model in one pass: every matrix product runs over all
  // their tokens together, so the weights stream once for the batch; attention stays within each
  // sequence. Each part's logits are the bits its own evaluate() gives (the kernels are batch
  // invariant). Every part is checked before any cache changes; the sequences must be distinct.
  static void evaluate_parts(const EvalPart* parts, int32_t count);

  // Drops everything after the first n tokens.
  void truncate(int32_t n);

  // After a tree evaluation that started at `base`, keeps the nodes `path` (batch indices, each
  // the parent of the next) as the contiguous positions base, base + 1, ... and drops the rest.
  void keep_path(int32_t base, const int32_t* path, int32_t k);

  // A copy of this sequence (its cache included).
  std::unique_ptr<Sequence> fork() const;

 private:
  void reserve(int32_t slots);
  Sequence(std::shared_ptr<const Model> model, int32_t capacity, KvType kv, std::shared_ptr<DevicePass> pass);

  // Calls f with the cache in use (f32_ or f16_).
  template <class F>
  void with_cache(F&& f) {
    if (kv_ == KvType::F16) f(f16_);
    else f(f32_);
  }

  template <class T>
  struct Cache {
    std::vector<std::vector<T>> k, v;  // per layer: n_kv_heads x allocated_ x head_dim
  };

  std::shared_ptr<const Model> model_;
  KvType kv_;
  int32_t capacity_ = 0;
  int32_t allocated_ = 0;
  int32_t length_ = 0;
  Cache<float> f32_;
  Cache<uint16_t> f16_;  // IEEE half bits
  // The device pass this sequence was made on (its model's when it was made; null: the CPU engine),
  // and its cache there.
  std::shared_ptr<DevicePass> pass_;
  std::unique_ptr<DevicePass::Cache> device_;
};

}  // namespace osd
