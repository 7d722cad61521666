// End-to-end exactness of speculative generation on the real stories260K target: greedy output is
// token-identical to target-only decoding for every strategy, and sampled output follows the
// target's distribution (chi-square on the first two tokens). Drafts: a random-weight model
// (frequent rejections) and the target stored in F16 (frequent acceptances).
import { getEventListeners } from 'node:events';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  bestLength,
  bestLengthByPosition,
  createSpeculativeDecoder,
  expectedSpeedup,
  loadModel,
  ngramLookup,
  sampledTreeShape,
  writeRandomModel,
  type Model,
  type SpeculativeDecoderOptions,
  type StepEvent,
  type Strategy,
} from '../lib/index.js';
import { addon } from '../lib/addon.js';
import { chiSquareTest } from './helpers/stats.js';
import { suiteTempDir, tempDir } from './helpers/tmp.js';
import { warp } from './helpers/warp.js';

const STORIES = join(import.meta.dirname, '../../shared/models/stories260K.bin');
const have = existsSync(STORIES);
if (!have) console.warn(`skip: ${STORIES} not found (speculative tests need ../shared/models)`);

const strategies: Strategy[] = [
  { kind: 'chain', length: 1 },
  { kind: 'chain', length: 4 },
  { kind: 'chain', length: 7 },
  { kind: 'tree', budget: 12, maxDepth: 4, branching: 3 },
  { kind: 'tree', budget: 12, maxDepth: 4, branching: 3, fill: true },
  { kind: 'adaptive', maxLength: 6 },
  { kind: 'adaptive', maxLength: 6, lookup: true },
  { kind: 'ngram', length: 5 },
];

