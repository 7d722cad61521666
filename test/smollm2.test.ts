// SmolLM2-135M-Instruct (Q4_1 layers, Q8_0 embeddings and tied head) against llama.cpp
// (node-llama-cpp 3.21.1, the same file in the same process), plus batch invariance, memory and
// bad-file errors on the real model. Skipped where ../shared/models/smollm2 is absent.
//
// Why the comparisons have tolerances. Both engines quantise activations to 8 bits before each
// matrix product (llama.cpp: Q8_1 for Q4_1 weights, Q8_0 for the head; this engine the same
// blocks and rounding, with f32 instead of fp16 block scales). Measured on the fixed sequence of
// the logits test, against an evaluation of the same (dequantised) weights in f32 arithmetic:
//   - llama.cpp with f32 weights vs this engine with f32 weights: max |d log p| 0.014 (the forward
//     math agrees; the rest is llama.cpp's f16 KV cache);
//   - llama.cpp on the Q4_1 file vs f32: max 0.87, rms 0.16; this engine on the Q4_1 file vs f32:
//     max 0.61, rms 0.14;
//   - this engine vs llama.cpp on the Q4_1 file: max 0.77, rms 0.17.
// So each engine's log-probabilities sit within ~0.9 of exact arithmetic, with errors that are
// independent between the engines (a rounding of an activation flips on the slightest difference
// upstream). The tolerances below are set from that, with headroom for other CPUs: llama.cpp picks
// its kernels by CPU (AVX2 here, AVX-512 VNNI on CI), which moves its own noise around.
import { execFile } from 'node:child_process';
import { closeSync, existsSync, openSync, readFileSync, readSync, statSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadModel, type Model } from '../lib/index.js';
import { addon } from '../lib/addon.js';
import { applyChatTemplate } from '../lib/chatTemplate.js';
import { agreeGreedy, importNodeLlamaCpp, SMOLLM2 } from './helpers/llamaCpp.js';
import { suiteTempDir, tempDir } from './helpers/tmp.js';

const root = fileURLToPath(new URL('..', import.meta.url));
const SMOL = SMOLLM2;
const VOCAB = resolve(root, '../shared/models/vocab');
const have = existsSync(SMOL);
if (!have) console.warn(`skip: ${SMOL} not found (the SmolLM2 tests need ../shared/models)`);

type LlamaModel = import('node-llama-cpp').LlamaModel;
type Llama = import('node-llama-cpp').Llama;

const nlc = await importNodeLlamaCpp('the comparisons with llama.cpp are skipped');

// Greedy choices whose margin (our top logit minus the logit of llama.cpp's choice) is below this
// are decided by activation-quantisation noise (each engine is up to ~0.9 off exact arithmetic).
const NEAR_TIE = 0.5;
// Log-probability agreement on the fixed sequence (tokens with p > 1e-3 in either engine).
const MAX_DLOGP = 1.25;
const RMS_DLOGP = 0.3;
// Where llama.cpp's best token leads its runner-up by more than this (log-probability), both
// engines must pick it: two errors of at most ~0.85 each cannot swap them.
const CLEAR_MARGIN = 1.75;

function readInp(path: string): string[] {
  const parts = readFileSync(path, 'utf8').split('\n__ggml_vocab_test__\n');
  parts.pop();
  return parts;
}

function logSoftmax(row: Float32Array): Float64Array {
  let mx = -Infinity;
  for (const v of row) mx = Math.max(mx, v);
  let z = 0;
  for (const v of row) z += Math.exp(v - mx);
  const lse = mx + Math.log(z);
  return Float64Array.from(row, (v) => v - lse);
}

function argmax(row: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i]! > row[best]!) best = i;
  return best;
}

const sameBits = (a: Float32Array, b: Float32Array) =>
  a.length === b.length && Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));

