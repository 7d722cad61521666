#include "io/llama2c.h"

#include <cstring>

#include "core/error.h"

namespace osd::llama2c {

namespace {

constexpr size_t kHeaderBytes = 7 * sizeof(int32_t);
constexpr uint32_t kVersionedMagic = 0x616b3432;  // "ak42": llama2.c's newer export formats

std::string str(uint64_t v) { return std::to_string(v); }

// Checked arithmetic for sizes derived from untrusted int32 header fields.
uint64_t mul(uint64_t a, uint64_t b) {
  uint64_t r;
  if (__builtin_mul_overflow(a, b, &r)) throw_range("llama2.c checkpoint size overflows");
  return r;
}

uint64_t add(uint64_t a, uint64_t b) {
  uint64_t r;
  if (__builtin_add_overflow(a, b, &r)) throw_range("llama2.c checkpoint size overflows");
  return r;
}

std::string describe(const Config& c) {
  return "dim " + std::to_string(c.dim) + ", hidden_dim " + std::to_string(c.hidden_dim) + ", n_layers " +
         std::to_string(c.n_layers) + ", n_heads " + std::to_string(c.n_heads) + ", n_kv_heads " +
         std::to_string(c.n_kv_heads) + ", vocab_size " + std::to_string(c.vocab_size) + ", seq_len " +
         std::to_string(c.seq_len) + (c.shared_classifier ? ", shared classifier" : ", separate classifier");
}

// Float counts of each weight, in file order.
struct Layout {
  uint64_t embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, freq_cis, wcls;
};

Layout layout(const Config& c) {
  const uint64_t dim = static_cast<uint64_t>(c.dim), hidden = static_cast<uint64_t>(c.hidden_dim);
  const uint64_t layers = static_cast<uint64_t>(c.n_layers), vocab = static_cast<uint64_t>(c.vocab_size);
  const uint64_t kv_dim = static_cast<uint64_t>(c.kv_dim());
  Layout l;
  l.embedding = mul(vocab, dim);
  l.rms_att = mul(layers, dim);
  l.wq = mul(layers, mul(dim, dim));
  l.wk = mul(layers, mul(dim, kv_dim));
  l.wv = l.wk;
  l.wo = l.wq;
  l.rms_ffn = l.rms_att;
  l.w1 = mul(layers, mul(dim, hidden));
  l.w2 = l.w1;
  l.w3 = l.w1;
  l.rms_final = dim;
  // freq_cis_real and freq_cis_imag, seq_len * head_size / 2 each (run.c's integer arithmetic).
  l.freq_cis = 2 * (mul(static_cast<uint64_t>(c.seq_len), static_cast<uint64_t>(c.head_size())) / 2);
  l.wcls = c.shared_classifier ? 0 : l.embedding;
  return l;
}

}  // namespace

uint64_t checkpoint_bytes(const Config& c) {
  const Layout l = layout(c);
  uint64_t floats = 0;
  for (uint64_t n : {l.embedding, l.rms_att, l.wq, l.wk, l.wv, l.wo, l.rms_ffn, l.w1, l.w2, l.w3, l.rms_final,
                     l.freq_cis, l.wcls})
    floats = add(floats, n);
  return add(kHeaderBytes, mul(floats, sizeof(float)));
}

std::unique_ptr<Checkpoint> Checkpoint::open(const std::string& path) {
  std::unique_ptr<Checkpoint> c(new Checkpoint());
  c->name_ = path;
  c->bytes_ = io::FileBytes::map(path);
  c->parse();
  return c;
}

std::unique_ptr<Checkpoint> Checkpoint::from_memory(std::vector<uint8_t> bytes, std::string name) {
  std::unique_ptr<Checkpoint> c(new Checkpoint());
  c->name_ = std::move(name);
  c->bytes_ = io::FileBytes::own(std::move(bytes));
  c->parse();
  return c;
}

void Checkpoint::parse() {
  const uint64_t size = bytes_.size();
  if (size < kHeaderBytes)
    throw_io(name_ + ": truncated llama2.c header (needs " + str(kHeaderBytes) + " bytes, file has " + str(size) + ")");
  int32_t h[7];
  std::memcpy(h, bytes_.data(), sizeof h);
  if (static_cast<uint32_t>(h[0]) == kVersionedMagic)
    throw_io(name_ + ": llama2.c export version " + std::to_string(h[1]) +
             " is not supported (only the legacy format, export.py --version 0)");

  Config& c = config_;
  c.dim = h[0];
  c.hidden_dim = h[1];
  c.n_layers = h[2];
  c.n_heads = h[3];
  c.n_kv_heads = h[4];
  c.seq_len = h[6];
  c.shared_classifier = h[5] > 0;
  c.vocab_size = h[5] == INT32_MIN ? 0 : (h[5] > 0 ? h[5] : -h[5]);

  const std::string bad = name_ + ": bad llama2.c header (";
  if (c.dim <= 0 || c.hidden_dim <= 0 || c.n_layers <= 0 || c.n_heads <= 0 || c.n_kv_heads <= 0 ||
      c.vocab_size <= 0 || c.seq_len <= 0)
    throw_io(bad + "every field must be positive, vocab_size may be negative: " + describe(c) + ")");
  if (c.dim % c.n_heads != 0) throw_io(bad + "dim is not a multiple of n_heads: " + describe(c) + ")");
  if (c.n_kv_heads > c.n_heads || c.n_heads % c.n_kv_heads != 0)
    throw_io(bad + "n_heads is not a multiple of n_kv_heads: " + describe(c) + ")");

  uint64_t expected;
  try {
    expected = checkpoint_bytes(c);
  } catch (const Error&) {
    throw_io(bad + "the weight sizes overflow: " + describe(c) + ")");
  }
  if (size < expected)
    throw_io(name_ + ": truncated llama2.c checkpoint (the header (" + describe(c) + ") needs " + str(expected) +
             " bytes, file has " + str(size) + ")");
  if (size > expected)
    throw_io(name_ + ": llama2.c checkpoint has " + str(size - expected) + " unexpected trailing bytes (the header (" +
             describe(c) + ") needs " + str(expected) + " bytes, file has " + str(size) + ")");

  // Every offset is a multiple of 4 from a page-aligned (or malloc-aligned) base, so the
  // float pointers are properly aligned.
  const Layout l = layout(c);
  const float* p = reinterpret_cast<const float*>(bytes_.data() + kHeaderBytes);
  auto next = [&p](uint64_t n) {
    const float* at = p;
    p += n;
    return at;
  };
  Weights& w = weights_;
  w.token_embedding = next(l.embedding);
  w.rms_att = next(l.rms_att);
  w.wq = next(l.wq);
  w.wk = next(l.wk);
  w.wv = next(l.wv);
  w.wo = next(l.wo);
  w.rms_ffn = next(l.rms_ffn);
  w.w1 = next(l.w1);
  w.w2 = next(l.w2);
  w.w3 = next(l.w3);
  w.rms_final = next(l.rms_final);
  next(l.freq_cis);  // RoPE tables: recomputed by the model
  w.wcls = c.shared_classifier ? w.token_embedding : next(l.wcls);
}

Tokenizer read_tokenizer(const std::string& path, int32_t vocab_size) {
  io::FileBytes bytes = io::FileBytes::map(path);
  return parse_tokenizer(bytes.data(), bytes.size(), path, vocab_size);
}

Tokenizer parse_tokenizer(const uint8_t* data, size_t size, const std::string& name, int32_t vocab_size) {
  if (vocab_size < 0) throw_range(name + ": vocab_size " + std::to_string(vocab_size) + " is negative");
  size_t pos = 0;
  // `token` < 0 means the header.
  auto need = [&](size_t n, int64_t token) {
    if (n > size - pos)
      throw_io(name + ": truncated " + (token < 0 ? std::string("tokenizer header") : "token " + std::to_string(token)) +
               " (needs " + str(n) + " bytes at offset " + str(pos) + ", file has " + str(size) + ")");
  };
  Tokenizer t;
  need(4, -1);
  std::memcpy(&t.max_token_length, data, 4);
  pos = 4;
  if (t.max_token_length <= 0)
    throw_io(name + ": bad max_token_length " + std::to_string(t.max_token_length) + " in tokenizer header");
  // Each token takes at least 8 bytes, which bounds the count before reserving.
  if (static_cast<uint64_t>(vocab_size) > (size - pos) / 8)
    throw_io(name + ": truncated tokenizer (" + std::to_string(vocab_size) + " tokens need at least " +
             str(8 * static_cast<uint64_t>(vocab_size) + 4) + " bytes, file has " + str(size) + ")");
  t.tokens.reserve(vocab_size);
  t.scores.reserve(vocab_size);
  for (int64_t i = 0; vocab_size == 0 ? pos < size : i < vocab_size; ++i) {
    need(8, i);
    float score;
    int32_t len;
    std::memcpy(&score, data + pos, 4);
    std::memcpy(&len, data + pos + 4, 4);
    pos += 8;
    if (len < 0 || len > t.max_token_length)
      throw_io(name + ": token " + std::to_string(i) + " has length " + std::to_string(len) +
               " (max_token_length is " + std::to_string(t.max_token_length) + ")");
    need(static_cast<size_t>(len), i);
    t.tokens.emplace_back(reinterpret_cast<const char*>(data + pos), static_cast<size_t>(len));
    t.scores.push_back(score);
    pos += static_cast<size_t>(len);
  }
  if (pos != size)
    throw_io(name + ": " + str(size - pos) + " unexpected trailing bytes after " + std::to_string(vocab_size) +
             " tokens");
  return t;
}

}  // namespace osd::llama2c
