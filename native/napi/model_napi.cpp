// Bindings for models and sequences. Loading and evaluation run on libuv's worker threads
// (AsyncWorker), so the event loop keeps turning; the engine's own pool does the math.
// A sequence runs one evaluation at a time; the TypeScript layer queues calls.
#include <napi.h>

#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/philox.h"
#include "model/draft.h"
#include "model/model.h"
#include "model/model_io.h"
#include "model/random_model.h"
#include "model/sequence.h"
#include "napi/napi_util.h"
#include "spec/sampling.h"

namespace osd::napi {

Napi::Value wrap_model(Napi::Env env, std::shared_ptr<Model> m);  // below

namespace {

struct Ctors {
  Napi::FunctionReference model;
  Napi::FunctionReference sequence;
};

// Rejects a deferred with the JS error class matching an engine error.
void reject_with(Napi::Env env, Napi::Promise::Deferred& d, ErrorKind kind, const std::string& msg) {
  Napi::Error e = kind == ErrorKind::Type    ? Napi::TypeError::New(env, msg)
                  : kind == ErrorKind::Range ? Napi::RangeError::New(env, msg)
                                             : Napi::Error::New(env, msg);
  if (kind == ErrorKind::Io) e.Set("code", Napi::String::New(env, "OSD_IO"));
  d.Reject(e.Value());
}

// An AsyncWorker that settles a promise and keeps the engine's error kind.
class PromiseWorker : public Napi::AsyncWorker {
 public:
  explicit PromiseWorker(Napi::Env env) : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)) {}
  Napi::Promise promise() { return deferred_.Promise(); }

 protected:
  void Execute() override {
    try {
      run();
    } catch (const Error& e) {
      kind_ = e.kind;
      SetError(e.what());
    } catch (const std::bad_alloc&) {
      kind_ = ErrorKind::Range;
      SetError("out of memory");
    } catch (const std::exception& e) {
      kind_ = ErrorKind::State;
      SetError(e.what());
    }
  }
  void OnError(const Napi::Error& e) override {
    reject_with(Env(), deferred_, kind_, e.Message());
  }
  virtual void run() = 0;
  Napi::Promise::Deferred deferred_;
  ErrorKind kind_ = ErrorKind::State;
};

class ModelWrap : public Napi::ObjectWrap<ModelWrap> {
 public:
  static Napi::Function define(Napi::Env env) {
    return DefineClass(env, "NativeModel",
                       {InstanceMethod("info", &ModelWrap::info), InstanceMethod("dispose", &ModelWrap::dispose),
                        InstanceMethod("setWeights", &ModelWrap::set_weights),
                        InstanceAccessor("disposed", &ModelWrap::disposed, nullptr)});
  }
  explicit ModelWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<ModelWrap>(info) {
    if (info.Length() < 1 || !info[0].IsExternal())
      throw Napi::TypeError::New(info.Env(), "NativeModel is created by loadModel()");
    model_ = *info[0].As<Napi::External<std::shared_ptr<Model>>>().Data();
  }
  std::shared_ptr<Model> get(Napi::Env env) const {
    if (!model_) throw Napi::Error::New(env, "the model was disposed");
    return model_;
  }

