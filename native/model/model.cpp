#include "model/model.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <optional>
#include <utility>

#include "core/error.h"
#include "model/quant.h"

namespace osd {

namespace {

const float* f32_vector(const gguf::File& f, const std::string& name, int64_t n) {
  const gguf::TensorInfo& t = f.tensor(name);
  if (t.type != gguf::TensorType::F32)
    throw_io(f.name() + ": tensor '" + name + "' must be F32, got " + gguf::type_info(t.type).name);
  if (static_cast<int64_t>(t.n_elements) != n)
    throw_io(f.name() + ": tensor '" + name + "' has " + std::to_string(t.n_elements) + " elements, expected " +
             std::to_string(n));
  return reinterpret_cast<const float*>(t.data);
}

Matrix matrix(const gguf::File& f, const std::string& name, int64_t rows, int64_t cols) {
  const gguf::TensorInfo& t = f.tensor(name);
  Matrix m;
  try {
    m = matrix_from_tensor(t);
  } catch (const Error& e) {
    throw_io(f.name() + ": " + e.what());
  }
  if (m.rows != rows || m.cols != cols)
    throw_io(f.name() + ": tensor '" + name + "' is " + std::to_string(m.rows) + " x " + std::to_string(m.cols) +
             ", expected " + std::to_string(rows) + " x " + std::to_string(cols));
  if (m.type == gguf::TensorType::Q8_0 && cols % 32 != 0)
    throw_io(f.name() + ": tensor '" + name + "' has a row length that is not a multiple of the block size");
  return m;
}

}  // namespace

std::shared_ptr<Model> Model::load(const std::string& path) {
  io::FileBytes probe = io::FileBytes::map(path);
  if (probe.size() == 0) throw_io(path + ": the file is empty (expected a GGUF or llama2.c model)");
  if (probe.size() >= 4 && std::memcmp(probe.data(), "GGUF", 4) == 0) {
    probe = io::FileBytes();
    return from_gguf(gguf::File::open(path));
  }
  probe = io::FileBytes();
  // Not GGUF: a llama2.c checkpoint (no magic number), or some other file; say both were tried.
  try {
    return from_llama2c(llama2c::Checkpoint::open(path));
  } catch (const Error& e) {
    if (e.kind != ErrorKind::Io) throw;
    std::string why = e.what();
    if (why.rfind(path + ": ", 0) == 0) why.erase(0, path.size() + 2);
    throw_io(path + ": not a GGUF file (it does not begin with \"GGUF\") nor a llama2.c checkpoint (" + why + ")");
  }
}

std::shared_ptr<Model> Model::from_gguf(std::unique_ptr<gguf::File> file) {
  std::shared_ptr<Model> m(new Model());
  const gguf::File& f = *file;
  ModelConfig& c = m->cfg_;
  c.arch = f.get_string("general.architecture");
  if (c.arch != "llama" && c.arch != "qwen2" && c.arch != "qwen3")
    throw_io(f.name() + ": architecture '" + c.arch + "' is not supported (supported: llama, qwen2, qwen3)");
  const std::string a = c.arch + ".";
  // Sizes: positive and within int32 (a larger value was truncated by the cast).
  auto size_of = [&](const std::string& key, std::optional<int64_t> fallback) {
    const int64_t v = fallback ? f.get_int_or(key, *fallback) : f.get_int(key);
    if (v <= 0 || v > INT32_MAX) throw_io(f.name() + ": " + key + " must be in [1, 2147483647], got " + std::to_string(v));
    return static_cast<int32_t>(v);
  };
  c.dim = size_of(a + "embedding_length", std::nullopt);
  c.n_layers = size_of(a + "block_count", std::nullopt);
  c.n_heads = size_of(a + "attention.head_count", std::nullopt);
  c.n_kv_heads = size_of(a + "attention.head_count_kv", c.n_heads);
  c.ffn_dim = size_of(a + "feed_forward_length", std::nullopt);
  c.context = size_of(a + "context_length", 2048);
  c.rope_theta = static_cast<float>(f.get_float_or(a + "rope.freq_base", 10000.0));
  c.rms_eps = static_cast<float>(f.get_float_or(a + "attention.layer_norm_rms_epsilon", 1e-5));
  c.rope_neox = c.arch == "qwen2" || c.arch == "qwen3";
  if (!(c.rope_theta > 0) || !std::isfinite(c.rope_theta))
    throw_io(f.name() + ": " + a + "rope.freq_base must be a finite number > 0, got " + num_str(c.rope_theta));
  if (c.dim <= 0 || c.n_layers <= 0 || c.n_heads <= 0 || c.n_kv_heads <= 0 || c.ffn_dim <= 0 || c.context <= 0 ||
      c.dim % c.n_heads != 0 || c.n_heads % c.n_kv_heads != 0)
    throw_io(f.name() + ": inconsistent model dimensions (embedding " + std::to_string(c.dim) + ", heads " +
             std::to_string(c.n_heads) + ", kv heads " + std::to_string(c.n_kv_heads) + ")");
  const bool key_length = f.find(a + "attention.key_length") != nullptr;
  c.head_dim = size_of(a + "attention.key_length", c.dim / c.n_heads);
  // RoPE turns pairs of dimensions; q_dim() and kv_dim() are int32 products.
  if (c.head_dim % 2 != 0)
    throw_io(f.name() + ": " +
             (key_length ? a + "attention.key_length " : a + "embedding_length / " + a + "attention.head_count = ") +
             std::to_string(c.head_dim) + " is odd (RoPE turns pairs of dimensions)");
  if (static_cast<int64_t>(c.n_heads) * c.head_dim > INT32_MAX)
    throw_io(f.name() + ": heads x key_length (" + std::to_string(c.n_heads) + " x " + std::to_string(c.head_dim) +
             ") is too large");
  if (f.get_int_or(a + "rope.dimension_count", c.head_dim) != c.head_dim)
    throw_io(f.name() + ": partial rotary embeddings (" + a + "rope.dimension_count) are not supported");
  const std::string scaling = f.get_string_or(a + "rope.scaling.type", "none");
  if (scaling == "linear") {
    double factor = f.get_float_or(a + "rope.scaling.factor", 1.0);
    if (!(factor > 0)) throw_io(f.name() + ": " + a + "rope.scaling.factor must be > 0");
    c.rope_freq_scale = static_cast<float>(1.0 / factor);
  } else if (scaling != "none") {
    throw_io(f.name() + ": RoPE scaling '" + scaling + "' is not supported (supported: none, linear)");
  }
  if (f.find_tensor("rope_freqs.weight")) {
    const float* ff = f32_vector(f, "rope_freqs.weight", c.head_dim / 2);
    c.rope_factors.assign(ff, ff + c.head_dim / 2);
    for (int32_t i = 0; i < c.head_dim / 2; ++i)
      if (!(c.rope_factors[i] > 0) || !std::isfinite(c.rope_factors[i]))
        throw_io(f.name() + ": rope_freqs.weight[" + std::to_string(i) + "] must be a finite number > 0, got " +
                 num_str(c.rope_factors[i]));
  }

  m->token_embd = matrix_from_tensor(f.tensor("token_embd.weight"));
  c.vocab = static_cast<int32_t>(m->token_embd.rows);
  m->token_embd = matrix(f, "token_embd.weight", c.vocab, c.dim);
  m->output_norm = f32_vector(f, "output_norm.weight", c.dim);
  c.tied_output = f.find_tensor("output.weight") == nullptr;
  m->output = c.tied_output ? m->token_embd : matrix(f, "output.weight", c.vocab, c.dim);
  m->build_head(f);
  const int64_t qd = c.q_dim(), kvd = c.kv_dim();
  for (int32_t l = 0; l < c.n_layers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    LayerWeights w;
    w.attn_norm = f32_vector(f, p + "attn_norm.weight", c.dim);
    w.wq = matrix(f, p + "attn_q.weight", qd, c.dim);
    w.wk = matrix(f, p + "attn_k.weight", kvd, c.dim);
    w.wv = matrix(f, p + "attn_v.weight", kvd, c.dim);
    w.wo = matrix(f, p + "attn_output.weight", c.dim, qd);
    if (f.find_tensor(p + "attn_q.bias")) {
      w.bq = f32_vector(f, p + "attn_q.bias", qd);
      w.bk = f32_vector(f, p + "attn_k.bias", kvd);
      w.bv = f32_vector(f, p + "attn_v.bias", kvd);
    } else if (c.arch == "qwen2") {
      throw_io(f.name() + ": qwen2 model lacks tensor '" + p + "attn_q.bias'");
    }
    if (c.arch == "qwen3") {
      w.q_norm = f32_vector(f, p + "attn_q_norm.weight", c.head_dim);
      w.k_norm = f32_vector(f, p + "attn_k_norm.weight", c.head_dim);
    }
    w.ffn_norm = f32_vector(f, p + "ffn_norm.weight", c.dim);
    w.w_gate = matrix(f, p + "ffn_gate.weight", c.ffn_dim, c.dim);
    w.w_up = matrix(f, p + "ffn_up.weight", c.ffn_dim, c.dim);
    w.w_down = matrix(f, p + "ffn_down.weight", c.dim, c.ffn_dim);
    m->layers.push_back(w);
  }
  m->pack_weights(&f);
  m->path_ = f.name();
  m->gguf_ = std::move(file);
  return m;
}

void spread_head_row(const std::vector<int32_t>& ids, const float* head_logits, int64_t vocab, float* row) {
  std::fill(row, row + vocab, -INFINITY);
  for (size_t j = 0; j < ids.size(); ++j) row[ids[j]] = head_logits[j];
}

void Model::build_head(const gguf::File& f) {
  const gguf::Value* v = f.find("osd.head_tokens");
  if (!v) return;
  const std::string key = f.name() + ": osd.head_tokens";
  using gguf::ValueType;
  const ValueType e = v->elem_type();
  const bool integers = v->is_array() && e != ValueType::Bool && e != ValueType::Float32 && e != ValueType::Float64 &&
                        e != ValueType::String && e != ValueType::Array;
  if (!integers) throw_io(key + " must be an array of integer token ids, got " + v->describe());
  std::vector<int64_t> ids;
  try {
    ids = v->to_ints();
  } catch (const Error&) {
    throw_io(key + " holds an id beyond int64");
  }
  if (ids.empty()) throw_io(key + " is empty (a head needs at least one token)");
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= cfg_.vocab)
      throw_io(key + "[" + std::to_string(i) + "] = " + std::to_string(ids[i]) + " is out of range for vocabulary size " +
               std::to_string(cfg_.vocab));
    if (i > 0 && ids[i] <= ids[i - 1]) throw_io(key + " must be strictly ascending (index " + std::to_string(i) + ")");
  }
  cfg_.head_tokens.assign(ids.begin(), ids.end());
  head_rows_.resize(output.row_bytes * ids.size());
  for (size_t i = 0; i < ids.size(); ++i)
    std::memcpy(&head_rows_[i * output.row_bytes], output.data + ids[i] * output.row_bytes, output.row_bytes);
  head = output;
  head.rows = static_cast<int64_t>(ids.size());
  head.data = head_rows_.data();
  head.packed = nullptr;
}

