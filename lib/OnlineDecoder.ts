// Online speculative decoding (Liu et al., ICML 2024): while serving, record where the draft was
// corrected and what the target wanted there (top-k probabilities plus the residual mass), and
// every so often distil the target into the draft on a shadow copy, off the decoding path. The new
// weights are swapped in between steps (running requests take them up at their next step, see
// weightSwap); a guard rolls back when acceptance falls or the loss is not finite. Output stays
// exact throughout: only the draft changes, and verification decides.
import { EventEmitter } from 'node:events';
import { accessSync, constants, existsSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { addon } from './addon.js';
import type { SamplingOptions } from './addonTypes.js';
import { checkInteger, checkKeys, disposedError, MAX_TIMER_MS } from './args.js';
import type { DistillLossKind } from './kernels.js';
import { isStoreType, loadModel, Model, STORE_TYPES, visitNextTokenRows, type StoreType } from './Model.js';
import {
  SpeculativeDecoder,
  type RequestStats,
  type SpeculativeGenerateOptions,
  type SpeculativeResult,
  type StepEvent,
  type Strategy,
  type StreamChunk,
  type VerifiedStep,
  type WeightSwap,
} from './SpeculativeDecoder.js';
import { createTrainer, setTrainThreads, type TrainBatch, type Trainer } from './Trainer.js';

export interface OnlineDistillOptions {
  /** Distillation loss. Default 'forward-kl' (the reference code's choice). */
  loss?: DistillLossKind;
  /** JSD mixing weight. Default 0.5. */
  beta?: number;
  /** Train on the positions where the draft was corrected ('mismatch', default) or on every verified position. */
  positions?: 'mismatch' | 'all';
  /** Also record this fraction of accepted positions (on-policy draft samples the target agreed with). Default 0. */
  acceptedFraction?: number;
  /** Teacher entries kept per position (the rest is one residual bin). Default 32. */
  topK?: number;
  /** Update after this many recorded requests. Default 8. */
  interval?: number;
  /** Or once the buffer holds this many teacher positions. Default: off. */
  tokenBudget?: number;
  /** Or once the oldest record is this old (ms), even when no other request comes. Default: off. */
  maxAgeMs?: number;
  /** AdamW learning rate. Default 1e-4. */
  lr?: number;
  /** Gradient clipping by global norm. Default 1. */
  clipNorm?: number;
  /** Passes over the buffer per update. Default 1. */
  epochs?: number;
  /** Sequences per optimizer step. Default 4. */
  batchSize?: number;
  /**
   * Records keep at most this many trailing tokens. Default 256. A longer request's positions are
   * learned from that shortened context (an approximation), and those with fewer than a quarter of
   * this before them in the kept tokens are dropped.
   */
  maxRecordTokens?: number;
  /** Buffer bound in bytes; the oldest records go first. Default 64 MiB. */
  maxBufferBytes?: number;
  /**
   * Roll back when, over the tokens emitted in the next `guardWindow` requests, the updated draft agrees
   * with the target (its most likely token is the one emitted) this much less often than the weights
   * it replaced do on the same tokens. Default 0.02.
   */
  guardMargin?: number;
  /** Requests per guard window. Default 8. */
  guardWindow?: number;
  /** Write the draft as GGUF every this many updates (with autosavePath). */
  autosaveEvery?: number;
  autosavePath?: string;
  /** Start from a draft checkpoint written by saveDraft()/autosave, if the file exists. */
  resumeFrom?: string;
  /**
   * Replay against forgetting: this fraction of every update's records is drawn from earlier updates'
   * records (a reservoir sample of the traffic so far), so a draft that adapts to a new kind of
   * request keeps what it learned before. In [0, 1). Default 0 (off).
   */
  replay?: number;
  /** Records the replay reservoir keeps. Default 256. */
  replayRecords?: number;
  /** Set false to serve without learning (a baseline). Default true. */
  enabled?: boolean;
  /**
   * Threads that training runs on, beside decoding (process-wide: setTrainThreads). Default 1:
   * training takes one core and leaves the others to decoding, which keeps the inter-token
   * latency during updates close to the latency without (bench/online-latency.ts). 0 shares the
   * decoding pool, which makes updates faster and stalls decoding more.
   */
  trainThreads?: number;
  /**
   * How updated weights are stored while they serve: 'auto' (default) keeps the draft's own type
   * when all its matrices share one the engine writes (STORE_TYPES: F32, F16, BF16, Q8_0, Q5_0,
   * Q5_1, Q4_0, Q4_1, IQ4_NL, IQ4_XS, Q2_K; else F32), so an F16 draft stays as cheap to run after
   * updates; training itself always keeps F32 weights. Quantised types are converted on the decoding
   * thread pool (a short stall per update), IQ4_NL, IQ4_XS and Q2_K by the engine's round-to-nearest
   * quantiser, coarser than llama.cpp's (see Model.save).
   */
  servedType?: StoreType | 'auto';
}

export interface OnlineDecoderOptions {
  target: Model;
  draft: Model;
  strategy?: Strategy;
  sampling?: SamplingOptions;
  maxConcurrent?: number;
  /** When running requests take up an update's weights (see SpeculativeDecoderOptions.weightSwap). Default 'step'. */
  weightSwap?: WeightSwap;
  /** Concurrent requests' chain steps run together (see SpeculativeDecoderOptions.batching). Default true. */
  batching?: boolean;
  distill?: OnlineDistillOptions;
}

export interface UpdateEvent {
  /**
   * The update's number: 1, 2, 3 ... for every update begun, so that one rolled back keeps its
   * number and the next gets the next ('update-start', 'update' and 'rollback' of one update share
   * it). metrics().updates counts the updates applied.
   */
  update: number;
  /** Records trained on, replayed ones included. */
  records: number;
  /** Of those, records replayed from earlier updates (distill.replay). */
  replayed: number;
  positions: number;
  steps: number;
  lossBefore: number;
  lossAfter: number;
  durationMs: number;
}

export interface RollbackEvent {
  update: number;
  reason: string;
}

export interface UpdateStartEvent {
  update: number;
  records: number;
}

export interface UpdateErrorEvent {
  error: Error;
}

export interface AcceptanceEvent {
  /** Requests in the sliding window. */
  window: number;
  rate: number;
}

/** The events of an OnlineDecoder and their arguments. */
export interface OnlineDecoderEvents {
  step: [StepEvent];
  /** After each request: the acceptance over the sliding window. */
  acceptance: [AcceptanceEvent];
  'update-start': [UpdateStartEvent];
  /** New weights are in place. */
  update: [UpdateEvent];
  rollback: [RollbackEvent];
  /**
   * An update failed (serving goes on with the weights in place), or the resume from a checkpoint
   * did (requests then reject with that error).
   */
  'update-error': [UpdateErrorEvent];
}

export interface OnlineMetrics extends RequestStats {
  updates: number;
  rollbacks: number;
  bufferedRecords: number;
  bufferedPositions: number;
  bufferBytes: number;
  /** Acceptance rate over the last guardWindow requests. */
  recentAcceptance: number;
  /**
   * While the latest update is under watch (its guard window open): the requests counted so far,
   * those that started after it. null when no update is being watched.
   */
  guardRequests: number | null;
}

/** One served request as the distiller keeps it. */
interface RecordEntry {
  tokens: number[];
  /** Input position of the first verified row: tokens after it were emitted by the target's verification. */
  from: number;
  /** Input position -> teacher over the next token. */
  teachers: Map<number, { ids: Int32Array; probs: Float32Array }>;
  createdAt: number;
  bytes: number;
}

function check(cond: boolean, message: string, type: 'type' | 'range' = 'range'): void {
  if (!cond) throw type === 'type' ? new TypeError(message) : new RangeError(message);
}

const NUMERIC_OPTIONS = [
  'beta', 'acceptedFraction', 'topK', 'interval', 'tokenBudget', 'maxAgeMs', 'lr', 'clipNorm', 'epochs', 'batchSize',
  'maxRecordTokens', 'maxBufferBytes', 'guardMargin', 'guardWindow', 'autosaveEvery', 'replay', 'replayRecords', 'trainThreads',
] as const satisfies readonly (keyof OnlineDistillOptions)[];

function resolveOptions(o: OnlineDistillOptions = {}): Required<Omit<OnlineDistillOptions, 'tokenBudget' | 'maxAgeMs' | 'autosaveEvery' | 'autosavePath' | 'resumeFrom'>> &
  Pick<OnlineDistillOptions, 'tokenBudget' | 'maxAgeMs' | 'autosaveEvery' | 'autosavePath' | 'resumeFrom'> {
  check(typeof o === 'object' && o !== null, 'distill must be an object', 'type');
  // Type first: the range checks below would let strings such as '0.5' through by coercion.
  for (const k of NUMERIC_OPTIONS)
    if (o[k] !== undefined) check(typeof o[k] === 'number', `distill.${k} must be a number, got ${typeof o[k]}`, 'type');
  if (o.enabled !== undefined) check(typeof o.enabled === 'boolean', 'distill.enabled must be a boolean', 'type');
  for (const k of ['resumeFrom', 'autosavePath'] as const)
    if (o[k] !== undefined) check(typeof o[k] === 'string' && o[k].length > 0, `distill.${k} must be a non-empty string`, 'type');
  const r = {
    loss: o.loss ?? 'forward-kl',
    beta: o.beta ?? 0.5,
    positions: o.positions ?? 'mismatch',
    acceptedFraction: o.acceptedFraction ?? 0,
    topK: o.topK ?? 32,
    interval: o.interval ?? 8,
    tokenBudget: o.tokenBudget,
    maxAgeMs: o.maxAgeMs,
    lr: o.lr ?? 1e-4,
    clipNorm: o.clipNorm ?? 1,
    epochs: o.epochs ?? 1,
    batchSize: o.batchSize ?? 4,
    maxRecordTokens: o.maxRecordTokens ?? 256,
    maxBufferBytes: o.maxBufferBytes ?? 64 * 1024 * 1024,
    guardMargin: o.guardMargin ?? 0.02,
    guardWindow: o.guardWindow ?? 8,
    autosaveEvery: o.autosaveEvery,
    autosavePath: o.autosavePath,
    resumeFrom: o.resumeFrom,
    enabled: o.enabled ?? true,
    trainThreads: o.trainThreads ?? 1,
    replay: o.replay ?? 0,
    replayRecords: o.replayRecords ?? 256,
    servedType: o.servedType ?? 'auto',
  };
  // A misspelt option (learningRate for lr) would be ignored, and the default trained instead.
  checkKeys(o, Object.keys(r), 'distill');
  check(['forward-kl', 'reverse-kl', 'jsd', 'tvd'].includes(r.loss), `distill.loss must be 'forward-kl', 'reverse-kl', 'jsd' or 'tvd', got '${String(r.loss)}'`);
  check(r.beta > 0 && r.beta < 1, 'distill.beta must be in (0, 1)');
  check(r.positions === 'mismatch' || r.positions === 'all', "distill.positions must be 'mismatch' or 'all'");
  check(r.acceptedFraction >= 0 && r.acceptedFraction <= 1, 'distill.acceptedFraction must be in [0, 1]');
  for (const [k, v] of [['topK', r.topK], ['interval', r.interval], ['epochs', r.epochs], ['batchSize', r.batchSize], ['maxRecordTokens', r.maxRecordTokens], ['guardWindow', r.guardWindow], ['replayRecords', r.replayRecords]] as const)
    checkInteger(v, `distill.${k}`, 1);
  check(Number.isFinite(r.lr) && r.lr > 0, 'distill.lr must be a number > 0');
  check(Number.isFinite(r.replay) && r.replay >= 0 && r.replay < 1, `distill.replay must be in [0, 1), got ${String(r.replay)}`);
  checkInteger(r.trainThreads, 'distill.trainThreads', 0, 1024);
  check(r.servedType === 'auto' || isStoreType(r.servedType), `distill.servedType must be 'auto' or one of ${STORE_TYPES.join(', ')}, got ${String(r.servedType)}`);
  check(Number.isFinite(r.clipNorm) && r.clipNorm >= 0, 'distill.clipNorm must be >= 0');
  check(r.maxBufferBytes >= 1024, 'distill.maxBufferBytes must be >= 1024');
  check(r.guardMargin >= 0 && r.guardMargin <= 1, 'distill.guardMargin must be in [0, 1]');
  if (r.tokenBudget !== undefined) checkInteger(r.tokenBudget, 'distill.tokenBudget', 1);
  if (r.maxAgeMs !== undefined) check(r.maxAgeMs > 0, 'distill.maxAgeMs must be > 0');
  if (r.autosaveEvery !== undefined) {
    checkInteger(r.autosaveEvery, 'distill.autosaveEvery', 1);
    check(typeof r.autosavePath === 'string' && r.autosavePath.length > 0, 'distill.autosavePath is required with autosaveEvery', 'type');
  }
  if (r.autosavePath !== undefined) {
    // Checked now: a failed autosave surfaces only as an 'update-error' event, long after this call.
    const dir = dirname(resolve(r.autosavePath));
    try {
      accessSync(dir, constants.W_OK);
    } catch {
      throw new Error(`distill.autosavePath: cannot write in ${dir}`);
    }
  }
  return r;
}

/**
 * Top-k of softmax(row) at temperature 1, as the teacher the buffer keeps: the k largest logits
 * (ties: the lower id first), best first, with their probabilities as the verification kernels
 * compute them. Native (the CPU engine's distill/teacher.h, synchronous: about 50 us a 49,152-entry
 * row), since it runs on the decoding path after each verification.
 */
export function teacherTopK(row: Float32Array, k: number): { ids: Int32Array; probs: Float32Array } {
  if (!(row instanceof Float32Array)) throw new TypeError('row must be a Float32Array');
  if (typeof k !== 'number' || !Number.isInteger(k) || k < 1) throw new RangeError(`k must be an integer >= 1, got ${String(k)}`);
  if (row.length === 0) throw new RangeError('row must not be empty');
  try {
    const { ids, probs } = addon.teacherTopK(row, row.length, Math.min(k, row.length));
    return { ids, probs };
  } catch (e) {
    // The native message counts rows ("logits row 0 ..."); here there is one.
    if (e instanceof RangeError) throw new RangeError(e.message.replace(/^logits row 0 /, 'row '));
    throw e;
  }
}

export class OnlineDecoder extends EventEmitter<OnlineDecoderEvents> {
  readonly target: Model;
  readonly draft: Model;
  readonly options: ReturnType<typeof resolveOptions>;
  readonly #decoder: SpeculativeDecoder;
  #buffer: RecordEntry[] = [];
  // Replay reservoir: a uniform sample of the records of earlier updates (Vitter's algorithm R).
  #reservoir: RecordEntry[] = [];
  #reservoirSeen = 0;
  #bufferBytes = 0;
  #live = new Map<number, RecordEntry>();
  #trainer: Trainer | null = null;
  #draftType: string | undefined;
  // Updates and guard checks touch the trainer and the draft's weights: they run one at a time, in
  // order, on this chain. #pending is set while an update is queued or running.
  #chain: Promise<void> = Promise.resolve();
  #pending = false;
  #updates = 0; // applied
  #begun = 0; // numbers given to updates (see UpdateEvent.update)
  #version = 0; // the number of the update whose weights are in place (0: the draft as given)
  #rollbacks = 0;
  #recent: { drafted: number; accepted: number }[] = [];
  // The update under watch: the weights it replaced, and the token sequences of the requests served
  // on its weights since (each with the position its emitted tokens start after).
  #guard: { update: number; previous: Model; window: { tokens: number[]; from: number }[] } | null = null;
  #rngState = 0x2545f491;
  #ready: Promise<void>;
  #disposed = false;
  #disposing: Promise<void> | undefined;
  #ageTimer: ReturnType<typeof setTimeout> | undefined; // maxAgeMs: fires when the oldest record is due

  constructor(options: OnlineDecoderOptions) {
    super();
    check(typeof options === 'object' && options !== null, 'options must be an object', 'type');
    checkKeys(options, ['target', 'draft', 'strategy', 'sampling', 'maxConcurrent', 'weightSwap', 'batching', 'distill']);
    this.options = resolveOptions(options.distill);
    this.target = options.target;
    this.draft = options.draft;
    this.#decoder = new SpeculativeDecoder({
      target: options.target,
      draft: options.draft,
      strategy: options.strategy ?? { kind: 'chain', length: 4 },
      sampling: options.sampling,
      maxConcurrent: options.maxConcurrent,
      weightSwap: options.weightSwap,
      batching: options.batching,
      onVerified: (s) => this.#record(s),
    });
    check(this.#decoder.strategy.kind !== 'ngram', "the 'ngram' strategy has no draft model to train");
    // Training the draft in place would train the target.
    check(options.draft !== options.target, 'draft must be another model than target (the draft is trained in place)', 'type');
    const V = this.#decoder.vocabSize;
    check(this.options.topK <= V, `distill.topK must be at most the vocabulary (${V}), got ${this.options.topK}`);
    this.#decoder.on('step', (e) => this.emit('step', e));
    this.#ready = this.#resume();
    // A checkpoint that fails to load rejects every generate() and update, not the process (an
    // unhandled rejection) before the first request.
    this.#ready.catch(() => {});
  }

  async #resume(): Promise<void> {
    const from = this.options.resumeFrom;
    if (!from || !existsSync(from)) return;
    try {
      const saved = await loadModel(from);
      try {
        this.draft.setWeights(saved);
      } finally {
        await saved.dispose();
      }
    } catch (e) {
      const err = new Error(`distill.resumeFrom '${from}' could not be resumed from: ${e instanceof Error ? e.message : String(e)}`, { cause: e });
      this.#notify('update-error', { error: err });
      throw err;
    }
  }

  /** Cumulative decoding stats plus the distiller's state. */
  metrics(): OnlineMetrics {
    return {
      ...this.#decoder.metrics(),
      updates: this.#updates,
      rollbacks: this.#rollbacks,
      bufferedRecords: this.#buffer.length,
      bufferedPositions: this.#buffer.reduce((a, r) => a + r.teachers.size, 0),
      bufferBytes: this.#bufferBytes,
      recentAcceptance: rate(this.#recent),
      guardRequests: this.#guard ? this.#guard.window.length : null,
    };
  }

  #random(): number {
    let x = this.#rngState;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.#rngState = x >>> 0;
    return this.#rngState / 4294967296;
  }

  /** Called on the decoding path after each verification: keep only what training needs. */
  #record(s: VerifiedStep): void {
    if (!this.options.enabled) return;
    let rec = this.#live.get(s.request);
    if (!rec) {
      rec = { tokens: [...s.context], from: s.context.length - 1, teachers: new Map(), createdAt: Date.now(), bytes: 0 };
      this.#live.set(s.request, rec);
    }
    const V = s.vocabSize;
    const base = s.context.length - 1; // input position of row 0
    for (let i = 0; i <= s.accepted; i++) {
      const corrected = i === s.accepted && s.accepted < s.drafted;
      const take =
        this.options.positions === 'all' || corrected || (i < s.accepted && this.options.acceptedFraction > 0 && this.#random() < this.options.acceptedFraction);
      if (!take) continue;
      const t = teacherTopK(s.targetLogits.subarray(i * V, (i + 1) * V), this.options.topK);
      rec.teachers.set(base + i, t);
      rec.bytes += 8 * t.ids.length;
    }
    rec.tokens.push(...s.emitted);
    rec.bytes += 4 * s.emitted.length;
  }

  /** A request ended; `weights` is the update whose weights were in place when it started. */
  #finish(requestId: number | undefined, stats: { drafted: number; accepted: number } | undefined, weights: number): void {
    if (stats) {
      const w = { drafted: stats.drafted, accepted: stats.accepted };
      this.#recent.push(w);
      if (this.#recent.length > this.options.guardWindow) this.#recent.shift();
      // The guard judges an update by requests that started after it, which drafted with its weights
      // throughout (one that was running took them up part way, or not at all with weightSwap 'request').
      if (this.#guard && weights >= this.#guard.update) {
        const rec = requestId === undefined ? undefined : this.#live.get(requestId);
        this.#guard.window.push(rec ? { tokens: [...rec.tokens], from: rec.from } : { tokens: [], from: 0 });
        if (this.#guard.window.length >= this.options.guardWindow) this.#enqueue(() => this.#checkGuard());
      }
      this.#notify('acceptance', { window: this.#recent.length, rate: rate(this.#recent) });
    }
    if (requestId === undefined) return;
    const rec = this.#live.get(requestId);
    this.#live.delete(requestId);
    if (!rec || rec.teachers.size === 0) return;
    // Keep the trailing maxRecordTokens tokens, at most the draft's context (teacher positions shift
    // with them). The draft then learns those positions from a shortened context; positions with
    // less than a quarter of the window before them are dropped, as their context is cut the most.
    const W = Math.min(this.options.maxRecordTokens, this.draft.info.contextLength);
    const cut = Math.max(0, rec.tokens.length - W);
    if (cut > 0) {
      rec.tokens = rec.tokens.slice(cut);
      const shifted = new Map<number, { ids: Int32Array; probs: Float32Array }>();
      for (const [p, t] of rec.teachers) if (p - cut >= Math.floor(W / 4)) shifted.set(p - cut, t);
      rec.teachers = shifted;
      rec.bytes = 4 * rec.tokens.length;
      for (const t of shifted.values()) rec.bytes += 8 * t.ids.length;
      if (shifted.size === 0) return;
    }
    this.#buffer.push(rec);
    this.#bufferBytes += rec.bytes;
    while (this.#bufferBytes > this.options.maxBufferBytes && this.#buffer.length > 1) this.#bufferBytes -= this.#buffer.shift()!.bytes;
    this.#scheduleUpdate();
    this.#armAgeTimer();
  }

  /**
   * With maxAgeMs, a timer for the oldest buffered record, so that it is trained on when it comes
   * due even if no other request ends (the other triggers are checked as requests end).
   */
  #armAgeTimer(): void {
    const age = this.options.maxAgeMs;
    if (age === undefined || this.#ageTimer !== undefined || this.#disposed || this.#buffer.length === 0) return;
    const due = this.#buffer[0]!.createdAt + age;
    this.#ageTimer = setTimeout(() => {
      this.#ageTimer = undefined;
      this.#scheduleUpdate();
      // Not due yet (that record was trained on meanwhile): wait for the new oldest. Due but held
      // (an update running or a guard window open): those call #scheduleUpdate when they end.
      if (this.#buffer.length > 0 && this.#buffer[0]!.createdAt + age > Date.now()) this.#armAgeTimer();
    }, Math.min(MAX_TIMER_MS, Math.max(0, due - Date.now())));  // a later due date waits in steps
    this.#ageTimer.unref(); // a pending update does not keep the process alive
  }

  /**
   * Emits an event of the background work to each listener in turn. A listener that throws stops
   * neither the work nor the listeners after it: its error becomes a process warning (code
   * OSD_LISTENER_ERROR; Node prints warnings unless run with --no-warnings).
   */
  #notify<K extends keyof OnlineDecoderEvents>(event: K, ...args: OnlineDecoderEvents[K]): void {
    for (const listener of this.rawListeners(event) as ((...a: unknown[]) => unknown)[]) {
      try {
        listener.apply(this, args);
      } catch (e) {
        process.emitWarning(`a '${String(event)}' listener threw: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`, { code: 'OSD_LISTENER_ERROR' });
      }
    }
  }

  /** Runs fn after everything queued before it; a failure is reported as an event, never thrown. */
  #enqueue(fn: () => Promise<void>): Promise<void> {
    const run = async () => {
      try {
        await fn();
      } catch (e) {
        this.#notify('update-error', { error: e instanceof Error ? e : new Error(String(e)) });
      }
    };
    this.#chain = this.#chain.then(run, run);
    return this.#chain;
  }

  #scheduleUpdate(): void {
    if (this.#pending || !this.#shouldUpdate()) return;
    this.#pending = true;
    this.#enqueue(async () => {
      try {
        // The trigger is checked again: a guard check queued before may have changed things.
        if (this.#shouldUpdate()) await this.#update();
      } finally {
        this.#pending = false;
        this.#armAgeTimer(); // for records that arrived while it ran
      }
    });
  }

  #shouldUpdate(): boolean {
    const o = this.options;
    if (this.#buffer.length === 0 || this.#guard) return false;
    if (this.#buffer.length >= o.interval) return true;
    if (o.tokenBudget !== undefined && this.#buffer.reduce((a, r) => a + r.teachers.size, 0) >= o.tokenBudget) return true;
    if (o.maxAgeMs !== undefined && Date.now() - this.#buffer[0]!.createdAt >= o.maxAgeMs) return true;
    return false;
  }

  /** What the buffer holds: each record's tokens and the positions that carry a teacher (for inspection). */
  recorded(): { tokens: number[]; positions: number[] }[] {
    return this.#buffer.map((r) => ({ tokens: [...r.tokens], positions: [...r.teachers.keys()].sort((a, b) => a - b) }));
  }

  /**
   * Trains now on whatever is buffered (resolves when the new weights are in place, with null when
   * there was nothing to train on or the update was rolled back). A failure (of the update, or of
   * the autosave after it) rejects, and is also emitted as 'update-error'.
   */
  async updateNow(): Promise<UpdateEvent | null> {
    if (this.#disposed) throw disposedError('decoder');
    let event: UpdateEvent | null = null;
    let failure: Error | undefined;
    let dropped = false;
    await this.#enqueue(async () => {
      if (this.#buffer.length === 0) return;
      try {
        const r = await this.#update();
        if (r === 'dropped') dropped = true;
        else if (r) event = r;
      } catch (e) {
        failure = e instanceof Error ? e : new Error(String(e));
        // Reported as every failed update is (monitoring counts these), besides the rejection.
        this.#notify('update-error', { error: failure });
      }
    });
    if (failure) throw failure;
    // Disposed while it trained: the update was dropped, which is not "nothing to train on" (null).
    if (dropped) throw disposedError('decoder');
    return event;
  }

  /** Builds padded batches from records: rows of equal length, masks on teacher positions. */
  #batches(records: RecordEntry[]): TrainBatch[] {
    const k = this.options.topK;
    const out: TrainBatch[] = [];
    for (let b0 = 0; b0 < records.length; b0 += this.options.batchSize) {
      const group = records.slice(b0, b0 + this.options.batchSize);
      const T = Math.max(...group.map((r) => r.tokens.length));
      const B = group.length;
      const tokens = new Int32Array(B * T);
      const mask = new Uint8Array(B * T);
      const indices = new Int32Array(B * T * k);
      const probs = new Float32Array(B * T * k);
      for (let r = 0; r < B; r++) {
        const rec = group[r]!;
        tokens.set(rec.tokens.slice(0, T), r * T);
        for (let i = 0; i < T * k; i++) indices[r * T * k + i] = i % k; // distinct filler ids for unmasked rows
        for (const [p, t] of rec.teachers) {
          if (p >= T) continue;
          mask[r * T + p] = 1;
          const off = (r * T + p) * k;
          // Pad a short teacher with distinct unused ids of probability 0.
          const used = new Set(t.ids);
          let filler = 0;
          for (let j = 0; j < k; j++) {
            if (j < t.ids.length) {
              indices[off + j] = t.ids[j]!;
              probs[off + j] = t.probs[j]!;
            } else {
              while (used.has(filler)) filler++;
              indices[off + j] = filler++;
              probs[off + j] = 0;
            }
          }
        }
      }
      out.push({ tokens, batchSize: B, seqLen: T, kind: this.options.loss, beta: this.options.beta, mask, teacher: { indices, probs } });
    }
    return out;
  }

  /** One update; 'dropped' when dispose() came while it trained (its weights are thrown away). */
  /** One update: its event once the new weights are in place, 'dropped' if disposed meanwhile, else nothing (no records, or rolled back). */
  async #update(): Promise<UpdateEvent | 'dropped' | undefined> {
    if (this.#disposed) return 'dropped';
    await this.#ready;
    const fresh = this.#buffer.splice(0);
    this.#bufferBytes = 0;
    if (fresh.length === 0) return;
    const records = [...fresh, ...this.#replayed(fresh.length)];
    this.#remember(fresh);
    const started = performance.now();
    const update = ++this.#begun;
    this.#notify('update-start', { update, records: records.length });
    setTrainThreads(this.options.trainThreads);
    this.#trainer ??= await createTrainer(this.draft, { lr: this.options.lr, clipNorm: this.options.clipNorm });
    const batches = this.#batches(records);
    const lossBefore = mean(await Promise.all(batches.map((b) => this.#trainer!.evalLoss(b))));
    let steps = 0;
    for (let e = 0; e < this.options.epochs; e++) {
      for (const b of batches) {
        if (this.#disposed) return 'dropped'; // dispose() waits for this: stop between steps
        const r = await this.#trainer.step(b);
        steps++;
        if (!Number.isFinite(r.loss) || !Number.isFinite(r.gradNorm)) {
          await this.#rollback(update, `the loss or gradient was not finite at step ${steps}`);
          return;
        }
      }
    }
    const lossAfter = mean(await Promise.all(batches.map((b) => this.#trainer!.evalLoss(b))));
    if (!Number.isFinite(lossAfter)) {
      await this.#rollback(update, 'the loss after the update was not finite');
      return;
    }
    const snapshot = await this.#served(await this.#trainer.snapshot());
    if (this.#disposed) {
      await snapshot.dispose();
      return 'dropped';
    }
    // Keep the weights being replaced for the guard, then swap (running requests follow at their next step).
    let previous: Model;
    try {
      previous = await copyModel(this.draft);
      this.draft.setWeights(snapshot);
    } finally {
      await snapshot.dispose();
    }
    this.#updates++;
    this.#version = update;
    // An update made while an earlier one's guard window is still open (updateNow) closes that window
    // unchecked: the new guard rolls back, if it must, to the weights just before this update.
    await this.#guard?.previous.dispose();
    this.#guard = { update, previous, window: [] };
    const event: UpdateEvent = {
      update,
      records: records.length,
      replayed: records.length - fresh.length,
      positions: records.reduce((a, r) => a + r.teachers.size, 0),
      steps,
      lossBefore,
      lossAfter,
      durationMs: performance.now() - started,
    };
    this.#notify('update', event);
    const o = this.options;
    if (o.autosaveEvery !== undefined && this.#updates % o.autosaveEvery === 0) await this.#writeDraft(o.autosavePath!);
    return event;
  }

  /** Records from earlier updates to train on beside `fresh` of new ones: replay / (1 - replay) of it. */
  #replayed(fresh: number): RecordEntry[] {
    const want = Math.min(this.#reservoir.length, Math.round((fresh * this.options.replay) / (1 - this.options.replay)));
    const pool = [...this.#reservoir];
    const out: RecordEntry[] = [];
    for (let i = 0; i < want; i++) out.push(pool.splice(Math.floor(this.#random() * pool.length), 1)[0]!);
    return out;
  }

  /** Adds an update's new records to the replay reservoir (a uniform sample of all of them). */
  #remember(records: RecordEntry[]): void {
    if (this.options.replay === 0) return;
    for (const r of records) {
      this.#reservoirSeen++;
      if (this.#reservoir.length < this.options.replayRecords) this.#reservoir.push(r);
      else {
        const j = Math.floor(this.#random() * this.#reservoirSeen);
        if (j < this.options.replayRecords) this.#reservoir[j] = r;
      }
    }
  }

  /** The type updated weights serve in (see distill.servedType). */
  #servedType(): StoreType {
    const t = this.options.servedType;
    if (t !== 'auto') return t;
    const own = (this.#draftType ??= this.draft.info.matrixType);  // the type the draft came in
    return isStoreType(own) ? own : 'F32';
  }

  /** A trainer snapshot (F32) converted to the served type. */
  async #served(snapshot: Model): Promise<Model> {
    const type = this.#servedType();
    if (type === 'F32') return snapshot;
    try {
      return await snapshot.convert(type);
    } finally {
      await snapshot.dispose();
    }
  }

  async #checkGuard(): Promise<void> {
    const g = this.#guard;
    // A check queued for a window that a later update has since replaced waits for its own window.
    if (!g || g.window.length < this.options.guardWindow) return;
    this.#guard = null;
    // The same requests, scored with the weights before and after the update: a change of traffic
    // (a new domain, harder prompts) moves both alike, so only what the update did decides.
    const before = await agreement(g.previous, g.window);
    const after = await agreement(this.draft, g.window);
    if (before.positions > 0 && after.rate < before.rate - this.options.guardMargin) {
      this.draft.setWeights(g.previous);
      // The trainer continues from the restored weights (its moments start again).
      await this.#trainer?.dispose();
      this.#trainer = null;
      this.#rollbacks++;
      const reason = `agreement with the target fell from ${before.rate.toFixed(3)} (previous weights) to ${after.rate.toFixed(3)} over the ${before.positions} emitted tokens of the ${g.window.length} requests since`;
      this.#notify('rollback', { update: g.update, reason } satisfies RollbackEvent);
    }
    await g.previous.dispose();
    this.#scheduleUpdate();
  }

  async #rollback(update: number, reason: string): Promise<void> {
    await this.#trainer?.dispose();
    this.#trainer = null;
    this.#rollbacks++;
    this.#notify('rollback', { update, reason } satisfies RollbackEvent);
  }

  /**
   * Writes the draft as GGUF, atomically (temp file, fsync, rename), each matrix in the type it serves
   * in, once the updates already running or queued have finished.
   */
  async saveDraft(path: string): Promise<void> {
    if (typeof path !== 'string' || path.length === 0) throw new TypeError('path must be a non-empty string');
    if (this.#disposed) throw disposedError('decoder');
    let failure: unknown;
    await this.#enqueue(async () => {
      try {
        await this.#ready; // never the un-resumed draft in place of a checkpoint
        await this.#writeDraft(path);
      } catch (e) {
        failure = e;
      }
    });
    if (failure !== undefined) throw failure;
  }

  #writeDraft(path: string): Promise<void> {
    return this.draft.save(path, { type: 'keep' });
  }

  async generate(options: SpeculativeGenerateOptions): Promise<SpeculativeResult> {
    await this.#ready;
    let id: number | undefined;
    let weights = 0;
    try {
      const r = await this.#decoder.generate({
        ...options,
        onStart: (r) => ((id = r), (weights = this.#version), options.onStart?.(r)),
        onStats: undefined,  // called below, after the bookkeeping (a callback that throws cannot skip it)
      });
      this.#finish(id, r.stats, weights);
      options.onStats?.(r.stats);
      return r;
    } catch (e) {
      if (id !== undefined) this.#live.delete(id);
      throw e;
    }
  }

  async *stream(options: SpeculativeGenerateOptions): AsyncGenerator<StreamChunk, SpeculativeResult['stopReason'], void> {
    await this.#ready;
    let id: number | undefined;
    // A stream's acceptance counts in the sliding window and the guard window like a generate()
    // call's stats (without it, a stream-only server never finished a guard window, so it stopped
    // updating after the first update). One callback per stream, not a listener per stream.
    let stats: RequestStats | undefined;
    let weights = 0;
    try {
      const reason = yield* this.#decoder.stream({
        ...options,
        onStart: (r) => ((id = r), (weights = this.#version), options.onStart?.(r)),
        onStats: (s) => ((stats = s), options.onStats?.(s)),
      });
      return reason;
    } finally {
      if (stats) this.#finish(id, stats, weights);
      else if (id !== undefined) this.#live.delete(id);
    }
  }

  /** Waits for a running update, then stops serving. The models belong to the caller. */
  dispose(): Promise<void> {
    // A second call waits for the same work as the first.
    return (this.#disposing ??= (async () => {
      this.#disposed = true;
      clearTimeout(this.#ageTimer);
      await this.#decoder.dispose();
      await this.#chain;
      await this.#trainer?.dispose();
      await this.#guard?.previous.dispose();
      this.#guard = null;
    })());
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.dispose();
  }
}

/**
 * How often the draft's most likely next token is the token the target emitted, over the emitted
 * tokens of these requests (the tokens after each one's `from`, within the draft's context). For
 * greedy decoding it is the draft's per-token acceptance on those requests.
 */
async function agreement(draft: Model, requests: { tokens: number[]; from: number }[]): Promise<{ rate: number; positions: number }> {
  const W = draft.info.contextLength;
  let hit = 0;
  let n = 0;
  for (const r of requests) {
    const cut = Math.max(0, r.tokens.length - W);
    await visitNextTokenRows(draft, r.tokens.slice(cut), Math.max(0, r.from - cut), (row, next) => {
      let best = 0;
      for (let v = 1; v < row.length; v++) if (row[v]! > row[best]!) best = v;
      if (best === next) hit++;
      n++;
    });
  }
  return { rate: n ? hit / n : 0, positions: n };
}

function rate(w: { drafted: number; accepted: number }[]): number {
  let d = 0;
  let a = 0;
  for (const x of w) {
    d += x.drafted;
    a += x.accepted;
  }
  return d ? a / d : 0;
}

function mean(xs: number[]): number {
  return xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : NaN;
}

/** A speculative decoder whose draft keeps learning from the traffic it serves. */
export function createOnlineDecoder(options: OnlineDecoderOptions): OnlineDecoder {
  return new OnlineDecoder(options);
}

/**
 * A bit-exact copy of a model's weights, every matrix in the type it has: give the online decoder
 * a copy to keep the original draft as it was (it trains the draft it is given in place).
 */
export function copyModel(model: Model): Promise<Model> {
  if (!(model instanceof Model)) return Promise.reject(new TypeError('model must be a loaded Model'));
  return model.convert('keep');
}
