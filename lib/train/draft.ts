// Building a draft for any target by distillation (trainDraft, `osd train-draft`):
//
// - init: a narrow llama sharing the target's tokenizer, its tied embeddings the target's projected
//   onto their top singular directions (truncated SVD), its layers random;
// - train: the target's own logits are the teacher (top-k probabilities plus the leftover mass,
//   forward KL) on windows of the given text; each teacher batch is trained on once fresh and then
//   replayed `replay - 1` times from a buffer, since the teacher costs several draft steps;
// - held-out forward KL and top-1 agreement (draft argmax = target argmax) measured as it goes;
// - the draft is written as GGUF (llama architecture, so llama.cpp loads it too), atomically.
import { existsSync, renameSync, rmSync, statSync } from 'node:fs';
import { resolve } from 'node:path';
import { addon } from '../addon.js';
import { checkCallback, checkInteger, checkKeys, checkOptions } from '../args.js';
import { loadModel, Model, isStoreType, STORE_TYPES, type StoreType } from '../Model.js';
import { createTrainer, loadTrainerCheckpoint, type Trainer, type TrainBatch } from '../Trainer.js';
import { checkSignal, throwIfAborted } from '../withAbortSignal.js';
import { kvU32, readGgufLayout, readTensorBytes, writeGgufRaw, type OutTensor } from './ggufRewrite.js';
import { writeLlamaInit, XorShift, type LlamaShape } from './llamaInit.js';

/** A draft's shape; its vocabulary is the target's. */
export type DraftShape = Omit<LlamaShape, 'vocabSize'>;

/** 128 wide, 2 layers: about a tenth of SmolLM2-135M's decode time per token on a CPU. */
export const DEFAULT_DRAFT_SHAPE: Omit<DraftShape, 'contextLength'> = { embeddingLength: 128, layers: 2, heads: 4, kvHeads: 2, feedForwardLength: 384 };

// ---- the target's embeddings, projected --------------------------------------------------------

/** Rows of the Gram matrix sum at most this many multiply-adds (rows are sampled evenly beyond it). */
const GRAM_BUDGET = 2e10;

/** E^T E [D x D] (float64) over the rows `row(i)` gives, i < n: every row, or every stride-th. */
export function gramMatrix(rows: (start: number, count: number) => Float32Array, n: number, D: number, budget = GRAM_BUDGET): { G: Float64Array; rowsUsed: number } {
  const stride = Math.max(1, Math.ceil((n * D * D) / 2 / budget));
  const G = new Float64Array(D * D);
  const row = new Float64Array(D);
  let used = 0;
  const chunk = stride === 1 ? 4096 : 1;
  for (let start = 0; start < n; start += stride === 1 ? chunk : stride) {
    const count = Math.min(chunk, n - start);
    const E = rows(start, count);
    for (let r = 0; r < count; r++) {
      for (let i = 0; i < D; i++) row[i] = E[r * D + i]!;
      for (let i = 0; i < D; i++) {
        const a = row[i]!;
        if (a === 0) continue;
        const off = i * D;
        for (let j = i; j < D; j++) G[off + j] = G[off + j]! + a * row[j]!;
      }
      used++;
    }
  }
  for (let i = 0; i < D; i++) for (let j = 0; j < i; j++) G[i * D + j] = G[j * D + i]!;
  return { G, rowsUsed: used };
}

/** The top-k eigenvectors of a symmetric G [D x D] (columns of Q [D x k], orthonormal), by subspace iteration. */
export function topEigenvectors(G: Float64Array, D: number, k: number, iterations = 30, seed = 1): Float64Array {
  const rng = new XorShift(seed);
  let Q = new Float64Array(D * k); // row-major [D x k]
  for (let i = 0; i < Q.length; i++) Q[i] = rng.normal();
  const orth = (M: Float64Array) => {
    // Modified Gram-Schmidt on the columns.
    for (let c = 0; c < k; c++) {
      for (let p = 0; p < c; p++) {
        let dot = 0;
        for (let i = 0; i < D; i++) dot += M[i * k + c]! * M[i * k + p]!;
        for (let i = 0; i < D; i++) M[i * k + c] = M[i * k + c]! - dot * M[i * k + p]!;
      }
      let nrm = 0;
      for (let i = 0; i < D; i++) nrm += M[i * k + c]! ** 2;
      nrm = Math.sqrt(nrm) || 1;
      for (let i = 0; i < D; i++) M[i * k + c] = M[i * k + c]! / nrm;
    }
  };
  orth(Q);
  const next = new Float64Array(D * k);
  for (let it = 0; it < iterations; it++) {
    next.fill(0);
    for (let i = 0; i < D; i++)
      for (let j = 0; j < D; j++) {
        const g = G[i * D + j]!;
        for (let c = 0; c < k; c++) next[i * k + c] = next[i * k + c]! + g * Q[j * k + c]!;
      }
    Q = Float64Array.from(next);
    orth(Q);
  }
  return Q;
}

