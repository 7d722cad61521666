// Exactness of speculative verification, proven statistically: the tokens that verifyChain,
// verifyChainBatch and verifyTree emit must follow the target's warped distribution exactly,
// whatever the draft proposed. Drafts are sampled in JS (test/helpers/rng.ts) from an
// independent float64 warping reference (test/helpers/warp.ts), the emitted tokens are tallied,
// and Pearson's chi-square test (test/helpers/stats.ts) compares them with the target.
//
// The "language" is a small Markov chain: a row of logits for the start and one row per previous
// token, for the target (P) and for the draft (Q), so descending into a different draft token
// changes the next distribution. The first emitted token must follow P(.|start) and the first two
// must follow P(y1|start) P(y2|y1); when a step emits one token only, generation continues with a
// second verification from the new prefix, as a real decoder would.
//
// Thresholds: a correct kernel must give p > 1e-3 at the fixed seeds below. The same harness
// with a planted residual bug (_fault) must give p < 1e-6, which shows the draw counts have power.
import { describe, expect, it } from 'vitest';
import {
  verifyChain,
  verifyChainBatch,
  verifyTree,
  type SamplingOptions,
  type TreeChildrenMode,
  type VerifyChainBatchOptions,
  type VerifyTreeOptions,
} from '../lib/index.js';
import { Rng } from './helpers/rng.js';
import { chiSquareSurvival, chiSquareTest, gammaQ } from './helpers/stats.js';
import { sample, topTokens, warp } from './helpers/warp.js';

type Fault = 'residual-no-clamp' | 'residual-from-target';

const PASS_P = 1e-3;
const REJECT_P = 1e-6;

// ---------------------------------------------------------------------------------------------
// The Markov "language" and its warped distributions.

interface Model {
  V: number;
  /** (V + 1) rows: row 0 at the start, row y + 1 after token y. */
  target: Float32Array;
  draft: Float32Array;
}

function makeModel(rng: Rng, V: number, opts: { sd?: number; negInfFraction?: number } = {}): Model {
  const sd = opts.sd ?? 2;
  const fill = (): Float32Array => {
    const a = rng.normals((V + 1) * V, sd);
    const f = opts.negInfFraction ?? 0;
    if (f > 0)
      for (let r = 0; r <= V; ++r)
        for (let j = 0; j < V; ++j) {
          // Keep the row's largest-index entry finite so no row is all -Infinity.
          if (j !== r % V && rng.float() < f) a[r * V + j] = -Infinity;
        }
    return a;
  };
  return { V, target: fill(), draft: fill() };
}

/** Row of logits after `prev` (-1 = start). */
function row(table: Float32Array, V: number, prev: number): Float32Array {
  return table.subarray((prev + 1) * V, (prev + 2) * V);
}

class Dists {
  readonly p: Float64Array[] = [];
  readonly q: Float64Array[] = [];
  constructor(
    readonly model: Model,
    readonly s: SamplingOptions,
  ) {
    const V = model.V;
    for (let r = 0; r <= V; ++r) {
      this.p.push(warp(model.target, V, s, r * V));
      this.q.push(warp(model.draft, V, s, r * V));
    }
  }
  /** Target distribution after prev (-1 = start). */
  P(prev: number): Float64Array {
    return this.p[prev + 1] as Float64Array;
  }
  Q(prev: number): Float64Array {
    return this.q[prev + 1] as Float64Array;
  }
  private readonly tops = new Map<number, number[]>();
  /** The draft's tokens after prev by decreasing probability (deterministic children). */
  topQ(prev: number): number[] {
    let t = this.tops.get(prev);
    if (!t) this.tops.set(prev, (t = topTokens(this.Q(prev), this.model.V)));
    return t;
  }
  qSupport(prev: number): number {
    return this.topQ(prev).length;
  }
  expectedFirst(): Float64Array {
    return this.P(-1);
  }
  expectedJoint(): Float64Array {
    const V = this.model.V;
    const out = new Float64Array(V * V);
    const p1 = this.P(-1);
    for (let a = 0; a < V; ++a) {
      const p2 = this.P(a);
      for (let b = 0; b < V; ++b) out[a * V + b] = (p1[a] as number) * (p2[b] as number);
    }
    return out;
  }
}

interface Tally {
  first: Float64Array;
  joint: Float64Array;
}

