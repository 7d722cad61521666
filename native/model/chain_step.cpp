#include "model/chain_step.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "backend/select.h"
#include "core/error.h"
#include "core/thread_pool.h"
#include "model/draft.h"

namespace osd {

namespace {

using Clock = std::chrono::steady_clock;

double ms_between(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double, std::milli>(b - a).count(); }

// chain_step's checks of one member, then draft_chain's, and its pending tokens'.
void check_member(const ChainStepMember& m) {
  const ChainStepParams& p = *m.params;
  const int32_t g = p.count, V = p.vocab, vt = m.target->model().config().vocab, vd = m.draft->model().config().vocab;
  if (g < 1) throw_range("count must be >= 1, got " + std::to_string(g));
  if (V < 1 || V > vt)
    throw_range("vocabSize must be in [1, " + std::to_string(vt) + "] (the target's vocabulary), got " + std::to_string(V));
  if (m.last < 0 || m.last >= vt)
    throw_range("last = " + std::to_string(m.last) + " is out of range for a vocabulary of " + std::to_string(vt));
  const int64_t need = int64_t(m.target->length()) + g + 1;
  if (need > m.target->capacity())
    throw_range("the target sequence would hold " + std::to_string(need) + " tokens, more than its context of " +
                std::to_string(m.target->capacity()));
  check_draft_chain(*m.draft, m.n_pending, g, V, p.sampling);
  for (int32_t i = 0; i < m.n_pending; ++i)
    if (m.pending[i] < 0 || m.pending[i] >= vd)
      throw_range("tokens[" + std::to_string(i) + "] = " + std::to_string(m.pending[i]) +
                  " is out of range for a vocabulary of " + std::to_string(vd));
}

// fn(k) for k < n: on the thread pool when there are several members (each call's own
// parallel_for then runs inline), on this thread with its pool for one.
template <class F>
void for_members(size_t n, F&& fn) {
  if (n == 1) return fn(0);
  default_pool().parallel_for(n, 1, [&](size_t lo, size_t hi) {
    for (size_t k = lo; k < hi; ++k) fn(k);
  });
}

}  // namespace

void chain_step_batch(ChainStepMember* members, int32_t count, ChainStepTimes* times) {
  if (count <= 0) throw_range("chain step: at least one member is needed");
  for (int32_t k = 0; k < count; ++k) check_member(members[k]);
  const auto start = Clock::now();
  std::vector<int32_t> t0(count), d0(count);
  for (int32_t k = 0; k < count; ++k) t0[k] = members[k].target->length(), d0[k] = members[k].draft->length();
  auto restore = [&] {
    for (int32_t k = 0; k < count; ++k) {
      if (members[k].target->length() > t0[k]) members[k].target->truncate(t0[k]);
      if (members[k].draft->length() > d0[k]) members[k].draft->truncate(d0[k]);
    }
  };
  // Member k's draft rows (g x V) at row_at[k]; a row as wide as the model's is written in place,
  // a wider one through `wide` and cut to V.
  // (Used through references: the per-member lambdas run on pool threads, where these names would
  // mean those threads' own copies.)
  thread_local std::vector<float> tl_draft_rows, tl_wide;
  std::vector<float>& draft_rows = tl_draft_rows;
  std::vector<float>& wide = tl_wide;
  std::vector<size_t> row_at(count + 1, 0);
  int32_t g_max = 0;
  for (int32_t k = 0; k < count; ++k) {
    const ChainStepParams& p = *members[k].params;
    row_at[k + 1] = row_at[k] + static_cast<size_t>(p.count) * p.vocab;
    g_max = std::max(g_max, p.count);
  }
  draft_rows.resize(row_at[count]);
  std::vector<EvalPart> parts;
  std::vector<int32_t> in_pass;
  Clock::time_point drafted;
  try {
    // Drafting, as draft_chain does it: pass i evaluates the pending tokens (i = 0) or draft token
    // i - 1, and draft token i is drawn from its last row, for every member with more than i tokens.
    const int32_t vd = members[0].draft->model().config().vocab;
    for (int32_t i = 0; i < g_max; ++i) {
      parts.clear();
      in_pass.clear();
      size_t wide_rows = 0;
      for (int32_t k = 0; k < count; ++k)
        if (members[k].params->count > i && members[k].params->vocab != vd) ++wide_rows;
      wide.resize(wide_rows * vd);
      size_t w = 0;
      for (int32_t k = 0; k < count; ++k) {
        const ChainStepMember& m = members[k];
        const ChainStepParams& p = *m.params;
        if (p.count <= i) continue;
        float* row = p.vocab == vd ? &draft_rows[row_at[k] + static_cast<size_t>(i) * p.vocab] : &wide[vd * w++];
        if (i == 0) parts.push_back({m.draft, m.pending, m.n_pending, nullptr, row, true});
        else parts.push_back({m.draft, &m.draft_tokens[i - 1], 1, nullptr, row, true});
        in_pass.push_back(k);
      }
      Sequence::evaluate_parts(parts.data(), static_cast<int32_t>(parts.size()));
      for_members(in_pass.size(), [&](size_t j) {
        const ChainStepMember& m = members[in_pass[j]];
        const ChainStepParams& p = *m.params;
        float* row = &draft_rows[row_at[in_pass[j]] + static_cast<size_t>(i) * p.vocab];
        if (p.vocab != vd) std::memcpy(row, parts[j].logits, sizeof(float) * p.vocab);
        const std::vector<int32_t>& head = m.draft->model().config().head_tokens;
        m.draft_tokens[i] = sample_token_sparse(row, p.vocab, head.data(), static_cast<int32_t>(head.size()), p.sampling,
                                                p.seed, p.draft_stream, static_cast<uint32_t>(i), "draft logits", i);
      });
    }
    drafted = Clock::now();
    // The target's pass over `last` and the drafted tokens of every member, then each chain verified
    // with the current backend.
    const int32_t vt = members[0].target->model().config().vocab;
    thread_local std::vector<int32_t> tl_input;
    std::vector<int32_t>& input = tl_input;
    std::vector<size_t> in_at(count + 1, 0), wide_at(count + 1, 0);
    for (int32_t k = 0; k < count; ++k) {
      const ChainStepParams& p = *members[k].params;
      in_at[k + 1] = in_at[k] + p.count + 1;
      wide_at[k + 1] = wide_at[k] + (p.vocab == vt ? 0 : static_cast<size_t>(p.count + 1) * vt);
    }
    input.resize(in_at[count]);
    wide.resize(wide_at[count]);
    parts.clear();
    for (int32_t k = 0; k < count; ++k) {
      const ChainStepMember& m = members[k];
      const ChainStepParams& p = *m.params;
      input[in_at[k]] = m.last;
      std::copy(m.draft_tokens, m.draft_tokens + p.count, &input[in_at[k] + 1]);
      float* out = p.vocab == vt ? m.target_logits : &wide[wide_at[k]];
      parts.push_back({m.target, &input[in_at[k]], p.count + 1, nullptr, out, false});
    }
    Sequence::evaluate_parts(parts.data(), count);
    for_members(count, [&](size_t k) {
      ChainStepMember& m = members[k];
      const ChainStepParams& p = *m.params;
      if (p.vocab != vt)
        for (int32_t i = 0; i <= p.count; ++i)
          std::memcpy(m.target_logits + static_cast<size_t>(i) * p.vocab, &wide[wide_at[k] + static_cast<size_t>(i) * vt],
                      sizeof(float) * p.vocab);
      int32_t len = p.count;
      uint64_t stream = p.target_stream;
      ChainBatch b;
      b.target = m.target_logits;
      b.draft = p.sampling.greedy() ? nullptr : &draft_rows[row_at[k]];
      b.tokens = m.draft_tokens;
      b.lengths = &len;
      b.streams = &stream;
      b.sampling = &p.sampling;
      b.batch = 1;
      b.vocab = p.vocab;
      b.seed = p.seed;
      ChainBatchOut bo{&m.accepted, m.out_tokens};
      current_backend().verify_chain_batch(b, bo);
    });
  } catch (...) {
    restore();
    throw;
  }
  // Keep `last` and the accepted tokens; the draft evaluated its pending tokens and draft tokens
  // 0..g-2, of which the accepted ones stay.
  for (int32_t k = 0; k < count; ++k) {
    const ChainStepMember& m = members[k];
    m.target->truncate(t0[k] + 1 + m.accepted);
    if (m.draft->length() > d0[k] + m.n_pending + m.accepted) m.draft->truncate(d0[k] + m.n_pending + m.accepted);
  }
  if (times) {
    times->draft_ms = ms_between(start, drafted);
    times->target_ms = ms_between(drafted, Clock::now());
  }
}

int32_t chain_step(Sequence& target, Sequence& draft, const int32_t* pending, int32_t n_pending, int32_t last,
                   const ChainStepParams& p, int32_t* draft_tokens, int32_t* out_tokens, float* target_logits,
                   ChainStepTimes* times) {
  ChainStepMember m{&target, &draft, pending, n_pending, last, &p, draft_tokens, out_tokens, target_logits};
  chain_step_batch(&m, 1, times);
  return m.accepted;
}

namespace {

// The longest a batched step waits for runs that paused at the step before: a quarter of that
// step's time, at most 2 ms, and only after steps of 4 ms or more. Their callers' round trip took
// 0.5-1 ms in Node: on SmolLM2-135M, where a step of four runs takes 15-20 ms, waiting keeps the
// batches full (3.5 runs of 4 against 2.1, 1.2x the tokens/s); on the default pair, 1-2 ms steps,
// it cost more than it gained.
constexpr double kMinGraceStepMs = 4.0;
constexpr double kMaxGraceMs = 2.0;
constexpr double kGraceOfStep = 0.25;

// One chain run's state between its steps: what chain_run keeps in its loop.
class RunState {
 public:
  RunState(Sequence& target, Sequence& draft, const int32_t* pending, int32_t n_pending, int32_t last, const ChainRunParams& p,
           ChainRunOut& out, const std::atomic<bool>* interrupt)
      : target_(target), draft_(draft), p_(p), out_(out), interrupt_(interrupt), next_(pending, pending + n_pending),
        last_(last), draft_tokens_(p.step.count), emitted_(p.step.count + 1),
        rows_(static_cast<size_t>(p.step.count + 1) * p.step.vocab), remaining_(p.remaining), t_start_(target.length()),
        d_start_(draft.length()), start_(Clock::now()) {
    out.accepted.clear();
    out.tokens.clear();
    out.logits.clear();
    out.times = ChainStepTimes{};
  }

