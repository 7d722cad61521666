// Typed entry points to the verification and distillation kernels. All of them are synchronous:
// each call runs for microseconds to milliseconds on the CPU backend's thread pool.
import { addon, withLoaderNotes } from './addon.js';
import type { BackendInfo, SamplingOptions, Seed } from './addonTypes.js';
import { checkKeys, checkOptions, ownData, samplingKeys } from './args.js';

export type { BackendInfo, SamplingOptions, Seed } from './addonTypes.js';

export interface VerifyChainOptions {
  /** [(g + 1) x V] target logits: row i is the target's distribution before draft token i; row g gives the bonus. */
  targetLogits: Float32Array;
  /** [g x V] draft logits, the distributions the draft tokens were sampled from. Optional when greedy. */
  draftLogits?: Float32Array;
  /** [g] draft tokens. */
  draftTokens: Int32Array;
  vocabSize: number;
  /** Applied identically to target and draft logits. temperature 0 is greedy. */
  sampling: SamplingOptions;
  seed: Seed;
  /** Philox stream (for example the request id); defaults to 0. */
  stream?: Seed;
}

export interface VerifyChainResult {
  /** How many draft tokens were accepted (0..g). */
  acceptedCount: number;
  /** The accepted draft tokens followed by one correction or bonus token. */
  tokens: Int32Array;
}

// The options each kernel reads (and _fault, the tests' planted bugs): any other key is refused.
const chainKeys = ['targetLogits', 'draftLogits', 'draftTokens', 'vocabSize', 'sampling', 'seed', 'stream', '_fault'];
const chainBatchKeys = ['targetLogits', 'draftLogits', 'draftTokens', 'draftLengths', 'vocabSize', 'sampling', 'seed', 'streams', '_fault'];
const treeKeys = ['parents', 'tokens', 'targetLogits', 'draftLogits', 'vocabSize', 'sampling', 'seed', 'stream', 'children', '_fault'];
const distillKeys = ['kind', 'studentLogits', 'teacherLogits', 'teacher', 'vocabSize', 'temperature', 'beta', 'mask', 'computeGrad', 'gradOut'];
const adamwKeys = ['params', 'grads', 'm', 'v', 'step', 'lr', 'beta1', 'beta2', 'eps', 'weightDecay', 'gradScale'];

/** Checks an options object's keys, and those of its sampling (one object, or an array of them). */
function checkKernelKeys(options: unknown, keys: readonly string[]): void {
  if (typeof options !== 'object' || options === null) return; // the binding names the error
  checkKeys(options, keys);
  const s = ownData(options, 'sampling');
  const one = (x: unknown, name: string) => typeof x === 'object' && x !== null && checkKeys(x, samplingKeys, name);
  if (Array.isArray(s)) for (let i = 0; i < s.length; i++) one(ownData(s, String(i)), `sampling[${i}]`);
  else one(s, 'sampling');
}

// verifyChain's output buffer: grown to the longest draft seen, never returned itself.
let chainTokens = new Int32Array(64);

/**
 * Exact speculative sampling over a chain: accept draft token i with probability
 * min(1, p_i(x_i) / q_i(x_i)); at the first rejection emit a sample from norm(max(0, p_i - q_i));
 * if every token is accepted, emit a bonus token from the last target row. Greedy mode accepts
 * while x_i is the target's argmax and emits the argmax at the first mismatch.
 *
 * Logits may contain -Infinity (probability 0); NaN or +Infinity anywhere is a RangeError.
 */
export function verifyChain(options: VerifyChainOptions): VerifyChainResult {
  if (typeof options !== 'object' || options === null) throw new TypeError('options must be an object');
  checkKeys(options, chainKeys);
  // The binding takes the options one by one (see native/napi/kernels_napi.cpp) and writes the
  // emitted tokens into a reused buffer; the argument checks and their messages are the binding's.
  const { targetLogits, draftLogits, draftTokens, vocabSize, sampling, seed, stream } = options;
  const g = ArrayBuffer.isView(draftTokens) ? (draftTokens as Int32Array).length : 0;
  if (chainTokens.length < g + 1) chainTokens = new Int32Array(g + 1);
  const fault = (options as { _fault?: unknown })._fault;
  const s = typeof sampling === 'object' && sampling !== null ? sampling : undefined;
  if (s) checkKeys(s, samplingKeys, 'sampling'); // (checkKernelKeys' descriptor read costs 0.4 us a call)
  const acceptedCount = addon.verifyChain(
    targetLogits, draftLogits, draftTokens, vocabSize, sampling, s?.temperature, s?.topK, s?.topP, seed, stream, fault,
    chainTokens,
  );
  return { acceptedCount, tokens: chainTokens.slice(0, acceptedCount + 1) };
}