// ---------------------------------------------------------------------------------------------
// Chain generation through verifyChainBatch.

interface ChainRunOptions {
  gMin: number;
  gMax: number;
  fault?: Fault;
  chunk?: number;
}

/** One verification step for B sequences from the given prefixes; returns each sequence's emitted tokens. */
function chainStep(
  d: Dists,
  prevs: Int32Array,
  rng: Rng,
  seed: number,
  streamBase: number,
  o: ChainRunOptions,
): { tokens: Int32Array; offsets: Int32Array } {
  const V = d.model.V;
  const B = prevs.length;
  const lengths = new Int32Array(B);
  let totalG = 0;
  for (let b = 0; b < B; ++b) totalG += lengths[b] = rng.range(o.gMin, o.gMax);
  const target = new Float32Array((totalG + B) * V);
  const draft = new Float32Array(totalG * V);
  const draftTokens = new Int32Array(totalG);
  let tr = 0;
  let dr = 0;
  for (let b = 0; b < B; ++b) {
    let prev = prevs[b] as number;
    for (let i = 0; i < (lengths[b] as number); ++i) {
      target.set(row(d.model.target, V, prev), tr++ * V);
      draft.set(row(d.model.draft, V, prev), dr * V);
      const x = sample(d.Q(prev), rng.float());
      draftTokens[dr++] = x;
      prev = x;
    }
    target.set(row(d.model.target, V, prev), tr++ * V);
  }
  const streams = Array.from({ length: B }, (_, b) => streamBase + b);
  const opts: VerifyChainBatchOptions & { _fault?: Fault } = {
    targetLogits: target,
    draftLogits: draft,
    draftTokens,
    draftLengths: lengths,
    vocabSize: V,
    sampling: d.s,
    seed,
    streams,
  };
  if (o.fault) opts._fault = o.fault;
  const r = verifyChainBatch(opts);
  return { tokens: r.tokens, offsets: r.offsets };
}

function runChain(d: Dists, N: number, seed: number, o: ChainRunOptions): Tally {
  const V = d.model.V;
  const rng = new Rng(seed, 1);
  const first = new Float64Array(V);
  const joint = new Float64Array(V * V);
  const chunk = o.chunk ?? 8192;
  for (let start = 0, c = 0; start < N; start += chunk, ++c) {
    const B = Math.min(chunk, N - start);
    const r1 = chainStep(d, new Int32Array(B).fill(-1), rng, seed, start, o);
    const pendingIdx: number[] = [];
    const y1s = new Int32Array(B);
    for (let b = 0; b < B; ++b) {
      const off = r1.offsets[b] as number;
      const y1 = r1.tokens[off] as number;
      y1s[b] = y1;
      first[y1]! += 1;
      if ((r1.offsets[b + 1] as number) - off >= 2) joint[y1 * V + (r1.tokens[off + 1] as number)]! += 1;
      else pendingIdx.push(b);
    }
    // Sequences that emitted one token continue from their new prefix (fresh streams).
    if (pendingIdx.length > 0) {
      const prevs = Int32Array.from(pendingIdx, (b) => y1s[b] as number);
      const r2 = chainStep(d, prevs, rng, seed, N + start, o);
      for (let i = 0; i < pendingIdx.length; ++i) {
        const y1 = prevs[i] as number;
        joint[y1 * V + (r2.tokens[r2.offsets[i] as number] as number)]! += 1;
      }
    }
  }
  return { first, joint };
}

// ---------------------------------------------------------------------------------------------
// Tree generation through verifyTree.

interface TreeRunOptions {
  mode: TreeChildrenMode;
  maxDepth: number;
  maxBranch: number;
  /** Fixed number of children at the root (otherwise 1..maxBranch). */
  rootBranch?: number;
  fault?: Fault;
}

interface DraftTree {
  parents: Int32Array;
  tokens: Int32Array;
}

interface Node {
  token: number;
  kids: Node[];
}