describe.skipIf(!have)('speculative generation (stories260K)', () => {
  let target: Model;
  let randomDraft: Model;
  let closeDraft: Model;
  const prompts: number[][] = [];
  const dir = suiteTempDir('osd-spec-');

  beforeAll(async () => {
    target = await loadModel(STORIES);
    await writeRandomModel(join(dir, 'random.gguf'), {
      vocabSize: 512, embeddingLength: 32, layers: 2, heads: 4, kvHeads: 2, feedForwardLength: 64, contextLength: 512, seed: 3,
    });
    randomDraft = await loadModel(join(dir, 'random.gguf'));
    await target.save(join(dir, 'f16.gguf'), { type: 'F16' });
    closeDraft = await loadModel(join(dir, 'f16.gguf'));
    // 50 prompts: sampled story openings from the target itself.
    for (let seed = 0; prompts.length < 50; seed++) {
      const r = await target.generate({ tokens: [1], maxTokens: 4 + (seed % 12), sampling: { temperature: 1 }, seed: 1000 + seed });
      if (r.stopReason === 'maxTokens') prompts.push([1, ...r.tokens]);
    }
  });

  afterAll(async () => {
    await Promise.all([target?.dispose(), randomDraft?.dispose(), closeDraft?.dispose()]);
  });

  it('rejects a draft with another vocabulary, and bad options', async () => {
    const dir = tempDir('osd-spec-bad-');
    await writeRandomModel(join(dir, 'v.gguf'), { vocabSize: 500, embeddingLength: 16, layers: 1, heads: 2, feedForwardLength: 32, contextLength: 64 });
    const other = await loadModel(join(dir, 'v.gguf'));
    expect(() => createSpeculativeDecoder({ target, draft: other })).toThrow(/vocabulary/);
    await other.dispose();
    expect(() => createSpeculativeDecoder({ target: other, strategy: { kind: 'ngram' } })).toThrow(new TypeError('target was disposed'));
    expect(() => createSpeculativeDecoder({ target, draft: other })).toThrow(new TypeError('draft was disposed'));
    expect(() => createSpeculativeDecoder({ target })).toThrow(/draft must be a loaded Model/);
    expect(() => createSpeculativeDecoder({ target, draft: closeDraft, strategy: { kind: 'chain', length: 0 } })).toThrow(/strategy.length/);
    expect(() => createSpeculativeDecoder({ target, draft: closeDraft, strategy: { kind: 'beam' } as never })).toThrow(/strategy.kind/);
    expect(() => createSpeculativeDecoder({ target, draft: closeDraft, strategy: { kind: 'tree', children: 'top' } as never })).toThrow(/strategy.children/);
    expect(() => createSpeculativeDecoder({ target, draft: closeDraft, strategy: { kind: 'adaptive', lookup: 1 } as never })).toThrow(new TypeError('strategy.lookup must be a boolean'));
    expect(() => createSpeculativeDecoder({ target, draft: closeDraft, strategy: { kind: 'adaptive', lookup: true, maxNgram: 0 } })).toThrow(/^strategy\.maxNgram must be an integer/);
    expect(() => createSpeculativeDecoder({ target, draft: closeDraft, strategy: { kind: 'adaptive', lookups: true } as never })).toThrow(/\.lookups is not an option; the options are: kind, maxLength, lookup, maxNgram/);
    // Sampling options fail where they are given: at construction, or before a request runs.
    expect(() => createSpeculativeDecoder({ target, draft: closeDraft, sampling: { temperature: -5 } })).toThrow(new RangeError('sampling.temperature must be a finite number >= 0, got -5'));
    expect(() => createSpeculativeDecoder({ target, draft: closeDraft, sampling: { temperature: 1, topP: 0 } })).toThrow(/sampling\.topP must be in \(0, 1\]/);
    expect(() => createSpeculativeDecoder({ target, draft: closeDraft, sampling: {} as never })).toThrow(new TypeError('sampling.temperature is required'));
    const dec = createSpeculativeDecoder({ target, draft: closeDraft });
    await expect(dec.generate({ tokens: [1], maxTokens: 3, sampling: { temperature: 1, topK: 1.5 } })).rejects.toThrow(/sampling\.topK must be an integer >= 0, got 1\.5/);
    expect(dec.metrics().tokens).toBe(0);
    await expect(dec.generate({ tokens: [1, 600], maxTokens: 3 })).rejects.toThrow(/tokens\[1\]/);
    await expect(dec.generate({ tokens: [1], maxTokens: 1.5 })).rejects.toThrow(/maxTokens/);
    await expect(dec.generate({ prompt: 'hi', maxTokens: 3 })).rejects.toThrow(/tokenizer/);
    // Were a Set of characters, a Set holding NaN, or a late unnamed TypeError.
    await expect(dec.generate({ tokens: [1], maxTokens: 3, stopTokens: 'x' as never })).rejects.toThrow(new TypeError('stopTokens must be an Int32Array or an array of integers'));
    await expect(dec.generate({ tokens: [1], maxTokens: 3, stopTokens: [NaN] })).rejects.toThrow(/^stopTokens\[0\]/);
    await expect(dec.generate({ tokens: [1], maxTokens: 3, onStart: 5 as never })).rejects.toThrow(new TypeError('onStart must be a function'));
    await expect(dec.stream(undefined as never).next()).rejects.toThrow(new TypeError('options must be an object'));
    // A stream's base has 32 bits (step s uses (base << 32) + 2s): larger ones were cut silently.
    for (const stream of [-1, 2 ** 32, 2n ** 32n, 0.5])
      await expect(dec.generate({ tokens: [1], maxTokens: 2, stream: stream as never })).rejects.toThrow(/^stream must be an integer in \[0, 2\^32 - 1\]/);
    await expect(dec.generate({ tokens: [1], maxTokens: 2, stream: 'x' as never })).rejects.toThrow(new TypeError('stream must be a number or a bigint, got string'));
    expect((await dec.generate({ tokens: [1], maxTokens: 2, stream: 2 ** 32 - 1 })).tokens.length).toBe(2);
    // A string where a number goes is a TypeError that shows the string (the RangeError said "got 4").
    expect(() => createSpeculativeDecoder({ target, draft: closeDraft, strategy: { kind: 'chain', length: '4' as never } })).toThrow(
      new TypeError('strategy.length must be a number, got "4"'),
    );
    await expect(dec.generate({ tokens: [1], maxTokens: '8' as never })).rejects.toThrow(new TypeError('maxTokens must be a number, got "8"'));
    await expect(dec.generate({ tokens: [1], maxTokens: -1 })).rejects.toThrow(new RangeError('maxTokens must be an integer >= 0, got -1'));
    // Sampling settings beside `sampling` were ignored: the request ran greedy.
    await expect(dec.generate({ tokens: [1], maxTokens: 2, temperature: 0.8 } as never)).rejects.toThrow(
      new TypeError('temperature goes inside sampling: { sampling: { temperature } }'),
    );
    await expect(target.generate({ tokens: [1], maxTokens: 2, topP: 0.9 } as never)).rejects.toThrow(/^topP goes inside sampling/);
    await expect(target.generate({ tokens: [1], maxTokens: '2' as never })).rejects.toThrow(new TypeError('maxTokens must be a number, got "2"'));
  });

  for (const strategy of strategies) {
    it(`greedy output equals target-only output (${JSON.stringify(strategy)})`, async () => {
      for (const draft of [randomDraft, closeDraft]) {
        const dec = createSpeculativeDecoder({ target, draft, strategy });
        for (const prompt of prompts) {
          const want = await target.generate({ tokens: prompt, maxTokens: 24 });
          const got = await dec.generate({ tokens: prompt, maxTokens: 24 });
          expect(Array.from(got.tokens)).toEqual(Array.from(want.tokens));
          expect(got.stopReason).toBe(want.stopReason);
        }
        const m = dec.metrics();
        expect(m.tokens).toBeGreaterThan(0);
        // A filled tree drafts many alternatives per step, so judge it by accepted tokens per pass. A
        // shaped tree with this draft (as costly as the target) settles on a one-token chain, which the
        // draft gets right almost always.
        if (draft === closeDraft && strategy.kind === 'tree') expect(m.meanAcceptedLength).toBeGreaterThan(strategy.fill ? 1 : 0.8);
        else if (draft === closeDraft && strategy.kind !== 'ngram') expect(m.acceptanceRate).toBeGreaterThan(0.5);
        await dec.dispose();
      }
    });
  }

  it('greedy trees: a spine with the draft\'s next-best tokens as siblings, shaped from measured acceptance unless fill: true', async () => {
    let acceptedPerStep = 0;
    const drafted = async (strategy: Strategy, draft: Model) => {
      const dec = createSpeculativeDecoder({ target, draft, strategy });
      const sizes: number[] = [];
      let accepted = 0;
      dec.on('step', (e: { drafted: number; accepted: number }) => (sizes.push(e.drafted), (accepted += e.accepted)));
      for (const prompt of prompts.slice(0, 4)) {
        const want = await target.generate({ tokens: prompt, maxTokens: 40, stopTokens: [] });
        const got = await dec.generate({ tokens: prompt, maxTokens: 40, stopTokens: [] });
        expect(Array.from(got.tokens)).toEqual(Array.from(want.tokens));
      }
      await dec.dispose();
      acceptedPerStep = accepted / sizes.length;
      return sizes;
    };
    const shape = { kind: 'tree', budget: 12, maxDepth: 4, branching: 3 } as const;
    // fill: every step with room drafts the whole budget (best-first over the draft's top tokens).
    const full = await drafted({ ...shape, fill: true }, randomDraft);
    expect(full.filter((n) => n === 12).length).toBeGreaterThan(full.length / 2);
    // Shaped: a draft that is rarely right earns small trees once its acceptance is measured.
    const shaped = await drafted(shape, randomDraft);
    const randomAccepted = acceptedPerStep;
    const late = shaped.slice(shaped.length >> 1);
    expect(Math.max(...late)).toBeLessThan(12);
    expect(late.reduce((a, b) => a + b, 0) / late.length).toBeLessThan(6);
    // A draft that is usually right: its spine is accepted in most steps.
    await drafted(shape, closeDraft);
    expect(acceptedPerStep).toBeGreaterThan(0.8);
    expect(acceptedPerStep).toBeGreaterThan(2 * randomAccepted);
  });

  it('greedy output survives long generations with KV compaction (tree) and reaches the context end', async () => {
    // fill: a whole tree every step (a shaped tree with this costly draft is mostly a chain).
    const dec = createSpeculativeDecoder({ target, draft: closeDraft, strategy: { kind: 'tree', budget: 16, maxDepth: 6, branching: 4, fill: true } });
    const want = await target.generate({ tokens: [1], maxTokens: 600, stopTokens: [] });
    const got = await dec.generate({ tokens: [1], maxTokens: 600, stopTokens: [] });
    expect(Array.from(got.tokens)).toEqual(Array.from(want.tokens));
    expect(got.stopReason).toBe('context');
    expect(got.stats.meanAcceptedLength).toBeGreaterThan(1);
  });

  it('a draft with a shorter context drafts while it has room, then the target decodes alone (it stopped at the draft\'s end)', async () => {
    await writeRandomModel(join(dir, 'short.gguf'), {
      vocabSize: 512, embeddingLength: 32, layers: 2, heads: 4, kvHeads: 2, feedForwardLength: 64, contextLength: 24, seed: 3,
    });
    const shortDraft = await loadModel(join(dir, 'short.gguf'));
    try {
      for (const strategy of [{ kind: 'chain', length: 4 }, { kind: 'tree', budget: 8, maxDepth: 3, branching: 2 }] as Strategy[]) {
        const dec = createSpeculativeDecoder({ target, draft: shortDraft, strategy });
        const want = await target.generate({ tokens: prompts[0]!, maxTokens: 60, stopTokens: [] });
        const got = await dec.generate({ tokens: prompts[0]!, maxTokens: 60, stopTokens: [] });
        expect(Array.from(got.tokens)).toEqual(Array.from(want.tokens));
        expect(got.stopReason).toBe('maxTokens');
        expect(got.stats.drafted).toBeGreaterThan(0);
        await dec.dispose();
      }
      // A prompt longer than the draft's context: every step is target-only.
      const long = Array.from({ length: 30 }, (_, i) => prompts[i % prompts.length]![1] ?? 1);
      const dec = createSpeculativeDecoder({ target, draft: shortDraft, strategy: { kind: 'chain', length: 4 } });
      const got = await dec.generate({ tokens: [1, ...long], maxTokens: 8 });
      expect(Array.from(got.tokens)).toEqual(Array.from((await target.generate({ tokens: [1, ...long], maxTokens: 8 })).tokens));
      expect(got.stats.drafted).toBe(0);
      await dec.dispose();
    } finally {
      await shortDraft.dispose();
    }
  });

  // Sampled exactness: the joint distribution of the first two tokens against the target's own.
  // A planted fault must fail: a tree of the draft's top tokens verified as if they were sampled.
  const sampledCases: {
    name: string;
    strategy: Strategy;
    sampling: { temperature: number; topK?: number; topP?: number };
    fault?: 'tree-top-children-as-sampled' | 'tree-top-siblings-as-sampled' | 'lookup-first-unchecked';
    draws?: number;
    prompt?: number[];
    maxTokens?: number;
  }[] = [
    { name: 'chain T=1', strategy: { kind: 'chain', length: 3 }, sampling: { temperature: 1 } },
    // Sampled children (the default at T > 0); top-k 3 under branching 4 also drops children once the support is used up.
    // fill: the whole budget, so that siblings are drafted whatever the measured costs.
    { name: 'sampled tree T=0.8 top-p 0.9', strategy: { kind: 'tree', budget: 8, maxDepth: 3, branching: 3, fill: true }, sampling: { temperature: 0.8, topP: 0.9 } },
    { name: 'sampled tree T=1.2 top-k 3', strategy: { kind: 'tree', budget: 10, maxDepth: 3, branching: 4, children: 'sampled', fill: true }, sampling: { temperature: 1.2, topK: 3 } },
    { name: 'sampled tree T=1 top-k 40', strategy: { kind: 'tree', budget: 12, maxDepth: 2, branching: 4, fill: true }, sampling: { temperature: 1, topK: 40 } },
    { name: 'sampled tree, measured size, T=1', strategy: { kind: 'tree', budget: 8, maxDepth: 3, branching: 3 }, sampling: { temperature: 1 } },
    { name: 'deterministic tree T=0.8', strategy: { kind: 'tree', budget: 8, maxDepth: 3, branching: 3, children: 'deterministic' }, sampling: { temperature: 0.8 } },
    { name: 'planted fault: top children verified as sampled', strategy: { kind: 'tree', budget: 8, maxDepth: 3, branching: 3, fill: true }, sampling: { temperature: 0.8 }, fault: 'tree-top-children-as-sampled' },
    // Only the siblings are wrong: the spine is sampled, the siblings are the draft's next top tokens.
    { name: 'planted fault: top siblings verified as sampled', strategy: { kind: 'tree', budget: 6, maxDepth: 1, branching: 6, fill: true }, sampling: { temperature: 0.8 }, fault: 'tree-top-siblings-as-sampled', draws: 16000 },
    { name: 'sampled tree, one level of 6 siblings, T=0.8', strategy: { kind: 'tree', budget: 6, maxDepth: 1, branching: 6, fill: true }, sampling: { temperature: 0.8 } },
    { name: 'adaptive T=1.2 top-k 20', strategy: { kind: 'adaptive', maxLength: 4 }, sampling: { temperature: 1.2, topK: 20 } },
    // The lookup proposes 401 461 (what followed 461 before), and the target samples 401 next with
    // p = 0.70: lookup steps that accept and that reject both occur often. Three tokens are
    // generated (two scored), so a first step may verify both lookup tokens (how often, the
    // measured acceptance and times decide; the ngram case below always does).
    { name: 'adaptive with lookup T=1', strategy: { kind: 'adaptive', maxLength: 4, lookup: true }, sampling: { temperature: 1 }, prompt: [1, 461, 461, 410, 461, 401, 461], maxTokens: 3 },
    { name: 'planted fault: the first lookup token unchecked', strategy: { kind: 'adaptive', maxLength: 4, lookup: true }, sampling: { temperature: 1 }, prompt: [1, 461, 461, 410, 461, 401, 461], maxTokens: 3, fault: 'lookup-first-unchecked' },
    { name: 'ngram T=1', strategy: { kind: 'ngram', length: 3 }, sampling: { temperature: 1 } },
    // Two lookup tokens verified in one pass (401 461; the target samples them with p = 0.70 and 0.27):
    // rejections at either, and the row after both.
    { name: 'ngram, two lookup tokens, T=1', strategy: { kind: 'ngram', length: 2 }, sampling: { temperature: 1 }, prompt: [1, 461, 461, 410, 461, 401, 461], maxTokens: 3 },
  ];
  for (const sc of sampledCases) {
    it(sc.fault ? `the chi-square catches a planted fault (${sc.name})` : `sampled output follows the target distribution (${sc.name})`, async () => {
      const prompt = sc.prompt ?? [1, 403, 407, 261, 378, 403, 407];
      const V = 512;
      // Exact joint P(y1, y2) from the target.
      const first = warp(await target.forward(prompt), V, sc.sampling, (prompt.length - 1) * V);
      const draws = sc.draws ?? 6000;
      const joint = new Float64Array(V * V);
      for (let y1 = 0; y1 < V; y1++) {
        if (first[y1]! === 0) continue;
        if (first[y1]! * draws < 2) {
          joint[y1 * V] = first[y1]!; // rare first tokens: their row is pooled anyway
          continue;
        }
        const logits = await target.forward([...prompt, y1]);
        const second = warp(logits, V, sc.sampling, prompt.length * V);
        for (let y2 = 0; y2 < V; y2++) joint[y1 * V + y2] = first[y1]! * second[y2]!;
      }
      const counts = new Float64Array(V * V);
      const rowCounts = new Float64Array(V);
      // A step drafts at most the tokens still wanted, so trees get room for siblings (the first two
      // tokens are scored); a filled tree must then draft more nodes than its depth in some step.
      const isTree = sc.strategy.kind === 'tree';
      let widest = 0;
      let plain = 0;
      const lookups = { steps: 0, rejected: 0 };
      for (const [k, draft] of [randomDraft, closeDraft].entries()) {
        const dec = createSpeculativeDecoder({ target, draft, strategy: sc.strategy, sampling: sc.sampling, maxConcurrent: 1, ...(sc.fault ? { _fault: sc.fault } : {}) } as SpeculativeDecoderOptions);
        dec.on('step', (e: StepEvent) => {
          widest = Math.max(widest, e.drafted);
          if (e.lookup) (lookups.steps++, (lookups.rejected += e.lookup.accepted < e.lookup.proposed ? 1 : 0));
          else plain += e.drafted === 0 ? 1 : 0;
        });
        for (let s = 0; s < draws / 2; s++) {
          // A seed per draw across both drafts: the same seed would repeat a draw (ngram has no draft).
          const r = await dec.generate({ tokens: prompt, maxTokens: sc.maxTokens ?? (isTree ? 6 : 2), seed: 100_000 + k * draws + s, stopTokens: [] });
          const y1 = r.tokens[0]!;
          const y2 = r.tokens[1]!;
          if (first[y1]! * draws < 2) rowCounts[y1]!++;
          else counts[y1 * V + y2]!++;
        }
        await dec.dispose();
      }
      // Pool each rare first token's row into its single cell.
      for (let y1 = 0; y1 < V; y1++) if (rowCounts[y1]) counts[y1 * V] = rowCounts[y1]!;
      if (sc.strategy.kind === 'tree' && sc.strategy.fill) expect(widest).toBeGreaterThan(sc.strategy.maxDepth!);
      if (sc.strategy.kind === 'ngram' && sc.maxTokens) expect(widest).toBe(2);
      // Adaptive also decoded with the target alone (its plain steps, one native call each) and drafted.
      if (sc.strategy.kind === 'adaptive' && !sc.strategy.lookup) {
        expect(plain).toBeGreaterThan(draws / 4);
        expect(widest).toBeGreaterThan(0);
      }
      // With lookup, most first steps verify the lookup's tokens, and both of its outcomes occur:
      // accepted tokens, and a rejection whose token comes from the residual.
      // (Lookups are taken while their measured cost pays; on a loaded machine fewer may be, hence
      // the margins.)
      if (sc.strategy.kind === 'adaptive' && sc.strategy.lookup) expect(lookups.steps).toBeGreaterThan(draws / 5);
      if (sc.strategy.kind === 'adaptive' && sc.strategy.lookup && !sc.fault) {
        expect(lookups.rejected).toBeGreaterThan(draws / 10);
        expect(lookups.steps - lookups.rejected).toBeGreaterThan(draws / 10);
      }
      const test = chiSquareTest(counts, joint);
      if (sc.fault) expect(test.pValue).toBeLessThan(1e-6);
      else expect(test.pValue).toBeGreaterThan(1e-3);
    });
  }

  it('streams chunks whose tokens equal generate()', async () => {
    const dec = createSpeculativeDecoder({ target, draft: closeDraft, strategy: { kind: 'chain', length: 4 } });
    const want = await dec.generate({ tokens: prompts[0]!, maxTokens: 30 });
    const got: number[] = [];
    for await (const chunk of dec.stream({ tokens: prompts[0]!, maxTokens: 30 })) got.push(...chunk.tokens);
    expect(got).toEqual(Array.from(want.tokens));
  });

  it('abort mid-stream leaves the decoder usable; dispose rejects running work cleanly', async () => {
    const dec = createSpeculativeDecoder({ target, draft: closeDraft, strategy: { kind: 'chain', length: 2 } });
    const ac = new AbortController();
    let chunks = 0;
    await expect(
      (async () => {
        for await (const _ of dec.stream({ tokens: [1], maxTokens: 400, signal: ac.signal })) {
          if (++chunks === 3) ac.abort();
        }
      })(),
    ).rejects.toMatchObject({ name: 'AbortError' });
    // Breaking out of a stream is fine too.
    for await (const _ of dec.stream({ tokens: [1], maxTokens: 400 })) break;
    const ok = await dec.generate({ tokens: [1], maxTokens: 5 });
    expect(ok.tokens.length).toBe(5);
    const running = dec.generate({ tokens: [1], maxTokens: 400 });
    await dec.dispose();
    await expect(running).rejects.toThrow(/disposed/);
    await expect(dec.generate({ tokens: [1], maxTokens: 2 })).rejects.toThrow(/disposed/);
  });

  it("a caller's long-lived signal keeps no listener after its requests; many queued requests warn of no leak", async () => {
    const dec = createSpeculativeDecoder({ target, draft: closeDraft, strategy: { kind: 'chain', length: 2 }, maxConcurrent: 1 });
    const server = new AbortController(); // e.g. a server's shutdown signal, shared by every request
    const warnings: string[] = [];
    const onWarning = (w: Error) => warnings.push(w.name);
    process.on('warning', onWarning);
    try {
      await Promise.all(Array.from({ length: 30 }, (_, i) => dec.generate({ tokens: prompts[i % 10]!, maxTokens: 3, signal: server.signal })));
      // Queued requests without a signal once added a listener each to the decoder's dispose signal.
      await Promise.all(Array.from({ length: 30 }, (_, i) => dec.generate({ tokens: prompts[i % 10]!, maxTokens: 3 })));
      for await (const _ of dec.stream({ tokens: [1], maxTokens: 3, signal: server.signal }));
      for await (const _ of dec.stream({ tokens: [1], maxTokens: 30, signal: server.signal })) break;
      await new Promise((r) => setImmediate(r));
      expect(getEventListeners(server.signal, 'abort').length).toBe(0);
      expect(warnings).toEqual([]);
    } finally {
      process.off('warning', onWarning);
      await dec.dispose();
    }
  });

  it('concurrent requests are served correctly', async () => {
    const dec = createSpeculativeDecoder({ target, draft: closeDraft, strategy: { kind: 'chain', length: 3 }, maxConcurrent: 2 });
    const want = await Promise.all(prompts.slice(0, 6).map((p) => target.generate({ tokens: p, maxTokens: 20 })));
    const got = await Promise.all(prompts.slice(0, 6).map((p) => dec.generate({ tokens: p, maxTokens: 20 })));
    got.forEach((g, i) => expect(Array.from(g.tokens)).toEqual(Array.from(want[i]!.tokens)));
    await dec.dispose();
  });

  it('adaptive with lookup verifies n-gram lookups, counted apart from drafted tokens; greedy output stays the target\'s', async () => {
    // A draft that never agrees: without lookup, adaptive decodes with the target alone; with it,
    // it also tries the tokens that followed earlier occurrences of the context's tail.
    for (const lookup of [false, true]) {
      const dec = createSpeculativeDecoder({ target, draft: randomDraft, strategy: { kind: 'adaptive', maxLength: 6, lookup } });
      const events: StepEvent[] = [];
      dec.on('step', (e) => events.push(e));
      let passes = 0;
      for (const prompt of prompts.slice(0, 6)) {
        const want = await target.generate({ tokens: prompt, maxTokens: 60, stopTokens: [] });
        const r = await dec.generate({ tokens: prompt, maxTokens: 60, stopTokens: [] });
        expect(Array.from(r.tokens)).toEqual(Array.from(want.tokens));
        passes += r.stats.targetPasses;
      }
      const m = dec.metrics();
      const sum = (f: (e: StepEvent) => number) => events.reduce((a, e) => a + f(e), 0);
      expect(m.drafted).toBe(sum((e) => e.drafted));
      expect(m.accepted).toBe(sum((e) => e.accepted));
      expect(m.lookupProposed).toBe(sum((e) => e.lookup?.proposed ?? 0));
      expect(m.lookupAccepted).toBe(sum((e) => e.lookup?.accepted ?? 0));
      expect(m.tokens).toBe(sum((e) => e.emitted));
      if (!lookup) {
        expect(m.lookupProposed).toBe(0);
        await dec.dispose();
        continue;
      }
      // Lookups ran. Whether they pay is for the measured step times to say: on this tiny target a
      // step's round trip to JavaScript costs more than the target's pass, so most are declined and
      // only probed (bench:smollm2 measures a target whose passes cost milliseconds).
      expect(m.lookupProposed).toBeGreaterThan(0);
      // One target pass per step, and one per request for its prompt.
      expect(passes).toBe(events.length + 6);
      // A lookup step is no draft step: it drafts and accepts nothing.
      for (const e of events) if (e.lookup) expect([e.drafted, e.accepted, e.emitted]).toEqual([0, 0, e.lookup.accepted + 1]);
      await dec.dispose();
    }
  });

  it('adaptive stops drafting when a draft never agrees and keeps probing it; greedy output stays the target\'s', async () => {
    const want = await target.generate({ tokens: prompts[0]!, maxTokens: 120, stopTokens: [] });
    for (const [draft, good] of [[randomDraft, false], [closeDraft, true]] as const) {
      const dec = createSpeculativeDecoder({ target, draft, strategy: { kind: 'adaptive', maxLength: 6 } });
      const drafted: number[] = [];
      dec.on('step', (e) => drafted.push(e.drafted));
      const r = await dec.generate({ tokens: prompts[0]!, maxTokens: 120, stopTokens: [] });
      expect(Array.from(r.tokens)).toEqual(Array.from(want.tokens));
      const plain = drafted.filter((g) => g === 0).length;
      // Drafting steps happen either way (probes after 16, 32 and 64 plain tokens); whether the close
      // draft, as costly as the target here, pays is for the measured step times to say.
      expect(drafted.length - plain).toBeGreaterThanOrEqual(3);
      // Mostly plain steps: a random draft's greedy token is almost never the target's.
      if (!good) expect(plain).toBeGreaterThan(drafted.length / 2);
      if (!good) {
        // A stop token inside a run of plain tokens ends it there, with no pass counted past it.
        const stop = want.tokens[Array.from(want.tokens).findIndex((t, i) => i >= 60 && want.tokens.indexOf(t) === i)]!;
        const cut = want.tokens.indexOf(stop) + 1;
        let emitted = 0;
        const count = (e: { emitted: number }) => void (emitted += e.emitted);
        dec.on('step', count);
        const s = await dec.generate({ tokens: prompts[0]!, maxTokens: 120, stopTokens: [stop] });
        dec.off('step', count);
        expect(Array.from(s.tokens)).toEqual(Array.from(want.tokens.subarray(0, cut)));
        expect(s.stopReason).toBe('eos');
        expect(emitted).toBe(cut);
      }
      await dec.dispose();
    }
  });

  /** A random-weight model of the target's shape (a draft that setWeights can give the target's own weights). */
  async function targetShapedRandom(name: string, seed: number): Promise<string> {
    const path = join(dir, name);
    await writeRandomModel(path, { vocabSize: 512, embeddingLength: 64, layers: 5, heads: 8, kvHeads: 4, feedForwardLength: 172, contextLength: 512, seed });
    return path;
  }

  it('adaptive probes again soon after the draft gets new weights, however far its failed probes had backed off', async () => {
    // A draft of the target's shape with random weights: its probes fail, and the interval between
    // them doubles up to 256 tokens. New weights (as an online update sets) may draft better, so
    // the next probe comes within 16 tokens; here they are the target's own, so probes now accept.
    await using draft = await loadModel(await targetShapedRandom('same-shape-probe.gguf', 6));
    const dec = createSpeculativeDecoder({ target, draft, strategy: { kind: 'adaptive', maxLength: 4 } });
    const steps: { drafted: number; accepted: number; emitted: number }[] = [];
    dec.on('step', (e) => steps.push(e));
    // Tokens emitted before the first drafting step of a request's steps (all of them if none drafted).
    const beforeFirstProbe = (xs: typeof steps) => {
      let n = 0;
      for (const e of xs) {
        if (e.drafted > 0) return n;
        n += e.emitted;
      }
      return n;
    };
    const first = await dec.generate({ tokens: prompts[2]!, maxTokens: 400, stopTokens: [] });
    expect(first.stats.accepted).toBe(0);
    // Backed off: the last 200 tokens held at most two probes.
    let tail = 0;
    let probes = 0;
    for (let i = steps.length - 1; i >= 0 && tail < 200; i--) (tail += steps[i]!.emitted), (probes += steps[i]!.drafted > 0 ? 1 : 0);
    expect(probes).toBeLessThanOrEqual(2);
    // The same weights again: no probe in the next 60 tokens.
    steps.length = 0;
    await dec.generate({ tokens: prompts[3]!, maxTokens: 60, stopTokens: [] });
    expect(beforeFirstProbe(steps)).toBe(60);
    // New weights: a probe within 16 tokens, and it accepts.
    draft.setWeights(closeDraft);
    steps.length = 0;
    const want = await target.generate({ tokens: prompts[4]!, maxTokens: 60, stopTokens: [] });
    const r = await dec.generate({ tokens: prompts[4]!, maxTokens: 60, stopTokens: [] });
    expect(Array.from(r.tokens)).toEqual(Array.from(want.tokens));
    expect(beforeFirstProbe(steps)).toBeLessThanOrEqual(16);
    expect(r.stats.accepted).toBeGreaterThan(0);
    await dec.dispose();
  });

  it("a running request takes up new draft weights at its next step ('step'), or never ('request'); output stays the target's", async () => {
    // A draft of the target's shape with random weights; after five steps it gets the target's own
    // (F16) weights, under which greedy drafts are nearly always accepted.
    const sameShape = await targetShapedRandom('same-shape.gguf', 5);
    const want = await target.generate({ tokens: prompts[1]!, maxTokens: 100, stopTokens: [] });
    for (const weightSwap of ['step', 'request'] as const) {
      await using draft = await loadModel(sameShape);
      const dec = createSpeculativeDecoder({ target, draft, strategy: { kind: 'chain', length: 4 }, weightSwap });
      const steps: { drafted: number; accepted: number }[] = [];
      dec.on('step', (e) => {
        steps.push(e);
        if (steps.length === 5) draft.setWeights(closeDraft);
      });
      const r = await dec.generate({ tokens: prompts[1]!, maxTokens: 100, stopTokens: [] });
      expect(Array.from(r.tokens), weightSwap).toEqual(Array.from(want.tokens));
      const rate = (xs: typeof steps) => xs.reduce((a, e) => a + e.accepted, 0) / xs.reduce((a, e) => a + e.drafted, 0);
      expect(rate(steps.slice(0, 5)), weightSwap).toBeLessThan(0.3);
      if (weightSwap === 'step') {
        expect(rate(steps.slice(5)), weightSwap).toBeGreaterThan(0.8);
        expect(r.stats.draftWeightSwaps).toBe(1);
      } else {
        expect(rate(steps.slice(5)), weightSwap).toBeLessThan(0.3);
        expect(r.stats.draftWeightSwaps).toBe(0);
      }
      // A request that starts after the swap uses the new weights either way.
      const next = await dec.generate({ tokens: prompts[1]!, maxTokens: 40, stopTokens: [] });
      expect(next.stats.acceptanceRate, weightSwap).toBeGreaterThan(0.8);
      expect(next.stats.draftWeightSwaps).toBe(0);
      await dec.dispose();
    }
    expect(() => createSpeculativeDecoder({ target, draft: closeDraft, weightSwap: 'never' as never })).toThrow(
      new RangeError("weightSwap must be 'step' or 'request', got never"),
    );
  });

  it('reports per-request stats and step events', async () => {
    const dec = createSpeculativeDecoder({ target, draft: closeDraft, strategy: { kind: 'chain', length: 4 } });
    const events: { drafted: number; accepted: number }[] = [];
    dec.on('step', (e) => events.push(e));
    const r = await dec.generate({ tokens: [1, 403], maxTokens: 40 });
    const s = r.stats;
    expect(s.tokens).toBe(r.tokens.length);
    expect(s.drafted).toBe(events.reduce((a, e) => a + e.drafted, 0));
    expect(s.accepted).toBe(events.reduce((a, e) => a + e.accepted, 0));
    expect(s.acceptanceRate).toBeCloseTo(s.accepted / s.drafted, 10);
    expect(s.acceptanceByPosition.length).toBe(4);
    expect(s.targetPasses).toBeGreaterThanOrEqual(events.length);
    expect(s.draftPasses).toBeGreaterThan(0);
    expect(s.tokensPerSecond).toBeGreaterThan(0);
  });
});