export interface VerifyChainBatchOptions {
  /** [(sum g_b + B) x V]: each sequence's g_b + 1 rows, back to back. */
  targetLogits: Float32Array;
  /** [(sum g_b) x V]. Optional when every sequence is greedy. */
  draftLogits?: Float32Array;
  /** [sum g_b] draft tokens, back to back. */
  draftTokens: Int32Array;
  /** [B] draft length g_b of each sequence (0 is allowed: the sequence then just samples). */
  draftLengths: Int32Array;
  vocabSize: number;
  /** One setting for every sequence, or one per sequence. */
  sampling: SamplingOptions | SamplingOptions[];
  seed: Seed;
  /** [B] Philox streams; defaults to 0..B-1. */
  streams?: Seed[];
}

export interface VerifyChainBatchResult {
  acceptedCounts: Int32Array;
  /** Emitted tokens of every sequence, back to back: sequence b owns tokens[offsets[b]..offsets[b+1]). */
  tokens: Int32Array;
  offsets: Int32Array;
}

/** verifyChain over B sequences with ragged lengths in one call, spread over the thread pool. */
export function verifyChainBatch(options: VerifyChainBatchOptions): VerifyChainBatchResult {
  checkKernelKeys(options, chainBatchKeys);
  return addon.verifyChainBatch(options);
}

export type TreeChildrenMode = 'sampled-with-replacement' | 'sampled-without-replacement' | 'deterministic';

export interface VerifyTreeOptions {
  /** [n] parent of each node, -1 for children of the root; parents[i] < i (topological order). */
  parents: Int32Array;
  /** [n] token of each node. */
  tokens: Int32Array;
  /** [(n + 1) x V]: row 0 at the root, row i + 1 after node i. */
  targetLogits: Float32Array;
  /** [(n + 1) x V], same layout. Not needed when greedy or with deterministic children. */
  draftLogits?: Float32Array;
  vocabSize: number;
  sampling: SamplingOptions;
  seed: Seed;
  stream?: Seed;
  /**
   * How each node's children were drafted: sampled i.i.d. from the node's q (with replacement),
   * sampled without replacement, or picked deterministically (top-k expansion; q is then treated
   * as one-hot). Defaults to 'sampled-with-replacement'.
   */
  children?: TreeChildrenMode;
}

export interface VerifyTreeResult {
  /** Accepted node indices, root to leaf. */
  path: Int32Array;
  /** The accepted nodes' tokens followed by the final sampled token. */
  tokens: Int32Array;
}

/**
 * SpecInfer's multi-step speculative sampling over a draft tree. At each node the children are
 * tried in order; child c is accepted with probability min(1, p(c) / q(c)); on rejection
 * p <- norm(max(0, p - q)) (and, without replacement, c is removed from q). When every child is
 * rejected a token is sampled from the residual p. The emitted tokens follow the target exactly.
 */
export function verifyTree(options: VerifyTreeOptions): VerifyTreeResult {
  checkKernelKeys(options, treeKeys);
  return addon.verifyTree(options);
}

/**
 * 'forward-kl' KL(p||q), 'reverse-kl' KL(q||p) (teacher probabilities are floored at 1e-12 inside the
 * log, so a zero teacher bin gives a large finite loss), 'jsd' beta KL(p||m) + (1-beta) KL(q||m) with
 * m = beta p + (1-beta) q, 'tvd' 1/2 sum |p - q|. p is the teacher, q the student.
 */
export type DistillLossKind = 'forward-kl' | 'reverse-kl' | 'jsd' | 'tvd';

export interface SparseTeacher {
  /** [N x k] token ids of the teacher's top-k entries (distinct within a row). */
  indices: Int32Array;
  /** [N x k] their probabilities. */
  probs: Float32Array;
  /** [N] mass outside the top-k; defaults to 1 - sum(probs) per row. */
  residual?: Float32Array;
}