/** Draws k children of a node from its draft distribution q, as the mode says. */
function drawChildren(d: Dists, prev: number, k: number, mode: TreeChildrenMode, rng: Rng): number[] {
  const q = d.Q(prev);
  if (mode === 'deterministic') return d.topQ(prev).slice(0, k);
  if (mode === 'sampled-with-replacement') return Array.from({ length: k }, () => sample(q, rng.float()));
  // Without replacement: draw, remove the drawn token, renormalise (by sampling against the
  // remaining total), repeat.
  const w = Float64Array.from(q);
  let total = 1;
  const out: number[] = [];
  for (let i = 0; i < Math.min(k, d.qSupport(prev)); ++i) {
    const target = rng.float() * total;
    let cum = 0;
    let x = -1;
    for (let j = 0; j < w.length; ++j) {
      if ((w[j] as number) <= 0) continue;
      cum += w[j] as number;
      x = j;
      if (cum > target) break;
    }
    out.push(x);
    total -= w[x] as number;
    w[x] = 0;
  }
  return out;
}

function buildTree(d: Dists, rootPrev: number, rng: Rng, o: TreeRunOptions): DraftTree {
  const expand = (prev: number, depth: number): Node[] => {
    if (depth >= o.maxDepth) return [];
    const k = depth === 0 ? (o.rootBranch ?? rng.range(1, o.maxBranch)) : rng.range(0, o.maxBranch);
    return drawChildren(d, prev, k, o.mode, rng).map((token) => ({ token, kids: expand(token, depth + 1) }));
  };
  const roots = expand(rootPrev, 0);
  const parents: number[] = [];
  const tokens: number[] = [];
  if (rng.float() < 0.5) {
    // Depth-first preorder: siblings are not contiguous.
    const visit = (n: Node, parent: number): void => {
      const id = tokens.length;
      parents.push(parent);
      tokens.push(n.token);
      for (const c of n.kids) visit(c, id);
    };
    for (const r of roots) visit(r, -1);
  } else {
    const queue: Array<[Node, number]> = roots.map((r) => [r, -1]);
    for (let h = 0; h < queue.length; ++h) {
      const [n, parent] = queue[h] as [Node, number];
      const id = tokens.length;
      parents.push(parent);
      tokens.push(n.token);
      for (const c of n.kids) queue.push([c, id]);
    }
  }
  return { parents: Int32Array.from(parents), tokens: Int32Array.from(tokens) };
}

let scratch = new Float32Array(0);

function treeStep(d: Dists, rootPrev: number, rng: Rng, seed: number, stream: number, o: TreeRunOptions): Int32Array {
  const V = d.model.V;
  const t = buildTree(d, rootPrev, rng, o);
  const n = t.tokens.length;
  if (scratch.length < 2 * (n + 1) * V) scratch = new Float32Array(4 * (n + 1) * V);
  const target = scratch.subarray(0, (n + 1) * V);
  const needDraft = o.mode !== 'deterministic';
  const draft = needDraft ? scratch.subarray((n + 1) * V, 2 * (n + 1) * V) : undefined;
  target.set(row(d.model.target, V, rootPrev), 0);
  draft?.set(row(d.model.draft, V, rootPrev), 0);
  for (let i = 0; i < n; ++i) {
    target.set(row(d.model.target, V, t.tokens[i] as number), (i + 1) * V);
    draft?.set(row(d.model.draft, V, t.tokens[i] as number), (i + 1) * V);
  }
  const opts: VerifyTreeOptions & { _fault?: Fault } = {
    parents: t.parents,
    tokens: t.tokens,
    targetLogits: target,
    vocabSize: V,
    sampling: d.s,
    seed,
    stream,
    children: o.mode,
  };
  if (draft) opts.draftLogits = draft;
  if (o.fault) opts._fault = o.fault;
  return verifyTree(opts).tokens;
}

function runTree(d: Dists, N: number, seed: number, o: TreeRunOptions, twoTokens = true): Tally {
  const V = d.model.V;
  const rng = new Rng(seed, 2);
  const first = new Float64Array(V);
  const joint = new Float64Array(V * V);
  for (let i = 0; i < N; ++i) {
    const out = treeStep(d, -1, rng, seed, i, o);
    const y1 = out[0] as number;
    first[y1]! += 1;
    if (!twoTokens) continue;
    const y2 = out.length >= 2 ? (out[1] as number) : (treeStep(d, y1, rng, seed, N + i, o)[0] as number);
    joint[y1 * V + y2]! += 1;
  }
  return { first, joint };
}

// ---------------------------------------------------------------------------------------------