describe('sampled draft trees', () => {
  it('sampledTreeShape: a spine with siblings, within budget, depth and branching, best value first', () => {
    for (const accept of [[0.9], [0.5, 0.3, 0.2], [0.1, 0.1, 0.1, 0.1], [0.6, 0.6]]) {
      for (const [budget, maxDepth] of [[16, 6], [5, 2], [1, 1], [40, 3]] as const) {
        const widths = sampledTreeShape(accept, budget, maxDepth);
        expect(widths.length).toBeGreaterThan(0);
        expect(widths.length).toBeLessThanOrEqual(maxDepth);
        expect(widths.reduce((a, b) => a + b, 0)).toBeLessThanOrEqual(budget);
        for (const w of widths) expect(w).toBeGreaterThanOrEqual(1), expect(w).toBeLessThanOrEqual(accept.length);
      }
    }
    // Likely first children grow a chain; unlikely ones widen the first level.
    expect(sampledTreeShape([0.9, 0.1], 4, 6)).toEqual([1, 1, 1, 1]);
    expect(sampledTreeShape([0.2, 0.2, 0.2], 3, 6)).toEqual([3]);
    expect(sampledTreeShape([0.5, 0.4], 4, 6)).toEqual([2, 1, 1]);
    // Bounded (a budget of 30000 held the event loop for seconds; the search is quadratic).
    expect(() => sampledTreeShape([0.5], 30_000, 30_000)).toThrow(new RangeError('budget must be an integer in [0, 4096], got 30000'));
    expect(() => sampledTreeShape([0.5], 4, -1)).toThrow(/^maxDepth must be an integer in \[0, 4096\]/);
  });

  it('sampleLogits with exclude samples the warped row without those tokens', () => {
    const sampleLogits = (addon as unknown as { sampleLogits(o: object): number }).sampleLogits;
    const V = 12;
    const logits = Float32Array.from({ length: V }, (_, j) => Math.sin(j * 1.7) * 2);
    for (const sampling of [{ temperature: 0.8 }, { temperature: 1, topK: 5 }, { temperature: 1.3, topP: 0.8 }]) {
      const q = warp(logits, V, sampling);
      const exclude = [0, 1, 2, 3, 4, 5].sort((a, b) => q[b]! - q[a]!).slice(0, 2);
      const want = Float64Array.from(q, (x, j) => (exclude.includes(j) ? 0 : x));
      const total = want.reduce((a, b) => a + b, 0);
      const counts = new Float64Array(V);
      for (let i = 0; i < 20_000; i++) counts[sampleLogits({ logits, vocabSize: V, sampling, seed: 5, position: i, exclude: Int32Array.from(exclude) })]!++;
      expect(chiSquareTest(counts, want.map((x) => x / total)).pValue).toBeGreaterThan(1e-3);
    }
    const all = Int32Array.from({ length: V }, (_, j) => j);
    expect(sampleLogits({ logits, vocabSize: V, sampling: { temperature: 1 }, seed: 1, position: 0, exclude: all })).toBe(-1);
    expect(() => sampleLogits({ logits, vocabSize: V, sampling: { temperature: 1 }, seed: 1, position: 0, exclude: Int32Array.from([V]) })).toThrow(/exclude\[0\]/);
  });
});