export interface DistillLossOptions {
  kind: DistillLossKind;
  /** [N x V] student (draft) logits. */
  studentLogits: Float32Array;
  /** [N x V] teacher (target) logits. Give this or `teacher`. */
  teacherLogits?: Float32Array;
  /** A sparse teacher: the loss compares k + 1 bins (the top-k tokens and the rest). */
  teacher?: SparseTeacher;
  vocabSize: number;
  /** Softmax temperature for both sides (the sparse teacher's probabilities are used as given). Default 1. */
  temperature?: number;
  /** JSD mixing weight in (0, 1); default 0.5. */
  beta?: number;
  /** [N] 1 = the row counts, 0 = ignored (zero gradient). Default: every row counts. */
  mask?: Uint8Array;
  /** Set false to skip the gradient. Default true. */
  computeGrad?: boolean;
  /**
   * [N x V] caller-owned buffer the gradient is written into (and returned as `grad`), reused
   * across calls to avoid a fresh allocation per call. Must not overlap the logits.
   */
  gradOut?: Float32Array;
}

export interface DistillLossResult {
  /** Mean loss over the counted rows (0 when none counts). */
  loss: number;
  /** [N x V] gradient of that mean with respect to studentLogits (`gradOut` when given). */
  grad?: Float32Array;
}

/** Distillation loss and its gradient, fused in one pass per row. Logits must be finite. */
export function distillLoss(options: DistillLossOptions): DistillLossResult {
  if (typeof options !== 'object' || options === null) throw new TypeError('options must be an object');
  checkKeys(options, distillKeys);
  // Read here and passed one by one, as in verifyChain; the checks and messages are the binding's.
  const { kind, studentLogits, teacherLogits, teacher, vocabSize, temperature, beta, mask, computeGrad, gradOut } =
    options;
  const t = typeof teacher === 'object' && teacher !== null ? teacher : undefined;
  if (t) checkKeys(t, ['indices', 'probs', 'residual'], 'teacher');
  const wantGrad = computeGrad === undefined || computeGrad === null || Boolean(computeGrad);
  const fresh =
    wantGrad && (gradOut === undefined || gradOut === null)
      ? new Float32Array(ArrayBuffer.isView(studentLogits) ? (studentLogits as Float32Array).length : 0)
      : undefined;
  const loss = addon.distillLoss(
    kind, studentLogits, teacherLogits, teacher, t?.indices, t?.probs, t?.residual, vocabSize, temperature, beta,
    mask, computeGrad, gradOut, fresh,
  );
  return wantGrad ? { loss, grad: gradOut ?? fresh } : { loss };
}

export interface AdamWOptions {
  params: Float32Array;
  grads: Float32Array;
  /** First-moment buffer, same length, zero at the start. */
  m: Float32Array;
  /** Second-moment buffer, same length, zero at the start. */
  v: Float32Array;
  /** 1-based step number (bias correction). */
  step: number;
  lr?: number;
  beta1?: number;
  beta2?: number;
  eps?: number;
  weightDecay?: number;
  /** Multiplies every gradient first, e.g. maxNorm / globalNorm(grads) for clipping. */
  gradScale?: number;
}

/** One AdamW step in place (decoupled weight decay, bias-corrected moments, PyTorch's conventions). */
export function adamwStep(options: AdamWOptions): void {
  checkKernelKeys(options, adamwKeys);
  addon.adamwStep(options);
}

/** Euclidean norm of a buffer, summed in double in a fixed order. */
export function globalNorm(values: Float32Array): number {
  return addon.globalNorm(values);
}

/** The backends compiled into the loaded addon, and whether each can be used here. */
export function backends(): BackendInfo[] {
  return addon.backends().map((b) => (b.name === 'cuda' && !b.compiled ? { ...b, detail: withLoaderNotes(b.detail) } : b));
}

/** Sets the CPU thread-pool size (0 = all cores). Returns the size in effect. */
export function setThreads(threads: number): number {
  return addon.setThreads(threads);
}

/** Measures this machine's memory bandwidth in this process (for benchmark ratios). */
export function bandwidthProbe(options: { bytes?: number; iterations?: number } = {}): {
  readBytesPerSecond: number;
  copyBytesPerSecond: number;
  threads: number;
} {
  checkKeys(checkOptions(options) ?? {}, ['bytes', 'iterations']);
  return addon.bandwidthProbe(options);
}

/** Peak f32 multiply-add rate of this machine's thread pool, measured in this process (for benchmark ratios). */
export function flopsProbe(options: { iterations?: number } = {}): { flopsPerSecond: number; threads: number } {
  checkKeys(checkOptions(options) ?? {}, ['iterations']);
  return (addon as unknown as { flopsProbe(o: object): { flopsPerSecond: number; threads: number } }).flopsProbe(options);
}