const SAMPLINGS: Array<[string, SamplingOptions]> = [
  ['T=1', { temperature: 1 }],
  ['T=0.7', { temperature: 0.7 }],
  ['T=1.5', { temperature: 1.5 }],
  ['topK', { temperature: 1, topK: 5 }],
  ['topP', { temperature: 0.9, topP: 0.8 }],
  ['topK+topP', { temperature: 1.2, topK: 8, topP: 0.7 }],
];

// Small vocabularies for the joint (V^2 cells) tests.
const SMALL_SAMPLINGS: Array<[string, SamplingOptions]> = [
  ['T=1', { temperature: 1 }],
  ['T=0.7', { temperature: 0.7 }],
  ['T=1.5', { temperature: 1.5 }],
  ['topK', { temperature: 1, topK: 3 }],
  ['topP', { temperature: 1, topP: 0.75 }],
  ['topK+topP', { temperature: 1.3, topK: 4, topP: 0.8 }],
];

const TREE_MODES: TreeChildrenMode[] = ['sampled-with-replacement', 'sampled-without-replacement', 'deterministic'];

function expectPass(observed: Float64Array, expected: Float64Array, label: string): void {
  const r = chiSquareTest(observed, expected);
  expect(r.pValue, `${label}: chi2=${r.statistic.toFixed(1)} df=${r.df}`).toBeGreaterThan(PASS_P);
}

function expectReject(observed: Float64Array, expected: Float64Array, label: string): void {
  const r = chiSquareTest(observed, expected);
  expect(r.pValue, `${label}: chi2=${r.statistic.toFixed(1)} df=${r.df}`).toBeLessThan(REJECT_P);
}

describe('statistics helpers', () => {
  it('gammaQ and the chi-square tail match known values', () => {
    // Critical values of the chi-square distribution.
    expect(chiSquareSurvival(3.841458820694124, 1)).toBeCloseTo(0.05, 10);
    expect(chiSquareSurvival(18.307038053275146, 10)).toBeCloseTo(0.05, 10);
    expect(chiSquareSurvival(6.634896601021214, 1)).toBeCloseTo(0.01, 10);
    // df = 2: Q = exp(-x / 2) exactly, deep in the tail too.
    for (const x of [0.1, 1, 10, 50, 100]) expect(chiSquareSurvival(x, 2) / Math.exp(-x / 2)).toBeCloseTo(1, 10);
    // Q(1/2, x) = erfc(sqrt(x)); erfc(3) = 2.209049699858544e-5.
    expect(gammaQ(0.5, 9) / 2.209049699858544e-5).toBeCloseTo(1, 8);
    // Tails around the rejection threshold and beyond (values from scipy.stats.chi2.sf).
    const close = (got: number, want: number): void => expect(Math.abs(got / want - 1)).toBeLessThan(1e-9);
    close(chiSquareSurvival(83.64, 30), 5.844107865640759e-7);
    close(chiSquareSurvival(100, 40), 4.791357300338064e-7);
    close(chiSquareSurvival(250, 100), 7.76693640353949e-15);
    close(chiSquareSurvival(5, 3), 0.1717971442967335);
  });

  it('chiSquareTest pools small cells and flags impossible outcomes', () => {
    const r = chiSquareTest([50, 50, 1, 0], [0.5, 0.49, 0.005, 0.005]);
    expect(r.cells).toBe(2);
    expect(r.df).toBe(1);
    expect(chiSquareTest([10, 1], [1, 0]).pValue).toBe(0);
    expect(chiSquareTest([500, 500], [0.5, 0.5]).pValue).toBeCloseTo(1, 10);
  });
});