 private:
  Napi::Value info(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto m = get(env);
    const ModelConfig& c = m->config();
    Napi::Object o = Napi::Object::New(env);
    o.Set("path", m->path());
    o.Set("format", m->gguf() ? "gguf" : "llama2c");
    o.Set("architecture", c.arch);
    o.Set("vocabSize", c.vocab);
    o.Set("contextLength", c.context);
    o.Set("embeddingLength", c.dim);
    o.Set("layers", c.n_layers);
    o.Set("heads", c.n_heads);
    o.Set("kvHeads", c.n_kv_heads);
    o.Set("headDim", c.head_dim);
    o.Set("feedForwardLength", c.ffn_dim);
    o.Set("ropeTheta", c.rope_theta);
    o.Set("rmsEps", c.rms_eps);
    o.Set("tiedOutput", c.tied_output);
    o.Set("weightBytesPerToken", static_cast<double>(m->weight_bytes_per_token()));
    const auto mt = uniform_matrix_type(*m);
    o.Set("matrixType", mt ? gguf::type_info(*mt).name : "mixed");
    return o;
  }
  // setWeights(other): this model now answers with other's weights. Sequences created afterwards
  // use them; running sequences keep the weights they started with (no request sees a mix).
  Napi::Value set_weights(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto mine = get(env);
    if (info.Length() < 1 || !info[0].IsObject()) throw Napi::TypeError::New(env, "weights must be a NativeModel");
    auto other = ModelWrap::Unwrap(info[0].As<Napi::Object>())->get(env);
    const ModelConfig &a = mine->config(), &b = other->config();
    if (a.arch != b.arch || a.vocab != b.vocab || a.dim != b.dim || a.n_layers != b.n_layers || a.n_heads != b.n_heads ||
        a.n_kv_heads != b.n_kv_heads || a.ffn_dim != b.ffn_dim || a.head_dim != b.head_dim)
      throw Napi::RangeError::New(env, "weights have another shape than this model (architecture, vocabulary, sizes)");
    model_ = other;
    return env.Undefined();
  }

  Napi::Value dispose(const Napi::CallbackInfo& info) {
    model_.reset();  // running sequences hold their own reference
    return info.Env().Undefined();
  }
  Napi::Value disposed(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), !model_); }

  std::shared_ptr<Model> model_;
};

class LoadModelWorker : public PromiseWorker {
 public:
  LoadModelWorker(Napi::Env env, std::string path, Ctors* ctors) : PromiseWorker(env), path_(std::move(path)), ctors_(ctors) {}

 protected:
  void run() override { model_ = Model::load(path_); }
  void OnOK() override {
    Napi::Env env = Env();
    auto ext = Napi::External<std::shared_ptr<Model>>::New(env, new std::shared_ptr<Model>(model_),
                                                           [](Napi::Env, std::shared_ptr<Model>* p) { delete p; });
    deferred_.Resolve(ctors_->model.New({ext}));
  }

 private:
  std::string path_;
  Ctors* ctors_;
  std::shared_ptr<Model> model_;
};

class SequenceWrap : public Napi::ObjectWrap<SequenceWrap> {
 public:
  static Napi::Function define(Napi::Env env) {
    return DefineClass(env, "NativeSequence",
                       {InstanceMethod("evaluate", &SequenceWrap::evaluate),
                        InstanceMethod("draft", &SequenceWrap::draft),
                        InstanceMethod("cancel", &SequenceWrap::cancel),
                        InstanceMethod("truncate", &SequenceWrap::truncate),
                        InstanceMethod("keepPath", &SequenceWrap::keep_path),
                        InstanceMethod("fork", &SequenceWrap::fork),
                        InstanceMethod("dispose", &SequenceWrap::dispose),
                        InstanceAccessor("length", &SequenceWrap::length, nullptr),
                        InstanceAccessor("capacity", &SequenceWrap::capacity, nullptr)});
  }

  // new NativeSequence(model, capacity) or new NativeSequence(External<Sequence>) from fork().
  explicit SequenceWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<SequenceWrap>(info) {
    Napi::Env env = info.Env();
    if (info.Length() >= 1 && info[0].IsExternal()) {
      seq_.reset(info[0].As<Napi::External<Sequence>>().Data());
      return;
    }
    if (info.Length() < 1 || !info[0].IsObject()) throw Napi::TypeError::New(env, "model must be a NativeModel");
    ModelWrap* mw = ModelWrap::Unwrap(info[0].As<Napi::Object>());
    int32_t capacity = 0;
    if (info.Length() > 1 && info[1].IsNumber()) {
      double c = info[1].As<Napi::Number>().DoubleValue();
      if (c != std::floor(c) || c < 0 || c > 1e9) throw Napi::RangeError::New(env, "contextSize must be an integer in [0, 1000000000]");
      capacity = static_cast<int32_t>(c);
    }
    seq_ = std::make_shared<Sequence>(mw->get(env), capacity);
  }

 private:
  Sequence& get(Napi::Env env) {
    if (!seq_) throw Napi::Error::New(env, "the sequence was disposed");
    if (busy_->load()) throw Napi::Error::New(env, "the sequence is busy with another evaluation");
    return *seq_;
  }

