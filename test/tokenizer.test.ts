// Tokenizer tests against independent implementations, on every test string llama.cpp ships for
// these vocabularies (../shared/models/vocab/*.inp; llama.cpp's expected .out files are not
// there, so npm packages are the oracles):
//   - Llama 2 SentencePiece: llama-tokenizer-js 1.2.2, called as encode(s, false, true), i.e.
//     without BOS and with the dummy space prefix, which is what llama.cpp does for text after
//     BOS. One difference is documented and not compared: for "" llama-tokenizer-js returns []
//     even when asked for BOS, while llama.cpp and SentencePiece give [BOS].
//   - GPT-2: gpt-3-encoder 1.1.4 (OpenAI's encoder.py in JS). Its \s is JavaScript's, ours is
//     Unicode White_Space (U+0085 and U+FEFF differ); no test string contains either.
//   - SmolLM2 (pre-tokenizer "smollm"): node-llama-cpp 3.21.1, i.e. llama.cpp itself, when that
//     package is installed; the test is skipped otherwise.
// All three agree with our tokenizer on all 46 strings of each file.
//
// The two vocabulary GGUFs in ../shared are damaged (see recoverVocab below): our GGUF reader
// rejects them, so the tests rebuild their vocabularies and use Tokenizer.fromVocab.
import { existsSync, readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import gpt3 from 'gpt-3-encoder';
import llamaTokenizer from 'llama-tokenizer-js';
import { Tokenizer, TokenType, loadTokenizer, type VocabData } from '../lib/Tokenizer.js';

const root = fileURLToPath(new URL('..', import.meta.url));
const models = resolve(root, '../shared/models');
const vocabDir = resolve(models, 'vocab');
const smollmPath = resolve(models, 'smollm2/SmolLM2-135M-Instruct.Q4_1.gguf');
const haveShared = existsSync(resolve(vocabDir, 'ggml-vocab-llama-spm.gguf'));
if (!haveShared) console.warn(`tokenizer tests: ${vocabDir} not found (../shared is absent on a fresh clone); skipping the real-vocabulary tests`);

/** The .inp test strings, separated by lines "__ggml_vocab_test__" (llama.cpp's test-tokenizer-0). */
function readInp(path: string): string[] {
  const parts = readFileSync(path, 'utf8').split('\n__ggml_vocab_test__\n');
  parts.pop(); // after the last separator
  return parts;
}

// ---------------------------------------------------------------------------------------------
// The vocabulary files in ../shared/models/vocab were damaged on their way here: they went
// through a UTF-8 text decoder that replaced every invalid byte sequence with U+FFFD (EF BF BD),
// so each number with a byte >= 0x80 grew and everything after it moved. Strings, being valid
// UTF-8, survived. This recovers the vocabulary and checks each recovered number by damaging it
// again and comparing with the file's bytes (test/native/test_tokenizer.cpp does the same in C++):
//   - keys are found by their length prefix and name, so damaged fields in between do not matter;
//   - a damaged string length is the one that ends on the next entry's length field;
//   - a damaged token id (GPT-2's <|endoftext|> = 50256) is the one control token that damages
//     to the same bytes;
//   - Llama's scores follow SentencePiece's layout: 0 for special and byte tokens, minus the merge
//     rank (id - 259) for normal tokens, -1e9 for the whitespace runs; each of the 32000 values is
//     checked, and the whole array damages to exactly the file's bytes.

const REPLACEMENT = Buffer.from([0xef, 0xbf, 0xbd]);
const utf8 = new TextDecoder('utf-8', { ignoreBOM: true }); // replaces like the damage did

function redamage(bytes: Uint8Array): Buffer {
  return Buffer.from(utf8.decode(bytes), 'utf8');
}

function leBytes(value: number, width: number): Buffer {
  const b = Buffer.alloc(width);
  for (let i = 0; i < width; i++) b[i] = Math.floor(value / 2 ** (8 * i)) & 0xff;
  return b;
}

interface Entry {
  key: string;
  type: number;
  begin: number;
  end: number;
}

class DamagedGguf {
  constructor(private readonly b: Buffer) {}

  /** A little-endian integer whose bytes >= 0x80 may each have become U+FFFD. */
  readInt(p: number, width: number): { value: number; known: boolean; span: number } {
    let value = 0;
    let known = true;
    const start = p;
    for (let k = 0; k < width; k++) {
      if (this.b.subarray(p, p + 3).equals(REPLACEMENT)) {
        known = false;
        p += 3;
      } else {
        value += this.b[p]! * 2 ** (8 * k);
        p += 1;
      }
    }
    return { value, known, span: p - start };
  }

  keyAt(p: number, arch: string): { key: string; type: number } | null {
    const b = this.b;
    if (p + 12 > b.length) return null;
    const len = b[p]!;
    if (len < 3 || len > 100 || b.readUInt32LE(p + 1) !== 0 || b.readUInt16LE(p + 5) !== 0 || b[p + 7] !== 0) return null;
    if (p + 8 + len + 4 > b.length) return null;
    const key = b.toString('latin1', p + 8, p + 8 + len);
    if (!/^[a-z0-9_.]+$/.test(key)) return null;
    if (!key.startsWith('general.') && !key.startsWith('tokenizer.') && !(arch && key.startsWith(arch + '.'))) return null;
    const type = b.readUInt32LE(p + 8 + len);
    return type <= 12 ? { key, type } : null;
  }

  entries(): Entry[] {
    const b = this.b;
    if (b.toString('latin1', 0, 4) !== 'GGUF') throw new Error('not a GGUF file');
    const nKv = Number(b.readBigUInt64LE(16));
    const out: Entry[] = [];
    let arch = '';
    for (let p = 24; out.length < nKv; ) {
      const k = this.keyAt(p, arch);
      if (!k) throw new Error(`lost track of the keys at byte ${p}`);
      const begin = p + 8 + k.key.length + 4;
      let end = begin;
      if (out.length + 1 < nKv) while (end < b.length && !this.keyAt(end, arch)) end++;
      else end = b.length;
      const e = { key: k.key, type: k.type, begin, end };
      if (e.key === 'general.architecture') arch = this.stringValue(e);
      out.push(e);
      p = end;
    }
    return out;
  }

  stringValue(e: Entry): string {
    const { span } = this.readInt(e.begin, 8);
    return this.b.toString('utf8', e.begin + span, e.end);
  }

  stringArray(e: Entry): string[] {
    const out: string[] = [];
    let p = e.begin + 4;
    const count = this.readInt(p, 8);
    p += count.span;
    while (p < e.end) {
      const len = this.readInt(p, 8);
      let n = len.value;
      if (!len.known) {
        // Only the low byte can be lost: the length is 0x80..0xFF. Take the one whose string is
        // valid UTF-8 and ends at the end of the array or on a plausible next length field.
        n = -1;
        for (let l = 0x80; l <= 0xff && n < 0; l++) {
          const q = p + len.span + l;
          if (q > e.end) break;
          const s = this.b.subarray(p + len.span, q);
          if (!redamage(s).equals(s)) continue;
          if (q === e.end || (q + 8 <= e.end && this.readInt(q, 8).value < 4096)) n = l;
        }
        if (n < 0) throw new Error(`${e.key}: cannot recover a string length`);
      }
      out.push(this.b.toString('utf8', p + len.span, p + len.span + n));
      p += len.span + n;
    }
    if (count.known && count.value !== out.length) throw new Error(`${e.key}: count mismatch`);
    return out;
  }

  /** The element bytes of a numeric array. */
  arrayBytes(e: Entry): Buffer {
    const p = e.begin + 4 + this.readInt(e.begin + 4, 8).span;
    return this.b.subarray(p, e.end);
  }

  raw(e: Entry): Buffer {
    return this.b.subarray(e.begin, e.end);
  }
}

function recoverScores(region: Buffer, types: Int32Array): Float32Array {
  let firstNormal = 0;
  while (firstNormal < types.length && types[firstNormal] !== TokenType.Normal) firstNormal++;
  const scores = new Float32Array(types.length);
  let pos = 0;
  for (let i = 0; i < types.length; i++) {
    const candidates = types[i] === TokenType.Normal ? [-(i - firstNormal), -1e9, 0] : [0];
    let ok = false;
    for (const c of candidates) {
      const raw = Buffer.from(new Float32Array([c]).buffer);
      const d = redamage(raw);
      if (region.subarray(pos, pos + d.length).equals(d)) {
        scores[i] = c;
        pos += d.length;
        ok = true;
        break;
      }
    }
    if (!ok) throw new Error(`cannot recover tokenizer.ggml.scores[${i}]`);
  }
  if (!redamage(Buffer.from(scores.buffer)).equals(region)) throw new Error('recovered scores do not damage to the file bytes');
  return scores;
}

function recoverVocab(path: string): VocabData {
  const g = new DamagedGguf(readFileSync(path));
  const entries = g.entries();
  const find = (key: string) => entries.find((e) => e.key === key);
  const must = (key: string) => {
    const e = find(key);
    if (!e) throw new Error(`${key} is missing`);
    return e;
  };
  const model = g.stringValue(must('tokenizer.ggml.model')) as VocabData['model'];
  const tokens = g.stringArray(must('tokenizer.ggml.tokens'));
  const typeBytes = g.arrayBytes(must('tokenizer.ggml.token_type'));
  if (typeBytes.length !== 4 * tokens.length || typeBytes.includes(REPLACEMENT)) throw new Error('token types are damaged');
  const tokenTypes = new Int32Array(tokens.length);
  for (let i = 0; i < tokens.length; i++) tokenTypes[i] = typeBytes.readInt32LE(4 * i);
  const id = (key: string): number => {
    const e = find(key);
    if (!e) return -1;
    const r = g.readInt(e.begin, 4);
    if (r.known) return r.value;
    const field = g.raw(e);
    const hits = [];
    for (let t = 0; t < tokens.length; t++)
      if (tokenTypes[t] === TokenType.Control && redamage(leBytes(t, 4)).equals(field)) hits.push(t);
    if (hits.length !== 1) throw new Error(`${key}: cannot recover`);
    return hits[0]!;
  };
  const flag = (key: string, fallback: boolean) => {
    const e = find(key);
    return e ? g.raw(e)[0] !== 0 : fallback;
  };
  const scores = find('tokenizer.ggml.scores');
  const merges = find('tokenizer.ggml.merges');
  const pre = find('tokenizer.ggml.pre');
  return {
    model,
    pre: pre ? g.stringValue(pre) : '',
    tokens,
    tokenTypes,
    scores: scores ? recoverScores(g.arrayBytes(scores), tokenTypes) : undefined,
    merges: merges ? g.stringArray(merges) : undefined,
    bos: id('tokenizer.ggml.bos_token_id'),
    eos: id('tokenizer.ggml.eos_token_id'),
    unk: id('tokenizer.ggml.unknown_token_id'),
    addBos: flag('tokenizer.ggml.add_bos_token', model === 'llama'),
    addEos: flag('tokenizer.ggml.add_eos_token', false),
    addSpacePrefix: model === 'llama',
  };
}

// ---------------------------------------------------------------------------------------------

/** Decodes token by token through a stream decoder. */
function streamDecode(t: Tokenizer, ids: Int32Array, stripSpacePrefix: boolean): string {
  const d = t.createStreamDecoder({ stripSpacePrefix });
  let out = '';
  for (const id of ids) out += d.push(id);
  return out + d.flush();
}

describe('tokenizer on hand-built vocabularies', () => {
  // <unk> <s> </s>, 256 byte tokens (ids 3..258), then normal tokens.
  const bytes = Array.from({ length: 256 }, (_, b) => `<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`);
  const normal: [string, number][] = [
    ['▁', -1], ['a', -2], ['b', -3], ['c', -4], ['ab', -10], ['bc', -5], ['▁a', -6],
  ];
  const spm: VocabData = {
    model: 'llama',
    tokens: ['<unk>', '<s>', '</s>', ...bytes, ...normal.map((n) => n[0])],
    scores: [0, 0, 0, ...bytes.map(() => 0), ...normal.map((n) => n[1])],
    tokenTypes: [2, 3, 3, ...bytes.map(() => 6), ...normal.map(() => 1)],
    unk: 0,
    bos: 1,
    eos: 2,
    addBos: true,
  };

  it('merges by score, falls back to bytes, and round-trips', () => {
    const t = Tokenizer.fromVocab(spm);
    expect(t.vocabSize).toBe(266);
    expect([t.bos, t.eos, t.unk, t.pad, t.addBos, t.addSpacePrefix, t.model]).toEqual([1, 2, 0, -1, true, true, 'llama']);
    expect(Array.from(t.encode('abc'))).toEqual([1, 265, 264]); // BOS ▁a bc: "bc" outscores "ab"
    expect(Array.from(t.encode('abc', { addBos: false, addEos: true }))).toEqual([265, 264, 2]);
    expect(Array.from(t.encode('é', { addBos: false }))).toEqual([259, 3 + 0xc3, 3 + 0xa9]);
    expect(Array.from(t.encode('a</s>a', { addBos: false, special: true }))).toEqual([265, 2, 265]);
    expect(t.decode(t.encode('abc é'))).toBe('abc é');
    expect(t.decode([1, 265, 2], { special: true })).toBe('<s> a</s>');
    expect(t.decode([265], { stripSpacePrefix: false })).toBe(' a');
    expect(t.tokenText(265)).toBe('▁a');
    expect(t.tokenToPiece(265)).toBe(' a');
    expect(t.tokenType(1)).toBe(TokenType.Control);
    expect(t.findToken('bc')).toBe(264);
    expect(t.findToken('zz')).toBe(-1);
  });

  it('streams characters split across byte tokens', () => {
    const t = Tokenizer.fromVocab(spm);
    const d = t.createStreamDecoder();
    expect(d.push(265)).toBe(' a');
    expect(d.push(3 + 0xe2)).toBe('');
    expect(d.pendingBytes).toBe(1);
    expect(d.push([3 + 0x82])).toBe('');
    expect(d.push(new Int32Array([3 + 0xac, 264]))).toBe('€bc');
    expect(d.flush()).toBe('');
    const ids = t.encode('a€é😀', { addBos: true });
    expect(streamDecode(t, ids, true)).toBe('a€é😀');
    expect(t.tokenToBytes(3 + 0xe2)).toEqual(new Uint8Array([0xe2]));
  });

  it('rejects bad arguments with errors that name them', () => {
    const t = Tokenizer.fromVocab(spm);
    expect(() => t.decode([265, 70000])).toThrow(new RangeError('tokens[1] = 70000 is out of range for a vocabulary of 266'));
    expect(() => t.decode(new Int32Array([-5]))).toThrow(new RangeError('tokens[0] = -5 is out of range for a vocabulary of 266'));
    expect(() => t.decode([1.5])).toThrow(TypeError);
    expect(() => t.decode('abc' as unknown as number[])).toThrow(TypeError);
    expect(() => t.encode(42 as unknown as string)).toThrow(new TypeError('text must be a string'));
    expect(() => t.encode('a', null as never)).toThrow(new TypeError('options must be an object'));
    expect(() => t.decode([1], null as never)).toThrow(new TypeError('options must be an object'));
    expect(() => t.createStreamDecoder(null as never)).toThrow(new TypeError('options must be an object'));
    expect(() => t.tokenText(266)).toThrow(new RangeError('token = 266 is out of range for a vocabulary of 266'));
    expect(() => t.tokenToPiece(1.5)).toThrow(RangeError);
    const d = t.createStreamDecoder();
    expect(() => d.push(266)).toThrow(RangeError);
    expect(() => Tokenizer.fromVocab({ ...spm, model: 'bert' as 'llama' })).toThrow(
      new RangeError("tokenizer.ggml.model = 'bert' is not a supported tokenizer (supported: llama, gpt2)"),
    );
    expect(() => Tokenizer.fromVocab({ model: 'gpt2', pre: 'bloom', tokens: ['a'] })).toThrow(/tokenizer\.ggml\.pre = 'bloom' is not a supported pre-tokenizer/);
    expect(() => Tokenizer.fromVocab({ ...spm, tokens: ['a', 7 as unknown as string] })).toThrow(new TypeError('vocab.tokens[1] must be a string'));
    expect(() => Tokenizer.fromVocab({ ...spm, eos: 999 })).toThrow(/eos_token_id = 999 is out of range/);
    expect(() => Tokenizer.fromVocab({ ...spm, bos: -1 }).encode('a', { addBos: true })).toThrow(/no BOS token/);
  });

  it('builds a byte-level BPE tokenizer from merges', () => {
    const t = Tokenizer.fromVocab({ model: 'gpt2', tokens: ['a', 'b', 'ab', 'Ġ', 'Ġab'], merges: ['a b', 'Ġ ab'] });
    expect(Array.from(t.encode('ab ab'))).toEqual([2, 4]);
    expect(t.decode([2, 4])).toBe('ab ab');
    expect(t.addBos).toBe(false);
  });
});

describe.skipIf(!haveShared)('Llama SentencePiece vocabulary against llama-tokenizer-js', () => {
  const inputs = haveShared ? readInp(resolve(vocabDir, 'ggml-vocab-llama-spm.gguf.inp')) : [];
  const tokenizer = haveShared ? Tokenizer.fromVocab(recoverVocab(resolve(vocabDir, 'ggml-vocab-llama-spm.gguf'))) : undefined!;

  it('reads the vocabulary', () => {
    expect(inputs).toHaveLength(46);
    expect([tokenizer.vocabSize, tokenizer.bos, tokenizer.eos, tokenizer.unk, tokenizer.addBos]).toEqual([32000, 1, 2, 0, true]);
  });

  it('encodes every test string to the same ids', () => {
    for (const s of inputs) {
      const ours = Array.from(tokenizer.encode(s, { addBos: false }));
      expect(ours, JSON.stringify(s)).toEqual(llamaTokenizer.encode(s, false, true) ?? []);
      if (s !== '') expect(Array.from(tokenizer.encode(s)), JSON.stringify(s)).toEqual(llamaTokenizer.encode(s, true, true));
    }
    expect(Array.from(tokenizer.encode(''))).toEqual([1]); // llama.cpp and SentencePiece: '' -> [BOS]
  });

  it('decodes back to the text, also as a stream, and as llama-tokenizer-js does', () => {
    for (const s of inputs) {
      const ids = tokenizer.encode(s);
      expect(tokenizer.decode(ids), JSON.stringify(s)).toBe(s);
      expect(streamDecode(tokenizer, ids, true), JSON.stringify(s)).toBe(s);
      expect(llamaTokenizer.decode(Array.from(ids), true, true), JSON.stringify(s)).toBe(s);
    }
  });

  it('parses control tokens only when asked', () => {
    expect(Array.from(tokenizer.encode('<s>Hi</s>', { addBos: false, special: true }))).toEqual([1, 6324, 2]);
    expect(tokenizer.encode('<s>Hi</s>', { addBos: false })).not.toContain(1);
  });

  it('rejects the damaged file itself with a clear error', async () => {
    await expect(loadTokenizer(resolve(vocabDir, 'ggml-vocab-llama-spm.gguf'))).rejects.toThrow(/ggml-vocab-llama-spm\.gguf/);
  });
});

describe.skipIf(!haveShared)('GPT-2 byte-level vocabulary against gpt-3-encoder', () => {
  const inputs = haveShared ? readInp(resolve(vocabDir, 'ggml-vocab-gpt-2.gguf.inp')) : [];
  const tokenizer = haveShared ? Tokenizer.fromVocab(recoverVocab(resolve(vocabDir, 'ggml-vocab-gpt-2.gguf'))) : undefined!;

  it('reads the vocabulary', () => {
    expect(inputs).toHaveLength(46);
    expect([tokenizer.vocabSize, tokenizer.bos, tokenizer.eos, tokenizer.pre, tokenizer.addBos]).toEqual([50257, 50256, 50256, 'gpt-2', false]);
  });

  it('encodes every test string to the same ids', () => {
    for (const s of inputs) expect(Array.from(tokenizer.encode(s)), JSON.stringify(s)).toEqual(gpt3.encode(s));
  });

  it('decodes back to the text, also as a stream', () => {
    for (const s of inputs) {
      const ids = tokenizer.encode(s);
      expect(tokenizer.decode(ids), JSON.stringify(s)).toBe(s);
      expect(gpt3.decode(Array.from(ids)), JSON.stringify(s)).toBe(s);
      expect(streamDecode(tokenizer, ids, false), JSON.stringify(s)).toBe(s);
    }
  });

  it('parses <|endoftext|> only when asked', () => {
    expect(Array.from(tokenizer.encode('a<|endoftext|>', { special: true }))).toEqual([64, 50256]);
    expect(Array.from(tokenizer.encode('a<|endoftext|>'))).toEqual(gpt3.encode('a<|endoftext|>'));
    expect(tokenizer.decode([64, 50256])).toBe('a');
    expect(tokenizer.decode([64, 50256], { special: true })).toBe('a<|endoftext|>');
  });
});

describe.skipIf(!existsSync(smollmPath))('SmolLM2 tokenizer from its GGUF file', () => {
  it('loads off the event loop and encodes chat markup', async () => {
    const t = await loadTokenizer(smollmPath);
    expect([t.vocabSize, t.model, t.pre, t.bos, t.eos, t.addBos]).toEqual([49152, 'gpt2', 'smollm', 1, 2, false]);
    const chat = '<|im_start|>user\nWhat is 2+2?<|im_end|>\n';
    // Expected ids from node-llama-cpp 3.21.1 (llama.cpp) on the same file.
    expect(Array.from(t.encode(chat, { special: true }))).toEqual([1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198]);
    expect(Array.from(t.encode('Hello world 12345'))).toEqual([19556, 905, 216, 33, 34, 35, 36, 37]);
    expect(t.decode(t.encode(chat, { special: true }), { special: true })).toBe(chat);
    expect(t.decode(t.encode(chat, { special: true }))).toBe('user\nWhat is 2+2?\n');
    expect(Tokenizer.loadSync(smollmPath).vocabSize).toBe(49152);
  });

  it('rejects a missing file', async () => {
    await expect(loadTokenizer(resolve(models, 'no-such-file.gguf'))).rejects.toThrow(/no-such-file\.gguf/);
    expect(() => Tokenizer.loadSync(resolve(models, 'no-such-file.gguf'))).toThrow(/no-such-file\.gguf/);
  });

  it('agrees with node-llama-cpp on every test string', async (ctx) => {
    let nlc: typeof import('node-llama-cpp');
    try {
      nlc = await import('node-llama-cpp');
    } catch {
      console.warn('tokenizer tests: node-llama-cpp is not installed; skipping the SmolLM2 comparison');
      ctx.skip();
      return;
    }
    const llama = await nlc.getLlama({ gpu: false, build: 'never', logLevel: nlc.LlamaLogLevel.error });
    const model = await llama.loadModel({ modelPath: smollmPath, vocabOnly: true });
    try {
      const t = await loadTokenizer(smollmPath);
      const inputs = haveShared ? readInp(resolve(vocabDir, 'ggml-vocab-gpt-2.gguf.inp')) : [];
      inputs.push('<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n1234 + 5678?<|im_end|>\n');
      for (const s of inputs) {
        expect(Array.from(t.encode(s)), JSON.stringify(s)).toEqual(Array.from(model.tokenize(s, false)));
        expect(Array.from(t.encode(s, { special: true })), JSON.stringify(s)).toEqual(Array.from(model.tokenize(s, true)));
        expect(t.decode(t.encode(s)), JSON.stringify(s)).toBe(s);
      }
    } finally {
      await model.dispose();
      await llama.dispose();
    }
  });
});
