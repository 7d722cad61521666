// The default pair's draft distillation (lib/train/trainDefault.ts) on tiny random models: the
// held-out acceptance measure, the dense teacher, and a short distillation that raises acceptance.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadModel, writeRandomModel, type Model } from '../lib/index.js';
import { distillDraft, heldOutAgreement, withTeacher, XorShift } from '../lib/train/trainDefault.js';
import { suiteTempDir } from './helpers/tmp.js';

const V = 64;
const shape = { vocabSize: V, heads: 2, kvHeads: 1, contextLength: 64 };

describe('draft distillation of the default pair', () => {
  const dir = suiteTempDir('osd-distill-');
  let target: Model;
  let draft: Model;

  beforeAll(async () => {
    await writeRandomModel(join(dir, 't.gguf'), { ...shape, embeddingLength: 32, layers: 2, feedForwardLength: 64, seed: 1 });
    await writeRandomModel(join(dir, 'd.gguf'), { ...shape, embeddingLength: 16, layers: 1, feedForwardLength: 32, seed: 2 });
    target = await loadModel(join(dir, 't.gguf'));
    draft = await loadModel(join(dir, 'd.gguf'));
    // Token shards as prepareData writes them (uint16), one English and one shifted domain.
    const rng = new XorShift(3);
    for (const name of ['speeches.train', 'speeches.heldout', 'code.heldout']) {
      const ids = Uint16Array.from({ length: 4000 }, () => Math.floor(rng.next() * V));
      writeFileSync(join(dir, `${name}.u16`), Buffer.from(ids.buffer));
    }
  });

  afterAll(async () => {
    await Promise.all([target?.dispose(), draft?.dispose()]);
  });

  it('a model agrees with itself everywhere; acceptance is a probability', async () => {
    const self = await heldOutAgreement(target, target, dir, 16, 4);
    expect(Object.keys(self).sort()).toEqual(['code', 'speeches']);
    for (const a of Object.values(self)) {
      expect(a.positions).toBe(64);
      expect(a.greedy).toBe(1);
      expect(a.t08).toBeCloseTo(1, 6);
      expect(a.t1).toBeCloseTo(1, 6);
    }
    const other = await heldOutAgreement(target, draft, dir, 16, 4);
    for (const a of Object.values(other)) for (const x of [a.greedy, a.t08, a.t1]) expect(x).toBeGreaterThanOrEqual(0), expect(x).toBeLessThan(1);
  });

  it('the teacher is the target logits of every row', async () => {
    const tokens = Int32Array.from({ length: 2 * 8 }, (_, i) => (i * 7) % V);
    const b = await withTeacher(target, { tokens, batchSize: 2, seqLen: 8 }, 0.8);
    expect(b.kind).toBe('forward-kl');
    expect(b.temperature).toBe(0.8);
    expect(Array.from(b.teacherLogits!.subarray(8 * V))).toEqual(Array.from(await target.forward(tokens.subarray(8))));
  });

  it('distillation on one domain raises acceptance there', { timeout: 60_000 }, async () => {
    const before = await heldOutAgreement(target, draft, dir, 16, 8);
    const r = await distillDraft({ target, draft, domains: ['speeches'], minutes: 0.1, seed: 1, dataDir: dir, outDir: dir, rows: 4, seqLen: 16, lr: 3e-3, temperature: 1, loss: 'forward-kl' });
    try {
      expect(r.steps).toBeGreaterThan(10);
      const after = await heldOutAgreement(target, r.model, dir, 16, 8);
      expect(after.speeches!.t1).toBeGreaterThan(before.speeches!.t1 + 0.02);
    } finally {
      await r.model.dispose();
    }
  });
});
