// Bindings for models and sequences. Loading and evaluation run on libuv's worker threads
// (AsyncWorker), so the event loop keeps turning; the engine's own pool does the math.
// A sequence runs one evaluation at a time; the TypeScript layer queues calls.
#include <napi.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/philox.h"
#include "model/chain_step.h"
#include "model/draft.h"
#include "model/mirror_pass.h"
#include "model/model.h"
#include "model/model_io.h"
#include "model/quant.h"
#include "model/random_model.h"
#include "model/sequence.h"
#include "napi/napi_util.h"
#include "spec/sampling.h"

#ifdef OSD_WITH_CUDA
#include "model_pass.h"
#endif

namespace osd::napi {

Napi::Value wrap_model(Napi::Env env, std::shared_ptr<Model> m);  // below

namespace {

struct Ctors {
  Napi::FunctionReference model;
  Napi::FunctionReference sequence;
};

// Type tags (napi_util.h): of NativeModel and NativeSequence instances, and of the externals their
// constructors take (only this file makes those: a foreign external is a TypeError, not a pointer).
constexpr napi_type_tag kModelTag = {0x6d6f64656c777261ULL, 0x70a1b2c3d4e5f601ULL};
constexpr napi_type_tag kModelHandleTag = {0x6d6f64656c68616eULL, 0x646c65a1b2c3d402ULL};
constexpr napi_type_tag kSequenceTag = {0x73657175656e6365ULL, 0x77726170a1b2c303ULL};
constexpr napi_type_tag kSequenceHandleTag = {0x73657168616e646cULL, 0x65a1b2c3d4e5f604ULL};

// An external holding a model (shared) for NativeModel's constructor.
Napi::External<std::shared_ptr<Model>> model_handle(Napi::Env env, std::shared_ptr<Model> m) {
  auto ext = Napi::External<std::shared_ptr<Model>>::New(env, new std::shared_ptr<Model>(std::move(m)),
                                                         [](Napi::Env, std::shared_ptr<Model>* p) { delete p; });
  tag_object(env, ext, kModelHandleTag);
  return ext;
}

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

// Whether the test-only 'mirror' device (model/mirror_pass.h) may be asked for.
bool mirror_device_allowed() {
  const char* e = std::getenv("OSD_TEST_MIRROR_DEVICE");
  return e && std::string(e) == "1";
}

// Moves a model's passes to `device` ("cpu": nothing to do; "cuda": its weights are uploaded;
// "mirror": the CPU-side stand-in the tests use).
void place_model(Model& model, const std::string& device) {
  if (device == "mirror") return model.set_device_pass(std::make_shared<MirrorPass>(model));
  if (device != "cuda") return;
#ifdef OSD_WITH_CUDA
  std::string why;
  auto pass = cuda_model_pass(model, &why);
  if (!pass) throw_state("device 'cuda' is not usable here: " + why);
  model.set_device_pass(std::move(pass));
#else
  throw_state(
      "device 'cuda' needs the CUDA build of the addon, and this one is CPU-only (npm run build:cuda builds it; see "
      "backends())");
#endif
}

class ModelWrap : public Napi::ObjectWrap<ModelWrap> {
 public:
  static Napi::Function define(Napi::Env env) {
    Napi::Function ctor = DefineClass(env, "NativeModel",
                                      {InstanceMethod("info", &ModelWrap::info), InstanceMethod("dispose", &ModelWrap::dispose),
                                       InstanceMethod("setWeights", &ModelWrap::set_weights),
                                       InstanceMethod("embeddingRows", &ModelWrap::embedding_rows),
                                       InstanceMethod("headTokenIds", &ModelWrap::head_token_ids)});
    ctor.Get("prototype").As<Napi::Object>().DefineProperties(
        {Napi::PropertyDescriptor::Accessor<checked_getter<ModelWrap, &ModelWrap::disposed>>("disposed")});
    return ctor;
  }
  explicit ModelWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<ModelWrap>(info) {
    if (info.Length() < 1 || !tagged(info.Env(), info[0], kModelHandleTag) || !info[0].IsExternal())
      throw Napi::TypeError::New(info.Env(), "NativeModel is created by loadModel()");
    model_ = *info[0].As<Napi::External<std::shared_ptr<Model>>>().Data();
    tag_object(info.Env(), info.This(), kModelTag);
  }
  std::shared_ptr<Model> get(Napi::Env env) const {
    if (!model_) throw Napi::Error::New(env, "the model was disposed");
    return model_;
  }
  // The NativeModel behind v (checked by its type tag, not by its prototype), or a TypeError.
  static ModelWrap* from(Napi::Env env, const Napi::Value& v, const std::string& message) {
    return unwrap_tagged<ModelWrap>(env, v, kModelTag, message);
  }
  static ModelWrap* self(const Napi::CallbackInfo& info) { return checked_this<ModelWrap>(info, kModelTag); }

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
    o.Set("headTokens", c.head_tokens.empty() ? c.vocab : static_cast<int32_t>(c.head_tokens.size()));
    o.Set("weightBytesPerToken", static_cast<double>(m->weight_bytes_per_token()));
    const auto mt = uniform_matrix_type(*m);
    o.Set("matrixType", mt ? gguf::type_info(*mt).name : "mixed");
    o.Set("device", m->device_pass() ? m->device_pass()->name() : std::string("cpu"));
    return o;
  }
  // setWeights(other): this model now answers with other's weights. Sequences created afterwards
  // use them; running sequences keep the weights they started with (no request sees a mix).
  Napi::Value set_weights(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto mine = get(env);
    auto other = ModelWrap::from(env, info.Length() < 1 ? env.Undefined() : info[0], "weights must be a NativeModel")->get(env);
    const ModelConfig &a = mine->config(), &b = other->config();
    if (a.arch != b.arch || a.vocab != b.vocab || a.dim != b.dim || a.n_layers != b.n_layers || a.n_heads != b.n_heads ||
        a.n_kv_heads != b.n_kv_heads || a.ffn_dim != b.ffn_dim || a.head_dim != b.head_dim)
      throw Napi::RangeError::New(env, "weights have another shape than this model (architecture, vocabulary, sizes)");
    // The settings model.info reports (and sequences use) come with the weights: they must agree.
    if (a.context != b.context || a.rope_theta != b.rope_theta || a.rope_freq_scale != b.rope_freq_scale ||
        a.rope_neox != b.rope_neox || a.rope_factors != b.rope_factors || a.rms_eps != b.rms_eps || a.tied_output != b.tied_output)
      throw Napi::RangeError::New(env, "weights have other settings than this model (context length, RoPE, RMS epsilon or tied output)");
    if (a.head_tokens != b.head_tokens)
      throw Napi::RangeError::New(env, "weights have another head than this model (the ids of osd.head_tokens differ)");
    // Weights given to a model on a device go there too (a trainer's snapshot is made on the CPU): a
    // copy of them does, so that the given model, and any sequence it is running, stays where it is.
    if (mine->device_pass() && !other->device_pass()) {
      try {
        std::shared_ptr<Model> copy = convert_model(*other, std::nullopt);
        copy->set_device_pass(mine->device_pass()->for_model(*copy));
        other = std::move(copy);
      } catch (const std::exception& e) {
        throw Napi::Error::New(env, std::string("setWeights: ") + e.what());
      }
    }
    model_ = other;
    return env.Undefined();
  }

