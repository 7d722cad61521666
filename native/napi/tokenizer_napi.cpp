// N-API binding of the tokenizer: the classes Tokenizer and TokenizerStreamDecoder, and
// loadTokenizer(path), which reads the GGUF file off the event loop and resolves to a Tokenizer.
//
//   new Tokenizer(path: string | vocab: object)       sync load, or build from a plain vocabulary
//   t.encode(text, addBos, special, addEos?)           -> Int32Array
//   t.decode(tokens: Int32Array, special?, stripSpacePrefix?) -> string
//   t.tokenToPiece(id, special?) -> string, t.tokenToBytes(id, special?) -> Uint8Array
//   t.tokenText(id), t.tokenType(id), t.findToken(text)
//   t.vocabSize, bos, eos, unk, pad (-1 = none), addBos, addEos, addSpacePrefix, model, pre
//   new TokenizerStreamDecoder(t, special?, stripSpacePrefix?): push(Int32Array | id), flush()
#include <napi.h>

#include <cmath>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "napi/napi_util.h"
#include "tokenizer/tokenizer.h"

namespace osd::napi {

namespace {

using TokenizerPtr = std::shared_ptr<const tok::Tokenizer>;

// Type tags tell our objects from look-alikes, so a wrong argument is a TypeError, not a crash.
constexpr napi_type_tag kTokenizerTag = {0x0a1b2c3d4e5f6071ULL, 0x8293a4b5c6d7e8f9ULL};
constexpr napi_type_tag kHandleTag = {0x1f2e3d4c5b6a7988ULL, 0x0f1e2d3c4b5a6978ULL};
constexpr napi_type_tag kStreamDecoderTag = {0x2e3d4c5b6a798811ULL, 0x1e2d3c4b5a697812ULL};

void tag(Napi::Env env, napi_value v, const napi_type_tag& t) { tag_object(env, v, t); }

// ---- argument helpers: errors name the argument -----------------------------------------------

bool opt_bool(const Napi::CallbackInfo& info, size_t i, const char* name, bool fallback) {
  if (info.Length() <= i || info[i].IsUndefined()) return fallback;
  if (!info[i].IsBoolean()) throw Napi::TypeError::New(info.Env(), std::string(name) + " must be a boolean");
  return info[i].As<Napi::Boolean>().Value();
}

std::string req_string(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (info.Length() <= i || !info[i].IsString())
    throw Napi::TypeError::New(info.Env(), std::string(name) + " must be a string");
  return info[i].As<Napi::String>().Utf8Value();
}

// A token id: an integer number; range is checked by the tokenizer (RangeError naming `name`).
int32_t req_id(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (info.Length() <= i || !info[i].IsNumber())
    throw Napi::TypeError::New(info.Env(), std::string(name) + " must be a number");
  const double d = info[i].As<Napi::Number>().DoubleValue();
  if (d != std::floor(d) || d < -2147483648.0 || d > 2147483647.0)
    throw Napi::RangeError::New(info.Env(), std::string(name) + " must be an integer token id, got " + num_str(d));
  return static_cast<int32_t>(d);
}

std::vector<std::string> string_array(Napi::Env env, const Napi::Value& v, const std::string& name) {
  if (!v.IsArray()) throw Napi::TypeError::New(env, name + " must be an array of strings");
  auto arr = v.As<Napi::Array>();
  // The length is read once: an element's getter could grow the array while it is read.
  const uint32_t n = arr.Length();
  std::vector<std::string> out(n);
  for (uint32_t i = 0; i < n; ++i) {
    Napi::Value e = arr.Get(i);
    if (!e.IsString()) throw Napi::TypeError::New(env, name + "[" + std::to_string(i) + "] must be a string");
    out[i] = e.As<Napi::String>().Utf8Value();
  }
  return out;
}

// A Float32Array / Int32Array, or a plain array of numbers.
template <typename T>
std::vector<T> number_array(Napi::Env env, const Napi::Value& v, const std::string& name) {
  if (v.IsTypedArray()) {
    auto view = typed_array<T>(env, v, name);
    return std::vector<T>(view.data, view.data + view.length);
  }
  if (!v.IsArray()) throw Napi::TypeError::New(env, name + " must be " + TypedArrayTraits<T>::article + " " + TypedArrayTraits<T>::name + " or an array of numbers");
  auto arr = v.As<Napi::Array>();
  const uint32_t n = arr.Length();
  std::vector<T> out(n);
  for (uint32_t i = 0; i < n; ++i) {
    Napi::Value e = arr.Get(i);
    if (!e.IsNumber()) throw Napi::TypeError::New(env, name + "[" + std::to_string(i) + "] must be a number");
    const double d = e.As<Napi::Number>().DoubleValue();
    if (std::is_integral_v<T> && (d != std::floor(d) || d < -2147483648.0 || d > 2147483647.0))
      throw Napi::RangeError::New(env, name + "[" + std::to_string(i) + "] must be a 32-bit integer, got " + num_str(d));
    out[i] = static_cast<T>(d);
  }
  return out;
}

// Each property is read once (a getter could answer differently the second time); arrays are
// copied as they are read.
tok::VocabData vocab_from_js(const Napi::Object& o) {
  Napi::Env env = o.Env();
  const std::string p = "vocab.";
  tok::VocabData v;
  const Napi::Value model = get_prop(o, "model");
  if (!model.IsString()) throw Napi::TypeError::New(env, "vocab.model must be a string");
  v.model = model.As<Napi::String>().Utf8Value();
  const Napi::Value pre = get_prop(o, "pre");
  if (present(pre)) {
    if (!pre.IsString()) throw Napi::TypeError::New(env, "vocab.pre must be a string");
    v.pre = pre.As<Napi::String>().Utf8Value();
  }
  const Napi::Value tokens = get_prop(o, "tokens");
  if (!present(tokens)) throw Napi::TypeError::New(env, "vocab.tokens is required");
  v.tokens = string_array(env, tokens, p + "tokens");
  const Napi::Value scores = get_prop(o, "scores");
  if (present(scores)) v.scores = number_array<float>(env, scores, p + "scores");
  const Napi::Value token_types = get_prop(o, "tokenTypes");
  if (present(token_types)) v.token_types = number_array<int32_t>(env, token_types, p + "tokenTypes");
  const Napi::Value merges = get_prop(o, "merges");
  if (present(merges)) v.merges = string_array(env, merges, p + "merges");
  const int64_t max_id = 2147483647;
  v.bos = static_cast<int32_t>(get_int_or(o, "bos", -1, max_id, -1, p));
  v.eos = static_cast<int32_t>(get_int_or(o, "eos", -1, max_id, -1, p));
  v.unk = static_cast<int32_t>(get_int_or(o, "unk", -1, max_id, -1, p));
  v.pad = static_cast<int32_t>(get_int_or(o, "pad", -1, max_id, -1, p));
  auto flag = [&](const char* key, bool fallback) {
    const Napi::Value f = get_prop(o, key);
    if (!present(f)) return fallback;
    if (!f.IsBoolean()) throw Napi::TypeError::New(env, p + key + " must be a boolean");
    return f.As<Napi::Boolean>().Value();
  };
  v.add_bos = flag("addBos", false);
  v.add_eos = flag("addEos", false);
  v.add_space_prefix = flag("addSpacePrefix", v.model == "llama");
  return v;
}

// Constructors of this env, for creating instances from C++ (loadTokenizer's promise).
struct Constructors {
  Napi::FunctionReference tokenizer;
};

// ---- Tokenizer ------------------------------------------------------------------------------

class TokenizerWrap : public Napi::ObjectWrap<TokenizerWrap> {
 public:
  static Napi::Function define(Napi::Env env) {
    Napi::Function ctor = DefineClass(env, "Tokenizer",
                                      {
                                          InstanceMethod<&TokenizerWrap::encode>("encode"),
                                          InstanceMethod<&TokenizerWrap::decode>("decode"),
                                          InstanceMethod<&TokenizerWrap::token_to_piece>("tokenToPiece"),
                                          InstanceMethod<&TokenizerWrap::token_to_bytes>("tokenToBytes"),
                                          InstanceMethod<&TokenizerWrap::token_text>("tokenText"),
                                          InstanceMethod<&TokenizerWrap::token_type>("tokenType"),
                                          InstanceMethod<&TokenizerWrap::find_token>("findToken"),
                                      });
    // Accessors check their receiver (napi_util.h, checked_getter).
    using W = TokenizerWrap;
    ctor.Get("prototype").As<Napi::Object>().DefineProperties({
        Napi::PropertyDescriptor::Accessor<checked_getter<W, &W::vocab_size>>("vocabSize"),
        Napi::PropertyDescriptor::Accessor<checked_getter<W, &W::bos>>("bos"),
        Napi::PropertyDescriptor::Accessor<checked_getter<W, &W::eos>>("eos"),
        Napi::PropertyDescriptor::Accessor<checked_getter<W, &W::unk>>("unk"),
        Napi::PropertyDescriptor::Accessor<checked_getter<W, &W::pad>>("pad"),
        Napi::PropertyDescriptor::Accessor<checked_getter<W, &W::add_bos>>("addBos"),
        Napi::PropertyDescriptor::Accessor<checked_getter<W, &W::add_eos>>("addEos"),
        Napi::PropertyDescriptor::Accessor<checked_getter<W, &W::add_space_prefix>>("addSpacePrefix"),
        Napi::PropertyDescriptor::Accessor<checked_getter<W, &W::model>>("model"),
        Napi::PropertyDescriptor::Accessor<checked_getter<W, &W::pre>>("pre"),
    });
    return ctor;
  }
  static TokenizerWrap* self(const Napi::CallbackInfo& info) { return checked_this<TokenizerWrap>(info, kTokenizerTag); }

  TokenizerWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<TokenizerWrap>(info) {
    Napi::Env env = info.Env();
    if (info.Length() < 1) throw Napi::TypeError::New(env, "source must be a GGUF path or a vocabulary object");
    Napi::Value src = info[0];
    if (src.IsExternal() && has_tag(env, src, kHandleTag)) {
      tok_ = *src.As<Napi::External<TokenizerPtr>>().Data();  // from loadTokenizer
    } else if (src.IsString()) {
      const std::string path = src.As<Napi::String>().Utf8Value();
      tok_ = guarded(env, [&] { return std::make_shared<const tok::Tokenizer>(tok::load_tokenizer(path)); });
    } else if (src.IsObject() && !src.IsArray() && !src.IsFunction()) {
      tok::VocabData v = vocab_from_js(src.As<Napi::Object>());
      tok_ = guarded(env, [&] { return std::make_shared<const tok::Tokenizer>(std::move(v)); });
    } else {
      throw Napi::TypeError::New(env, "source must be a GGUF path (string) or a vocabulary object");
    }
    tag(env, info.This(), kTokenizerTag);
  }

  // The tokenizer behind a JS value, or a TypeError naming `name`.
  static TokenizerPtr from(Napi::Env env, const Napi::Value& v, const char* name) {
    return unwrap_tagged<TokenizerWrap>(env, v, kTokenizerTag, std::string(name) + " must be a Tokenizer")->tok_;
  }

