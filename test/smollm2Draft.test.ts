// The SmolLM2 draft (lib/train/smollm2Draft.ts, on lib/train/draft.ts): the pieces of its construction on small inputs,
// and its GGUF through llama.cpp (node-llama-cpp 3.21.1): it loads there with the full vocabulary
// and gives the same greedy tokens as in this engine. The model-dependent part uses the committed
// models/smollm2-draft.gguf, or, when that is absent, a draft-shaped model made by the script's init
// step from ../shared/models/smollm2 (skipped with a message where that is absent too).
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadModel, type Model } from '../lib/index.js';
import { topKRows, topRightSingularVectors, writeDraftInit } from '../lib/train/draft.js';
import { DRAFT_SHAPE, parseDomains, reportMarkdown } from '../lib/train/smollm2Draft.js';
import { XorShift } from '../lib/train/trainDefault.js';
import { agreeGreedy, importNodeLlamaCpp, SMOLLM2 } from './helpers/llamaCpp.js';

const root = fileURLToPath(new URL('..', import.meta.url));
const SMOL = SMOLLM2;
const COMMITTED = resolve(root, 'models/smollm2-draft.gguf');
const haveTarget = existsSync(SMOL);
const haveDraft = existsSync(COMMITTED);
if (!haveDraft && !haveTarget) console.warn(`skip: neither ${COMMITTED} nor ${SMOL} exists (the SmolLM2 draft tests need one of them)`);

const nlc = await importNodeLlamaCpp('the llama.cpp round trip of the SmolLM2 draft is skipped');

// With F16 weights llama.cpp rounds the activations to f16 before each product, this engine keeps
// them in f32 (with Q8_0 both round them to Q8_0 blocks), so a greedy choice may differ where the
// top two logits are this close.
const NEAR_TIE = 0.1;

describe('SmolLM2 draft construction', () => {
  it('topRightSingularVectors finds an orthonormal basis of the dominant subspace', () => {
    // E = A B with A [n x 3] and B [3 x D]: the top-3 right singular vectors span the rows of B.
    const n = 200;
    const D = 12;
    const rng = new XorShift(5);
    const B = Array.from({ length: 3 }, () => Array.from({ length: D }, () => rng.normal()));
    const E = new Float32Array(n * D);
    for (let r = 0; r < n; r++) {
      const a = [rng.normal() * 3, rng.normal() * 2, rng.normal()];
      for (let j = 0; j < D; j++) E[r * D + j] = a[0]! * B[0]![j]! + a[1]! * B[1]![j]! + a[2]! * B[2]![j]! + 1e-4 * rng.normal();
    }
    const k = 3;
    const Q = topRightSingularVectors(E, n, D, k, 40);
    for (let a = 0; a < k; a++)
      for (let b = 0; b < k; b++) {
        let dot = 0;
        for (let i = 0; i < D; i++) dot += Q[i * k + a]! * Q[i * k + b]!;
        expect(dot).toBeCloseTo(a === b ? 1 : 0, 6);
      }
    // Every row of E is (almost) inside span(Q): E Q Q^T = E.
    let err = 0;
    let tot = 0;
    for (let r = 0; r < n; r++) {
      const proj = new Float64Array(D);
      for (let c = 0; c < k; c++) {
        let s = 0;
        for (let i = 0; i < D; i++) s += E[r * D + i]! * Q[i * k + c]!;
        for (let i = 0; i < D; i++) proj[i] = proj[i]! + s * Q[i * k + c]!;
      }
      for (let i = 0; i < D; i++) {
        err += (E[r * D + i]! - proj[i]!) ** 2;
        tot += E[r * D + i]! ** 2;
      }
    }
    expect(err / tot).toBeLessThan(1e-6);
  });

  it('--domains takes known domains, each once', () => {
    expect(parseDomains('speeches,novel,definitions')).toEqual(['speeches', 'novel', 'definitions']);
    expect(parseDomains(' code ')).toEqual(['code']);
    expect(() => parseDomains('code,python')).toThrow(/--domains .*got 'python'/);
    expect(() => parseDomains('code,')).toThrow(/an empty name/);
    expect(() => parseDomains('sql,sql')).toThrow(/sql twice/);
  });

  it('the report names the domains trained on and puts the --from draft beside the trained one', () => {
    const row = (domain: string, g: number, s: number) => ({ domain, greedy: { acceptance: g, tokensPerStep: 1 + 4 * g }, sampled: { acceptance: s, tokensPerStep: 1 + 4 * s } });
    const base = { target: 'smollm2/x.gguf', shape: { ...DRAFT_SHAPE }, training: { teacherTokens: 1000, steps: 10, replay: 3, rows: 8, seqLen: 128, topK: 64, lr: 1e-3, minutes: 1, teacherSeconds: 30, trainSeconds: 30 } };
    const md = reportMarkdown({
      ...base,
      training: { ...base.training, domains: ['code'], from: 'models/smollm2-draft.gguf' },
      acceptance: { from: [row('code', 0.017, 0.024), row('speeches', 0.173, 0.157)], trained: [row('code', 0.261, 0.221), row('speeches', 0.101, 0.097)] },
    } as Parameters<typeof reportMarkdown>[0]);
    expect(md).toContain('1000 teacher tokens of code in');
    expect(md).toContain('| domain | --from greedy | --from T=0.8 | trained greedy | trained T=0.8 |');
    expect(md).toContain('| code | 0.017 | 0.024 | 0.261 | 0.221 | 2.04 (');
    expect(md).toContain('| English (speeches) | 0.173 | 0.157 | 0.101 | 0.097 |');
    // An older report (no domains, init and trained) reads as before.
    const old = reportMarkdown({ ...base, acceptance: { init: [row('code', 0.01, 0.02)], trained: [row('code', 0.02, 0.03)] } } as Parameters<typeof reportMarkdown>[0]);
    expect(old).toContain('teacher tokens of general English (speeches, novel, definitions)');
    expect(old).toContain('| domain | init greedy | init T=0.8 | trained greedy | trained T=0.8 |');
  });

  it('topKRows gives the k largest probabilities, the residual mass and the argmax', () => {
    const V = 50;
    const k = 5;
    const rng = new XorShift(9);
    const logits = Float32Array.from({ length: 2 * V }, () => rng.normal() * 3);
    const into = { indices: new Int32Array(2 * k), probs: new Float32Array(2 * k), residual: new Float32Array(2), top1: new Int32Array(2) };
    topKRows(logits, 2, V, k, into);
    for (let r = 0; r < 2; r++) {
      const row = Array.from(logits.subarray(r * V, (r + 1) * V));
      const mx = Math.max(...row);
      const z = row.reduce((s, v) => s + Math.exp(v - mx), 0);
      const order = row.map((v, i) => [v, i] as const).sort((a, b) => b[0] - a[0]);
      const want = order.slice(0, k).map((x) => x[1]).sort((a, b) => a - b);
      const got = Array.from(into.indices.subarray(r * k, (r + 1) * k));
      expect([...got].sort((a, b) => a - b)).toEqual(want);
      for (let i = 0; i < k; i++) expect(into.probs[r * k + i]).toBeCloseTo(Math.exp(row[got[i]!]! - mx) / z, 6);
      const mass = order.slice(0, k).reduce((s, x) => s + Math.exp(x[0] - mx) / z, 0);
      expect(into.residual[r]).toBeCloseTo(1 - mass, 6);
      expect(into.top1[r]).toBe(order[0]![1]);
    }
  });
});