  class EvalWorker : public PromiseWorker {
   public:
    EvalWorker(Napi::Env env, std::shared_ptr<Sequence> seq, std::shared_ptr<std::atomic<bool>> busy,
               std::vector<int32_t> tokens, std::vector<int32_t> parents, bool last_only, Napi::Float32Array out)
        : PromiseWorker(env), seq_(std::move(seq)), busy_(std::move(busy)), tokens_(std::move(tokens)),
          parents_(std::move(parents)), last_only_(last_only), out_ref_(Napi::Persistent(out)), out_(out.Data()) {}

   protected:
    void run() override {
      seq_->evaluate(tokens_.data(), static_cast<int32_t>(tokens_.size()), parents_.empty() ? nullptr : parents_.data(),
                     out_, last_only_);
    }
    void OnOK() override {
      busy_->store(false);
      deferred_.Resolve(out_ref_.Value());
    }
    void OnError(const Napi::Error& e) override {
      busy_->store(false);
      PromiseWorker::OnError(e);
    }

   private:
    std::shared_ptr<Sequence> seq_;
    std::shared_ptr<std::atomic<bool>> busy_;
    std::vector<int32_t> tokens_, parents_;
    bool last_only_;
    Napi::Reference<Napi::Float32Array> out_ref_;
    float* out_;
  };

  // evaluate(tokens: Int32Array, parents?: Int32Array | null, lastOnly?: boolean): Promise<Float32Array>
  Napi::Value evaluate(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Sequence& s = get(env);
    if (info.Length() < 1) throw Napi::TypeError::New(env, "tokens must be an Int32Array");
    auto toks = typed_array<int32_t>(env, info[0], "tokens");
    if (toks.length == 0) throw Napi::RangeError::New(env, "tokens must not be empty");
    std::vector<int32_t> parents;
    if (info.Length() > 1 && !info[1].IsUndefined() && !info[1].IsNull()) {
      auto p = typed_array<int32_t>(env, info[1], "treeParents");
      if (p.length != toks.length)
        throw Napi::RangeError::New(env, "treeParents has length " + std::to_string(p.length) + ", expected tokens.length = " +
                                             std::to_string(toks.length));
      parents.assign(p.data, p.data + p.length);
    }
    const bool last_only = info.Length() > 2 && info[2].ToBoolean();
    const int32_t V = s.model().config().vocab;
    const size_t rows = last_only ? 1 : toks.length;
    auto out = Napi::Float32Array::New(env, rows * V);
    busy_->store(true);
    auto* w = new EvalWorker(env, seq_, busy_, std::vector<int32_t>(toks.data, toks.data + toks.length),
                             std::move(parents), last_only, out);
    w->Queue();
    return w->promise();
  }

  class DraftWorker : public PromiseWorker {
   public:
    DraftWorker(Napi::Env env, std::shared_ptr<Sequence> seq, std::shared_ptr<std::atomic<bool>> busy,
                std::shared_ptr<std::atomic<bool>> cancel, std::vector<int32_t> tokens, std::vector<uint32_t> positions,
                DraftParams p, Napi::Int32Array out_tokens, Napi::Float32Array out_logits)
        : PromiseWorker(env), seq_(std::move(seq)), busy_(std::move(busy)), cancel_(std::move(cancel)),
          tokens_(std::move(tokens)), positions_(std::move(positions)), p_(p), tokens_ref_(Napi::Persistent(out_tokens)),
          logits_ref_(Napi::Persistent(out_logits)), out_tokens_(out_tokens.Data()), out_logits_(out_logits.Data()) {
      if (!positions_.empty()) p_.positions = positions_.data();
    }

   protected:
    void run() override {
      if (!draft_chain(*seq_, tokens_.data(), static_cast<int32_t>(tokens_.size()), p_, out_tokens_, out_logits_,
                       cancel_.get()))
        throw Error(ErrorKind::State, "OSD_ABORTED");
    }
    void OnOK() override {
      busy_->store(false);
      Napi::Object r = Napi::Object::New(Env());
      r.Set("tokens", tokens_ref_.Value());
      r.Set("logits", logits_ref_.Value());
      deferred_.Resolve(r);
    }
    void OnError(const Napi::Error& e) override {
      busy_->store(false);
      if (e.Message() != "OSD_ABORTED") return PromiseWorker::OnError(e);
      Napi::Error a = Napi::Error::New(Env(), "The operation was aborted");
      a.Set("name", Napi::String::New(Env(), "AbortError"));
      a.Set("code", Napi::String::New(Env(), "OSD_ABORTED"));
      deferred_.Reject(a.Value());
    }

