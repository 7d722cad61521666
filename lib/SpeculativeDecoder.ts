// Speculative generation: a draft proposes a chain or a tree, the target scores it in one pass,
// and the exact kernels decide what to keep. Output follows the target exactly (greedy: the same
// tokens; sampled: the same distribution) whatever the strategy.
import { EventEmitter } from 'node:events';
import type { SamplingOptions, Seed } from './addonTypes.js';
import { verifyChain, verifyTree } from './kernels.js';
import { checkCallback, checkInteger, checkKeys, checkMisplacedSampling, checkSampling, disposedError } from './args.js';
import { checkTokenIds, Model, promptTokens, sampledVocab, type Sequence, type StreamChunk } from './Model.js';
import { addon } from './addon.js';
import { TokenStreamDecoder } from './Tokenizer.js';
import { checkSignal, forwardAbort, pushToAsyncIterable, throwIfAborted } from './withAbortSignal.js';
import { effectiveThreadPool, poolFor } from './threadPool.cjs';

const sampleLogits = (addon as unknown as { sampleLogits(o: object): number }).sampleLogits;

/**
 * How a tree's children are drafted at temperature > 0 (at temperature 0 they are the draft's top tokens):
 * - 'sampled': drawn without replacement from the draft's warped distribution and verified in
 *   'sampled-without-replacement' mode. With flat distributions this accepts far more than top
 *   tokens: a sampled child is accepted with probability 1 - TV(p, q), a top token with only its
 *   target probability. The tree is a chain drafted as usual (one draft pass per level) with extra
 *   siblings at each level drawn from the rows the chain needed (no extra draft pass), shaped from the
 *   running acceptance of each child rank (see sampledTreeShape).
 * - 'deterministic': the draft's top tokens by cumulative probability (q treated as one-hot).
 * - 'auto' (default): 'sampled' when temperature > 0.
 */
export type TreeChildren = 'auto' | 'sampled' | 'deterministic';

export type Strategy =
  | { kind: 'chain'; length?: number }
  /**
   * A draft tree verified in one tree-masked target pass. budget: most nodes (default 16); maxDepth
   * (default 6); branching: most children per node (default 4); children: see TreeChildren. Trees
   * are a spine (the draft's chain) with siblings (sampled, or at temperature 0 the draft's next-best
   * tokens) and stop adding nodes where the measured draft and target costs say more would slow
   * decoding (so on a cheap-to-verify target they grow, on a costly one they shrink to a short
   * chain). fill: true always uses the whole budget (at temperature 0 as a best-first expansion of
   * the draft's top tokens, as children: 'deterministic' does at every temperature).
   */
  | { kind: 'tree'; budget?: number; maxDepth?: number; branching?: number; children?: TreeChildren; fill?: boolean }
  /**
   * Chains whose length follows the draft's measured acceptance and costs (0: the target decodes
   * alone, probing the draft now and then). lookup: true first tries the tokens that followed the
   * latest earlier occurrence of the context's tail (of up to maxNgram tokens, default 3; at most
   * maxLength of them), as 'ngram' does, at each step where their measured acceptance and cost
   * promise more tokens per ms than the target alone; else the step drafts or decodes as without
   * lookup. Default false.
   */
  | { kind: 'adaptive'; maxLength?: number; lookup?: boolean; maxNgram?: number }
  | { kind: 'ngram'; length?: number; maxNgram?: number };

export interface SpeculativeDecoderOptions {
  target: Model;
  /** Not needed for the 'ngram' strategy. */
  draft?: Model;
  /** Default: { kind: 'chain', length: 4 }. */
  strategy?: Strategy;
  /** Default sampling for requests (greedy when omitted). */
  sampling?: SamplingOptions;
  /** Requests served at the same time; later ones wait. Default 2. */
  maxConcurrent?: number;
  /**
   * Called after every verification with the target's rows along the accepted path (used by the
   * online distiller to record where the draft was corrected). Runs on the decoding path: keep it cheap.
   */
  onVerified?: (step: VerifiedStep) => void;
  /**
   * When a running request takes up new draft weights (draft.setWeights, as an online update does):
   * 'step' (default) at its next step, where its draft cache is rebuilt over the context with the
   * new weights (one draft pass over the context); 'request' never, so only requests that start
   * afterwards use them. Output stays exact either way: only the proposals change.
   */
  weightSwap?: WeightSwap;
  /**
   * Concurrent requests' chain steps run together (Sequence.chainRun's `batch`): one drafting pass
   * per drafted position and one target pass for all of them, so the weights stream once per pass
   * for the batch. Every request's output is the same, bit for bit; with several requests in
   * flight, tokens per second rise. Chains only (the 'chain' strategy, 'adaptive' while it drafts,
   * and trees shaped as chains). Default true.
   */
  batching?: boolean;
}

export type WeightSwap = 'step' | 'request';

/** What one verification saw, for recording. */
export interface VerifiedStep {
  request: number;
  /** The request's tokens (prompt and generated) before this step; the last one is the step's input. */
  context: readonly number[];
  /**
   * Draft tokens proposed along the longest chain (for a tree with siblings: the accepted path's
   * depth, plus one where a child of its last node was rejected; a tree shaped as a chain reports
   * its length, as chains do).
   */
  drafted: number;
  accepted: number;
  /** Emitted tokens: the accepted ones then the correction or bonus. */
  emitted: Int32Array;
  /** [(accepted + 1) x vocabSize] target logits: row i is the target's distribution for emitted[i]. */
  targetLogits: Float32Array;
  vocabSize: number;
}

export interface SpeculativeGenerateOptions {
  tokens?: Int32Array | number[];
  prompt?: string;
  maxTokens: number;
  sampling?: SamplingOptions;
  seed?: Seed;
  /**
   * Philox stream of this request, an integer in [0, 2^32 - 1]. Default: 0 when `seed` is given, so
   * a seeded request is reproducible; else the request's number (mod 2^32), so unseeded requests
   * draw independently. Same seed + stream = same output on a fixed draft.
   */
  stream?: Seed;
  signal?: AbortSignal;
  /**
   * Stop when the generated text contains one of these strings (needs a tokenizer). The output ends
   * with the token that completed the string (its text included), for every strategy.
   */
  stop?: string[];
  /** Token ids that end generation (default: the target's end-of-sequence tokens). */
  stopTokens?: number[];
  /** Called with the request's id when it starts (the id found in step events and VerifiedStep). */
  onStart?: (request: number) => void;
  /** Called once when the request has finished (not when it failed or was aborted), with its stats: a stream's result.stats. */
  onStats?: (stats: RequestStats) => void;
}

export interface RequestStats {
  /** Draft tokens proposed (for trees: the tree nodes). */
  drafted: number;
  /** Draft tokens accepted. */
  accepted: number;
  /** accepted / drafted. */
  acceptanceRate: number;
  /** Accepted draft tokens per target pass. */
  meanAcceptedLength: number;
  /** Tokens emitted per target pass (accepted + 1). */
  tokensPerStep: number;
  /** acceptanceByPosition[i]: the fraction of steps that drafted position i and had it accepted. */
  acceptanceByPosition: number[];
  targetPasses: number;
  draftPasses: number;
  targetMs: number;
  draftMs: number;
  totalMs: number;
  tokensPerSecond: number;
  /** Emitted tokens. */
  tokens: number;
  /** Times a running request took up new draft weights at a step (weightSwap 'step'). */
  draftWeightSwaps: number;
  /** Adaptive with lookup: tokens its n-gram lookups proposed, and of those accepted (not in drafted / accepted). */
  lookupProposed: number;
  lookupAccepted: number;
}

export interface SpeculativeResult {
  tokens: Int32Array;
  text?: string;
  stopReason: 'eos' | 'maxTokens' | 'stop' | 'context';
  stats: RequestStats;
}

export type { StreamChunk } from './Model.js';

export interface StepEvent {
  request: number;
  /** Draft tokens proposed (for 'ngram': lookup tokens). */
  drafted: number;
  accepted: number;
  emitted: number;
  /** Adaptive's lookup steps (strategy.lookup): the tokens the lookup proposed and how many were accepted. */
  lookup?: { proposed: number; accepted: number };
}

/** Running totals that metrics() reports. */
class Counters {
  drafted = 0;
  accepted = 0;
  steps = 0;
  emitted = 0;
  targetPasses = 0;
  draftPasses = 0;
  targetMs = 0;
  draftMs = 0;
  totalMs = 0;
  draftWeightSwaps = 0;
  lookupProposed = 0;
  lookupAccepted = 0;
  posDrafted: number[] = [];
  posAccepted: number[] = [];

  record(drafted: number, accepted: number, emitted: number): void {
    this.drafted += drafted;
    this.accepted += accepted;
    this.emitted += emitted;
    this.steps += 1;
  }

  recordChain(g: number, accepted: number): void {
    for (let i = 0; i < g; i++) {
      this.posDrafted[i] = (this.posDrafted[i] ?? 0) + 1;
      if (i < accepted) this.posAccepted[i] = (this.posAccepted[i] ?? 0) + 1;
    }
  }

  add(o: Counters): void {
    for (const k of ['drafted', 'accepted', 'steps', 'emitted', 'targetPasses', 'draftPasses', 'targetMs', 'draftMs', 'totalMs', 'draftWeightSwaps', 'lookupProposed', 'lookupAccepted'] as const)
      this[k] += o[k];
    o.posDrafted.forEach((v, i) => (this.posDrafted[i] = (this.posDrafted[i] ?? 0) + v));
    o.posAccepted.forEach((v, i) => (this.posAccepted[i] = (this.posAccepted[i] ?? 0) + v));
  }