  // embeddingRows(start, count): token embedding rows [start, start + count) as float32 (count x
  // dim), dequantised by the engine's own row reader, whatever the stored type.
  Napi::Value embedding_rows(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto m = get(env);
    const int64_t vocab = m->config().vocab, dim = m->config().dim;
    const int64_t start = int_value(env, info.Length() > 0 ? info[0] : env.Undefined(), "start", 0, vocab, "");
    const int64_t count = int_value(env, info.Length() > 1 ? info[1] : env.Undefined(), "count", 0, vocab - start, "");
    // One call's result stays a plain typed array: at most 2^28 floats (1 GiB).
    if (count * dim > (int64_t{1} << 28)) throw Napi::RangeError::New(env, "count x embeddingLength must be at most 2^28: ask for fewer rows");
    Napi::Float32Array out = Napi::Float32Array::New(env, static_cast<size_t>(count * dim));
    for (int64_t r = 0; r < count; r++) dequantize_row(m->token_embd, start + r, out.Data() + r * dim);
    return out;
  }

  // headTokenIds(): a copy of osd.head_tokens, or null when the head covers the vocabulary.
  Napi::Value head_token_ids(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const std::vector<int32_t>& ids = get(env)->config().head_tokens;
    if (ids.empty()) return env.Null();
    Napi::Int32Array out = Napi::Int32Array::New(env, ids.size());
    std::copy(ids.begin(), ids.end(), out.Data());
    return out;
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
  LoadModelWorker(Napi::Env env, std::string path, std::string device, Ctors* ctors)
      : PromiseWorker(env), path_(std::move(path)), device_(std::move(device)), ctors_(ctors) {}

 protected:
  void run() override {
    model_ = Model::load(path_);
    place_model(*model_, device_);
  }
  void OnOK() override {
    Napi::Env env = Env();
    deferred_.Resolve(ctors_->model.New({model_handle(env, model_)}));
  }

 private:
  std::string path_, device_;
  Ctors* ctors_;
  std::shared_ptr<Model> model_;
};

class SequenceWrap : public Napi::ObjectWrap<SequenceWrap> {
 public:
  static Napi::Function define(Napi::Env env) {
    Napi::Function ctor = DefineClass(env, "NativeSequence",
                                      {InstanceMethod("evaluate", &SequenceWrap::evaluate),
                                       InstanceMethod("draft", &SequenceWrap::draft),
                                       InstanceMethod("chainStep", &SequenceWrap::chain_step),
                                       InstanceMethod("chainRun", &SequenceWrap::chain_run),
                                       InstanceMethod("cancel", &SequenceWrap::cancel),
                                       InstanceMethod("truncate", &SequenceWrap::truncate),
                                       InstanceMethod("keepPath", &SequenceWrap::keep_path),
                                       InstanceMethod("fork", &SequenceWrap::fork),
                                       InstanceMethod("dispose", &SequenceWrap::dispose)});
    ctor.Get("prototype").As<Napi::Object>().DefineProperties(
        {Napi::PropertyDescriptor::Accessor<checked_getter<SequenceWrap, &SequenceWrap::length>>("length"),
         Napi::PropertyDescriptor::Accessor<checked_getter<SequenceWrap, &SequenceWrap::capacity>>("capacity"),
         Napi::PropertyDescriptor::Accessor<checked_getter<SequenceWrap, &SequenceWrap::kv_type>>("kvType")});
    return ctor;
  }
  static SequenceWrap* self(const Napi::CallbackInfo& info) { return checked_this<SequenceWrap>(info, kSequenceTag); }