describe.skipIf(!have)('SmolLM2-135M-Instruct Q4_1', () => {
  let model: Model;
  let V: number;
  beforeAll(async () => {
    model = await loadModel(SMOL, { threads: 2 });
    V = model.info.vocabSize;
  });
  afterAll(async () => {
    await model?.dispose();
  });

  it('loads the quantised file as the llama architecture it is', () => {
    expect(model.info).toMatchObject({
      format: 'gguf',
      architecture: 'llama',
      vocabSize: 49152,
      embeddingLength: 576,
      layers: 30,
      heads: 9,
      kvHeads: 3,
      headDim: 64,
      feedForwardLength: 1536,
      ropeTheta: 100000,
      tiedOutput: true,
    });
    // Q4_1 layers (20 bytes per 32 weights), one Q8_0 embedding row, the Q8_0 head (34 per 32).
    const layer = (2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576) * (20 / 32);
    expect(model.info.weightBytesPerToken).toBe(30 * layer + 576 * (34 / 32) + 49152 * 576 * (34 / 32));
    expect(model.tokenizer?.pre).toBe('smollm');
  });

  it('a saved copy keeps the general.* provenance (name, license) and the tokenizer, not the source file_type', async () => {
    const dir = tempDir('osd-smol-save-');
    const src = addon.readGgufMetadata(SMOL, { maxArrayLength: 0 }).metadata;
    expect(src['general.license']).toBe('apache-2.0');
    for (const type of ['keep', 'F16'] as const) {
      const path = join(dir, `smol-${type}.gguf`);
      await model.save(path, { type });
      const got = addon.readGgufMetadata(path, { maxArrayLength: 0 }).metadata;
      for (const [k, v] of Object.entries(src)) {
        if (k === 'general.file_type') continue;
        if (k.startsWith('general.') || k.startsWith('tokenizer.')) expect(got[k], `${type}: ${k}`).toEqual(v);
      }
      // The source says Q4_1 (3); what was written is described by its tensors, not by a stale key.
      expect(got['general.file_type'], type).toBeUndefined();
      expect(got['general.architecture']).toBe('llama');
    }
  });

  it('is batch invariant: decode, an 8-token chain and a tree give bit-identical logits', async () => {
    const prompt = Array.from(model.tokenizer!.encode('The quick brown fox'));
    const chain = [34854, 690, 260, 23790, 2767, 30, 378, 1345];
    // One token at a time.
    const single = model.createSequence();
    await single.evaluate(prompt);
    const one: Float32Array[] = [];
    for (const t of chain) one.push((await single.evaluate([t])).slice());
    await single.dispose();
    // The 8 tokens as one chain.
    const batch = model.createSequence();
    await batch.evaluate(prompt);
    const all = await batch.evaluate(chain);
    for (let i = 0; i < chain.length; i++) expect(sameBits(all.subarray(i * V, (i + 1) * V), one[i]!), `chain token ${i}`).toBe(true);
    await batch.dispose();
    // A tree whose second branch is the chain: nodes 0..2 are a decoy branch, 3..10 the chain.
    const tokens = [11, 12, 13, ...chain];
    const parents = [-1, 0, 1, -1, 3, 4, 5, 6, 7, 8, 9];
    const tree = model.createSequence();
    await tree.evaluate(prompt);
    const tl = await tree.evaluate(tokens, { treeParents: Int32Array.from(parents) });
    for (let i = 0; i < chain.length; i++) expect(sameBits(tl.subarray((3 + i) * V, (4 + i) * V), one[i]!), `tree node ${3 + i}`).toBe(true);
    // The kept path continues exactly like plain decoding.
    tree.keepPath(prompt.length, [3, 4, 5, 6, 7, 8, 9, 10]);
    const next = await tree.evaluate([42]);
    const plain = model.createSequence();
    const ref = await plain.evaluate([...prompt, ...chain, 42]);
    expect(sameBits(next, ref.subarray((prompt.length + chain.length) * V))).toBe(true);
    await tree.dispose();
    await plain.dispose();
  });

  it('gives the same logits on one thread and on two', async () => {
    const toks = Array.from(model.tokenizer!.encode('Batch invariance holds for every thread count.'));
    const setThreads = (addon as unknown as { setThreads(n: number): number }).setThreads;
    setThreads(2);
    const two = await model.forward(toks);
    try {
      setThreads(1);
      const once = await model.forward(toks);
      setThreads(3);
      const three = await model.forward(toks);
      expect(sameBits(once, two)).toBe(true);
      expect(sameBits(three, two)).toBe(true);
    } finally {
      setThreads(2);
    }
  });

  it('renders the GGUF chat template (ChatML) with @huggingface/jinja', async () => {
    const template = readChatTemplate(SMOL);
    expect(template).toContain('<|im_start|>');
    const messages = [
      { role: 'system', content: 'You are terse.' },
      { role: 'user', content: 'Name a colour.' },
    ];
    expect(applyChatTemplate(template, messages)).toBe(
      '<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n',
    );
    // Without a system message the template adds its own.
    expect(applyChatTemplate(template, [{ role: 'user', content: 'Hi' }], { addGenerationPrompt: false })).toBe(
      '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n',
    );
    expect(() => applyChatTemplate(template, [{ role: 'user' } as never])).toThrow(/messages\[0\]\.content/);
    expect(() => applyChatTemplate('{% for %}', [])).toThrow(SyntaxError);
    // A chat prompt tokenizes with its markup as single tokens, and the model answers it.
    const ids = model.tokenizer!.encode(applyChatTemplate(template, [{ role: 'user', content: 'What is the capital of France?' }]), { special: true });
    expect(ids[0]).toBe(1);
    const r = await model.generate({ tokens: ids, maxTokens: 24 });
    expect(r.tokens.length).toBeGreaterThan(0);
    expect(r.text!.length).toBeGreaterThan(0);
  });

  describe.skipIf(!nlc)('against llama.cpp (node-llama-cpp)', () => {
    let llama: Llama;
    let lm: LlamaModel;
    beforeAll(async () => {
      llama = await nlc!.getLlama({ gpu: false, build: 'never', logLevel: nlc!.LlamaLogLevel.error });
      lm = await llama.loadModel({ modelPath: SMOL });
    });
    afterAll(async () => {
      await lm?.dispose();
      await llama?.dispose();
    });

    it('tokenizes the llama-spm test strings and text in many scripts identically', () => {
      const texts = [
        'Привет, мир! Как дела?',
        'Γειά σου Κόσμε · Ελληνικά',
        '你好，世界！今天天气很好。',
        '日本語のテキスト、カタカナとひらがな。東京は2024年',
        '안녕하세요 세계 여러분',
        'مرحبا بالعالم، كيف حالك؟',
        'שלום עולם',
        'नमस्ते दुनिया, आप कैसे हैं?',
        'สวัสดีชาวโลก',
        'Tiếng Việt có dấu: Hà Nội, Sài Gòn',
        'Ümlaute: Grüße aus Köln, ß, Æøå, façade, naïve, ﬁ ligature',
        'Emoji 👩‍👩‍👧‍👦 🇫🇷 👍🏽 ❤️ and symbols ∑∫√∞ ≠ ≤ ≥',
        'Combining: e\u0301 a\u0308 n\u0303 — NFC vs NFD',
        'Numbers 3.14159, 1,000,000 and 0x1F; dates 2024-01-31; ١٢٣٤ ۱۲۳',
        'Code:\n\tfor (let i = 0; i < n; i++) {\n\t\tsum += a[i] * b[i];\n\t}\n',
        '   leading and trailing spaces   \n\n\n',
        'Mixed: English日本語русскийالعربية한국어',
        '<|im_start|>user\nnot special here<|im_end|>',
        // Bytes the vocabulary has no token for (0x04, 0x13; 0xF1 leads plane-4 characters): dropped,
        // as llama.cpp drops them (they became <|endoftext|>, the "unknown" id, mid-prompt).
        'a\u0004b',
        'x\u0013y',
        'Hello \u{50000} world',
      ];
      const spm = existsSync(join(VOCAB, 'ggml-vocab-llama-spm.gguf.inp')) ? readInp(join(VOCAB, 'ggml-vocab-llama-spm.gguf.inp')) : [];
      const t = model.tokenizer!;
      expect(Array.from(t.encode('a\u0004b'))).not.toContain(0);
      for (const s of [...texts, ...spm]) {
        expect(Array.from(t.encode(s)), JSON.stringify(s)).toEqual(Array.from(lm.tokenize(s, false)));
        expect(Array.from(t.encode(s, { special: true })), JSON.stringify(s)).toEqual(Array.from(lm.tokenize(s, true)));
      }
    });

    it('greedy continuations agree with llama.cpp up to a near-tie', async () => {
      const prompts = [
        '<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n',
        '<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n',
        'The three primary colors are',
        'The capital of France is',
        'def fibonacci(n):\n',
        'Once upon a time, there was a little',
        '1, 2, 3, 4, 5,',
        'Water boils at a temperature of',
      ];
      const agreed = await agreeGreedy(lm, model, prompts, { tokens: 32, nearTie: NEAR_TIE, special: true });
      // Guard against a vacuous pass: measured 157 of 8 x 32 here; near-ties come early only rarely.
      expect(agreed).toBeGreaterThanOrEqual(64);
    });

    it('the log-probabilities of a fixed sequence agree with llama.cpp within the quantisation noise', async () => {
      const fixed = Array.from(model.tokenizer!.encode('The quick brown fox jumps over the lazy dog. In 1492, Columbus sailed the ocean blue, and'));
      const ctx = await lm.createContext({ contextSize: 256, threads: 1 });
      let res;
      try {
        const seq = ctx.getSequence();
        res = await seq.controlledEvaluate(
          fixed.map((t) => [t, { generateNext: { probabilities: true, options: { temperature: 1, topK: 0, topP: 1, minP: 0 } } }] as const) as never,
        );
      } finally {
        await ctx.dispose();
      }
      const logits = await model.forward(fixed);
      let worst = 0;
      let sq = 0;
      let count = 0;
      let clear = 0;
      for (let i = 0; i < fixed.length; i++) {
        const probs = (res[i] as { next: { probabilities: Map<number, number> } }).next.probabilities;
        expect(probs.size).toBe(V); // the whole distribution (no top-k / top-p cut)
        const ours = logSoftmax(logits.subarray(i * V, (i + 1) * V));
        const theirs = new Float64Array(V).fill(-Infinity);
        for (const [t, p] of probs) theirs[t] = Math.log(p);
        for (let t = 0; t < V; t++) {
          if (Math.exp(ours[t]!) < 1e-3 && Math.exp(theirs[t]!) < 1e-3) continue;
          const d = Math.abs(ours[t]! - theirs[t]!);
          worst = Math.max(worst, d);
          sq += d * d;
          count++;
        }
        const [first, second] = [...probs.entries()];
        if (Math.log(first![1]) - Math.log(second![1]) > CLEAR_MARGIN) {
          expect(argmax(ours), `position ${i}`).toBe(first![0]);
          clear++;
        }
      }
      const rms = Math.sqrt(sq / count);
      console.log(`SmolLM2 vs llama.cpp: max |d log p| ${worst.toFixed(3)}, rms ${rms.toFixed(3)} over ${count} entries; ${clear} clear top-1 positions agree`);
      expect(worst).toBeLessThan(MAX_DLOGP);
      expect(rms).toBeLessThan(RMS_DLOGP);
      expect(clear).toBeGreaterThanOrEqual(8);
    });
  });

  it('keeps resident memory under 1.5x the file size plus the KV cache', async () => {
    // In a child process, so that nothing else in this test run counts: the resident set added by
    // loading the model and decoding 64 tokens, against the budget.
    const dir = tempDir('osd-smol-mem-');
    const script = join(dir, 'mem.mts');
    writeFileSync(
      script,
      `import { loadModel } from ${JSON.stringify(resolve(root, 'lib/index.ts'))};
// Collected garbage (the logits arrays each decoding step returns) is not the engine's memory.
const gc = globalThis.gc as () => void;
gc();
const before = process.memoryUsage().rss;
const m = await loadModel(${JSON.stringify(SMOL)}, { threads: 2 });
const r = await m.generate({ prompt: 'Tell me about the sea.', maxTokens: 64, stopTokens: [] });
gc();
const after = process.memoryUsage().rss;
console.log(JSON.stringify({ before, after, peak: process.resourceUsage().maxRSS * 1024, tokens: r.tokens.length }));
await m.dispose();
`,
    );
    const { stdout } = await promisify(execFile)(process.execPath, ['--expose-gc', '--import', 'tsx', script], { cwd: root });
    const m = JSON.parse(stdout.trim().split('\n').pop()!) as { before: number; after: number; peak: number; tokens: number };
    const file = statSync(SMOL).size;
    // The KV cache grows in steps up to the sequence's length (here < 128 slots): 30 layers x K and V x 192 floats.
    const kv = 30 * 2 * 192 * 4 * 128;
    const added = m.after - m.before;
    console.log(`SmolLM2 resident memory: +${(added / 2 ** 20).toFixed(1)} MiB for a ${(file / 2 ** 20).toFixed(1)} MiB file (budget ${((1.5 * file + kv) / 2 ** 20).toFixed(1)} MiB)`);
    expect(m.tokens).toBe(64);
    expect(added).toBeLessThan(1.5 * file + kv);
  });
});

