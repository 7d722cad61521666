// Options a server builds from JSON get no help from the types: a misspelt or snake_case key, a
// contradictory or degenerate setting, or a prompt far too long for the context must be refused
// with an error naming it, never ignored.
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import {
  adamwStep,
  bandwidthProbe,
  copyModel,
  createDraftPool,
  createOnlineDecoder,
  createSpeculativeDecoder,
  createTrainer,
  defaultDraftPath,
  defaultTargetPath,
  distillLoss,
  flopsProbe,
  loadModel,
  loadTokenizer,
  Model,
  Tokenizer,
  verifyChain,
  verifyTree,
  writeRandomModel,
  type SpeculativeDecoder,
} from '../lib/index.js';

const VOCAB = join(import.meta.dirname, '../../shared/models/vocab');
const SMOLLM2 = join(import.meta.dirname, '../../shared/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf');

let target: Model;
let draft: Model;
let dec: SpeculativeDecoder;

beforeAll(async () => {
  target = await loadModel(defaultTargetPath);
  draft = await loadModel(defaultDraftPath);
  dec = createSpeculativeDecoder({ target, draft });
});

afterAll(async () => {
  await dec?.dispose();
  await draft?.dispose();
  await target?.dispose();
});

const typeError = (f: () => unknown, re: RegExp) => expect(f).toThrow(expect.objectContaining({ name: 'TypeError', message: expect.stringMatching(re) }));

