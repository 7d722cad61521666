// trainDraft and `osd train-draft` (lib/train/draft.ts): a draft built for a target by distilling it
// on text. On the default target with a tiny draft shape, budgets of a few dozen steps: the draft
// shares the target's tokenizer, its held-out KL to the target falls, `from` and checkpoints
// continue a run, abort writes what was trained, and bad input is a TypeError or RangeError naming
// it. Model.embeddingRows (the embeddings the init projects) is checked against the file's bytes.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadModel, trainDraft, writeRandomModel, type Model, type TrainDraftOptions } from '../lib/index.js';
import { gramMatrix, growDraft } from '../lib/train/draft.js';
import { dequantizeRows, readGgufLayout, readTensorBytes } from '../lib/train/ggufRewrite.js';
import { XorShift } from '../lib/train/llamaInit.js';

const root = join(import.meta.dirname, '..');
const TARGET = join(root, 'models/default-target.gguf');
const prompts = JSON.parse(readFileSync(join(root, 'models/demo-prompts.json'), 'utf8')) as { domains: Record<string, string[]> };
// 96 documents of the default target's own kind of English.
const TEXTS = [...prompts.domains.speeches!, ...prompts.domains.novel!, ...prompts.domains.definitions!];
const TINY = { embeddingLength: 32, layers: 1, heads: 2, kvHeads: 1, feedForwardLength: 64 };

let target: Model;
let dir: string;
beforeAll(async () => {
  target = await loadModel(TARGET);
  dir = mkdtempSync(join(tmpdir(), 'osd-traindraft-'));
});
afterAll(async () => {
  await target?.dispose();
  rmSync(dir, { recursive: true, force: true });
});

const base = (out: string): TrainDraftOptions => ({ target, out, texts: TEXTS, shape: TINY, steps: 40, rows: 2, seqLen: 32, lr: 3e-3 });

describe('Model.embeddingRows', () => {
  it('gives the stored embeddings: F32 as they are, Q8_0 as the GGUF dequantiser reads them', async () => {
    const file = readGgufLayout(TARGET);
    const t = file.tensors.find((x) => x.name === 'token_embd.weight')!;
    const D = target.info.embeddingLength;
    const want = dequantizeRows(readTensorBytes(file, 'token_embd.weight'), t.type, D);
    expect(target.embeddingRows()).toEqual(want);
    expect(target.embeddingRows(100, 3)).toEqual(want.subarray(100 * D, 103 * D));
    expect(target.embeddingRows(4096, 0).length).toBe(0);

    const q8 = join(dir, 'q8.gguf');
    await target.save(q8, { type: 'Q8_0' });
    await using m = await loadModel(q8);
    const qf = readGgufLayout(q8);
    const qt = qf.tensors.find((x) => x.name === 'token_embd.weight')!;
    expect(qt.type).toBe(8);
    const qwant = dequantizeRows(readTensorBytes(qf, 'token_embd.weight'), qt.type, D);
    expect(m.embeddingRows(7, 50)).toEqual(qwant.subarray(7 * D, 57 * D));
  });

  it('checks its arguments and refuses a disposed model', async () => {
    expect(() => target.embeddingRows(-1, 1)).toThrow(new RangeError('start must be an integer in [0, 4096], got -1'));
    expect(() => target.embeddingRows(4000, 97)).toThrow(new RangeError('count must be an integer in [0, 96], got 97'));
    expect(() => target.embeddingRows(0.5)).toThrow(RangeError);
    expect(() => target.embeddingRows('0' as never)).toThrow(new TypeError('start must be a number, got "0"'));
    const m = await loadModel(TARGET);
    await m.dispose();
    expect(() => m.embeddingRows(0, 1)).toThrow(/disposed/);
  });
});

