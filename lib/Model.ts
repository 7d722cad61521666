// Models and sequences: loading GGUF or llama2.c files, the forward pass, and plain generation.
import { basename } from 'node:path';
import { addon } from './addon.js';
import type { SamplingOptions, Seed } from './addonTypes.js';
import { applyChatTemplate, type ApplyChatTemplateOptions, type ChatMessage } from './chatTemplate.js';
import { loadTokenizer, TokenStreamDecoder, type Tokenizer } from './Tokenizer.js';
import { checkCallback, checkInteger, checkKeys, checkMisplacedSampling, checkOptions, checkPromptFits, checkSampling, disposedError } from './args.js';
import { abortError, checkSignal, pushToAsyncIterable, throwIfAborted } from './withAbortSignal.js';

interface NativeModel {
  info(): ModelInfo;
  setWeights(other: NativeModel): void;
  embeddingRows(start: number, count: number): Float32Array;
  headTokenIds(): Int32Array | null;
  dispose(): void;
  readonly disposed: boolean;
}

/** The KV cache's element type (Model.createSequence). */
export type KvType = 'f16' | 'f32';

interface NativeSequence {
  evaluate(tokens: Int32Array, parents: Int32Array | null, lastOnly: boolean): Promise<Float32Array>;
  draft(tokens: Int32Array, options: object): Promise<DraftResult>;
  chainStep(draft: NativeSequence, pending: Int32Array, options: object): Promise<ChainStepResult>;
  chainRun(draft: NativeSequence, pending: Int32Array, options: object): Promise<ChainRunResult>;
  cancel(): void;
  truncate(n: number): void;
  keepPath(base: number, path: Int32Array): void;
  fork(): NativeSequence;
  dispose(): void;
  readonly length: number;
  readonly capacity: number;
  readonly kvType: KvType;
}

interface ModelAddon {
  loadModel(path: string, device?: ModelDevice): Promise<NativeModel>;
  writeRandomModel(path: string, config: object): Promise<void>;
  saveModel(model: NativeModel, path: string, options: object): Promise<void>;
  convertModel(model: NativeModel, options: { type: StoreType | 'keep'; headTokens?: Int32Array | null }): Promise<NativeModel>;
  NativeSequence: new (model: NativeModel, contextSize?: number, kvType?: KvType) => NativeSequence;
  sampleLogits(o: object): number;
  chainJoinStats(): { steps: number; runs: number };
  readGgufMetadata(path: string, options?: { maxArrayLength?: number }): { metadata: Record<string, unknown> };
}

const native = addon as unknown as ModelAddon;

/** Accepts an Int32Array or an array of integers (TypeError / RangeError naming `name` otherwise). */
export function toTokenArray(tokens: unknown, name = 'tokens'): Int32Array {
  if (tokens instanceof Int32Array) return tokens;
  if (!Array.isArray(tokens)) throw new TypeError(`${name} must be an Int32Array or an array of integers`);
  const out = new Int32Array(tokens.length);
  for (let i = 0; i < tokens.length; i++) {
    const t: unknown = tokens[i];
    if (typeof t !== 'number' || !Number.isInteger(t) || t < -2147483648 || t > 2147483647)
      throw new RangeError(`${name}[${i}] must be an integer token id, got ${String(t)}`);
    out[i] = t;
  }
  return out;
}

/** toTokenArray, with every id in [0, vocabSize) (RangeError naming the entry otherwise). */
export function checkTokenIds(tokens: unknown, name: string, vocabSize: number): Int32Array {
  const t = toTokenArray(tokens, name);
  for (let i = 0; i < t.length; i++)
    if (t[i]! < 0 || t[i]! >= vocabSize) throw new RangeError(`${name}[${i}] = ${t[i]} is out of range for a vocabulary of ${vocabSize}`);
  return t;
}

/**
 * The ids a model's generation draws from: its rows, or only its tokenizer's tokens where the
 * embedding matrix is padded past them (an id without a token could not be decoded or fed back).
 */
export function sampledVocab(model: Model): number {
  const tk = model.tokenizer;
  return tk ? Math.min(model.info.vocabSize, tk.vocabSize) : model.info.vocabSize;
}

/**
 * A generate call's prompt as token ids: `tokens` (each in [0, vocabSize)) or `prompt` encoded with
 * `model`'s tokenizer, BOS as the vocabulary asks. `who` names the model in errors.
 */
export function promptTokens(options: { tokens?: unknown; prompt?: unknown }, model: Model, vocabSize: number, who: string): Int32Array {
  if (options.tokens !== undefined && options.prompt !== undefined) throw new TypeError('give tokens or prompt, not both');
  if (options.tokens !== undefined) {
    const t = checkTokenIds(options.tokens, 'tokens', vocabSize);
    if (t.length === 0) throw new RangeError('tokens must not be empty');
    return t;
  }
  if (options.prompt !== undefined) {
    if (typeof options.prompt !== 'string') throw new TypeError('prompt must be a string');
    const tk = model.tokenizer;
    if (!tk) throw new TypeError(`prompt needs a ${who} with a tokenizer; pass tokens instead`);
    checkPromptFits(tk, options.prompt, model.info.contextLength);
    const t = tk.encode(options.prompt, { addBos: tk.addBos });
    if (t.length === 0) throw new RangeError('prompt encodes to no tokens');
    return t;
  }
  throw new TypeError('tokens or prompt is required');
}

export interface ModelInfo {
  path: string;
  format: 'gguf' | 'llama2c';
  architecture: string;
  vocabSize: number;
  contextLength: number;
  embeddingLength: number;
  layers: number;
  heads: number;
  kvHeads: number;
  headDim: number;
  feedForwardLength: number;
  ropeTheta: number;
  rmsEps: number;
  tiedOutput: boolean;
  /**
   * Ids the LM head scores: vocabSize, or fewer for a draft with a restricted head (GGUF key
   * `osd.head_tokens`, Model.headTokenIds), whose other logits are -Infinity.
   */
  headTokens: number;
  /** Weight bytes read to decode one token (the memory-bound cost of a step). */
  weightBytesPerToken: number;
  /**
   * The type every matrix is stored in ('F32', 'F16', 'Q4_1', ...; 'F32' for a trainer's snapshot),
   * or 'mixed' (llama.cpp files often keep the token embeddings in another type than the layers).
   */
  matrixType: string;
  /** Where the model's passes run: 'cpu', or 'cuda: <GPU name>' (see LoadModelOptions.device). */
  device: string;
}

