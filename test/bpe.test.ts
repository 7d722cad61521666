// The byte-level BPE trainer (lib/train/bpe.ts) and the GGUF writer binding:
//   - merges on toy corpora equal hand-computed ones, and equal a naive trainer (recount all pairs
//     every step) on real text, which checks the incremental pair-count updates;
//   - the native tokenizer built from a trained vocabulary encodes exactly as the plain
//     JavaScript reference encoder, on every domain's held-out text and on edge cases, and
//     decode(encode(s)) === s;
//   - a vocabulary-only GGUF written with writeGguf loads with loadTokenizer and tokenizes the same;
//   - writeGguf / readGgufMetadata round-trip metadata and tensors, and name bad arguments.
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { Tokenizer, TokenType, loadTokenizer } from '../lib/Tokenizer.js';
import {
  BYTE_TO_UNICODE,
  PreTokenCounter,
  ReferenceBpeEncoder,
  preTokenize,
  readGgufMetadata,
  trainBpe,
  vocabToGgufMetadata,
  writeGguf,
  writeTokenizerGguf,
  type TrainBpeResult,
} from '../lib/train/bpe.js';
import { loadCorpora, type DomainCorpus } from '../lib/train/corpus.js';
import { suiteTempDir } from './helpers/tmp.js';

const tmp = suiteTempDir('osd-bpe-');

/** The straightforward trainer: recount every pair before each merge; ties to the smaller (left, right) id. */
function naiveMerges(counts: Map<string, number>, nMerges: number, minPairCount = 2): string[] {
  const enc = new TextEncoder();
  const words = [...counts].map(([w, f]) => ({ syms: [...enc.encode(w)], f }));
  const tokens = [...BYTE_TO_UNICODE];
  const ids = new Map(tokens.map((t, i) => [t, i]));
  const merges: string[] = [];
  while (merges.length < nMerges) {
    const pc = new Map<number, number>();
    for (const { syms, f } of words) {
      for (let i = 0; i + 1 < syms.length; i++) {
        const k = syms[i]! * 32768 + syms[i + 1]!;
        pc.set(k, (pc.get(k) ?? 0) + f);
      }
    }
    let best = -1;
    let bestCount = 0;
    for (const [k, c] of pc) if (c > bestCount || (c === bestCount && k < best)) [best, bestCount] = [k, c];
    if (best < 0 || bestCount < minPairCount) break;
    const a = Math.floor(best / 32768);
    const b = best % 32768;
    const text = tokens[a]! + tokens[b]!;
    let c = ids.get(text);
    if (c === undefined) {
      c = tokens.length;
      tokens.push(text);
      ids.set(text, c);
    }
    merges.push(`${tokens[a]} ${tokens[b]}`);
    for (const w of words) {
      const out: number[] = [];
      for (let i = 0; i < w.syms.length; i++) {
        if (w.syms[i] === a && w.syms[i + 1] === b) {
          out.push(c);
          i++;
        } else out.push(w.syms[i]!);
      }
      w.syms = out;
    }
  }
  return merges;
}