/** The top-`k` right singular vectors of E [n x D] (columns of Q [D x k]): eigenvectors of E^T E. */
export function topRightSingularVectors(E: Float32Array, n: number, D: number, k: number, iterations = 30, seed = 1): Float64Array {
  const { G } = gramMatrix((s, c) => E.subarray(s * D, (s + c) * D), n, D, Infinity);
  return topEigenvectors(G, D, k, iterations, seed);
}

/**
 * Writes a draft's initial GGUF (F32): tied embeddings E Q, with E the target's token embeddings
 * and Q their top `embeddingLength` right singular vectors; an output-norm gain that keeps the first
 * logits moderate; random layers (std 0.02, residual projections scaled by 1/sqrt(2 L)). The
 * target's tokenizer and chat template are copied, so the draft shares its vocabulary.
 */
export async function writeDraftInit(path: string, target: Model, shape: DraftShape, seed = 1, onLog: (s: string) => void = () => {}, signal?: AbortSignal): Promise<void> {
  const t0 = performance.now();
  const { vocabSize: V, embeddingLength: Dt, path: targetPath, format } = target.info;
  if (format !== 'gguf' || !target.tokenizer) throw new Error(`the target ${targetPath} must be a GGUF file with a tokenizer (the draft copies it)`);
  const d = shape.embeddingLength;
  if (d > Dt) throw new RangeError(`shape.embeddingLength (${d}) must be at most the target's (${Dt})`);
  const rows = (s: number, c: number) => target.embeddingRows(s, c);
  // JavaScript loops of seconds to minutes on wide targets: the event loop gets a turn between steps.
  const yieldTurn = async () => {
    await new Promise((r) => setImmediate(r));
    throwIfAborted(signal);
  };
  const { G, rowsUsed } = gramMatrix(rows, V, Dt);
  await yieldTurn();
  const Q = topEigenvectors(G, Dt, d, 30, seed);
  await yieldTurn();
  const E = new Float32Array(V * d);
  let captured = 0;
  let total = 0;
  for (let s = 0; s < V; s += 4096) {
    if (s > 0) await yieldTurn();
    const n = Math.min(4096, V - s);
    const src = rows(s, n);
    for (let r = 0; r < n; r++) {
      const v = s + r;
      for (let c = 0; c < d; c++) {
        let sum = 0;
        for (let i = 0; i < Dt; i++) sum += src[r * Dt + i]! * Q[i * d + c]!;
        E[v * d + c] = sum;
        captured += sum * sum;
      }
      for (let i = 0; i < Dt; i++) total += src[r * Dt + i]! ** 2;
    }
  }
  // Output gain: logits h.e'_v of a unit-RMS hidden state h spread with a standard deviation of
  // about 2 nats over the vocabulary (the target's own gain would make them ~10x too peaked).
  const rmsEntry = Math.sqrt(captured / (V * d)) || 1;
  const outGain = 2 / (Math.sqrt(d) * rmsEntry);
  onLog(
    `init: SVD of the ${V} x ${Dt} embedding${rowsUsed < V ? ` (${rowsUsed} rows sampled)` : ''} to ${d} dims keeps ${((100 * captured) / (total || 1)).toFixed(1)}% of its energy (${((performance.now() - t0) / 1000).toFixed(1)}s)`,
  );
  writeLlamaInit(path, { ...shape, vocabSize: V }, {
    name: 'online-specdec draft',
    tokenizerPath: targetPath,
    seed: seed * 7919 + 17,
    embedding: E,
    outputNormGain: outGain,
  });
}

/**
 * Writes the llama draft `from` with `layers` blocks: its own, byte for byte, then new F32 blocks
 * that start as exact no-ops (their attention and feed-forward output projections are zero, so
 * each adds nothing to the residual stream). Training then grows capacity from where `from` is.
 */
export function growDraft(from: string, path: string, layers: number, seed = 1, name = 'layers'): void {
  const src = readGgufLayout(from);
  const kv = (key: string) => src.kvs.find((e) => e.key === key);
  const arch = kv('general.architecture');
  if (!arch || arch.raw.subarray(12).toString('utf8') !== 'llama') throw new Error(`${from}: only a llama draft can grow layers`);
  const count = kv('llama.block_count');
  const have = count ? count.raw.readUInt32LE(4) : 0;
  if (!(layers > have)) throw new RangeError(`${name} (${layers}) must be more than the draft's (${have}) to grow it`);
  const rng = new XorShift(seed * 7919 + 29);
  const tensors: OutTensor[] = src.tensors.map((t) => ({ name: t.name, dims: t.dims, type: t.type, data: readTensorBytes(src, t.name) }));
  const block0 = src.tensors.filter((t) => t.name.startsWith('blk.0.'));
  for (let l = have; l < layers; l++)
    for (const t of block0) {
      const n = t.dims.reduce((a, b) => a * b, 1);
      const part = t.name.slice('blk.0.'.length);
      const data = new Float32Array(n);
      if (part.endsWith('norm.weight')) data.fill(1);
      else if (part !== 'attn_output.weight' && part !== 'ffn_down.weight') for (let i = 0; i < n; i++) data[i] = rng.normal() * 0.02;
      tensors.push({ name: `blk.${l}.${part}`, dims: t.dims, type: 0, data: Buffer.from(data.buffer) });
    }
  const kvs = src.kvs.map((e) => (e.key === 'llama.block_count' ? { key: e.key, raw: kvU32(layers) } : e));
  writeGgufRaw(path, kvs, tensors, src.alignment);
}

