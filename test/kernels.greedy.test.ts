// Greedy verification (temperature 0) is deterministic, so it is tested token for token against a
// plain JS reference: a chain accepts while the draft token is the argmax of the target row
// (ties to the lowest id) and emits that argmax at the first mismatch, or the bonus argmax when
// everything matched; a tree follows the child whose token is the argmax, else emits the argmax.
// Small vocabularies and small integer logits make matches and ties frequent.
import { describe, expect, it } from 'vitest';
import { verifyChain, verifyChainBatch, verifyTree, type SamplingOptions, type TreeChildrenMode } from '../lib/index.js';
import { Rng } from './helpers/rng.js';
import { argmax } from './helpers/warp.js';

/** Logits with many ties: small integers, sometimes -Infinity (never a whole row). */
function tiedLogits(rng: Rng, rows: number, V: number): Float32Array {
  const a = new Float32Array(rows * V);
  for (let r = 0; r < rows; ++r) {
    for (let j = 0; j < V; ++j) a[r * V + j] = rng.float() < 0.1 ? -Infinity : rng.int(3);
    a[r * V + rng.int(V)] = rng.int(3);
  }
  return a;
}

function greedySampling(rng: Rng, V: number): SamplingOptions {
  // Top-k and top-p never change the argmax; greedy must ignore them.
  const s: SamplingOptions = { temperature: 0 };
  if (rng.float() < 0.3) s.topK = rng.range(1, V);
  if (rng.float() < 0.3) s.topP = 0.5;
  return s;
}

function chainReference(target: Float32Array, tokens: Int32Array, V: number): { acceptedCount: number; tokens: number[] } {
  const out: number[] = [];
  for (let i = 0; i < tokens.length; ++i) {
    const best = argmax(target, i * V, V);
    if (best !== tokens[i]) {
      out.push(best);
      return { acceptedCount: i, tokens: out };
    }
    out.push(best);
  }
  out.push(argmax(target, tokens.length * V, V));
  return { acceptedCount: tokens.length, tokens: out };
}

/** Draft tokens that agree with the target's argmax most of the time. */
function draftTokens(rng: Rng, target: Float32Array, g: number, V: number): Int32Array {
  const t = new Int32Array(g);
  for (let i = 0; i < g; ++i) t[i] = rng.float() < 0.7 ? argmax(target, i * V, V) : rng.int(V);
  return t;
}

