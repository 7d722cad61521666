// The project's own byte-level BPE trainer, producing a "gpt2"-model vocabulary that the native
// tokenizer (native/tokenizer) reads from a plain VocabData or from a GGUF file's
// tokenizer.ggml.* keys.
//
// Pre-tokenizer: "smollm" by default (every digit on its own, then the GPT-2 pattern), the one
// the native tokenizer implements for SmolLM/StarCoder. With a vocabulary of a few thousand
// tokens, GPT-2's ` ?\p{N}+` would spend hundreds of entries on number fragments ("199", " 20")
// that code, SQL and dates use inconsistently; single digits keep numbers compositional and leave
// the budget for words and code idioms. The rest of the GPT-2 pattern (contractions, a leading
// space glued to a word, whitespace runs kept whole except the last space) suits both prose and
// indented code. `preTokenize` below is the same rule as a JavaScript regular expression; the
// tests check that the native tokenizer and the reference encoder here agree token for token.
//
// Training: count the unique pre-tokens, then merge greedily the most frequent adjacent pair
// (ties: the pair with the smaller (left id, right id)), updating pair counts incrementally from
// the words that contain the merged pair only, with a lazy max-heap of pair counts. Pairs that
// occur fewer than `minPairCount` times are not merged.
//
// This file also holds the typed wrappers of the native GGUF writer/reader (writeGguf,
// readGgufMetadata) and the tokenizer-to-GGUF glue.
import { addon } from '../addon.js';
import { Tokenizer, TokenType, type VocabData } from '../Tokenizer.js';

// ---------------------------------------------------------------------------------------------
// GPT-2's byte <-> printable code point map

function buildByteMap(): string[] {
  const printable: number[] = [];
  for (let b = 0x21; b <= 0x7e; b++) printable.push(b);
  for (let b = 0xa1; b <= 0xac; b++) printable.push(b);
  for (let b = 0xae; b <= 0xff; b++) printable.push(b);
  const out = new Array<string>(256);
  let n = 0;
  for (let b = 0; b < 256; b++) out[b] = String.fromCodePoint(printable.includes(b) ? b : 256 + n++);
  return out;
}

/** BYTE_TO_UNICODE[b] is the one-character string that stands for byte b in a token. */
export const BYTE_TO_UNICODE: readonly string[] = buildByteMap();
const UNICODE_TO_BYTE = new Map<string, number>(BYTE_TO_UNICODE.map((s, b) => [s, b]));

/** A byte-level token text back to its bytes (throws on a character outside the map). */
export function tokenTextToBytes(text: string): Uint8Array {
  const out: number[] = [];
  for (const ch of text) {
    const b = UNICODE_TO_BYTE.get(ch);
    if (b === undefined) throw new RangeError(`token text ${JSON.stringify(text)} has a character outside GPT-2's byte map`);
    out.push(b);
  }
  return Uint8Array.from(out);
}

function bytesToTokenText(bytes: Uint8Array): string {
  let s = '';
  for (const b of bytes) s += BYTE_TO_UNICODE[b];
  return s;
}

// ---------------------------------------------------------------------------------------------
// Pre-tokenizers (the native tokenizer's Gpt2 and Smollm, as regular expressions)

export type PreTokenizerName = 'smollm' | 'gpt2';

// Unicode White_Space, the \s of llama.cpp and of native/tokenizer (JavaScript's \s differs:
// it has U+FEFF and lacks U+0085).
const WS = '\\t-\\r \\x85\\xA0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000';
const CONTRACTIONS = "'s|'t|'re|'ve|'m|'ll|'d";
// GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
const GPT2_SOURCE = `${CONTRACTIONS}| ?\\p{L}+| ?\\p{N}+| ?[^${WS}\\p{L}\\p{N}]+|[${WS}]+(?![^${WS}])|[${WS}]+`;
// SmolLM: first \p{N} splits every digit out, then GPT-2 runs inside each piece. As one regex:
// a digit is always its own word (so no " 5"), and a whitespace run directly before a digit ends
// its piece, so it is kept whole (the lookahead treats a digit like the end of the text).
const SMOLLM_SOURCE = `${CONTRACTIONS}| ?\\p{L}+|\\p{N}| ?[^${WS}\\p{L}\\p{N}]+|[${WS}]+(?![^${WS}\\p{N}])|[${WS}]+`;