describe('BPE trainer', () => {
  it('learns the hand-computed merges of a toy corpus', () => {
    // hug 10, pug 5, pun 12, bun 4, hugs 5. Pair counts: ug 20, pu 17, un 16, hu 15, gs 5, bu 4.
    //  1. u+g (20)  -> h ug, p ug, p u n, b u n, h ug s:   un 16, h-ug 15, pu 12, p-ug 5, ug-s 5, bu 4
    //  2. u+n (16)  -> h-ug 15, p-un 12, p-ug 5, ug-s 5, b-un 4
    //  3. h+ug (15) -> p-un 12, p-ug 5, hug-s 5, b-un 4
    //  4. p+un (12) -> p-ug 5 and hug-s 5 tie: p (112) < hug (258) -> p+ug first
    //  5. p+ug, 6. hug+s, 7. b+un; then every word is one token.
    const counts = new Map([
      ['hug', 10],
      ['pug', 5],
      ['pun', 12],
      ['bun', 4],
      ['hugs', 5],
    ]);
    const r = trainBpe(counts, { vocabSize: 300 });
    expect(r.vocab.merges).toEqual(['u g', 'u n', 'h ug', 'p un', 'p ug', 'hug s', 'b un']);
    expect(r.stoppedEarly).toBe(true);
    expect(r.vocab.tokens.slice(256)).toEqual(['ug', 'un', 'hug', 'pun', 'pug', 'hugs', 'bun', '<|endoftext|>', '<|pad|>']);
    expect(r.vocab.tokenTypes.slice(-3)).toEqual([TokenType.Normal, TokenType.Control, TokenType.Control]);
    expect(r.vocab.bos).toBe(263);
    expect(r.vocab.eos).toBe(263);
    expect(r.vocab.pad).toBe(264);
    expect(r.vocab.tokens.slice(0, 256)).toEqual(BYTE_TO_UNICODE);
    // Stops at the vocabulary size: 256 bytes + 3 merges + 2 specials.
    expect(trainBpe(counts, { vocabSize: 261 }).vocab.merges).toEqual(['u g', 'u n', 'h ug']);
  });

  it('counts overlapping pairs of repeated symbols correctly', () => {
    // aaaa x3 and aaa x1: a+a occurs 3*3 + 2 = 11 times. After a+a: aa aa (x3), aa a (x1).
    const counts = new Map([
      ['aaaa', 3],
      ['aaa', 1],
    ]);
    expect(trainBpe(counts, { vocabSize: 300 }).vocab.merges).toEqual(['a a', 'aa aa']);
    expect(trainBpe(counts, { vocabSize: 300, minPairCount: 1 }).vocab.merges).toEqual(['a a', 'aa aa', 'aa a']);
  });

  it('uses GPT-2 byte characters for non-ASCII text and spaces', () => {
    const r = trainBpe(['café café café', ' über über'], { vocabSize: 270 });
    // Pre-tokens: "café" 1, " café" 2, " über" 2. Four pairs occur 3 times (c-a, a-f, f-C3, C3-A9):
    // the smallest (left, right) ids go first, so a+f (97) before c+a (99); é is C3 A9 = "Ã©".
    expect(r.vocab.merges.slice(0, 5)).toEqual(['a f', 'c af', 'Ã ©', 'caf Ã©', 'Ġ Ã']);
    expect(r.vocab.tokens).toContain('ĠcafÃ©');
    expect(r.vocab.tokens).toContain('ĠÃ¼ber');
    expect(BYTE_TO_UNICODE[0x20]).toBe('Ġ');
    expect(BYTE_TO_UNICODE[0x0a]).toBe('Ċ');
  });

  it('matches a naive trainer (full recount every merge) on real text', () => {
    const { corpora } = loadCorpora(['novel', 'code'], { capMB: 0.05 });
    const counter = new PreTokenCounter('smollm');
    for (const c of corpora) for (const d of c.train) counter.add(d.text.slice(0, 4000));
    const r = trainBpe(counter, { vocabSize: 256 + 2 + 150 });
    expect(r.vocab.merges).toEqual(naiveMerges(counter.counts, r.merges));
  });

  it('rejects bad options', () => {
    expect(() => trainBpe(new Map(), { vocabSize: 100 })).toThrow(RangeError);
    expect(() => trainBpe(new Map(), { vocabSize: 40000 })).toThrow(/vocabSize/);
  });
});

describe('pre-tokenizer', () => {
  it('splits digits one by one (smollm) and keeps the GPT-2 rules otherwise', () => {
    expect(preTokenize("I'll pay 1234 in 2024,  ok\n\n  x", 'smollm')).toEqual([
      'I', "'ll", ' pay', ' ', '1', '2', '3', '4', ' in', ' ', '2', '0', '2', '4', ',', ' ', ' ok', '\n\n ', ' x',
    ]);
    expect(preTokenize("I'll pay 1234 in 2024,  ok\n\n  x", 'gpt2')).toEqual([
      'I', "'ll", ' pay', ' 1234', ' in', ' 2024', ',', ' ', ' ok', '\n\n ', ' x',
    ]);
    expect(preTokenize('a  7', 'smollm')).toEqual(['a', '  ', '7']);
  });
});

// ---------------------------------------------------------------------------------------------

const EDGE_CASES = [
  '',
  ' ',
  '\n',
  'Hello world',
  "  leading spaces, trailing spaces   \n\n\tTabs\tand\r\nCRLF\r\n",
  "they're we've I'M it'S 'll 'd",
  'def f(x):\n    return x**2  # 3.14159e-10\n\n\n',
  'SELECT id, name FROM users WHERE id = 42;',
  'price: $1,234.56 on 2024-03-01 at 10:30',
  'café naïve über 東京 مرحبا 😀👍🏽 ℕ ½ Ⅻ',
  'nbsp\u00a0here\u3000ideographic\u2028line\u0085nel\ufeffbom',
  'lone \ud800 surrogate',
  '<|endoftext|> is plain text unless special',
  '\u0000\u0001 control',
  '1' + '0'.repeat(50),
  ' '.repeat(40) + 'x',
];