 private:
  Napi::Value encode(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const std::string text = req_string(info, 0, "text");
    tok::EncodeOptions opts;
    opts.add_bos = opt_bool(info, 1, "addBos", tok_->add_bos());
    opts.special = opt_bool(info, 2, "special", false);
    opts.add_eos = opt_bool(info, 3, "addEos", false);
    const std::vector<int32_t> ids = guarded(env, [&] { return tok_->encode(text, opts); });
    return to_js(env, ids.data(), ids.size());
  }

  Napi::Value decode(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 1) throw Napi::TypeError::New(env, "tokens must be a Int32Array");
    // Copied: decode checks each id and then indexes with it (another thread could change a
    // SharedArrayBuffer in between).
    const std::vector<int32_t> ids = copy_array<int32_t>(env, info[0], "tokens");
    tok::DecodeOptions opts;
    opts.special = opt_bool(info, 1, "special", false);
    opts.strip_space_prefix = opt_bool(info, 2, "stripSpacePrefix", true);
    const std::string text = guarded(env, [&] { return tok_->decode(ids.data(), ids.size(), opts); });
    return Napi::String::New(env, text);
  }

  Napi::Value token_to_piece(const Napi::CallbackInfo& info) {
    const int32_t id = req_id(info, 0, "token");
    const bool special = opt_bool(info, 1, "special", true);
    return Napi::String::New(info.Env(), guarded(info.Env(), [&] { return tok_->token_to_piece(id, special); }));
  }