function preTokenizerRegex(pre: PreTokenizerName): RegExp {
  if (pre === 'smollm') return new RegExp(SMOLLM_SOURCE, 'gu');
  if (pre === 'gpt2') return new RegExp(GPT2_SOURCE, 'gu');
  throw new RangeError(`pre must be 'smollm' or 'gpt2', got ${String(pre)}`);
}

/** The name stored in tokenizer.ggml.pre for a pre-tokenizer. */
function preTokenizerGgufName(pre: PreTokenizerName): string {
  return pre === 'gpt2' ? 'gpt-2' : 'smollm';
}

/** Splits text into pre-tokens (words) exactly as the native tokenizer's pre-tokenizer does. */
export function preTokenize(text: string, pre: PreTokenizerName = 'smollm'): string[] {
  const re = preTokenizerRegex(pre);
  const out: string[] = [];
  for (let m = re.exec(text); m !== null; m = re.exec(text)) out.push(m[0]);
  return out;
}

/** Counts pre-tokens over many texts; feed it documents one by one, then hand it to trainBpe. */
export class PreTokenCounter {
  readonly counts = new Map<string, number>();
  readonly re: RegExp;
  totalWords = 0;
  totalBytes = 0;

  constructor(readonly pre: PreTokenizerName = 'smollm') {
    this.re = preTokenizerRegex(pre);
  }

  add(text: string): void {
    const re = this.re;
    const counts = this.counts;
    re.lastIndex = 0;
    let n = 0;
    for (let m = re.exec(text); m !== null; m = re.exec(text)) {
      const w = m[0];
      counts.set(w, (counts.get(w) ?? 0) + 1);
      n++;
    }
    this.totalWords += n;
    this.totalBytes += Buffer.byteLength(text, 'utf8');
  }
}

// ---------------------------------------------------------------------------------------------
// Trainer

export interface TrainBpeOptions {
  /** Total vocabulary size: 256 byte tokens + merged tokens + special tokens. Default 4096. */
  vocabSize?: number;
  /** Pre-tokenizer. Default 'smollm'. */
  pre?: PreTokenizerName;
  /**
   * Control tokens appended after the merged tokens. Default ['<|endoftext|>', '<|pad|>']: the
   * first is BOS and EOS (the document separator), the second is the padding token.
   */
  specialTokens?: string[];
  /** Index in specialTokens of BOS/EOS and of padding (-1: none). Defaults 0 and 1. */
  bosEosIndex?: number;
  padIndex?: number;
  /** Whether encode() adds BOS by default (tokenizer.ggml.add_bos_token). Default true. */
  addBos?: boolean;
  /** Stop when the most frequent pair occurs fewer times. Default 2. */
  minPairCount?: number;
  /** Called every `progressEvery` merges and at the end. */
  onProgress?: (p: { merges: number; vocab: number; target: number; topCount: number }) => void;
  progressEvery?: number;
}

export interface TrainBpeResult {
  vocab: VocabData & { tokens: string[]; merges: string[]; tokenTypes: number[] };
  /** Merges learned (can exceed the number of merged tokens when two merges make the same text). */
  merges: number;
  /** Unique pre-tokens trained on, and their total count. */
  uniqueWords: number;
  totalWords: number;
  /** Seconds spent in the merge loop. */
  mergeSeconds: number;
  /** True when training stopped at minPairCount before reaching vocabSize. */
  stoppedEarly: boolean;
}

/** Max-heap of (count, pair key), larger count first, then smaller key. */
class PairHeap {
  private counts: number[] = [];
  private keys: number[] = [];

  get size(): number {
    return this.counts.length;
  }

  private above(i: number, j: number): boolean {
    const ci = this.counts[i]!;
    const cj = this.counts[j]!;
    return ci > cj || (ci === cj && this.keys[i]! < this.keys[j]!);
  }

  private swap(i: number, j: number): void {
    const c = this.counts[i]!;
    this.counts[i] = this.counts[j]!;
    this.counts[j] = c;
    const k = this.keys[i]!;
    this.keys[i] = this.keys[j]!;
    this.keys[j] = k;
  }

