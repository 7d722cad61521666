// Batched chain steps (chain_step_batch) and joined chain runs (chain_run_joined): every member's
// draft tokens, accepted tokens, target logits and caches are the bits of its own chain_step and
// chain_run, whatever it is batched with.
#include <atomic>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <unistd.h>
#include <vector>

#include "check.h"
#include "core/error.h"
#include "core/thread_pool.h"
#include "model/chain_step.h"
#include "io/gguf.h"
#include "model/model_io.h"
#include "model/random_model.h"

using namespace osd;

namespace {

const char* kStories = "../shared/models/stories260K.bin";

// The target (stories260K) and a draft: the same model stored as Q4_0, close to the target but not
// equal, so chains are partly accepted.
struct Pair {
  std::shared_ptr<Model> target, draft;
};

Pair load_pair() {
  if (FILE* f = std::fopen(kStories, "rb")) std::fclose(f);
  else {
    std::printf("skip: %s not found\n", kStories);
    return {};
  }
  Pair p;
  p.target = Model::load(kStories);
  const std::string path = "/tmp/osd-test-chain-draft-" + std::to_string(::getpid()) + ".gguf";
  save_gguf(*p.target, path, gguf::TensorType::Q4_0);
  p.draft = Model::load(path);
  std::remove(path.c_str());
  return p;
}

Sampling sampling_of(int k) {
  Sampling s;
  switch (k % 4) {
    case 0: s.temperature = 0; break;
    case 1: s.temperature = 0.8f; break;
    case 2: s.temperature = 1.0f, s.top_k = 20; break;
    default: s.temperature = 1.2f, s.top_p = 0.9f; break;
  }
  return s;
}

// A prompt of n tokens, different per k.
std::vector<int32_t> prompt_of(int k, int n) {
  std::vector<int32_t> t = {1};
  for (int i = 1; i < n; ++i) t.push_back((37 * k + 11 * i + 5) % 500 + 6);
  return t;
}

bool same_bits(const float* a, const float* b, size_t n) { return std::memcmp(a, b, n * sizeof(float)) == 0; }

// A target and draft sequence holding a prompt but its last token (the first step's `last`), the
// draft's pending tokens being that last token.
struct Member {
  std::unique_ptr<Sequence> target, draft;
  std::vector<int32_t> pending;
  int32_t last = 0;
};

Member member_of(const Pair& p, int k) {
  Member m;
  m.target = std::make_unique<Sequence>(p.target);
  m.draft = std::make_unique<Sequence>(p.draft);
  const std::vector<int32_t> t = prompt_of(k, 3 + 2 * k);
  const int32_t V = p.target->config().vocab;
  std::vector<float> scratch(t.size() * V);
  m.target->evaluate(t.data(), static_cast<int32_t>(t.size()) - 1, nullptr, scratch.data());
  m.draft->evaluate(t.data(), static_cast<int32_t>(t.size()) - 1, nullptr, scratch.data());
  m.last = t.back();
  m.pending = {t.back()};
  return m;
}

}  // namespace

