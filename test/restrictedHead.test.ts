// Drafts with a restricted LM head (Model.withHead, GGUF key osd.head_tokens): the head scores only
// its ids, the other logits are -Infinity. On the real stories260K target: logits equal the full
// head's on its ids, the file round-trips, bad ids and corrupt keys are named errors, speculative
// decoding stays exact (greedy token-identical, sampled output chi-square against the target's own
// distribution; the draft never proposes tokens the target often picks), training through the head
// works (Trainer, online updates, trainDraft's headTokens) and keeps the head.
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createOnlineDecoder, createSpeculativeDecoder, createTrainer, frequentTokens, loadModel, trainDraft, writeRandomModel, type Model, type Strategy } from '../lib/index.js';
import { readGgufLayout, readTensorBytes, writeGgufRaw, type GgufKv } from '../lib/train/ggufRewrite.js';
import { chiSquareTest } from './helpers/stats.js';
import { suiteTempDir } from './helpers/tmp.js';
import { warp } from './helpers/warp.js';

const STORIES = join(import.meta.dirname, '../../shared/models/stories260K.bin');
const have = existsSync(STORIES);
if (!have) console.warn(`skip: ${STORIES} not found (restricted-head tests need ../shared/models)`);

// Every id but those = 1 (mod 3): a third of the vocabulary, frequent tokens among them, is missing.
const V = 512;
const HEAD = Array.from({ length: V }, (_, i) => i).filter((i) => i % 3 !== 1);

/** Raw GGUF array entry (type tag 9, element type, count, elements). */
function kvArray(elem: 'i32' | 'f32' | 'u8', values: number[]): Buffer {
  const size = elem === 'u8' ? 1 : 4;
  const b = Buffer.alloc(16 + size * values.length);
  b.writeUInt32LE(9, 0);
  b.writeUInt32LE(elem === 'i32' ? 5 : elem === 'f32' ? 6 : 0, 4);
  b.writeBigUInt64LE(BigInt(values.length), 8);
  values.forEach((v, i) => (elem === 'i32' ? b.writeInt32LE(v, 16 + 4 * i) : elem === 'f32' ? b.writeFloatLE(v, 16 + 4 * i) : b.writeUInt8(v, 16 + i)));
  return b;
}

