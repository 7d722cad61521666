// Decoding speed on the block formats of llama.cpp's common files, without Node: a random llama
// (width 1024, 16 layers, 32,000 tokens by default) stored as a Q4_K_M-style mix (Q6_K embeddings,
// output and attn_v, Q4_K elsewhere), the same with Q3_K instead of Q4_K, and, in the same run, as
// Q4_0, Q8_0, IQ4_XS, IQ4_NL and Q2_K of the same shape. The Q3_K / Q4_K / Q6_K blocks are random bytes with moderate scales (no quantiser is
// needed to time them); the others are the random weights quantised. Per model: one evaluate of 1 and of 5 tokens
// after a 64-token prefix (medians), and a 256-token prefill; weight GB/s per decoded token as a
// fraction of a read probe run in the same process, and each model's times against Q4_0's.
//
//   bench_kquant_model [--layers N] [--dim D] [--ffn F] [--vocab V] [--reps R] [--json FILE]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <unistd.h>
#include <vector>

#include "core/bandwidth.h"
#include "core/fp16.h"
#include "io/gguf.h"
#include "model/model.h"
#include "model/quant.h"
#include "model/random_model.h"
#include "model/sequence.h"

using namespace osd;

namespace {

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

[[noreturn]] void usage(const char* why) {
  std::fprintf(stderr, "%s\nusage: bench_kquant_model [--layers N] [--dim D] [--ffn F] [--vocab V] [--reps R] [--json FILE]\n", why);
  std::exit(2);
}

// The F16 model at `from`, its 256-divisible matrices rewritten as random Q6_K (embeddings, output,
// attn_v) or `most` (Q4_K or Q3_K) blocks.
void write_k_mix(const std::string& from, const std::string& to, gguf::TensorType most) {
  auto f = gguf::File::open(from);
  gguf::Writer w;
  for (const auto& kv : f->metadata()) w.set(kv.key, kv.value);
  std::mt19937 rng(11);
  std::vector<std::vector<uint8_t>> keep;
  for (const auto& t : f->tensors()) {
    const std::vector<uint64_t> dims(t.ne, t.ne + t.n_dims);
    if (t.n_dims != 2 || t.ne[0] % 256 != 0) {
      w.add_tensor_raw(t.name, t.type, dims, t.data, t.n_bytes);
      continue;
    }
    const bool six = t.name.find("token_embd") != std::string::npos || t.name.find("attn_v") != std::string::npos;
    const gguf::TensorType k = six ? gguf::TensorType::Q6_K : most;
    const gguf::TypeInfo& ti = gguf::type_info(k);
    keep.emplace_back(t.ne[1] * (t.ne[0] / 256) * ti.block_bytes);
    for (auto& b : keep.back()) b = static_cast<uint8_t>(rng());
    const uint16_t d = float_to_half(six ? 0.0005f : 0.002f), dmin = float_to_half(0.001f);
    for (size_t b = 0; b < keep.back().size(); b += ti.block_bytes) {
      if (six) {
        std::memcpy(&keep.back()[b + 208], &d, 2);
      } else if (k == gguf::TensorType::Q3_K) {
        const uint16_t d3 = float_to_half(0.0003f);
        std::memcpy(&keep.back()[b + 108], &d3, 2);
      } else {
        std::memcpy(&keep.back()[b], &d, 2);
        std::memcpy(&keep.back()[b + 2], &dmin, 2);
      }
    }
    w.add_tensor_raw(t.name, k, dims, keep.back().data(), keep.back().size());
  }
  w.write(to);
}

struct Row {
  std::string name;
  double mb = 0, one_ms = 0, five_ms = 0, prefill_tps = 0;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

Row measure(const std::string& name, const std::string& path, int reps) {
  auto m = Model::load(path);
  Row r;
  r.name = name;
  r.mb = static_cast<double>(m->weight_bytes_per_token()) / 1e6;
  const int32_t V = m->config().vocab;
  std::vector<int32_t> prefix(64), toks(256);
  // Ids within any --vocab (a fixed 100..4099 range failed below 4,100 tokens).
  for (size_t i = 0; i < prefix.size(); ++i) prefix[i] = static_cast<int32_t>((100 + i * 37) % static_cast<size_t>(V));
  for (size_t i = 0; i < toks.size(); ++i) toks[i] = static_cast<int32_t>((200 + i * 53) % static_cast<size_t>(V));
  std::vector<float> logits(5 * static_cast<size_t>(V));
  Sequence s(m);
  s.evaluate(prefix.data(), 64, nullptr, logits.data(), true);
  for (int n : {1, 5}) {
    std::vector<double> t;
    for (int i = 0; i < reps + 3; ++i) {
      const double t0 = now_ms();
      s.evaluate(toks.data(), n, nullptr, logits.data());
      if (i >= 3) t.push_back(now_ms() - t0);
      s.truncate(64);
    }
    (n == 1 ? r.one_ms : r.five_ms) = median(t);
  }
  std::vector<double> t;
  for (int i = 0; i < 3; ++i) {
    Sequence p(m);
    const double t0 = now_ms();
    p.evaluate(toks.data(), 256, nullptr, logits.data(), true);
    t.push_back(now_ms() - t0);
  }
  r.prefill_tps = 256.0 / (median(t) / 1000.0);
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  ModelConfig c;
  c.vocab = 32000, c.dim = 1024, c.n_layers = 16, c.n_heads = 16, c.n_kv_heads = 4, c.ffn_dim = 2816, c.context = 2048;
  int reps = 30;
  std::string json;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (i + 1 >= argc) usage(("missing value for " + a).c_str());
    const char* v = argv[++i];
    const int x = std::atoi(v);
    if (a == "--json") json = v;
    else if (x <= 0) usage((a + " must be a positive integer").c_str());
    else if (a == "--layers") c.n_layers = x;
    else if (a == "--dim") c.dim = x;
    else if (a == "--ffn") c.ffn_dim = x;
    else if (a == "--vocab") c.vocab = x;
    else if (a == "--reps") reps = x;
    else usage(("unknown option " + a).c_str());
  }
  if (c.dim % 256 != 0 || c.ffn_dim % 256 != 0) usage("--dim and --ffn must be multiples of 256 (K-quant super-blocks)");
  const std::string dir = "/tmp/osd-bench-kquant-" + std::to_string(::getpid());
  const std::string f16 = dir + "-f16.gguf", kmix = dir + "-q4km.gguf", k3mix = dir + "-q3km.gguf";
  write_random_gguf(f16, c, 7, gguf::TensorType::F16);
  write_k_mix(f16, kmix, gguf::TensorType::Q4_K);
  write_k_mix(f16, k3mix, gguf::TensorType::Q3_K);
  std::remove(f16.c_str());
  const double probe = measure_bandwidth(size_t(256) << 20, 5).read_bytes_per_s;
  std::vector<Row> rows;
  for (gguf::TensorType t : {gguf::TensorType::Q4_0, gguf::TensorType::Q8_0, gguf::TensorType::IQ4_XS,
                             gguf::TensorType::IQ4_NL, gguf::TensorType::Q2_K}) {
    const char* name = gguf::type_info(t).name;
    const std::string path = dir + "-" + name + ".gguf";
    write_random_gguf(path, c, 7, t);
    rows.push_back(measure(name, path, reps));
    std::remove(path.c_str());
    if (t == gguf::TensorType::Q4_0) {
      rows.push_back(measure("Q4_K_M-style (Q4_K + Q6_K)", kmix, reps));
      rows.push_back(measure("Q3_K + Q6_K", k3mix, reps));
    }
  }
  std::remove(kmix.c_str());
  std::remove(k3mix.c_str());
  std::printf("random llama: width %d, %d layers, %d tokens; read probe %.1f GB/s; %s\n", c.dim, c.n_layers, c.vocab,
              probe / 1e9, quant::isa_name(quant::best_isa()));
  std::printf("%-28s %9s %9s %9s %8s %9s %11s %10s\n", "weights", "MB/token", "1 tok ms", "GB/s", "xProbe", "5 tok ms",
              "prefill t/s", "x Q4_0 1t");
  std::string out = "{\"bench\":\"kquant_model\",\"probeReadGBs\":" + std::to_string(probe / 1e9) + ",\"isa\":\"" +
                    quant::isa_name(quant::best_isa()) + "\",\"rows\":[";
  for (size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    const double gbs = r.mb / r.one_ms;  // MB per ms = GB/s
    std::printf("%-28s %9.1f %9.2f %9.1f %8.3f %9.2f %11.0f %10.2f\n", r.name.c_str(), r.mb, r.one_ms, gbs, gbs * 1e9 / probe,
                r.five_ms, r.prefill_tps, rows[0].one_ms / r.one_ms);
    out += std::string(i ? "," : "") + "{\"weights\":\"" + r.name + "\",\"mbPerToken\":" + std::to_string(r.mb) +
           ",\"oneTokenMs\":" + std::to_string(r.one_ms) + ",\"fiveTokenMs\":" + std::to_string(r.five_ms) +
           ",\"prefillTokensPerSecond\":" + std::to_string(r.prefill_tps) + ",\"xProbe\":" + std::to_string(gbs * 1e9 / probe) + "}";
  }
  out += "]}\n";
  if (!json.empty()) {
    std::FILE* f = std::fopen(json.c_str(), "w");
    if (!f || std::fputs(out.c_str(), f) < 0 || std::fclose(f) != 0) {
      std::fprintf(stderr, "cannot write %s\n", json.c_str());
      return 1;
    }
  }
  return 0;
}