   private:
    std::shared_ptr<Sequence> seq_;
    std::shared_ptr<std::atomic<bool>> busy_, cancel_;
    std::vector<int32_t> tokens_;
    std::vector<uint32_t> positions_;
    DraftParams p_;
    Napi::Reference<Napi::Int32Array> tokens_ref_;
    Napi::Reference<Napi::Float32Array> logits_ref_;
    int32_t* out_tokens_;
    float* out_logits_;
  };

  // draft(tokens: Int32Array, { count, vocabSize?, sampling, seed?, stream?, position?, positions? }):
  // Promise<{ tokens: Int32Array, logits: Float32Array }>; see draft_chain.
  Napi::Value draft(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
      Sequence& s = get(env);
      if (info.Length() < 1) throw Napi::TypeError::New(env, "tokens must be an Int32Array");
      auto toks = typed_array<int32_t>(env, info[0], "tokens");
      Napi::Object o = require_object(info, 1, "options");
      const int32_t vm = s.model().config().vocab;
      DraftParams p;
      p.count = static_cast<int32_t>(get_int(o, "count", 1, s.capacity()));
      p.vocab = static_cast<int32_t>(get_int_or(o, "vocabSize", 1, vm, vm));
      p.sampling = parse_sampling(o.Env(), get_prop(o, "sampling"), "sampling");
      p.seed = has(o, "seed") ? get_seed(o, "seed") : 0;
      p.stream = has(o, "stream") ? get_seed(o, "stream") : 0;
      p.position = static_cast<uint32_t>(get_int_or(o, "position", 0, UINT32_MAX, 0));
      std::vector<uint32_t> positions;
      if (has(o, "positions")) {
        auto ps = get_array<int32_t>(o, "positions");
        if (ps.length != static_cast<size_t>(p.count))
          throw Napi::RangeError::New(env, "positions has length " + std::to_string(ps.length) + ", expected count = " +
                                               std::to_string(p.count));
        for (size_t i = 0; i < ps.length; ++i) {
          if (ps.data[i] < 0)
            throw Napi::RangeError::New(env, "positions[" + std::to_string(i) + "] must be >= 0, got " + std::to_string(ps.data[i]));
          positions.push_back(static_cast<uint32_t>(ps.data[i]));
        }
      }
      for (size_t i = 0; i < toks.length; ++i)
        if (toks.data[i] < 0 || toks.data[i] >= vm)
          throw Napi::RangeError::New(env, "tokens[" + std::to_string(i) + "] = " + std::to_string(toks.data[i]) +
                                               " is out of range for a vocabulary of " + std::to_string(vm));
      // The context check is draft_chain's, at run time (after the drafts queued before this one).
      auto out_tokens = Napi::Int32Array::New(env, p.count);
      auto out_logits = Napi::Float32Array::New(env, static_cast<size_t>(p.count) * p.vocab);
      cancel_ = std::make_shared<std::atomic<bool>>(false);
      busy_->store(true);
      auto* w = new DraftWorker(env, seq_, busy_, cancel_, std::vector<int32_t>(toks.data, toks.data + toks.length),
                                std::move(positions), p, out_tokens, out_logits);
      w->Queue();
      return w->promise();
    });
  }

  // cancel(): the running draft stops before its next pass and rejects with an AbortError.
  Napi::Value cancel(const Napi::CallbackInfo& info) {
    if (cancel_) cancel_->store(true);
    return info.Env().Undefined();
  }

  Napi::Value truncate(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Sequence& s = get(env);
    if (info.Length() < 1 || !info[0].IsNumber()) throw Napi::TypeError::New(env, "length must be a number");
    double n = info[0].As<Napi::Number>().DoubleValue();
    if (n != std::floor(n) || n < 0 || n > s.length())
      throw Napi::RangeError::New(env, "length must be an integer in [0, " + std::to_string(s.length()) + "]");
    s.truncate(static_cast<int32_t>(n));
    return env.Undefined();
  }

  Napi::Value keep_path(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Sequence& s = get(env);
    if (info.Length() < 2 || !info[0].IsNumber()) throw Napi::TypeError::New(env, "keepPath(base, path)");
    double base = info[0].As<Napi::Number>().DoubleValue();
    if (base != std::floor(base) || base < 0 || base > s.length())
      throw Napi::RangeError::New(env, "base must be an integer in [0, " + std::to_string(s.length()) + "]");
    auto path = typed_array<int32_t>(env, info[1], "path");
    guarded(env, [&] { s.keep_path(static_cast<int32_t>(base), path.data, static_cast<int32_t>(path.length)); });
    return env.Undefined();
  }

  Napi::Value fork(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Sequence& s = get(env);
    Sequence* copy = s.fork().release();
    auto ext = Napi::External<Sequence>::New(env, copy);
    auto* ctors = env.GetInstanceData<Ctors>();
    return ctors->sequence.New({ext});
  }

  Napi::Value dispose(const Napi::CallbackInfo& info) {
    seq_.reset();  // a running evaluation keeps its own reference until it ends
    return info.Env().Undefined();
  }
  Napi::Value length(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), seq_ ? seq_->length() : 0);
  }
  Napi::Value capacity(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), seq_ ? seq_->capacity() : 0);
  }

  std::shared_ptr<Sequence> seq_;
  std::shared_ptr<std::atomic<bool>> busy_ = std::make_shared<std::atomic<bool>>(false);
  std::shared_ptr<std::atomic<bool>> cancel_;  // the latest draft's stop flag
};