  // new NativeSequence(model, capacity) or new NativeSequence(External<Sequence>) from fork().
  explicit SequenceWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<SequenceWrap>(info) {
    Napi::Env env = info.Env();
    if (info.Length() >= 1 && info[0].IsExternal()) {
      if (!has_tag(env, info[0], kSequenceHandleTag))
        throw Napi::TypeError::New(env, "model must be a NativeModel");
      seq_ = std::move(*info[0].As<Napi::External<std::shared_ptr<Sequence>>>().Data());
      tag_object(env, info.This(), kSequenceTag);
      return;
    }
    ModelWrap* mw = ModelWrap::from(env, info.Length() < 1 ? env.Undefined() : info[0], "model must be a NativeModel");
    int32_t capacity = 0;
    if (info.Length() > 1 && info[1].IsNumber()) {
      double c = info[1].As<Napi::Number>().DoubleValue();
      if (c != std::floor(c) || c < 0 || c > 1e9) throw Napi::RangeError::New(env, "contextSize must be an integer in [0, 1000000000]");
      capacity = static_cast<int32_t>(c);
    }
    KvType kv = KvType::F16;
    if (info.Length() > 2 && !info[2].IsUndefined()) {
      const std::string t = info[2].IsString() ? info[2].As<Napi::String>().Utf8Value() : "";
      if (t == "f32") kv = KvType::F32;
      else if (t != "f16") throw Napi::RangeError::New(env, "kvType must be 'f16' or 'f32'");
    }
    seq_ = std::make_shared<Sequence>(mw->get(env), capacity, kv);
    tag_object(env, info.This(), kSequenceTag);
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
    // Checked here as well as in the worker: the output below is allocated first, and tokens that
    // cannot fit would ask V8 for rows x V floats (an abort, not an exception, when it cannot).
    if (toks.length > static_cast<size_t>(s.capacity() - s.length()))
      throw Napi::RangeError::New(env, "the sequence would hold " + std::to_string(int64_t(s.length()) + int64_t(toks.length)) +
                                           " tokens, more than its context of " + std::to_string(s.capacity()));
    const int32_t V = s.model().config().vocab;
    const size_t rows = last_only ? 1 : toks.length;
    auto out = Napi::Float32Array::New(env, rows * V);
    busy_->store(true);
    auto* w = new EvalWorker(env, seq_, busy_, std::vector<int32_t>(toks.data, toks.data + toks.length),
                             std::move(parents), last_only, out);
    w->Queue();
    return w->promise();
  }

  // options.stopTokens, copied (a getter may run), checked against the vocabulary and sorted; empty
  // when absent.
  static std::vector<int32_t> stop_tokens(const Napi::Object& o, int32_t vocab) {
    Napi::Env env = o.Env();
    std::vector<int32_t> stop;
    const Napi::Value v = get_prop(o, "stopTokens");
    if (!present(v)) return stop;
    stop = copy_array<int32_t>(env, v, "stopTokens");
    for (size_t i = 0; i < stop.size(); ++i)
      if (stop[i] < 0 || stop[i] >= vocab)
        throw Napi::RangeError::New(env, "stopTokens[" + std::to_string(i) + "] = " + std::to_string(stop[i]) +
                                             " is out of range for a vocabulary of " + std::to_string(vocab));
    std::sort(stop.begin(), stop.end());
    return stop;
  }

  class DraftWorker : public PromiseWorker {
   public:
    DraftWorker(Napi::Env env, std::shared_ptr<Sequence> seq, std::shared_ptr<std::atomic<bool>> busy,
                std::shared_ptr<std::atomic<bool>> cancel, std::vector<int32_t> tokens, std::vector<uint32_t> positions,
                std::vector<int32_t> stop, DraftParams p, Napi::Int32Array out_tokens, Napi::Float32Array out_logits)
        : PromiseWorker(env), seq_(std::move(seq)), busy_(std::move(busy)), cancel_(std::move(cancel)),
          tokens_(std::move(tokens)), positions_(std::move(positions)), stop_(std::move(stop)), p_(p),
          tokens_ref_(Napi::Persistent(out_tokens)), logits_ref_(Napi::Persistent(out_logits)),
          out_tokens_(out_tokens.Data()), out_logits_(out_logits.Data()) {
      if (!positions_.empty()) p_.positions = positions_.data();
      p_.stop = stop_.data();
      p_.n_stop = static_cast<int32_t>(stop_.size());
    }