  stats(): RequestStats {
    const steps = Math.max(1, this.steps);
    return {
      drafted: this.drafted,
      accepted: this.accepted,
      acceptanceRate: this.drafted ? this.accepted / this.drafted : 0,
      meanAcceptedLength: this.accepted / steps,
      tokensPerStep: this.emitted / steps,
      acceptanceByPosition: this.posDrafted.map((d, i) => (d ? (this.posAccepted[i] ?? 0) / d : 0)),
      targetPasses: this.targetPasses,
      draftPasses: this.draftPasses,
      targetMs: this.targetMs,
      draftMs: this.draftMs,
      totalMs: this.totalMs,
      tokensPerSecond: this.totalMs > 0 ? (this.emitted * 1000) / this.totalMs : 0,
      tokens: this.emitted,
      draftWeightSwaps: this.draftWeightSwaps,
      lookupProposed: this.lookupProposed,
      lookupAccepted: this.lookupAccepted,
    };
  }
}

/** Expected speedup of drafting g tokens with per-token acceptance a and draft/target cost ratio c. */
export function expectedSpeedup(a: number, g: number, c: number): number {
  checkRate(a, 'a');
  checkInteger(g, 'g', 0);
  checkCost(c);
  if (g === 0) return 1;
  const gain = a >= 1 ? g + 1 : (1 - a ** (g + 1)) / (1 - a);
  return gain / (g * c + 1);
}

/** The g in [0, maxLength] that maximises expectedSpeedup. */
export function bestLength(a: number, c: number, maxLength: number): number {
  checkRate(a, 'a');
  checkCost(c);
  checkMaxLength(maxLength, 0);
  let best = 0;
  let bestValue = 1;
  for (let g = 1; g <= maxLength; g++) {
    const v = expectedSpeedup(a, g, c);
    if (v > bestValue + 1e-12) {
      best = g;
      bestValue = v;
    }
  }
  return best;
}

/**
 * The g in [minLength, maxLength] that maximises expectedSpeedup with a rate per chain position:
 * measured, acceptance falls with depth, so one pooled rate a overvalues long chains. Position i's
 * rate is (accepted[i] + 2a) / (tested[i] + 2) (the pooled rate as a prior worth two tests), and the
 * expected tokens are 1 + a_0 + a_0 a_1 + ... in place of (1 - a^(g+1)) / (1 - a); with no
 * measurements every a_i is a and this is the formula itself. c is the cost of one more drafted
 * token as a fraction of a step that drafts none. minLength 0 (default 1) lets it answer "do not
 * draft": with a weak draft, or a target whose pass grows with its tokens, drafting costs more than
 * it returns.
 */
export function bestLengthByPosition(
  a: number,
  tested: readonly number[],
  accepted: readonly number[],
  c: number,
  maxLength: number,
  minLength: 0 | 1 = 1,
): number {
  checkRate(a, 'a');
  if (!Array.isArray(tested) || !Array.isArray(accepted)) throw new TypeError('tested and accepted must be arrays of counts');
  checkCost(c);
  if (minLength !== 0 && minLength !== 1) throw new RangeError(`minLength must be 0 or 1, got ${String(minLength)}`);
  checkMaxLength(maxLength, minLength);
  return planByPosition(a, tested, accepted, c, maxLength, minLength).length;
}

/** bestLengthByPosition's length and its expected speedup (tokens per cost of a step that drafts none). */
function planByPosition(a: number, tested: readonly number[], accepted: readonly number[], c: number, maxLength: number, minLength: 0 | 1): { length: number; speedup: number } {
  const tokens = [1];
  let reach = 1;
  for (let g = 1; g <= maxLength; g++) {
    reach *= ((accepted[g - 1] ?? 0) + 2 * a) / ((tested[g - 1] ?? 0) + 2);
    tokens.push(tokens[g - 1]! + reach);
  }
  let best: number = minLength;
  for (let g = minLength + 1; g <= maxLength; g++) if (tokens[g]! / (g * c + 1) > tokens[best]! / (best * c + 1) + 1e-12) best = g;
  return { length: best, speedup: tokens[best]! / (best * c + 1) };
}

/**
 * Decayed acceptance counts of a proposer (the draft's chains, or adaptive's lookups): pooled
 * accepted and rejected, and per chain position tested and accepted (about the last 200 steps, so
 * that they follow a draft that changes).
 */
class Acceptance {
  acceptedSum = 1;
  rejectedSum = 1;
  tested: number[] = [];
  accepted: number[] = [];

  get rate(): number {
    return this.acceptedSum / (this.acceptedSum + this.rejectedSum);
  }

  /** A step that proposed g tokens and had a of them accepted. */
  add(g: number, a: number): void {
    const keep = 0.995;
    this.acceptedSum = keep * this.acceptedSum + a;
    this.rejectedSum = keep * this.rejectedSum + (a < g ? 1 : 0);
    for (let i = 0; i < this.tested.length; i++) {
      this.tested[i]! *= keep;
      this.accepted[i] = keep * (this.accepted[i] ?? 0);
    }
    // Positions 0..a were tested (a accepted, then the rejection at a when a < g).
    for (let i = 0; i < Math.min(g, a + 1); i++) {
      this.tested[i] = (this.tested[i] ?? 0) + 1;
      if (i < a) this.accepted[i] = (this.accepted[i] ?? 0) + 1;
    }
  }

  plan(c: number, maxLength: number, minLength: 0 | 1): { length: number; speedup: number } {
    return planByPosition(this.rate, this.tested, this.accepted, c, maxLength, minLength);
  }
}

/** A decayed least-squares line y = one + slope * x over recent (x, y) samples (about the last 50). */
class LineFit {
  #w = 0;
  #x = 0;
  #y = 0;
  #xx = 0;
  #xy = 0;

  add(x: number, y: number): void {
    const keep = 0.98;
    this.#w = keep * this.#w + 1;
    this.#x = keep * this.#x + x;
    this.#y = keep * this.#y + y;
    this.#xx = keep * this.#xx + x * x;
    this.#xy = keep * this.#xy + x * y;
  }