describe('greedy chains', () => {
  it('verifyChain matches the reference over thousands of random cases', () => {
    const rng = new Rng(1);
    const acceptedHist = new Array(7).fill(0);
    for (let i = 0; i < 5000; ++i) {
      const V = rng.range(3, 5);
      const g = rng.range(0, 6);
      const target = tiedLogits(rng, g + 1, V);
      const tokens = draftTokens(rng, target, g, V);
      const withDraft = rng.float() < 0.5;
      const r = verifyChain({
        targetLogits: target,
        ...(withDraft ? { draftLogits: tiedLogits(rng, g, V) } : {}),
        draftTokens: tokens,
        vocabSize: V,
        sampling: greedySampling(rng, V),
        seed: rng.int(1000),
        stream: rng.int(1000),
      });
      const ref = chainReference(target, tokens, V);
      expect(r.acceptedCount, `case ${i}`).toBe(ref.acceptedCount);
      expect(Array.from(r.tokens), `case ${i}`).toEqual(ref.tokens);
      acceptedHist[r.acceptedCount] += 1;
    }
    // Full acceptance and early mismatches are both common.
    expect(acceptedHist[0]).toBeGreaterThan(500);
    expect(acceptedHist[6]).toBeGreaterThan(100);
  });

  it('returns fresh token arrays, also for drafts longer than the binding\'s reused buffer', () => {
    // The binding writes into one reused buffer; each result must own its tokens.
    const rng = new Rng(7);
    const results: { r: ReturnType<typeof verifyChain>; ref: ReturnType<typeof chainReference> }[] = [];
    for (const g of [3, 200, 5, 1000, 0]) {
      const V = 4;
      const target = tiedLogits(rng, g + 1, V);
      const tokens = draftTokens(rng, target, g, V);
      for (let i = 0; i < g; ++i) tokens[i] = argmax(target, i * V, V);  // all accepted: g + 1 tokens out
      const r = verifyChain({ targetLogits: target, draftTokens: tokens, vocabSize: V, sampling: { temperature: 0 }, seed: 1 });
      results.push({ r, ref: chainReference(target, tokens, V) });
    }
    for (const { r, ref } of results) {
      expect(r.acceptedCount).toBe(ref.acceptedCount);
      expect(Array.from(r.tokens)).toEqual(ref.tokens);
    }
  });

  it('ties go to the lowest id', () => {
    const V = 4;
    const target = Float32Array.from([1, 3, 3, 3, /* row 1 */ -Infinity, 2, 2, -Infinity, /* row 2 */ 5, 5, 5, 5]);
    // Token 2 ties with token 1 for the max but is not the lowest id: rejected, 1 emitted.
    expect(Array.from(verifyChain({ targetLogits: target, draftTokens: Int32Array.from([2, 0]), vocabSize: V, sampling: { temperature: 0 }, seed: 0 }).tokens)).toEqual([1]);
    // 1 then 1 are both the lowest-id argmax; the bonus is 0.
    const r = verifyChain({ targetLogits: target, draftTokens: Int32Array.from([1, 1]), vocabSize: V, sampling: { temperature: 0 }, seed: 0 });
    expect(r.acceptedCount).toBe(2);
    expect(Array.from(r.tokens)).toEqual([1, 1, 0]);
  });

  it('does not depend on the seed or stream', () => {
    const rng = new Rng(2);
    for (let i = 0; i < 200; ++i) {
      const V = 4;
      const g = rng.range(0, 5);
      const target = tiedLogits(rng, g + 1, V);
      const tokens = draftTokens(rng, target, g, V);
      const o = { targetLogits: target, draftTokens: tokens, vocabSize: V, sampling: { temperature: 0 } };
      expect(verifyChain({ ...o, seed: 1 })).toEqual(verifyChain({ ...o, seed: 123456789n, stream: 77 }));
    }
  });

  it('verifyChainBatch (no draftLogits, ragged lengths with zeros) matches the reference', () => {
    const rng = new Rng(3);
    for (let trial = 0; trial < 50; ++trial) {
      const V = rng.range(3, 5);
      const B = rng.range(1, 64);
      const lengths = Int32Array.from({ length: B }, () => (rng.float() < 0.2 ? 0 : rng.range(1, 6)));
      const targets = Array.from(lengths, (g) => tiedLogits(rng, g + 1, V));
      const tokens = Array.from(lengths, (g, b) => draftTokens(rng, targets[b] as Float32Array, g, V));
      const target = new Float32Array(targets.reduce((n, t) => n + t.length, 0));
      let o = 0;
      for (const t of targets) target.set(t, o), (o += t.length);
      const r = verifyChainBatch({
        targetLogits: target,
        draftTokens: Int32Array.from(tokens.flatMap((t) => Array.from(t))),
        draftLengths: lengths,
        vocabSize: V,
        sampling: { temperature: 0 },
        seed: trial,
      });
      expect(r.offsets.length).toBe(B + 1);
      for (let b = 0; b < B; ++b) {
        const ref = chainReference(targets[b] as Float32Array, tokens[b] as Int32Array, V);
        expect(r.acceptedCounts[b]).toBe(ref.acceptedCount);
        expect(Array.from(r.tokens.subarray(r.offsets[b], r.offsets[b + 1]))).toEqual(ref.tokens);
      }
    }
  });
});

function treeReference(parents: Int32Array, tokens: Int32Array, target: Float32Array, V: number): { path: number[]; tokens: number[] } {
  const path: number[] = [];
  const out: number[] = [];
  let node = -1;
  for (;;) {
    const best = argmax(target, (node + 1) * V, V);
    let hit = -1;
    for (let c = 0; c < parents.length; ++c)
      if (parents[c] === node && tokens[c] === best) {
        hit = c;
        break;
      }
    out.push(best);
    if (hit < 0) return { path, tokens: out };
    path.push(hit);
    node = hit;
  }
}