describe('unknown option keys', () => {
  it('are TypeErrors naming the key, with the camelCase spelling when it is one', async () => {
    await expect(dec.generate({ prompt: 'hi', maxTokens: 2, max_tokens: 9 } as never)).rejects.toThrow(
      /^options\.max_tokens is not an option \(did you mean maxTokens\?\); the options are: tokens, prompt, maxTokens/,
    );
    await expect(dec.generate({ prompt: 'hi', maxTokens: 2, sampling: { temperature: 1, top_p: 0.5 } } as never)).rejects.toThrow(
      /^sampling\.top_p is not an option \(did you mean topP\?\)/,
    );
    await expect(dec.generate({ prompt: 'hi', maxTokens: 2, stopSequences: ['x'] } as never)).rejects.toThrow(TypeError);
    await expect(target.generate({ prompt: 'hi', maxTokens: 2, stop_tokens: [1] } as never)).rejects.toThrow(
      /^options\.stop_tokens is not an option \(did you mean stopTokens\?\)/,
    );
    // The sampling object of plain generation too (it reached the kernels unchecked, and a
    // top_p there sampled without top-p).
    await expect(target.generate({ prompt: 'hi', maxTokens: 2, sampling: { temperature: 1, top_p: 0.5 } } as never)).rejects.toThrow(
      /^sampling\.top_p is not an option \(did you mean topP\?\)/,
    );
    await expect(target.stream({ prompt: 'hi', maxTokens: 2, sampling: { temperature: 1, top_k: 5 } } as never).next()).rejects.toThrow(
      /^sampling\.top_k is not an option \(did you mean topK\?\)/,
    );
    // A top-p that rounds to 0 as the kernels' float is refused where it is given.
    await expect(target.generate({ prompt: 'hi', maxTokens: 2, sampling: { temperature: 1, topP: 1e-300 } })).rejects.toThrow(
      /^sampling\.topP must be in \(0, 1\]/,
    );
    typeError(() => createSpeculativeDecoder({ target, draft, maxConcurent: 8 } as never), /^options\.maxConcurent is not an option/);
    typeError(() => createSpeculativeDecoder({ target, draft, strategy: { kind: 'chain', lenght: 8 } } as never), /^strategy \(kind 'chain'\)\.lenght is not an option; the options are: kind, length$/);
    typeError(() => createSpeculativeDecoder({ target, draft, strategy: { kind: 'tree', depth: 3 } } as never), /\.depth is not an option; the options are: kind, budget, maxDepth/);
    typeError(() => createOnlineDecoder({ target, draft, distil: { lr: 1 } } as never), /^options\.distil is not an option/);
    expect(() => createSpeculativeDecoder({ target, draft, strategy: { kind: 'toString' } } as never)).toThrow(new RangeError("strategy.kind must be 'chain', 'tree', 'adaptive' or 'ngram', got 'toString'"));
    typeError(() => createDraftPool({ target, drafts: { a: draft }, route: 'ucb' } as never), /^options\.route is not an option/);
    await expect(loadModel(defaultDraftPath, { thread: 2 } as never)).rejects.toThrow(/^options\.thread is not an option; the options are: threads, signal, onProgress, device$/);
  });

  it('are refused by the tokenizer, sequences, save, chat templates and the trainer', async () => {
    const tk = target.tokenizer!;
    typeError(() => tk.encode('hi', { add_bos: false } as never), /^options\.add_bos is not an option \(did you mean addBos\?\)/);
    typeError(() => tk.decode([1, 2], { strip_space_prefix: true } as never), /^options\.strip_space_prefix is not an option/);
    typeError(() => target.createSequence({ context_size: 8 } as never), /^options\.context_size is not an option \(did you mean contextSize\?\)/);
    const seq = target.createSequence();
    try {
      await expect(seq.evaluate([1], { last_only: true } as never)).rejects.toThrow(/^options\.last_only is not an option \(did you mean lastOnly\?\)/);
      await expect(seq.draft([1], { count: 1, cnt: 2 } as never)).rejects.toThrow(/^options\.cnt is not an option/);
      await expect(seq.draft([1], { count: 1, sampling: { temperature: 1, top_p: 0.5 } } as never)).rejects.toThrow(/^options\.sampling\.top_p is not an option/);
    } finally {
      await seq.dispose();
    }
    await expect(draft.save('/tmp/never-written.gguf', { Type: 'F16' } as never)).rejects.toThrow(/^options\.Type is not an option; the options are: type$/);
    typeError(() => target.applyChatTemplate([{ role: 'user', content: 'hi' }], { template: '{{ messages[0].content }}', add_generation_prompt: true } as never), /^options\.add_generation_prompt is not an option \(did you mean addGenerationPrompt\?\)/);
    await expect(createTrainer(draft, { learning_rate: 1 } as never)).rejects.toThrow(/^options\.learning_rate is not an option/);
    await expect(writeRandomModel('/tmp/never-written.gguf', { vocabSize: 8, embeddingLength: 8, layers: 1, heads: 1, feedForwardLength: 8, contextLength: 8, kv_heads: 1 } as never)).rejects.toThrow(
      /^config\.kv_heads is not an option \(did you mean kvHeads\?\)/,
    );
    typeError(() => bandwidthProbe({ byte: 1 << 20 } as never), /^options\.byte is not an option/);
    typeError(() => flopsProbe({ iters: 1 } as never), /^options\.iters is not an option/);
  });

  it('non-models and null options are TypeErrors naming the argument, not property reads of undefined', async () => {
    await expect(copyModel({} as never)).rejects.toThrow(new TypeError('model must be a loaded Model'));
    const fake = { createSequence: () => ({}), disposed: false, info: target.info } as never;
    typeError(() => createSpeculativeDecoder({ target: fake, draft }), /^target must be a loaded Model$/);
    typeError(() => createSpeculativeDecoder({ target, draft: fake }), /^draft must be a loaded Model$/);
    typeError(() => target.tokenizer!.tokenToPiece(1, null as never), /^options must be an object$/);
    typeError(() => target.tokenizer!.tokenToPiece(1, { special: 'yes' } as never), /^options\.special must be a boolean$/);
    typeError(() => target.tokenizer!.tokenToBytes(1, null as never), /^options must be an object$/);
    typeError(() => target.tokenizer!.tokenToBytes(1, { speshul: true } as never), /^options\.speshul is not an option/);
    // A string id is shown as a string (it read "got 1"), and a fake huge length is refused by name.
    typeError(() => target.tokenizer!.decode(['1'] as never), /^tokens\[0\] must be an integer, got "1"$/);
    typeError(() => target.tokenizer!.decode({ length: 1e10 } as never), /^tokens must be an Int32Array or an array of token ids$/);
    expect(target.tokenizer!.tokenToPiece(1)).toBe(target.tokenizer!.tokenToPiece(1, { special: true }));
    // A progress callback that throws fails the load with its error.
    await expect(loadModel(defaultDraftPath, { onProgress: (p) => { if (p === 1) throw new Error('progress bug'); } })).rejects.toThrow('progress bug');
  });

  it('are refused by the kernels too, in their sampling and sparse teacher as well', () => {
    const V = 4;
    const chain = { targetLogits: new Float32Array(2 * V), draftLogits: new Float32Array(V), draftTokens: Int32Array.of(1), vocabSize: V, seed: 1 };
    typeError(() => verifyChain({ ...chain, sampling: { temperature: 1 }, stram: 3 } as never), /^options\.stram is not an option/);
    typeError(() => verifyChain({ ...chain, sampling: { temperature: 1, top_k: 2 } } as never), /^sampling\.top_k is not an option \(did you mean topK\?\)/);
    const tree = { parents: Int32Array.of(-1), tokens: Int32Array.of(1), targetLogits: new Float32Array(2 * V), vocabSize: V, sampling: { temperature: 0 }, seed: 1 };
    typeError(() => verifyTree({ ...tree, childern: 'deterministic' } as never), /^options\.childern is not an option/);
    const teacher = { indices: Int32Array.of(0), probs: Float32Array.of(0.5) };
    typeError(() => distillLoss({ kind: 'forward-kl', studentLogits: new Float32Array(V), teacher: { ...teacher, resid: Float32Array.of(0.5) }, vocabSize: V } as never), /^teacher\.resid is not an option/);
    const n = 3;
    typeError(() => adamwStep({ params: new Float32Array(n), grads: new Float32Array(n), m: new Float32Array(n), v: new Float32Array(n), step: 1, learningRate: 1 } as never), /^options\.learningRate is not an option/);
    // Keys set to undefined are let through, and a correct call still runs.
    expect(verifyChain({ ...chain, sampling: { temperature: 0, topK: undefined }, stream: undefined }).tokens.length).toBeGreaterThan(0);
  });

  it('read no getter: a getter on an option runs only when the binding reads it', () => {
    const V = 4;
    let reads = 0;
    const o = { targetLogits: new Float32Array(2 * V), draftTokens: Int32Array.of(1), vocabSize: V, seed: 1 };
    Object.defineProperty(o, 'sampling', { enumerable: true, get: () => (reads++, { temperature: 0 }) });
    verifyChain(o as never);
    expect(reads).toBe(1);
  });
});