/** Where a model's passes run (LoadModelOptions.device). */
export type ModelDevice = 'cpu' | 'cuda';

export interface LoadModelOptions {
  /** Size of the engine's CPU thread pool (process-wide). Default: all cores. */
  threads?: number;
  signal?: AbortSignal;
  /** Called with a fraction in [0, 1] as loading advances. */
  onProgress?: (progress: number) => void;
  /**
   * 'cuda' runs the model's forward passes on the GPU: its weights are copied there at load and its
   * sequences keep their KV cache there (needs the CUDA build of the addon and a usable device, else
   * loading rejects saying why). Logits agree with the CPU engine's within rounding, not bit for bit.
   * setWeights() on such a model uploads a copy of the weights it is given, and convert() copies stay
   * on the GPU. Default 'cpu'. Not yet run on a GPU: see the README's "The model pass on the GPU".
   */
  device?: ModelDevice;
}

/** Loads a GGUF file or a llama2.c checkpoint (told apart by the magic), off the event loop. */
export async function loadModel(path: string, options: LoadModelOptions = {}): Promise<Model> {
  if (typeof path !== 'string' || path.length === 0) throw new TypeError('path must be a non-empty string');
  checkOptions(options);
  checkKeys(options, ['threads', 'signal', 'onProgress', 'device']);
  const device: unknown = options.device; // read once: a getter could answer differently later
  // ('mirror', a CPU stand-in for a device that the test suites use, only with OSD_TEST_MIRROR_DEVICE=1.)
  const mirror = device === 'mirror' && process.env.OSD_TEST_MIRROR_DEVICE === '1';
  if (device !== undefined && device !== 'cpu' && device !== 'cuda' && !mirror)
    throw new RangeError(`options.device must be 'cpu' or 'cuda', got ${typeof device === 'string' ? `'${device}'` : device === null ? 'null' : typeof device}`);
  const signal = checkSignal(options.signal);
  checkCallback(options.onProgress, 'options.onProgress');
  if (options.threads !== undefined) {
    checkInteger(options.threads, 'threads', 0, Number.MAX_SAFE_INTEGER, ' (0 = all cores)');
    (addon as unknown as { setThreads(n: number): number }).setThreads(options.threads);
  }
  throwIfAborted(signal);
  options.onProgress?.(0);
  const handle = await native.loadModel(path, device as ModelDevice | undefined);
  let tokenizer: Tokenizer | undefined;
  let chatTemplate: string | undefined;
  try {
    throwIfAborted(signal);
    options.onProgress?.(0.5);
    // GGUF files carry their tokenizer and usually a chat template; llama2.c checkpoints do not.
    if (handle.info().format === 'gguf') ({ tokenizer, chatTemplate } = await readTextTools(path));
    throwIfAborted(signal);
    options.onProgress?.(1); // (a callback that throws frees the model too)
  } catch (e) {
    handle.dispose();
    throw e;
  }
  return new Model(handle, tokenizer, chatTemplate);
}

/** The tokenizer and chat template a GGUF file carries (either may be absent). @internal */
export async function readTextTools(path: string): Promise<{ tokenizer?: Tokenizer; chatTemplate?: string }> {
  // One read of the key/value section (the token arrays are skipped, not read out).
  const meta = native.readGgufMetadata(path, { maxArrayLength: 0 }).metadata;
  // A vocabulary-less GGUF (weights only) is valid: the model then works on token ids alone. So is
  // llama.cpp's explicit form of it, tokenizer.ggml.model = "no_vocab" ("none" in older files).
  const model = meta['tokenizer.ggml.model'];
  const tokenizer = model !== undefined && model !== 'no_vocab' && model !== 'none' ? await loadTokenizer(path) : undefined;
  const t = meta['tokenizer.chat_template'];
  const chatTemplate = typeof t === 'string' && t.length > 0 ? t : undefined;
  return { ...(tokenizer && { tokenizer }), ...(chatTemplate !== undefined && { chatTemplate }) };
}

/**
 * Storage type for the matrices of a written model (norms and biases stay F32). The quantised types
 * are llama.cpp's block formats, written by the engine's own quantiser (round to nearest). As
 * llama.cpp's quantiser does, a matrix whose row length is not a whole number of the type's blocks
 * falls back: IQ4_XS and Q2_K (256-value blocks) to IQ4_NL when it is a multiple of 32, anything
 * else to F16.
 */
export type StoreType = 'F32' | 'F16' | 'BF16' | 'Q8_0' | 'Q5_0' | 'Q5_1' | 'Q4_0' | 'Q4_1' | 'IQ4_NL' | 'IQ4_XS' | 'Q2_K';
export const STORE_TYPES: readonly StoreType[] = ['F32', 'F16', 'BF16', 'Q8_0', 'Q5_0', 'Q5_1', 'Q4_0', 'Q4_1', 'IQ4_NL', 'IQ4_XS', 'Q2_K'];
export function isStoreType(t: unknown): t is StoreType {
  return typeof t === 'string' && (STORE_TYPES as readonly string[]).includes(t);
}

export interface RandomModelConfig {
  vocabSize: number;
  embeddingLength: number;
  layers: number;
  heads: number;
  kvHeads?: number;
  feedForwardLength: number;
  contextLength: number;
  ropeTheta?: number;
  type?: StoreType;
  seed?: Seed;
}

/**
 * Writes a llama GGUF with random N(0, 1/fan_in) weights: a benchmark subject (e.g. a model larger
 * than the caches) or a throwaway draft for tests. Deterministic per seed; written atomically.
 */
export async function writeRandomModel(path: string, config: RandomModelConfig): Promise<void> {
  if (typeof path !== 'string' || path.length === 0) throw new TypeError('path must be a non-empty string');
  if (config === null || typeof config !== 'object') throw new TypeError('config must be an object');
  checkKeys(config, ['vocabSize', 'embeddingLength', 'layers', 'heads', 'kvHeads', 'feedForwardLength', 'contextLength', 'ropeTheta', 'type', 'seed'], 'config');
  await native.writeRandomModel(path, config);
}

export interface GenerateOptions {
  /** Prompt token ids (give tokens or prompt). */
  tokens?: Int32Array | number[];
  /** Prompt text; needs a model with a tokenizer. */
  prompt?: string;
  maxTokens: number;
  /** Default: greedy. */
  sampling?: SamplingOptions;
  seed?: Seed;
  /** Philox stream, e.g. a request id. Default 0. */
  stream?: Seed;
  signal?: AbortSignal;
  /** Token ids that end generation (default: the model's end-of-sequence tokens). */
  stopTokens?: number[];
  onToken?: (token: number) => void;
}

