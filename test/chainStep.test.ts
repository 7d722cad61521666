// Sequence.chainStep, a speculative chain step in one native call: it must give what the three
// calls it replaces give (Sequence.draft, Sequence.evaluate, verifyChain) bit for bit, leave both
// caches as they would, check its arguments and leave the caches alone on an error.
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { chainBatchStats, createSpeculativeDecoder, loadModel, verifyChain, type Model, type SamplingOptions, type Sequence } from '../lib/index.js';

const TARGET = join(import.meta.dirname, '../models/default-target.gguf');
const DRAFT = join(import.meta.dirname, '../models/default-draft.gguf');

function sameBits(a: Float32Array, b: Float32Array): boolean {
  if (a.length !== b.length) return false;
  const x = new Uint32Array(a.buffer, a.byteOffset, a.length);
  const y = new Uint32Array(b.buffer, b.byteOffset, b.length);
  return x.every((v, i) => v === y[i]);
}

/** Rows cut to their first V entries. */
function cut(rows: Float32Array, width: number, V: number): Float32Array {
  if (width === V) return rows;
  const n = rows.length / width;
  const out = new Float32Array(n * V);
  for (let i = 0; i < n; i++) out.set(rows.subarray(i * width, i * width + V), i * V);
  return out;
}

describe('Sequence.chainStep (default pair)', () => {
  let target: Model;
  let draft: Model;
  // English the pair was trained on, so that some drafts are accepted.
  let context: number[] = [];
  beforeAll(async () => {
    [target, draft] = await Promise.all([loadModel(TARGET), loadModel(DRAFT)]);
    context = Array.from(target.tokenizer!.encode('The President said that the people of the United States', { addBos: true }));
  });
  afterAll(async () => {
    await Promise.all([target?.dispose(), draft?.dispose()]);
  });

  /** Target and draft sequences holding the context but its last token (the draft also misses `behind` more). */
  async function pair(behind: number): Promise<[Sequence, Sequence]> {
    const T = target.createSequence();
    const D = draft.createSequence();
    await T.evaluate(context.slice(0, -1));
    await D.evaluate(context.slice(0, -1 - behind));
    return [T, D];
  }

  const cases: { name: string; sampling: SamplingOptions; seed: number | bigint }[] = [
    { name: 'greedy', sampling: { temperature: 0 }, seed: 0 },
    { name: 'T = 1', sampling: { temperature: 1 }, seed: 3 },
    { name: 'T = 0.7, top-k 12', sampling: { temperature: 0.7, topK: 12 }, seed: 2n ** 50n + 9n },
    { name: 'T = 1.2, top-p 0.8', sampling: { temperature: 1.2, topP: 0.8 }, seed: 8 },
  ];
  for (const c of cases) {
    it(`gives the tokens, rows and caches of draft + evaluate + verifyChain, bit for bit (${c.name})`, async () => {
      let accepts = 0;
      for (const [g, behind, V] of [[1, 0, 4096], [3, 2, 4096], [6, 1, 4096], [4, 0, 3000]] as const) {
        for (let trial = 0; trial < 4; trial++) {
          const draftStream = 100 + trial;
          const targetStream = 200 + trial;
          const last = context[context.length - 1]!;
          const pending = context.slice(D0(behind));
          // The three calls.
          const [Ta, Da] = await pair(behind);
          const d = await Da.draft(pending, { count: g, vocabSize: V, sampling: c.sampling, seed: c.seed, stream: draftStream });
          const tl = cut(await Ta.evaluate([last, ...d.tokens]), 4096, V);
          const v = verifyChain({ targetLogits: tl, draftLogits: d.logits, draftTokens: d.tokens, vocabSize: V, sampling: c.sampling, seed: c.seed, stream: targetStream });
          const a = v.acceptedCount;
          Ta.truncate(context.length + a);
          if (Da.length > context.length + a) Da.truncate(context.length + a);
          // The one call.
          const [Tb, Db] = await pair(behind);
          const s = await Tb.chainStep(Db, pending, { last, count: g, vocabSize: V, sampling: c.sampling, seed: c.seed, draftStream, targetStream });
          expect(s.acceptedCount).toBe(a);
          expect(Array.from(s.tokens)).toEqual(Array.from(v.tokens));
          expect(Array.from(s.draftTokens)).toEqual(Array.from(d.tokens));
          expect(sameBits(s.targetLogits, tl.subarray(0, (a + 1) * V))).toBe(true);
          expect(s.draftMs).toBeGreaterThan(0);
          expect(s.targetMs).toBeGreaterThan(0);
          // Both caches hold the same tokens: the next passes agree bit for bit.
          expect([Tb.length, Db.length]).toEqual([Ta.length, Da.length]);
          const next = [s.tokens[a]!];
          expect(sameBits(await Tb.evaluate(next), await Ta.evaluate(next))).toBe(true);
          const dnext = context.length + a > Db.length ? [...context, ...s.tokens].slice(Db.length, context.length + a + 1) : next;
          expect(sameBits(await Db.evaluate(dnext), await Da.evaluate(dnext))).toBe(true);
          accepts += a;
          await Promise.all([Ta.dispose(), Da.dispose(), Tb.dispose(), Db.dispose()]);
        }
      }
      expect(accepts).toBeGreaterThan(0); // some steps accepted draft tokens (the cache trimming ran)
    });
  }
  const D0 = (behind: number) => context.length - 1 - behind;

  /**
   * The reference for chainRun: chainStep calls, one per step, as the speculative decoder made them
   * (step s with streams base + 2 s and + 1, the draft's pending tokens from the committed ones),
   * with chainRun's rules for starting the next step.
   */
  async function stepByStep(
    T: Sequence,
    D: Sequence,
    o: { count: number; sampling: SamplingOptions; seed: number; base: bigint; first: number; maxSteps: number; remaining: number; stop: number[] },
  ) {
    const committed = [...context];
    const accepted: number[] = [];
    const tokens: number[] = [];
    const rows: number[] = [];
    let remaining = o.remaining;
    for (let s = 0; ; s++) {
      const step = BigInt(o.first + s);
      const r = await T.chainStep(D, committed.slice(D.length), {
        last: committed[committed.length - 1]!, count: o.count, sampling: o.sampling, seed: o.seed, targetStream: o.base + 2n * step, draftStream: o.base + 2n * step + 1n,
      });
      accepted.push(r.acceptedCount);
      tokens.push(...r.tokens);
      rows.push(...r.targetLogits);
      committed.push(...r.tokens);
      remaining -= r.tokens.length;
      const room = remaining > o.count && committed.length + o.count + 1 <= Math.min(T.capacity, D.capacity);
      if (r.tokens.some((t) => o.stop.includes(t)) || !room || accepted.length >= o.maxSteps) break;
    }
    return { accepted, tokens, rows: Float32Array.from(rows) };
  }

  it('chainRun gives the tokens, rows and caches of chainStep calls, step after step, and ends where they would', async () => {
    const greedy = await pair(0).then(async ([T, D]) => {
      const r = await T.chainRun(D, [context[context.length - 1]!], { last: context[context.length - 1]!, count: 3, maxSteps: 12 });
      await Promise.all([T.dispose(), D.dispose()]);
      return r;
    });
    const stopAt = greedy.tokens[Math.floor(greedy.tokens.length / 2)]!;
    const cases = [
      { count: 3, sampling: { temperature: 0 }, seed: 0, base: 0n, first: 0, maxSteps: 12, remaining: 1000, stop: [] as number[] },
      { count: 2, sampling: { temperature: 1 }, seed: 5, base: 7n << 32n, first: 3, maxSteps: 20, remaining: 1000, stop: [] },
      { count: 4, sampling: { temperature: 0.8, topK: 30 }, seed: 9, base: 1n << 32n, first: 0, maxSteps: 30, remaining: 23, stop: [] },
      { count: 3, sampling: { temperature: 0 }, seed: 0, base: 0n, first: 0, maxSteps: 12, remaining: 1000, stop: [stopAt] },
    ];
    for (const c of cases) {
      const [Ta, Da] = await pair(0);
      const want = await stepByStep(Ta, Da, c);
      const [Tb, Db] = await pair(0);
      const last = context[context.length - 1]!;
      const got = await Tb.chainRun(Db, [last], {
        last, count: c.count, sampling: c.sampling, seed: c.seed, streamBase: c.base, firstStep: c.first, maxSteps: c.maxSteps, remaining: c.remaining, stopTokens: c.stop, keepLogits: true,
      });
      expect(Array.from(got.acceptedCounts)).toEqual(want.accepted);
      expect(Array.from(got.tokens)).toEqual(want.tokens);
      expect(sameBits(got.targetLogits!, want.rows)).toBe(true);
      expect([Tb.length, Db.length]).toEqual([Ta.length, Da.length]);
      const next = [want.tokens[want.tokens.length - 1]!];
      expect(sameBits(await Tb.evaluate(next), await Ta.evaluate(next))).toBe(true);
      if (c.stop.length) expect(want.tokens.indexOf(stopAt)).toBeGreaterThan(0);
      if (c.remaining < 100) expect(want.tokens.length).toBeLessThanOrEqual(c.remaining);
      await Promise.all([Ta.dispose(), Da.dispose(), Tb.dispose(), Db.dispose()]);
    }
    // A short context ends the run where the next chain would not fit.
    const T = target.createSequence({ contextSize: context.length + 12 });
    const D = draft.createSequence();
    await T.evaluate(context.slice(0, -1));
    await D.evaluate(context.slice(0, -1));
    const r = await T.chainRun(D, [context[context.length - 1]!], { last: context[context.length - 1]!, count: 3, maxSteps: 100 });
    expect(T.length + 1 + 3 + 1).toBeGreaterThan(context.length + 12);
    expect(T.length).toBe(context.length - 1 + r.tokens.length);
    await Promise.all([T.dispose(), D.dispose()]);
  });

  it('chainRun: maxMs and an aborted interrupt end the run after one step; the result holds it; bad options are named', async () => {
    const last = context[context.length - 1]!;
    for (const extra of [{ maxMs: 1e-9 }, { interrupt: AbortSignal.abort() }]) {
      const [T, D] = await pair(0);
      const r = await T.chainRun(D, [last], { last, count: 2, maxSteps: 50, ...extra });
      expect(r.acceptedCounts).toHaveLength(1);
      expect(r.targetLogits).toBeUndefined();
      expect(T.length).toBe(context.length + r.acceptedCounts[0]!);
      await Promise.all([T.dispose(), D.dispose()]);
    }
    {
      // Aborted while it runs: the run ends with room left in the context (it would otherwise run
      // until the next chain no longer fits), and both caches hold exactly the steps returned.
      const [T, D] = await pair(0);
      const ac = new AbortController();
      const running = T.chainRun(D, [last], { last, count: 1, maxSteps: 10_000, interrupt: ac.signal });
      setTimeout(() => ac.abort(), 5);
      const r = await running;
      expect(T.length).toBe(context.length - 1 + r.tokens.length);
      expect(T.length + 3).toBeLessThanOrEqual(T.capacity);
      expect(D.length).toBeGreaterThanOrEqual(T.length - 1);
      await Promise.all([T.dispose(), D.dispose()]);
    }
    const [T, D] = await pair(0);
    const ok = { last, count: 2 };
    await expect(T.chainRun(D, [last], { ...ok, maxSteps: 0 })).rejects.toThrow(/options\.maxSteps/);
    await expect(T.chainRun(D, [last], { ...ok, firstStep: -1 })).rejects.toThrow(/options\.firstStep/);
    await expect(T.chainRun(D, [last], { ...ok, maxMs: -1 })).rejects.toThrow(/options\.maxMs/);
    await expect(T.chainRun(D, [last], { ...ok, maxMs: Number.NaN })).rejects.toThrow(/options\.maxMs/);
    await expect(T.chainRun(D, [last], { ...ok, remaining: 0 })).rejects.toThrow(/options\.remaining/);
    await expect(T.chainRun(D, [last], { ...ok, stopTokens: [4096] })).rejects.toThrow(/options\.stopTokens\[0\] = 4096/);
    await expect(T.chainRun(D, [last], { ...ok, keepLogits: 1 as never })).rejects.toThrow(/options\.keepLogits/);
    await expect(T.chainRun(D, [last], { ...ok, interrupt: {} as AbortSignal })).rejects.toThrow(/options\.interrupt/);
    await expect(T.chainRun(D, [last], { ...ok, streamBase: -1 })).rejects.toThrow(/streamBase/);
    expect([T.length, D.length]).toEqual([context.length - 1, context.length - 1]);
    await Promise.all([T.dispose(), D.dispose()]);
  });

  it('chainRun with batch: runs of several sequences in flight together give each its own tokens, rows and caches', async () => {
    const cases = [
      { behind: 0, count: 3, sampling: { temperature: 0 }, seed: 0, streamBase: 0n, maxSteps: 16 },
      { behind: 2, count: 1, sampling: { temperature: 1 }, seed: 5, streamBase: 7n << 32n, maxSteps: 24 },
      { behind: 0, count: 5, sampling: { temperature: 0.8, topK: 30 }, seed: 9, streamBase: 1n << 32n, maxSteps: 12 },
      { behind: 1, count: 2, sampling: { temperature: 1.1, topP: 0.9 }, seed: 2, streamBase: 3n << 32n, maxSteps: 20, vocabSize: 3000 },
    ];
    const run = async (batch: boolean, together: boolean) => {
      const pairs = await Promise.all(cases.map((c) => pair(c.behind)));
      const call = (i: number) => {
        const { behind, ...c } = cases[i]!;
        const [T, D] = pairs[i]!;
        return T.chainRun(D, context.slice(-1 - behind), { ...c, last: context[context.length - 1]!, keepLogits: true, batch });
      };
      const results = together ? await Promise.all(cases.map((_, i) => call(i))) : [];
      if (!together) for (let i = 0; i < cases.length; i++) results.push(await call(i));
      return { pairs, results };
    };
    const alone = await run(false, false);
    const before = chainBatchStats();
    const joined = await run(true, true);
    const after = chainBatchStats();
    for (let i = 0; i < cases.length; i++) {
      const a = alone.results[i]!;
      const b = joined.results[i]!;
      expect(Array.from(b.acceptedCounts)).toEqual(Array.from(a.acceptedCounts));
      expect(Array.from(b.tokens)).toEqual(Array.from(a.tokens));
      expect(sameBits(b.targetLogits!, a.targetLogits!)).toBe(true);
      const [Ta, Da] = alone.pairs[i]!;
      const [Tb, Db] = joined.pairs[i]!;
      expect([Tb.length, Db.length]).toEqual([Ta.length, Da.length]);
      const next = [a.tokens[a.tokens.length - 1]!];
      expect(sameBits(await Tb.evaluate(next), await Ta.evaluate(next))).toBe(true);
    }
    // Some steps held several runs.
    expect(after.steps).toBeGreaterThan(before.steps);
    expect(after.runs - before.runs).toBeGreaterThan(after.steps - before.steps);
    const [T, D] = joined.pairs[0]!;
    await expect(T.chainRun(D, [1], { last: 1, count: 2, batch: 1 as never })).rejects.toThrow(/options\.batch must be a boolean/);
    await Promise.all([...alone.pairs, ...joined.pairs].flat().map((s) => s.dispose()));
  });

  it('a decoder with batching gives every concurrent request the tokens it gives without it', async () => {
    const requests = [
      { sampling: { temperature: 0 }, seed: 0 },
      { sampling: { temperature: 1 }, seed: 11 },
      { sampling: { temperature: 0.7, topK: 20 }, seed: 12 },
      { sampling: { temperature: 0 }, seed: 0, prompt: 'Once upon a time' },
      { sampling: { temperature: 0.9, topP: 0.95 }, seed: 13, prompt: 'The committee will' },
    ];
    const outputs = async (batching: boolean) => {
      const dec = createSpeculativeDecoder({ target, draft, strategy: { kind: 'chain', length: 4 }, maxConcurrent: 8, batching });
      expect(dec.batching).toBe(batching);
      const before = chainBatchStats();
      const rs = await Promise.all(
        requests.map((r) => dec.generate({ ...(r.prompt ? { prompt: r.prompt } : { tokens: context }), maxTokens: 48, sampling: r.sampling, seed: r.seed, stopTokens: [] })),
      );
      const after = chainBatchStats();
      await dec.dispose();
      return { tokens: rs.map((r) => Array.from(r.tokens)), steps: after.steps - before.steps, runs: after.runs - before.runs };
    };
    const plain = await outputs(false);
    const batched = await outputs(true);
    expect(batched.tokens).toEqual(plain.tokens);
    expect(plain.steps).toBe(0);
    expect(batched.runs).toBeGreaterThan(batched.steps);
    expect(() => createSpeculativeDecoder({ target, draft, batching: 'yes' as never })).toThrow(/batching must be a boolean/);
  });

  it("a decoder with batching says so, once, when more generations run than libuv's pool has threads", async () => {
    const pool = Number(process.env.UV_THREADPOOL_SIZE) || 4;  // this process's pool (vitest leaves it unset)
    const emit = vi.spyOn(process, 'emitWarning').mockImplementation(() => {});
    const burst = (dec: ReturnType<typeof createSpeculativeDecoder>, n: number) =>
      Promise.all(Array.from({ length: n }, () => dec.generate({ tokens: context, maxTokens: 4 })));
    try {
      await burst(createSpeculativeDecoder({ target, draft, maxConcurrent: pool }), pool);  // as many as threads: quiet
      await burst(createSpeculativeDecoder({ target, draft, maxConcurrent: 16, batching: false }), pool + 2);  // no batches
      expect(emit).not.toHaveBeenCalled();
      const dec = createSpeculativeDecoder({ target, draft, maxConcurrent: 16 });
      await burst(dec, pool + 2);
      await burst(dec, pool + 3);
      expect(emit).toHaveBeenCalledTimes(1);
      const [message, options] = emit.mock.calls[0]! as [string, { code: string }];
      expect(options.code).toBe('OSD_THREADPOOL');
      expect(message).toMatch(new RegExp(`^${pool + 1} generations in flight with batching, and libuv's thread pool has ${pool} threads`));
      expect(message).toContain(`at least ${pool + 5}`);
    } finally {
      emit.mockRestore();
    }
  });

  it('the decoder counts, reports and records only the steps of a run that it keeps (stop strings cut runs)', async () => {
    const dec = createSpeculativeDecoder({ target, draft, strategy: { kind: 'chain', length: 3 } });
    const steps: number[] = [];
    dec.on('step', (e) => steps.push(e.emitted));
    let cut = 0;
    for (let seed = 1; seed <= 6; seed++) {
      steps.length = 0;
      const r = await dec.generate({ tokens: context, maxTokens: 200, sampling: { temperature: 1 }, seed, stop: ['e'], stopTokens: [] });
      const total = steps.reduce((x, y) => x + y, 0);
      // Every reported step emitted a token of the output (the last one may be cut after its stop).
      expect(total).toBeGreaterThanOrEqual(r.tokens.length);
      expect(total - steps[steps.length - 1]!).toBeLessThan(r.tokens.length);
      expect(r.stats.tokens).toBe(total);
      expect(r.stats.targetPasses).toBeGreaterThanOrEqual(steps.length); // plus the prefill
      if (r.stopReason === 'stop') cut++;
    }
    expect(cut).toBeGreaterThan(3);
    // A request may ask for any number of tokens; it ends at the context.
    const long = await dec.generate({ tokens: context, maxTokens: Number.MAX_SAFE_INTEGER, stopTokens: [] });
    expect(long.stopReason).toBe('context');
    await dec.dispose();
  });

  it('watchWeights calls back at every setWeights until unwatched', async () => {
    const copy = await draft.convert('keep');
    let calls = 0;
    const unwatch = draft.watchWeights(() => void calls++);
    draft.setWeights(copy);
    draft.setWeights(copy);
    unwatch();
    draft.setWeights(copy);
    expect(calls).toBe(2);
    await copy.dispose();
  });

  it('rejects bad arguments with errors that name them, and leaves both caches as they were', async () => {
    const [T, D] = await pair(0);
    const last = context[context.length - 1]!;
    const ok = { last, count: 2 };
    const pending = [last];
    await expect(T.chainStep({} as Sequence, pending, ok)).rejects.toThrow(new TypeError('draft must be a Sequence'));
    await expect(T.chainStep(T, pending, ok)).rejects.toThrow(/another sequence/);
    await expect(T.chainStep(D, [], ok)).rejects.toThrow(new RangeError('pending must not be empty'));
    await expect(T.chainStep(D, [4096], ok)).rejects.toThrow(/pending\[0\] = 4096 is out of range/);
    await expect(T.chainStep(D, pending, null as never)).rejects.toThrow(/options must be an object/);
    await expect(T.chainStep(D, pending, { ...ok, bogus: 1 } as never)).rejects.toThrow(/bogus/);
    for (const bad of [-1, 4096, 1.5, undefined]) await expect(T.chainStep(D, pending, { ...ok, last: bad } as never)).rejects.toThrow(/options\.last/);
    for (const bad of [0, -1, 2.5]) await expect(T.chainStep(D, pending, { ...ok, count: bad })).rejects.toThrow(/options\.count/);
    await expect(T.chainStep(D, pending, { ...ok, vocabSize: 4097 })).rejects.toThrow(/options\.vocabSize/);
    await expect(T.chainStep(D, pending, { ...ok, sampling: { temperature: -1 } })).rejects.toThrow(/sampling\.temperature/);
    await expect(T.chainStep(D, pending, { ...ok, seed: -1 })).rejects.toThrow(/seed/);
    await expect(T.chainStep(D, pending, { ...ok, draftStream: 0.5 })).rejects.toThrow(/draftStream/);
    expect([T.length, D.length]).toEqual([context.length - 1, context.length - 1]);
    // A chain that does not fit the target's context is refused before drafting: neither cache changes.
    const small = target.createSequence({ contextSize: 32 });
    await small.evaluate(context.slice(0, -1));
    const room = 32 - small.length; // the pass holds last and count tokens
    await expect(small.chainStep(D, pending, { last, count: room })).rejects.toThrow(/context of 32/);
    expect([small.length, D.length]).toEqual([context.length - 1, context.length - 1]);
    await small.dispose();
    const D2 = draft.createSequence();
    await D2.evaluate(context.slice(0, -1));
    const T2 = target.createSequence({ contextSize: context.length + 2 });
    await T2.evaluate(context.slice(0, -1));
    // Fits: last and 2 tokens. A 3-token draft does not, and neither cache keeps anything.
    await expect(T2.chainStep(D2, pending, { last, count: 3 })).rejects.toThrow(new RegExp(`context of ${context.length + 2}`));
    expect([T2.length, D2.length]).toEqual([context.length - 1, context.length - 1]);
    const fits = await T2.chainStep(D2, pending, { last, count: 2 });
    expect(T2.length).toBe(context.length + fits.acceptedCount);
    await Promise.all([T2.dispose(), D2.dispose()]);
    // A busy or disposed draft sequence is refused.
    const running = D.evaluate([1, 2, 3]);
    await expect(T.chainStep(D, pending, ok)).rejects.toThrow(/has not finished/);
    await running;
    D.truncate(context.length - 1);
    const gone = draft.createSequence();
    await gone.dispose();
    await expect(T.chainStep(gone, pending, ok)).rejects.toThrow(/disposed/);
    // While a step runs, the draft sequence's own calls wait for it, and truncate refuses.
    const step = T.chainStep(D, pending, ok);
    expect(() => D.truncate(0)).toThrow(/has not finished/);
    const after = D.evaluate([7]);
    const r = await step;
    await after;
    expect(D.length).toBe(context.length + Math.min(r.acceptedCount, 1) + 1);
    await Promise.all([T.dispose(), D.dispose()]);
  });
});