// ---- the teacher --------------------------------------------------------------------------------

export interface TeacherBatch {
  tokens: Int32Array;
  rows: number;
  seqLen: number;
  k: number;
  indices: Int32Array;
  probs: Float32Array;
  residual: Float32Array;
  /** The teacher's argmax per position. */
  top1: Int32Array;
}

/** Top-k probabilities (and the mass outside them) of each row of [n x V] logits (the native teacherTopK). */
export function topKRows(logits: Float32Array, n: number, V: number, k: number, into: { indices: Int32Array; probs: Float32Array; residual: Float32Array; top1: Int32Array }, rowOffset = 0): void {
  const t = addon.teacherTopK(logits.subarray(0, n * V), V, k);
  into.indices.set(t.ids, rowOffset * k);
  into.probs.set(t.probs, rowOffset * k);
  into.residual.set(t.residual, rowOffset);
  for (let r = 0; r < n; r++) into.top1[rowOffset + r] = t.ids[r * k]!;
}

/** The target's top-k teacher for `rows` windows of seqLen tokens. */
export async function teacherBatch(target: Model, tokens: Int32Array, rows: number, seqLen: number, k: number): Promise<TeacherBatch> {
  const V = target.info.vocabSize;
  const n = rows * seqLen;
  const b: TeacherBatch = { tokens, rows, seqLen, k, indices: new Int32Array(n * k), probs: new Float32Array(n * k), residual: new Float32Array(n), top1: new Int32Array(n) };
  for (let r = 0; r < rows; r++) {
    const logits = await target.forward(tokens.subarray(r * seqLen, (r + 1) * seqLen));
    topKRows(logits, seqLen, V, k, b, r * seqLen);
  }
  return b;
}

export function toTrainBatch(b: TeacherBatch): TrainBatch {
  return { tokens: b.tokens, batchSize: b.rows, seqLen: b.seqLen, kind: 'forward-kl', teacher: { indices: b.indices, probs: b.probs, residual: b.residual } };
}

/** `rows` windows of seqLen tokens, each from a random shard (uniform) at a random offset. */
export function sampleWindows(shards: readonly ArrayLike<number>[], rows: number, seqLen: number, rng: XorShift): Int32Array {
  const tokens = new Int32Array(rows * seqLen);
  for (let r = 0; r < rows; r++) {
    const s = shards[Math.floor(rng.next() * shards.length)]!;
    const start = Math.floor(rng.next() * (s.length - seqLen - 1));
    for (let t = 0; t < seqLen; t++) tokens[r * seqLen + t] = s[start + t]!;
  }
  return tokens;
}

/** Up to `windows` windows of seqLen tokens spread over a shard. */
export function heldOutWindows(shard: ArrayLike<number>, windows: number, seqLen: number): Int32Array {
  const n = Math.min(windows, Math.floor((shard.length - 1) / seqLen));
  const stride = Math.floor((shard.length - seqLen - 1) / Math.max(1, n));
  const tokens = new Int32Array(n * seqLen);
  for (let w = 0; w < n; w++) for (let t = 0; t < seqLen; t++) tokens[w * seqLen + t] = shard[w * stride + t]!;
  return tokens;
}

/** Held-out proxies: forward KL to the sparse teacher and top-1 agreement (draft argmax = target argmax). */
export async function proxyEval(trainer: Trainer, draft: Model | null, b: TeacherBatch): Promise<{ loss: number; top1: number }> {
  const loss = await trainer.evalLoss(toTrainBatch(b));
  let agree = 0;
  if (draft) {
    const V = draft.info.vocabSize;
    for (let r = 0; r < b.rows; r++) {
      const logits = await draft.forward(b.tokens.subarray(r * b.seqLen, (r + 1) * b.seqLen));
      for (let t = 0; t < b.seqLen; t++) {
        let best = 0;
        for (let j = 1; j < V; j++) if (logits[t * V + j]! > logits[t * V + best]!) best = j;
        if (best === b.top1[r * b.seqLen + t]) agree++;
      }
    }
  }
  return { loss, top1: agree / (b.rows * b.seqLen) };
}

// ---- trainDraft -----------------------------------------------------------------------------------