describe.skipIf(!have)('restricted draft heads (stories260K)', () => {
  let target: Model;
  let full: Model; // the target stored in F16: a close draft
  let draft: Model; // the same, its head restricted to HEAD
  let lacking: Model; // the same, its head also without the target's likeliest next token after PROMPT
  const dir = suiteTempDir('osd-head-');
  const prompts: number[][] = [];
  const PROMPT = [1, 403, 407, 261, 378, 403, 407];

  beforeAll(async () => {
    target = await loadModel(STORIES);
    await target.save(join(dir, 'f16.gguf'), { type: 'F16' });
    full = await loadModel(join(dir, 'f16.gguf'));
    draft = await full.withHead(HEAD);
    const next = (await target.forward(PROMPT)).subarray((PROMPT.length - 1) * V);
    let best = 0;
    for (let j = 1; j < V; j++) if (next[j]! > next[best]!) best = j;
    lacking = await full.withHead(HEAD.filter((id) => id !== best));
    for (let seed = 0; prompts.length < 12; seed++) {
      const r = await target.generate({ tokens: [1], maxTokens: 4 + (seed % 8), sampling: { temperature: 1 }, seed: 500 + seed });
      if (r.stopReason === 'maxTokens') prompts.push([1, ...r.tokens]);
    }
  });
  afterAll(async () => {
    await Promise.all([target?.dispose(), full?.dispose(), draft?.dispose(), lacking?.dispose()]);
  });

  it("scores only its ids: the full head's logits there, -Infinity elsewhere; saved and reloaded as it is", async () => {
    expect(draft.info.headTokens).toBe(HEAD.length);
    expect(full.info.headTokens).toBe(V);
    expect(Array.from(draft.headTokenIds()!)).toEqual(HEAD);
    expect(full.headTokenIds()).toBeNull();
    // Fewer head rows read per token.
    expect(draft.info.weightBytesPerToken).toBeLessThan(full.info.weightBytesPerToken);
    const tokens = prompts[0]!;
    const a = await full.forward(tokens);
    const b = await draft.forward(tokens);
    const inHead = new Set(HEAD);
    let same = 0;
    for (let r = 0; r < tokens.length; r++)
      for (let j = 0; j < V; j++) {
        if (inHead.has(j)) {
          expect(b[r * V + j]).toBe(a[r * V + j]);
          same++;
        } else expect(b[r * V + j]).toBe(-Infinity);
      }
    expect(same).toBe(tokens.length * HEAD.length);

    // Ids in any order, repeated: the same head. null: the whole vocabulary again.
    await using shuffled = await full.withHead([...HEAD].reverse().concat(HEAD.slice(0, 5)));
    expect(Array.from(shuffled.headTokenIds()!)).toEqual(HEAD);
    await using whole = await draft.withHead(null);
    expect(whole.info.headTokens).toBe(V);
    expect(await whole.forward(tokens)).toEqual(a);

    // The file keeps the ids (osd.head_tokens), and the reloaded model its logits.
    const path = join(dir, 'restricted.gguf');
    await draft.save(path, { type: 'keep' });
    expect(readGgufLayout(path).kvs.some((kv) => kv.key === 'osd.head_tokens')).toBe(true);
    await using back = await loadModel(path);
    expect(Array.from(back.headTokenIds()!)).toEqual(HEAD);
    expect(await back.forward(tokens)).toEqual(b);
    // Converted to another type, the head stays.
    await using q8 = await draft.convert('Q8_0');
    expect(q8.info.headTokens).toBe(HEAD.length);
  });

  it('bad ids and corrupt osd.head_tokens entries are errors naming them', async () => {
    await expect(full.withHead([0, 512])).rejects.toThrow(new RangeError('ids[1] must be a token id in [0, 511], got 512'));
    await expect(full.withHead([3, NaN])).rejects.toThrow(new RangeError('ids[1] must be a token id in [0, 511], got NaN'));
    await expect(full.withHead([-1])).rejects.toThrow(RangeError);
    await expect(full.withHead([1.5])).rejects.toThrow(RangeError);
    await expect(full.withHead([])).rejects.toThrow(new RangeError('ids must hold at least one token id'));
    await expect(full.withHead('1,2' as never)).rejects.toThrow(TypeError);
    await expect(full.withHead(undefined as never)).rejects.toThrow(TypeError);

    // Files whose key is wrong: each load rejects, naming the key, and nothing crashes.
    const src = readGgufLayout(join(dir, 'f16.gguf'));
    const tensors = src.tensors.map((t) => ({ name: t.name, dims: t.dims, type: t.type, data: readTensorBytes(src, t.name) }));
    const cases: [string, Buffer, RegExp][] = [
      ['descending', kvArray('i32', [5, 3]), /osd\.head_tokens must be strictly ascending/],
      ['repeated', kvArray('i32', [3, 3]), /osd\.head_tokens must be strictly ascending/],
      ['out of range', kvArray('i32', [0, 512]), /osd\.head_tokens\[1\] = 512 is out of range for vocabulary size 512/],
      ['negative', kvArray('i32', [-2, 4]), /osd\.head_tokens\[0\] = -2 is out of range/],
      ['empty', kvArray('i32', []), /osd\.head_tokens is empty/],
      ['floats', kvArray('f32', [1, 2]), /osd\.head_tokens must be an array of integer token ids, got array\[float32\]/],
      ['not an array', Buffer.from([5, 0, 0, 0, 7, 0, 0, 0]), /osd\.head_tokens must be an array of integer token ids, got int32/],
    ];
    for (const [name, raw, message] of cases) {
      const path = join(dir, `bad-${name.replace(/ /g, '-')}.gguf`);
      const kvs: GgufKv[] = [...src.kvs, { key: 'osd.head_tokens', raw }];
      writeGgufRaw(path, kvs, tensors, src.alignment);
      await expect(loadModel(path), name).rejects.toThrow(message);
    }
    // A valid one, written the same way, loads.
    const ok = join(dir, 'ok.gguf');
    writeGgufRaw(ok, [...src.kvs, { key: 'osd.head_tokens', raw: kvArray('u8', [2, 9, 200]) }], tensors, src.alignment);
    await using m = await loadModel(ok);
    expect(Array.from(m.headTokenIds()!)).toEqual([2, 9, 200]);
  });

  it('setWeights takes only weights with the same head', async () => {
    await using a = await full.withHead(HEAD);
    await using other = await full.withHead(HEAD.slice(1));
    expect(() => a.setWeights(other)).toThrow(new RangeError('weights have another head than this model (the ids of osd.head_tokens differ)'));
    expect(() => a.setWeights(full)).toThrow(RangeError);
    await using same = await full.withHead(HEAD);
    a.setWeights(same);
  });

  it('a one-id head: trees never propose ids outside it (each node has at most one child), greedy output stays exact', async () => {
    await using tiny = await full.withHead([13]);
    for (const strategy of [{ kind: 'tree', budget: 12, maxDepth: 3, branching: 4, fill: true }, { kind: 'tree', budget: 12, maxDepth: 3, branching: 4, children: 'deterministic', fill: true }] as Strategy[]) {
      const dec = createSpeculativeDecoder({ target, draft: tiny, strategy });
      let widest = 0;
      dec.on('step', (e: { drafted: number }) => (widest = Math.max(widest, e.drafted)));
      const want = await target.generate({ tokens: prompts[1]!, maxTokens: 24, stopTokens: [] });
      const got = await dec.generate({ tokens: prompts[1]!, maxTokens: 24, stopTokens: [] });
      expect(Array.from(got.tokens)).toEqual(Array.from(want.tokens));
      // A chain of at most maxDepth nodes (siblings at -Infinity were proposed before).
      expect(widest).toBeGreaterThan(0);
      expect(widest).toBeLessThanOrEqual(3);
      await dec.dispose();
    }
    // Every id is the whole head, not a restricted one.
    await using all = await full.withHead(Array.from({ length: V }, (_, i) => i));
    expect(all.headTokenIds()).toBeNull();
  });

  const greedy: Strategy[] = [
    { kind: 'chain', length: 4 },
    { kind: 'tree', budget: 12, maxDepth: 4, branching: 3, fill: true },
    { kind: 'adaptive', maxLength: 6 },
  ];
  for (const strategy of greedy)
    it(`greedy output equals target-only output (${strategy.kind})`, async () => {
      const dec = createSpeculativeDecoder({ target, draft, strategy });
      let drafted = 0;
      let accepted = 0;
      for (const p of prompts.slice(0, 6)) {
        const want = await target.generate({ tokens: p, maxTokens: 40, stopTokens: [] });
        const got = await dec.generate({ tokens: p, maxTokens: 40, stopTokens: [] });
        expect(Array.from(got.tokens)).toEqual(Array.from(want.tokens));
        drafted += got.stats.drafted;
        accepted += got.stats.accepted;
      }
      // The target often picks ids the head lacks: some drafts are rejected for that, most are accepted.
      expect(drafted).toBeGreaterThan(0);
      expect(accepted).toBeGreaterThan(0);
      expect(accepted).toBeLessThan(drafted);
      await dec.dispose();
    });

  // The joint distribution of the first two tokens against the target's own. A draft that can never
  // propose a third of the ids makes the residual carry their whole mass at every rejection.
  const sampled: { name: string; strategy: Strategy; sampling: { temperature: number; topK?: number; topP?: number } }[] = [
    { name: 'chain T=1', strategy: { kind: 'chain', length: 3 }, sampling: { temperature: 1 } },
    { name: 'sampled tree T=0.8 top-p 0.9', strategy: { kind: 'tree', budget: 8, maxDepth: 3, branching: 3, fill: true }, sampling: { temperature: 0.8, topP: 0.9 } },
    { name: 'deterministic tree T=1 top-k 20', strategy: { kind: 'tree', budget: 8, maxDepth: 3, branching: 3, children: 'deterministic', fill: true }, sampling: { temperature: 1, topK: 20 } },
  ];
  for (const sc of sampled)
    it(`sampled output follows the target distribution (${sc.name})`, async () => {
      const prompt = PROMPT;
      const head = new Set(lacking.headTokenIds());
      const first = warp(await target.forward(prompt), V, sc.sampling, (prompt.length - 1) * V);
      const draws = 6000;
      const joint = new Float64Array(V * V);
      let outside = 0; // target mass the draft cannot propose, on the first token
      for (let y1 = 0; y1 < V; y1++) {
        if (first[y1]! === 0) continue;
        if (!head.has(y1)) outside += first[y1]!;
        if (first[y1]! * draws < 2) {
          joint[y1 * V] = first[y1]!;
          continue;
        }
        const second = warp(await target.forward([...prompt, y1]), V, sc.sampling, prompt.length * V);
        for (let y2 = 0; y2 < V; y2++) joint[y1 * V + y2] = first[y1]! * second[y2]!;
      }
      expect(outside).toBeGreaterThan(0.2); // the test exercises tokens the draft lacks
      const counts = new Float64Array(V * V);
      const rowCounts = new Float64Array(V);
      const dec = createSpeculativeDecoder({ target, draft: lacking, strategy: sc.strategy, sampling: sc.sampling, maxConcurrent: 1 });
      let drafted = 0;
      for (let s = 0; s < draws; s++) {
        const r = await dec.generate({ tokens: prompt, maxTokens: 6, seed: 200_000 + s, stopTokens: [] });
        drafted += r.stats.drafted;
        const y1 = r.tokens[0]!;
        if (first[y1]! * draws < 2) rowCounts[y1]!++;
        else counts[y1 * V + r.tokens[1]!]!++;
      }
      await dec.dispose();
      expect(drafted).toBeGreaterThan(draws);
      for (let y1 = 0; y1 < V; y1++) if (rowCounts[y1]) counts[y1 * V] = rowCounts[y1]!;
      expect(chiSquareTest(counts, joint).pValue).toBeGreaterThan(1e-3);
    });

  it('training goes through the head: the loss falls, snapshots and online updates keep the head, output stays exact', async () => {
    // A trainer on a random draft with the head, against the target's own logits (dense teacher).
    await writeRandomModel(join(dir, 'random.gguf'), { vocabSize: V, embeddingLength: 32, layers: 2, heads: 4, kvHeads: 2, feedForwardLength: 64, contextLength: 512, seed: 5 });
    await using random = await loadModel(join(dir, 'random.gguf'));
    await using start = await random.withHead(HEAD);
    await using trainer = await createTrainer(start, { lr: 3e-3 });
    const tokens = Int32Array.from(prompts.slice(0, 4).flatMap((p) => [...p, ...p]).slice(0, 32));
    const teacherLogits = await target.forward(Array.from(tokens));
    const batch = { tokens, batchSize: 1, seqLen: 32, teacherLogits };
    const firstLoss = (await trainer.step(batch)).loss;
    let last = firstLoss;
    for (let i = 0; i < 20; i++) last = (await trainer.step(batch)).loss;
    expect(last).toBeLessThan(firstLoss);
    await using snap = await trainer.snapshot();
    expect(Array.from(snap.headTokenIds()!)).toEqual(HEAD);
    const logits = await snap.forward(Array.from(tokens.subarray(0, 4)));
    for (let j = 1; j < V; j += 3) expect(logits[j]).toBe(-Infinity);

    // Online updates (sparse top-k teacher, recorded while serving) on a restricted draft.
    await using served = await random.withHead(HEAD);
    const dec = createOnlineDecoder({ target, draft: served, strategy: { kind: 'chain', length: 3 }, distill: { interval: 3, lr: 3e-3, epochs: 2, guardMargin: 1 } });
    const losses: { before: number; after: number }[] = [];
    dec.on('update', (e: { lossBefore: number; lossAfter: number }) => losses.push({ before: e.lossBefore, after: e.lossAfter }));
    for (const p of prompts.slice(0, 6)) {
      const got = await dec.generate({ tokens: p, maxTokens: 24, sampling: { temperature: 1 }, seed: 7, stopTokens: [] });
      expect(got.tokens.length).toBe(24);
    }
    await dec.updateNow().catch(() => null);
    expect(losses.length).toBeGreaterThan(0);
    for (const l of losses) expect(l.after).toBeLessThan(l.before);
    expect(Array.from(served.headTokenIds()!)).toEqual(HEAD);
    for (const p of prompts.slice(0, 3)) {
      const want = await target.generate({ tokens: p, maxTokens: 24 });
      expect(Array.from((await dec.generate({ tokens: p, maxTokens: 24 })).tokens)).toEqual(Array.from(want.tokens));
    }
    await dec.dispose();
  });
});