describe('gramMatrix', () => {
  it('sums every row, or every stride-th row beyond its budget', () => {
    const n = 50;
    const D = 4;
    const rng = new XorShift(3);
    const E = Float32Array.from({ length: n * D }, () => rng.normal());
    const rows = (s: number, c: number) => E.subarray(s * D, (s + c) * D);
    const direct = (stride: number) => {
      const G = new Float64Array(D * D);
      for (let r = 0; r < n; r += stride) for (let i = 0; i < D; i++) for (let j = 0; j < D; j++) G[i * D + j] += E[r * D + i]! * E[r * D + j]!;
      return G;
    };
    const all = gramMatrix(rows, n, D);
    expect(all.rowsUsed).toBe(n);
    all.G.forEach((v, i) => expect(v).toBeCloseTo(direct(1)[i]!, 9));
    // Budget 100 multiply-adds: n D^2 / 2 = 400, so every 4th row.
    const some = gramMatrix(rows, n, D, 100);
    expect(some.rowsUsed).toBe(13);
    some.G.forEach((v, i) => expect(v).toBeCloseTo(direct(4)[i]!, 9));
  });
});

describe('trainDraft', () => {
  let first: Awaited<ReturnType<typeof trainDraft>>;
  const out = () => join(dir, 'draft.gguf');

  beforeAll(async () => {
    first = await trainDraft(base(out()));
  }, 120_000);

  it('writes a draft with the target tokenizer whose held-out KL falls', async () => {
    expect(first).toMatchObject({ path: out(), steps: 40, type: 'F16', aborted: false, shape: { ...TINY, contextLength: target.info.contextLength } });
    expect(first.teacherTokens).toBe(14 * 2 * 32); // 3 steps per teacher batch
    expect(first.curve.length).toBeGreaterThanOrEqual(2);
    const [a, z] = [first.curve[0]!, first.curve[first.curve.length - 1]!];
    expect(a.step).toBe(0);
    expect(z.step).toBe(40);
    expect(z.loss).toBeLessThan(a.loss * 0.8);
    await using d = await loadModel(out());
    expect(d.info).toMatchObject({ architecture: 'llama', vocabSize: target.info.vocabSize, embeddingLength: 32, layers: 1, matrixType: 'F16' });
    const text = 'The old man walked along the shore.';
    expect(Array.from(d.tokenizer!.encode(text))).toEqual(Array.from(target.tokenizer!.encode(text)));
    expect(existsSync(`${out()}.tmp-${process.pid}`)).toBe(false);
  });

  it('is deterministic for a seed', async () => {
    const again = await trainDraft(base(join(dir, 'again.gguf')));
    expect(again.curve.map((c) => c.loss)).toEqual(first.curve.map((c) => c.loss));
    expect(readFileSync(join(dir, 'again.gguf'))).toEqual(readFileSync(out()));
  }, 120_000);

  it('continues a draft given as from, at the loss it had reached', async () => {
    const { shape: _s, ...rest } = base(join(dir, 'more.gguf'));
    const more = await trainDraft({ ...rest, from: out(), steps: 6 });
    expect(more.steps).toBe(6);
    // F16 storage moves the loss a little from where the F32 trainer left it.
    expect(Math.abs(more.curve[0]!.loss - first.curve[first.curve.length - 1]!.loss)).toBeLessThan(0.05);
    expect(more.shape.embeddingLength).toBe(32);
  }, 120_000);

  it('grows a draft: new layers start as no-ops, then train', async () => {
    const grown = join(dir, 'grown.gguf');
    growDraft(out(), grown, 3);
    await using a = await loadModel(out());
    await using b = await loadModel(grown);
    expect(b.info.layers).toBe(3);
    const tokens = target.tokenizer!.encode(TEXTS[0]!).subarray(0, 40);
    expect(await b.forward(tokens)).toEqual(await a.forward(tokens));
    const { shape: _s, ...rest } = base(join(dir, 'grown-trained.gguf'));
    const more = await trainDraft({ ...rest, from: out(), shape: { layers: 2 }, steps: 6 });
    expect(more.shape.layers).toBe(2);
    expect(Math.abs(more.curve[0]!.loss - first.curve[first.curve.length - 1]!.loss)).toBeLessThan(0.05);
  }, 120_000);

  it('resumes from a checkpoint: steps and weights carry on', async () => {
    const ckpt = join(dir, 'run.ckpt');
    const a = await trainDraft({ ...base(join(dir, 'r1.gguf')), steps: 6, checkpoint: ckpt });
    expect(a.steps).toBe(6);
    expect(existsSync(ckpt)).toBe(true);
    const { shape: _s, ...rest } = base(join(dir, 'r2.gguf'));
    const b = await trainDraft({ ...rest, steps: 6, checkpoint: ckpt });
    expect(b.steps).toBe(12);
    expect(b.curve[0]!.step).toBe(6);
    expect(b.curve[0]!.loss).toBeCloseTo(a.curve[a.curve.length - 1]!.loss, 5);
  }, 120_000);

  it('stops on abort and still writes the draft trained so far', async () => {
    const ac = new AbortController();
    const path = join(dir, 'aborted.gguf');
    const r = await trainDraft({
      ...base(path),
      steps: 1000,
      signal: ac.signal,
      onProgress: (p) => {
        if (p.phase === 'train' && p.step >= 6) ac.abort();
      },
    });
    expect(r.aborted).toBe(true);
    expect(r.steps).toBeLessThan(1000);
    await using d = await loadModel(path);
    expect(d.info.layers).toBe(1);
  }, 120_000);

  it('takes an undefined shape entry as its default', async () => {
    const r = await trainDraft({ ...base(join(dir, 'undef.gguf')), shape: { ...TINY, layers: undefined }, steps: 3 });
    expect(r.shape.layers).toBe(2);
  }, 120_000);

  it('takes token ids instead of text, holding out the last 5% of the first stream', async () => {
    const ids = Array.from(target.tokenizer!.encode(TEXTS.join('\n')));
    const r = await trainDraft({ target, out: join(dir, 'ids.gguf'), tokens: [ids], shape: TINY, steps: 3, rows: 2, seqLen: 32 });
    expect(r.steps).toBe(3);
    expect(r.curve.length).toBeGreaterThanOrEqual(1);
  }, 120_000);

  it('names bad input', async () => {
    const o = base(join(dir, 'bad.gguf'));
    const bad = (patch: Record<string, unknown>) => trainDraft({ ...o, ...patch } as TrainDraftOptions);
    await expect(bad({ target: TARGET })).rejects.toThrow(new TypeError('target must be a Model (loadModel)'));
    await expect(bad({ out: '' })).rejects.toThrow(new TypeError('out must be a non-empty string (the draft GGUF)'));
    await expect(bad({ tokens: [[1, 2]] })).rejects.toThrow(new TypeError('give texts (strings) or tokens (token id arrays), one of them'));
    await expect(bad({ texts: undefined, tokens: [[1, 2, 4096]] })).rejects.toThrow(new RangeError('tokens[0][2] must be a token id in [0, 4095], got 4096'));
    await expect(bad({ texts: 'one long text' })).rejects.toThrow(new TypeError('texts must be an iterable of strings (documents), not one string: give [text]'));
    await expect(bad({ texts: 5 })).rejects.toThrow(new TypeError('texts must be an iterable of strings (documents)'));
    await expect(bad({ texts: ['a', 3] })).rejects.toThrow(new TypeError('texts[1] must be a string, got number'));
    await expect(bad({ texts: ['tiny'] })).rejects.toThrow(/at least one stream of 34 tokens/);
    await expect(bad({ minutes: Number.NaN })).rejects.toThrow(new RangeError('minutes must be a finite number > 0, got NaN'));
    await expect(bad({ steps: 0 })).rejects.toThrow(new RangeError('steps must be an integer >= 1, got 0'));
    await expect(bad({ topK: 5000 })).rejects.toThrow(new RangeError('topK must be an integer in [1, 4096], got 5000'));
    await expect(bad({ type: 'Q3' })).rejects.toThrow(/^type must be one of F32, F16/);
    await expect(bad({ shape: { ...TINY, heads: 3 } })).rejects.toThrow(new RangeError('shape.heads (3) must divide shape.embeddingLength (32)'));
    await expect(bad({ shape: { width: 3 } })).rejects.toThrow(/shape\.width is not an option/);
    await expect(bad({ from: join(dir, 'draft.gguf') })).rejects.toThrow(/^shape is for a new draft/);
    await expect(bad({ from: join(dir, 'draft.gguf'), shape: { layers: 1 } })).rejects.toThrow(new RangeError("shape.layers (1) must be more than the draft's (1) to grow it"));
    await expect(bad({ heldOut: [1, -1] })).rejects.toThrow(new RangeError('heldOut[1] must be a token id in [0, 4095], got -1'));
    await expect(bad({ epochs: 2 })).rejects.toThrow(/epochs is not an option/);
    await expect(trainDraft(undefined as never)).rejects.toThrow(new TypeError('options must be an object ({ target, out, texts | tokens, ... })'));
    await expect(bad({ out: TARGET })).rejects.toThrow(new RangeError(`out must not be the target's file (${TARGET})`));
    await expect(bad({ shape: { ...TINY, contextLength: 16 } })).rejects.toThrow(new RangeError('shape.contextLength (16) must be at least seqLen (32)'));
    const ckpt = join(dir, 'exists.ckpt');
    writeFileSync(ckpt, 'x');
    await expect(bad({ checkpoint: ckpt })).rejects.toThrow(/^checkpoint .*exists\.ckpt exists, and a run resumes it as it is: from and shape do not apply/);
    const ac = new AbortController();
    ac.abort();
    await expect(bad({ signal: ac.signal })).rejects.toThrow(expect.objectContaining({ name: 'AbortError' }));
    const small = join(dir, 'v100.gguf');
    await writeRandomModel(small, { vocabSize: 100, embeddingLength: 16, layers: 1, heads: 2, feedForwardLength: 32, contextLength: 64 });
    const { shape: _s, ...noShape } = o;
    await expect(trainDraft({ ...noShape, from: small })).rejects.toThrow(new RangeError("from: the draft's vocabulary (100 tokens) must be the target's (4096)"));
    expect(existsSync(join(dir, 'bad.gguf'))).toBe(false);
  }, 120_000);
});