// Five members (chains of 1-6 tokens, four sampling modes, one cut to 500 of the 512 tokens) batched
// for 12 steps against the same members stepped alone.
OSD_TEST(chain_step_batch_equals_each_step_alone) {
  Pair pr = load_pair();
  if (!pr.target) return;
  const int n = 5;
  const int32_t gs[n] = {1, 3, 4, 6, 2};
  std::vector<Member> alone, batched;
  std::vector<ChainStepParams> ps(n);
  for (int k = 0; k < n; ++k) {
    alone.push_back(member_of(pr, k));
    batched.push_back(member_of(pr, k));
    ps[k].count = gs[k];
    ps[k].vocab = k == 4 ? 500 : 512;
    ps[k].sampling = sampling_of(k);
    ps[k].seed = 1000 + k;
  }
  int accepted_total = 0, drafted_total = 0;
  for (int step = 0; step < 12; ++step) {
    std::vector<std::vector<int32_t>> dt_a(n), out_a(n), dt_b(n), out_b(n);
    std::vector<std::vector<float>> lg_a(n), lg_b(n);
    std::vector<ChainStepMember> members;
    std::vector<int32_t> d_before(n);
    for (int k = 0; k < n; ++k) {
      d_before[k] = alone[k].draft->length();
      ps[k].target_stream = 2 * step, ps[k].draft_stream = 2 * step + 1;
      const int32_t g = gs[k], V = ps[k].vocab;
      dt_a[k].resize(g), out_a[k].resize(g + 1), lg_a[k].resize(static_cast<size_t>(g + 1) * V);
      dt_b[k].resize(g), out_b[k].resize(g + 1), lg_b[k].resize(static_cast<size_t>(g + 1) * V);
      Member& a = alone[k];
      const int32_t acc = chain_step(*a.target, *a.draft, a.pending.data(), static_cast<int32_t>(a.pending.size()), a.last,
                                     ps[k], dt_a[k].data(), out_a[k].data(), lg_a[k].data());
      out_a[k].resize(acc + 1);
      Member& b = batched[k];
      members.push_back({b.target.get(), b.draft.get(), b.pending.data(), static_cast<int32_t>(b.pending.size()), b.last,
                         &ps[k], dt_b[k].data(), out_b[k].data(), lg_b[k].data()});
    }
    chain_step_batch(members.data(), n);
    for (int k = 0; k < n; ++k) {
      const int32_t acc = members[k].accepted;
      CHECK_EQ(acc + 1, static_cast<int32_t>(out_a[k].size()));
      CHECK(dt_a[k] == dt_b[k]);
      CHECK(std::equal(out_a[k].begin(), out_a[k].end(), out_b[k].begin()));
      CHECK(same_bits(lg_a[k].data(), lg_b[k].data(), lg_a[k].size()));
      CHECK_EQ(alone[k].target->length(), batched[k].target->length());
      CHECK_EQ(alone[k].draft->length(), batched[k].draft->length());
      accepted_total += acc;
      drafted_total += gs[k];
      // The next step's pending tokens, as chain_run takes them: the emitted ones the draft has not
      // evaluated.
      for (Member* m : {&alone[k], &batched[k]}) {
        const int32_t kept = m->draft->length() - (d_before[k] + static_cast<int32_t>(m->pending.size()));
        m->pending.assign(out_a[k].begin() + kept, out_a[k].end());
        m->last = out_a[k].back();
      }
    }
  }
  std::printf("    accepted %d of %d drafted tokens\n", accepted_total, drafted_total);
  CHECK(accepted_total > 0 && accepted_total < drafted_total);  // both outcomes are exercised
}

namespace {

// A member's runs: each run's pending tokens are the committed ones its draft has not seen.
struct Runner {
  Member m;
  std::vector<int32_t> committed;
  std::vector<ChainRunOut> outs;
};

ChainRunParams run_params(int k, int run) {
  ChainRunParams p;
  p.step.count = 1 + (k + run) % 5;
  p.step.vocab = 512;
  p.step.sampling = sampling_of(k + run);
  p.step.seed = 77 + k;
  p.stream_base = static_cast<uint64_t>(k) << 32;
  p.first_step = 100 * run;
  p.max_steps = 1 + (3 * k + run) % 4;  // short runs: members leave and join often
  p.keep_logits = true;
  return p;
}

void run_all(Runner& r, int k, int runs, bool joined, std::atomic<int>* start) {
  if (start) {  // all threads begin together, so that their runs overlap
    start->fetch_sub(1);
    while (start->load() > 0) std::this_thread::yield();
  }
  for (int run = 0; run < runs; ++run) {
    const ChainRunParams p = run_params(k, run);
    std::vector<int32_t> pending(r.committed.begin() + r.m.draft->length(), r.committed.end());
    ChainRunOut out;
    if (joined)
      chain_run_joined(*r.m.target, *r.m.draft, pending.data(), static_cast<int32_t>(pending.size()), r.committed.back(), p, out);
    else
      chain_run(*r.m.target, *r.m.draft, pending.data(), static_cast<int32_t>(pending.size()), r.committed.back(), p, out);
    r.committed.insert(r.committed.end(), out.tokens.begin(), out.tokens.end());
    r.outs.push_back(std::move(out));
  }
}

Runner runner_of(const Pair& p, int k) {
  Runner r{member_of(p, k), prompt_of(k, 3 + 2 * k), {}};
  return r;
}

}  // namespace