  // The next step's member, with its step's Philox streams.
  ChainStepMember member() {
    sp_ = p_.step;
    const uint64_t s = static_cast<uint64_t>(p_.first_step) + static_cast<uint64_t>(steps_);
    sp_.target_stream = p_.stream_base + 2 * s;
    sp_.draft_stream = sp_.target_stream + 1;
    d_before_ = draft_.length();
    return {&target_, &draft_, next_.data(), static_cast<int32_t>(next_.size()), last_, &sp_,
            draft_tokens_.data(), emitted_.data(), rows_.data()};
  }

  // Records a step that accepted a tokens, and says whether the run goes on: Over when it emitted a
  // stop token, Paused when it ends for its step or time budget, an interrupt or the room left (the
  // caller usually runs again at once).
  enum class Next { Step, Paused, Over };
  Next after_step(int32_t a, const ChainStepTimes& t) {
    const int32_t g = p_.step.count, V = p_.step.vocab;
    out_.times.draft_ms += t.draft_ms;
    out_.times.target_ms += t.target_ms;
    out_.accepted.push_back(a);
    out_.tokens.insert(out_.tokens.end(), emitted_.begin(), emitted_.begin() + a + 1);
    if (p_.keep_logits) out_.logits.insert(out_.logits.end(), rows_.begin(), rows_.begin() + static_cast<size_t>(a + 1) * V);
    ++steps_;
    remaining_ -= a + 1;
    bool stop = false;
    for (int32_t i = 0; i <= a && !stop; ++i) stop = p_.n_stop > 0 && std::binary_search(p_.stop, p_.stop + p_.n_stop, emitted_[i]);
    // The committed tokens are the target's cache and `last` (the correction or bonus token).
    const int64_t committed = int64_t(target_.length()) + 1;
    const bool room = remaining_ > g && committed + g + 1 <= target_.capacity() && committed + g + 1 <= draft_.capacity();
    const double ms = ms_between(start_, Clock::now());
    if (stop) return Next::Over;
    if (!room || steps_ >= p_.max_steps || (p_.max_ms > 0 && ms >= p_.max_ms)) return Next::Paused;
    if (interrupt_ && interrupt_->load(std::memory_order_relaxed)) return Next::Paused;
    // The draft holds what it had, the pending tokens and the accepted ones it evaluated; the rest
    // of the emitted tokens are the next step's pending ones.
    const int32_t kept = draft_.length() - (d_before_ + static_cast<int32_t>(next_.size()));
    next_.assign(emitted_.begin() + kept, emitted_.begin() + a + 1);
    last_ = emitted_[a];
    return Next::Step;
  }