export interface TrainDraftOptions {
  /** The target (a loaded GGUF with a tokenizer). It is only read. */
  target: Model;
  /** Where the draft goes: a GGUF, written atomically when training ends (also when aborted). */
  out: string;
  /** Training text, one string per document; tokenized with the target's tokenizer. */
  texts?: Iterable<string>;
  /** Or token ids already: each array a stream of documents (what `texts` becomes). */
  tokens?: readonly ArrayLike<number>[];
  /**
   * Held-out token ids for the progress figures. Default: every 20th document of `texts` (by
   * position; with fewer than 20, the last 5% of their tokens), or the last 5% of the first `tokens`
   * stream, left out of training.
   */
  heldOut?: ArrayLike<number>;
  /** Continue from this draft (a path or a model sharing the target's vocabulary) instead of a new one. */
  from?: string | Model;
  /**
   * The new draft's shape (default 128 wide, 2 layers, 4 heads, 2 KV heads, 384 FFN; the target's
   * context length). With `from` (a path to a llama draft) only `layers` may be given, more than it
   * has: the draft grows blocks that start as no-ops (growDraft).
   */
  shape?: Partial<DraftShape>;
  /** How the draft's matrices are stored (default F16). */
  type?: StoreType;
  /** Wall-clock budget in minutes (default 30). */
  minutes?: number;
  /** Or a budget of optimizer steps; training stops at whichever comes first. */
  steps?: number;
  /** Peak learning rate (default 1.5e-3; warm-up, then cosine decay to a tenth). */
  lr?: number;
  /** Teacher entries per position (default 64). */
  topK?: number;
  /** Windows per batch (default 8) and tokens per window (default 128). */
  rows?: number;
  seqLen?: number;
  /** Optimizer steps per teacher batch (default 3: once fresh, twice replayed). */
  replay?: number;
  /** Seeds the init and the window sampling (default 1). */
  seed?: number;
  /**
   * A checkpoint file: the trainer is saved there every 5 minutes and at the end (atomically), and a
   * run given an existing checkpoint resumes from it (weights, AdamW moments, step, schedule).
   */
  checkpoint?: string;
  signal?: AbortSignal;
  onProgress?: (p: TrainDraftProgress) => void;
  /** Minutes between held-out measurements (default 5, or a sixth of a shorter `minutes`, at least 0.5). */
  evalMinutes?: number;
  /**
   * Restrict the draft's LM head (Model.withHead): a count N keeps the N ids most frequent in the
   * training tokens (ties to the lower id; the target's end-of-sequence ids always in), or give the
   * ids. On a large vocabulary the head is most of a draft's cost: SmolLM2's 49,152 rows are about
   * nine tenths of a 4-layer, 128-wide draft's weights. Default: the head of `from`, or the whole
   * vocabulary for a new draft.
   */
  headTokens?: number | ArrayLike<number>;
}

export interface TrainDraftProgress {
  phase: 'init' | 'train' | 'save';
  /** Of the budget (time or steps, whichever is nearer its end). */
  fraction: number;
  step: number;
  teacherTokens: number;
  /** Exponential moving average of the training loss (NaN before the first step). */
  trainLoss: number;
  /** Teacher tokens per second, and tokens trained per second (with replays). */
  teacherTokensPerSecond: number;
  trainTokensPerSecond: number;
  seconds: number;
  /** The latest held-out measurement. */
  heldOut?: HeldOutPoint;
  /** A line for logs (init). */
  message?: string;
}

export interface HeldOutPoint {
  step: number;
  teacherTokens: number;
  minutes: number;
  trainLoss: number;
  /** Forward KL to the target's top-k teacher. */
  loss: number;
  /** Share of positions where the draft's argmax is the target's. */
  top1: number;
}

export interface TrainDraftResult {
  path: string;
  bytes: number;
  shape: DraftShape;
  type: StoreType;
  /** Optimizer steps in total (a resumed run counts the checkpoint's). */
  steps: number;
  teacherTokens: number;
  seconds: number;
  teacherSeconds: number;
  trainSeconds: number;
  aborted: boolean;
  /** Held-out measurements, from before the first step to the end. */
  curve: HeldOutPoint[];
  /** Ids the draft's head scores (its vocabulary, unless restricted). */
  headTokens: number;
}

const trainDraftKeys = ['target', 'out', 'texts', 'tokens', 'heldOut', 'from', 'shape', 'type', 'minutes', 'steps', 'lr', 'topK', 'rows', 'seqLen', 'replay', 'seed', 'checkpoint', 'signal', 'onProgress', 'evalMinutes', 'headTokens'];
const shapeKeys = ['embeddingLength', 'layers', 'heads', 'kvHeads', 'feedForwardLength', 'contextLength'];

function positiveNumber(v: unknown, name: string): number {
  if (typeof v !== 'number') throw new TypeError(`${name} must be a number, got ${typeof v}`);
  if (!(v > 0) || !Number.isFinite(v)) throw new RangeError(`${name} must be a finite number > 0, got ${v}`);
  return v;
}

/**
 * Documents to one token stream. Without a given held-out set, every 20th document is held out, or
 * with fewer than 20 documents the last 5% of the stream.
 */