describe('speculation length', () => {
  it('expectedSpeedup follows (1 - a^(g+1)) / ((1 - a)(g c + 1))', () => {
    expect(expectedSpeedup(0.8, 4, 0.1)).toBeCloseTo((1 - 0.8 ** 5) / (0.2 * 1.4), 12);
    expect(expectedSpeedup(0.5, 0, 0.1)).toBe(1);
    expect(expectedSpeedup(1, 3, 0)).toBe(4);
  });
  it('bestLengthByPosition is the formula without measurements and shortens chains when acceptance falls with depth', () => {
    for (const [a, c] of [[0.9, 0.05], [0.6, 0.1], [0.5, 0.2]] as const)
      expect(bestLengthByPosition(a, [], [], c, 16)).toBe(Math.max(1, bestLength(a, c, 16)));
    // Pooled acceptance 0.6, but the first position accepts 80% and the later ones 30%.
    const tested = [100, 80, 24, 7], accepted = [80, 24, 7, 2];
    expect(bestLengthByPosition(0.6, tested, accepted, 0.1, 16)).toBeLessThan(bestLength(0.6, 0.1, 16));
    expect(bestLengthByPosition(0.1, [], [], 0.5, 16)).toBe(1);
  });
  it('bestLengthByPosition with minLength 0 says "do not draft" when drafting costs more than it returns', () => {
    // Without measurements it is bestLength, 0 included.
    for (const [a, c] of [[0.9, 0.05], [0.6, 0.1], [0.5, 0.2], [0.16, 0.2], [0.1, 0.5]] as const)
      expect(bestLengthByPosition(a, [], [], c, 16, 0)).toBe(bestLength(a, c, 16));
    expect(bestLengthByPosition(0.16, [], [], 0.2, 16, 0)).toBe(0);
    // A first position that accepts 90% pays for itself even when the pooled rate says it does not.
    expect(bestLengthByPosition(0.15, [50], [45], 0.3, 16, 0)).toBeGreaterThan(0);
    expect(bestLengthByPosition(0.9, [50], [2], 0.3, 16, 0)).toBe(0);
    expect(bestLengthByPosition(0.5, [], [], 0.1, 0, 0)).toBe(0);
  });

  it('bestLength grows with acceptance and shrinks with draft cost', () => {
    expect(bestLength(0.9, 0.05, 16)).toBeGreaterThan(bestLength(0.6, 0.05, 16));
    expect(bestLength(0.8, 0.3, 16)).toBeLessThan(bestLength(0.8, 0.02, 16));
    expect(bestLength(0.1, 0.5, 16)).toBe(0);
  });
  it('ngramLookup proposes what followed the latest match of the longest tail', () => {
    expect(ngramLookup([5, 6, 7, 8, 1, 5, 6, 7], 3, 4)).toEqual([8, 1, 5, 6]);
    expect(ngramLookup([1, 2, 3], 3, 2)).toEqual([]);
    expect(ngramLookup([4, 9, 4], 2, 3)).toEqual([9, 4]);
  });
  it('the helpers reject bad arguments, naming them (an infinite maxLength looped for ever)', () => {
    expect(() => bestLength(0.5, 0.1, Infinity)).toThrow(new RangeError('maxLength must be an integer in [0, 65536], got Infinity'));
    expect(() => bestLength(0.5, 0.1, 1e10)).toThrow(/maxLength/);
    expect(() => bestLengthByPosition(0.5, [], [], 0.1, Infinity)).toThrow(/maxLength must be an integer in \[1, 65536\]/);
    expect(() => bestLengthByPosition(0.5, 'x' as never, [], 0.1, 4)).toThrow(TypeError);
    expect(() => bestLengthByPosition(0.5, [], [], 0.1, 4, 2 as never)).toThrow(new RangeError('minLength must be 0 or 1, got 2'));
    for (const a of [NaN, -1, 2]) expect(() => expectedSpeedup(a, 3, 0.1)).toThrow(/^a must be a number in \[0, 1\]/);
    expect(() => expectedSpeedup(0.5, 1.5, 0.1)).toThrow(/^g must be an integer >= 0/);
    expect(() => bestLength(0.5, -1, 8)).toThrow(/^c must be a finite number >= 0/);
    expect(() => ngramLookup(null as never, 2, 3)).toThrow(new TypeError('tokens must be an array of token ids'));
    expect(() => ngramLookup([1, 2, 1], NaN, 3)).toThrow(/^maxNgram must be an integer >= 1/);
    expect(() => ngramLookup([1, 2, 1], 2, -1)).toThrow(/^length must be an integer >= 0/);
    expect(() => sampledTreeShape([0.5], 4, 2, null as never)).toThrow(new TypeError('costs must be an object { node, level }'));
  });
});