// Six threads' runs joined against the same runs alone, one after another: the same tokens,
// acceptances and logits, and the joined steps really held several runs.
OSD_TEST(chain_run_joined_equals_chain_run) {
  Pair pr = load_pair();
  if (!pr.target) return;
  const int threads = 6, runs = 12;
  std::vector<Runner> alone, joined;
  for (int k = 0; k < threads; ++k) alone.push_back(runner_of(pr, k)), joined.push_back(runner_of(pr, k));
  for (int k = 0; k < threads; ++k) run_all(alone[k], k, runs, false, nullptr);
  const ChainJoinStats before = chain_join_stats();
  std::atomic<int> start{threads};
  std::vector<std::thread> ts;
  for (int k = 0; k < threads; ++k) ts.emplace_back(run_all, std::ref(joined[k]), k, runs, true, &start);
  for (auto& t : ts) t.join();
  const ChainJoinStats after = chain_join_stats();
  for (int k = 0; k < threads; ++k) {
    CHECK(alone[k].committed == joined[k].committed);
    for (int run = 0; run < runs; ++run) {
      const ChainRunOut &a = alone[k].outs[run], &b = joined[k].outs[run];
      CHECK(a.accepted == b.accepted);
      CHECK(a.tokens == b.tokens);
      CHECK(a.logits.size() == b.logits.size() && same_bits(a.logits.data(), b.logits.data(), a.logits.size()));
    }
    CHECK_EQ(alone[k].m.target->length(), joined[k].m.target->length());
    CHECK_EQ(alone[k].m.draft->length(), joined[k].m.draft->length());
  }
  const double steps = static_cast<double>(after.steps - before.steps), members = static_cast<double>(after.members - before.members);
  std::printf("    %.0f joined steps, %.2f runs per step\n", steps, members / steps);
  CHECK(steps > 0 && members / steps > 1.2);
}

// A member with bad arguments fails the batched step before any cache changes; a joined run with
// bad arguments fails alone, and the next joined run goes on.
OSD_TEST(chain_batches_check_every_member_first) {
  Pair pr = load_pair();
  if (!pr.target) return;
  Member a = member_of(pr, 0), b = member_of(pr, 1);
  const int32_t ta = a.target->length(), da = a.draft->length(), tb = b.target->length();
  ChainStepParams good, bad;
  good.count = bad.count = 3;
  good.vocab = bad.vocab = 512;
  bad.sampling.top_p = 0;
  std::vector<int32_t> dt(6), out(8);
  std::vector<float> lg(8 * 512);
  ChainStepMember ms[2] = {{a.target.get(), a.draft.get(), a.pending.data(), 1, a.last, &good, dt.data(), out.data(), lg.data()},
                           {b.target.get(), b.draft.get(), b.pending.data(), 1, b.last, &bad, dt.data() + 3, out.data() + 4,
                            lg.data() + 4 * 512}};
  CHECK_THROWS(Error, chain_step_batch(ms, 2), "topP");
  CHECK_EQ(a.target->length(), ta);
  CHECK_EQ(a.draft->length(), da);
  CHECK_EQ(b.target->length(), tb);
  ChainStepMember twice[2] = {ms[0], ms[0]};
  CHECK_THROWS(Error, chain_step_batch(twice, 2), "repeats the sequence");
  CHECK_EQ(a.target->length(), ta);
  CHECK_EQ(a.draft->length(), da);

  ChainRunParams p = run_params(0, 0);
  ChainRunOut o;
  const int32_t bad_last = 512;
  CHECK_THROWS(Error, chain_run_joined(*a.target, *a.draft, a.pending.data(), 1, bad_last, p, o), "last = 512");
  CHECK_EQ(a.target->length(), ta);
  CHECK(chain_run_joined(*a.target, *a.draft, a.pending.data(), 1, a.last, p, o) >= 1);
  CHECK(a.target->length() > ta);
}