async function tokenizeTexts(target: Model, texts: Iterable<string>, heldOutGiven: boolean, signal: AbortSignal | undefined): Promise<{ train: number[]; heldOut: number[] }> {
  const tok = target.tokenizer!;
  const docs: number[][] = [];
  let i = 0;
  let chars = 0;
  for (const text of texts) {
    if (typeof text !== 'string') throw new TypeError(`texts[${i}] must be a string, got ${typeof text}`);
    // Let the event loop run between megabytes of text.
    if ((chars += text.length) > 1 << 20) {
      chars = 0;
      await new Promise((r) => setImmediate(r));
      throwIfAborted(signal);
    }
    // Documents start as the tokenizer starts a text (BOS where it adds one), else after an EOS.
    const ids = Array.from(tok.encode(text));
    if (!tok.addBos && tok.eos >= 0) ids.unshift(tok.eos);
    docs.push(ids);
    i++;
  }
  const train: number[] = [];
  const heldOut: number[] = [];
  const byDocument = !heldOutGiven && docs.length >= 20;
  for (const [j, d] of docs.entries()) for (const t of d) (byDocument && j % 20 === 19 ? heldOut : train).push(t);
  if (!heldOutGiven && !byDocument) {
    // Not push(...splice()): millions of arguments overflow the stack.
    const cut = Math.floor(train.length * 0.95);
    for (let j = cut; j < train.length; j++) heldOut.push(train[j]!);
    train.length = cut;
  }
  return { train, heldOut };
}

/**
 * The `count` ids most frequent in `shards` (ties to the lower id), the `always` ids included;
 * ascending. A BPE vocabulary's lower ids are its earlier merges, so ids never seen fill up from the
 * most common pieces.
 */
export function frequentTokens(shards: readonly ArrayLike<number>[], count: number, V: number, always: readonly number[] = []): Int32Array {
  checkInteger(V, 'vocabSize', 1);
  checkInteger(count, 'count', 1);
  if (!Array.isArray(shards)) throw new TypeError('shards must be an array of token id arrays');
  if (!Array.isArray(always)) throw new TypeError('always must be an array of token ids');
  const freq = new Float64Array(V);
  for (const [k, s] of shards.entries()) {
    if (s === null || typeof s !== 'object' || typeof s.length !== 'number') throw new TypeError(`shards[${k}] must be an array of token ids`);
    for (let i = 0; i < s.length; i++) {
      const id = s[i]!;
      if (!(id >= 0 && id < V && Number.isInteger(id))) throw new RangeError(`shards[${k}][${i}] must be a token id in [0, ${V - 1}], got ${id}`);
      freq[id]!++;
    }
  }
  for (const [i, id] of always.entries()) {
    if (!(id >= 0 && id < V && Number.isInteger(id))) throw new RangeError(`always[${i}] must be a token id in [0, ${V - 1}], got ${id}`);
    freq[id] = Infinity;
  }
  const order = Int32Array.from({ length: V }, (_, i) => i).sort((a, b) => freq[b]! - freq[a]! || a - b);
  return order.subarray(0, Math.min(count, V)).sort();
}

/**
 * Builds a draft for `target` by distilling it on text: a new narrow llama (or `from`, a draft
 * to continue) learns the target's next-token distributions (top-k plus the rest, forward KL).
 * Runs for `minutes` (or `steps`), off the event loop between steps; abort with `signal` and the
 * draft trained so far is still written. The result has the held-out curve.
 */