// A model built in memory (convertModel, the trainer) keeps its own bytes beside the packed copy:
// the portable kernels and embedding lookups read them.
void Model::pack_weights(const gguf::File* file) {
  const quant::Isa isa = quant::best_isa();
  // A restricted head's products read only its rows.
  std::vector<Matrix*> ms = {head.empty() ? &output : &head};
  for (auto& l : layers)
    for (Matrix* w : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) ms.push_back(w);
  // Each packed copy starts 64-byte aligned in one buffer.
  std::vector<std::pair<Matrix*, size_t>> todo;
  size_t total = 0;
  for (Matrix* w : ms)
    if (quant::kernel_reads_packed(w->type, isa)) {
      todo.emplace_back(w, total);
      total += (quant::packed_bytes(w->type, w->rows, w->cols) + 63) & ~size_t(63);
    }
  if (todo.empty()) return;
  packed_ = io::HugeBuffer(total);
  for (auto [w, offset] : todo) {
    quant::pack_rows(w->type, w->data, w->row_bytes, w->rows, w->cols, packed_.data() + offset);
    w->packed = packed_.data() + offset;
    // The file's copy is read again only by the portable kernels (and, for a tied output matrix,
    // by embedding lookups): its pages need not stay resident beside the packed one.
    if (file && w != &head) file->drop_pages(w->data, w->bytes());
  }
}

