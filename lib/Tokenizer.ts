// The tokenizer of a GGUF model (or of a vocabulary given directly): SentencePiece BPE for
// `tokenizer.ggml.model = "llama"`, byte-level BPE for `"gpt2"`, with llama.cpp's semantics.
// The work happens in the native addon; this file types it and checks arguments.
import { addon } from './addon.js';
import { checkKeys, checkOptions, shown } from './args.js';

/** Values of `tokenizer.ggml.token_type`. */
export const TokenType = {
  Undefined: 0,
  Normal: 1,
  Unknown: 2,
  Control: 3,
  UserDefined: 4,
  Unused: 5,
  Byte: 6,
} as const;
export type TokenType = (typeof TokenType)[keyof typeof TokenType];

/** A vocabulary, as stored under `tokenizer.ggml.*` in a GGUF file. */
export interface VocabData {
  /** "llama" (SentencePiece BPE) or "gpt2" (byte-level BPE). */
  model: 'llama' | 'gpt2';
  /** Pre-tokenizer of a "gpt2" vocabulary: default / gpt-2, llama3, qwen2, smollm (and aliases). */
  pre?: string;
  /** Token texts; the index is the id. */
  tokens: string[];
  /** Per-token scores (SentencePiece merge priority); default all 0. */
  scores?: Float32Array | number[];
  /** Per-token {@link TokenType} values; default all Normal. */
  tokenTypes?: Int32Array | number[];
  /** "left right" merges in rank order ("gpt2" only). */
  merges?: string[];
  /** Special token ids; -1 or absent means none. */
  bos?: number;
  eos?: number;
  unk?: number;
  pad?: number;
  /** What {@link Tokenizer.encode} adds by default. */
  addBos?: boolean;
  addEos?: boolean;
  /** "llama": put a space in front of the text (SentencePiece's dummy prefix). Default true. */
  addSpacePrefix?: boolean;
}

export interface EncodeOptions {
  /** Prepend the BOS token. Defaults to the vocabulary's `tokenizer.ggml.add_bos_token`. */
  addBos?: boolean;
  /** Append the EOS token. Defaults to false. */
  addEos?: boolean;
  /**
   * Recognise the texts of control tokens (such as `<|im_start|>` or `</s>`) and emit them as
   * single tokens. Otherwise they are tokenized as plain text. User-defined tokens are always
   * recognised, as in llama.cpp and Hugging Face tokenizers. Default false.
   */
  special?: boolean;
}

export interface DecodeOptions {
  /** Render control and unknown tokens (BOS, EOS, `<|im_end|>`, ...) as their text. Default false. */
  special?: boolean;
  /**
   * SentencePiece vocabularies: drop the dummy space that encoding put in front of the text, so
   * that `decode(encode(s))` is `s`. Default true; use false for generated continuations.
   */
  stripSpacePrefix?: boolean;
}

export interface StreamDecoderOptions {
  /** As in {@link DecodeOptions}. Default false. */
  special?: boolean;
  /** As in {@link DecodeOptions}, for a stream that starts at the beginning of a text. Default false. */
  stripSpacePrefix?: boolean;
}

/** Token ids: an Int32Array is passed through, other arrays are checked and copied. */
export type TokenIds = Int32Array | ArrayLike<number>;

interface NativeTokenizer {
  encode(text: string, addBos: boolean, special: boolean, addEos: boolean): Int32Array;
  decode(tokens: Int32Array, special: boolean, stripSpacePrefix: boolean): string;
  tokenToPiece(token: number, special: boolean): string;
  tokenToBytes(token: number, special: boolean): Uint8Array;
  tokenText(token: number): string;
  tokenType(token: number): number;
  findToken(text: string): number;
  readonly vocabSize: number;
  readonly bos: number;
  readonly eos: number;
  readonly unk: number;
  readonly pad: number;
  readonly addBos: boolean;
  readonly addEos: boolean;
  readonly addSpacePrefix: boolean;
  readonly model: string;
  readonly pre: string;
}

interface NativeStreamDecoder {
  push(tokens: Int32Array | number): string;
  flush(): string;
  readonly pendingBytes: number;
}

