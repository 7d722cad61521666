#include "model/mirror_pass.h"

#include <vector>

#include "core/error.h"
#include "model/model_io.h"

namespace osd {

namespace {

struct MirrorCache final : DevicePass::Cache {
  std::unique_ptr<Sequence> s;
};

// The cache's sequence at `length` tokens: Sequence::truncate moves only the owner's length.
Sequence& at_length(DevicePass::Cache& c, int32_t length) {
  Sequence& s = *static_cast<MirrorCache&>(c).s;
  if (s.length() > length) s.truncate(length);
  if (s.length() != length) throw_state("mirror pass: a cache holds fewer tokens than its sequence");
  return s;
}

}  // namespace

MirrorPass::MirrorPass(const Model& model) : shadow_(convert_model(model, std::nullopt)) {}

std::shared_ptr<DevicePass> MirrorPass::for_model(const Model& other) const { return std::make_shared<MirrorPass>(other); }

std::unique_ptr<DevicePass::Cache> MirrorPass::new_cache(int32_t capacity, KvType kv) {
  auto c = std::make_unique<MirrorCache>();
  c->s = std::make_unique<Sequence>(shadow_, capacity, kv);
  return c;
}

void MirrorPass::evaluate(const EvalPart* parts, Cache* const* caches, const int32_t* lengths, int32_t count) {
  ++calls_;
  std::vector<EvalPart> mine(parts, parts + count);
  for (int32_t k = 0; k < count; ++k) mine[k].seq = &at_length(*caches[k], lengths[k]);
  Sequence::evaluate_parts(mine.data(), count);
}

void MirrorPass::keep_path(Cache& cache, int32_t base, const int32_t* path, int32_t k) {
  ++calls_;
  static_cast<MirrorCache&>(cache).s->keep_path(base, path, k);
}

std::unique_ptr<DevicePass::Cache> MirrorPass::fork(const Cache& cache, int32_t length) {
  ++calls_;
  auto out = std::make_unique<MirrorCache>();
  out->s = static_cast<const MirrorCache&>(cache).s->fork();
  at_length(*out, length);
  return out;
}

}  // namespace osd