std::shared_ptr<Model> Model::from_llama2c(std::unique_ptr<llama2c::Checkpoint> ckpt) {
  std::shared_ptr<Model> m(new Model());
  const llama2c::Config& lc = ckpt->config();
  const llama2c::Weights& w = ckpt->weights();
  ModelConfig& c = m->cfg_;
  c.arch = "llama";
  c.vocab = lc.vocab_size;
  c.dim = lc.dim;
  c.n_layers = lc.n_layers;
  c.n_heads = lc.n_heads;
  c.n_kv_heads = lc.n_kv_heads;
  c.head_dim = lc.head_size();
  if (c.head_dim % 2 != 0)
    throw_io(ckpt->name() + ": bad llama2.c header (dim / n_heads = " + std::to_string(c.head_dim) +
             " is odd; RoPE turns pairs of dimensions)");
  c.ffn_dim = lc.hidden_dim;
  c.context = lc.seq_len;
  c.rope_theta = 10000.0f;
  c.rms_eps = 1e-5f;
  c.tied_output = lc.shared_classifier;
  const int64_t D = c.dim, KV = c.kv_dim(), H = c.ffn_dim;
  m->token_embd = matrix_f32(w.token_embedding, c.vocab, D);
  m->output_norm = w.rms_final;
  m->output = matrix_f32(w.wcls, c.vocab, D);
  for (int32_t l = 0; l < c.n_layers; ++l) {
    LayerWeights lw;
    lw.attn_norm = w.rms_att + l * D;
    lw.wq = matrix_f32(w.wq + l * D * D, D, D);
    lw.wk = matrix_f32(w.wk + l * KV * D, KV, D);
    lw.wv = matrix_f32(w.wv + l * KV * D, KV, D);
    lw.wo = matrix_f32(w.wo + l * D * D, D, D);
    lw.ffn_norm = w.rms_ffn + l * D;
    lw.w_gate = matrix_f32(w.w1 + l * H * D, H, D);
    lw.w_down = matrix_f32(w.w2 + l * D * H, D, H);
    lw.w_up = matrix_f32(w.w3 + l * H * D, H, D);
    m->layers.push_back(lw);
  }
  m->path_ = ckpt->name();
  m->l2c_ = std::move(ckpt);
  return m;
}

size_t Model::weight_bytes_per_token() const {
  size_t total = token_embd.row_bytes + (head.empty() ? output : head).bytes();
  for (const auto& l : layers)
    total += l.wq.bytes() + l.wk.bytes() + l.wv.bytes() + l.wo.bytes() + l.w_gate.bytes() + l.w_up.bytes() +
             l.w_down.bytes();
  return total;
}

}  // namespace osd
