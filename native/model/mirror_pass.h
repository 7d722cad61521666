// A DevicePass that runs on the CPU: each cache is a Sequence over a private copy of the model's
// weights, so every result is the CPU engine's, bit for bit. It exists for tests: machines without a
// GPU run the engine's and the JavaScript layer's device plumbing through it (loadModel's device,
// setWeights and convert following the model's device), with the CPU's answers to check against.
// The addon accepts device 'mirror' only when OSD_TEST_MIRROR_DEVICE=1.
#pragma once
#include <atomic>
#include <memory>

#include "model/model.h"
#include "model/sequence.h"

namespace osd {

class MirrorPass final : public DevicePass {
 public:
  explicit MirrorPass(const Model& model);
  std::string name() const override { return "mirror"; }
  std::shared_ptr<DevicePass> for_model(const Model& other) const override;
  std::unique_ptr<Cache> new_cache(int32_t capacity, KvType kv) override;
  void evaluate(const EvalPart* parts, Cache* const* caches, const int32_t* lengths, int32_t count) override;
  void keep_path(Cache& cache, int32_t base, const int32_t* path, int32_t k) override;
  std::unique_ptr<Cache> fork(const Cache& cache, int32_t length) override;

  // Calls of evaluate, keep_path and fork so far (tests check that bad arguments never reach a pass).
  int calls() const { return calls_; }

 private:
  std::shared_ptr<Model> shadow_;
  std::atomic<int> calls_{0};
};

}  // namespace osd