describe('osd train-draft', () => {
  const cli = (...args: string[]) => spawnSync(process.execPath, ['--import', 'tsx', join(root, 'lib/cli.ts'), 'train-draft', ...args], { encoding: 'utf8' });

  it('trains on files and folders (binary files skipped) and reports in JSON', () => {
    const texts = join(dir, 'texts');
    mkdirSync(join(texts, 'sub'), { recursive: true });
    TEXTS.forEach((t, i) => writeFileSync(join(texts, i % 2 ? 'sub' : '', `${i}.txt`), t));
    writeFileSync(join(texts, 'blob.bin'), Buffer.from([1, 0, 2, 3]));
    symlinkSync(texts, join(texts, 'sub', 'loop')); // a link back up is not followed
    const out = join(dir, 'cli.gguf');
    const r = cli(join(texts, '0.txt'), '--text', texts, '--out', out, '--steps', '6', '--dim', '32', '--layers', '1', '--heads', '2', '--kv-heads', '1', '--ff', '64', '--seq-len', '32', '--json');
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    const j = JSON.parse(r.stdout);
    // 0.txt, named and inside the folder, is read once.
    expect(j).toMatchObject({ path: out, steps: 6, files: TEXTS.length, type: 'F16', shape: { embeddingLength: 32, layers: 1 } });
  }, 120_000);

  it('refuses bad command lines with exit code 2 and missing files with 1', () => {
    const out = join(dir, 'x.gguf');
    let r = cli('--text', join(root, 'README.md'));
    expect([r.status, r.stderr]).toEqual([2, 'osd: give the draft to write: osd train-draft --text notes.txt --out draft.gguf\n']);
    r = cli('--out', out);
    expect([r.status, r.stderr]).toEqual([2, 'osd: give training text: --text FILE or --text FOLDER (repeat for more), or files after the command\n']);
    r = cli('--text', join(root, 'README.md'), '--out', out, '--from', TARGET, '--dim', '64');
    expect([r.status, r.stderr]).toEqual([2, 'osd: --dim shapes a new draft: --from continues a draft of its own shape (--layers may grow it)\n']);
    r = cli('--text', join(root, 'README.md'), '--out', out, '--steps', '1.5');
    expect([r.status, r.stderr]).toEqual([2, "osd: --steps must be an integer >= 1, got '1.5'\n"]);
    r = cli('--text', join(root, 'README.md'), '--out', out, '--port', '1');
    expect(r.status).toBe(2);
    r = cli('--text', join(dir, 'nope.txt'), '--out', out);
    expect([r.status, r.stderr]).toEqual([1, `osd: --text: ${join(dir, 'nope.txt')} does not exist\n`]);
    expect(existsSync(out)).toBe(false);
  }, 60_000);
});