describe.skipIf(!have)('bad SmolLM2 files', () => {
  const dir = suiteTempDir('osd-smol-bad-');

  it('a truncated quantised file names the file and the problem', async () => {
    const cut = join(dir, 'smol-cut.gguf');
    const fd = openSync(SMOL, 'r');
    const head = Buffer.alloc(60 << 20);
    readSync(fd, head, 0, head.length, 0);
    closeSync(fd);
    writeFileSync(cut, head);
    const err = await loadModel(cut).catch((e: Error) => e);
    expect(err).toBeInstanceOf(Error);
    expect((err as Error).message).toContain('smol-cut.gguf');
    expect((err as Error).message).toMatch(/tensor|data|beyond|end/i);
  });

  it('a tensor of a type without kernels is named in the error', async () => {
    // blk.0.attn_q.weight is Q4_1 (type 3, 20 bytes per 32 values); relabel it MXFP4 (type 39,
    // 17 bytes per 32), which fits in the same space but has no matrix kernel here.
    const bytes = readFileSync(SMOL);
    const name = Buffer.from('blk.0.attn_q.weight');
    const prefix = Buffer.alloc(8);
    prefix.writeBigUInt64LE(BigInt(name.length));
    const at = bytes.indexOf(Buffer.concat([prefix, name]));
    expect(at).toBeGreaterThan(0);
    let p = at + 8 + name.length;
    const nDims = bytes.readUInt32LE(p);
    p += 4 + 8 * nDims;
    expect(bytes.readUInt32LE(p)).toBe(3);
    bytes.writeUInt32LE(39, p);
    const bad = join(dir, 'smol-mxfp4.gguf');
    writeFileSync(bad, bytes);
    const err = await loadModel(bad).catch((e: Error) => e);
    expect(err).toBeInstanceOf(Error);
    expect((err as Error).message).toContain('smol-mxfp4.gguf');
    expect((err as Error).message).toContain("tensor 'blk.0.attn_q.weight' has type MXFP4, which has no matrix kernel");
  });
});