  Napi::Value token_to_bytes(const Napi::CallbackInfo& info) {
    const int32_t id = req_id(info, 0, "token");
    const bool special = opt_bool(info, 1, "special", true);
    const std::string& piece = guarded(info.Env(), [&]() -> const std::string& { return tok_->token_to_piece(id, special); });
    return to_js(info.Env(), reinterpret_cast<const uint8_t*>(piece.data()), piece.size());
  }

  Napi::Value token_text(const Napi::CallbackInfo& info) {
    const int32_t id = req_id(info, 0, "token");
    return Napi::String::New(info.Env(), guarded(info.Env(), [&] { return tok_->token_text(id); }));
  }

  Napi::Value token_type(const Napi::CallbackInfo& info) {
    const int32_t id = req_id(info, 0, "token");
    return Napi::Number::New(info.Env(), static_cast<int32_t>(guarded(info.Env(), [&] { return tok_->token_type(id); })));
  }

  Napi::Value find_token(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), tok_->find_token(req_string(info, 0, "text")));
  }

  Napi::Value vocab_size(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), tok_->vocab_size()); }
  Napi::Value bos(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), tok_->bos()); }
  Napi::Value eos(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), tok_->eos()); }
  Napi::Value unk(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), tok_->unk()); }
  Napi::Value pad(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), tok_->pad()); }
  Napi::Value add_bos(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), tok_->add_bos()); }
  Napi::Value add_eos(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), tok_->add_eos()); }
  Napi::Value add_space_prefix(const Napi::CallbackInfo& info) {
    return Napi::Boolean::New(info.Env(), tok_->add_space_prefix());
  }
  Napi::Value model(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), tok_->model()); }
  Napi::Value pre(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), tok_->pre()); }

  TokenizerPtr tok_;
};

// ---- TokenizerStreamDecoder -------------------------------------------------------------------

class StreamDecoderWrap : public Napi::ObjectWrap<StreamDecoderWrap> {
 public:
  static Napi::Function define(Napi::Env env) {
    Napi::Function ctor = DefineClass(env, "TokenizerStreamDecoder",
                                      {
                                          InstanceMethod<&StreamDecoderWrap::push>("push"),
                                          InstanceMethod<&StreamDecoderWrap::flush>("flush"),
                                      });
    ctor.Get("prototype").As<Napi::Object>().DefineProperties(
        {Napi::PropertyDescriptor::Accessor<checked_getter<StreamDecoderWrap, &StreamDecoderWrap::pending_bytes>>(
            "pendingBytes")});
    return ctor;
  }
  static StreamDecoderWrap* self(const Napi::CallbackInfo& info) {
    return checked_this<StreamDecoderWrap>(info, kStreamDecoderTag);
  }

  StreamDecoderWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<StreamDecoderWrap>(info) {
    Napi::Env env = info.Env();
    tok_ = TokenizerWrap::from(env, info.Length() > 0 ? info[0] : env.Undefined(), "tokenizer");
    tok::DecodeOptions opts;
    opts.special = opt_bool(info, 1, "special", false);
    opts.strip_space_prefix = opt_bool(info, 2, "stripSpacePrefix", false);
    dec_ = std::make_unique<tok::StreamDecoder>(*tok_, opts);  // tok_ keeps the tokenizer alive
    tag(env, info.This(), kStreamDecoderTag);
  }