Napi::Value load_model(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString()) throw Napi::TypeError::New(env, "path must be a string");
  auto* w = new LoadModelWorker(env, info[0].As<Napi::String>(), env.GetInstanceData<Ctors>());
  w->Queue();
  return w->promise();
}

// sampleLogits({ logits, vocabSize, sampling, seed, stream?, position, exclude? }): one token from
// one row, with the kernels' warping and the Philox draw at (position, sample lane). `exclude`
// (Int32Array) samples the warped row with those tokens removed and renormalised, as verifyTree's
// 'sampled-without-replacement' mode removes a node's earlier children; -1 when no mass is left.
Napi::Value sample_logits(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    Napi::Object o = require_object(info, 0, "options");
    const int32_t V = static_cast<int32_t>(get_int(o, "vocabSize", 1, 1 << 30));
    auto logits = get_array<float>(o, "logits");
    if (logits.length != static_cast<size_t>(V))
      throw Napi::RangeError::New(env, "logits has length " + std::to_string(logits.length) + ", expected vocabSize = " +
                                           std::to_string(V));
    const Sampling s = parse_sampling(o.Env(), get_prop(o, "sampling"), "sampling");
    if (!has(o, "exclude")) {
      // The draft loop (Sequence.draft) draws through the same function. A greedy draw does not use
      // seed and stream, but a bad one is still an error (not silently ignored).
      const uint64_t seed = s.greedy() && !has(o, "seed") ? 0 : get_seed(o, "seed");
      const uint64_t stream = has(o, "stream") ? get_seed(o, "stream") : 0;
      if (s.greedy()) return Napi::Number::New(env, sample_token(logits.data, V, s, 0, 0, 0));
      const uint32_t position = static_cast<uint32_t>(get_int(o, "position", 0, UINT32_MAX));
      return Napi::Number::New(env, sample_token(logits.data, V, s, seed, stream, position));
    }
    const float mx = checked_row_max(logits.data, V, "logits", 0);
    if (s.greedy()) throw Napi::TypeError::New(env, "exclude needs temperature > 0 (a greedy draw has one candidate)");
    const uint64_t seed = get_seed(o, "seed");
    const uint64_t stream = has(o, "stream") ? get_seed(o, "stream") : 0;
    const uint32_t position = static_cast<uint32_t>(get_int(o, "position", 0, UINT32_MAX));
    WarpedRow w;
    warp_row(logits.data, V, mx, s, w);
    const double u = philox_uniform(seed, stream, position, kLaneSample);
    auto ex = get_array<int32_t>(o, "exclude");
    std::vector<float> q(V);
    w.to_dense(q.data());
    for (size_t i = 0; i < ex.length; ++i) {
      const int32_t t = ex.data[i];
      if (t < 0 || t >= V)
        throw Napi::RangeError::New(env, "exclude[" + std::to_string(i) + "] = " + std::to_string(t) +
                                             " is out of range for vocabSize " + std::to_string(V));
      q[t] = 0.0f;
    }
    double total = 0.0;
    for (int32_t j = 0; j < V; ++j) total += q[j];
    return Napi::Number::New(env, total > 0.0 ? sample_weights(q.data(), V, total, u) : -1);
  });
}