  /** The line, or undefined before any sample. Until x varies, the slope is prior * one. */
  line(prior: number): { one: number; slope: number } | undefined {
    if (this.#w < 1) return undefined;
    const mx = this.#x / this.#w;
    const my = this.#y / this.#w;
    const vx = this.#xx / this.#w - mx * mx;
    let slope = vx > 0.25 ? (this.#xy / this.#w - mx * my) / vx : (prior * my) / (1 + prior * mx);
    const one = Math.max(my - slope * mx, 0.25 * my);
    slope = Math.min(Math.max(slope, 0.01 * one), one);
    return { one, slope };
  }
}

// The speedup model's arguments: an acceptance rate, a cost ratio, and a loop bound (a huge or
// infinite maxLength would loop for ever).
function checkRate(a: unknown, name: string): void {
  if (typeof a !== 'number' || !(a >= 0 && a <= 1)) throw new RangeError(`${name} must be a number in [0, 1], got ${String(a)}`);
}
function checkCost(c: unknown): void {
  if (typeof c !== 'number' || !(c >= 0) || !Number.isFinite(c)) throw new RangeError(`c must be a finite number >= 0, got ${String(c)}`);
}
function checkMaxLength(v: unknown, min: number): void {
  checkInteger(v, 'maxLength', min, 1 << 16);
}

function checkPositiveInt(v: unknown, name: string, max = 1 << 16): number {
  return checkInteger(v, name, 1, max);
}

const strategyKeys: Record<Strategy['kind'], readonly string[]> = {
  chain: ['kind', 'length'],
  tree: ['kind', 'budget', 'maxDepth', 'branching', 'children', 'fill'],
  adaptive: ['kind', 'maxLength', 'lookup', 'maxNgram'],
  ngram: ['kind', 'length', 'maxNgram'],
};

// A chain run waiting in a batch holds a libuv pool thread, so more generations in flight than the
// pool has threads cap the batches (and keep other async work waiting). Node starts the pool before
// an ES module's code runs, so only the environment can size it. True when it said so.
function warnIfPoolTooSmall(inFlight: number): boolean {
  const pool = effectiveThreadPool(process.env);
  if (inFlight <= pool) return false;
  process.emitWarning(
    `${inFlight} generations in flight with batching, and libuv's thread pool has ${pool} threads: each generation may ` +
      `hold one, so batches stay below ${inFlight}. Set UV_THREADPOOL_SIZE to your most generations at once + 4 ` +
      `(here at least ${poolFor(inFlight)}) in the environment before Node starts`,
    { code: 'OSD_THREADPOOL' },
  );
  return true;
}

/** The keys of SpeculativeDecoderOptions (and _fault, the tests' planted bugs). */
const decoderKeys = ['target', 'draft', 'strategy', 'sampling', 'maxConcurrent', 'onVerified', 'weightSwap', 'batching', '_fault'];

/** The keys of SpeculativeGenerateOptions. */
const generateKeys = ['tokens', 'prompt', 'maxTokens', 'sampling', 'seed', 'stream', 'signal', 'stop', 'stopTokens', 'onStart', 'onStats'];

function normaliseStrategy(s: Strategy | undefined): Required<Strategy> & Strategy {
  const st = s ?? { kind: 'chain' };
  if (typeof st !== 'object' || st === null) throw new TypeError('strategy must be an object with a kind');
  const keys = Object.hasOwn(strategyKeys, st.kind) ? strategyKeys[st.kind as Strategy['kind']] : undefined;
  if (keys) checkKeys(st, keys, `strategy (kind '${st.kind}')`);
  switch (st.kind) {
    case 'chain':
      return { kind: 'chain', length: checkPositiveInt(st.length ?? 4, 'strategy.length', 64) };
    case 'tree':
      if (st.children !== undefined && !['auto', 'sampled', 'deterministic'].includes(st.children))
        throw new RangeError(`strategy.children must be 'auto', 'sampled' or 'deterministic', got '${String(st.children)}'`);
      if (st.fill !== undefined && typeof st.fill !== 'boolean') throw new TypeError('strategy.fill must be a boolean');
      return {
        kind: 'tree',
        budget: checkPositiveInt(st.budget ?? 16, 'strategy.budget', 256),
        maxDepth: checkPositiveInt(st.maxDepth ?? 6, 'strategy.maxDepth', 64),
        branching: checkPositiveInt(st.branching ?? 4, 'strategy.branching', 64),
        children: st.children ?? 'auto',
        fill: st.fill ?? false,
      };
    case 'adaptive':
      if (st.lookup !== undefined && typeof st.lookup !== 'boolean') throw new TypeError('strategy.lookup must be a boolean');
      return {
        kind: 'adaptive',
        maxLength: checkPositiveInt(st.maxLength ?? 8, 'strategy.maxLength', 64),
        lookup: st.lookup ?? false,
        maxNgram: checkPositiveInt(st.maxNgram ?? 3, 'strategy.maxNgram', 16),
      };
    case 'ngram':
      return {
        kind: 'ngram',
        length: checkPositiveInt(st.length ?? 4, 'strategy.length', 64),
        maxNgram: checkPositiveInt(st.maxNgram ?? 3, 'strategy.maxNgram', 16),
      };
    default:
      throw new RangeError(`strategy.kind must be 'chain', 'tree', 'adaptive' or 'ngram', got '${String((st as { kind: unknown }).kind)}'`);
  }
}

/**
 * Checks that draft and target share a vocabulary; returns the ids they have in common. A draft with
 * a restricted head must score at least one of them (its rows would otherwise be all -Infinity).
 */
function sharedVocab(target: Model, draft: Model): number {
  const n = sharedIds(target, draft);
  const head = draft.headTokenIds();
  if (head && head[0]! >= n) throw new RangeError(`the draft's restricted head scores none of the ${n} ids it shares with the target`);
  return n;
}

function sharedIds(target: Model, draft: Model): number {
  const vt = target.info.vocabSize;
  const vd = draft.info.vocabSize;
  const tt = target.tokenizer;
  const td = draft.tokenizer;
  if (tt && td) {
    const n = Math.min(tt.vocabSize, td.vocabSize);
    for (let i = 0; i < n; i++) {
      if (tt.tokenText(i) !== td.tokenText(i))
        throw new RangeError(`draft and target tokenizers differ at token ${i}: '${td.tokenText(i)}' vs '${tt.tokenText(i)}'`);
    }
    // A padded superset (extra ids past the tokenizer, as Qwen pads its embeddings) is fine.
    if (vt < tt.vocabSize || vd < td.vocabSize) throw new RangeError('a model has fewer embedding rows than tokens');
    return n;
  }
  if (tt || td) throw new RangeError('only one of draft and target has a tokenizer: they cannot be checked to share one');
  if (vt !== vd) throw new RangeError(`draft vocabulary (${vd}) differs from the target's (${vt})`);
  return vt;
}

interface Request {
  id: number;
  /** Aborted by the caller's signal or dispose(): stops a long prefill between chunks. */
  signal?: AbortSignal;
  /** Base of the Philox streams of this request's steps. */
  stream: bigint;
  sampling: SamplingOptions;
  seed: Seed;
  stopTokens: Set<number>;
  /** stopTokens as the native calls take them. */
  stopIds: Int32Array;
  counters: Counters;
  /** Adaptive's last step, for its step timing: drafted tokens, the draft's catch-up ms, target passes (1, or the plain tokens of one native call). */
  lastStep?: { drafted: number; catchUpMs: number; tokens: number; lookup?: boolean };
  /** Tokens the request may still emit (maxTokens minus those emitted), set before each step. */
  remaining: number;
  /** Steps (Philox stream indices) the last call of #step used: more than 1 for a run of chain steps. */
  stepsUsed: number;
  /** The next run's steps at most: 1, then doubling to CHAIN_RUN_STEPS, so that a stream starts at once. */
  runSteps: number;
  /** The n-gram strategy's lookups that found nothing, in a row. */
  ngramMisses: number;
  /**
   * A run's per-step bookkeeping (counters, events, onVerified), kept until the decoding loop knows
   * how many of its tokens are emitted: steps that start after a stop are dropped, as they would
   * never have run one step at a time. `start`: the step's first token within the run.
   */
  steps: { start: number; settle: () => void }[];
}

/** A chain strategy's steps per native call (Sequence.chainRun), at most, and its time budget (ms). */
const CHAIN_RUN_STEPS = 64;
const CHAIN_RUN_MS = 20;

/** Philox streams: step s of a request verifies with stream base + 2s and samples draft tokens with base + 2s + 1. */
function streamOf(req: { stream: bigint }, step: number, draft: boolean): bigint {
  return (req.stream << 32n) + BigInt(2 * step + (draft ? 1 : 0));
}

/** The k largest logits of a row, highest first (ties: lower id first), as [token, logit] pairs. */
function topLogits(logits: Float32Array, k: number): [number, number][] {
  // Kept by insertion: a sort per new entry cost ~12 ms of event loop on a rising 49K row.
  const best: [number, number][] = [];
  for (let i = 0; i < logits.length; i++) {
    const l = logits[i]!;
    if (l === -Infinity) continue; // probability 0 (outside a restricted head): never a candidate
    if (best.length < k || l > best[best.length - 1]![1]) {
      let j = best.length < k ? best.length : best.length - 1;
      if (best.length < k) best.push([i, l]);
      while (j > 0 && best[j - 1]![1] < l) {
        best[j] = best[j - 1]!;
        j--;
      }
      best[j] = [i, l];
    }
  }
  return best;
}

/** Top-k of a warped row for tree expansion: returns [token, probability] pairs, best first. */
function topCandidates(logits: Float32Array, k: number, temperature: number): [number, number][] {
  const t = temperature > 0 ? temperature : 1;
  const best = topLogits(logits, k);
  if (!best.length) return [];
  const max = best[0]![1];
  let z = 0;
  for (let i = 0; i < logits.length; i++) z += Math.exp((logits[i]! - max) / t);
  return best.map(([i, l]) => [i, Math.exp((l - max) / t) / z]);
}

/** Costs of a sampled tree in target decode passes: each node adds `node` to the target pass, each level `level` (a draft pass). */
export interface TreeCosts {
  node: number;
  level: number;
}

/**
 * The shape of a sampled draft tree: a spine (each level's first child, drafted like a chain, one
 * draft pass per level) with extra siblings at each level, drawn from the row the spine already
 * needed, so siblings cost target tokens but no draft pass. accept[j] is the chance that a node's
 * (j + 1)-th child is accepted once the earlier ones were rejected (Sequoia's positional
 * acceptance); a node is worth the chance that verification accepts it. Nodes are added best value
 * per cost first; without costs the budget is filled, with costs the shape stops where expected
 * tokens per unit of time, (1 + value) / (1 + cost), is highest (at least one node, so acceptance
 * keeps being measured). Returns widths[d], the number of children at level d + 1 (the first is the
 * spine). The shape depends on no token of the step, which keeps sampled verification exact.
 */
export function sampledTreeShape(accept: readonly number[], budget: number, maxDepth: number, costs?: TreeCosts): number[] {
  if (!Array.isArray(accept) || accept.some((a) => !(typeof a === 'number' && a >= 0 && a <= 1))) throw new RangeError('accept must be an array of numbers in [0, 1]');
  // Bounded as bestLength's maxLength is: the search is quadratic in the budget, on the caller's thread.
  checkInteger(budget, 'budget', 0, 1 << 12);
  checkInteger(maxDepth, 'maxDepth', 0, 1 << 12);
  if (costs !== undefined && (costs === null || typeof costs !== 'object')) throw new TypeError('costs must be an object { node, level }');
  if (costs !== undefined && !(costs.node >= 0 && costs.level >= 0)) throw new RangeError('costs.node and costs.level must be numbers >= 0');
  const reach: number[] = [1]; // reach[j]: chance that ranks 0..j-1 were all rejected
  for (let j = 0; j < accept.length; j++) reach.push(reach[j]! * (1 - accept[j]!));
  const widths: number[] = [];
  const spineValue = (d: number) => (accept[0] ?? 0) ** d; // chance of reaching level d's spine node
  const node = costs?.node ?? 1;
  const level = costs?.level ?? 0;
  let value = 0;
  let cost = 0;
  let best = { ratio: -Infinity, widths: [] as number[] };
  for (let n = 0; n < budget; n++) {
    // Extend the spine, or add the next sibling at the level where it is worth most per cost.
    let at = widths.length < maxDepth && accept.length ? widths.length : -1;
    let v = at >= 0 ? spineValue(at + 1) : 0;
    let c = node + level;
    for (let d = 0; d < widths.length; d++) {
      const r = widths[d]!;
      if (r >= accept.length) continue;
      const vs = spineValue(d) * reach[r]! * accept[r]!;
      if (vs / node > v / c) [at, v, c] = [d, vs, node];
    }
    if (at < 0 || v <= 0) break;
    if (at === widths.length) widths.push(1);
    else widths[at]!++;
    value += v;
    cost += c;
    const ratio = (1 + value) / (1 + cost);
    if (!costs || ratio > best.ratio) best = { ratio, widths: [...widths] };
  }
  return best.widths;
}

interface RankCounts {
  tried: number[];
  accepted: number[];
}

/** Acceptance of each child rank (earlier siblings rejected), with a uniform prior. */
function rankAcceptance(r: RankCounts, branching: number): number[] {
  return Array.from({ length: branching }, (_, j) => ((r.accepted[j] ?? 0) + 1) / ((r.tried[j] ?? 0) + 2));
}

/** Counts, at every node the verification visited, which ranks were tried and which was accepted. */
function countRanks(r: RankCounts, parents: number[], path: number[]): void {
  const decay = 0.995; // forget slowly, so the shape follows a change of domain
  for (let j = 0; j < r.tried.length; j++) {
    r.tried[j]! *= decay;
    r.accepted[j]! *= decay;
  }
  let at = -1;
  for (let k = 0; k <= path.length; k++) {
    const kids: number[] = [];
    parents.forEach((p, i) => p === at && kids.push(i));
    const rank = k < path.length ? kids.indexOf(path[k]!) : kids.length; // kids.length: all rejected
    for (let j = 0; j < kids.length && j <= rank; j++) {
      r.tried[j] = (r.tried[j] ?? 0) + 1;
      r.accepted[j] = (r.accepted[j] ?? 0) + (j === rank ? 1 : 0);
    }
    if (k < path.length) at = path[k]!;
  }
}

/** Test-only planted bugs: the exactness tests must catch each. */
export type SpeculativeFault = 'tree-top-children-as-sampled' | 'tree-top-siblings-as-sampled' | 'lookup-first-unchecked';

/** The events of a SpeculativeDecoder and their arguments. */
export interface SpeculativeDecoderEvents {
  /** After each verification pass. */
  step: [StepEvent];
}

export class SpeculativeDecoder extends EventEmitter<SpeculativeDecoderEvents> {
  readonly target: Model;
  readonly draft: Model | undefined;
  readonly strategy: Required<Strategy> & Strategy;
  readonly sampling: SamplingOptions;
  readonly maxConcurrent: number;
  readonly weightSwap: WeightSwap;
  /** Whether concurrent requests' chain steps run together (options.batching). */
  readonly batching: boolean;
  readonly #onVerified: ((step: VerifiedStep) => void) | undefined;
  #totals = new Counters();
  #nextRequest = 1;
  #active = 0;
  #poolWarned = false;
  #waiting: (() => void)[] = [];
  #running = new Set<Promise<unknown>>();
  #disposed = false;
  #disposing: Promise<void> | undefined;
  #disposeController = new AbortController();
  /** Shared vocabulary size. */
  readonly vocabSize: number;
  // Adaptive speculation state: acceptance counts and measured costs.
  /** Adaptive chains: the draft's acceptance, pooled and per chain position (it falls with depth). */
  #drafts = new Acceptance();
  /** Adaptive with lookup: the lookups' acceptance (greedy and sampled requests apart), and a line fit of a step's ms against the tokens it proposed. */
  #lookups = { greedy: new Acceptance(), sampled: new Acceptance() };
  #lookupFit = new LineFit();
  /** Lookups found and declined since the last one verified, how many make a probe, and whether one runs. */
  #lookupDeclined = 0;
  #lookupProbeEvery = 16;
  #lookupProbing = false;
  /** Lookup probes so far (they alternate one token and the whole proposal), and lookup steps timed or skipped. */
  #lookupProbes = 0;
  #lookupSteps = 0;
  /** Adaptive: the last length chosen, how many steps in a row chose it, plain tokens since the last drafting step. */
  #lastLength = -1;
  #sameSteps = 0;
  #plainTokens = 0;
  /** Adaptive: plain tokens between probing steps while drafting does not pay, and whether one runs. */
  #probeEvery = 16;
  #probing = false;
  /** Adaptive: the draft's weightsVersion when the probe interval was last reset. */
  #probedWeights = 0;
  // Shaped trees: decayed counts of the j-th child tried and accepted (earlier siblings rejected),
  // apart for greedy requests (top tokens) and sampled ones (drawn tokens).
  #ranks = { greedy: { tried: [] as number[], accepted: [] as number[] }, sampled: { tried: [] as number[], accepted: [] as number[] } };
  // Their measured costs: draft ms per level, and decayed sums for a line fit of target ms against nodes.
  #levelMs = 0;
  #passFit = new LineFit();
  /** Adaptive chains: decayed line fit of a step's ms against its drafted tokens. */
  #stepFit = new LineFit();
  readonly #fault: SpeculativeFault | undefined;

  constructor(options: SpeculativeDecoderOptions) {
    super();
    if (typeof options !== 'object' || options === null) throw new TypeError('options must be an object');
    checkKeys(options, decoderKeys);
    const { target, draft } = options;
    if (!(target instanceof Model)) throw new TypeError('target must be a loaded Model');
    this.strategy = normaliseStrategy(options.strategy);
    if (this.strategy.kind !== 'ngram') {
      if (!(draft instanceof Model)) throw new TypeError('draft must be a loaded Model');
    }
    if (target.disposed) throw new TypeError('target was disposed');
    if (draft?.disposed) throw new TypeError('draft was disposed');
    this.target = target;
    this.draft = draft;
    this.vocabSize = draft ? sharedVocab(target, draft) : sampledVocab(target);
    if (options.sampling !== undefined) checkSampling(options.sampling);
    this.sampling = options.sampling ?? { temperature: 0 };
    this.maxConcurrent = options.maxConcurrent === undefined ? 2 : checkPositiveInt(options.maxConcurrent, 'maxConcurrent', 1024);
    if (options.onVerified !== undefined && typeof options.onVerified !== 'function') throw new TypeError('onVerified must be a function');
    this.#onVerified = options.onVerified;
    const swap = options.weightSwap ?? 'step';
    if (swap !== 'step' && swap !== 'request') throw new RangeError(`weightSwap must be 'step' or 'request', got ${String(swap)}`);
    this.weightSwap = swap;
    if (options.batching !== undefined && typeof options.batching !== 'boolean') throw new TypeError('batching must be a boolean');
    this.batching = options.batching ?? true;
    this.#fault = (options as { _fault?: SpeculativeFault })._fault;
  }

  /** Cumulative statistics over every finished request. */
  metrics(): RequestStats {
    return this.#totals.stats();
  }

  /** Generates to completion and returns the tokens, the text (with a tokenizer) and the request's stats. */
  async generate(options: SpeculativeGenerateOptions): Promise<SpeculativeResult> {
    const out: number[] = [];
    let stopReason: SpeculativeResult['stopReason'] = 'maxTokens';
    const stats = await this.#run(options, (tokens) => out.push(...tokens), (r) => (stopReason = r));
    options.onStats?.(stats);
    const tokens = Int32Array.from(out);
    const tk = this.target.tokenizer;
    return tk ? { tokens, text: tk.decode(tokens), stopReason, stats } : { tokens, stopReason, stats };
  }

  /** Streams chunks of tokens and text as they are accepted. Breaking out of the loop aborts the request. */
  async *stream(options: SpeculativeGenerateOptions): AsyncGenerator<StreamChunk, SpeculativeResult['stopReason'], void> {
    if (options === null || typeof options !== 'object') throw new TypeError('options must be an object');
    checkSignal(options.signal);
    const tk = this.target.tokenizer;
    const decoder = tk ? new TokenStreamDecoder(tk) : undefined;
    const stopReason = yield* pushToAsyncIterable<StreamChunk, SpeculativeResult['stopReason']>(async (push, signal) => {
      let reason: SpeculativeResult['stopReason'] = 'maxTokens';
      const stats = await this.#run(
        { ...options, signal },
        (tokens) => push({ tokens: Int32Array.from(tokens), text: decoder ? decoder.push(tokens) : '' }),
        (r) => (reason = r),
      );
      options.onStats?.(stats);
      return reason;
    }, options.signal);
    const tail = decoder?.flush() ?? '';
    if (tail) yield { tokens: new Int32Array(0), text: tail };
    return stopReason;
  }

  async #acquire(signal: AbortSignal | undefined): Promise<void> {
    while (this.#active >= this.maxConcurrent) {
      // Leave the queue as soon as the signal aborts, and pass a wake-up on if one reached us then.
      await new Promise<void>((resolve, reject) => {
        const wake = () => {
          signal?.removeEventListener('abort', onAbort);
          resolve();
        };
        const onAbort = () => {
          const i = this.#waiting.indexOf(wake);
          if (i >= 0) this.#waiting.splice(i, 1);
          reject(signal!.reason instanceof Error ? signal!.reason : Object.assign(new Error('The operation was aborted'), { name: 'AbortError' }));
        };
        if (signal?.aborted) return onAbort();
        signal?.addEventListener('abort', onAbort, { once: true });
        this.#waiting.push(wake);
      });
      if (signal?.aborted) {
        if (this.#active < this.maxConcurrent) this.#waiting.shift()?.();
        throwIfAborted(signal);
      }
    }
    this.#active++;
    // Once per decoder, the first time it happens.
    if (this.batching && !this.#poolWarned) this.#poolWarned = warnIfPoolTooSmall(this.#active);
  }

  #release(): void {
    this.#active--;
    this.#waiting.shift()?.();
  }

  async #run(
    options: SpeculativeGenerateOptions,
    emit: (tokens: number[]) => void,
    setStop: (r: SpeculativeResult['stopReason']) => void,
  ): Promise<RequestStats> {
    if (this.#disposed) throw disposedError('decoder');
    if (typeof options !== 'object' || options === null) throw new TypeError('options must be an object');
    checkMisplacedSampling(options);
    checkKeys(options, generateKeys);
    const signal = checkSignal(options.signal);
    const prompt = promptTokens(options, this.target, this.vocabSize, 'target');
    const maxTokens = checkInteger(options.maxTokens, 'maxTokens', 0);
    if (options.stop !== undefined && (!Array.isArray(options.stop) || options.stop.some((s) => typeof s !== 'string')))
      throw new TypeError('stop must be an array of strings');
    const emptyStop = options.stop?.indexOf('') ?? -1;
    if (emptyStop >= 0) throw new RangeError(`stop[${emptyStop}] is the empty string, which every text contains`);
    if (options.stop?.length && !this.target.tokenizer) throw new TypeError('stop strings need a target with a tokenizer');
    if (options.sampling !== undefined) checkSampling(options.sampling);
    // The caller's stop tokens are checked against the target's vocabulary (the default, the
    // target's end-of-sequence ids, may lie past the vocabulary it shares with the draft).
    const stopTokens = options.stopTokens === undefined ? this.target.eosTokens : checkTokenIds(options.stopTokens, 'stopTokens', this.target.info.vocabSize);
    const id = this.#nextRequest++;
    // A seeded request is reproducible by default (stream 0); an unseeded one gets its own stream.
    let streamBase = options.seed !== undefined ? 0n : BigInt(id) & 0xffffffffn;
    if (options.stream !== undefined) {
      if (typeof options.stream !== 'number' && typeof options.stream !== 'bigint') throw new TypeError(`stream must be a number or a bigint, got ${typeof options.stream}`);
      // Step s of the request uses Philox stream (base << 32) + 2s (+ 1 for the draft): the base has 32 bits.
      if ((typeof options.stream === 'number' && !Number.isSafeInteger(options.stream)) || options.stream < 0 || options.stream > 0xffffffff)
        throw new RangeError(`stream must be an integer in [0, 2^32 - 1], got ${String(options.stream)}`);
      streamBase = BigInt(options.stream);
    }
    const req: Request = {
      id,
      stream: streamBase,
      sampling: options.sampling ?? this.sampling,
      seed: options.seed ?? 0,
      stopTokens: new Set(stopTokens),
      stopIds: Int32Array.from(new Set(stopTokens)),
      counters: new Counters(),
      remaining: 0,
      stepsUsed: 1,
      runSteps: 1,
      ngramMisses: 0,
      steps: [],
    };
    checkCallback(options.onStart, 'onStart');
    checkCallback(options.onStats, 'onStats');
    options.onStart?.(req.id);
    // The request's own signal: aborted by the caller's or by dispose(), unlinked from both when done.
    const own = new AbortController();
    const unlink = [forwardAbort(signal, own), forwardAbort(this.#disposeController.signal, own)];
    const combined = own.signal;
    req.signal = combined;
    const work = (async () => {
      try {
        await this.#acquire(combined);
        try {
          return await this.#decode(req, prompt, maxTokens, options.stop ?? [], combined, emit, setStop);
        } finally {
          this.#release();
        }
      } finally {
        for (const f of unlink) f();
      }
    })();
    this.#running.add(work);
    try {
      return await work;
    } finally {
      this.#running.delete(work);
    }
  }

  async #decode(
    req: Request,
    prompt: Int32Array,
    maxTokens: number,
    stopStrings: string[],
    signal: AbortSignal,
    emit: (tokens: number[]) => void,
    setStop: (r: SpeculativeResult['stopReason']) => void,
  ): Promise<RequestStats> {
    const started = performance.now();
    const T = this.target.createSequence();
    let D = this.draft && this.strategy.kind !== 'ngram' ? this.draft.createSequence() : undefined;
    const committed = Array.from(prompt);
    const tk = this.target.tokenizer;
    const textDecoder = stopStrings.length && tk ? new TokenStreamDecoder(tk) : undefined;
    const maxStop = Math.max(0, ...stopStrings.map((s) => s.length)); // a new match ends in the new text
    let text = '';
    let produced = 0;
    const c = req.counters;
    try {
      const capacity = T.capacity;
      if (committed.length >= capacity) throw new RangeError(`the prompt (${committed.length} tokens) does not fit the context of ${capacity}`);
      throwIfAborted(signal);
      // The target's cache holds everything but the last committed token, whose logits come from the next pass.
      if (committed.length > 1) await this.#timed(c, 'target', () => T.evaluate(committed.slice(0, -1), { lastOnly: true, signal }));
      for (let step = 0; produced < maxTokens; step += req.stepsUsed) {
        req.stepsUsed = 1;
        req.remaining = maxTokens - produced;
        throwIfAborted(signal);
        if (D && this.weightSwap === 'step' && D.weightsVersion !== this.draft!.weightsVersion) {
          // New draft weights: a fresh draft sequence, which the step catches up over the context.
          const stale = D;
          D = this.draft!.createSequence();
          await stale.dispose();
          c.draftWeightSwaps++;
        }
        const room = capacity - committed.length - 1; // positions left after the last token
        // A draft with a shorter context than the target drafts while it has room; after that the
        // steps draft nothing and verification samples the target alone (still exact).
        const draftRoom = D ? D.capacity - committed.length - 1 : Infinity;
        const budget = Math.max(0, Math.min(room, draftRoom, maxTokens - produced - 1));
        const cycleStart = performance.now();
        req.lastStep = undefined;
        const fresh = await this.#step(req, step, T, D, committed, budget);
        // Cut at the first stop token or at maxTokens.
        let emitTokens = fresh;
        let reason: SpeculativeResult['stopReason'] | undefined;
        const stopAt = fresh.findIndex((t) => req.stopTokens.has(t));
        if (stopAt >= 0) {
          emitTokens = fresh.slice(0, stopAt + 1);
          reason = 'eos';
        }
        if (produced + emitTokens.length >= maxTokens) {
          emitTokens = emitTokens.slice(0, maxTokens - produced);
          reason ??= 'maxTokens';
        }
        if (textDecoder) {
          // Token by token: the run ends with the token that completes a stop string, as decoding one
          // token at a time would end it, whatever the strategy emitted in this step.
          for (let i = 0; i < emitTokens.length; i++) {
            const from = Math.max(0, text.length - maxStop + 1);
            text += textDecoder.push(emitTokens[i]!);
            if (stopStrings.some((s) => text.indexOf(s, from) >= 0)) {
              emitTokens = emitTokens.slice(0, i + 1);
              reason = 'stop';
              break;
            }
          }
        }
        for (const st of req.steps) if (st.start === 0 || st.start < emitTokens.length) st.settle();
        req.steps = [];
        committed.push(...emitTokens);
        produced += emitTokens.length;
        if (emitTokens.length) emit(emitTokens);
        // Adaptive prices a drafted token by whole steps, the handling of what they emit included.
        const last = req.lastStep as Request['lastStep']; // set by #step (TypeScript keeps the reset's narrowing)
        if (last) {
          const ms = (performance.now() - cycleStart - last.catchUpMs) / last.tokens;
          // Lookup steps have a line of their own (see #lookupPlan). Its first two samples are left
          // out: the first lookup steps run cold (measured on the default pair: 4.3 and 5.3 ms, the
          // same lengths 1.3 and 2.6 ms after), and while lookups are declined few samples come to
          // outweigh such a one, so it priced them out for good.
          if (last.lookup) {
            if (++this.#lookupSteps > 2) this.#lookupFit.add(last.drafted, ms);
          } else this.#stepFit.add(last.drafted, ms);
        }
        if (reason) {
          setStop(reason);
          break;
        }
        if (committed.length >= capacity) {
          setStop('context');
          break;
        }
      }
    } finally {
      await Promise.all([T.dispose(), D?.dispose()]);
      c.totalMs = performance.now() - started;
      this.#totals.add(c);
    }
    return c.stats();
  }

  async #timed<R>(c: Counters, who: 'target' | 'draft', fn: () => Promise<R>): Promise<R> {
    const t0 = performance.now();
    const r = await fn();
    const ms = performance.now() - t0;
    if (who === 'target') {
      c.targetPasses++;
      c.targetMs += ms;
    } else {
      c.draftPasses++;
      c.draftMs += ms;
    }
    return r;
  }

  /** One speculation step; returns the emitted tokens (accepted + one). Caches stay consistent. */
  async #step(req: Request, step: number, T: Sequence, D: Sequence | undefined, committed: number[], budget: number): Promise<number[]> {
    switch (this.strategy.kind) {
      case 'chain':
        return this.#chainStep(req, step, T, D!, committed, Math.min(budget, this.strategy.length));
      case 'adaptive': {
        const { g, plain, lookup } = this.#adaptivePlan(req, committed, budget);
        if (lookup) return this.#lookupStep(req, step, T, committed, lookup);
        return plain > 0 ? this.#plainSteps(req, step, T, committed, plain) : this.#chainStep(req, step, T, D!, committed, g);
      }
      case 'tree': {
        // Best-first expansion for deterministic children, and for greedy trees that fill the budget;
        // else a spine with siblings, shaped from measured acceptance and costs.
        const greedy = req.sampling.temperature === 0;
        return this.strategy.children === 'deterministic' || (greedy && this.strategy.fill)
          ? this.#treeStep(req, step, T, D!, committed, budget)
          : this.#shapedTreeStep(req, step, T, D!, committed, budget);
      }
      case 'ngram':
        return this.#ngramStep(req, step, T, committed, budget);
    }
  }

  /**
   * Adaptive: the next step's chain length g, or g = 0 with the number of tokens the target decodes
   * alone in one native call (`plain`), or (with lookup) the lookup tokens to verify.
   */
  #adaptivePlan(req: Request, committed: number[], budget: number): { g: number; plain: number; lookup?: number[] } {
    if (this.strategy.kind !== 'adaptive') throw new Error('unreachable');
    const max = this.strategy.maxLength;
    // A step's measured time, one + slope * g ms (drafting, the target pass, verification, handling
    // what it emits); `one` is a plain token's. Until it is measured, a drafted token costs a fifth.
    const line = this.#stepFit.line(0.2);
    const c = line ? line.slope / line.one : 0.2;
    const drafting = this.#drafts.plan(c, max, 0);
    // Lookups compete with the target alone (tokens per ms): where they pay they go first, as they
    // cost no draft passes (measured: where n-gram lookup beat the target alone it also beat chains).
    const lookup = this.#lookupPlan(req, committed, budget, line ? 1 / line.one : 0);
    if (lookup) return { g: 0, plain: 0, lookup };
    const best = drafting.length;
    if (best === 0) {
      // Drafting does not pay now: tokens from the target alone (up to 16 per native call), then one
      // probing step at the best length, so that acceptance and costs stay measured (online updates
      // may improve the draft). Probes that accept nothing double the interval, up to 256 tokens.
      // With lookup, runs are shorter while lookups keep failing (1, 2, 4 ... 16 tokens), so that
      // a lookup runs again soon. New draft weights (an online update) may draft better than those
      // whose probes failed, so they reset the interval.
      const version = this.draft?.weightsVersion ?? 0;
      if (version !== this.#probedWeights) {
        this.#probedWeights = version;
        this.#probeEvery = 16;
      }
      const left = this.#probeEvery - this.#plainTokens;
      const most = this.strategy.lookup ? 2 ** Math.min(req.ngramMisses, 4) : 16;
      if (left > 0 || budget === 0) return { g: 0, plain: Math.min(most, Math.max(left, 1), budget + 1) };
      this.#plainTokens = 0;
      this.#probing = true;
      return { g: Math.min(budget, this.#drafts.plan(c, max, 1).length), plain: 0 };
    }
    this.#plainTokens = 0;
    this.#probeEvery = 16;
    this.#sameSteps = best === this.#lastLength ? this.#sameSteps + 1 : 0;
    this.#lastLength = best;
    // After 16 drafting steps of one length, a few plain tokens, so that the cost line keeps both ends.
    if (this.#sameSteps >= 16) {
      this.#sameSteps = 0;
      return { g: 0, plain: Math.min(4, budget + 1) };
    }
    return { g: Math.min(budget, best), plain: 0 };
  }

  /**
   * Adaptive with lookup: the lookup's proposal for this step, cut to the length its measured
   * acceptance and cost say is best, when that promises more tokens per ms than `rival` (the target
   * alone); else undefined. Lookup steps are timed on a line of their own: each is one target pass
   * and a round trip to JavaScript, where the target alone decodes up to 16 tokens per native call,
   * so the costs of the two do not share a line. Acceptance is counted apart for greedy and sampled
   * requests (a lookup is the target's greedy continuation far more often than its sample).
   */
  #lookupPlan(req: Request, committed: number[], budget: number, rival: number): number[] | undefined {
    if (this.strategy.kind !== 'adaptive' || !this.strategy.lookup || budget === 0) return undefined;
    const found = ngramLookup(committed, this.strategy.maxNgram, Math.min(budget, this.strategy.maxLength));
    // A prompt may hold ids the draft's vocabulary lacks, which verification cannot score: the
    // proposal ends before the first.
    const cut = found.findIndex((t) => t >= this.vocabSize);
    if (cut >= 0) found.length = cut;
    const lookups = this.#lookups[req.sampling.temperature === 0 ? 'greedy' : 'sampled'];
    if (found.length > 0) {
      // Until lookup steps are timed, each costs a plain step and a fifth of one per token.
      const line = this.#lookupFit.line(0.2) ?? { one: 1 / Math.max(rival, 1e-9), slope: 0.2 / Math.max(rival, 1e-9) };
      const plan = lookups.plan(line.slope / line.one, found.length, 0);
      if (plan.length > 0 && plan.speedup / line.one > rival) return found.slice(0, plan.length);
      // Declined lookups are still tried now and then, so that their acceptance stays measured
      // where the traffic turns repetitive: every 16th, doubling up to every 256th while the probes
      // fail. Probes alternate one token and the whole proposal, so that the cost of a longer pass
      // and the acceptance past the first token are measured too: with one-token probes alone both
      // stayed at their priors, and lookups that would pay were declined for good.
      if (++this.#lookupDeclined >= this.#lookupProbeEvery) {
        this.#lookupDeclined = 0;
        this.#lookupProbing = true;
        return found.slice(0, this.#lookupProbes++ % 2 === 0 ? 1 : found.length);
      }
    }
    req.ngramMisses++;
    return undefined;
  }

  /**
   * onVerified for token i of `tokens`, which the target emitted after `committed` and tokens 0 .. i - 1
   * without the draft (a plain or lookup token): row i of `rows` is the target's before it.
   */
  #reportUndrafted(req: Request, committed: number[], tokens: Int32Array, rows: Float32Array, i: number): void {
    const V = this.vocabSize;
    this.#onVerified?.({ request: req.id, context: [...committed, ...tokens.subarray(0, i)], drafted: 0, accepted: 0, emitted: tokens.slice(i, i + 1), targetLogits: rows.slice(i * V, (i + 1) * V), vocabSize: V });
  }

  /**
   * A lookup's tokens after the last committed one, verified in one target pass (a one-hot proposal,
   * which the deterministic tree mode verifies exactly); the target's cache is left holding the
   * accepted ones. Shared by 'ngram' and adaptive's lookups.
   */
  async #verifyLookupStep(req: Request, step: number, T: Sequence, committed: number[], proposal: number[]): Promise<{ tokens: Int32Array; rows: Float32Array; accepted: number }> {
    const V = this.vocabSize;
    const tBase = T.length;
    const last = committed[committed.length - 1]!;
    const tl = await this.#timed(req.counters, 'target', () => T.evaluate(Int32Array.from([last, ...proposal])));
    const rows = this.target.info.vocabSize === V ? tl : sliceRows(tl, this.target.info.vocabSize, V);
    let r = verifyLookup(proposal, rows, V, req, step);
    if (this.#fault === 'lookup-first-unchecked') {
      // The tests' planted bug: the first lookup token taken without verification.
      const rest = verifyLookup(proposal.slice(1), rows.subarray(V), V, req, step);
      r = { path: Int32Array.from([0, ...Array.from(rest.path, (i) => i + 1)]), tokens: Int32Array.from([proposal[0]!, ...rest.tokens]) };
    }
    const a = r.path.length;
    req.ngramMisses = a > 0 ? 0 : req.ngramMisses + 1;
    T.truncate(tBase + 1 + a);
    return { tokens: r.tokens, rows, accepted: a };
  }