describe('frequentTokens and trainDraft({ headTokens })', () => {
  const root = join(import.meta.dirname, '..');
  const TARGET = join(root, 'models/default-target.gguf');
  const dir = suiteTempDir('osd-head-train-');

  it('osd convert --head-tokens N --text PATH restricts a draft by the text\'s ids; either alone is a usage error', async () => {
    const cli = (...args: string[]) => spawnSync(process.execPath, ['--import', 'tsx', join(root, 'lib/cli.ts'), 'convert', ...args], { encoding: 'utf8' });
    const prompts = JSON.parse(readFileSync(join(root, 'models/demo-prompts.json'), 'utf8')) as { domains: Record<string, string[]> };
    const text = join(dir, 'novel.txt');
    writeFileSync(text, prompts.domains.novel!.join('\n\n'));
    const out = join(dir, 'draft-500.gguf');
    const r = cli(join(root, 'models/default-draft.gguf'), out, '--type', 'keep', '--head-tokens', '500', '--text', text, '--json');
    expect(r.status, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout).headTokens).toBe(500);
    await using d = await loadModel(out);
    expect(d.headTokenIds()!.length).toBe(500);
    const bad = cli(join(root, 'models/default-draft.gguf'), join(dir, 'x.gguf'), '--head-tokens', '500');
    expect(bad.status).toBe(2);
    expect(bad.stderr).toMatch(/--head-tokens N and --text PATH go together/);
  });

  it('frequentTokens: the most frequent ids, ties to the lower id, the always ids in, ascending', () => {
    const ids = frequentTokens([[5, 5, 5, 9, 9, 2], [9, 7]], 3, 12, [11]);
    expect(Array.from(ids)).toEqual([5, 9, 11]);
    // Unseen ids fill up from the lowest.
    expect(Array.from(frequentTokens([[8, 8]], 4, 12))).toEqual([0, 1, 2, 8]);
    expect(frequentTokens([[1]], 50, 12).length).toBe(12);
    expect(frequentTokens([Int32Array.from([3, 3]), new Uint16Array([4])], 1, 12)[0]).toBe(3);
    // Bad input is named.
    expect(() => frequentTokens([[1, 12]], 3, 12)).toThrow(new RangeError('shards[0][1] must be a token id in [0, 11], got 12'));
    expect(() => frequentTokens([[1], [NaN]], 3, 12)).toThrow(new RangeError('shards[1][0] must be a token id in [0, 11], got NaN'));
    expect(() => frequentTokens([[1]], 0, 12)).toThrow(RangeError);
    expect(() => frequentTokens([[1]], 3, 0)).toThrow(RangeError);
    expect(() => frequentTokens([[1]], 3, 12, [-1])).toThrow(new RangeError('always[0] must be a token id in [0, 11], got -1'));
    expect(() => frequentTokens('abc' as never, 3, 12)).toThrow(TypeError);
    expect(() => frequentTokens([5 as never], 3, 12)).toThrow(new TypeError('shards[0] must be an array of token ids'));
  });

  it('trains a draft with a restricted head: the N most frequent ids of the text, the end-of-sequence id among them', async () => {
    await using target = await loadModel(TARGET);
    const prompts = JSON.parse(readFileSync(join(root, 'models/demo-prompts.json'), 'utf8')) as { domains: Record<string, string[]> };
    const texts = [...prompts.domains.speeches!, ...prompts.domains.novel!];
    const out = join(dir, 'draft.gguf');
    const shape = { embeddingLength: 32, layers: 1, heads: 2, kvHeads: 1, feedForwardLength: 64 };
    const r = await trainDraft({ target, out, texts, shape, steps: 30, rows: 2, seqLen: 32, lr: 3e-3, headTokens: 1000 });
    expect(r.headTokens).toBe(1000);
    expect(r.curve[r.curve.length - 1]!.loss).toBeLessThan(r.curve[0]!.loss);
    await using d = await loadModel(out);
    const ids = d.headTokenIds()!;
    expect(ids.length).toBe(1000);
    expect(Array.from(ids)).toContain(target.eosTokens[0]!);
    // Every id of the text's most common ones is there: the text's own top 100.
    const counts = new Map<number, number>();
    for (const t of texts) for (const id of target.tokenizer!.encode(t)) counts.set(id, (counts.get(id) ?? 0) + 1);
    const top = [...counts.entries()].sort((a, b) => b[1] - a[1] || a[0] - b[0]).slice(0, 100).map(([id]) => id);
    const have = new Set(ids);
    for (const id of top) expect(have.has(id)).toBe(true);
    // Continued from it, the head stays; given ids, it changes; a checkpoint run refuses headTokens.
    const more = await trainDraft({ target, out: join(dir, 'more.gguf'), texts, from: out, steps: 3, rows: 2, seqLen: 32 });
    expect(more.headTokens).toBe(1000);
    const mine = await trainDraft({ target, out: join(dir, 'mine.gguf'), texts, from: out, steps: 3, rows: 2, seqLen: 32, headTokens: [0, 1, 2, 3, target.eosTokens[0]!] });
    expect(mine.headTokens).toBe(5);
    await expect(trainDraft({ target, out: join(dir, 'x.gguf'), texts, shape, steps: 1, headTokens: 0 })).rejects.toThrow(new RangeError('headTokens must be an integer in [1, 4096], got 0'));
    await expect(trainDraft({ target, out: join(dir, 'x.gguf'), texts, shape, steps: 1, headTokens: 'all' as never })).rejects.toThrow(TypeError);
    await expect(trainDraft({ target, out: join(dir, 'x.gguf'), texts, shape, steps: 1, headTokens: [4096] })).rejects.toThrow(new RangeError('headTokens: ids[0] must be a token id in [0, 4095], got 4096'));
  });
});
