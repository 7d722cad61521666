// The model pass on the GPU against the CPU engine on the same machine, in the same run, and with
// CUDA graphs against kernel-by-kernel launches: decode steps (one token after a 64-token prompt), a
// 5-token chain pass, a 256-token prefill, and speculative decoding on the default pair. Reports
// time per step, the weights' bandwidth as a fraction of a same-run device-to-device copy, the cost of
// a 5-token pass in 1-token passes, and how many greedy decode steps pick the CPU's token.
//
//   bench_model_pass [--json out.json] [--quick] [MODEL.gguf ...]
//
// Default models: models/default-target.gguf, ../shared/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
// (when present), and a random 8-layer, 1024-wide llama with a 32000-token vocabulary as F16 and as
// Q4_0 (memory-bound shapes). Without a usable device it prints why and exits 0.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common.cuh"
#include "core/thread_pool.h"
#include "cuda_backend.h"
#include "model/chain_step.h"
#include "model/model.h"
#include "model/model_io.h"
#include "model/random_model.h"
#include "model/sequence.h"
#include "model_pass.h"

using namespace osd;

namespace {

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Row {
  std::string model, engine;
  double decode_ms = 0, chain5_ms = 0, prefill_ms = 0, weight_gbps = 0, of_copy = 0;
  int greedy_same = -1, greedy_steps = 0;
};

int argmax(const float* x, int n) {
  int b = 0;
  for (int j = 1; j < n; ++j)
    if (x[j] > x[b]) b = j;
  return b;
}

// Times one engine on `m`; `tokens_out` receives its greedy decode tokens.
Row time_engine(const std::shared_ptr<Model>& m, const std::string& name, const std::string& engine, int steps,
                std::vector<int>& tokens_out) {
  const ModelConfig& c = m->config();
  const int V = c.vocab;
  std::vector<int32_t> prompt(64);
  for (int i = 0; i < 64; ++i) prompt[i] = (i * 977 + 13) % V;
  std::vector<float> logits(size_t(256) * V);
  Row r;
  r.model = name, r.engine = engine;
  {
    Sequence s(m);
    s.evaluate(prompt.data(), 64, nullptr, logits.data(), true);  // warm-up
  }
  Sequence s(m);
  s.evaluate(prompt.data(), 64, nullptr, logits.data(), true);
  int32_t tok = argmax(logits.data(), V);
  std::vector<double> dt;
  for (int i = 0; i < steps; ++i) {
    tokens_out.push_back(tok);
    const double t0 = now_ms();
    s.evaluate(&tok, 1, nullptr, logits.data(), false);
    dt.push_back(now_ms() - t0);
    tok = argmax(logits.data(), V);
  }
  r.decode_ms = median(dt);
  dt.clear();
  const int base = s.length();
  for (int i = 0; i < std::max(3, steps / 4); ++i) {
    const int32_t chain[5] = {tok, 5, 6, 7, 8};
    const double t0 = now_ms();
    s.evaluate(chain, 5, nullptr, logits.data(), false);
    dt.push_back(now_ms() - t0);
    s.truncate(base);
  }
  r.chain5_ms = median(dt);
  dt.clear();
  std::vector<int32_t> long_prompt(256);
  for (int i = 0; i < 256; ++i) long_prompt[i] = (i * 131 + 5) % V;
  for (int i = 0; i < 3; ++i) {
    Sequence p(m);
    const double t0 = now_ms();
    p.evaluate(long_prompt.data(), 256, nullptr, logits.data(), true);
    dt.push_back(now_ms() - t0);
  }
  r.prefill_ms = median(dt);
  r.weight_gbps = double(m->weight_bytes_per_token()) / (r.decode_ms * 1e-3) / 1e9;
  return r;
}

// Speculative decoding, chain g = 4, greedy, up to 64 tokens after a prompt (chain_run:
// draft, target pass and verification per step; verification on the CPU backend): tokens per
// second (the best of two runs after a warm-up), and the emitted tokens.
double speculative_tokens_per_s(const std::shared_ptr<Model>& target, const std::shared_ptr<Model>& draft,
                                const std::vector<int32_t>& prompt, std::vector<int32_t>& tokens) {
  const int V = std::min(target->config().vocab, draft->config().vocab);
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {  // the first warms up (and lets the graphs be captured)
    Sequence t(target), d(draft);
    std::vector<float> scratch(static_cast<size_t>(std::max(target->config().vocab, draft->config().vocab)));
    const int32_t n = static_cast<int32_t>(prompt.size()) - 1;  // the last prompt token goes in the first step
    t.evaluate(prompt.data(), n, nullptr, scratch.data(), true);
    d.evaluate(prompt.data(), n, nullptr, scratch.data(), true);
    ChainRunParams p;
    p.step.count = 4;
    p.step.vocab = V;
    p.step.sampling.temperature = 0.0f;
    p.max_steps = 64;
    p.remaining = 64;
    ChainRunOut out;
    const double t0 = now_ms();
    chain_run(t, d, &prompt[n], 1, prompt[n], p, out);
    const double ms = now_ms() - t0;
    if (rep > 0) best = std::max(best, out.tokens.size() / (ms * 1e-3));
    tokens = out.tokens;
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  std::string json;
  bool quick = false;
  std::vector<std::string> paths;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--json") && i + 1 < argc) json = argv[++i];
    else if (!std::strcmp(argv[i], "--quick")) quick = true;
    else paths.push_back(argv[i]);
  }
  std::string why;
  CudaBackend* be = static_cast<CudaBackend*>(cuda_backend_or_null(&why));
  if (!be) {
    std::printf("bench_model_pass: skipped, no usable CUDA device (%s)\n", why.c_str());
    if (!json.empty())
      if (FILE* f = std::fopen(json.c_str(), "w")) std::fprintf(f, "{\"skipped\": \"no usable CUDA device\"}\n"), std::fclose(f);
    return 0;
  }
  std::printf("device: %s; CPU engine on %zu threads\n", be->device_name().c_str(), default_pool().size());

  // Same-run bandwidth probe: device-to-device copy of 512 MiB, read + write counted.
  double copy_gbps = 0;
  {
    const size_t bytes = size_t(512) << 20;
    void *a, *b;
    OSD_CUDA_CHECK(cudaMalloc(&a, bytes));
    OSD_CUDA_CHECK(cudaMalloc(&b, bytes));
    OSD_CUDA_CHECK(cudaMemset(a, 1, bytes));
    std::vector<double> v;
    for (int i = 0; i < 8; ++i) {
      const double t0 = now_ms();
      OSD_CUDA_CHECK(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice));
      OSD_CUDA_CHECK(cudaDeviceSynchronize());
      if (i >= 2) v.push_back(now_ms() - t0);
    }
    copy_gbps = 2.0 * bytes / (median(v) * 1e-3) / 1e9;
    cudaFree(a);
    cudaFree(b);
  }
  std::printf("device-to-device copy: %.1f GB/s (read + write)\n\n", copy_gbps);