  // After a failed step: the caller gets no tokens, and the caches go back to where the run started.
  void fail() {
    if (target_.length() > t_start_) target_.truncate(t_start_);
    if (draft_.length() > d_start_) draft_.truncate(d_start_);
  }

  int32_t steps() const { return steps_; }
  const Model* target_model() const { return &target_.model(); }
  const Model* draft_model() const { return &draft_.model(); }

 private:
  Sequence& target_;
  Sequence& draft_;
  const ChainRunParams& p_;
  ChainRunOut& out_;
  const std::atomic<bool>* interrupt_;
  ChainStepParams sp_;
  std::vector<int32_t> next_;
  int32_t last_;
  std::vector<int32_t> draft_tokens_, emitted_;
  std::vector<float> rows_;
  int64_t remaining_;
  int32_t steps_ = 0, d_before_ = 0;
  const int32_t t_start_, d_start_;
  const Clock::time_point start_;
};

// The runs of one (target model, draft model) pair in chain_run_joined.
struct Joiner {
  RunState* run = nullptr;
  bool lead = false, done = false;
  std::exception_ptr error;
};
struct JoinGroup {
  std::vector<Joiner*> active, joining;
  bool led = false;
  // Runs that paused at the last step boundary (their caller usually starts the next run at once),
  // not yet back, that step's time and end. A group whose runs all paused stays for them.
  int expected = 0;
  double step_ms = 0;
  Clock::time_point step_end;
};

std::mutex g_join_mu;
std::condition_variable g_join_cv;    // a run's end, or the lead handed on
std::condition_variable g_joined_cv;  // a run joined
std::map<std::pair<const Model*, const Model*>, JoinGroup> g_groups;
ChainJoinStats g_join_stats;

// One batched step of `batch`: each run's outcome, or its error (its caches then as they were
// before its run). Should the batched step fail, every cache is back where the step started, so
// each run steps again alone and only a run that fails alone fails: one request's bad row (a NaN
// from its own context, say) does not end the others.
void step_batch(const std::vector<Joiner*>& batch, std::vector<RunState::Next>& next, std::vector<std::exception_ptr>& errors) {
  const size_t n = batch.size();
  next.assign(n, RunState::Next::Over);
  errors.assign(n, nullptr);
  std::vector<ChainStepMember> members;
  for (Joiner* j : batch) members.push_back(j->run->member());
  ChainStepTimes t;
  bool together = true;
  try {
    chain_step_batch(members.data(), static_cast<int32_t>(n), &t);
  } catch (...) {
    if (n == 1) errors[0] = std::current_exception();
    together = false;
  }
  if (!together && n > 1) {
    std::lock_guard<std::mutex> lk(g_join_mu);
    ++g_join_stats.retried;
  }
  for (size_t k = 0; k < n; ++k) {
    if (!together && n > 1) {
      try {
        chain_step_batch(&members[k], 1, &t);
      } catch (...) {
        errors[k] = std::current_exception();
      }
    }
    if (!errors[k]) {
      try {
        next[k] = batch[k]->run->after_step(members[k].accepted, t);
      } catch (...) {
        errors[k] = std::current_exception();
      }
    }
    if (errors[k]) batch[k]->run->fail();
  }
}

// The leader's loop (the lock held on entry and on return): steps every run of the group, runs
// joining and leaving between steps, until the leader's own run ends.
void lead_group(JoinGroup& group, Joiner& self, std::unique_lock<std::mutex>& lk) {
  std::vector<RunState::Next> next;
  std::vector<std::exception_ptr> errors;
  while (!self.done) {
    // Runs that paused at the last boundary rejoin after a round trip through their caller; a short
    // wait (a fraction of a step) keeps them in this step instead of leaving them out of it.
    if (group.expected > 0 && group.step_ms >= kMinGraceStepMs) {
      const auto grace = std::chrono::duration<double, std::milli>(std::min(kMaxGraceMs, kGraceOfStep * group.step_ms));
      g_joined_cv.wait_for(lk, grace, [&] { return group.expected == 0; });
    }
    group.expected = 0;
    group.active.insert(group.active.end(), group.joining.begin(), group.joining.end());
    group.joining.clear();
    const std::vector<Joiner*> batch = group.active;
    ++g_join_stats.steps;
    g_join_stats.members += batch.size();
    lk.unlock();
    // The runs' own state is theirs to touch while their threads wait; `done` only under the lock,
    // which is what their threads read.
    const auto t_step = Clock::now();
    step_batch(batch, next, errors);
    const double step_ms = ms_between(t_step, Clock::now());
    lk.lock();
    int paused = 0;
    for (size_t k = 0; k < batch.size(); ++k) {
      batch[k]->done = errors[k] || next[k] != RunState::Next::Step;
      batch[k]->error = errors[k];
      paused += !errors[k] && next[k] == RunState::Next::Paused;
    }
    group.expected = paused;
    group.step_ms = step_ms;
    group.step_end = Clock::now();
    auto& act = group.active;
    act.erase(std::remove_if(act.begin(), act.end(), [](Joiner* j) { return j->done; }), act.end());
    g_join_cv.notify_all();
  }
}

}  // namespace

int32_t chain_run(Sequence& target, Sequence& draft, const int32_t* pending, int32_t n_pending, int32_t last,
                  const ChainRunParams& p, ChainRunOut& out, const std::atomic<bool>* interrupt) {
  RunState run(target, draft, pending, n_pending, last, p, out, interrupt);
  for (;;) {
    ChainStepMember m = run.member();
    ChainStepTimes t;
    try {
      chain_step_batch(&m, 1, &t);
    } catch (...) {
      run.fail();
      throw;
    }
    if (run.after_step(m.accepted, t) != RunState::Next::Step) break;
  }
  return run.steps();
}

int32_t chain_run_joined(Sequence& target, Sequence& draft, const int32_t* pending, int32_t n_pending, int32_t last,
                         const ChainRunParams& p, ChainRunOut& out, const std::atomic<bool>* interrupt) {
  RunState run(target, draft, pending, n_pending, last, p, out, interrupt);
  // Checked before joining, so that a run with bad arguments fails alone. Its later steps start only
  // with room for them (after_step), so these checks hold for them too.
  check_member(run.member());
  Joiner self;
  self.run = &run;
  const auto key = std::make_pair(run.target_model(), run.draft_model());
  std::unique_lock<std::mutex> lk(g_join_mu);
  // Groups left waiting for runs that did not come back (their requests ended) go after a second.
  for (auto it = g_groups.begin(); it != g_groups.end();) {
    const JoinGroup& gr = it->second;
    const bool idle = !gr.led && gr.active.empty() && gr.joining.empty();
    it = idle && ms_between(gr.step_end, Clock::now()) > 1000 ? g_groups.erase(it) : std::next(it);
  }
  JoinGroup* group = &g_groups[key];
  group->joining.push_back(&self);
  if (group->expected > 0) {
    --group->expected;
    g_joined_cv.notify_all();
  }
  if (!group->led) group->led = self.lead = true;
  g_join_cv.wait(lk, [&] { return self.done || self.lead; });
  if (!self.lead) {  // another thread led this run to its end
    lk.unlock();
    if (self.error) std::rethrow_exception(self.error);
    return run.steps();
  }
  // Leading: step every run of the group until this one ends, then hand the lead on.
  try {
    lead_group(*group, self, lk);
  } catch (...) {
    // Only bookkeeping can throw here (an allocation): no run may be left waiting for a lead that
    // never comes, so every run of the group fails with the error, its caches as they were.
    if (!lk.owns_lock()) lk.lock();
    const std::exception_ptr error = std::current_exception();
    for (auto* list : {&group->active, &group->joining}) {
      for (Joiner* j : *list) {
        if (list == &group->active) j->run->fail();
        j->error = error;
        j->done = true;
      }
      list->clear();
    }
    if (!self.done) {
      run.fail();
      self.error = error;
      self.done = true;
    }
    group->expected = 0;
  }
  // This run is over: the lead passes to a run still in the group; or the group waits, unled, for
  // the runs that paused; or it ends.
  if (!group->active.empty()) group->active.front()->lead = true;
  else if (!group->joining.empty()) group->joining.front()->lead = true;
  else if (group->expected > 0) group->led = false;
  else g_groups.erase(key);
  g_join_cv.notify_all();
  lk.unlock();
  if (self.error) std::rethrow_exception(self.error);
  return run.steps();
}

ChainJoinStats chain_join_stats() {
  std::lock_guard<std::mutex> lk(g_join_mu);
  return g_join_stats;
}

}  // namespace osd