describe('contradictory and degenerate settings', () => {
  it('prompt and tokens together are a TypeError', async () => {
    await expect(dec.generate({ prompt: 'hi', tokens: [1, 2], maxTokens: 2 })).rejects.toThrow(/^give tokens or prompt, not both$/);
    await expect(target.generate({ prompt: 'hi', tokens: [1, 2], maxTokens: 2 })).rejects.toThrow(/^give tokens or prompt, not both$/);
  });

  it('an empty stop string and out-of-range stop tokens are RangeErrors', async () => {
    await expect(dec.generate({ prompt: 'hi', maxTokens: 2, stop: ['x', ''] })).rejects.toThrow(/^stop\[1\] is the empty string/);
    const V = target.info.vocabSize;
    for (const [bad, i] of [[[-1], 0], [[0, V], 1]] as const) {
      await expect(dec.generate({ prompt: 'hi', maxTokens: 2, stopTokens: [...bad] })).rejects.toThrow(new RegExp(`^stopTokens\\[${i}\\] = -?\\d+ is out of range`));
      await expect(target.generate({ prompt: 'hi', maxTokens: 2, stopTokens: [...bad] })).rejects.toThrow(RangeError);
    }
  });
});

describe('sampling values at the edges', () => {
  it('a positive temperature that rounds to the float 0 is a RangeError, not greedy', async () => {
    const V = 4;
    const chain = { targetLogits: new Float32Array(V), draftTokens: new Int32Array(0), vocabSize: V, seed: 1 };
    for (const temperature of [1e-46, 5e-324])
      expect(() => verifyChain({ ...chain, sampling: { temperature } })).toThrow(
        expect.objectContaining({ name: 'RangeError', message: expect.stringMatching(/^sampling\.temperature must be 0 \(greedy\) or at least 1\.1754944e-38, got/) }),
      );
    await expect(dec.generate({ prompt: 'hi', maxTokens: 2, sampling: { temperature: 1e-46 } })).rejects.toThrow(/temperature must be 0 \(greedy\) or at least/);
  });

  it('a sampled chain of no draft tokens needs no draftLogits', () => {
    const V = 4;
    const r = verifyChain({ targetLogits: Float32Array.of(0, 1, 2, 3), draftTokens: new Int32Array(0), vocabSize: V, sampling: { temperature: 1 }, seed: 1 });
    expect(r.acceptedCount).toBe(0);
    expect(r.tokens.length).toBe(1);
  });
});

describe('seeds', () => {
  it('a seed alone reproduces a sampled request; without one, requests draw independently', async () => {
    const req = { prompt: 'The history of', maxTokens: 24, sampling: { temperature: 1 } };
    const a = await dec.generate({ ...req, seed: 42 });
    const b = await dec.generate({ ...req, seed: 42 });
    expect(Array.from(b.tokens)).toEqual(Array.from(a.tokens));
    // stream 0 is the seeded default: giving it changes nothing.
    expect(Array.from((await dec.generate({ ...req, seed: 42, stream: 0 })).tokens)).toEqual(Array.from(a.tokens));
    const unseeded = new Set<string>();
    for (let i = 0; i < 4; i++) unseeded.add(Array.from((await dec.generate(req)).tokens).join());
    expect(unseeded.size).toBeGreaterThan(1);
  });
});