   protected:
    void run() override {
      drawn_ = draft_chain(*seq_, tokens_.data(), static_cast<int32_t>(tokens_.size()), p_, out_tokens_, out_logits_,
                           cancel_.get());
      if (drawn_ == 0) throw Error(ErrorKind::State, "OSD_ABORTED");
    }
    void OnOK() override {
      busy_->store(false);
      Napi::Object r = Napi::Object::New(Env());
      Napi::Int32Array tokens = tokens_ref_.Value();
      Napi::Float32Array logits = logits_ref_.Value();
      if (drawn_ < p_.count) {  // a stop token ended the chain: views of the rows drawn
        tokens = Napi::Int32Array::New(Env(), drawn_, tokens.ArrayBuffer(), 0);
        logits = Napi::Float32Array::New(Env(), static_cast<size_t>(drawn_) * p_.vocab, logits.ArrayBuffer(), 0);
      }
      r.Set("tokens", tokens);
      r.Set("logits", logits);
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
    std::vector<int32_t> stop_;  // sorted
    DraftParams p_;
    int32_t drawn_ = 0;
    Napi::Reference<Napi::Int32Array> tokens_ref_;
    Napi::Reference<Napi::Float32Array> logits_ref_;
    int32_t* out_tokens_;
    float* out_logits_;
  };

  // draft(tokens: Int32Array, { count, vocabSize?, sampling, seed?, stream?, position?, positions?,
  // stopTokens? }): Promise<{ tokens: Int32Array, logits: Float32Array }>, shorter than count when a
  // stop token was drawn; see draft_chain.
  Napi::Value draft(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
      // Phase 1 (see napi_util.h): the options' getters may run, and may dispose this sequence or
      // start another evaluation on it: it is held here and checked again in phase 2.
      get(env);
      const std::shared_ptr<Sequence> keep = seq_;
      const Sequence& s = *keep;
      if (info.Length() < 1) throw Napi::TypeError::New(env, "tokens must be an Int32Array");
      checked_length<int32_t>(env, info[0], "tokens");
      Napi::Object o = require_object(info, 1, "options");
      const int32_t vm = s.model().config().vocab;
      const int32_t cap = s.capacity();
      DraftParams p;
      p.count = static_cast<int32_t>(get_int(o, "count", 1, cap));
      p.vocab = static_cast<int32_t>(get_int_or(o, "vocabSize", 1, vm, vm));
      p.sampling = parse_sampling(o.Env(), get_prop(o, "sampling"), "sampling");
      const Napi::Value seed_v = get_prop(o, "seed");
      p.seed = present(seed_v) ? seed_value(env, seed_v, "seed") : 0;
      const Napi::Value stream_v = get_prop(o, "stream");
      p.stream = present(stream_v) ? seed_value(env, stream_v, "stream") : 0;
      p.position = static_cast<uint32_t>(get_int_or(o, "position", 0, UINT32_MAX, 0));
      std::vector<uint32_t> positions;
      const Napi::Value positions_v = get_prop(o, "positions");
      if (present(positions_v)) {
        const std::vector<int32_t> ps = copy_array<int32_t>(env, positions_v, "positions");
        if (ps.size() != static_cast<size_t>(p.count))
          throw Napi::RangeError::New(env, "positions has length " + std::to_string(ps.size()) + ", expected count = " +
                                               std::to_string(p.count));
        for (size_t i = 0; i < ps.size(); ++i) {
          if (ps[i] < 0)
            throw Napi::RangeError::New(env, "positions[" + std::to_string(i) + "] must be >= 0, got " + std::to_string(ps[i]));
          positions.push_back(static_cast<uint32_t>(ps[i]));
        }
      }
      std::vector<int32_t> stop = stop_tokens(o, vm);
      // Phase 2: no JavaScript runs from here. The tokens are copied, then checked.
      get(env);
      std::vector<int32_t> tokens = copy_array<int32_t>(env, info[0], "tokens");
      for (size_t i = 0; i < tokens.size(); ++i)
        if (tokens[i] < 0 || tokens[i] >= vm)
          throw Napi::RangeError::New(env, "tokens[" + std::to_string(i) + "] = " + std::to_string(tokens[i]) +
                                               " is out of range for a vocabulary of " + std::to_string(vm));
      // The context check is draft_chain's, at run time (after the drafts queued before this one).
      auto out_tokens = Napi::Int32Array::New(env, p.count);
      auto out_logits = Napi::Float32Array::New(env, static_cast<size_t>(p.count) * p.vocab);
      cancel_ = std::make_shared<std::atomic<bool>>(false);
      busy_->store(true);
      auto* w = new DraftWorker(env, seq_, busy_, cancel_, std::move(tokens), std::move(positions), std::move(stop), p,
                                out_tokens, out_logits);
      w->Queue();
      return w->promise();
    });
  }

  // A native call on a target and a draft sequence: both are busy from construction until it settles.
  class PairWorker : public PromiseWorker {
   public:
    PairWorker(Napi::Env env, SequenceWrap& target, SequenceWrap& draft)
        : PromiseWorker(env), target_(target.seq_), draft_(draft.seq_), target_busy_(target.busy_), draft_busy_(draft.busy_) {
      target_busy_->store(true);
      draft_busy_->store(true);
    }

