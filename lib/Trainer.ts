// Training a model on the CPU: steps run off the event loop on an owned f32 copy of the weights;
// snapshot() turns the current weights into a model that can be swapped into a running one.
import { addon } from './addon.js';
import { checkInteger, checkKeys, checkOptions, disposedError } from './args.js';
import type { Seed } from './addonTypes.js';
import { Model, readTextTools } from './Model.js';
import type { Tokenizer } from './Tokenizer.js';
import type { DistillLossKind, SparseTeacher } from './kernels.js';

interface NativeTrainer {
  step(batch: TrainBatch): Promise<TrainStepResult>;
  evalLoss(batch: TrainBatch): Promise<number>;
  snapshot(): Promise<unknown>;
  save(path: string): Promise<void>;
  configure(options: TrainerOptions): void;
  dispose(): Promise<void>;
  readonly steps: number;
  readonly parameterCount: number;
}

interface TrainAddon {
  createTrainer(source: unknown, options: TrainerOptions): Promise<NativeTrainer>;
  loadTrainerCheckpoint(path: string): Promise<NativeTrainer>;
  setTrainThreads(threads: number): number;
}

const native = addon as unknown as TrainAddon;

/**
 * Gives training its own pool of `threads` threads (process-wide), so that steps running beside
 * decoding neither queue behind nor hold up decoding's thread pool; 0 (the default) shares the
 * decoding pool. Training results do not depend on it. Returns the setting now in force.
 */
export function setTrainThreads(threads: number): number {
  checkInteger(threads, 'threads', 0, 1024, ' (0 = share the decoding pool)');
  return native.setTrainThreads(threads);
}

export interface TrainerOptions {
  /** Peak learning rate. Default 1e-4. */
  lr?: number;
  warmupSteps?: number;
  /** 'constant' (default), 'linear' or 'cosine' decay to minLr at totalSteps. */
  schedule?: 'constant' | 'linear' | 'cosine';
  totalSteps?: number;
  minLr?: number;
  beta1?: number;
  beta2?: number;
  eps?: number;
  /** AdamW weight decay on matrices (norms and biases never decay). Default 0. */
  weightDecay?: number;
  /** Clip the gradient to this global norm (0 = off). Default 1. */
  clipNorm?: number;
  /** Rows of logits made at once by the fused LM head + loss. Default 64. */
  headChunk?: number;
}

const trainerKeys = ['lr', 'warmupSteps', 'schedule', 'totalSteps', 'minLr', 'beta1', 'beta2', 'eps', 'weightDecay', 'clipNorm', 'headChunk'];

/** B sequences of T tokens, each from position 0. Give targets (cross-entropy) or a teacher (distillation). */
export interface TrainBatch {
  tokens: Int32Array;
  batchSize: number;
  seqLen: number;
  /** Next-token targets per position, -1 to skip (cross-entropy). */
  targets?: Int32Array;
  /** Distillation loss. Default 'forward-kl'. */
  kind?: DistillLossKind;
  /** Dense teacher logits [B*T x V]. */
  teacherLogits?: Float32Array;
  /** Sparse teacher [B*T rows of k]. */
  teacher?: SparseTeacher;
  /** [B*T] positions that count (distillation). */
  mask?: Uint8Array;
  temperature?: number;
  beta?: number;
}

export interface TrainStepResult {
  /** Mean loss over the counted positions, before the update. */
  loss: number;
  /** Global gradient norm before clipping. */
  gradNorm: number;
  lr: number;
  step: number;
  /**
   * False when the loss or the gradient was not finite, or when no position counted (every target
   * -1, or every row masked; loss 0): the weights and the step count were left unchanged.
   */
  applied: boolean;
}

export interface NewModelConfig {
  vocabSize: number;
  embeddingLength: number;
  layers: number;
  heads: number;
  kvHeads?: number;
  feedForwardLength: number;
  contextLength: number;
  ropeTheta?: number;
  tiedOutput?: boolean;
}

const newModelKeys = ['vocabSize', 'embeddingLength', 'layers', 'heads', 'kvHeads', 'feedForwardLength', 'contextLength', 'ropeTheta', 'tiedOutput'];

/** A trainer over a copy of `source`'s weights, or over a fresh random model. */
export async function createTrainer(
  source: Model | { config: NewModelConfig; seed?: Seed; initStd?: number },
  options: TrainerOptions = {},
): Promise<Trainer> {
  checkKeys(checkOptions(options)!, trainerKeys);
  if (source instanceof Model) return new Trainer(await native.createTrainer(source.handle, options), source);
  if (typeof source !== 'object' || source === null || typeof source.config !== 'object' || source.config === null)
    throw new TypeError('source must be a Model or { config, seed? }');
  checkKeys(source, ['config', 'seed', 'initStd'], 'source');
  checkKeys(source.config, newModelKeys, 'source.config');
  if (source.config.tiedOutput !== undefined && typeof source.config.tiedOutput !== 'boolean') throw new TypeError('source.config.tiedOutput must be a boolean');
  return new Trainer(await native.createTrainer(source, options), undefined);
}