interface NativeTokenizerModule {
  Tokenizer: new (source: string | VocabData) => NativeTokenizer;
  TokenizerStreamDecoder: new (tokenizer: NativeTokenizer, special: boolean, stripSpacePrefix: boolean) => NativeStreamDecoder;
  loadTokenizer(path: string): Promise<NativeTokenizer>;
}

const native = addon as unknown as NativeTokenizerModule;

function toInt32Array(tokens: TokenIds, vocabSize: number, name = 'tokens'): Int32Array {
  if (tokens instanceof Int32Array) return tokens;
  if (tokens === null || typeof tokens !== 'object' || !Number.isSafeInteger(tokens.length) || tokens.length < 0 || tokens.length > 2 ** 32 - 1)
    throw new TypeError(`${name} must be an Int32Array or an array of token ids`);
  const out = new Int32Array(tokens.length);
  for (let i = 0; i < tokens.length; i++) {
    const id = tokens[i];
    if (typeof id !== 'number' || !Number.isInteger(id)) throw new TypeError(`${name}[${i}] must be an integer, got ${shown(id)}`);
    if (id < 0 || id >= vocabSize) throw new RangeError(`${name}[${i}] = ${id} is out of range for a vocabulary of ${vocabSize}`);
    out[i] = id;
  }
  return out;
}

/** The `special` option of tokenToPiece and tokenToBytes, checked (default true). */
function specialOption(options: { special?: boolean } | undefined): boolean {
  checkKeys(checkOptions(options) ?? {}, ['special']);
  if (options?.special !== undefined && typeof options.special !== 'boolean') throw new TypeError('options.special must be a boolean');
  return options?.special ?? true;
}

export class Tokenizer {
  readonly #native: NativeTokenizer;

  private constructor(nativeTokenizer: NativeTokenizer) {
    this.#native = nativeTokenizer;
  }

  /** Builds a tokenizer from a vocabulary in memory (for example one just trained). */
  static fromVocab(vocab: VocabData): Tokenizer {
    if (vocab === null || typeof vocab !== 'object') throw new TypeError('vocab must be an object');
    return new Tokenizer(new native.Tokenizer(vocab));
  }

  /** Reads the tokenizer of a GGUF file synchronously. Prefer {@link loadTokenizer}. */
  static loadSync(ggufPath: string): Tokenizer {
    if (typeof ggufPath !== 'string') throw new TypeError('ggufPath must be a string');
    return new Tokenizer(new native.Tokenizer(ggufPath));
  }

  /** Reads the tokenizer of a GGUF file off the event loop; the same as {@link loadTokenizer}. */
  static async load(ggufPath: string): Promise<Tokenizer> {
    if (typeof ggufPath !== 'string') throw new TypeError('ggufPath must be a string');
    return new Tokenizer(await native.loadTokenizer(ggufPath));
  }

  /** The raw native object, for other parts of the package. */
  get native(): unknown {
    return this.#native;
  }

  get vocabSize(): number {
    return this.#native.vocabSize;
  }
  /** BOS token id, or -1. */
  get bos(): number {
    return this.#native.bos;
  }
  /** EOS token id, or -1. */
  get eos(): number {
    return this.#native.eos;
  }
  /** Unknown token id, or -1. */
  get unk(): number {
    return this.#native.unk;
  }
  /** Padding token id, or -1. */
  get pad(): number {
    return this.#native.pad;
  }
  /** Whether encode() adds BOS by default (`tokenizer.ggml.add_bos_token`). */
  get addBos(): boolean {
    return this.#native.addBos;
  }
  get addEos(): boolean {
    return this.#native.addEos;
  }
  /** Whether encode() puts SentencePiece's dummy space in front of the text. */
  get addSpacePrefix(): boolean {
    return this.#native.addSpacePrefix;
  }
  /** "llama" or "gpt2". */
  get model(): string {
    return this.#native.model;
  }
  /** The pre-tokenizer name ("" when the file has none). */
  get pre(): string {
    return this.#native.pre;
  }