const modelGenerateKeys = ['tokens', 'prompt', 'maxTokens', 'sampling', 'seed', 'stream', 'signal', 'stopTokens', 'onToken'];

export type StopReason = 'eos' | 'maxTokens' | 'context';

export interface ChatTemplateOptions extends ApplyChatTemplateOptions {
  /** A Jinja chat template to use instead of the model's own (tokenizer.chat_template). */
  template?: string;
  /**
   * Return the prompt's token ids instead of its text: the markup (`<|im_start|>` ...) is parsed as
   * special tokens, and BOS is added as the vocabulary asks unless the template already printed it.
   * Default false.
   */
  tokenize?: boolean;
}

export interface GenerateResult {
  tokens: Int32Array;
  text?: string;
  stopReason: StopReason;
}

/** A piece of a streamed generation. */
export interface StreamChunk {
  tokens: Int32Array;
  /** Text completed by these tokens (exact on UTF-8 boundaries); "" without a tokenizer. */
  text: string;
}

/** A loaded model. Dispose it (or use `await using`) to release its memory once sequences end. */
export class Model {
  #info: ModelInfo;
  #weightsVersion = 0;
  #swapWatchers = new Set<() => void>();
  #disposing = false;
  /** The GGUF's own tokenizer (undefined for llama2.c checkpoints and vocabulary-less files). */
  readonly tokenizer: Tokenizer | undefined;
  /** Tokens that end a sequence. llama2.c checkpoints use BOS (1) as the story delimiter, and 2 as EOS. */
  readonly eosTokens: number[];
  /** The GGUF's Jinja chat template (tokenizer.chat_template); undefined when the file has none. */
  readonly chatTemplate: string | undefined;
  #handle: NativeModel | null;
  #sequences = new Set<Sequence>();

  /** @internal */
  constructor(handle: NativeModel, tokenizer?: Tokenizer, chatTemplate?: string) {
    this.#handle = handle;
    this.#info = handle.info();
    this.tokenizer = tokenizer;
    this.chatTemplate = chatTemplate;
    if (this.info.format === 'llama2c') this.eosTokens = [1, 2];
    else this.eosTokens = tokenizer && tokenizer.eos >= 0 ? [tokenizer.eos] : [];
  }

  /**
   * How many times setWeights() has swapped this model's weights (0 as loaded). A Sequence whose
   * weightsVersion is lower than this one evaluates with older weights.
   */
  get weightsVersion(): number {
    return this.#weightsVersion;
  }

  /**
   * @internal Calls fn at every setWeights() until the returned function is called (the
   * speculative decoder ends a run of chain steps there, so that the request takes the new weights
   * up at its next step).
   */
  watchWeights(fn: () => void): () => void {
    this.#swapWatchers.add(fn);
    return () => void this.#swapWatchers.delete(fn);
  }

  /** Architecture and sizes; storage type, bytes per token and device follow setWeights(). */
  get info(): ModelInfo {
    return this.#info;
  }

  /** True from the moment dispose() is called. */
  get disposed(): boolean {
    return this.#disposing;
  }