gguf::TensorType parse_store_type(Napi::Env env, const Napi::Object& o) {
  std::string t = has(o, "type") ? o.Get("type").ToString().Utf8Value() : "F32";
  for (gguf::TensorType c : {gguf::TensorType::F32, gguf::TensorType::F16, gguf::TensorType::BF16, gguf::TensorType::Q8_0,
                             gguf::TensorType::Q5_0, gguf::TensorType::Q5_1, gguf::TensorType::Q4_0, gguf::TensorType::Q4_1})
    if (t == gguf::type_info(c).name) return c;
  throw Napi::RangeError::New(env, "type must be 'F32', 'F16', 'BF16', 'Q8_0', 'Q5_0', 'Q5_1', 'Q4_0' or 'Q4_1', got '" + t + "'");
}

// As parse_store_type, and 'keep' (nothing): every matrix in the type it has.
std::optional<gguf::TensorType> parse_store_type_or_keep(Napi::Env env, const Napi::Object& o) {
  if (has(o, "type") && o.Get("type").IsString() && o.Get("type").As<Napi::String>().Utf8Value() == "keep") return std::nullopt;
  return parse_store_type(env, o);
}

class WriteRandomWorker : public PromiseWorker {
 public:
  WriteRandomWorker(Napi::Env env, std::string path, ModelConfig c, uint64_t seed, gguf::TensorType type)
      : PromiseWorker(env), path_(std::move(path)), c_(c), seed_(seed), type_(type) {}

 protected:
  void run() override { write_random_gguf(path_, c_, seed_, type_); }
  void OnOK() override { deferred_.Resolve(Env().Undefined()); }

 private:
  std::string path_;
  ModelConfig c_;
  uint64_t seed_;
  gguf::TensorType type_;
};

// writeRandomModel(path, { vocabSize, embeddingLength, layers, heads, kvHeads?, feedForwardLength,
//                          contextLength, ropeTheta?, type?, seed? }): Promise<void>
Napi::Value write_random_model(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    if (info.Length() < 1 || !info[0].IsString()) throw Napi::TypeError::New(env, "path must be a string");
    Napi::Object o = require_object(info, 1, "config");
    ModelConfig c;
    c.vocab = static_cast<int32_t>(get_int(o, "vocabSize", 1, 1 << 24));
    c.dim = static_cast<int32_t>(get_int(o, "embeddingLength", 1, 1 << 16));
    c.n_layers = static_cast<int32_t>(get_int(o, "layers", 1, 1024));
    c.n_heads = static_cast<int32_t>(get_int(o, "heads", 1, 1024));
    c.n_kv_heads = static_cast<int32_t>(get_int_or(o, "kvHeads", 1, 1024, c.n_heads));
    c.ffn_dim = static_cast<int32_t>(get_int(o, "feedForwardLength", 1, 1 << 18));
    c.context = static_cast<int32_t>(get_int(o, "contextLength", 1, 1 << 20));
    c.rope_theta = get_rope_theta(o);
    const uint64_t seed = has(o, "seed") ? get_seed(o, "seed") : 0;
    auto* w = new WriteRandomWorker(env, info[0].As<Napi::String>(), c, seed, parse_store_type(env, o));
    w->Queue();
    return w->promise();
  });
}