  /**
   * A lower bound on the number of tokens `text` encodes to, found without encoding it: no token
   * stands for more UTF-16 code units than the longest token text (or 2: a byte or unknown token
   * may stand for a surrogate pair). Lets a caller refuse a prompt that cannot fit a context before
   * spending the event loop on encoding it.
   */
  minTokens(text: string): number {
    if (typeof text !== 'string') throw new TypeError(`text must be a string, got ${text === null ? 'null' : typeof text}`);
    if (this.#maxTokenChars === 0) {
      let m = 2;
      for (let i = 0; i < this.vocabSize; i++) m = Math.max(m, this.tokenText(i).length);
      this.#maxTokenChars = m;
    }
    return Math.floor(text.length / this.#maxTokenChars);
  }
  #maxTokenChars = 0;

  encode(text: string, options: EncodeOptions = {}): Int32Array {
    if (typeof text !== 'string') throw new TypeError('text must be a string');
    checkKeys(checkOptions(options)!, ['addBos', 'addEos', 'special']);
    const { addBos = this.addBos, addEos = false, special = false } = options;
    return this.#native.encode(text, addBos, special, addEos);
  }

  /** Decodes token ids to text; an id out of range is a RangeError naming `tokens[i]`. */
  decode(tokens: TokenIds, options: DecodeOptions = {}): string {
    checkKeys(checkOptions(options)!, ['special', 'stripSpacePrefix']);
    const { special = false, stripSpacePrefix = true } = options;
    return this.#native.decode(toInt32Array(tokens, this.vocabSize), special, stripSpacePrefix);
  }

  /**
   * A decoder for tokens that arrive one by one: each push returns the text completed so far,
   * holding back a character whose bytes are split across tokens.
   */
  createStreamDecoder(options: StreamDecoderOptions = {}): TokenStreamDecoder {
    return new TokenStreamDecoder(this, options);
  }

  /** The text of one token (lossy when the token is part of a UTF-8 character; see tokenToBytes). */
  tokenToPiece(token: number, options: { special?: boolean } = {}): string {
    return this.#native.tokenToPiece(token, specialOption(options));
  }

  /** The bytes one token decodes to. */
  tokenToBytes(token: number, options: { special?: boolean } = {}): Uint8Array {
    return this.#native.tokenToBytes(token, specialOption(options));
  }

  /** The vocabulary entry itself (with "▁" or byte-level characters, as stored). */
  tokenText(token: number): string {
    return this.#native.tokenText(token);
  }

  tokenType(token: number): TokenType {
    return this.#native.tokenType(token) as TokenType;
  }

  /** The id of the vocabulary entry equal to `text`, or -1. */
  findToken(text: string): number {
    return this.#native.findToken(text);
  }
}

export class TokenStreamDecoder {
  readonly #native: NativeStreamDecoder;
  readonly #vocabSize: number;

  constructor(tokenizer: Tokenizer, options: StreamDecoderOptions = {}) {
    if (!(tokenizer instanceof Tokenizer)) throw new TypeError('tokenizer must be a Tokenizer');
    checkKeys(checkOptions(options)!, ['special', 'stripSpacePrefix']);
    const { special = false, stripSpacePrefix = false } = options;
    this.#native = new native.TokenizerStreamDecoder(tokenizer.native as NativeTokenizer, special, stripSpacePrefix);
    this.#vocabSize = tokenizer.vocabSize;
  }

  /** Adds tokens; returns the text that is complete so far (possibly ""). */
  push(tokens: TokenIds | number): string {
    if (typeof tokens === 'number') return this.#native.push(tokens);
    return this.#native.push(toInt32Array(tokens, this.#vocabSize));
  }

  /** Returns whatever is held back, at the end of the stream. */
  flush(): string {
    return this.#native.flush();
  }

  /** Bytes held back, waiting for the rest of a character. */
  get pendingBytes(): number {
    return this.#native.pendingBytes;
  }
}

/** Reads the tokenizer of a GGUF file (a model or a vocabulary-only file) off the event loop. */
export function loadTokenizer(ggufPath: string): Promise<Tokenizer> {
  return Tokenizer.load(ggufPath);
}