   protected:
    void OnError(const Napi::Error& e) override {
      release();
      PromiseWorker::OnError(e);
    }
    void release() {
      target_busy_->store(false);
      draft_busy_->store(false);
    }
    // A new JavaScript typed array holding a copy of v[0..n).
    template <class A, class T>
    static A copy_to_js(Napi::Env env, const T* v, size_t n) {
      A a = A::New(env, n);
      std::copy(v, v + n, a.Data());
      return a;
    }
    std::shared_ptr<Sequence> target_, draft_;
    std::shared_ptr<std::atomic<bool>> target_busy_, draft_busy_;
  };

  class ChainStepWorker : public PairWorker {
   public:
    ChainStepWorker(Napi::Env env, SequenceWrap& target, SequenceWrap& draft, std::vector<int32_t> pending, int32_t last,
                    ChainStepParams p, Napi::Float32Array logits)
        : PairWorker(env, target, draft), pending_(std::move(pending)), last_(last), p_(p), draft_tokens_(p.count),
          out_tokens_(p.count + 1), logits_ref_(Napi::Persistent(logits)), logits_(logits.Data()) {}

   protected:
    void run() override {
      accepted_ = osd::chain_step(*target_, *draft_, pending_.data(), static_cast<int32_t>(pending_.size()), last_, p_,
                                  draft_tokens_.data(), out_tokens_.data(), logits_, &times_);
    }
    void OnOK() override {
      release();
      Napi::Env env = Env();
      Napi::Object r = Napi::Object::New(env);
      r.Set("acceptedCount", Napi::Number::New(env, accepted_));
      r.Set("tokens", copy_to_js<Napi::Int32Array>(env, out_tokens_.data(), accepted_ + 1));
      r.Set("draftTokens", copy_to_js<Napi::Int32Array>(env, draft_tokens_.data(), p_.count));
      // Rows 0..accepted: the distributions of the emitted tokens (a view, no copy).
      Napi::Float32Array all = logits_ref_.Value();
      r.Set("targetLogits", Napi::Float32Array::New(env, static_cast<size_t>(accepted_ + 1) * p_.vocab, all.ArrayBuffer(), 0));
      r.Set("draftMs", Napi::Number::New(env, times_.draft_ms));
      r.Set("targetMs", Napi::Number::New(env, times_.target_ms));
      deferred_.Resolve(r);
    }

   private:
    std::vector<int32_t> pending_;
    int32_t last_;
    ChainStepParams p_;
    std::vector<int32_t> draft_tokens_, out_tokens_;
    Napi::Reference<Napi::Float32Array> logits_ref_;
    float* logits_;
    int32_t accepted_ = 0;
    ChainStepTimes times_;
  };

  // chainStep's and chainRun's common arguments. step_args is phase 1 (getters may run, and may
  // dispose either sequence): the draft sequence, last, count, vocabSize, sampling and seed.
  // pending_tokens is phase 2: both sequences checked again, the pending tokens copied and checked.
  struct StepArgs {
    SequenceWrap* draft;
    Napi::Object options;
    int32_t last;
    ChainStepParams p;
  };
  StepArgs step_args(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    get(env);
    SequenceWrap* dw = unwrap_tagged<SequenceWrap>(env, info.Length() < 1 ? env.Undefined() : info[0], kSequenceTag,
                                                   "draft must be a NativeSequence");
    if (dw == this) throw Napi::TypeError::New(env, "draft must be another sequence than the target's");
    dw->get(env);
    if (info.Length() < 2) throw Napi::TypeError::New(env, "pending must be an Int32Array");
    checked_length<int32_t>(env, info[1], "pending");
    Napi::Object o = require_object(info, 2, "options");
    // Read before any getter runs: a getter may dispose either sequence.
    const int32_t vt = seq_->model().config().vocab, cap = seq_->capacity();
    const int32_t vd = dw->seq_->model().config().vocab;
    StepArgs a{dw, o, 0, {}};
    a.last = static_cast<int32_t>(get_int(o, "last", 0, vt - 1));
    a.p.count = static_cast<int32_t>(get_int(o, "count", 1, cap));
    a.p.vocab = static_cast<int32_t>(get_int_or(o, "vocabSize", 1, std::min(vt, vd), std::min(vt, vd)));
    a.p.sampling = parse_sampling(env, get_prop(o, "sampling"), "sampling");
    const Napi::Value seed_v = get_prop(o, "seed");
    a.p.seed = present(seed_v) ? seed_value(env, seed_v, "seed") : 0;
    return a;
  }
  std::vector<int32_t> pending_tokens(const Napi::CallbackInfo& info, SequenceWrap* dw) {
    Napi::Env env = info.Env();
    get(env);
    dw->get(env);
    const int32_t vd = dw->seq_->model().config().vocab;
    std::vector<int32_t> pending = copy_array<int32_t>(env, info[1], "pending");
    if (pending.empty()) throw Napi::RangeError::New(env, "pending must not be empty");
    for (size_t i = 0; i < pending.size(); ++i)
      if (pending[i] < 0 || pending[i] >= vd)
        throw Napi::RangeError::New(env, "pending[" + std::to_string(i) + "] = " + std::to_string(pending[i]) +
                                             " is out of range for a vocabulary of " + std::to_string(vd));
    return pending;
  }