  /**
   * Adaptive's plain tokens: the target alone samples n tokens in one native call (Sequence.draft),
   * one pass each, as a step without draft tokens would, without a round trip to JavaScript between them.
   */
  async #plainSteps(req: Request, step: number, T: Sequence, committed: number[], n: number): Promise<number[]> {
    const V = this.vocabSize;
    const c = req.counters;
    const last = committed[committed.length - 1]!;
    const d = await this.#timed(c, 'target', () => T.draft([last], { count: n, vocabSize: V, sampling: req.sampling, seed: req.seed, stream: streamOf(req, step, false), stopTokens: req.stopIds }));
    n = d.tokens.length; // fewer when a stop token ended the run
    c.targetPasses += n - 1;
    const tokens = Array.from(d.tokens);
    for (let i = 0; i < n; i++) {
      this.#reportUndrafted(req, committed, d.tokens, d.logits, i);
      c.record(0, 0, 1);
      this.emit('step', { request: req.id, drafted: 0, accepted: 0, emitted: 1 } satisfies StepEvent);
    }
    this.#plainTokens += n;
    req.lastStep = { drafted: 0, catchUpMs: 0, tokens: n };
    return tokens;
  }

  /**
   * Draft g tokens autoregressively, then verify the chain in one target pass. The chain strategy
   * runs several such steps in one native call (Sequence.chainRun: 1, 2, 4, ... up to
   * CHAIN_RUN_STEPS and CHAIN_RUN_MS, each with its own step's Philox streams, ending at a stop
   * token, at new draft weights, or where a whole chain no longer fits), so JavaScript sees them
   * after the fact; adaptive runs its planned length until its next plan is due.
   */
  async #chainStep(req: Request, step: number, T: Sequence, D: Sequence, committed: number[], g: number, onRun?: (accepted: readonly number[]) => void): Promise<number[]> {
    const V = this.vocabSize;
    const c = req.counters;
    const last = committed[committed.length - 1]!;
    let catchUpMs = 0;
    let accepted: number[];
    let tokens: Int32Array;
    let rows: Float32Array | undefined;
    if (g > 0) {
      // The draft cost is timed on the chain: a request's first step prefills the prompt apart, as
      // does the first drafting step after plain ones (its catch-up is not a cost of the chain).
      if (committed.length - D.length > 2) {
        const t0 = performance.now();
        await this.#timed(c, 'draft', () => D.evaluate(committed.slice(D.length, -1), { lastOnly: true, signal: req.signal }));
        catchUpMs = performance.now() - t0;
      }
      // Adaptive runs steps of its planned length too, up to its next plain break (it measures the
      // cost of a plain token every 16 steps of one length), except a probe, which is one step; a
      // tree shaped as a chain runs steps of that length until its shape is planned again.
      const kind = this.strategy.kind;
      const many = kind === 'chain' || kind === 'tree' || (kind === 'adaptive' && !this.#probing);
      const maxSteps = kind === 'adaptive' ? Math.min(req.runSteps, Math.max(1, 16 - this.#sameSteps)) : req.runSteps;
      // With weightSwap 'step', new draft weights end the run after its current step.
      const swapped = many && this.weightSwap === 'step' ? new AbortController() : undefined;
      const unwatch = swapped && this.draft!.watchWeights(() => swapped.abort());
      const t0 = performance.now();
      const r = await T.chainRun(D, committed.slice(D.length), {
        last,
        count: g,
        vocabSize: V,
        sampling: req.sampling,
        seed: req.seed,
        streamBase: req.stream << 32n,
        firstStep: step,
        maxSteps: many ? maxSteps : 1,
        maxMs: many ? CHAIN_RUN_MS : 0,
        remaining: Math.min(req.remaining, 2 ** 52),
        stopTokens: req.stopIds,
        keepLogits: this.#onVerified !== undefined,
        batch: this.batching,
        ...(swapped && { interrupt: swapped.signal }),
      }).finally(() => unwatch?.());
      const ms = performance.now() - t0;
      req.runSteps = Math.min(2 * req.runSteps, CHAIN_RUN_STEPS);
      accepted = Array.from(r.acceptedCounts);
      onRun?.(accepted);
      tokens = r.tokens;
      rows = r.targetLogits;
      // The round trip is charged to the target, as its evaluate() was charged before.
      c.draftPasses += g * accepted.length;
      c.draftMs += r.draftMs;
      c.targetPasses += accepted.length;
      c.targetMs += ms - r.draftMs;
    } else {
      const tBase = T.length;
      const tl = await this.#timed(c, 'target', () => T.evaluate([last]));
      const targetLogits = this.target.info.vocabSize === V ? tl : sliceRows(tl, this.target.info.vocabSize, V);
      const v = verifyChain({ targetLogits, draftLogits: new Float32Array(0), draftTokens: new Int32Array(0), vocabSize: V, sampling: req.sampling, seed: req.seed, stream: streamOf(req, step, false) });
      T.truncate(tBase + 1);
      accepted = [v.acceptedCount];
      tokens = v.tokens;
      rows = targetLogits;
    }
    // Each step's bookkeeping, as if it had run alone: #decode settles the steps it keeps, in order,
    // before it commits their tokens (so `committed` is then the run's context).
    let at = 0;
    for (const a of accepted) {
      const start = at;
      req.steps.push({ start, settle: () => this.#settleChainStep(req, g, a, committed, tokens, rows, start) });
      at += a + 1;
    }
    req.stepsUsed = accepted.length;
    if (this.strategy.kind === 'adaptive') {
      req.lastStep = { drafted: g, catchUpMs, tokens: accepted.length };
      if (this.#probing) this.#probeEvery = accepted[0]! > 0 ? 16 : Math.min(2 * this.#probeEvery, 256);
      this.#probing = false;
      this.#sameSteps += accepted.length - 1; // the plan counted the run's first step
    }
    return Array.from(tokens);
  }

  /**
   * The bookkeeping of a run's step that emitted tokens[at .. at + a] (rows: their target rows):
   * onVerified, counters, adaptive's acceptance counts, the 'step' event.
   */
  #settleChainStep(req: Request, g: number, a: number, committed: number[], tokens: Int32Array, rows: Float32Array | undefined, at: number): void {
    const V = this.vocabSize;
    const c = req.counters;
    if (this.#onVerified) {
      // The context a step after the run's first saw: what was committed, then the run's earlier tokens.
      const context = at === 0 ? committed : [...committed, ...tokens.subarray(0, at)];
      const emitted = tokens.slice(at, at + a + 1);
      this.#onVerified({ request: req.id, context, drafted: g, accepted: a, emitted, targetLogits: rows!.slice(at * V, (at + a + 1) * V), vocabSize: V });
    }
    c.record(g, a, a + 1);
    c.recordChain(g, a);
    if (g > 0) this.#drafts.add(g, a);
    this.emit('step', { request: req.id, drafted: g, accepted: a, emitted: a + 1 } satisfies StepEvent);
  }

  /** Build a dynamic tree from the draft (best cumulative probability first), verify it in one pass. */
  async #treeStep(req: Request, step: number, T: Sequence, D: Sequence, committed: number[], budget: number): Promise<number[]> {
    if (this.strategy.kind !== 'tree') throw new Error('unreachable');
    const { maxDepth, branching } = this.strategy;
    const nodeBudget = Math.min(this.strategy.budget, budget);
    const V = this.vocabSize;
    const c = req.counters;
    const last = committed[committed.length - 1]!;
    const temperature = req.sampling.temperature;
    const parents: number[] = [];
    const tokens: number[] = [];
    const score: number[] = [];
    if (nodeBudget > 0) {
      // Root distribution from the draft.
      const root = await this.#timed(c, 'draft', () => D.evaluate(committed.slice(D.length), { lastOnly: true, signal: req.signal }));
      const dBase = D.length;
      let frontier: { node: number; logits: Float32Array }[] = [{ node: -1, logits: root.subarray(0, V) }];
      for (let depth = 1; depth <= maxDepth && tokens.length < nodeBudget && frontier.length; depth++) {
        // Candidate children of every frontier node, ranked by cumulative draft probability.
        const cands: { parent: number; token: number; score: number }[] = [];
        for (const f of frontier) {
          const base = f.node < 0 ? 0 : score[f.node]!;
          for (const [tok, p] of topCandidates(f.logits, branching, temperature)) cands.push({ parent: f.node, token: tok, score: base + Math.log(p) });
        }
        cands.sort((x, y) => y.score - x.score);
        const take = cands.slice(0, Math.min(branching, nodeBudget - tokens.length));
        const added: number[] = [];
        // Children of one parent stay in decreasing draft probability (the order verifyTree tries them).
        take.sort((x, y) => x.parent - y.parent || y.score - x.score);
        for (const cand of take) {
          parents.push(cand.parent);
          tokens.push(cand.token);
          score.push(cand.score);
          added.push(tokens.length - 1);
        }
        if (depth === maxDepth || tokens.length >= nodeBudget) break;
        // Draft distributions after the new nodes: evaluate the tree so far under its mask.
        D.truncate(dBase);
        const all = await this.#timed(c, 'draft', () => D.evaluate(tokens, { treeParents: Int32Array.from(parents) }));
        D.truncate(dBase);
        const Vd = this.draft!.info.vocabSize;
        frontier = added.map((n) => ({ node: n, logits: all.subarray(n * Vd, n * Vd + V) }));
      }
      D.truncate(dBase);
    }
    const input = Int32Array.from([last, ...tokens]);
    const treeParents = Int32Array.from([-1, ...parents.map((p) => p + 1)]);
    const tBase = T.length;
    const tl = await this.#timed(c, 'target', () => T.evaluate(input, { treeParents }));
    const targetLogits = this.target.info.vocabSize === V ? tl : sliceRows(tl, this.target.info.vocabSize, V);
    // Children are the draft's top candidates, chosen deterministically: q is one-hot for verification.
    const r = verifyTree({
      parents: Int32Array.from(parents),
      tokens: Int32Array.from(tokens),
      targetLogits,
      vocabSize: V,
      sampling: req.sampling,
      seed: req.seed,
      stream: streamOf(req, step, false),
      children: 'deterministic',
    });
    return this.#finishTree(req, T, committed, parents, tokens, targetLogits, tBase, r);
  }

  /**
   * Draft a tree as a spine (the draft's chain, one native call) with siblings from the rows the spine
   * needed: sampled without replacement from the warped draft distribution, or at temperature 0 the
   * draft's next-best tokens. Its shape comes from each child rank's measured acceptance and costs.
   */
  async #shapedTreeStep(req: Request, step: number, T: Sequence, D: Sequence, committed: number[], budget: number): Promise<number[]> {
    if (this.strategy.kind !== 'tree') throw new Error('unreachable');
    const V = this.vocabSize;
    const c = req.counters;
    const last = committed[committed.length - 1]!;
    const greedy = req.sampling.temperature === 0;
    const ranks = greedy ? this.#ranks.greedy : this.#ranks.sampled;
    const { branching, maxDepth, fill } = this.strategy;
    const widths = sampledTreeShape(rankAcceptance(ranks, branching), Math.min(this.strategy.budget, budget), maxDepth, fill ? undefined : this.#treeCosts());
    if (widths.length && widths.every((w) => w === 1) && !this.#fault) return this.#chainShapedTree(req, step, T, D, committed, widths.length, ranks);
    const parents: number[] = [];
    const tokens: number[] = [];
    const spine: number[] = []; // node index of each level's first child
    // Draft rows: rows[0] at the root, rows[i + 1] after spine node i (the nodes with children).
    const rows: (Float32Array | undefined)[] = [];
    if (widths.length) {
      const levels = widths.length;
      // Node j of level d draws at Philox position first[d] + j (first[d]: the widths before d), so
      // every node has its own draw even where a level ends early.
      const first = new Int32Array(levels);
      for (let d = 1; d < levels; d++) first[d] = first[d - 1]! + widths[d - 1]!;
      // The level cost is timed on the spine: a request's first step prefills the prompt apart.
      if (committed.length - D.length > 2) await this.#timed(c, 'draft', () => D.evaluate(committed.slice(D.length, -1), { lastOnly: true, signal: req.signal }));
      const dStart = performance.now();
      // The spine (each level's first child) is a chain: one native call drafts it and returns every level's row.
      const topSpine = this.#fault === 'tree-top-children-as-sampled';
      const chain = await D.draft(committed.slice(D.length), {
        count: levels,
        vocabSize: V,
        sampling: topSpine ? { temperature: 0 } : req.sampling,
        seed: req.seed,
        stream: streamOf(req, step, true),
        positions: first,
      });
      c.draftPasses += levels;
      for (let d = 0; d < levels; d++) {
        const parent = d === 0 ? -1 : spine[d - 1]!;
        const row = chain.logits.subarray(d * V, (d + 1) * V);
        rows[parent + 1] = row;
        spine.push(tokens.length);
        parents.push(parent);
        tokens.push(chain.tokens[d]!);
        // Siblings come from the same row, without replacement (greedy: the next-best tokens).
        const drawn = [chain.tokens[d]!];
        if (greedy) {
          for (const [t] of topLogits(row, widths[d]!)) if (!drawn.includes(t) && drawn.length < widths[d]!) {
            parents.push(parent);
            tokens.push(t);
            drawn.push(t);
          }
          continue;
        }
        for (let j = 1; j < widths[d]!; j++) {
          const top = this.#fault === 'tree-top-children-as-sampled' || this.#fault === 'tree-top-siblings-as-sampled';
          const token = top
              ? (topCandidates(row, j + 1 + drawn.length, req.sampling.temperature).map(([t]) => t).find((t) => !drawn.includes(t)) ?? -1)
              : sampleLogits({ logits: row, vocabSize: V, sampling: req.sampling, seed: req.seed, stream: streamOf(req, step, true), position: first[d]! + j, exclude: Int32Array.from(drawn) });
          if (token < 0) break; // the warped support (top-k / top-p) is used up
          parents.push(parent);
          tokens.push(token);
          drawn.push(token);
        }
      }
      const ms = performance.now() - dStart;
      c.draftMs += ms;
      this.#levelMs = this.#levelMs ? 0.9 * this.#levelMs + 0.1 * (ms / levels) : ms / levels;
    }
    const n = tokens.length;
    // Leaves have no draft row; the kernel validates every row, so give them a finite (unused) one.
    // Greedy verification reads no draft row.
    const draftLogits = new Float32Array(greedy ? 0 : (n + 1) * V);
    if (!greedy) rows.forEach((row, k) => row && draftLogits.set(row, k * V));
    const input = Int32Array.from([last, ...tokens]);
    const tBase = T.length;
    const tStart = performance.now();
    const tl = await this.#timed(c, 'target', () => T.evaluate(input, { treeParents: Int32Array.from([-1, ...parents.map((p) => p + 1)]) }));
    this.#passFit.add(n, performance.now() - tStart);
    const targetLogits = this.target.info.vocabSize === V ? tl : sliceRows(tl, this.target.info.vocabSize, V);
    const verify = { targetLogits, vocabSize: V, sampling: req.sampling, seed: req.seed, stream: streamOf(req, step, false) };
    let r: { path: Int32Array; tokens: Int32Array };
    if (parents.every((p, i) => p === i - 1)) {
      // One child per level is a chain: the chain kernel decides the same way (exactly) and faster.
      const rc = verifyChain({ ...verify, ...(greedy ? {} : { draftLogits: draftLogits.subarray(0, n * V) }), draftTokens: Int32Array.from(tokens) });
      r = { path: Int32Array.from({ length: rc.acceptedCount }, (_, i) => i), tokens: rc.tokens };
    } else if (greedy) {
      r = verifyTree({ ...verify, parents: Int32Array.from(parents), tokens: Int32Array.from(tokens), children: 'deterministic' });
    } else {
      r = verifyTree({ ...verify, parents: Int32Array.from(parents), tokens: Int32Array.from(tokens), draftLogits, children: 'sampled-without-replacement' });
    }
    countRanks(ranks, parents, Array.from(r.path));
    // The draft cache holds the spine but its last node; keep the part the accepted path followed.
    let m = 0;
    while (m < r.path.length && r.path[m] === spine[m]) m++;
    if (D.length > committed.length + m) D.truncate(committed.length + m);
    return this.#finishTree(req, T, committed, parents, tokens, targetLogits, tBase, r);
  }

  /**
   * A tree shaped as one child per level is a chain: native chain steps draft it, run the target
   * pass, verify (the same decisions as the tree walk) and trim both caches, several steps per call
   * as the chain strategy runs them (the shape is planned again after the run). They feed the rank
   * acceptance; not the tree's cost measurements (draft ms per level, target ms by nodes): a native
   * chain step costs less than a tree step of as many nodes, whose costs those price.
   */
  async #chainShapedTree(req: Request, step: number, T: Sequence, D: Sequence, committed: number[], g: number, ranks: RankCounts): Promise<number[]> {
    const parents = Array.from({ length: g }, (_, i) => i - 1);
    return this.#chainStep(req, step, T, D, committed, g, (accepted) => {
      for (const a of accepted) countRanks(ranks, parents, Array.from({ length: a }, (_, i) => i));
    });
  }

  /** Sampled-tree costs in one-token target passes, from the measured times (priors until there are some). */
  #treeCosts(): TreeCosts {
    // Until node counts vary, assume a node costs a tenth of a one-token pass.
    const pass = this.#passFit.line(0.1);
    if (!pass || !this.#levelMs) return { node: 0.1, level: 0.1 };
    return { node: pass.slope / pass.one, level: this.#levelMs / pass.one };
  }

  /** After a tree verification: report, keep the accepted path in the target's cache, count. */
  #finishTree(req: Request, T: Sequence, committed: number[], parents: number[], tokens: number[], targetLogits: Float32Array, tBase: number, r: { path: Int32Array; tokens: Int32Array }): number[] {
    const V = this.vocabSize;
    const c = req.counters;
    const n = tokens.length;
    const path = Array.from(r.path);
    if (this.#onVerified) {
      const rows = new Float32Array((path.length + 1) * V);
      [0, ...path.map((i) => i + 1)].forEach((row, k) => rows.set(targetLogits.subarray(row * V, (row + 1) * V), k * V));
      // The draft was corrected where the accepted path ends at a node that had drafted children.
      const end = path.length ? path[path.length - 1]! : -1;
      const depth = path.length + (parents.includes(end) ? 1 : 0);
      this.#onVerified({ request: req.id, context: committed, drafted: depth, accepted: path.length, emitted: r.tokens, targetLogits: rows, vocabSize: V });
    }
    T.keepPath(tBase, [0, ...path.map((i) => i + 1)]);
    c.record(n, path.length, path.length + 1);
    let depth = 0;
    const depths: number[] = [];
    parents.forEach((p, i) => (depths[i] = p < 0 ? 1 : depths[p]! + 1, depth = Math.max(depth, depths[i]!)));
    c.recordChain(depth, path.length);
    this.emit('step', { request: req.id, drafted: n, accepted: path.length, emitted: path.length + 1 } satisfies StepEvent);
    return Array.from(r.tokens);
  }

  /**
   * Adaptive's lookup step: the proposal verified in one target pass as 'ngram' verifies it (a
   * one-hot q, exact); the draft proposed nothing, so onVerified sees each emitted token as a plain
   * step's (the online distiller's 'mismatch' records take none of them).
   */
  async #lookupStep(req: Request, step: number, T: Sequence, committed: number[], proposal: number[]): Promise<number[]> {
    const c = req.counters;
    const { tokens: emitted, rows, accepted: a } = await this.#verifyLookupStep(req, step, T, committed, proposal);
    this.#lookups[req.sampling.temperature === 0 ? 'greedy' : 'sampled'].add(proposal.length, a);
    if (this.#lookupProbing) this.#lookupProbeEvery = a > 0 ? 16 : Math.min(2 * this.#lookupProbeEvery, 256);
    this.#lookupProbing = false;
    this.#lookupDeclined = 0;
    this.#plainTokens += a + 1; // tokens without the draft: they count towards adaptive's next probe
    for (let i = 0; i <= a; i++) this.#reportUndrafted(req, committed, emitted, rows, i);
    c.record(0, 0, a + 1);
    c.lookupProposed += proposal.length;
    c.lookupAccepted += a;
    req.lastStep = { drafted: proposal.length, catchUpMs: 0, tokens: 1, lookup: true };
    this.emit('step', { request: req.id, drafted: 0, accepted: 0, emitted: a + 1, lookup: { proposed: proposal.length, accepted: a } } satisfies StepEvent);
    return Array.from(emitted);
  }

  /** Prompt lookup: propose the tokens that followed the latest earlier match of the context's tail. */
  async #ngramStep(req: Request, step: number, T: Sequence, committed: number[], budget: number): Promise<number[]> {
    if (this.strategy.kind !== 'ngram') throw new Error('unreachable');
    const g = Math.min(budget, this.strategy.length);
    const proposal = g > 0 ? ngramLookup(committed, this.strategy.maxNgram, g) : [];
    if (proposal.length === 0) {
      // Nothing to verify: the target decodes alone, in one native call of 1, 2, 4 ... 16 tokens as
      // lookups keep failing to find or to land a proposal (a lookup runs again after each call).
      const n = Math.min(2 ** Math.min(req.ngramMisses, 4), budget + 1);
      req.ngramMisses++;
      return this.#plainSteps(req, step, T, committed, n);
    }
    const c = req.counters;
    const { tokens, accepted: a } = await this.#verifyLookupStep(req, step, T, committed, proposal);
    c.record(proposal.length, a, a + 1);
    c.recordChain(proposal.length, a);
    this.emit('step', { request: req.id, drafted: proposal.length, accepted: a, emitted: a + 1 } satisfies StepEvent);
    return Array.from(tokens);
  }

  /** Rejects running requests, waits for them, and frees nothing else (the models belong to the caller). */
  dispose(): Promise<void> {
    // A second call waits for the same work as the first.
    return (this.#disposing ??= (async () => {
      this.#disposed = true;
      const err = disposedError('decoder');
      this.#disposeController.abort(err);
      for (const w of this.#waiting.splice(0)) w();
      await Promise.allSettled([...this.#running]);
    })());
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.dispose();
  }
}

