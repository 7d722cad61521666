// Module entry: collects the exports of every binding file and converts engine errors.
#include <napi.h>

#include <vector>

#include "napi/napi_util.h"

namespace osd::napi {

namespace {
std::vector<InitFn>& inits() {
  static std::vector<InitFn> v;
  return v;
}
}  // namespace

ExportRegistrar::ExportRegistrar(InitFn fn) { inits().push_back(fn); }

void throw_js(Napi::Env env, const std::exception& e) {
  if (auto* oe = dynamic_cast<const osd::Error*>(&e)) {
    switch (oe->kind) {
      case ErrorKind::Type: throw Napi::TypeError::New(env, oe->what());
      case ErrorKind::Range: throw Napi::RangeError::New(env, oe->what());
      default: break;
    }
    Napi::Error err = Napi::Error::New(env, oe->what());
    err.Set("code", Napi::String::New(env, oe->kind == ErrorKind::Io ? "OSD_IO" : "OSD_STATE"));
    throw err;
  }
  if (dynamic_cast<const std::bad_alloc*>(&e)) throw Napi::RangeError::New(env, "out of memory");
  throw Napi::Error::New(env, e.what());
}

napi_value key_string(napi_env env, const char* key) {
  // Per thread (an environment lives on one thread), for the environment last seen there; a
  // cleanup hook forgets it when that environment goes away. Keys are literals, found by address.
  // Node-API 8 cannot reference a string, so the strings are the elements of one referenced array.
  struct Cache {
    napi_env env = nullptr;
    napi_ref array = nullptr;
    std::vector<const char*> keys;
  };
  thread_local Cache cache;
  if (cache.env != env) {
    napi_value arr;
    if (napi_create_array(env, &arr) != napi_ok || napi_create_reference(env, arr, 1, &cache.array) != napi_ok)
      throw Napi::Error::New(env);
    cache.env = env;
    cache.keys.clear();
    napi_add_env_cleanup_hook(env, [](void* p) {
      auto* c = static_cast<Cache*>(p);
      c->env = nullptr;
      c->keys.clear();
    }, &cache);
  }
  napi_value arr, v;
  if (napi_get_reference_value(env, cache.array, &arr) != napi_ok) throw Napi::Error::New(env);
  for (uint32_t i = 0; i < cache.keys.size(); ++i)
    if (cache.keys[i] == key) {
      if (napi_get_element(env, arr, i, &v) != napi_ok) throw Napi::Error::New(env);
      return v;
    }
  if (napi_create_string_utf8(env, key, NAPI_AUTO_LENGTH, &v) != napi_ok ||
      napi_set_element(env, arr, static_cast<uint32_t>(cache.keys.size()), v) != napi_ok)
    throw Napi::Error::New(env);
  cache.keys.push_back(key);
  return v;
}

uint64_t get_seed(const Napi::Object& o, const char* key) { return seed_value(o.Env(), get_prop(o, key), key); }

uint64_t seed_value(Napi::Env env, const Napi::Value& v, const char* key) {
  if (!present(v)) throw Napi::TypeError::New(env, std::string(key) + " is required (a number or a bigint)");
  if (v.IsBigInt()) {
    int sign = 0;
    size_t words = 2;
    uint64_t w[2] = {0, 0};
    v.As<Napi::BigInt>().ToWords(&sign, &words, w);
    if (sign) throw Napi::RangeError::New(env, std::string(key) + " must not be negative");
    if (words > 2 || (words == 2 && w[1] != 0)) throw Napi::RangeError::New(env, std::string(key) + " must be below 2^64");
    return w[0];
  }
  if (!v.IsNumber()) throw Napi::TypeError::New(env, std::string(key) + " must be a number or a bigint");
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(d >= 0.0) || d != std::floor(d) || d > 9007199254740991.0)
    throw Napi::RangeError::New(env, std::string(key) + " must be a non-negative safe integer or a bigint, got " +
                                         num_str(d));
  return static_cast<uint64_t>(d);
}

}  // namespace osd::napi

static Napi::Object init(Napi::Env env, Napi::Object exports) {
  for (auto fn : osd::napi::inits()) fn(env, exports);
  return exports;
}

NODE_API_MODULE(online_specdec, init)