describe('trained vocabulary with the native tokenizer', () => {
  let corpora: DomainCorpus[];
  let trained: TrainBpeResult;
  let native: Tokenizer;
  let reference: ReferenceBpeEncoder;

  beforeAll(() => {
    ({ corpora } = loadCorpora(undefined, { capMB: 0.15 }));
    const counter = new PreTokenCounter('smollm');
    for (const c of corpora) for (const d of c.train) counter.add(d.text);
    trained = trainBpe(counter, { vocabSize: 1024 });
    native = Tokenizer.fromVocab(trained.vocab);
    reference = new ReferenceBpeEncoder(trained.vocab);
  });

  it('has the requested size and well-formed entries', () => {
    expect(native.vocabSize).toBe(1024);
    expect(native.model).toBe('gpt2');
    expect(native.pre).toBe('smollm');
    expect(native.bos).toBe(1022);
    expect(native.eos).toBe(1022);
    expect(native.pad).toBe(1023);
    expect(native.tokenText(native.eos)).toBe('<|endoftext|>');
    expect(new Set(trained.vocab.tokens).size).toBe(trained.vocab.tokens.length);
  });

  it('encodes every domain held-out sample exactly as the JS reference, and decodes back', () => {
    expect(corpora.length).toBeGreaterThanOrEqual(4);
    for (const c of corpora) {
      for (const d of c.heldOut.slice(0, 3)) {
        const text = d.text.slice(0, 6000);
        const ids = native.encode(text, { addBos: false });
        expect(Array.from(ids), `${c.domain}/${d.id}`).toEqual(reference.encode(text));
        expect(native.decode(ids)).toBe(text);
      }
      // Compression is real: fewer tokens than bytes on held-out text.
      const sample = c.heldOut.map((d) => d.text).join('\n').slice(0, 20000);
      expect(native.encode(sample, { addBos: false }).length, c.domain).toBeLessThan(Buffer.byteLength(sample) / 1.5);
    }
  });

  it('agrees with the reference on edge cases and round-trips them', () => {
    for (const s of EDGE_CASES) {
      const ids = native.encode(s, { addBos: false });
      expect(Array.from(ids), JSON.stringify(s)).toEqual(reference.encode(s));
      expect(native.decode(ids), JSON.stringify(s)).toBe(s.replace(/\ud800/, '\ufffd'));
    }
    // BOS by default; <|endoftext|> recognised only when asked.
    expect(native.encode('hi')[0]).toBe(native.bos);
    expect(Array.from(native.encode('<|endoftext|>', { addBos: false, special: true }))).toEqual([native.eos]);
  });

  it('matches the native gpt-2 pre-tokenizer too', () => {
    const counter = new PreTokenCounter('gpt2');
    for (const c of corpora) for (const d of c.train.slice(0, 5)) counter.add(d.text);
    const vocab = trainBpe(counter, { vocabSize: 600 }).vocab;
    expect(vocab.pre).toBe('gpt-2');
    const tok = Tokenizer.fromVocab(vocab);
    const ref = new ReferenceBpeEncoder(vocab);
    const texts = [...EDGE_CASES, ...corpora.map((c) => c.heldOut[0]!.text.slice(0, 3000))];
    for (const s of texts) expect(Array.from(tok.encode(s, { addBos: false })), JSON.stringify(s.slice(0, 40))).toEqual(ref.encode(s));
  });

  it('writes a vocabulary-only GGUF that loadTokenizer reads back identically', async () => {
    const path = join(tmp, 'tokenizer.gguf');
    writeTokenizerGguf(path, trained.vocab);
    const loaded = await loadTokenizer(path);
    expect(loaded.vocabSize).toBe(native.vocabSize);
    expect([loaded.model, loaded.pre, loaded.bos, loaded.eos, loaded.pad, loaded.addBos]).toEqual(['gpt2', 'smollm', 1022, 1022, 1023, true]);
    for (const c of corpora) {
      const text = c.heldOut[0]!.text.slice(0, 4000);
      expect(Array.from(loaded.encode(text)), c.domain).toEqual(Array.from(native.encode(text)));
    }
    for (const s of EDGE_CASES) expect(Array.from(loaded.encode(s))).toEqual(Array.from(native.encode(s)));
    const meta = readGgufMetadata(path);
    expect(meta.metadata['tokenizer.ggml.tokens']).toEqual(trained.vocab.tokens);
    expect(meta.metadata['tokenizer.ggml.merges']).toEqual(trained.vocab.merges);
    expect(meta.types['tokenizer.ggml.token_type']).toBe('array[int32]');
    expect(meta.types['tokenizer.ggml.bos_token_id']).toBe('uint32');
    expect(meta.metadata['general.architecture']).toBe('llama');
    expect(meta.tensors).toEqual([]);
    expect(vocabToGgufMetadata(trained.vocab).map((e) => e.key)).toContain('tokenizer.ggml.padding_token_id');
  });
});