  // chainStep(draft: NativeSequence, pending: Int32Array, { last, count, vocabSize?, sampling, seed?,
  // draftStream?, targetStream? }): Promise<{ acceptedCount, tokens, draftTokens, targetLogits,
  // draftMs, targetMs }>; this sequence is the target's. See chain_step.
  Napi::Value chain_step(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
      StepArgs a = step_args(info);
      const Napi::Value ds_v = get_prop(a.options, "draftStream");
      a.p.draft_stream = present(ds_v) ? seed_value(env, ds_v, "draftStream") : 0;
      const Napi::Value ts_v = get_prop(a.options, "targetStream");
      a.p.target_stream = present(ts_v) ? seed_value(env, ts_v, "targetStream") : 0;
      std::vector<int32_t> pending = pending_tokens(info, a.draft);  // phase 2: no JavaScript runs from here
      auto logits = Napi::Float32Array::New(env, static_cast<size_t>(a.p.count + 1) * a.p.vocab);
      auto* w = new ChainStepWorker(env, *this, *a.draft, std::move(pending), a.last, a.p, logits);
      w->Queue();
      return w->promise();
    });
  }

  class ChainRunWorker : public PairWorker {
   public:
    ChainRunWorker(Napi::Env env, SequenceWrap& target, SequenceWrap& draft, std::shared_ptr<std::atomic<bool>> interrupt,
                   std::vector<int32_t> pending, int32_t last, ChainRunParams p, std::vector<int32_t> stop, bool batch)
        : PairWorker(env, target, draft), interrupt_(std::move(interrupt)), pending_(std::move(pending)), last_(last), p_(p),
          stop_(std::move(stop)), batch_(batch) {
      p_.stop = stop_.data();
      p_.n_stop = static_cast<int32_t>(stop_.size());
    }

   protected:
    void run() override {
      auto run = batch_ ? osd::chain_run_joined : osd::chain_run;
      run(*target_, *draft_, pending_.data(), static_cast<int32_t>(pending_.size()), last_, p_, out_, interrupt_.get());
    }
    void OnOK() override {
      release();
      Napi::Env env = Env();
      Napi::Object r = Napi::Object::New(env);
      r.Set("acceptedCounts", copy_to_js<Napi::Int32Array>(env, out_.accepted.data(), out_.accepted.size()));
      r.Set("tokens", copy_to_js<Napi::Int32Array>(env, out_.tokens.data(), out_.tokens.size()));
      if (p_.keep_logits) r.Set("targetLogits", copy_to_js<Napi::Float32Array>(env, out_.logits.data(), out_.logits.size()));
      r.Set("draftMs", Napi::Number::New(env, out_.times.draft_ms));
      r.Set("targetMs", Napi::Number::New(env, out_.times.target_ms));
      deferred_.Resolve(r);
    }

   private:
    std::shared_ptr<std::atomic<bool>> interrupt_;
    std::vector<int32_t> pending_;
    int32_t last_;
    ChainRunParams p_;
    std::vector<int32_t> stop_;
    bool batch_;
    ChainRunOut out_;
  };

  // chainRun(draft, pending, { last, count, vocabSize?, sampling, seed?, streamBase?, firstStep?,
  // maxSteps?, maxMs?, remaining?, stopTokens?, keepLogits?, batch? }): Promise<{ acceptedCounts, tokens,
  // targetLogits?, draftMs, targetMs }>; see chain_run, and chain_run_joined for batch.
  Napi::Value chain_run(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
      const int32_t vt = seq_ ? seq_->model().config().vocab : 0;
      StepArgs a = step_args(info);
      const Napi::Object& o = a.options;
      ChainRunParams p;
      p.step = a.p;
      const Napi::Value base_v = get_prop(o, "streamBase");
      p.stream_base = present(base_v) ? seed_value(env, base_v, "streamBase") : 0;
      p.first_step = static_cast<int32_t>(get_int_or(o, "firstStep", 0, INT32_MAX, 0));
      p.max_steps = static_cast<int32_t>(get_int_or(o, "maxSteps", 1, INT32_MAX, 1));
      p.max_ms = get_number_or(o, "maxMs", 0.0);
      if (!(p.max_ms >= 0) || !std::isfinite(p.max_ms)) throw Napi::RangeError::New(env, "maxMs must be a finite number >= 0");
      p.remaining = get_int_or(o, "remaining", 1, INT64_C(1) << 52, INT64_C(1) << 52);
      std::vector<int32_t> stop = stop_tokens(o, vt);
      p.keep_logits = get_prop(o, "keepLogits").ToBoolean();
      const bool batch = get_prop(o, "batch").ToBoolean();
      std::vector<int32_t> pending = pending_tokens(info, a.draft);  // phase 2: no JavaScript runs from here
      cancel_ = std::make_shared<std::atomic<bool>>(false);  // cancel() ends the run after its current step
      auto* w = new ChainRunWorker(env, *this, *a.draft, cancel_, std::move(pending), a.last, p, std::move(stop), batch);
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
    // Copied: keep_path checks the indices and then uses them (another thread could change a
    // SharedArrayBuffer in between).
    const std::vector<int32_t> path = copy_array<int32_t>(env, info[1], "path");
    guarded(env, [&] { s.keep_path(static_cast<int32_t>(base), path.data(), static_cast<int32_t>(path.size())); });
    return env.Undefined();
  }

  Napi::Value fork(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Sequence& s = get(env);
    auto ext = Napi::External<std::shared_ptr<Sequence>>::New(env, new std::shared_ptr<Sequence>(s.fork()),
                                                              [](Napi::Env, std::shared_ptr<Sequence>* p) { delete p; });
    tag_object(env, ext, kSequenceHandleTag);
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
  Napi::Value kv_type(const Napi::CallbackInfo& info) {
    return Napi::String::New(info.Env(), kv_type_name(seq_ ? seq_->kv_type() : KvType::F16));
  }

  std::shared_ptr<Sequence> seq_;
  std::shared_ptr<std::atomic<bool>> busy_ = std::make_shared<std::atomic<bool>>(false);
  std::shared_ptr<std::atomic<bool>> cancel_;  // the latest draft's or chain run's stop flag
};