/** A lookup proposal is deterministic: a one-hot q, which the deterministic tree mode verifies exactly. */
function verifyLookup(proposal: number[], targetLogits: Float32Array, vocabSize: number, req: Request, step: number) {
  return verifyTree({
    parents: Int32Array.from(proposal.map((_, i) => i - 1)),
    tokens: Int32Array.from(proposal),
    targetLogits,
    vocabSize,
    sampling: req.sampling,
    seed: req.seed,
    stream: streamOf(req, step, false),
    children: 'deterministic',
  });
}

/** The tokens after the latest earlier occurrence of the longest matching tail (up to maxNgram). */
export function ngramLookup(tokens: number[], maxNgram: number, length: number): number[] {
  if (!Array.isArray(tokens) && !((tokens as unknown) instanceof Int32Array)) throw new TypeError('tokens must be an array of token ids');
  checkInteger(maxNgram, 'maxNgram', 1);
  if (typeof length !== 'number' || !(length >= 0) || (!Number.isInteger(length) && length !== Infinity))
    throw new RangeError(`length must be an integer >= 0, got ${String(length)}`);
  const n = tokens.length;
  for (let size = Math.min(maxNgram, n - 1); size >= 1; size--) {
    for (let start = n - size - 1; start >= 0; start--) {
      let match = true;
      for (let k = 0; k < size; k++) {
        if (tokens[start + k] !== tokens[n - size + k]) {
          match = false;
          break;
        }
      }
      if (match) {
        const from = start + size;
        return tokens.slice(from, Math.min(n, from + length));
      }
    }
  }
  return [];
}

/** Rows of width `from` cut to their first `to` entries (a target padded beyond the shared vocabulary). */
function sliceRows(src: Float32Array, from: number, to: number): Float32Array {
  const rows = src.length / from;
  const out = new Float32Array(rows * to);
  for (let r = 0; r < rows; r++) out.set(src.subarray(r * from, r * from + to), r * to);
  return out;
}

/** Creates a speculative decoder over a target and a draft (or none, for 'ngram'). */
export function createSpeculativeDecoder(options: SpeculativeDecoderOptions): SpeculativeDecoder {
  return new SpeculativeDecoder(options);
}