  // Each subject is loaded three times: the CPU engine, the GPU pass launching kernel by kernel, and
  // the GPU pass replaying CUDA graphs for its small passes (the default).
  struct Subject {
    std::string name;
    std::function<std::shared_ptr<Model>()> make;
  };
  std::vector<Subject> subjects;
  auto add_file = [&](const std::string& p) {
    if (FILE* f = std::fopen(p.c_str(), "rb")) std::fclose(f);
    else return std::printf("%s: not found, skipped\n", p.c_str()), void();
    const size_t slash = p.find_last_of('/');
    subjects.push_back({slash == std::string::npos ? p : p.substr(slash + 1), [p] { return Model::load(p); }});
  };
  if (paths.empty()) {
    add_file("models/default-target.gguf");
    add_file("../shared/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    ModelConfig c;
    c.vocab = 32000, c.dim = 1024, c.n_layers = 8, c.n_heads = 16, c.n_kv_heads = 4, c.ffn_dim = 2816, c.context = 2048;
    const std::string rp = "/tmp/osd-bench-model-pass.gguf";
    write_random_gguf(rp, c, 11, gguf::TensorType::F16);
    subjects.push_back({"random 1024x8 F16", [rp] { return Model::load(rp); }});
    auto src = std::shared_ptr<Model>(Model::load(rp));
    subjects.push_back({"random 1024x8 Q4_0", [src] { return convert_model(*src, gguf::TensorType::Q4_0); }});
  } else {
    for (const auto& p : paths) add_file(p);
  }
  const int steps = quick ? 8 : 32;
  std::vector<Row> rows;
  std::printf("%-28s %-11s %11s %11s %13s %12s %9s %10s %s\n", "model", "engine", "decode ms", "chain-5 ms", "5-token/1",
              "prefill ms", "weights", "of copy", "greedy = CPU");
  for (auto& sub : subjects) {
    auto cpu = sub.make();
    std::shared_ptr<Model> gpu[2];  // [0] kernel by kernel, [1] CUDA graphs
    for (int k = 0; k < 2; ++k) {
      gpu[k] = sub.make();
      cuda::set_model_pass_graphs(k);
      gpu[k]->set_device_pass(cuda_model_pass(*gpu[k], &why));
      cuda::set_model_pass_graphs(-1);
    }
    if (!gpu[0]->device_pass() || !gpu[1]->device_pass()) {
      std::printf("%s: no device pass (%s)\n", sub.name.c_str(), why.c_str());
      continue;
    }
    std::vector<int> cpu_tokens, gpu_tokens[2];
    Row rc = time_engine(cpu, sub.name, "cpu", steps, cpu_tokens);
    Row rg[2] = {time_engine(gpu[0], sub.name, "cuda", steps, gpu_tokens[0]),
                 time_engine(gpu[1], sub.name, "cuda+graphs", steps, gpu_tokens[1])};
    for (int k = 0; k < 2; ++k) {
      rg[k].greedy_steps = static_cast<int>(gpu_tokens[k].size());
      rg[k].greedy_same = 0;
      while (rg[k].greedy_same < rg[k].greedy_steps && gpu_tokens[k][rg[k].greedy_same] == cpu_tokens[rg[k].greedy_same])
        ++rg[k].greedy_same;
      rg[k].of_copy = rg[k].weight_gbps / copy_gbps;
    }
    for (const Row& r : {rc, rg[0], rg[1]}) {
      std::printf("%-28s %-11s %11.3f %11.3f %12.2fx %12.2f %6.1f GB/s", r.model.c_str(), r.engine.c_str(), r.decode_ms,
                  r.chain5_ms, r.chain5_ms / r.decode_ms, r.prefill_ms, r.weight_gbps);
      if (r.engine != "cpu") std::printf(" %9.3f %d of %d", r.of_copy, r.greedy_same, r.greedy_steps);
      std::printf("\n");
      rows.push_back(r);
    }
    std::printf("%-28s             GPU decode %.2fx the CPU engine (graphs %.2fx kernel by kernel), prefill %.2fx\n", "",
                rc.decode_ms / rg[1].decode_ms, rg[0].decode_ms / rg[1].decode_ms, rc.prefill_ms / rg[1].prefill_ms);
    std::fflush(stdout);
  }
  // Speculative decoding on the default pair, both models on each engine.
  struct Spec {
    std::string engine;
    double tps = 0;
    int same = 0, steps = 0;
  };
  std::vector<Spec> spec;
  if (FILE* f = std::fopen("models/default-draft.gguf", "rb")) {
    std::fclose(f);
    // The default pair's tokens (BOS 4094) of "Once upon a time, there was a little girl named Lily.
    // She loved to play", the kind of text both were trained on.
    const std::vector<int32_t> prompt = {4094, 1726, 323, 833, 260, 728, 44, 695, 489, 260, 1975, 329, 366,
                                         108,  311,  3207, 605, 795, 46, 358, 261, 1103, 865, 295, 1544};
    std::vector<int32_t> cpu_tokens;
    spec.push_back({"cpu", speculative_tokens_per_s(Model::load("models/default-target.gguf"),
                                                    Model::load("models/default-draft.gguf"), prompt, cpu_tokens)});
    for (int k = 0; k < 2; ++k) {
      std::shared_ptr<Model> m[2] = {Model::load("models/default-target.gguf"), Model::load("models/default-draft.gguf")};
      cuda::set_model_pass_graphs(k);
      for (auto& x : m) x->set_device_pass(cuda_model_pass(*x, &why));
      cuda::set_model_pass_graphs(-1);
      if (!m[0]->device_pass() || !m[1]->device_pass()) break;
      std::vector<int32_t> toks;
      Spec s{k ? "cuda+graphs" : "cuda", speculative_tokens_per_s(m[0], m[1], prompt, toks)};
      s.steps = static_cast<int>(toks.size());
      while (s.same < s.steps && s.same < static_cast<int>(cpu_tokens.size()) && toks[s.same] == cpu_tokens[s.same]) ++s.same;
      spec.push_back(s);
    }
    std::printf("\nspeculative decoding, default pair, chain g = 4, greedy, 64 tokens (verification on the CPU backend):\n");
    for (const Spec& s : spec) {
      std::printf("  %-11s %9.1f tokens/s  %.2fx the CPU engine", s.engine.c_str(), s.tps, s.tps / spec[0].tps);
      if (s.engine != "cpu") std::printf("  (same tokens as the CPU for the first %d of %d)", s.same, s.steps);
      std::printf("\n");
    }
  }
  if (!json.empty()) {
    FILE* f = std::fopen(json.c_str(), "w");
    if (!f) return std::printf("cannot write %s\n", json.c_str()), 1;
    std::fprintf(f, "{\"device\": \"%s\", \"copy_gbps\": %.1f, \"cpu_threads\": %zu, \"rows\": [\n", be->device_name().c_str(),
                 copy_gbps, default_pool().size());
    for (size_t i = 0; i < rows.size(); ++i) {
      const Row& r = rows[i];
      std::fprintf(f,
                   "  {\"model\": \"%s\", \"engine\": \"%s\", \"decode_ms\": %.4f, \"chain5_ms\": %.4f, \"prefill256_ms\": %.3f, "
                   "\"weight_gbps\": %.2f, \"of_copy\": %.4f, \"greedy_same_prefix\": %d, \"greedy_steps\": %d}%s\n",
                   r.model.c_str(), r.engine.c_str(), r.decode_ms, r.chain5_ms, r.prefill_ms, r.weight_gbps, r.of_copy,
                   r.greedy_same, r.greedy_steps, i + 1 < rows.size() ? "," : "");
    }
    std::fprintf(f, "], \"speculative_default_pair\": [");
    for (size_t i = 0; i < spec.size(); ++i)
      std::fprintf(f, "%s{\"engine\": \"%s\", \"tokens_per_s\": %.2f, \"same_prefix\": %d, \"tokens\": %d}", i ? ", " : "",
                   spec[i].engine.c_str(), spec[i].tps, spec[i].same, spec[i].steps);
    std::fprintf(f, "]}\n");
    std::fclose(f);
  }
  return 0;
}
