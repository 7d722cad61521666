// The CPU backend's temperature-only chain verification and forward-KL loss timed without Node:
// no N-API cost, so what a change to native/ does to a kernel shows on its own. Inputs rotate
// through a working set larger than the caches (as bench/kernels.ts does); the median call is
// reported as effective GB/s and as a ratio to a read probe run in the same process.
//
//   bench_cpu_kernels [--op chain|fkl|both] [--vocab V] [--g G] [--batch B] [--calls N]
//                     [--rotate-mb MB] [--json]
//
// Effective bytes as in bench/kernels.ts: a chain reads B (2g + 1) V floats; forward KL over
// N = B g rows reads student and teacher and writes the gradient, 3 N V floats.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/bandwidth.h"
#include "core/thread_pool.h"

using namespace osd;

namespace {

double now_us() {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct Options {
  std::string op = "both";
  int vocab = 32000, g = 1, batch = 1, calls = 2000;
  size_t rotate_mb = 256;
  bool json = false;
};

[[noreturn]] void usage(const char* why) {
  std::fprintf(stderr,
               "%s\nusage: bench_cpu_kernels [--op chain|fkl|both] [--vocab V] [--g G] [--batch B] [--calls N] "
               "[--rotate-mb MB] [--json]\n",
               why);
  std::exit(2);
}

int int_arg(const char* name, const char* v, int lo) {
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  if (!*v || *end || x < lo || x > (1 << 30)) usage((std::string(name) + " must be an integer >= " + std::to_string(lo)).c_str());
  return static_cast<int>(x);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--json") {
      o.json = true;
      continue;
    }
    if (i + 1 >= argc) usage(("missing value after " + a).c_str());
    const char* v = argv[++i];
    if (a == "--op") o.op = v;
    else if (a == "--vocab") o.vocab = int_arg("--vocab", v, 1);
    else if (a == "--g") o.g = int_arg("--g", v, 1);
    else if (a == "--batch") o.batch = int_arg("--batch", v, 1);
    else if (a == "--calls") o.calls = int_arg("--calls", v, 5);
    else if (a == "--rotate-mb") o.rotate_mb = static_cast<size_t>(int_arg("--rotate-mb", v, 1));
    else usage(("unknown option " + a).c_str());
  }
  if (o.op != "chain" && o.op != "fkl" && o.op != "both") usage("--op must be chain, fkl or both");
  return o;
}

struct Timing {
  double median_us = 0, p10_us = 0, p90_us = 0;
};

