// Several drafts over one target, each specialising on its own slice of traffic: a router picks a
// draft per request (a caller label, a classifier, or a bandit over measured acceptance), and each
// draft has its own online distiller (buffer, schedule, guard).
import { EventEmitter } from 'node:events';
import { extname } from 'node:path';
import { checkInteger, checkKeys, disposedError } from './args.js';
import { Model, visitNextTokenRows } from './Model.js';
import { copyModel, OnlineDecoder, type OnlineDistillOptions, type OnlineMetrics, type RollbackEvent, type UpdateErrorEvent, type UpdateEvent } from './OnlineDecoder.js';
import type { RequestStats, SpeculativeGenerateOptions, SpeculativeResult, Strategy, StreamChunk, WeightSwap } from './SpeculativeDecoder.js';
import type { SamplingOptions } from './addonTypes.js';

export interface RouteRequest {
  label?: string;
  prompt?: string;
  tokens?: Int32Array | number[];
}

/** 'label': the request's label names the draft; 'ucb' / 'thompson': a bandit over acceptance; or your own classifier. */
export type Router = 'label' | 'ucb' | 'thompson' | ((request: RouteRequest) => string);

/**
 * The checkpoint file of draft `name` in a pool whose distill options name `path`: the name,
 * URI-encoded, before the extension (`ck.gguf` -> `ck.code.gguf`).
 */
export function draftCheckpointPath(path: string, name: string): string {
  const ext = extname(path);
  return `${path.slice(0, path.length - ext.length)}.${encodeURIComponent(name)}${ext}`;
}

export interface DraftPoolOptions {
  target: Model;
  /** Named drafts sharing the target's tokenizer. */
  drafts: Record<string, Model>;
  router?: Router;
  strategy?: Strategy;
  sampling?: SamplingOptions;
  /**
   * Every draft's online distiller. autosavePath and resumeFrom name one file per draft (see
   * draftCheckpointPath): `ck.gguf` is `ck.<name>.gguf` for the draft called name.
   */
  distill?: OnlineDistillOptions;
  /** When running requests take up a draft's update (see SpeculativeDecoderOptions.weightSwap). Default 'step'. */
  weightSwap?: WeightSwap;
  /**
   * With the label router, a label seen for the first time gets a copy of a draft: this one (by name),
   * or with `{ closest: true }` the draft that predicts that first request's prompt best (the lowest
   * mean cross-entropy of its tokens), so that a new kind of traffic starts from the nearest one.
   */
  forkFrom?: string | { closest: true };
  /** Seed of the Thompson sampler. */
  seed?: number;
}

export interface PoolGenerateOptions extends SpeculativeGenerateOptions {
  label?: string;
}

export interface PoolResult extends SpeculativeResult {
  /** The draft that served the request. */
  draft: string;
}

interface Member {
  name: string;
  model: Model;
  decoder: OnlineDecoder;
  owned: boolean;
  requests: number;
  /** Requests routed to it and still running. */
  inflight: number;
  acceptedSum: number;
  successes: number;
  failures: number;
}

/** The events of a DraftPool and their arguments: each draft's updates and rollbacks, and forks. */
export interface DraftPoolEvents {
  update: [UpdateEvent & { draft: string }];
  rollback: [RollbackEvent & { draft: string }];
  /** A draft's update, autosave or resume failed (see OnlineDecoderEvents). */
  'update-error': [UpdateErrorEvent & { draft: string }];
  /** A label seen for the first time got a copy of `from`. */
  fork: [{ draft: string; from: string }];
}

export class DraftPool extends EventEmitter<DraftPoolEvents> {
  readonly target: Model;
  readonly router: Router;
  readonly #members = new Map<string, Member>();
  readonly #options: DraftPoolOptions;
  #forking = new Map<string, Promise<Member>>();
  #total = 0;
  #inflight = 0;
  #rng: number;
  #disposed = false;
  #disposing: Promise<void> | undefined;