// A run whose own context gives NaN draft logits fails alone: the batched step that held it is run
// again one run at a time, and the other runs end as they would alone. The draft is a random model
// (output untied) whose embedding row of token kBad is NaN; the failing run's `last` is kBad.
OSD_TEST(a_run_that_fails_fails_alone_in_a_batch) {
  Pair pr = load_pair();
  if (!pr.target) return;
  const int32_t kBad = 300;
  const std::string path = "/tmp/osd-test-chain-nan-" + std::to_string(::getpid()) + ".gguf";
  ModelConfig c;
  c.vocab = 512, c.dim = 64, c.n_layers = 2, c.n_heads = 4, c.n_kv_heads = 2, c.head_dim = 16, c.ffn_dim = 128, c.context = 512;
  c.tied_output = false;
  write_random_gguf(path, c, 5, gguf::TensorType::F32);
  {
    auto f = gguf::File::open(path);
    const gguf::TensorInfo& e = f->tensor("token_embd.weight");
    const uint64_t at = f->data_offset() + e.offset + static_cast<uint64_t>(kBad) * c.dim * sizeof(float);
    f.reset();
    FILE* w = std::fopen(path.c_str(), "r+b");
    CHECK(w != nullptr);
    const std::vector<float> nan(c.dim, std::nanf(""));
    std::fseek(w, static_cast<long>(at), SEEK_SET);
    std::fwrite(nan.data(), sizeof(float), nan.size(), w);
    std::fclose(w);
  }
  Pair bad_pair{pr.target, Model::load(path)};
  std::remove(path.c_str());
  const int good = 3;
  auto params = [](int k) {
    ChainRunParams p = run_params(k, 0);
    p.max_steps = 24;
    return p;
  };
  // The good runs alone.
  std::vector<ChainRunOut> want(good);
  for (int k = 0; k < good; ++k) {
    Member m = member_of(bad_pair, k);
    const ChainRunParams p = params(k);
    chain_run(*m.target, *m.draft, m.pending.data(), 1, m.last, p, want[k]);
  }
  const uint64_t retried_before = chain_join_stats().retried;
  int attempts = 0;
  for (; attempts < 40 && chain_join_stats().retried == retried_before; ++attempts) {
    std::vector<Member> ms;
    for (int k = 0; k <= good; ++k) ms.push_back(member_of(bad_pair, k));
    Member& b = ms[good];
    b.last = kBad, b.pending = {kBad};
    const int32_t bt = b.target->length(), bd = b.draft->length();
    std::vector<ChainRunOut> got(good + 1);
    std::vector<std::string> errors(good + 1);
    // The good runs start together; the bad one once their batched steps have begun, so that it
    // joins them.
    std::atomic<int> start{good};
    const uint64_t steps0 = chain_join_stats().steps;
    std::vector<std::thread> ts;
    for (int k = 0; k <= good; ++k)
      ts.emplace_back([&, k] {
        if (k < good) {
          start.fetch_sub(1);
          while (start.load() > 0) std::this_thread::yield();
        } else {
          while (chain_join_stats().steps == steps0) std::this_thread::yield();
        }
        const ChainRunParams p = params(k);
        try {
          chain_run_joined(*ms[k].target, *ms[k].draft, ms[k].pending.data(), 1, ms[k].last, p, got[k]);
        } catch (const std::exception& e) {
          errors[k] = e.what();
        }
      });
    for (auto& t : ts) t.join();
    for (int k = 0; k < good; ++k) {
      CHECK(errors[k].empty());
      CHECK(got[k].tokens == want[k].tokens);
      CHECK(got[k].logits.size() == want[k].logits.size() && same_bits(got[k].logits.data(), want[k].logits.data(), want[k].logits.size()));
    }
    CHECK(errors[good].find("NaN") != std::string::npos);
    CHECK_EQ(b.target->length(), bt);
    CHECK_EQ(b.draft->length(), bd);
  }
  std::printf("    a batched step failed and was narrowed down after %d attempt(s)\n", attempts);
  CHECK(chain_join_stats().retried > retried_before);
}

OSD_TEST_MAIN()