describe('chain verification is exact (verifyChainBatch)', () => {
  // First token, V from 4 to 50: 30k draws per configuration. Under the faults the first token's
  // distribution moves by O(0.05) per cell, so 30k draws put chi2 far above the 1e-6 cut.
  const firstCases: Array<[string, number, number, SamplingOptions, number]> = [];
  const Vs = [4, 12, 50];
  SAMPLINGS.forEach(([name, s], i) => firstCases.push([name, Vs[i % 3] as number, 1 + (i % 6), s, 100 + i]));
  firstCases.push(['T=1, -Infinity logits', 20, 4, { temperature: 1 }, 150]);

  it.each(firstCases)('first emitted token follows the target: %s, V=%i, g<=%i', (_n, V, g, s, seed) => {
    const d = new Dists(makeModel(new Rng(seed), V, { negInfFraction: _n.includes('Infinity') ? 0.3 : 0 }), s);
    const t = runChain(d, 30000, seed, { gMin: 1, gMax: g });
    expectPass(t.first, d.expectedFirst(), 'first token');
  });

  // First two tokens jointly, V = 5: 25 cells, 40k draws.
  it.each(SMALL_SAMPLINGS.map(([n, s], i) => [n, s, 200 + i] as const))(
    'first two emitted tokens follow the target jointly: %s',
    (_n, s, seed) => {
      const d = new Dists(makeModel(new Rng(seed), 5), s);
      const t = runChain(d, 40000, seed, { gMin: 1, gMax: 3 });
      expectPass(t.first, d.expectedFirst(), 'first token');
      expectPass(t.joint, d.expectedJoint(), 'joint');
    },
  );

  it.each(['residual-no-clamp', 'residual-from-target'] as const)(
    'the same harness rejects a planted bug: %s',
    (fault) => {
      const configs: SamplingOptions[] = [{ temperature: 1 }, { temperature: 1, topK: 6, topP: 0.9 }];
      for (const [i, s] of configs.entries()) {
        const d = new Dists(makeModel(new Rng(300 + i), 12), s);
        const t = runChain(d, 30000, 300 + i, { gMin: 1, gMax: 4, fault });
        expectReject(t.first, d.expectedFirst(), `${fault} first token`);
      }
      const d = new Dists(makeModel(new Rng(310), 5), { temperature: 1 });
      const t = runChain(d, 40000, 310, { gMin: 1, gMax: 3, fault });
      expectReject(t.joint, d.expectedJoint(), `${fault} joint`);
    },
  );
});

describe('tree verification is exact (verifyTree)', () => {
  const shape = { maxDepth: 3, maxBranch: 3 };

  // First token, V = 20 (past the kernels' 16-lane loops), a fifth of the logits -Infinity:
  // 16k trees (depth <= 2) per configuration; the planted-bug tests below show that 16k trees
  // detect a wrong residual.
  const firstCases = TREE_MODES.flatMap((mode, m) =>
    SAMPLINGS.filter((_, i) => (i + m) % 2 === 0).map(([n, s], i) => [mode, n, s, 400 + 10 * m + i] as const),
  );
  it.each(firstCases)('first emitted token follows the target: %s, %s', (mode, _n, s, seed) => {
    const d = new Dists(makeModel(new Rng(seed), 20, { negInfFraction: 0.2 }), s);
    const t = runTree(d, 16000, seed, { mode, ...shape, maxDepth: 2 }, false);
    expectPass(t.first, d.expectedFirst(), 'first token');
  });

  // First two tokens jointly, V = 5: 25 cells, 20k generations (depth <= 3).
  const jointCases = TREE_MODES.flatMap((mode, m) =>
    SMALL_SAMPLINGS.filter((_, i) => (i + m) % 2 === 1).map(([n, s], i) => [mode, n, s, 500 + 10 * m + i] as const),
  );
  it.each(jointCases)('first two emitted tokens follow the target jointly: %s, %s', (mode, _n, s, seed) => {
    const d = new Dists(makeModel(new Rng(seed), 5), s);
    const t = runTree(d, 20000, seed, { mode, ...shape });
    expectPass(t.first, d.expectedFirst(), 'first token');
    expectPass(t.joint, d.expectedJoint(), 'joint');
  });

  // The planted bugs. residual-no-clamp only matters once a child is rejected and a sibling is
  // tried, so the first-token runs give the root three children (16k trees, as above); the joint
  // runs are exactly the harness of the joint tests (20k generations, V = 5, random shapes).
  it.each([
    ['sampled-with-replacement', 'residual-no-clamp'],
    ['sampled-without-replacement', 'residual-no-clamp'],
    ['sampled-with-replacement', 'residual-from-target'],
  ] as const)('the same harness rejects a planted bug (first token): %s, %s', (mode, fault) => {
    const d = new Dists(makeModel(new Rng(601), 8), { temperature: 1 });
    const t = runTree(d, 16000, 601, { mode, maxDepth: 1, maxBranch: 1, rootBranch: 3, fault }, false);
    expectReject(t.first, d.expectedFirst(), `${mode} ${fault} first token`);
  });

  it.each([
    ['sampled-with-replacement', 'residual-no-clamp'],
    ['sampled-without-replacement', 'residual-from-target'],
  ] as const)('the same harness rejects a planted bug (first two tokens): %s, %s', (mode, fault) => {
    const d = new Dists(makeModel(new Rng(500), 5), { temperature: 1 });
    const t = runTree(d, 20000, 500, { mode, ...shape, fault });
    expectReject(t.joint, d.expectedJoint(), `${mode} ${fault} joint`);
  });
});