/** Restores a trainer (weights, AdamW moments, step, settings) from Trainer.save(). */
export async function loadTrainerCheckpoint(path: string): Promise<Trainer> {
  if (typeof path !== 'string' || path.length === 0) throw new TypeError('path must be a non-empty string');
  const handle = await native.loadTrainerCheckpoint(path);
  try {
    // The checkpoint keeps its source model's tokenizer and chat template: snapshots get them back.
    return new Trainer(handle, await readTextTools(path));
  } catch (e) {
    await handle.dispose();
    throw e;
  }
}

/** What snapshots carry over from the source model. */
type TextTools = { tokenizer?: Tokenizer | undefined; chatTemplate?: string | undefined };

const batchKeys = ['tokens', 'batchSize', 'seqLen', 'targets', 'kind', 'teacherLogits', 'teacher', 'mask', 'temperature', 'beta'];

/** A batch trains on targets (cross-entropy) or on a teacher (distillation), never on both. */
function checkBatchKind(batch: TrainBatch): void {
  if (batch === null || typeof batch !== 'object') return; // the native side names the error
  checkKeys(batch, batchKeys, 'batch'); // a misspelt mask or teacher would silently train on the wrong loss
  const teacher = batch.teacherLogits !== undefined || batch.teacher !== undefined;
  if (batch.targets !== undefined && teacher)
    throw new TypeError('batch: give either targets (cross-entropy) or a teacher (teacherLogits or teacher), not both');
  if (batch.targets !== undefined && batch.mask !== undefined)
    throw new TypeError('batch.mask goes with a teacher; with targets, skip a position by its target -1');
  for (const k of ['kind', 'temperature', 'beta'] as const)
    if (batch.targets !== undefined && batch[k] !== undefined) throw new TypeError(`batch.${k} goes with a teacher (distillation); targets train on cross-entropy`);
}

export class Trainer {
  #native: NativeTrainer | null;
  #queue: Promise<unknown> = Promise.resolve();
  #disposing: Promise<void> | undefined;
  readonly #source: TextTools | undefined;

  /** @internal */
  constructor(handle: NativeTrainer, source: TextTools | undefined) {
    this.#native = handle;
    this.#source = source;
  }

  #get(): NativeTrainer {
    // Refused from the moment dispose() is called: it waits only for the work queued before.
    if (!this.#native || this.#disposing) throw disposedError('trainer');
    return this.#native;
  }

  #enqueue<R>(fn: (t: NativeTrainer) => Promise<R>): Promise<R> {
    const t = this.#get();
    const run = () => fn(t);
    const p = this.#queue.then(run, run);
    this.#queue = p.catch(() => undefined);
    return p;
  }

  /** Optimizer steps applied so far. */
  get steps(): number {
    return this.#get().steps;
  }

  get parameterCount(): number {
    return this.#get().parameterCount;
  }

  /**
   * One optimizer step (forward, backward, clipping, AdamW), off the event loop. The batch's arrays
   * are read when the step runs (steps queue): keep them unchanged until its promise settles.
   */
  async step(batch: TrainBatch): Promise<TrainStepResult> {
    checkBatchKind(batch);
    return this.#enqueue((t) => t.step(batch));
  }

  /** The mean loss on a batch, leaving the weights as they are (its arrays read as step's are). */
  async evalLoss(batch: TrainBatch): Promise<number> {
    checkBatchKind(batch);
    return this.#enqueue((t) => t.evalLoss(batch));
  }

  /** A model holding a copy of the current weights (with the source model's tokenizer and chat template). */
  async snapshot(): Promise<Model> {
    const handle = await this.#enqueue((t) => t.snapshot());
    return new Model(handle as ConstructorParameters<typeof Model>[0], this.#source?.tokenizer, this.#source?.chatTemplate);
  }

  /** Writes a checkpoint (weights, moments, step, settings) atomically. */
  async save(path: string): Promise<void> {
    if (typeof path !== 'string' || path.length === 0) throw new TypeError('path must be a non-empty string');
    return this.#enqueue((t) => t.save(path));
  }

  /**
   * Changes optimizer settings from the next step on (a step already running keeps its own). It
   * returns at once, also while a step runs; bad settings throw here.
   */
  configure(options: TrainerOptions): void {
    if (options === null || typeof options !== 'object') throw new TypeError('options must be an object');
    checkKeys(options, trainerKeys);
    this.#get().configure(options);
  }

  dispose(): Promise<void> {
    // A second call waits for the same work as the first.
    return (this.#disposing ??= (async () => {
      await this.#queue;
      const native = this.#native;
      this.#native = null;
      await native?.dispose();  // freed off the event loop
    })());
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.dispose();
  }
}