  push(count: number, key: number): void {
    this.counts.push(count);
    this.keys.push(key);
    let i = this.counts.length - 1;
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if (!this.above(i, parent)) break;
      this.swap(i, parent);
      i = parent;
    }
  }

  /** Removes the top; returns [count, key]. */
  pop(): [number, number] {
    const top: [number, number] = [this.counts[0]!, this.keys[0]!];
    const lastC = this.counts.pop()!;
    const lastK = this.keys.pop()!;
    const n = this.counts.length;
    if (n > 0) {
      this.counts[0] = lastC;
      this.keys[0] = lastK;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let best = i;
        if (l < n && this.above(l, best)) best = l;
        if (r < n && this.above(r, best)) best = r;
        if (best === i) break;
        this.swap(i, best);
        i = best;
      }
    }
    return top;
  }
}

/** Token ids stay below this, so a pair key a * KEY_BASE + b stays a small integer (a V8 Smi). */
const KEY_BASE = 32768;

/**
 * Learns a byte-level BPE vocabulary from pre-token counts (a {@link PreTokenCounter}, or a map
 * word -> count) or from texts.
 */
export function trainBpe(input: PreTokenCounter | Map<string, number> | Iterable<string>, options: TrainBpeOptions = {}): TrainBpeResult {
  const {
    vocabSize = 4096,
    specialTokens = ['<|endoftext|>', '<|pad|>'],
    bosEosIndex = 0,
    padIndex = specialTokens.length > 1 ? 1 : -1,
    addBos = true,
    minPairCount = 2,
    onProgress,
    progressEvery = 256,
  } = options;
  let pre: PreTokenizerName = options.pre ?? 'smollm';
  if (!Number.isInteger(vocabSize) || vocabSize < 256 + specialTokens.length || vocabSize > KEY_BASE)
    throw new RangeError(`vocabSize must be an integer in [${256 + specialTokens.length}, ${KEY_BASE}], got ${vocabSize}`);
  if (!(minPairCount >= 1)) throw new RangeError(`minPairCount must be >= 1, got ${minPairCount}`);
  for (const [i, s] of specialTokens.entries())
    if (typeof s !== 'string' || s.length === 0) throw new TypeError(`specialTokens[${i}] must be a non-empty string`);
  if (bosEosIndex >= specialTokens.length || padIndex >= specialTokens.length)
    throw new RangeError('bosEosIndex and padIndex must index specialTokens (or be -1)');

  let counts: Map<string, number>;
  if (input instanceof PreTokenCounter) {
    counts = input.counts;
    if (options.pre !== undefined && options.pre !== input.pre)
      throw new RangeError(`options.pre '${options.pre}' differs from the counter's '${input.pre}'`);
    pre = input.pre;
  } else if (input instanceof Map) {
    counts = input;
  } else {
    const c = new PreTokenCounter(pre);
    for (const t of input) c.add(t);
    counts = c.counts;
  }

  // Words as byte sequences in one buffer; single bytes have no pairs and are left out. The word
  // order is the map's insertion order, which only affects speed, never the result.
  const encoder = new TextEncoder();
  let totalSymbols = 0;
  const wordBytes: Uint8Array[] = [];
  const freqList: number[] = [];
  let totalWords = 0;
  for (const [w, f] of counts) {
    totalWords += f;
    const bytes = encoder.encode(w);
    if (bytes.length < 2) continue;
    wordBytes.push(bytes);
    freqList.push(f);
    totalSymbols += bytes.length;
  }
  const nWords = wordBytes.length;
  const sym = new Int32Array(totalSymbols);
  const wordStart = new Int32Array(nWords);
  const wordLen = new Int32Array(nWords);
  const freq = Float64Array.from(freqList);
  {
    let at = 0;
    for (let w = 0; w < nWords; w++) {
      const b = wordBytes[w]!;
      wordStart[w] = at;
      wordLen[w] = b.length;
      sym.set(b, at);
      at += b.length;
    }
  }
  wordBytes.length = 0;

  // Pair counts and, for each pair, the words it may occur in (appended on creation; stale
  // entries are harmless: the merge finds nothing there).
  const pairCount = new Map<number, number>();
  const pairWords = new Map<number, number[]>();
  const addWord = (key: number, w: number): void => {
    let list = pairWords.get(key);
    if (list === undefined) pairWords.set(key, (list = []));
    if (list.length === 0 || list[list.length - 1] !== w) list.push(w);
  };
  for (let w = 0; w < nWords; w++) {
    const s = wordStart[w]!;
    const e = s + wordLen[w]!;
    const f = freq[w]!;
    for (let i = s; i + 1 < e; i++) {
      const key = sym[i]! * KEY_BASE + sym[i + 1]!;
      pairCount.set(key, (pairCount.get(key) ?? 0) + f);
      addWord(key, w);
    }
  }
  const heap = new PairHeap();
  for (const [key, c] of pairCount) heap.push(c, key);

  const tokens: string[] = [...BYTE_TO_UNICODE];
  const tokenId = new Map<string, number>(tokens.map((t, i) => [t, i]));
  const merges: string[] = [];
  const target = vocabSize - specialTokens.length;
  const stamp = new Int32Array(nWords).fill(-1);
  const touched: number[] = [];
  const t0 = performance.now();
  let stoppedEarly = false;
  let lastTop = 0;

  const dec = (key: number, f: number): void => {
    const c = (pairCount.get(key) ?? 0) - f;
    if (c > 0) pairCount.set(key, c);
    else pairCount.delete(key);
  };
  const inc = (key: number, f: number, w: number): void => {
    pairCount.set(key, (pairCount.get(key) ?? 0) + f);
    addWord(key, w);
    touched.push(key);
  };

  while (tokens.length < target) {
    if (heap.size === 0) {
      stoppedEarly = true;
      break;
    }
    const [count, key] = heap.pop();
    const current = pairCount.get(key) ?? 0;
    if (current !== count) {
      if (current > 0) heap.push(current, key); // stale entry: requeue with the true count
      continue;
    }
    if (count < minPairCount) {
      stoppedEarly = true;
      break;
    }
    lastTop = count;
    const a = Math.floor(key / KEY_BASE);
    const b = key % KEY_BASE;
    const text = tokens[a]! + tokens[b]!;
    let c = tokenId.get(text);
    if (c === undefined) {
      c = tokens.length;
      tokens.push(text);
      tokenId.set(text, c);
    }
    const m = merges.length;
    merges.push(`${tokens[a]} ${tokens[b]}`);

    touched.length = 0;
    for (const w of pairWords.get(key) ?? []) {
      if (stamp[w] === m) continue;
      stamp[w] = m;
      const s = wordStart[w]!;
      const end = s + wordLen[w]!;
      const f = freq[w]!;
      let i = s;
      let j = s;
      while (i < end) {
        if (sym[i] === a && i + 1 < end && sym[i + 1] === b) {
          if (j > s) {
            const prev = sym[j - 1]!;
            dec(prev * KEY_BASE + a, f);
            inc(prev * KEY_BASE + c, f, w);
          }
          if (i + 2 < end) {
            const next = sym[i + 2]!;
            dec(b * KEY_BASE + next, f);
            inc(c * KEY_BASE + next, f, w);
          }
          sym[j++] = c;
          i += 2;
        } else {
          sym[j++] = sym[i++]!;
        }
      }
      wordLen[w] = j - s;
    }
    pairCount.delete(key);
    pairWords.delete(key);
    // Pairs whose count grew get a fresh heap entry (their old entries are now stale).
    touched.sort((x, y) => x - y);
    for (let t = 0; t < touched.length; t++) {
      const k = touched[t]!;
      if (t > 0 && touched[t - 1] === k) continue;
      const cnt = pairCount.get(k);
      if (cnt !== undefined && cnt > 0) heap.push(cnt, k);
    }
    if (onProgress && merges.length % progressEvery === 0)
      onProgress({ merges: merges.length, vocab: tokens.length + specialTokens.length, target: vocabSize, topCount: count });
  }
  const mergeSeconds = (performance.now() - t0) / 1000;

  const nNormal = tokens.length;
  const tokenTypes: number[] = new Array<number>(nNormal).fill(TokenType.Normal);
  for (const s of specialTokens) {
    if (tokenId.has(s)) throw new RangeError(`special token ${JSON.stringify(s)} is also a learned token`);
    tokens.push(s);
    tokenTypes.push(TokenType.Control);
  }
  const bosEos = bosEosIndex >= 0 ? nNormal + bosEosIndex : -1;
  const vocab: TrainBpeResult['vocab'] = {
    model: 'gpt2',
    pre: preTokenizerGgufName(pre),
    tokens,
    tokenTypes,
    merges,
    bos: bosEos,
    eos: bosEos,
    pad: padIndex >= 0 ? nNormal + padIndex : -1,
    addBos,
    addEos: false,
  };
  onProgress?.({ merges: merges.length, vocab: tokens.length, target: vocabSize, topCount: lastTop });
  return { vocab, merges: merges.length, uniqueWords: counts.size, totalWords, mergeSeconds, stoppedEarly };
}