  constructor(options: DraftPoolOptions) {
    super();
    if (typeof options !== 'object' || options === null) throw new TypeError('options must be an object');
    checkKeys(options, ['target', 'drafts', 'router', 'strategy', 'sampling', 'distill', 'weightSwap', 'forkFrom', 'seed']);
    if (typeof options.drafts !== 'object' || options.drafts === null || Array.isArray(options.drafts) || Object.keys(options.drafts).length === 0)
      throw new TypeError('drafts must name at least one draft model');
    const router = options.router ?? 'label';
    if (typeof router !== 'function' && !['label', 'ucb', 'thompson'].includes(router))
      throw new RangeError(`router must be 'label', 'ucb', 'thompson' or a function, got '${String(router)}'`);
    // Own keys only: 'toString' is `in` every object.
    const f = options.forkFrom;
    if (typeof f === 'object' && f !== null) {
      checkKeys(f, ['closest'], 'forkFrom');
      if (f.closest !== true) throw new TypeError('forkFrom must name a draft, or be { closest: true }');
    } else if (f !== undefined && (typeof f !== 'string' || !Object.hasOwn(options.drafts, f)))
      throw typeof f === 'string' ? new RangeError(`forkFrom names no draft: '${f}'`) : new TypeError('forkFrom must name a draft, or be { closest: true }');
    if (options.seed !== undefined) checkInteger(options.seed, 'seed', 0);
    this.target = options.target;
    this.router = router;
    this.#options = options;
    this.#rng = (options.seed ?? 1) >>> 0 || 1;
    try {
      for (const [name, model] of Object.entries(options.drafts)) this.#add(name, model, false);
    } catch (e) {
      // The drafts added before the bad one stop (their decoders were left running).
      for (const m of this.#members.values()) void m.decoder.dispose().catch(() => {});
      throw e;
    }
  }

  #add(name: string, model: Model, owned: boolean): Member {
    if (!(model instanceof Model)) throw new TypeError(`drafts.${name} must be a loaded Model`);
    // Each draft learns in place: two names on one Model would train and roll back the same weights.
    const twin = [...this.#members].find(([, m]) => m.model === model);
    if (twin && this.#options.distill?.enabled !== false)
      throw new RangeError(`drafts.${name} is the same Model as drafts.${twin[0]}: each draft learns in place, so give each its own (copyModel)`);
    const d = this.#options.distill;
    const decoder = new OnlineDecoder({
      target: this.target,
      draft: model,
      strategy: this.#options.strategy,
      sampling: this.#options.sampling,
      weightSwap: this.#options.weightSwap,
      // Each draft checkpoints to its own file.
      distill: d && {
        ...d,
        ...(typeof d.autosavePath === 'string' && { autosavePath: draftCheckpointPath(d.autosavePath, name) }),
        ...(typeof d.resumeFrom === 'string' && { resumeFrom: draftCheckpointPath(d.resumeFrom, name) }),
      },
    });
    decoder.on('update', (e) => this.emit('update', { draft: name, ...e }));
    decoder.on('rollback', (e) => this.emit('rollback', { draft: name, ...e }));
    decoder.on('update-error', (e) => this.emit('update-error', { draft: name, ...e }));
    const m: Member = { name, model, decoder, owned, requests: 0, inflight: 0, acceptedSum: 0, successes: 0, failures: 0 };
    this.#members.set(name, m);
    return m;
  }

  /** The names of the drafts, in the order they joined. */
  get drafts(): string[] {
    return [...this.#members.keys()];
  }

  /** Per-draft metrics: decoding stats, updates, rollbacks and the requests each served. */
  metrics(): Record<string, OnlineMetrics & { requests: number }> {
    const out: Record<string, OnlineMetrics & { requests: number }> = {};
    // (defined, not assigned: a draft named '__proto__' would set the prototype)
    for (const m of this.#members.values())
      Object.defineProperty(out, m.name, { value: { ...m.decoder.metrics(), requests: m.requests }, enumerable: true, writable: true, configurable: true });
    return out;
  }

  #uniform(): number {
    let x = this.#rng;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.#rng = x >>> 0;
    return (this.#rng + 0.5) / 4294967296;
  }

  /** A Beta(a, b) draw from two Gamma draws (Marsaglia-Tsang). */
  #beta(a: number, b: number): number {
    const gamma = (k: number): number => {
      if (k < 1) return gamma(k + 1) * this.#uniform() ** (1 / k);
      const d = k - 1 / 3;
      const c = 1 / Math.sqrt(9 * d);
      for (;;) {
        let x: number;
        let v: number;
        do {
          x = Math.sqrt(-2 * Math.log(this.#uniform())) * Math.cos(2 * Math.PI * this.#uniform());
          v = 1 + c * x;
        } while (v <= 0);
        v = v * v * v;
        const u = this.#uniform();
        if (Math.log(u) < 0.5 * x * x + d - d * v + d * Math.log(v)) return d * v;
      }
    };
    const x = gamma(a);
    return x / (x + gamma(b));
  }

  /** Picks the draft for a request and counts it in flight there (the caller ends that). */
  async #route(req: PoolGenerateOptions): Promise<Member> {
    // Chosen and counted in the same synchronous run (only a fork awaits), so that concurrent
    // requests see each other's choices.
    const c = this.#choose(req);
    const m = c instanceof Promise ? await c : c;
    m.inflight++;
    this.#inflight++;
    return m;
  }

  #choose(req: PoolGenerateOptions): Member | Promise<Member> {
    const r = this.router;
    if (typeof r === 'function') {
      const name = r({ label: req.label, prompt: req.prompt, tokens: req.tokens });
      const m = this.#members.get(name);
      if (!m) throw new RangeError(`the router chose '${String(name)}', which is not a draft of this pool`);
      return m;
    }
    if (r === 'label') {
      if (req.label === undefined) throw new TypeError("label is required with the 'label' router");
      if (typeof req.label !== 'string' || req.label.length === 0) throw new TypeError(`label must be a non-empty string, got ${typeof req.label === 'string' ? "''" : typeof req.label}`);
      const m = this.#members.get(req.label);
      if (m) return m;
      if (this.#options.forkFrom === undefined) throw new RangeError(`no draft is named '${req.label}' (and forkFrom is not set)`);
      return this.#fork(req.label, req);
    }
    // Bandits over per-request acceptance.
    // Requests still running count as tried (so concurrent first requests spread over the drafts);
    // a draft with none finished yet is measured first.
    const members = [...this.#members.values()];
    const unmeasured = members.filter((m) => m.requests === 0);
    if (unmeasured.length) return unmeasured.reduce((a, b) => (b.inflight < a.inflight ? b : a));
    if (r === 'ucb') {
      let best = members[0]!;
      let bestScore = -Infinity;
      for (const m of members) {
        const n = m.requests + m.inflight;
        const score = m.acceptedSum / m.requests + Math.sqrt((2 * Math.log(this.#total + this.#inflight)) / n);
        if (score > bestScore) {
          best = m;
          bestScore = score;
        }
      }
      return best;
    }
    let best = members[0]!;
    let bestDraw = -1;
    for (const m of members) {
      const draw = this.#beta(m.successes + 1, m.failures + 1);
      if (draw > bestDraw) {
        best = m;
        bestDraw = draw;
      }
    }
    return best;
  }

  #fork(label: string, req: RouteRequest): Promise<Member> {
    let p = this.#forking.get(label);
    if (!p) {
      p = (async () => {
        const f = this.#options.forkFrom!;
        const base = typeof f === 'string' ? this.#members.get(f)! : await this.#closest(req);
        const copy = await copyModel(base.model);
        let m: Member;
        try {
          m = this.#add(label, copy, true);
        } catch (e) {
          await copy.dispose();
          throw e;
        }
        this.emit('fork', { draft: label, from: base.name });
        return m;
      })();
      this.#forking.set(label, p);
      // A failed fork is not kept: the next request with the label tries again.
      p.catch(() => {
        if (this.#forking.get(label) === p) this.#forking.delete(label);
      });
    }
    return p;
  }

  /**
   * The draft whose predictions of the request's prompt are best: the lowest mean cross-entropy of
   * each prompt token after the ones before it. With fewer than two tokens, the first draft.
   */
  async #closest(req: RouteRequest): Promise<Member> {
    const members = [...this.#members.values()];
    const tk = this.target.tokenizer;
    const tokens = req.tokens !== undefined ? Array.from(req.tokens) : req.prompt !== undefined && tk ? Array.from(tk.encode(req.prompt)) : [];
    if (tokens.length < 2 || members.length === 1) return members[0]!;
    let best = members[0]!;
    let bestLoss = Infinity;
    for (const m of members) {
      const loss = await meanCrossEntropy(m.model, tokens.slice(-m.model.info.contextLength));
      if (loss < bestLoss) {
        best = m;
        bestLoss = loss;
      }
    }
    return best;
  }

  /** Adds a draft under a new name. */
  addDraft(name: string, model: Model): void {
    if (this.#disposed) throw disposedError('pool');
    if (typeof name !== 'string' || name.length === 0) throw new TypeError('name must be a non-empty string');
    if (this.#members.has(name)) throw new RangeError(`a draft named '${name}' exists already`);
    this.#add(name, model, false);
  }

  async generate(options: PoolGenerateOptions): Promise<PoolResult> {
    if (this.#disposed) throw disposedError('pool');
    if (options === null || typeof options !== 'object') throw new TypeError('options must be an object');
    const m = await this.#route(options);
    const { label: _label, ...rest } = options;
    let r: SpeculativeResult;
    try {
      r = await m.decoder.generate({ ...rest, onStats: undefined });
    } finally {
      this.#leave(m);
    }
    this.#measured(m, r.stats);
    rest.onStats?.(r.stats);
    return { ...r, draft: m.name };
  }

  /** A request routed to m has ended (finished or not). */
  #leave(m: Member): void {
    m.inflight--;
    this.#inflight--;
  }

  /** A finished request's acceptance, for the bandits. */
  #measured(m: Member, stats: { drafted: number; accepted: number }): void {
    m.requests++;
    this.#total++;
    m.acceptedSum += stats.drafted > 0 ? stats.accepted / stats.drafted : 0;
    m.successes += stats.accepted;
    m.failures += stats.drafted - stats.accepted;
  }

  /**
   * generate() as an async iterable: the routed draft's stream, whose return value names the draft
   * with the stop reason. Its acceptance counts for the router as a generate() call's does.
   */
  async *stream(options: PoolGenerateOptions): AsyncGenerator<StreamChunk, { stopReason: SpeculativeResult['stopReason']; draft: string }, void> {
    if (this.#disposed) throw disposedError('pool');
    if (options === null || typeof options !== 'object') throw new TypeError('options must be an object');
    const m = await this.#route(options);
    const { label: _label, ...rest } = options;
    let stats: RequestStats | undefined;
    try {
      const stopReason = yield* m.decoder.stream({ ...rest, onStats: (s) => ((stats = s), rest.onStats?.(s)) });
      return { stopReason, draft: m.name };
    } finally {
      // A request that finished counts, even if the consumer left before the end of the stream.
      if (stats) this.#measured(m, stats);
      this.#leave(m);
    }
  }

  /** Trains every draft on its buffer now. */
  async updateNow(): Promise<void> {
    if (this.#disposed) throw disposedError('pool');
    await Promise.all([...this.#members.values()].map((m) => m.decoder.updateNow()));
  }

  /** Stops every draft's decoder; disposes the drafts the pool forked itself. */
  dispose(): Promise<void> {
    // A second call waits for the same work as the first.
    return (this.#disposing ??= (async () => {
      this.#disposed = true;
      await Promise.allSettled([...this.#forking.values()]);
      for (const m of this.#members.values()) {
        await m.decoder.dispose();
        if (m.owned) await m.model.dispose();
      }
    })());
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.dispose();
  }
}

export function createDraftPool(options: DraftPoolOptions): DraftPool {
  return new DraftPool(options);
}

/** A token's cross-entropy is counted as at most this (p = 1e-9): a restricted head's -Infinity. */
const MAX_TOKEN_LOSS = -Math.log(1e-9);

/** Mean over the tokens after the first of -log p(token | the tokens before it), by `model`. */
async function meanCrossEntropy(model: Model, tokens: number[]): Promise<number> {
  let sum = 0;
  await visitNextTokenRows(model, tokens, 0, (row, next) => {
    let max = -Infinity;
    for (let v = 0; v < row.length; v++) if (row[v]! > max) max = row[v]!;
    let z = 0;
    for (let v = 0; v < row.length; v++) z += Math.exp(row[v]! - max);
    // A draft whose head lacks the token would score Infinity and never be chosen.
    sum += Math.min(MAX_TOKEN_LOSS, max + Math.log(z) - row[next]!);
  });
  return sum / (tokens.length - 1);
}