export async function trainDraft(options: TrainDraftOptions): Promise<TrainDraftResult> {
  if (options === undefined) throw new TypeError('options must be an object ({ target, out, texts | tokens, ... })');
  checkKeys(checkOptions(options as unknown as Record<string, unknown>)!, trainDraftKeys);
  const { target } = options;
  if (!(target instanceof Model)) throw new TypeError('target must be a Model (loadModel)');
  if (typeof options.out !== 'string' || options.out.length === 0) throw new TypeError('out must be a non-empty string (the draft GGUF)');
  if ((options.texts === undefined) === (options.tokens === undefined)) throw new TypeError('give texts (strings) or tokens (token id arrays), one of them');
  const V = target.info.vocabSize;
  const type = options.type ?? 'F16';
  if (!isStoreType(type)) throw new RangeError(`type must be one of ${STORE_TYPES.join(', ')}, got ${String(type)}`);
  const minutes = options.minutes === undefined ? (options.steps === undefined ? 30 : Infinity) : positiveNumber(options.minutes, 'minutes');
  const stepBudget = options.steps === undefined ? Infinity : checkInteger(options.steps, 'steps', 1);
  const lr = options.lr === undefined ? 1.5e-3 : positiveNumber(options.lr, 'lr');
  const k = checkInteger(options.topK ?? 64, 'topK', 1, V);
  const rows = checkInteger(options.rows ?? 8, 'rows', 1, 4096);
  const seqLen = checkInteger(options.seqLen ?? 128, 'seqLen', 2, target.info.contextLength);
  const replay = checkInteger(options.replay ?? 3, 'replay', 1, 64);
  const seed = checkInteger(options.seed ?? 1, 'seed', 0, 2 ** 31 - 1);
  // A short budget gets its curve too: six points, at most 5 minutes and at least 30 s apart.
  const evalMinutes = options.evalMinutes === undefined ? Math.min(5, Math.max(0.5, minutes / 6)) : positiveNumber(options.evalMinutes, 'evalMinutes');
  checkSignal(options.signal);
  checkCallback(options.onProgress, 'onProgress');
  if (options.checkpoint !== undefined && (typeof options.checkpoint !== 'string' || options.checkpoint.length === 0)) throw new TypeError('checkpoint must be a non-empty string');
  // The draft is written last: over the target or the checkpoint it would destroy what it came from.
  for (const [name, other] of [['the target', target.info.path], ['checkpoint', options.checkpoint], ['from', typeof options.from === 'string' ? options.from : undefined]] as const)
    if (other !== undefined && resolve(other) === resolve(options.out)) throw new RangeError(`out must not be ${name === 'the target' ? "the target's file" : `the ${name} file`} (${options.out})`);
  const resuming = options.checkpoint !== undefined && existsSync(options.checkpoint);
  if (resuming && (options.from !== undefined || options.shape !== undefined))
    throw new TypeError(`checkpoint ${options.checkpoint} exists, and a run resumes it as it is: from and shape do not apply (remove them, or the checkpoint)`);
  if (resuming && options.headTokens !== undefined)
    throw new TypeError(`checkpoint ${options.checkpoint} exists, and a run resumes it as it is: headTokens does not apply (remove it, or the checkpoint)`);
  const headCount = typeof options.headTokens === 'number' ? checkInteger(options.headTokens, 'headTokens', 1, V) : undefined;
  if (options.headTokens !== undefined && headCount === undefined && (options.headTokens === null || typeof options.headTokens !== 'object' || typeof options.headTokens.length !== 'number'))
    throw new TypeError('headTokens must be a count or an array of token ids');
  const grow = options.from !== undefined && options.shape !== undefined ? options.shape.layers : undefined;
  if (options.shape !== undefined && options.from !== undefined) {
    const keys = options.shape === null || typeof options.shape !== 'object' ? [] : Object.keys(options.shape).filter((key) => (options.shape as Record<string, unknown>)[key] !== undefined);
    if (keys.length !== 1 || keys[0] !== 'layers' || typeof options.from !== 'string')
      throw new TypeError('shape is for a new draft: from continues a draft of its own shape (only shape.layers may be given, with from a path, to grow it)');
  }
  if (options.shape !== undefined) {
    if (options.shape === null || typeof options.shape !== 'object') throw new TypeError('shape must be an object');
    checkKeys(options.shape as Record<string, unknown>, shapeKeys, 'shape');
  }
  // An option set to undefined takes its default, as everywhere in the package.
  const given = Object.fromEntries(Object.entries(options.shape ?? {}).filter(([, v]) => v !== undefined)) as Partial<DraftShape>;
  const shape: DraftShape = { ...DEFAULT_DRAFT_SHAPE, contextLength: target.info.contextLength, ...given };
  for (const key of shapeKeys) checkInteger(shape[key as keyof DraftShape], `shape.${key}`, 1);
  if (shape.embeddingLength % shape.heads !== 0) throw new RangeError(`shape.heads (${shape.heads}) must divide shape.embeddingLength (${shape.embeddingLength})`);
  if (shape.heads % shape.kvHeads !== 0) throw new RangeError(`shape.kvHeads (${shape.kvHeads}) must divide shape.heads (${shape.heads})`);
  if ((shape.embeddingLength / shape.heads) % 2 !== 0) throw new RangeError('shape.embeddingLength / shape.heads must be even (RoPE rotates pairs)');
  if (options.from === undefined && shape.contextLength < seqLen) throw new RangeError(`shape.contextLength (${shape.contextLength}) must be at least seqLen (${seqLen})`);

  if (options.heldOut !== undefined) {
    const h = options.heldOut;
    if (typeof h !== 'object' || h === null || typeof h.length !== 'number') throw new TypeError('heldOut must be an array of token ids');
    for (let j = 0; j < h.length; j++) if (!Number.isInteger(h[j]) || h[j]! < 0 || h[j]! >= V) throw new RangeError(`heldOut[${j}] must be a token id in [0, ${V - 1}], got ${h[j]}`);
  }

  // Data.
  let shards: ArrayLike<number>[];
  let held: ArrayLike<number> | undefined = options.heldOut;
  if (options.texts !== undefined) {
    if (!target.tokenizer) throw new Error(`the target ${target.info.path} has no tokenizer: give tokens instead of texts`);
    if (typeof options.texts === 'string') throw new TypeError('texts must be an iterable of strings (documents), not one string: give [text]');
    if (options.texts === null || typeof (options.texts as Iterable<string>)[Symbol.iterator] !== 'function') throw new TypeError('texts must be an iterable of strings (documents)');
    const t = await tokenizeTexts(target, options.texts, held !== undefined, options.signal);
    shards = [t.train];
    held ??= t.heldOut;
  } else {
    if (!Array.isArray(options.tokens)) throw new TypeError('tokens must be an array of token id arrays');
    shards = [...options.tokens];
    for (const [i, s] of shards.entries()) {
      if (s === null || typeof s !== 'object' || typeof s.length !== 'number') throw new TypeError(`tokens[${i}] must be an array of token ids`);
      for (let j = 0; j < s.length; j++) {
        const id = s[j]!;
        if (!Number.isInteger(id) || id < 0 || id >= V) throw new RangeError(`tokens[${i}][${j}] must be a token id in [0, ${V - 1}], got ${id}`);
      }
    }
    if (held === undefined && shards.length > 0) {
      const first = shards[0]!;
      const cut = Math.floor(first.length * 0.95);
      held = Array.prototype.slice.call(first, cut) as number[];
      shards[0] = Array.prototype.slice.call(first, 0, cut) as number[];
    }
  }
  shards = shards.filter((s) => s.length >= seqLen + 2);
  if (shards.length === 0) throw new RangeError(`the training text must hold at least one stream of ${seqLen + 2} tokens (seqLen + 2); give more text or a smaller seqLen`);

  const progress = options.onProgress ?? (() => {});
  const started = performance.now();
  const since = () => (performance.now() - started) / 1000;
  let trainer: Trainer;
  if (resuming) {
    trainer = await loadTrainerCheckpoint(options.checkpoint!);
    const snap = await trainer.snapshot();
    const vocab = snap.info.vocabSize;
    await snap.dispose();
    if (vocab !== V) {
      await trainer.dispose();
      throw new RangeError(`checkpoint ${options.checkpoint}: its draft's vocabulary (${vocab} tokens) must be the target's (${V})`);
    }
    progress({ phase: 'init', fraction: 0, step: trainer.steps, teacherTokens: 0, trainLoss: NaN, teacherTokensPerSecond: 0, trainTokensPerSecond: 0, seconds: since(), message: `resumed from ${options.checkpoint} at step ${trainer.steps}` });
  } else {
    let source: Model;
    let own = true;
    if (options.from !== undefined) {
      if (options.from instanceof Model) {
        source = options.from;
        own = false;
      } else if (typeof options.from === 'string' && options.from.length > 0) {
        if (grow !== undefined) {
          const grown = `${options.out}.grown-${process.pid}.gguf`;
          try {
            growDraft(options.from, grown, checkInteger(grow, 'shape.layers', 1), seed, 'shape.layers');
            source = await loadModel(grown);
          } finally {
            rmSync(grown, { force: true });
          }
        } else source = await loadModel(options.from);
      } else throw new TypeError('from must be a path or a Model');
      if (source.info.vocabSize !== V) {
        if (own) await source.dispose();
        throw new RangeError(`from: the draft's vocabulary (${source.info.vocabSize} tokens) must be the target's (${V})`);
      }
    } else {
      const init = `${options.out}.init-${process.pid}.gguf`;
      try {
        await writeDraftInit(
          init,
          target,
          shape,
          seed,
          (message) => progress({ phase: 'init', fraction: 0, step: 0, teacherTokens: 0, trainLoss: NaN, teacherTokensPerSecond: 0, trainTokensPerSecond: 0, seconds: since(), message }),
          options.signal,
        );
        source = await loadModel(init);
      } finally {
        rmSync(init, { force: true });
      }
    }
    if (options.headTokens !== undefined) {
      const ids = headCount !== undefined ? frequentTokens(shards, headCount, V, target.eosTokens) : options.headTokens;
      try {
        const restricted = await source.withHead(ids as ArrayLike<number>);
        if (own) await source.dispose();
        source = restricted;
        own = true;
      } catch (e) {
        if (own) await source.dispose();
        if (e instanceof RangeError || e instanceof TypeError) throw new (e.constructor as typeof RangeError)(`headTokens: ${e.message}`);
        throw e;
      }
    }
    try {
      trainer = await createTrainer(source, { lr, warmupSteps: 30, schedule: 'cosine', totalSteps: 1_000_000, minLr: lr / 10, weightDecay: 0.01, clipNorm: 1, headChunk: 256 });
    } finally {
      if (own) await source.dispose();
    }
  }

  const rng = new XorShift(seed * 104729 + trainer.steps);
  const curve: HeldOutPoint[] = [];
  let teacherTokens = 0;
  let teacherMs = 0;
  let trainMs = 0;
  let lossEma = NaN;
  let aborted = false;
  const firstStep = trainer.steps;
  const budgetMs = minutes * 60_000;
  const fraction = () => Math.min(1, Math.max((performance.now() - started) / budgetMs, (trainer.steps - firstStep) / stepBudget));
  const rates = () => ({ teacherTokensPerSecond: teacherTokens / Math.max(1e-9, teacherMs / 1000), trainTokensPerSecond: (teacherTokens * replay) / Math.max(1e-9, trainMs / 1000) });
  try {
    // Up to 16 windows: 2,048 positions at seqLen 128, a standard error of about 0.01 on agreement.
    const heldWindows = held && held.length > seqLen ? heldOutWindows(held, 16, seqLen) : undefined;
    const evalSet = heldWindows ? await teacherBatch(target, heldWindows, heldWindows.length / seqLen, seqLen, k) : undefined;
    let lastEval = -Infinity;
    const record = async (force: boolean) => {
      if (!evalSet || (!force && performance.now() - lastEval < evalMinutes * 60_000)) return;
      if (curve.length > 0 && curve[curve.length - 1]!.step === trainer.steps) return; // measured already
      lastEval = performance.now();
      const snap = await trainer.snapshot();
      try {
        const ev = await proxyEval(trainer, snap, evalSet);
        curve.push({ step: trainer.steps, teacherTokens, minutes: since() / 60, trainLoss: lossEma, loss: ev.loss, top1: ev.top1 });
      } finally {
        await snap.dispose();
      }
    };
    await record(true);
    throwIfAborted(options.signal); // before the first step: nothing to write
    const buffer: TeacherBatch[] = [];
    // The replay buffer holds at most 256 MB of teacher batches (and 512 of them).
    const batchBytes = rows * seqLen * (8 * k + 8);
    const maxBuffer = Math.max(1, Math.min(512, Math.floor(256e6 / batchBytes)));
    let lastSave = performance.now();
    // The cosine schedule ends with this call's budget (a resumed run's too), sized from the time its
    // first steps take (the init before them not counted).
    let sized = false;
    const loopStart = performance.now();
    while (fraction() < 1) {
      if (options.signal?.aborted) {
        aborted = true;
        break;
      }
      let t0 = performance.now();
      const fresh = await teacherBatch(target, sampleWindows(shards, rows, seqLen, rng), rows, seqLen, k);
      teacherMs += performance.now() - t0;
      teacherTokens += rows * seqLen;
      buffer.push(fresh);
      if (buffer.length > maxBuffer) buffer.splice(Math.floor(rng.next() * buffer.length), 1);
      t0 = performance.now();
      for (let i = 0; i < replay && trainer.steps - firstStep < stepBudget; i++) {
        const b = i === 0 ? fresh : buffer[Math.floor(rng.next() * buffer.length)]!;
        const r = await trainer.step(toTrainBatch(b));
        lossEma = Number.isNaN(lossEma) ? r.loss : 0.95 * lossEma + 0.05 * r.loss;
      }
      trainMs += performance.now() - t0;
      if (!sized && (trainer.steps - firstStep >= 3 * replay || trainer.steps - firstStep >= stepBudget)) {
        // The cosine decay ends with the budget: steps given, or as many as the time left allows.
        const done = trainer.steps - firstStep;
        const perStep = (performance.now() - loopStart) / Math.max(1, done);
        const left = Math.min(stepBudget - done, Math.floor((budgetMs - (performance.now() - started)) / perStep));
        trainer.configure({ totalSteps: trainer.steps + Math.max(10, left) });
        sized = true;
      }
      if (options.checkpoint !== undefined && performance.now() - lastSave > 5 * 60_000) {
        await trainer.save(options.checkpoint);
        lastSave = performance.now();
      }
      await record(false);
      progress({ phase: 'train', fraction: fraction(), step: trainer.steps, teacherTokens, trainLoss: lossEma, ...rates(), seconds: since(), heldOut: curve[curve.length - 1] });
    }
    if (!aborted && options.signal?.aborted) aborted = true;
    progress({ phase: 'save', fraction: fraction(), step: trainer.steps, teacherTokens, trainLoss: lossEma, ...rates(), seconds: since(), heldOut: curve[curve.length - 1] });
    if (options.checkpoint !== undefined) await trainer.save(options.checkpoint);
    await record(true);
    const snap = await trainer.snapshot();
    let trained: DraftShape;
    let headTokens: number;
    try {
      const i = snap.info;
      headTokens = i.headTokens;
      trained = { embeddingLength: i.embeddingLength, layers: i.layers, heads: i.heads, kvHeads: i.kvHeads, feedForwardLength: i.feedForwardLength, contextLength: i.contextLength };
      // Written beside the destination, then renamed: a reader never sees half a draft.
      const tmp = `${options.out}.tmp-${process.pid}`;
      try {
        await snap.save(tmp, { type });
        renameSync(tmp, options.out);
      } finally {
        rmSync(tmp, { force: true });
      }
    } finally {
      await snap.dispose();
    }
    return {
      headTokens,
      path: options.out,
      bytes: statSync(options.out).size,
      shape: trained,
      type,
      steps: trainer.steps,
      teacherTokens,
      seconds: since(),
      teacherSeconds: teacherMs / 1000,
      trainSeconds: trainMs / 1000,
      aborted,
      curve,
    };
  } finally {
    await trainer.dispose();
  }
}