// ---------------------------------------------------------------------------------------------
// Determinism and equivalences, token for token.

function randomSampling(rng: Rng, V: number): SamplingOptions {
  const s: SamplingOptions = { temperature: rng.pick([0, 0.5, 1, 1.7]) };
  if (rng.float() < 0.4) s.topK = rng.range(1, V + 1);
  if (rng.float() < 0.4) s.topP = rng.pick([0.3, 0.6, 0.9, 1]);
  return s;
}

interface ChainCase {
  V: number;
  g: number;
  s: SamplingOptions;
  target: Float32Array;
  draft: Float32Array;
  tokens: Int32Array;
}

function randomChainCase(rng: Rng, gMax = 6): ChainCase {
  const V = rng.range(2, 40);
  const g = rng.range(0, gMax);
  const s = randomSampling(rng, V);
  const target = rng.normals((g + 1) * V, 2);
  const draft = rng.normals(g * V, 2);
  // Mostly drafts that agree with the target somewhat, so long accepted runs happen.
  if (rng.float() < 0.5) for (let i = 0; i < draft.length; ++i) draft[i] = (target[i] as number) + 0.5 * rng.normal();
  const tokens = new Int32Array(g);
  for (let i = 0; i < g; ++i) {
    const q = warp(draft, V, s.temperature === 0 ? { temperature: 1 } : s, i * V);
    tokens[i] = rng.float() < 0.9 ? sample(q, rng.float()) : rng.int(V);
  }
  return { V, g, s, target, draft, tokens };
}