// ---------------------------------------------------------------------------------------------
// A reference encoder in plain JavaScript (for tests; the native tokenizer is the fast one)

/**
 * llama.cpp's byte-level BPE, written plainly: pre-tokenize, map bytes to GPT-2 characters, then
 * repeatedly merge the adjacent pair with the lowest merge rank (leftmost on ties).
 */
export class ReferenceBpeEncoder {
  private readonly rank = new Map<string, number>();
  private readonly ids = new Map<string, number>();
  private readonly cache = new Map<string, number[]>();
  private readonly pre: PreTokenizerName;

  constructor(vocab: VocabData) {
    if (vocab.model !== 'gpt2') throw new RangeError(`ReferenceBpeEncoder needs a 'gpt2' vocabulary, got '${vocab.model}'`);
    const p = vocab.pre ?? '';
    if (p === 'smollm') this.pre = 'smollm';
    else if (p === '' || p === 'default' || p === 'gpt-2' || p === 'gpt2') this.pre = 'gpt2';
    else throw new RangeError(`ReferenceBpeEncoder supports the smollm and gpt-2 pre-tokenizers, not '${p}'`);
    (vocab.merges ?? []).forEach((m, i) => {
      if (!this.rank.has(m)) this.rank.set(m, i);
    });
    vocab.tokens.forEach((t, i) => {
      const type = vocab.tokenTypes?.[i] ?? TokenType.Normal;
      if (type === TokenType.Normal) this.ids.set(t, i);
    });
  }