class SaveModelWorker : public PromiseWorker {
 public:
  SaveModelWorker(Napi::Env env, std::shared_ptr<Model> m, std::string path, std::optional<gguf::TensorType> type)
      : PromiseWorker(env), m_(std::move(m)), path_(std::move(path)), type_(type) {}

 protected:
  void run() override { save_gguf(*m_, path_, type_); }
  void OnOK() override { deferred_.Resolve(Env().Undefined()); }

 private:
  std::shared_ptr<Model> m_;
  std::string path_;
  std::optional<gguf::TensorType> type_;
};

class ConvertModelWorker : public PromiseWorker {
 public:
  ConvertModelWorker(Napi::Env env, std::shared_ptr<Model> m, std::optional<gguf::TensorType> type)
      : PromiseWorker(env), m_(std::move(m)), type_(type) {}

 protected:
  void run() override { out_ = convert_model(*m_, type_); }
  void OnOK() override { deferred_.Resolve(wrap_model(Env(), out_)); }

 private:
  std::shared_ptr<Model> m_, out_;
  std::optional<gguf::TensorType> type_;
};

// convertModel(model, { type }): the model with its matrices stored as `type`, in memory.
Napi::Value convert_model_js(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    if (info.Length() < 2 || !info[0].IsObject() || !info[1].IsObject())
      throw Napi::TypeError::New(env, "convertModel(model, { type })");
    ModelWrap* mw = ModelWrap::Unwrap(info[0].As<Napi::Object>());
    auto* w = new ConvertModelWorker(env, mw->get(env), parse_store_type_or_keep(env, info[1].As<Napi::Object>()));
    w->Queue();
    return w->promise();
  });
}

// saveModel(model, path, { type? }): writes the model as GGUF (atomically).
Napi::Value save_model(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    if (info.Length() < 2 || !info[0].IsObject() || !info[1].IsString())
      throw Napi::TypeError::New(env, "saveModel(model, path, options?)");
    ModelWrap* mw = ModelWrap::Unwrap(info[0].As<Napi::Object>());
    Napi::Object o = info.Length() > 2 && info[2].IsObject() ? info[2].As<Napi::Object>() : Napi::Object::New(env);
    auto* w = new SaveModelWorker(env, mw->get(env), info[1].As<Napi::String>(), parse_store_type_or_keep(env, o));
    w->Queue();
    return w->promise();
  });
}

void init(Napi::Env env, Napi::Object exports) {
  exports.Set("writeRandomModel", Napi::Function::New(env, write_random_model, "writeRandomModel"));
  exports.Set("saveModel", Napi::Function::New(env, save_model, "saveModel"));
  exports.Set("convertModel", Napi::Function::New(env, convert_model_js, "convertModel"));
  auto* ctors = new Ctors();
  Napi::Function model = ModelWrap::define(env);
  Napi::Function sequence = SequenceWrap::define(env);
  ctors->model = Napi::Persistent(model);
  ctors->sequence = Napi::Persistent(sequence);
  // The tokenizer binding may also set instance data; keep ours reachable through this object.
  env.SetInstanceData<Ctors>(ctors);
  exports.Set("NativeModel", model);
  exports.Set("NativeSequence", sequence);
  exports.Set("loadModel", Napi::Function::New(env, load_model, "loadModel"));
  exports.Set("sampleLogits", Napi::Function::New(env, sample_logits, "sampleLogits"));
}

ExportRegistrar reg(init);

}  // namespace

Napi::Value wrap_model(Napi::Env env, std::shared_ptr<Model> m) {
  auto ext = Napi::External<std::shared_ptr<Model>>::New(env, new std::shared_ptr<Model>(std::move(m)),
                                                         [](Napi::Env, std::shared_ptr<Model>* p) { delete p; });
  return env.GetInstanceData<Ctors>()->model.New({ext});
}

std::shared_ptr<Model> unwrap_model(Napi::Env env, const Napi::Value& v, const char* name) {
  auto* ctors = env.GetInstanceData<Ctors>();
  if (!v.IsObject() || !v.As<Napi::Object>().InstanceOf(ctors->model.Value()))
    throw Napi::TypeError::New(env, std::string(name) + " must be a loaded model");
  return ModelWrap::Unwrap(v.As<Napi::Object>())->get(env);
}

}  // namespace osd::napi