  /** @internal */
  get handle(): NativeModel {
    // Refused from the start of dispose(): a sequence made while it waits would outlive it.
    if (!this.#handle || this.#disposing) throw disposedError('model');
    return this.#handle;
  }

  /**
   * A new sequence with its own KV cache. contextSize defaults to (and is capped at) the model's
   * context length. kvType: 'f16' (default) stores keys and values as IEEE half, half the memory
   * and the bytes attention reads; 'f32' keeps them as computed.
   */
  createSequence(options: { contextSize?: number; kvType?: KvType } = {}): Sequence {
    checkKeys(checkOptions(options)!, ['contextSize', 'kvType']);
    const { contextSize, kvType } = options;
    if (contextSize !== undefined) checkInteger(contextSize, 'contextSize', 1);
    if (kvType !== undefined && kvType !== 'f16' && kvType !== 'f32')
      throw new RangeError(`options.kvType must be 'f16' or 'f32', got ${typeof kvType === 'string' ? `'${kvType}'` : String(kvType)}`);
    const seq = new Sequence(this, new native.NativeSequence(this.handle, contextSize ?? 0, kvType ?? 'f16'));
    this.#sequences.add(seq);
    return seq;
  }

  /** @internal */
  adopt(seq: Sequence): void {
    this.#sequences.add(seq);
  }

  /** @internal */
  release(seq: Sequence): void {
    this.#sequences.delete(seq);
  }

  /** Logits [n x V] of every position of `tokens`, evaluated from an empty context. */
  async forward(tokens: Int32Array | number[]): Promise<Float32Array> {
    // A cache of just these tokens: the model's whole context (8,192 tokens for SmolLM2, 190 MB) was
    // allocated and cleared for every call. Out-of-range lengths fall through to evaluate's errors.
    const n = (tokens as { length?: unknown } | null | undefined)?.length;
    const size = typeof n === 'number' && n >= 1 && n <= this.info.contextLength ? n : undefined;
    const seq = this.createSequence(size === undefined ? {} : { contextSize: size });
    try {
      return await seq.evaluate(tokens);
    } finally {
      await seq.dispose();
    }
  }

  /**
   * Rows [start, start + count) of the token embeddings, dequantised to float32 ([count x
   * embeddingLength], row-major) by the engine's own readers, whatever type the file stores them in.
   * Synchronous: ask for a few thousand rows at a time. Default: every row (at most 2^28 values).
   */
  embeddingRows(start = 0, count?: number): Float32Array {
    const handle = this.handle;
    const vocab = this.info.vocabSize;
    checkInteger(start, 'start', 0, vocab);
    const n = count ?? vocab - start;
    checkInteger(n, 'count', 0, vocab - start);
    return handle.embeddingRows(start, n);
  }

  /**
   * The ids a restricted head scores (ascending; GGUF key `osd.head_tokens`), or null when the head
   * scores the whole vocabulary. Logits of the other ids are -Infinity: such a draft never proposes
   * them, and verification stays exact (their draft probability is 0).
   */
  headTokenIds(): Int32Array | null {
    return this.handle.headTokenIds();
  }

  /**
   * Swaps in the weights of `weights` (a model of the same shape, e.g. a Trainer snapshot). Sequences
   * created afterwards use them; existing sequences keep the weights they were created with (their
   * KV caches were computed with those), so no evaluation sees half-updated weights. weightsVersion
   * counts the swaps: a SpeculativeDecoder compares it with its draft sequence's at every step and,
   * with weightSwap 'step' (its default), replaces that sequence, so running requests take the new
   * weights up.
   */
  setWeights(weights: Model): void {
    if (!(weights instanceof Model)) throw new TypeError('weights must be a Model');
    this.handle.setWeights(weights.handle);
    this.#weightsVersion++;
    for (const f of [...this.#swapWatchers]) f();
    const now = this.handle.info();
    this.#info = { ...this.#info, matrixType: now.matrixType, weightBytesPerToken: now.weightBytesPerToken, device: now.device };
  }

  /**
   * Writes this model as GGUF (llama.cpp's layout), atomically. Matrices are stored as `type`
   * (default F32; see StoreType), or with 'keep' each in the type it has now (lossless for every
   * type, K-quants and mixed files included). A matrix already stored in the type it would be
   * written in (the requested one, or its fallback: see StoreType) is copied unchanged.
   */
  async save(path: string, options: { type?: StoreType | 'keep' } = {}): Promise<void> {
    if (typeof path !== 'string' || path.length === 0) throw new TypeError('path must be a non-empty string');
    checkKeys(checkOptions(options)!, ['type']);
    if (options.type !== undefined && options.type !== 'keep' && !isStoreType(options.type))
      throw new RangeError(`type must be 'keep' or one of ${STORE_TYPES.join(', ')}, got ${String(options.type)}`);
    await native.saveModel(this.handle, path, options);
  }

  /**
   * The same model with its matrices stored as `type` (see StoreType), held in memory, off the event
   * loop: e.g. a trainer's F32 snapshot as F16 or Q8_0 to make it cheaper to run. Matrices already in
   * the type they would be written in are copied unchanged; 'keep' copies every matrix as it is (a
   * bit-exact copy of the weights). The tokenizer and chat template carry over, and so does the
   * device: a copy of a model loaded with device 'cuda' runs on the GPU too.
   */
  async convert(type: StoreType | 'keep'): Promise<Model> {
    if (type !== 'keep' && !isStoreType(type)) throw new RangeError(`type must be 'keep' or one of ${STORE_TYPES.join(', ')}, got ${String(type)}`);
    const handle = await native.convertModel(this.handle, { type });
    return new Model(handle, this.tokenizer, this.chatTemplate);
  }

  /**
   * A copy of this model (weights as they are, in memory, off the event loop) whose LM head scores
   * only `ids` (any order; duplicates are dropped), or, with null, the whole vocabulary. For drafts on
   * a large vocabulary, where the head is most of a draft's cost: the other logits are -Infinity, so
   * the draft never proposes those tokens, and verification stays exact. Training a draft with such a
   * head scores the teacher renormalised over `ids`. `save` keeps the ids (GGUF key
   * `osd.head_tokens`; llama.cpp ignores it and uses the whole head). Tokenizer, template and device
   * carry over.
   */
  async withHead(ids: ArrayLike<number> | null): Promise<Model> {
    let head: Int32Array | null = null;
    if (ids !== null) {
      if (typeof ids !== 'object' || typeof (ids as ArrayLike<number>).length !== 'number') throw new TypeError('ids must be an array of token ids or null');
      const V = this.info.vocabSize;
      const seen = new Set<number>();
      for (let i = 0; i < ids.length; i++) {
        const id = ids[i]!;
        if (!Number.isInteger(id) || id < 0 || id >= V) throw new RangeError(`ids[${i}] must be a token id in [0, ${V - 1}], got ${id}`);
        seen.add(id);
      }
      if (seen.size === 0) throw new RangeError('ids must hold at least one token id');
      // Every id: the whole head, not a restricted one of the same size.
      if (seen.size < V) head = Int32Array.from(seen).sort();
    }
    const handle = await native.convertModel(this.handle, { type: 'keep', headTokens: head });
    return new Model(handle, this.tokenizer, this.chatTemplate);
  }

  /** Plain (target-only) generation: greedy, or sampled with the kernels' warping and Philox stream. */
  async generate(options: GenerateOptions): Promise<GenerateResult> {
    if (options === null || typeof options !== 'object') throw new TypeError('options must be an object');
    checkMisplacedSampling(options);
    checkKeys(options, modelGenerateKeys);
    const signal = checkSignal(options.signal);
    const prompt = promptTokens(options, this, this.info.vocabSize, 'model');
    const maxTokens = checkInteger(options.maxTokens, 'maxTokens', 0);
    if (options.sampling !== undefined) checkSampling(options.sampling);
    const sampling = options.sampling ?? { temperature: 0 };
    const stop = new Set(options.stopTokens === undefined ? this.eosTokens : checkTokenIds(options.stopTokens, 'stopTokens', this.info.vocabSize));
    checkCallback(options.onToken, 'onToken');
    const seq = this.createSequence();
    const out: number[] = [];
    let stopReason: StopReason = 'maxTokens';
    try {
      throwIfAborted(signal);
      if (prompt.length >= seq.capacity) throw new RangeError(`the prompt (${prompt.length} tokens) does not fit the context of ${seq.capacity}`);
      const logits = await seq.evaluate(prompt, { lastOnly: true, ...(signal && { signal }) });
      const seed = options.seed ?? 0;
      const stream = options.stream ?? 0;
      // Token i of the output is drawn at Philox position prompt.length + i, however it is produced.
      // Returns whether generation goes on after `token`.
      const take = (token: number): boolean => {
        out.push(token);
        options.onToken?.(token);
        if (stop.has(token)) stopReason = 'eos';
        else if (out.length >= maxTokens) stopReason = 'maxTokens';
        else if (prompt.length + out.length >= seq.capacity) stopReason = 'context';
        else return true;
        return false;
      };
      if (maxTokens > 0) {
        throwIfAborted(signal);
        const V = sampledVocab(this);
        const row = V === this.info.vocabSize ? logits : logits.subarray(0, V);
        let more = take(native.sampleLogits({ logits: row, vocabSize: V, sampling, seed, stream, position: seq.length }));
        // The rest in chunks drawn by the engine in one call each (Sequence.draft samples as
        // sampleLogits does): one round trip to JavaScript per chunk instead of per token. Chunks
        // grow from 1 to 16 tokens, and to no more than about CHUNK_MS of decoding, so that a stream
        // starts at once and arrives in small bursts.
        const stopIds = Int32Array.from(stop);
        let chunk = 1;
        while (more) {
          throwIfAborted(signal);
          const room = Math.min(maxTokens - out.length, seq.capacity - prompt.length - out.length);
          const t0 = performance.now();
          const d = await seq.draft([out[out.length - 1]!], {
            count: Math.min(chunk, room),
            vocabSize: V,
            sampling,
            seed,
            stream,
            position: seq.length + 1,
            stopTokens: stopIds,
            ...(signal && { signal }),
          });
          for (let i = 0; i < d.tokens.length && more; i++) {
            throwIfAborted(signal); // an onToken that aborts sees no token after it
            more = take(d.tokens[i]!);
          }
          const msPerToken = (performance.now() - t0) / d.tokens.length;
          chunk = Math.max(1, Math.min(16, 2 * chunk, Math.floor(CHUNK_MS / msPerToken)));
        }
      }
    } finally {
      await seq.dispose();
    }
    const tokens = Int32Array.from(out);
    return this.tokenizer ? { tokens, text: this.tokenizer.decode(tokens), stopReason } : { tokens, stopReason };
  }

  /**
   * Renders a conversation with the model's own chat template (or `options.template`) through
   * @huggingface/jinja, with the variables Hugging Face's apply_chat_template passes (messages,
   * add_generation_prompt, bos_token and eos_token as the vocabulary's texts, tools, plus
   * `options.variables`). Returns the prompt text, or its token ids with `tokenize: true`.
   */
  applyChatTemplate(messages: readonly ChatMessage[], options?: ChatTemplateOptions & { tokenize?: false }): string;
  applyChatTemplate(messages: readonly ChatMessage[], options: ChatTemplateOptions & { tokenize: true }): Int32Array;
  applyChatTemplate(messages: readonly ChatMessage[], options?: ChatTemplateOptions): string | Int32Array;
  applyChatTemplate(messages: readonly ChatMessage[], options: ChatTemplateOptions = {}): string | Int32Array {
    if (this.disposed) throw disposedError('model');
    if (!Array.isArray(messages)) throw new TypeError('messages must be an array of { role, content }');
    if (messages.length === 0) throw new RangeError('messages must not be empty');
    if (options === null || typeof options !== 'object') throw new TypeError('options must be an object');
    checkKeys(options, ['template', 'tokenize', 'addGenerationPrompt', 'bosToken', 'eosToken', 'tools', 'variables']);
    const { template: override, tokenize = false, ...rest } = options;
    if (override !== undefined && (typeof override !== 'string' || override.length === 0))
      throw new TypeError('options.template must be a non-empty string');
    if (typeof tokenize !== 'boolean') throw new TypeError('options.tokenize must be a boolean');
    const template = override ?? this.chatTemplate;
    if (template === undefined)
      throw new Error(`${this.info.path ? basename(this.info.path) : 'this model'} has no chat template (no tokenizer.chat_template in the file); pass options.template`);
    const tok = this.tokenizer;
    if (tokenize && !tok) throw new TypeError('options.tokenize needs a model with a tokenizer');
    const bosText = tok && tok.bos >= 0 ? tok.tokenText(tok.bos) : '';
    const eosText = tok && tok.eos >= 0 ? tok.tokenText(tok.eos) : '';
    const text = applyChatTemplate(template, messages, { ...rest, bosToken: rest.bosToken ?? bosText, eosToken: rest.eosToken ?? eosText });
    if (!tokenize) return text;
    // Templates such as Llama 3's print bos_token themselves; do not add a second one.
    const addBos = tok!.addBos && !(bosText !== '' && text.startsWith(bosText));
    return tok!.encode(text, { special: true, addBos });
  }

  /**
   * generate() as an async iterable: a chunk per token (its text complete on UTF-8 boundaries), and
   * the stop reason as the iterator's return value. Leaving the loop early stops the generation.
   */
  async *stream(options: Omit<GenerateOptions, 'onToken'>): AsyncGenerator<StreamChunk, StopReason, void> {
    if (options === null || typeof options !== 'object') throw new TypeError('options must be an object');
    const signal = checkSignal(options.signal);
    const decoder = this.tokenizer ? new TokenStreamDecoder(this.tokenizer) : undefined;
    const stopReason = yield* pushToAsyncIterable<StreamChunk, StopReason>(
      async (push, inner) =>
        (
          await this.generate({
            ...options,
            signal: inner,
            onToken: (token) => push({ tokens: Int32Array.of(token), text: decoder ? decoder.push(token) : '' }),
          })
        ).stopReason,
      signal,
    );
    const tail = decoder?.flush() ?? '';
    if (tail) yield { tokens: new Int32Array(0), text: tail };
    return stopReason;
  }

  /**
   * Waits for the native calls in flight, then frees the model and its sequences: a generation still
   * running rejects at its next step with "the model was disposed".
   */
  async dispose(): Promise<void> {
    this.#disposing = true;
    await Promise.all([...this.#sequences].map((s) => s.disposeWithModel()));
    this.#handle?.dispose();
    this.#handle = null;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.dispose();
  }
}

/** The tokens as an Int32Array of the call's own (a caller's Int32Array is copied). */
function ownTokens(tokens: Int32Array | number[]): Int32Array {
  const t = toTokenArray(tokens);
  return t === tokens ? t.slice() : t;
}

export interface EvaluateOptions {
  /** Tree mask: parent of each token in this batch (-1 = the cached prefix). Default: a causal chain. */
  treeParents?: Int32Array;
  /** Return only the last row of logits (a prefill). */
  lastOnly?: boolean;
  /**
   * Aborting stops a long chain (more than PREFILL_CHUNK tokens, no treeParents) within one chunk of
   * that many tokens, rejects with an AbortError and leaves the cache as it was. The chunks give the
   * same logits as one pass (a token's logits do not depend on the others in its batch).
   */
  signal?: AbortSignal;
}

/** Tokens per pass of an abortable prefill (EvaluateOptions.signal). */
export const PREFILL_CHUNK = 64;

/**
 * Calls visit(row, next) for each position i >= from of `tokens` but the last: the model's logits
 * after tokens[0..i] and the token that followed. The prefix is evaluated without rows, then a chunk
 * of rows at a time, so a long sequence's [tokens x vocab] logits never exist at once.
 * @internal
 */
export async function visitNextTokenRows(model: Model, tokens: readonly number[], from: number, visit: (row: Float32Array, next: number) => void): Promise<void> {
  if (tokens.length - 1 <= from) return;
  const V = model.info.vocabSize;
  const seq = model.createSequence();
  try {
    if (from > 0) await seq.evaluate(tokens.slice(0, from), { lastOnly: true });
    for (let i = from; i < tokens.length - 1; i += PREFILL_CHUNK) {
      const end = Math.min(tokens.length - 1, i + PREFILL_CHUNK);
      const logits = await seq.evaluate(tokens.slice(i, end));
      for (let j = i; j < end; j++) visit(logits.subarray((j - i) * V, (j - i + 1) * V), tokens[j + 1]!);
    }
  } finally {
    await seq.dispose();
  }
}

/** Model.generate's decoding time per native call, at most (ms): its tokens reach onToken together. */
const CHUNK_MS = 50;

export interface DraftOptions {
  /** Draft tokens to propose (>= 1). */
  count: number;
  /** Warping of the draft rows; greedy (temperature 0) takes the argmax. Default: greedy. */
  sampling?: SamplingOptions;
  seed?: Seed;
  /** Philox stream of the draws. Default 0. */
  stream?: Seed;
  /** Philox position of draft token i: position + i (default 0) ... */
  position?: number;
  /** ... or positions[i] (length count), e.g. the node index of each level's first child in a tree. */
  positions?: Int32Array | number[];
  /** Rows are sampled and returned cut to their first vocabSize logits (a vocabulary shared with a smaller model). Default: the model's. */
  vocabSize?: number;
  /** Drawing one of these ends the chain there (it is the last token returned, and is not evaluated). */
  stopTokens?: Int32Array | number[];
  /** Aborting stops the loop before its next pass; the cache is left as it was before the call. */
  signal?: AbortSignal;
}

export interface DraftResult {
  /** The drafted tokens: count of them, or fewer when the last is one of stopTokens. */
  tokens: Int32Array;
  /** [tokens.length x vocabSize] logits: row i is the distribution that token i was drawn from. */
  logits: Float32Array;
}

export interface ChainStepOptions {
  /** The last committed token: the target's pass starts with it (its logits give the first row). */
  last: number;
  /** Draft tokens g (>= 1). */
  count: number;
  /** Rows are cut to the first vocabSize logits, a vocabulary both models share. Default: the smaller model's. */
  vocabSize?: number;
  /** Warping for drafting and verification; greedy by default. */
  sampling?: SamplingOptions;
  seed?: Seed;
  /** Philox stream of the draft's draws (token i at position i). Default 0. */
  draftStream?: Seed;
  /** Philox stream of the verification. Default 0. */
  targetStream?: Seed;
}

export interface ChainStepResult {
  /** Draft tokens accepted. */
  acceptedCount: number;
  /** The accepted draft tokens, then the correction or bonus token. */
  tokens: Int32Array;
  /** The g drafted tokens. */
  draftTokens: Int32Array;
  /** [(acceptedCount + 1) x vocabSize]: the target's rows that the emitted tokens were verified against. */
  targetLogits: Float32Array;
  /** Time spent drafting, and in the target's pass and the verification (ms, measured natively). */
  draftMs: number;
  targetMs: number;
}

export interface ChainRunOptions extends Omit<ChainStepOptions, 'draftStream' | 'targetStream'> {
  /** Step s verifies with Philox stream streamBase + 2 s and drafts with streamBase + 2 s + 1. Default 0. */
  streamBase?: Seed;
  /** s of the first step. Default 0. */
  firstStep?: number;
  /** Steps at most. Default 1. */
  maxSteps?: number;
  /** No step starts once this many ms have passed (0, the default: no limit). */
  maxMs?: number;
  /**
   * Tokens the caller may still emit (at most 2^52): a step starts only if a whole chain fits (remaining > count),
   * and only with room for count + 1 more tokens in both contexts. The first step always runs.
   */
  remaining?: number;
  /** A step that emits one of these ends the run. */
  stopTokens?: Int32Array | number[];
  /** Return the target's row of every emitted token (targetLogits). Default false. */
  keepLogits?: boolean;
  /**
   * Aborting ends the run after the step in progress (already aborted: after the first step); the
   * result holds the steps run (it does not reject).
   */
  interrupt?: AbortSignal;
  /**
   * Run the steps together with the batched chain runs that other sequences of the same two models
   * have in progress: each drafting pass and the target's pass run once for all of them, so the
   * weights stream once per pass for the batch. Each run's tokens, logits and caches are the bits it
   * would get alone (the engine's passes are batch invariant); only the time per step changes. A run
   * joins at the next step and leaves when it ends. Default false.
   */
  batch?: boolean;
}

/** Batched chain steps run so far in this process, and the chain runs they held (runs / steps: the mean batch). */
export function chainBatchStats(): { steps: number; runs: number } {
  return native.chainJoinStats();
}

export interface ChainRunResult {
  /** Draft tokens accepted, per step (its length is the number of steps run). */
  acceptedCounts: Int32Array;
  /** Every emitted token, step after step (step i emits acceptedCounts[i] + 1). */
  tokens: Int32Array;
  /** With keepLogits: [tokens.length x vocabSize], the target's row each token was verified against. */
  targetLogits?: Float32Array;
  draftMs: number;
  targetMs: number;
}

/** One KV cache. Evaluations run one at a time in call order. */
export class Sequence {
  readonly model: Model;
  /** The model's weightsVersion when this sequence (or the one it was forked from) was created: its weights. */
  readonly weightsVersion: number;
  #native: NativeSequence | null;
  #queue: Promise<unknown> = Promise.resolve();
  #pending = 0;
  #disposedWithModel = false;

  /** @internal */
  constructor(model: Model, handle: NativeSequence, weightsVersion = model.weightsVersion) {
    this.model = model;
    this.#native = handle;
    this.weightsVersion = weightsVersion;
  }

  #get(): NativeSequence {
    if (!this.#native) throw this.#gone();
    return this.#native;
  }

  /** The error of a call after dispose: the model's own disposal names the model. */
  #gone(): Error {
    return disposedError(this.#disposedWithModel ? 'model' : 'sequence');
  }

  /** Tokens held in the cache. */
  get length(): number {
    return this.#get().length;
  }

  get capacity(): number {
    return this.#get().capacity;
  }

  /** The KV cache's element type: 'f16' or 'f32' (see Model.createSequence). */
  get kvType(): KvType {
    return this.#get().kvType;
  }

  get disposed(): boolean {
    return this.#native === null;
  }

  /** Evaluates tokens after the current length and returns their logits [n x V] (or [1 x V] with lastOnly). */
  async evaluate(tokens: Int32Array | number[], options: EvaluateOptions = {}): Promise<Float32Array> {
    const handle = this.#get();
    const t = ownTokens(tokens); // read now: the call may start after the caller changed the array
    checkKeys(checkOptions(options)!, ['treeParents', 'lastOnly', 'signal']);
    if (options.lastOnly !== undefined && typeof options.lastOnly !== 'boolean') throw new TypeError('options.lastOnly must be a boolean');
    const signal = checkSignal(options.signal, 'options.signal');
    const lastOnly = options.lastOnly ?? false;
    const parents = options.treeParents instanceof Int32Array ? options.treeParents.slice() : (options.treeParents ?? null);
    const chunked = signal !== undefined && !parents && t.length > PREFILL_CHUNK;
    const fits = () => handle.length + t.length <= handle.capacity; // else one call, for the native error
    const run = async () => {
      if (!this.#native) throw this.#gone();
      throwIfAborted(signal);
      if (!chunked || !fits()) return handle.evaluate(t, parents, lastOnly);
      const start = handle.length;
      const V = this.model.info.vocabSize;
      checkTokenIds(t, 'tokens', V); // every id before the first chunk runs: a bad one is named by its index in `tokens`
      const all = lastOnly ? undefined : new Float32Array(t.length * V);
      let last: Float32Array | undefined;
      try {
        for (let i = 0; i < t.length; i += PREFILL_CHUNK) {
          if (i > 0) throwIfAborted(signal);
          if (!this.#native) throw this.#gone();
          const end = Math.min(t.length, i + PREFILL_CHUNK);
          last = await handle.evaluate(t.subarray(i, end), null, lastOnly);
          all?.set(last, i * V);
        }
      } catch (e) {
        if (this.#native) handle.truncate(start);
        throw e;
      }
      return all ?? last!;
    };
    return this.#enqueue(run);
  }

  /**
   * Drafts a chain in one native call: evaluates `tokens` after the current length, then for
   * i < count draws token i from the latest row (exactly as sampleLogits does, at Philox position
   * `position + i` of `stream`) and, except for the last, evaluates it. The cache ends holding
   * `tokens` and the first count - 1 drafted tokens, as the equivalent loop of evaluate() and
   * sampleLogits() would leave it; on an error or abort it is left as it was. A drawn stop token
   * ends the chain early: the cache then holds `tokens` and the drafted tokens before it.
   */
  async draft(tokens: Int32Array | number[], options: DraftOptions): Promise<DraftResult> {
    const handle = this.#get();
    const t = ownTokens(tokens); // read now: the call may start after the caller changed the array
    if (t.length === 0) throw new RangeError('tokens must not be empty');
    if (typeof options !== 'object' || options === null) throw new TypeError('options must be an object');
    checkKeys(options, ['count', 'sampling', 'seed', 'stream', 'position', 'positions', 'vocabSize', 'stopTokens', 'signal']);
    const { count, vocabSize, position, positions } = options;
    checkInteger(count, 'options.count', 1);
    const vm = this.model.info.vocabSize;
    if (vocabSize !== undefined) checkInteger(vocabSize, 'options.vocabSize', 1, vm);
    if (position !== undefined) checkInteger(position, 'options.position', 0, 0xffffffff);
    const pos = positions === undefined ? undefined : toTokenArray(positions, 'options.positions');
    if (pos && pos.length !== count) throw new RangeError(`options.positions has length ${pos.length}, expected options.count = ${count}`);
    if (pos) for (let i = 0; i < pos.length; i++) if (pos[i]! < 0) throw new RangeError(`options.positions[${i}] must be >= 0, got ${pos[i]}`);
    const stop = options.stopTokens === undefined ? undefined : checkTokenIds(options.stopTokens, 'options.stopTokens', vm);
    const signal = checkSignal(options.signal, 'options.signal');
    if (options.sampling !== undefined) checkSampling(options.sampling, 'options.sampling');
    const native = {
      count,
      vocabSize: vocabSize ?? vm,
      sampling: options.sampling ?? { temperature: 0 },
      seed: options.seed ?? 0,
      stream: options.stream ?? 0,
      position: position ?? 0,
      ...(pos ? { positions: pos } : {}),
      ...(stop && stop.length > 0 ? { stopTokens: stop } : {}),
    };
    const run = async () => {
      if (!this.#native) throw this.#gone();
      throwIfAborted(signal);
      const onAbort = () => handle.cancel();
      signal?.addEventListener('abort', onAbort, { once: true });
      try {
        return await handle.draft(t, native);
      } catch (e) {
        if (signal?.aborted && (e as { code?: string }).code === 'OSD_ABORTED') throw abortError(signal);
        throw e;
      } finally {
        signal?.removeEventListener('abort', onAbort);
      }
    };
    return this.#enqueue(run);
  }

  /**
   * One speculative chain step in one native call; this sequence is the target's. `draft` (idle,
   * another sequence) evaluates `pending` and drafts options.count tokens as draft() would, this
   * sequence evaluates options.last and them in one pass, and verifyChain decides, with the same
   * result, bit for bit, as those three calls. Both caches then hold what was accepted: this one
   * `last` and the accepted tokens, the draft's `pending` and the accepted tokens it evaluated. On an
   * error both are left as they were.
   */
  async chainStep(draft: Sequence, pending: Int32Array | number[], options: ChainStepOptions): Promise<ChainStepResult> {
    return this.#withDraft(draft, pending, options, ['draftStream', 'targetStream'], (h, dh, t, o) =>
      h.chainStep(dh, t, { ...o, draftStream: options.draftStream ?? 0, targetStream: options.targetStream ?? 0 }),
    );
  }

  /**
   * chainStep's steps back to back in one native call (up to options.maxSteps), each as the
   * speculative decoder would run it next: step s with the Philox streams of step firstStep + s,
   * the draft's pending tokens and `last` taken from the step before. A run ends early at a stop
   * token, after maxMs, or when the next step's whole chain would not fit (options.remaining, or
   * either context). Both caches then hold every step's accepted tokens, as after the same
   * chainStep calls, with the same tokens.
   */
  async chainRun(draft: Sequence, pending: Int32Array | number[], options: ChainRunOptions): Promise<ChainRunResult> {
    const extra = ['streamBase', 'firstStep', 'maxSteps', 'maxMs', 'remaining', 'stopTokens', 'keepLogits', 'interrupt', 'batch'] as const;
    const interrupt = checkSignal(options?.interrupt, 'options.interrupt');
    if (options !== null && typeof options === 'object') {
      if (options.firstStep !== undefined) checkInteger(options.firstStep, 'options.firstStep', 0, 0x7fffffff);
      if (options.maxSteps !== undefined) checkInteger(options.maxSteps, 'options.maxSteps', 1, 0x7fffffff);
      if (options.maxMs !== undefined && !(typeof options.maxMs === 'number' && options.maxMs >= 0 && Number.isFinite(options.maxMs)))
        throw new RangeError(`options.maxMs must be a finite number >= 0, got ${String(options.maxMs)}`);
      if (options.remaining !== undefined) checkInteger(options.remaining, 'options.remaining', 1, 2 ** 52);
      if (options.keepLogits !== undefined && typeof options.keepLogits !== 'boolean') throw new TypeError('options.keepLogits must be a boolean');
      if (options.batch !== undefined && typeof options.batch !== 'boolean') throw new TypeError('options.batch must be a boolean');
    }
    const stop = options?.stopTokens === undefined ? undefined : checkTokenIds(options.stopTokens, 'options.stopTokens', this.model.info.vocabSize);
    return this.#withDraft(draft, pending, options, extra, async (h, dh, t, o) => {
      const p = h.chainRun(dh, t, {
        ...o,
        streamBase: options.streamBase ?? 0,
        firstStep: options.firstStep ?? 0,
        maxSteps: interrupt?.aborted ? 1 : (options.maxSteps ?? 1),
        maxMs: options.maxMs ?? 0,
        ...(options.remaining !== undefined ? { remaining: options.remaining } : {}),
        ...(stop && stop.length > 0 ? { stopTokens: stop } : {}),
        keepLogits: options.keepLogits ?? false,
        batch: options.batch ?? false,
      });
      // Registered once the run is queued natively: cancel() then reaches this run's flag. (While the
      // run keeps both cores busy, the event loop may only get to it a few steps later.)
      const onInterrupt = () => h.cancel();
      interrupt?.addEventListener('abort', onInterrupt, { once: true });
      try {
        return await p;
      } finally {
        interrupt?.removeEventListener('abort', onInterrupt);
      }
    });
  }

  /**
   * chainStep's and chainRun's common part: checks the draft sequence (idle, another one), the
   * pending tokens and the shared options, then runs `call` on this sequence's queue with the draft
   * counting it as its own pending call (its truncate() and fork() refuse until it settles; the
   * count drops before the caller resumes) and its later calls queued behind it.
   */
  #withDraft<R>(
    draft: Sequence,
    pending: Int32Array | number[],
    options: ChainStepOptions,
    extraKeys: readonly string[],
    call: (h: NativeSequence, dh: NativeSequence, t: Int32Array, o: object) => Promise<R>,
  ): Promise<R> {
    const handle = this.#get();
    if (!(draft instanceof Sequence)) throw new TypeError('draft must be a Sequence');
    if (draft === this) throw new TypeError("draft must be another sequence than the target's");
    const dh = draft.#idle('the draft sequence');
    const t = ownTokens(pending);
    if (t.length === 0) throw new RangeError('pending must not be empty');
    if (typeof options !== 'object' || options === null) throw new TypeError('options must be an object');
    checkKeys(options, ['last', 'count', 'vocabSize', 'sampling', 'seed', ...extraKeys]);
    checkInteger(options.last, 'options.last', 0, this.model.info.vocabSize - 1);
    checkInteger(options.count, 'options.count', 1);
    if (options.vocabSize !== undefined) checkInteger(options.vocabSize, 'options.vocabSize', 1, Math.min(this.model.info.vocabSize, draft.model.info.vocabSize));
    if (options.sampling !== undefined) checkSampling(options.sampling, 'options.sampling');
    const common = {
      last: options.last,
      count: options.count,
      ...(options.vocabSize !== undefined ? { vocabSize: options.vocabSize } : {}),
      sampling: options.sampling ?? { temperature: 0 },
      seed: options.seed ?? 0,
    };
    draft.#pending++;
    const run = async () => {
      try {
        if (!this.#native) throw this.#gone();
        if (!draft.#native) throw draft.#gone();
        return await call(handle, dh, t, common);
      } finally {
        draft.#pending--;
      }
    };
    const result = this.#enqueue(run);
    draft.#queue = result.catch(() => undefined);
    return result;
  }

  /** Runs `run` after the calls queued before it; counts it as pending until it settles. */
  #enqueue<T>(run: () => Promise<T>): Promise<T> {
    this.#pending++;
    const result = this.#queue.then(run, run).finally(() => void this.#pending--);
    this.#queue = result.catch(() => undefined);
    return result;
  }

  /** The cache must not change under an evaluate() or draft() still queued or running. */
  #idle(what: string): NativeSequence {
    const h = this.#get();
    if (this.#pending > 0) throw new Error(`${what}: an evaluate() or draft() on this sequence has not finished; await it first`);
    return h;
  }

  /** Drops everything after the first n tokens. */
  truncate(n: number): void {
    const h = this.#idle('truncate');
    if (typeof n !== 'number') throw new TypeError(`n must be a number, got ${typeof n}`);
    if (!Number.isInteger(n) || n < 0 || n > this.length) throw new RangeError(`n must be an integer in [0, ${this.length}] (the sequence's length), got ${n}`);
    h.truncate(n);
  }

  /** After a tree evaluation starting at `base`, keeps the batch nodes `path` as positions base, base + 1, ... */
  keepPath(base: number, path: Int32Array | number[]): void {
    this.#idle('keepPath').keepPath(base, toTokenArray(path, 'path'));
  }

  /** A copy of this sequence, cache included. */
  fork(): Sequence {
    // Refused once the model's dispose() has begun: the copy would outlive it.
    if (this.model.disposed) throw disposedError('model');
    const copy = new Sequence(this.model, this.#idle('fork').fork(), this.weightsVersion);
    this.model.adopt(copy);
    return copy;
  }

  /** Waits for running evaluations, then frees the cache. Idempotent. */
  async dispose(): Promise<void> {
    await this.#queue;
    this.#native?.dispose();
    this.#native = null;
    this.model.release(this);
  }

  /** Model.dispose(): as dispose(), and later calls say the model was disposed. @internal */
  async disposeWithModel(): Promise<void> {
    this.#disposedWithModel = true;
    await this.dispose();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.dispose();
  }
}