  encodeWord(word: string): number[] {
    const hit = this.cache.get(word);
    if (hit) return hit;
    const syms = [...bytesToTokenText(new TextEncoder().encode(word))];
    for (;;) {
      let best = -1;
      let bestRank = Infinity;
      for (let i = 0; i + 1 < syms.length; i++) {
        const r = this.rank.get(`${syms[i]} ${syms[i + 1]}`);
        if (r !== undefined && r < bestRank) {
          bestRank = r;
          best = i;
        }
      }
      if (best < 0) break;
      syms.splice(best, 2, syms[best]! + syms[best + 1]!);
    }
    const out = syms.map((s) => {
      const id = this.ids.get(s);
      if (id === undefined) throw new RangeError(`merged symbol ${JSON.stringify(s)} is not in the vocabulary`);
      return id;
    });
    this.cache.set(word, out);
    return out;
  }

  encode(text: string): number[] {
    const out: number[] = [];
    for (const w of preTokenize(text, this.pre)) out.push(...this.encodeWord(w));
    return out;
  }
}

// ---------------------------------------------------------------------------------------------
// GGUF files (native gguf_napi.cpp). These are generic; they sit here until a lib/gguf.ts exists.

export type GgufMetadataType = 'string' | 'u32' | 'i32' | 'f32' | 'bool' | 'u64' | 'f64' | 'string[]' | 'f32[]' | 'i32[]';

export type GgufMetadataEntry =
  | { key: string; type: 'string'; value: string }
  | { key: string; type: 'u32' | 'i32' | 'f32' | 'f64'; value: number }
  | { key: string; type: 'u64'; value: number | bigint }
  | { key: string; type: 'bool'; value: boolean }
  | { key: string; type: 'string[]'; value: string[] }
  | { key: string; type: 'f32[]'; value: Float32Array | number[] }
  | { key: string; type: 'i32[]'; value: Int32Array | number[] };

export interface GgufTensorInput {
  name: string;
  /** Stored type; the data is converted from f32 (round to nearest even). */
  type: 'F32' | 'F16' | 'BF16';
  /** ggml order: dims[0] varies fastest (a [rows x cols] row-major matrix is [cols, rows]). */
  dims: number[];
  data: Float32Array;
}