describe.skipIf((!haveDraft && !haveTarget) || !nlc)('SmolLM2 draft GGUF through llama.cpp (node-llama-cpp)', () => {
  let dir: string | undefined;
  let path: string;
  let model: Model;
  beforeAll(async () => {
    if (haveDraft) path = COMMITTED;
    else {
      // The script's init step (SVD of the target's embeddings, random layers), stored as F16 like the trained draft.
      dir = mkdtempSync(join(tmpdir(), 'osd-smoldraft-'));
      const init = join(dir, 'init.gguf');
      const smol = await loadModel(SMOL);
      await writeDraftInit(init, smol, DRAFT_SHAPE, 1);
      await smol.dispose();
      const m = await loadModel(init);
      path = join(dir, 'draft.gguf');
      await m.save(path, { type: 'F16' });
      await m.dispose();
    }
    model = await loadModel(path, { threads: 2 });
  }, 600_000);
  afterAll(async () => {
    await model?.dispose();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('is a full-vocabulary llama with SmolLM2 tokenizer', () => {
    expect(model.info).toMatchObject({ architecture: 'llama', vocabSize: 49152, tiedOutput: true, embeddingLength: DRAFT_SHAPE.embeddingLength });
    expect(model.tokenizer?.pre).toBe('smollm');
    expect(model.chatTemplate).toContain('im_start');
  });

  // Greedy tokens of llama.cpp and of this engine on the same file; returns how many agreed.
  // llama.cpp ignores a restricted head (osd.head_tokens) and scores every id, so this engine is
  // compared with its whole head on the same weights.
  async function compareGreedy(file: string, model: Model, nearTie: number): Promise<number> {
    await using whole = await model.withHead(null);
    const ours = whole;
    const llama = await nlc!.getLlama({ gpu: false, build: 'never', logLevel: nlc!.LlamaLogLevel.error });
    const lm = await llama.loadModel({ modelPath: file });
    try {
      expect(lm.tokens.bos === null || typeof lm.tokens.bos === 'number').toBe(true);
      expect(lm.fileInfo.metadata.general.architecture).toBe('llama');
      const prompts = ['The capital of France is', 'Once upon a time, there was a little', 'In the year 1492, Columbus', 'The President said that the nation'];
      for (const p of prompts) expect(Array.from(lm.tokenize(p, false))).toEqual(Array.from(ours.tokenizer!.encode(p)));
      return await agreeGreedy(lm, ours, prompts, { tokens: 24, nearTie, contextSize: 256 });
    } finally {
      await lm.dispose();
      await llama.dispose();
    }
  }

  it('loads in llama.cpp and gives the same greedy tokens as this engine', async () => {
    // Guard against a vacuous pass.
    expect(await compareGreedy(path, model, NEAR_TIE)).toBeGreaterThanOrEqual(48);
  }, 300_000);

  it('saved in the other type (F16 or Q8_0, by the engine\'s own writer) it loads in llama.cpp with the same greedy tokens', async () => {
    const qdir = mkdtempSync(join(tmpdir(), 'osd-smoldraft-other-'));
    try {
      const type = model.info.matrixType === 'Q8_0' ? 'F16' : 'Q8_0';
      const file = join(qdir, `draft-${type}.gguf`);
      await model.save(file, { type });
      await using other = await loadModel(file, { threads: 2 });
      expect(other.info.matrixType).toBe(type);
      expect(await compareGreedy(file, other, NEAR_TIE)).toBeGreaterThanOrEqual(48);
    } finally {
      rmSync(qdir, { recursive: true, force: true });
    }
  }, 300_000);
});