describe('writeGguf / readGgufMetadata', () => {
  it('round-trips every metadata type and tensors', () => {
    const path = join(tmp, 'all.gguf');
    const w = Float32Array.from({ length: 6 }, (_, i) => i * 0.5 - 1);
    writeGguf(path, {
      metadata: [
        { key: 'a.string', type: 'string', value: 'héllo' },
        { key: 'a.u32', type: 'u32', value: 4294967295 },
        { key: 'a.i32', type: 'i32', value: -7 },
        { key: 'a.f32', type: 'f32', value: 0.25 },
        { key: 'a.bool', type: 'bool', value: true },
        { key: 'a.u64', type: 'u64', value: 2n ** 63n },
        { key: 'a.u64small', type: 'u64', value: 12 },
        { key: 'a.f64', type: 'f64', value: Math.PI },
        { key: 'a.strings', type: 'string[]', value: ['x', '', 'z z'] },
        { key: 'a.floats', type: 'f32[]', value: new Float32Array([1.5, -2]) },
        { key: 'a.ints', type: 'i32[]', value: [3, -4, 5] },
        { key: 'a.empty', type: 'i32[]', value: [] },
      ],
      tensors: [
        { name: 'w', type: 'F32', dims: [3, 2], data: w },
        { name: 'h', type: 'F16', dims: [6], data: w },
        { name: 'b', type: 'BF16', dims: [2, 1, 3], data: w },
      ],
    });
    const m = readGgufMetadata(path);
    expect(m.version).toBe(3);
    expect(m.metadata).toEqual({
      'a.string': 'héllo',
      'a.u32': 4294967295,
      'a.i32': -7,
      'a.f32': 0.25,
      'a.bool': true,
      'a.u64': 2n ** 63n,
      'a.u64small': 12,
      'a.f64': Math.PI,
      'a.strings': ['x', '', 'z z'],
      'a.floats': [1.5, -2],
      'a.ints': [3, -4, 5],
      'a.empty': [],
    });
    expect(m.types['a.u64']).toBe('uint64');
    expect(m.types['a.strings']).toBe('array[string]');
    expect(m.tensors.map((t) => [t.name, t.type, t.dims, t.nBytes])).toEqual([
      ['w', 'F32', [3, 2], 24],
      ['h', 'F16', [6], 12],
      ['b', 'BF16', [2, 1, 3], 12],
    ]);
    expect(readGgufMetadata(path, { maxArrayLength: 2 }).metadata['a.strings']).toEqual({ skipped: 'array[string]', length: 3 });
  });

  it('names the bad argument', () => {
    const path = join(tmp, 'bad.gguf');
    const ok = { key: 'k', type: 'u32', value: 1 } as const;
    const bad = (spec: unknown) => () => writeGguf(path, spec as never);
    expect(bad(undefined)).toThrow(TypeError);
    expect(bad({})).toThrow(/spec\.metadata/);
    expect(bad({ metadata: [ok, { key: 'x', type: 'u32', value: -1 }] })).toThrow(/spec\.metadata\[1\]\.value/);
    expect(bad({ metadata: [{ key: 'x', type: 'u32', value: -1 }] })).toThrow(RangeError);
    expect(bad({ metadata: [{ key: 'x', type: 'string', value: 3 }] })).toThrow(TypeError);
    expect(bad({ metadata: [{ key: 'x', type: 'u16', value: 3 }] })).toThrow(/spec\.metadata\[0\]\.type/);
    expect(bad({ metadata: [ok, ok] })).toThrow(/appears twice/);
    expect(bad({ metadata: [{ key: 'x', type: 'string[]', value: ['a', 1] }] })).toThrow(/spec\.metadata\[0\]\.value\[1\]/);
    expect(bad({ metadata: [], tensors: [{ name: 't', type: 'Q8_0', dims: [1], data: new Float32Array(1) }] })).toThrow(/spec\.tensors\[0\]\.type/);
    expect(bad({ metadata: [], tensors: [{ name: 't', type: 'F32', dims: [2, 2], data: new Float32Array(3) }] })).toThrow(/spec\.tensors\[0\]\.data/);
    expect(bad({ metadata: [], tensors: [{ name: 't', type: 'F32', dims: [0], data: new Float32Array(0) }] })).toThrow(/spec\.tensors\[0\]\.dims\[0\]/);
    expect(bad({ metadata: [], tensors: [{ name: 't', type: 'F32', dims: [1], data: [1] }] })).toThrow(/Float32Array/);
    expect(() => writeGguf(42 as never, { metadata: [] })).toThrow(/path/);
    expect(() => readGgufMetadata(join(tmp, 'missing.gguf'))).toThrow(/missing\.gguf/);
  });
});