export interface GgufSpec {
  metadata: GgufMetadataEntry[];
  tensors?: GgufTensorInput[];
}

export type GgufValue = string | number | bigint | boolean | GgufValue[] | { skipped: string; length: number };

export interface GgufMetadata {
  version: number;
  alignment: number;
  metadata: Record<string, GgufValue>;
  /** The stored type of each key: "uint32", "array[string]", ... */
  types: Record<string, string>;
  tensors: Array<{ name: string; type: string; dims: number[]; offset: number; nBytes: number }>;
}

interface NativeGguf {
  writeGguf(path: string, spec: GgufSpec): void;
  readGgufMetadata(path: string, options?: { maxArrayLength?: number }): GgufMetadata;
}

function nativeGguf(): NativeGguf {
  const n = addon as unknown as Partial<NativeGguf>;
  if (typeof n.writeGguf !== 'function' || typeof n.readGgufMetadata !== 'function')
    throw new Error('the native addon has no GGUF writer (native/napi/gguf_napi.cpp): rebuild it with `npm run build:addon`');
  return n as NativeGguf;
}

/** Writes a GGUF v3 file atomically (temp file + rename), synchronously. */
export function writeGguf(path: string, spec: GgufSpec): void {
  nativeGguf().writeGguf(path, spec);
}

/** Reads the metadata and tensor table of a GGUF file (arrays longer than maxArrayLength are skipped). */
export function readGgufMetadata(path: string, options?: { maxArrayLength?: number }): GgufMetadata {
  return nativeGguf().readGgufMetadata(path, options);
}

/** The tokenizer.ggml.* entries of a vocabulary, as llama.cpp writes them. */
export function vocabToGgufMetadata(vocab: VocabData): GgufMetadataEntry[] {
  const out: GgufMetadataEntry[] = [{ key: 'tokenizer.ggml.model', type: 'string', value: vocab.model }];
  if (vocab.pre) out.push({ key: 'tokenizer.ggml.pre', type: 'string', value: vocab.pre });
  out.push({ key: 'tokenizer.ggml.tokens', type: 'string[]', value: vocab.tokens });
  if (vocab.scores) out.push({ key: 'tokenizer.ggml.scores', type: 'f32[]', value: Array.from(vocab.scores) });
  if (vocab.tokenTypes) out.push({ key: 'tokenizer.ggml.token_type', type: 'i32[]', value: Array.from(vocab.tokenTypes) });
  if (vocab.merges) out.push({ key: 'tokenizer.ggml.merges', type: 'string[]', value: vocab.merges });
  const id = (key: string, v: number | undefined): void => {
    if (v !== undefined && v >= 0) out.push({ key, type: 'u32', value: v });
  };
  id('tokenizer.ggml.bos_token_id', vocab.bos);
  id('tokenizer.ggml.eos_token_id', vocab.eos);
  id('tokenizer.ggml.unknown_token_id', vocab.unk);
  id('tokenizer.ggml.padding_token_id', vocab.pad);
  if (vocab.addBos !== undefined) out.push({ key: 'tokenizer.ggml.add_bos_token', type: 'bool', value: vocab.addBos });
  if (vocab.addEos !== undefined) out.push({ key: 'tokenizer.ggml.add_eos_token', type: 'bool', value: vocab.addEos });
  if (vocab.model === 'llama' && vocab.addSpacePrefix !== undefined)
    out.push({ key: 'tokenizer.ggml.add_space_prefix', type: 'bool', value: vocab.addSpacePrefix });
  return out;
}

/** Writes a vocabulary-only GGUF (general.* + tokenizer.ggml.*), loadable with loadTokenizer(). */
export function writeTokenizerGguf(path: string, vocab: VocabData, options: { name?: string; architecture?: string } = {}): void {
  writeGguf(path, {
    metadata: [
      { key: 'general.architecture', type: 'string', value: options.architecture ?? 'llama' },
      { key: 'general.name', type: 'string', value: options.name ?? 'online-specdec tokenizer' },
      ...vocabToGgufMetadata(vocab),
    ],
  });
}

/** Builds the native tokenizer of a trained vocabulary. */
export function tokenizerFromTrained(result: TrainBpeResult): Tokenizer {
  return Tokenizer.fromVocab(result.vocab);
}