/** A random tree in topological order whose tokens often equal the target's argmax. */
function randomTree(rng: Rng, V: number): { parents: Int32Array; tokens: Int32Array; target: Float32Array } {
  const n = rng.range(0, 14);
  const parents = new Int32Array(n);
  for (let i = 0; i < n; ++i) parents[i] = rng.float() < 0.3 ? -1 : rng.range(-1, i - 1);
  const target = tiedLogits(rng, n + 1, V);
  const tokens = new Int32Array(n);
  for (let i = 0; i < n; ++i) tokens[i] = rng.float() < 0.5 ? argmax(target, ((parents[i] as number) + 1) * V, V) : rng.int(V);
  return { parents, tokens, target };
}

describe('greedy trees', () => {
  it.each(['sampled-with-replacement', 'sampled-without-replacement', 'deterministic'] as TreeChildrenMode[])(
    'verifyTree (%s) matches the reference over thousands of random trees',
    (mode) => {
      const rng = new Rng(10 + mode.length);
      let deep = 0;
      for (let i = 0; i < 3000; ++i) {
        const V = rng.range(3, 5);
        const t = randomTree(rng, V);
        const withDraft = rng.float() < 0.5;
        const r = verifyTree({
          parents: t.parents,
          tokens: t.tokens,
          targetLogits: t.target,
          ...(withDraft ? { draftLogits: tiedLogits(rng, t.tokens.length + 1, V) } : {}),
          vocabSize: V,
          sampling: greedySampling(rng, V),
          seed: rng.int(1000),
          stream: rng.int(1000),
          children: mode,
        });
        const ref = treeReference(t.parents, t.tokens, t.target, V);
        expect(Array.from(r.path), `tree ${i}`).toEqual(ref.path);
        expect(Array.from(r.tokens), `tree ${i}`).toEqual(ref.tokens);
        if (ref.path.length >= 2) ++deep;
      }
      expect(deep).toBeGreaterThan(300);
    },
  );

  it('a chain-shaped greedy tree equals the greedy chain', () => {
    const rng = new Rng(20);
    for (let i = 0; i < 1000; ++i) {
      const V = rng.range(3, 5);
      const g = rng.range(0, 6);
      const target = tiedLogits(rng, g + 1, V);
      const tokens = draftTokens(rng, target, g, V);
      const chain = verifyChain({ targetLogits: target, draftTokens: tokens, vocabSize: V, sampling: { temperature: 0 }, seed: 0 });
      const tree = verifyTree({
        parents: Int32Array.from({ length: g }, (_, k) => k - 1),
        tokens,
        targetLogits: target,
        vocabSize: V,
        sampling: { temperature: 0 },
        seed: 0,
      });
      expect(Array.from(tree.tokens)).toEqual(Array.from(chain.tokens));
      expect(tree.path.length).toBe(chain.acceptedCount);
    }
  });

  it('follows the first matching child among duplicates and descends', () => {
    const V = 3;
    // Root argmax 2; children 0:(tok 1), 1:(tok 2), 2:(tok 2); node 1's argmax 0 with child 3:(tok 0).
    const parents = Int32Array.from([-1, -1, -1, 1, 2]);
    const tokens = Int32Array.from([1, 2, 2, 0, 1]);
    const target = Float32Array.from([0, 1, 2, /*0*/ 0, 0, 0, /*1*/ 3, 1, 1, /*2*/ 0, 9, 0, /*3*/ 1, 1, 1, /*4*/ 0, 0, 0]);
    const r = verifyTree({ parents, tokens, targetLogits: target, vocabSize: V, sampling: { temperature: 0 }, seed: 0 });
    expect(Array.from(r.path)).toEqual([1, 3]);
    expect(Array.from(r.tokens)).toEqual([2, 0, 0]);
  });
});