describe('determinism', () => {
  it('the same seed and stream give the same tokens; other streams and seeds give others', () => {
    const d = new Dists(makeModel(new Rng(700), 10), { temperature: 1 });
    const run = (seed: number, base: number) => chainStep(d, new Int32Array(500).fill(-1), new Rng(7), seed, base, { gMin: 1, gMax: 4 });
    const a = run(11, 0);
    expect(run(11, 0)).toEqual(a);
    expect(run(11, 1000).tokens).not.toEqual(a.tokens);
    expect(run(12, 0).tokens).not.toEqual(a.tokens);

    const rng = new Rng(701);
    for (let i = 0; i < 200; ++i) {
      const c = randomChainCase(rng);
      if (c.s.temperature === 0) continue;
      const o = { targetLogits: c.target, draftLogits: c.draft, draftTokens: c.tokens, vocabSize: c.V, sampling: c.s };
      const r1 = verifyChain({ ...o, seed: 5, stream: i });
      expect(verifyChain({ ...o, seed: 5, stream: i })).toEqual(r1);
      expect(verifyChain({ ...o, seed: 5n, stream: BigInt(i) })).toEqual(r1);
      const t = verifyTree({
        parents: Int32Array.from({ length: c.g }, (_, k) => k - 1),
        tokens: c.tokens,
        targetLogits: c.target,
        draftLogits: Float32Array.from([...c.draft, ...c.target.subarray(0, c.V)]),
        vocabSize: c.V,
        sampling: c.s,
        seed: 5,
        stream: i,
      });
      expect(verifyTree({
        parents: Int32Array.from({ length: c.g }, (_, k) => k - 1),
        tokens: c.tokens,
        targetLogits: c.target,
        draftLogits: Float32Array.from([...c.draft, ...c.target.subarray(0, c.V)]),
        vocabSize: c.V,
        sampling: c.s,
        seed: 5,
        stream: i,
      })).toEqual(t);
    }
    // The default stream is 0.
    const c = randomChainCase(new Rng(702));
    const o = { targetLogits: c.target, draftLogits: c.draft, draftTokens: c.tokens, vocabSize: c.V, sampling: { temperature: 1 } };
    expect(verifyChain({ ...o, seed: 9 })).toEqual(verifyChain({ ...o, seed: 9, stream: 0 }));
  });

  it('a chain-shaped tree (sampled-with-replacement) emits exactly what verifyChain emits', () => {
    const rng = new Rng(710);
    let accepted = 0;
    let rejected = 0;
    for (let i = 0; i < 4000; ++i) {
      const c = randomChainCase(rng);
      const seed = rng.int(1 << 30);
      const stream = rng.int(1 << 20);
      const chain = verifyChain({
        targetLogits: c.target,
        draftLogits: c.draft,
        draftTokens: c.tokens,
        vocabSize: c.V,
        sampling: c.s,
        seed,
        stream,
      });
      // The tree has one more draft row (the leaf's), which nothing reads but must be valid.
      const draftRows = new Float32Array((c.g + 1) * c.V);
      draftRows.set(c.draft);
      draftRows.set(rng.normals(c.V), c.g * c.V);
      const tree = verifyTree({
        parents: Int32Array.from({ length: c.g }, (_, k) => k - 1),
        tokens: c.tokens,
        targetLogits: c.target,
        draftLogits: draftRows,
        vocabSize: c.V,
        sampling: c.s,
        seed,
        stream,
        children: 'sampled-with-replacement',
      });
      const label = `case ${i}: V=${c.V} g=${c.g} ${JSON.stringify(c.s)}`;
      expect(Array.from(tree.tokens), label).toEqual(Array.from(chain.tokens));
      expect(Array.from(tree.path), label).toEqual(Array.from({ length: chain.acceptedCount }, (_, k) => k));
      if (chain.acceptedCount < c.g) ++rejected;
      else ++accepted;
    }
    // Both outcomes are well represented.
    expect(accepted).toBeGreaterThan(500);
    expect(rejected).toBeGreaterThan(500);
  });

  it('verifyChainBatch equals B separate verifyChain calls (ragged, zero lengths, per-sequence sampling)', () => {
    const rng = new Rng(720);
    for (let trial = 0; trial < 20; ++trial) {
      const V = rng.range(2, 30);
      const B = rng.range(1, 40);
      const cases: ChainCase[] = [];
      for (let b = 0; b < B; ++b) {
        const g = rng.float() < 0.25 ? 0 : rng.range(1, 5);
        const s = randomSampling(rng, V);
        const target = rng.normals((g + 1) * V, 2);
        const draft = rng.normals(g * V, 2);
        const tokens = new Int32Array(g);
        for (let i = 0; i < g; ++i) tokens[i] = sample(warp(draft, V, { temperature: 1 }, i * V), rng.float());
        cases[b] = { V, g, s, target, draft, tokens };
      }
      const perSequence = trial % 2 === 0;
      const shared: SamplingOptions = { temperature: 1, topK: trial % 3 === 0 ? 3 : 0 };
      const samplingOf = (b: number): SamplingOptions => (perSequence ? (cases[b] as ChainCase).s : shared);
      const concat = (parts: Float32Array[]): Float32Array => {
        const out = new Float32Array(parts.reduce((n, p) => n + p.length, 0));
        let o = 0;
        for (const p of parts) out.set(p, o), (o += p.length);
        return out;
      };
      const seed = rng.int(1 << 30);
      const explicitStreams = trial % 4 < 2;
      const streams = Array.from({ length: B }, (_, b) => (explicitStreams ? 1000 + 7 * b : b));
      const batch = verifyChainBatch({
        targetLogits: concat(cases.map((c) => c.target)),
        draftLogits: concat(cases.map((c) => c.draft)),
        draftTokens: Int32Array.from(cases.flatMap((c) => Array.from(c.tokens))),
        draftLengths: Int32Array.from(cases.map((c) => c.g)),
        vocabSize: V,
        sampling: perSequence ? cases.map((c) => c.s) : shared,
        seed,
        ...(explicitStreams ? { streams } : {}),
      });
      expect(batch.offsets[0]).toBe(0);
      for (let b = 0; b < B; ++b) {
        const c = cases[b] as ChainCase;
        const one = verifyChain({
          targetLogits: c.target,
          draftLogits: c.draft,
          draftTokens: c.tokens,
          vocabSize: V,
          sampling: samplingOf(b),
          seed,
          stream: streams[b] as number,
        });
        expect(batch.acceptedCounts[b]).toBe(one.acceptedCount);
        expect(Array.from(batch.tokens.subarray(batch.offsets[b], batch.offsets[b + 1]))).toEqual(Array.from(one.tokens));
      }
    }
  });
});