template <class Call>
Timing time_calls(int calls, Call&& call) {
  for (int w = 0; w < 5; ++w) call(w);
  std::vector<double> t(calls);
  for (int c = 0; c < calls; ++c) {
    const double a = now_us();
    call(c + 5);
    t[c] = now_us() - a;
  }
  std::sort(t.begin(), t.end());
  return {t[t.size() / 2], t[t.size() / 10], t[t.size() * 9 / 10]};
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  const size_t V = static_cast<size_t>(o.vocab), G = static_cast<size_t>(o.g), B = static_cast<size_t>(o.batch);
  Backend& be = cpu_backend();
  const int threads = default_pool().size();
  const double probe = measure_bandwidth(size_t(256) << 20, 5).read_bytes_per_s;

  // Target logits ~ N(0, 3^2), draft = target + N(0, 1.5^2) (partial acceptance, as bench/kernels.ts).
  std::mt19937 rng(12345);
  std::normal_distribution<float> target_noise(0.0f, 3.0f), draft_noise(0.0f, 1.5f);
  auto fill_pair = [&](float* t, float* d, size_t n) {
    for (size_t j = 0; j < n; ++j) t[j] = target_noise(rng), d[j] = t[j] + draft_noise(rng);
  };
  const size_t rotate_floats = (o.rotate_mb << 20) / sizeof(float);
  std::string json = "{\"bench\":\"cpu_kernels\",\"threads\":" + std::to_string(threads) +
                     ",\"probeReadGBs\":" + std::to_string(probe / 1e9) + ",\"rows\":[";
  bool first_row = true;
  auto report = [&](const char* op, double bytes, const Timing& t, double extra, const char* extra_name) {
    const double gbs = bytes / t.median_us / 1e3;
    if (!o.json)
      std::printf("%-5s V=%zu g=%zu B=%zu: median %.1f us (p10 %.1f, p90 %.1f), %.2f GB/s, %.3f of the read probe (%.1f GB/s), %s %.2f\n",
                  op, V, G, B, t.median_us, t.p10_us, t.p90_us, gbs, gbs * 1e9 / probe, probe / 1e9, extra_name, extra);
    json += std::string(first_row ? "" : ",") + "{\"op\":\"" + op + "\",\"V\":" + std::to_string(V) +
            ",\"g\":" + std::to_string(G) + ",\"batch\":" + std::to_string(B) +
            ",\"medianUs\":" + std::to_string(t.median_us) + ",\"p10Us\":" + std::to_string(t.p10_us) +
            ",\"p90Us\":" + std::to_string(t.p90_us) + ",\"gbps\":" + std::to_string(gbs) +
            ",\"xProbe\":" + std::to_string(gbs * 1e9 / probe) + ",\"" + extra_name + "\":" + std::to_string(extra) + "}";
    first_row = false;
  };

  if (o.op != "fkl") {
    const size_t per_t = B * (G + 1) * V, per_d = B * G * V;
    const size_t slots = std::max<size_t>(1, rotate_floats / (per_t + per_d));
    std::vector<float> T(slots * per_t), D(slots * per_d);
    for (size_t s = 0; s < slots * B; ++s)
      for (size_t i = 0; i <= G; ++i) {
        float* t = &T[(s * (G + 1) + i) * V];
        if (i < G) fill_pair(t, &D[(s * G + i) * V], V);
        else for (size_t j = 0; j < V; ++j) t[j] = target_noise(rng);
      }
    // Draft tokens drawn from the draft rows (Gumbel-max), as a draft model would propose them.
    std::vector<int32_t> tokens(slots * B * G);
    std::uniform_real_distribution<float> uni(1e-7f, 1.0f);
    for (size_t r = 0; r < tokens.size(); ++r) {
      const float* d = &D[r * V];
      float best = -1e30f;
      for (size_t j = 0; j < V; ++j) {
        const float v = d[j] - std::log(-std::log(uni(rng)));
        if (v > best) best = v, tokens[r] = static_cast<int32_t>(j);
      }
    }
    std::vector<int32_t> lengths(B, o.g), accepted(B), out(B * (G + 1));
    std::vector<uint64_t> streams(B);
    for (size_t b = 0; b < B; ++b) streams[b] = b;
    std::vector<Sampling> sampling(B);
    for (auto& s : sampling) s.temperature = 1.0f;
    double accepted_sum = 0;
    const Timing t = time_calls(o.calls, [&](int c) {
      const size_t s = static_cast<size_t>(c) % slots;
      ChainBatch in;
      in.target = &T[s * per_t];
      in.draft = &D[s * per_d];
      in.tokens = &tokens[s * B * G];
      in.lengths = lengths.data();
      in.streams = streams.data();
      in.sampling = sampling.data();
      in.batch = o.batch;
      in.vocab = o.vocab;
      in.seed = static_cast<uint64_t>(c);
      ChainBatchOut res{accepted.data(), out.data()};
      be.verify_chain_batch(in, res);
      for (int32_t a : accepted) accepted_sum += a;
    });
    report("chain", double(B * (2 * G + 1) * V * sizeof(float)), t, accepted_sum / (double(o.calls + 5) * B), "meanAccepted");
  }

  if (o.op != "chain") {
    const size_t rows = B * G, per = rows * V;
    const size_t slots = std::max<size_t>(1, rotate_floats / (2 * per));
    std::vector<float> S(slots * per), T(slots * per), grad(per);
    for (size_t s = 0; s < slots * rows; ++s) fill_pair(&T[s * V], &S[s * V], V);
    double loss_sum = 0;
    const Timing t = time_calls(o.calls, [&](int c) {
      const size_t s = static_cast<size_t>(c) % slots;
      DistillInput in;
      in.kind = DistillKind::ForwardKL;
      in.student = &S[s * per];
      in.teacher = &T[s * per];
      in.rows = static_cast<int32_t>(rows);
      in.vocab = o.vocab;
      loss_sum += be.distill_loss(in, grad.data());
    });
    report("fkl", double(3 * per * sizeof(float)), t, loss_sum / (o.calls + 5), "meanLoss");
  }
  json += "]}";
  if (o.json) std::printf("%s\n", json.c_str());
  return 0;
}