describe('prompts too long for the context', () => {
  it('are refused before they are encoded', async () => {
    const tk = target.tokenizer!;
    const huge = 'word '.repeat(100_000);
    const encode = vi.spyOn(tk, 'encode');
    try {
      await expect(dec.generate({ prompt: huge, maxTokens: 2 })).rejects.toThrow(/^the prompt \(at least \d+ tokens\) does not fit the context of \d+$/);
      await expect(target.generate({ prompt: huge, maxTokens: 2 })).rejects.toThrow(RangeError);
      expect(encode).not.toHaveBeenCalled();
    } finally {
      encode.mockRestore();
    }
  });

  it('minTokens is a lower bound of the encoded length (SentencePiece and byte-level BPE)', async () => {
    const tokenizers = [target.tokenizer!];
    if (existsSync(SMOLLM2)) tokenizers.push(await loadTokenizer(SMOLLM2));
    // llama.cpp's tokenizer test strings (whitespace runs, emoji, several scripts).
    const extra: string[] = [];
    const inp = join(VOCAB, 'ggml-vocab-llama-spm.gguf.inp');
    if (existsSync(inp)) extra.push(...readFileSync(inp, 'utf8').split('\n__ggml_vocab_test__\n'));
    const texts = ['', 'a', 'word '.repeat(3000), 'The quick brown fox. '.repeat(500), '日本語のテキスト😀 '.repeat(400), '\n\n\t  x'.repeat(2000)];
    for (let i = 0; i < 30; i++) {
      let s = '';
      for (let j = 0; j < 3000; j++) s += String.fromCodePoint(j % 7 === 0 ? 0x1f600 + (j % 50) : 32 + ((i * 7919 + j * 31) % 95));
      texts.push(s);
    }
    texts.push(...extra, ...extra.map((t) => t.repeat(50)));
    for (const tk of tokenizers)
      for (const t of texts) expect(tk.minTokens(t)).toBeLessThanOrEqual(tk.encode(t, { addBos: false }).length);
  });
});

describe('copyModel', () => {
  it('gives a separate model with the same weights (to keep a draft the online decoder would train)', async () => {
    await using copy = await copyModel(draft);
    expect(copy).not.toBe(draft);
    const tokens = [1, 2, 3];
    expect(Array.from(await copy.forward(tokens))).toEqual(Array.from(await draft.forward(tokens)));
  });
});

describe('error codes', () => {
  it("use after dispose, and work cut short by a disposal, reject with code 'OSD_DISPOSED'", async () => {
    const m = await loadModel(defaultDraftPath);
    const d = createSpeculativeDecoder({ target: m, draft: m });
    const running = d.generate({ prompt: 'Once upon a time', maxTokens: 200 });
    const cut = expect(running).rejects.toMatchObject({ code: 'OSD_DISPOSED', message: 'the decoder was disposed' });
    await d.dispose();
    await cut;
    await expect(d.generate({ prompt: 'hi', maxTokens: 2 })).rejects.toMatchObject({ code: 'OSD_DISPOSED' });
    await m.dispose();
    await expect(m.generate({ prompt: 'hi', maxTokens: 2 })).rejects.toMatchObject({ code: 'OSD_DISPOSED', message: 'the model was disposed' });
  });
});

describe('stop tokens past the shared vocabulary', () => {
  it("the target's end-of-sequence id may lie past the vocabulary it shares with the draft", async () => {
    // A draft whose tokenizer stops just before the target's EOS (a chat fine-tune's added token).
    const tk = target.tokenizer!;
    const n = tk.eos;
    const draftTk = Tokenizer.fromVocab({
      model: tk.model,
      tokens: Array.from({ length: n }, (_, i) => tk.tokenText(i)),
      tokenTypes: Array.from({ length: n }, () => 1),
      bos: tk.bos < n ? tk.bos : -1,
      eos: -1,
      unk: tk.unk < n ? tk.unk : -1,
      addBos: false,
    } as never);
    const small = new (Model as unknown as new (h: unknown, t: Tokenizer) => Model)((draft as unknown as { handle: unknown }).handle, draftTk);
    const d = createSpeculativeDecoder({ target, draft: small });
    try {
      expect(d.vocabSize).toBe(n);
      const r = await d.generate({ prompt: 'Once upon a time', maxTokens: 8 });
      expect(r.tokens.length).toBeGreaterThan(0);
      // The caller's stop tokens are checked against the target's vocabulary.
      await expect(d.generate({ prompt: 'hi', maxTokens: 2, stopTokens: [tk.eos] })).resolves.toBeDefined();
      await expect(d.generate({ prompt: 'hi', maxTokens: 2, stopTokens: [target.info.vocabSize] })).rejects.toThrow(RangeError);
    } finally {
      await d.dispose();
    }
  });
});