 private:
  Napi::Value push(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() > 0 && info[0].IsNumber()) {
      const int32_t id = req_id(info, 0, "token");
      return Napi::String::New(env, guarded(env, [&] { return dec_->push(id); }));
    }
    if (info.Length() < 1) throw Napi::TypeError::New(env, "tokens must be a Int32Array or a number");
    const std::vector<int32_t> ids = copy_array<int32_t>(env, info[0], "tokens");  // copied, as in decode
    return Napi::String::New(env, guarded(env, [&] { return dec_->push(ids.data(), ids.size()); }));
  }

  Napi::Value flush(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), dec_->flush()); }

  Napi::Value pending_bytes(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), static_cast<double>(dec_->pending_bytes()));
  }

  TokenizerPtr tok_;
  std::unique_ptr<tok::StreamDecoder> dec_;
};

// ---- loadTokenizer(path): Promise<Tokenizer> -----------------------------------------------------

class LoadWorker : public Napi::AsyncWorker {
 public:
  LoadWorker(Napi::Env env, std::string path, Constructors* ctors)
      : Napi::AsyncWorker(env, "osd:loadTokenizer"), path_(std::move(path)), ctors_(ctors), deferred_(env) {}

  Napi::Promise promise() { return deferred_.Promise(); }

  void Execute() override {
    try {
      tok_ = std::make_shared<const tok::Tokenizer>(tok::load_tokenizer(path_));
    } catch (const osd::Error& e) {
      error_ = std::make_unique<osd::Error>(e);
      SetError(e.what());
    } catch (const std::exception& e) {
      error_ = std::make_unique<osd::Error>(ErrorKind::State, e.what());
      SetError(e.what());
    }
  }

  void OnOK() override {
    Napi::Env env = Env();
    Napi::HandleScope scope(env);
    try {
      auto handle = Napi::External<TokenizerPtr>::New(env, new TokenizerPtr(tok_),
                                                      [](Napi::Env, TokenizerPtr* p) { delete p; });
      tag(env, handle, kHandleTag);
      deferred_.Resolve(ctors_->tokenizer.New({handle}));
    } catch (const Napi::Error& e) {
      deferred_.Reject(e.Value());
    }
  }

  void OnError(const Napi::Error&) override {
    Napi::Env env = Env();
    Napi::HandleScope scope(env);
    try {
      throw_js(env, *error_);  // TypeError / RangeError / Error with the engine's message
    } catch (const Napi::Error& e) {
      deferred_.Reject(e.Value());
    }
  }

 private:
  std::string path_;
  Constructors* ctors_;
  Napi::Promise::Deferred deferred_;
  TokenizerPtr tok_;
  std::unique_ptr<osd::Error> error_;
};

Napi::Value load_tokenizer_js(const Napi::CallbackInfo& info) {
  const std::string path = req_string(info, 0, "path");
  auto* worker = new LoadWorker(info.Env(), path, static_cast<Constructors*>(info.Data()));
  Napi::Promise promise = worker->promise();
  worker->Queue();
  return promise;
}

void init(Napi::Env env, Napi::Object exports) {
  auto* ctors = new Constructors();
  Napi::Function tokenizer = TokenizerWrap::define(env);
  ctors->tokenizer = Napi::Persistent(tokenizer);
  env.AddCleanupHook([ctors] { delete ctors; });
  exports.Set("Tokenizer", tokenizer);
  exports.Set("TokenizerStreamDecoder", StreamDecoderWrap::define(env));
  exports.Set("loadTokenizer", Napi::Function::New(env, load_tokenizer_js, "loadTokenizer", ctors));
}

ExportRegistrar reg(init);

}  // namespace

}  // namespace osd::napi