/** tokenizer.chat_template from a GGUF file's metadata (a minimal reader of the key-value section). */
function readChatTemplate(path: string): string {
  const fd = openSync(path, 'r');
  try {
    const buf = Buffer.alloc(8 << 20);
    const n = readSync(fd, buf, 0, buf.length, 0);
    const b = buf.subarray(0, n);
    let p = 8;
    p += 8; // tensor count
    const nkv = Number(b.readBigUInt64LE(p));
    p += 8;
    const str = () => {
      const len = Number(b.readBigUInt64LE(p));
      const s = b.toString('utf8', p + 8, p + 8 + len);
      p += 8 + len;
      return s;
    };
    const size: Record<number, number> = { 0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8 };
    const skip = (type: number) => {
      if (type === 8) str();
      else if (type === 9) {
        const et = b.readUInt32LE(p);
        const count = Number(b.readBigUInt64LE(p + 4));
        p += 12;
        if (et === 8) for (let i = 0; i < count; i++) str();
        else p += count * size[et]!;
      } else p += size[type]!;
    };
    for (let i = 0; i < nkv; i++) {
      const key = str();
      const type = b.readUInt32LE(p);
      p += 4;
      if (key === 'tokenizer.chat_template' && type === 8) return str();
      skip(type);
    }
    throw new Error('no tokenizer.chat_template');
  } finally {
    closeSync(fd);
  }
}