Napi::Value load_model(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString()) throw Napi::TypeError::New(env, "path must be a string");
  std::string device = "cpu";
  if (info.Length() > 1 && !info[1].IsUndefined()) {
    device = info[1].IsString() ? info[1].As<Napi::String>().Utf8Value() : "";
    if (device != "cpu" && device != "cuda" && !(device == "mirror" && mirror_device_allowed()))
      throw Napi::RangeError::New(env, "device must be 'cpu' or 'cuda'");
  }
  auto* w = new LoadModelWorker(env, info[0].As<Napi::String>(), device, env.GetInstanceData<Ctors>());
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
    // Phase 1 (see napi_util.h): every option is read (getters may run); logits is checked and kept
    // as a value. The other options are checked in phase 2, in the order they always were.
    Napi::Object o = require_object(info, 0, "options");
    const int32_t V = static_cast<int32_t>(get_int(o, "vocabSize", 1, 1 << 30));
    const Napi::Value logits_v = required_prop(o, "logits");
    auto check_length = [&](size_t n) {
      if (n != static_cast<size_t>(V))
        throw Napi::RangeError::New(env, "logits has length " + std::to_string(n) + ", expected vocabSize = " +
                                             std::to_string(V));
    };
    check_length(checked_length<float>(env, logits_v, "logits"));
    const Sampling s = parse_sampling(o.Env(), get_prop(o, "sampling"), "sampling");
    const Napi::Value exclude_v = get_prop(o, "exclude");
    const Napi::Value seed_v = get_prop(o, "seed");
    const Napi::Value stream_v = get_prop(o, "stream");
    const Napi::Value position_v = get_prop(o, "position");
    auto position = [&]() -> uint32_t {
      if (!present(position_v)) throw Napi::TypeError::New(env, "position is required");
      return static_cast<uint32_t>(int_value(env, position_v, "position", 0, UINT32_MAX, ""));
    };
    // Phase 2: no JavaScript runs from here.
    auto logits = typed_array<float>(env, logits_v, "logits");
    check_length(logits.length);
    if (!present(exclude_v)) {
      // The draft loop (Sequence.draft) draws through the same function. A greedy draw does not use
      // seed and stream, but a bad one is still an error (not silently ignored).
      const uint64_t seed = s.greedy() && !present(seed_v) ? 0 : seed_value(env, seed_v, "seed");
      const uint64_t stream = present(stream_v) ? seed_value(env, stream_v, "stream") : 0;
      if (s.greedy()) return Napi::Number::New(env, sample_token(logits.data, V, s, 0, 0, 0));
      const uint32_t pos = position();
      return Napi::Number::New(env, sample_token(logits.data, V, s, seed, stream, pos));
    }
    const float mx = checked_row_max(logits.data, V, "logits", 0);
    if (s.greedy()) throw Napi::TypeError::New(env, "exclude needs temperature > 0 (a greedy draw has one candidate)");
    const uint64_t seed = seed_value(env, seed_v, "seed");
    const uint64_t stream = present(stream_v) ? seed_value(env, stream_v, "stream") : 0;
    const uint32_t pos = position();
    WarpedRow w;
    warp_row(logits.data, V, mx, s, w);
    const double u = philox_uniform(seed, stream, pos, kLaneSample);
    auto ex = typed_array<int32_t>(env, exclude_v, "exclude");
    std::vector<float> q(V);
    w.to_dense(q.data());
    for (size_t i = 0; i < ex.length; ++i) {
      const int32_t t = ex.data[i];  // read once: checked, then used
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

// (From the value of the option `type`, read once: a getter could answer differently the second
// time. ToString may run JavaScript: no pointer is held here.)
gguf::TensorType store_type_value(Napi::Env env, const Napi::Value& v) {
  std::string t = present(v) ? v.ToString().Utf8Value() : "F32";
  for (gguf::TensorType c : {gguf::TensorType::F32, gguf::TensorType::F16, gguf::TensorType::BF16, gguf::TensorType::Q8_0,
                             gguf::TensorType::Q5_0, gguf::TensorType::Q5_1, gguf::TensorType::Q4_0, gguf::TensorType::Q4_1,
                             gguf::TensorType::IQ4_NL, gguf::TensorType::IQ4_XS, gguf::TensorType::Q2_K})
    if (t == gguf::type_info(c).name) return c;
  throw Napi::RangeError::New(env, std::string("type must be one of ") + quant::store_type_names() + ", got '" + t + "'");
}

gguf::TensorType parse_store_type(Napi::Env env, const Napi::Object& o) { return store_type_value(env, get_prop(o, "type")); }

// As parse_store_type, and 'keep' (nothing): every matrix in the type it has.
std::optional<gguf::TensorType> parse_store_type_or_keep(Napi::Env env, const Napi::Object& o) {
  const Napi::Value v = get_prop(o, "type");
  if (v.IsString() && v.As<Napi::String>().Utf8Value() == "keep") return std::nullopt;
  return store_type_value(env, v);
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
  ConvertModelWorker(Napi::Env env, std::shared_ptr<Model> m, std::optional<gguf::TensorType> type,
                     std::optional<std::vector<int32_t>> head)
      : PromiseWorker(env), m_(std::move(m)), pass_(m_->device_pass()), type_(type), head_(std::move(head)) {}

 protected:
  void run() override {
    out_ = convert_model(*m_, type_, head_ ? &*head_ : nullptr);
    if (pass_) out_->set_device_pass(pass_->for_model(*out_));  // a copy of a model on a device is there too
  }
  void OnOK() override { deferred_.Resolve(wrap_model(Env(), out_)); }

 private:
  std::shared_ptr<Model> m_;
  std::shared_ptr<DevicePass> pass_;  // the source's device, read when the work is queued
  std::shared_ptr<Model> out_;
  std::optional<gguf::TensorType> type_;
  std::optional<std::vector<int32_t>> head_;
};

// convertModel(model, { type, headTokens? }): the model with its matrices stored as `type`, in
// memory; headTokens (an Int32Array of ascending ids, or null for the whole vocabulary) sets its head.
Napi::Value convert_model_js(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    if (info.Length() < 2 || !info[0].IsObject() || !info[1].IsObject())
      throw Napi::TypeError::New(env, "convertModel(model, { type })");
    // The model first (no JavaScript runs there); then the options, whose getters may run.
    std::shared_ptr<Model> m = ModelWrap::from(env, info[0], "model must be a NativeModel")->get(env);
    Napi::Object o = info[1].As<Napi::Object>();
    const auto type = parse_store_type_or_keep(env, o);
    std::optional<std::vector<int32_t>> head;
    const Napi::Value h = o.Get("headTokens");
    if (h.IsNull()) {
      head.emplace();
    } else if (!h.IsUndefined()) {
      if (!h.IsTypedArray() || h.As<Napi::TypedArray>().TypedArrayType() != napi_int32_array)
        throw Napi::TypeError::New(env, "headTokens must be an Int32Array or null");
      Napi::Int32Array a = h.As<Napi::Int32Array>();
      const int64_t vocab = m->config().vocab;
      head.emplace(a.Data(), a.Data() + a.ElementLength());
      if (head->empty()) throw Napi::RangeError::New(env, "headTokens must hold at least one id");
      for (size_t i = 0; i < head->size(); ++i) {
        const int32_t id = (*head)[i];
        if (id < 0 || id >= vocab)
          throw Napi::RangeError::New(env, "headTokens[" + std::to_string(i) + "] = " + std::to_string(id) +
                                               " is out of range for vocabSize " + std::to_string(vocab));
        if (i > 0 && id <= (*head)[i - 1]) throw Napi::RangeError::New(env, "headTokens must be strictly ascending");
      }
    }
    auto* w = new ConvertModelWorker(env, std::move(m), type, std::move(head));
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
    std::shared_ptr<Model> m = ModelWrap::from(env, info[0], "model must be a NativeModel")->get(env);
    const std::string path = info[1].As<Napi::String>();
    Napi::Object o = info.Length() > 2 && info[2].IsObject() ? info[2].As<Napi::Object>() : Napi::Object::New(env);
    const auto type = parse_store_type_or_keep(env, o);
    auto* w = new SaveModelWorker(env, std::move(m), path, type);
    w->Queue();
    return w->promise();
  });
}

// chainJoinStats(): { steps, runs }: batched chain steps run so far in this process, and the chain
// runs they held together (runs / steps is the mean batch).
Napi::Value chain_join_stats_js(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const ChainJoinStats st = chain_join_stats();
  Napi::Object r = Napi::Object::New(env);
  r.Set("steps", Napi::Number::New(env, static_cast<double>(st.steps)));
  r.Set("runs", Napi::Number::New(env, static_cast<double>(st.members)));
  return r;
}

void init(Napi::Env env, Napi::Object exports) {
  exports.Set("chainJoinStats", Napi::Function::New(env, chain_join_stats_js, "chainJoinStats"));
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
  return env.GetInstanceData<Ctors>()->model.New({model_handle(env, std::move(m))});
}

// By its type tag: InstanceOf follows the prototype chain, which any object can be given.
std::shared_ptr<Model> unwrap_model(Napi::Env env, const Napi::Value& v, const char* name) {
  return ModelWrap::from(env, v, std::string(name) + " must be a loaded model")->get(env);
}

}  // namespace osd::napi
