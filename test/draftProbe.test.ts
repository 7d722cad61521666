// The SmolLM2 draft probe's byte-level cuts (lib/train/draftProbe.ts, lib/train/ggufRewrite.ts): a cut
// that keeps every layer is the target itself, and a cut of 2 layers with a 64-row head loads with
// those sizes and the target's own first-layer bytes. Needs ../shared/models/smollm2 (skips without).
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { loadModel } from '../lib/index.js';
import { readGgufMetadata } from '../lib/train/bpe.js';
import { writeCut, quantizeQ4_1 } from '../lib/train/draftProbe.js';
import { dequantizeRows, readGgufLayout, readTensorBytes } from '../lib/train/ggufRewrite.js';
import { SMOLLM2 } from './helpers/llamaCpp.js';
import { suiteTempDir } from './helpers/tmp.js';

const have = existsSync(SMOLLM2);
if (!have) console.warn(`skip: ${SMOLLM2} not found; the draft-probe cut tests are skipped`);

describe.skipIf(!have)('draft probe cuts of SmolLM2', () => {
  const dir = suiteTempDir('osd-cut-');
  const src = have ? readGgufLayout(SMOLLM2) : undefined;

  it('a cut of all 30 layers gives the target\'s logits exactly', async () => {
    const path = join(dir, 'all.gguf');
    writeCut(src!, path, { layers: 30 });
    await using target = await loadModel(SMOLLM2);
    await using cut = await loadModel(path);
    const toks = [1, 504, 3458, 314, 4647];
    expect(Array.from(await cut.forward(toks))).toEqual(Array.from(await target.forward(toks)));
  });

  it('a 2-layer cut with a 64-row head keeps the sizes and copies the layer bytes', async () => {
    const path = join(dir, 'cut.gguf');
    const rows = Int32Array.from({ length: 64 }, (_, i) => i * 7);
    writeCut(src!, path, { layers: 2, rows });
    await using cut = await loadModel(path);
    expect(cut.info).toMatchObject({ layers: 2, vocabSize: 64, embeddingLength: 576 });
    const out = readGgufLayout(path);
    expect(readTensorBytes(out, 'blk.1.ffn_down.weight').equals(readTensorBytes(src!, 'blk.1.ffn_down.weight'))).toBe(true);
    const { tensors } = readGgufMetadata(path, { maxArrayLength: 0 });
    expect(tensors.some((t) => t.name.startsWith('blk.2.'))).toBe(false);
  });

  it('the TS Q4_1 writer round-trips within half a step per block', () => {
    const x = Float32Array.from({ length: 64 }, (_, i) => Math.sin(i) * 3);
    const back = dequantizeRows(quantizeQ4_1(x), 3, 64);
    for (let b = 0; b < 2; b++) {
      const blk = x.subarray(32 * b, 32 * b + 32);
      const step = (Math.max(...blk) - Math.min(...blk)) / 15;
      for (let i = 0; i < 32; i++) expect(Math.abs(back[32 * b + i]! - blk[i]!)).toBeLessThanOrEqual(step / 2 + 1e-3);
    }
  });
});
