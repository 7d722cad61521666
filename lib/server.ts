// An embeddable OpenAI-compatible server: createServer() returns one request handler that mounts in
// plain node:http, Express (as middleware, mounted at any path) and Fastify (through handler.fastify,
// a plugin). It serves /v1/completions, /v1/chat/completions (both with server-sent events),
// /v1/models and /metrics (Prometheus, through prom-client, one registry per server) over a
// speculative decoder, or an online decoder whose draft keeps learning from the traffic.
//
// Generations queue for one of maxConcurrent decoding slots. A client that disconnects aborts its
// generation (or leaves the queue), and its KV caches are freed. Errors are OpenAI-shaped JSON:
// { error: { message, type, param, code } }.
import { checkInteger, checkKeys, disposedError, leastTokens, MAX_TIMER_MS } from './args.js';
import type { ChatMessage } from './chatTemplate.js';
import { randomBytes, randomUUID } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { basename, extname } from 'node:path';
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { SamplingOptions, Seed } from './addonTypes.js';
import { chainBatchStats, type Model } from './Model.js';
import { createOnlineDecoder, OnlineDecoder, type OnlineDistillOptions, type RollbackEvent, type UpdateEvent } from './OnlineDecoder.js';
import { createSpeculativeDecoder, type SpeculativeDecoder, type SpeculativeGenerateOptions, type StepEvent, type Strategy, type StreamChunk } from './SpeculativeDecoder.js';

export interface ServerOptions {
  target: Model;
  draft: Model;
  /**
   * Online distillation settings (the draft keeps learning from the traffic; the draft Model's
   * weights change), or false for a fixed draft. Default: {} (learning, with the distiller's defaults).
   */
  online?: OnlineDistillOptions | false;
  /** Default: the decoders' default ({ kind: 'chain', length: 4 }). */
  strategy?: Strategy;
  /** Generations decoded at the same time; later ones queue. Default 4. */
  maxConcurrent?: number;
  /** The generations' chain steps run together, one pass for all (see SpeculativeDecoderOptions.batching). Default true. */
  batching?: boolean;
  /** Generations admitted (decoding or queued) before new ones get 503. Default 256. */
  maxQueued?: number;
  /** The model id served in /v1/models and expected in requests. Default: the target's file name without extension. */
  modelId?: string;
  /** The draft's name in metric labels. Default: the draft's file name without extension. */
  draftName?: string;
  /** max_tokens of a chat completion that does not set it (capped by the context). Default 256. Completions default to 16, as OpenAI's do. */
  defaultMaxTokens?: number;
  /** Largest request body accepted (413 beyond). Default 1 MiB. */
  maxBodyBytes?: number;
  /** Registry the metrics go to. Default: a new one for this server. */
  registry?: Registry;
  /** Prefix of every metric name. Default 'osd_'. */
  metricsPrefix?: string;
  /** Also export prom-client's process metrics (CPU, resident memory, event loop lag, ...). Default false. */
  defaultMetrics?: boolean;
  /**
   * Refuse request fields that neither OpenAI nor this server defines (OpenAI's 400 "Unrecognized
   * request argument supplied"), so a misspelt field is not silently ignored. false ignores them,
   * for clients written for servers that take extensions (min_p, repetition_penalty, ...). Default true.
   */
  strictFields?: boolean;
}

export type { ChatMessage } from './chatTemplate.js';

/** The minimal surface of a Fastify instance that the plugin uses (no dependency on fastify). */
export interface FastifyInstanceLike {
  prefix: string;
  removeAllContentTypeParsers(): void;
  addContentTypeParser(type: string, parser: (request: unknown, payload: unknown, done: (err: Error | null, body?: unknown) => void) => void): void;
  all(path: string, handler: (request: { raw: IncomingMessage }, reply: { raw: ServerResponse; hijack(): void }) => void): void;
}

export interface OsdRequestHandler {
  /**
   * Serves one request. Under Express, routes it does not own go to `next` (so mount it with
   * app.use(handler) or app.use('/prefix', handler)); without `next` they get a 404 JSON error.
   */
  (req: IncomingMessage, res: ServerResponse, next?: (err?: unknown) => void): void;
  /** Fastify plugin: app.register(handler.fastify, { prefix: '/llm' }). It leaves the body unparsed for the handler. */
  readonly fastify: (instance: FastifyInstanceLike, options?: unknown) => Promise<void>;
  readonly registry: Registry;
  readonly decoder: SpeculativeDecoder | OnlineDecoder;
  readonly modelId: string;
  /** Generations admitted and not yet finished (decoding or queued); their KV caches are freed when it drops. */
  readonly active: number;
  /** Refuses new requests (503), aborts running generations and waits for them. The models stay the caller's. */
  dispose(): Promise<void>;
  /** The same as dispose(). */
  close(): Promise<void>;
  /**
   * A graceful stop: refuses new generations (503; /health says "closing") and lets those running or
   * queued finish, for up to timeoutMs (default 30 s; Infinity waits for all of them); then dispose()
   * aborts what is left.
   */
  drain(timeoutMs?: number): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}

type ErrorType = 'invalid_request_error' | 'not_found_error' | 'server_error' | 'overloaded_error';

class HttpError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly param: string | null = null,
    readonly code: string | null = null,
    readonly type: ErrorType = status >= 500 ? 'server_error' : 'invalid_request_error',
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
  }
}

// The request fields OpenAI defines per endpoint, plus this server's own: `top_k` (the kernels sample
// with it) and `max_completion_tokens` on completions too. Any other field is refused as OpenAI
// refuses it (a misspelt `max_tokens` would otherwise be ignored without a word), unless the server
// was made with strictFields: false.
const COMMON_FIELDS = ['model', 'max_tokens', 'max_completion_tokens', 'temperature', 'top_p', 'top_k', 'n', 'stream', 'stream_options', 'stop', 'presence_penalty', 'frequency_penalty', 'logit_bias', 'logprobs', 'user', 'seed'];
const FIELDS = {
  completion: new Set([...COMMON_FIELDS, 'prompt', 'suffix', 'echo', 'best_of']),
  chat: new Set([
    ...COMMON_FIELDS,
    ...['messages', 'top_logprobs', 'tools', 'tool_choice', 'functions', 'function_call', 'response_format', 'parallel_tool_calls'],
    ...['store', 'metadata', 'service_tier', 'prompt_cache_key', 'safety_identifier', 'verbosity'],
    ...['reasoning_effort', 'modalities', 'audio', 'prediction', 'web_search_options'],
  ]),
};

/** The chat roles OpenAI accepts. Others are refused: a role is rendered into the prompt. */
const ROLES = new Set(['system', 'developer', 'user', 'assistant', 'tool', 'function']);

const ROUTES: Record<string, string> = {
  '/v1/completions': 'POST',
  '/v1/chat/completions': 'POST',
  '/v1/models': 'GET',
  '/metrics': 'GET',
  '/health': 'GET',
};

function stem(path: string): string {
  const b = basename(path);
  return b.slice(0, b.length - extname(b).length) || b;
}

/**
 * Renders chat messages to a prompt: with the target's chat template when its file has one (the
 * prompt tokens then come from applyChatTemplate, which keeps the template's BOS single), else as
 * plain "role: content" lines followed by "assistant:", which also stops generation at a new
 * "\nuser:" or "\nsystem:" line. A template that rejects the conversation (raise_exception) throws.
 */
export function renderChat(model: Model, messages: ChatMessage[]): { prompt: string; template: boolean; stop: string[] } {
  if (model.chatTemplate !== undefined) {
    return { prompt: model.applyChatTemplate(messages, { addGenerationPrompt: true }), template: true, stop: [] };
  }
  const prompt = messages.map((m) => `${m.role}: ${m.content}\n`).join('') + 'assistant:';
  return { prompt, template: false, stop: ['\nuser:', '\nsystem:'] };
}

/**
 * Cuts streamed text at the first stop string. It holds back only a tail that could still begin a
 * stop string, so text reaches the client as early as possible and never contains a stop string.
 */
export class StopFilter {
  #buf = '';
  #stops: string[];
  stopped = false;

  constructor(stops: string[]) {
    this.#stops = stops.filter((s) => s.length > 0);
  }

  push(text: string): string {
    if (this.stopped) return '';
    if (this.#stops.length === 0) return text;
    this.#buf += text;
    let at = -1;
    for (const s of this.#stops) {
      const i = this.#buf.indexOf(s);
      if (i >= 0 && (at < 0 || i < at)) at = i;
    }
    if (at >= 0) {
      this.stopped = true;
      const out = this.#buf.slice(0, at);
      this.#buf = '';
      return out;
    }
    let hold = 0;
    const longest = Math.max(...this.#stops.map((s) => s.length));
    for (let k = Math.min(longest - 1, this.#buf.length); k > 0; k--) {
      const tail = this.#buf.slice(this.#buf.length - k);
      if (this.#stops.some((s) => s.startsWith(tail))) {
        hold = k;
        break;
      }
    }
    const out = this.#buf.slice(0, this.#buf.length - hold);
    this.#buf = this.#buf.slice(this.#buf.length - hold);
    return out;
  }

  flush(): string {
    if (this.stopped) return '';
    const out = this.#buf;
    this.#buf = '';
    return out;
  }
}

/**
 * The admission queue: at most `size` generations decode at once, the rest wait in arrival order. A
 * waiter whose signal aborts (its client left) leaves the queue at once, and a freed slot always
 * passes to the next live waiter.
 */
class Slots {
  #free: number;
  #waiting: { resolve: () => void; reject: (e: unknown) => void; signal: AbortSignal; onAbort: () => void }[] = [];

  constructor(size: number) {
    this.#free = size;
  }

  get queued(): number {
    return this.#waiting.length;
  }

  acquire(signal: AbortSignal): Promise<void> {
    if (signal.aborted) return Promise.reject(abortReason(signal));
    if (this.#free > 0 && this.#waiting.length === 0) {
      this.#free--;
      return Promise.resolve();
    }
    return new Promise<void>((resolve, reject) => {
      const w = {
        resolve,
        reject,
        signal,
        onAbort: () => {
          const i = this.#waiting.indexOf(w);
          if (i >= 0) this.#waiting.splice(i, 1);
          reject(abortReason(signal));
        },
      };
      signal.addEventListener('abort', w.onAbort, { once: true });
      this.#waiting.push(w);
    });
  }

  release(): void {
    const w = this.#waiting.shift();
    if (!w) {
      this.#free++;
      return;
    }
    w.signal.removeEventListener('abort', w.onAbort);
    w.resolve();
  }

  /** Rejects every waiter (shutdown). */
  rejectAll(reason: unknown): void {
    for (const w of this.#waiting.splice(0)) {
      w.signal.removeEventListener('abort', w.onAbort);
      w.reject(reason);
    }
  }
}

function abortReason(signal: AbortSignal): Error {
  const r: unknown = signal.reason;
  if (r instanceof Error) return r;
  const e = new Error('The operation was aborted');
  e.name = 'AbortError';
  return e;
}

interface Job {
  tokens: Int32Array;
  maxTokens: number;
  sampling: SamplingOptions;
  seed: Seed;
  stop: string[];
  signal: AbortSignal;
}

type Finish = 'stop' | 'length';

// ---------------------------------------------------------------- request parsing helpers

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function optNumber(body: Record<string, unknown>, name: string, min: number, max: number): number | undefined {
  const v = body[name];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'number' || !Number.isFinite(v) || v < min || v > max)
    throw new HttpError(400, `${name} must be a number in [${min}, ${max}], got ${JSON.stringify(v)}`, name, 'invalid_value');
  return v;
}

function parseStop(v: unknown): string[] {
  if (v === undefined || v === null) return [];
  const list = typeof v === 'string' ? [v] : v;
  if (!Array.isArray(list) || list.length > 4 || list.some((s) => typeof s !== 'string'))
    throw new HttpError(400, 'stop must be a string or an array of at most 4 strings', 'stop', 'invalid_value');
  return (list as string[]).filter((s) => s.length > 0);
}

function parseContent(v: unknown, i: number): string {
  if (typeof v === 'string') return v;
  if (v === null || v === undefined) return '';
  if (Array.isArray(v)) {
    return v
      .map((part: unknown, j) => {
        if (isObject(part) && part.type === 'text' && typeof part.text === 'string') return part.text;
        throw new HttpError(400, `messages[${i}].content[${j}]: only text parts are supported`, `messages[${i}].content`, 'invalid_value');
      })
      .join('');
  }
  throw new HttpError(400, `messages[${i}].content must be a string or an array of text parts`, `messages[${i}].content`, 'invalid_value');
}

async function readBody(req: IncomingMessage, limit: number): Promise<unknown> {
  // A body already parsed by the host framework (express.json(), a Fastify parser) is used as is.
  const pre = (req as IncomingMessage & { body?: unknown }).body;
  const parsed = pre !== undefined && pre !== null && (req.readableEnded || !(isObject(pre) && Object.keys(pre).length === 0));
  let text: string;
  if (parsed) {
    if (Buffer.isBuffer(pre)) text = pre.toString('utf8');
    else if (typeof pre === 'string') text = pre;
    else return pre;
  } else {
    const chunks: Buffer[] = [];
    let size = 0;
    try {
      for await (const chunk of req as AsyncIterable<Buffer>) {
        size += chunk.length;
        if (size > limit) throw new HttpError(413, `the request body exceeds ${limit} bytes`, null, 'request_too_large', 'invalid_request_error', { Connection: 'close' });
        chunks.push(chunk);
      }
    } catch (e) {
      if (e instanceof HttpError) throw e;
      // The client went away mid-upload: its fault, not the server's (499, as nginx counts it).
      throw new HttpError(499, 'the client closed the connection before sending the whole body', null, 'client_closed_request');
    }
    text = Buffer.concat(chunks).toString('utf8');
  }
  if (text.trim() === '') throw new HttpError(400, 'the request body is empty: send a JSON object', null, 'invalid_json');
  try {
    return JSON.parse(text) as unknown;
  } catch (e) {
    throw new HttpError(400, `the request body is not valid JSON (${(e as Error).message})`, null, 'invalid_json');
  }
}

function sendJson(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  if (res.headersSent || res.destroyed) return;
  const data = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(data), ...headers });
  res.end(data);
}

function errorBody(e: HttpError): object {
  return { error: { message: e.message, type: e.type, param: e.param, code: e.code } };
}

/**
 * Work cut short by the decoder's disposal: the server is shutting down. (A model the embedder
 * disposed under a running server is an internal error, not a shutdown.)
 */
function isShutdown(e: unknown): boolean {
  const d = e as { code?: unknown; disposed?: unknown } | null;
  return d?.code === 'OSD_DISPOSED' && d.disposed === 'decoder';
}

function isAbort(e: unknown): boolean {
  return e instanceof Error && (e.name === 'AbortError' || isShutdown(e));
}

/** Maps a failure to an HttpError (the decoder's argument errors are the client's fault). */
function toHttpError(e: unknown): HttpError {
  if (e instanceof HttpError) return e;
  if (isShutdown(e)) return new HttpError(503, 'the server is shutting down', null, 'shutting_down', 'overloaded_error');
  if (e instanceof RangeError || e instanceof TypeError) {
    const ctx = /does not fit the context/.test(e.message);
    return new HttpError(400, e.message, null, ctx ? 'context_length_exceeded' : 'invalid_value');
  }
  return new HttpError(500, e instanceof Error ? e.message : String(e), null, 'internal_error');
}

// ---------------------------------------------------------------- the server

/** Creates the request handler of an OpenAI-compatible server over a target and a draft. */
const serverKeys = ['target', 'draft', 'online', 'strategy', 'maxConcurrent', 'batching', 'maxQueued', 'modelId', 'draftName', 'defaultMaxTokens', 'maxBodyBytes', 'registry', 'metricsPrefix', 'defaultMetrics', 'strictFields'];

export function createServer(options: ServerOptions): OsdRequestHandler {
  if (!isObject(options)) throw new TypeError('options must be an object');
  checkKeys(options, serverKeys);
  const { target, draft } = options;
  if (!target || typeof target.createSequence !== 'function') throw new TypeError('target must be a loaded Model');
  if (!draft || typeof draft.createSequence !== 'function') throw new TypeError('draft must be a loaded Model');
  const online = options.online === undefined ? {} : options.online;
  if (online !== false && !isObject(online)) throw new TypeError('online must be an object (distillation settings) or false');
  for (const k of ['modelId', 'draftName'] as const)
    if (options[k] !== undefined && (typeof options[k] !== 'string' || options[k].length === 0)) throw new TypeError(`${k} must be a non-empty string`);
  if (options.metricsPrefix !== undefined && !(typeof options.metricsPrefix === 'string' && /^([a-zA-Z_:][a-zA-Z0-9_:]*)?$/.test(options.metricsPrefix)))
    throw new RangeError(`metricsPrefix must be a Prometheus metric name prefix ([a-zA-Z_:][a-zA-Z0-9_:]*, or empty), got ${String(options.metricsPrefix)}`);
  if (options.registry !== undefined && typeof (options.registry as { registerMetric?: unknown })?.registerMetric !== 'function')
    throw new TypeError('registry must be a prom-client Registry');
  const maxConcurrent = options.maxConcurrent ?? 4;
  const maxQueued = options.maxQueued ?? 256;
  const defaultMaxTokens = options.defaultMaxTokens ?? 256;
  const maxBodyBytes = options.maxBodyBytes ?? 1 << 20;
  if (options.strictFields !== undefined && typeof options.strictFields !== 'boolean') throw new TypeError('strictFields must be a boolean');
  const strictFields = options.strictFields ?? true;
  for (const [k, v] of [['maxQueued', maxQueued], ['defaultMaxTokens', defaultMaxTokens], ['maxBodyBytes', maxBodyBytes]] as const) checkInteger(v, k, 1);
  const modelId = options.modelId ?? stem(target.info.path);
  const draftName = options.draftName ?? stem(draft.info.path);
  const tk = target.tokenizer;
  const context = Math.min(target.info.contextLength, draft.info.contextLength);
  const created = Math.floor(Date.now() / 1000);

  checkInteger(maxConcurrent, 'maxConcurrent', 1, 1024);
  // The server queues generations itself (Slots: a client that leaves while queued is dropped at
  // once); the decoder's own limit is set past anything the server admits.
  const slots = new Slots(maxConcurrent);
  const decoderLimit = 1024;
  const decoder: SpeculativeDecoder | OnlineDecoder =
    online === false
      ? createSpeculativeDecoder({ target, draft, strategy: options.strategy, maxConcurrent: decoderLimit, batching: options.batching })
      : createOnlineDecoder({ target, draft, strategy: options.strategy, maxConcurrent: decoderLimit, batching: options.batching, distill: online });

  // ------------------------------------------------------------ metrics
  const registry = options.registry ?? new Registry();
  const p = options.metricsPrefix ?? 'osd_';
  if (options.defaultMetrics) collectDefaultMetrics({ register: registry, prefix: p });
  const requests = new Counter({ name: `${p}requests_total`, help: 'HTTP requests served, by endpoint and status code', labelNames: ['endpoint', 'status'], registers: [registry] });
  const disconnects = new Counter({ name: `${p}client_disconnects_total`, help: 'Generations aborted because the client went away', registers: [registry] });
  const activeGauge = new Gauge({ name: `${p}requests_active`, help: 'Generations in flight (decoding or queued); their KV caches are freed when this drops', registers: [registry] });
  new Gauge({
    name: `${p}requests_queued`,
    help: 'Generations waiting for a decoding slot',
    registers: [registry],
    collect() {
      this.set(slots.queued);
    },
  });
  const tokens = new Counter({ name: `${p}tokens_total`, help: 'Tokens processed, by kind (prompt or completion)', labelNames: ['kind'], registers: [registry] });
  const ttft = new Histogram({
    name: `${p}time_to_first_token_seconds`,
    help: 'Time from the request to its first generated text',
    buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
    registers: [registry],
  });
  const duration = new Histogram({
    name: `${p}request_duration_seconds`,
    help: 'Time to serve a generation request, by endpoint',
    labelNames: ['endpoint'],
    buckets: [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120],
    registers: [registry],
  });
  const drafted = new Counter({ name: `${p}draft_tokens_drafted_total`, help: 'Draft tokens proposed, per draft', labelNames: ['draft'], registers: [registry] });
  const accepted = new Counter({ name: `${p}draft_tokens_accepted_total`, help: 'Draft tokens the target accepted, per draft', labelNames: ['draft'], registers: [registry] });
  const steps = new Counter({ name: `${p}speculation_steps_total`, help: 'Verification steps (target passes that verify a draft), per draft', labelNames: ['draft'], registers: [registry] });
  // Adaptive's n-gram lookups (strategy lookup: true) propose tokens without a draft.
  const lookupProposed = new Counter({ name: `${p}lookup_tokens_proposed_total`, help: "Tokens adaptive's n-gram lookups proposed", registers: [registry] });
  const lookupAccepted = new Counter({ name: `${p}lookup_tokens_accepted_total`, help: "Tokens adaptive's n-gram lookups proposed that the target accepted", registers: [registry] });
  const acceptedLength = new Histogram({
    name: `${p}accepted_length`,
    help: 'Draft tokens accepted per verification step, per draft',
    labelNames: ['draft'],
    buckets: [0, 1, 2, 3, 4, 5, 6, 8, 12, 16],
    registers: [registry],
  });
  const counts = { drafted: 0, accepted: 0, steps: 0 };
  new Gauge({
    name: `${p}draft_acceptance_rate`,
    help: 'Accepted / drafted tokens since the server started, per draft',
    labelNames: ['draft'],
    registers: [registry],
    collect() {
      this.set({ draft: draftName }, counts.drafted ? counts.accepted / counts.drafted : 0);
    },
  });
  new Gauge({
    name: `${p}mean_accepted_length`,
    help: 'Mean draft tokens accepted per verification step since the server started, per draft',
    labelNames: ['draft'],
    registers: [registry],
    collect() {
      this.set({ draft: draftName }, counts.steps ? counts.accepted / counts.steps : 0);
    },
  });
  // Batched chain steps, read at scrape time: process-wide counts (the engine is shared by every
  // decoder in the process), from this server's start.
  let batchedSeen = chainBatchStats();
  const batchedFrom = batchedSeen;
  const catchUpBatched = () => {
    const now = chainBatchStats();
    batchedSteps.inc(now.steps - batchedSeen.steps);
    batchedRuns.inc(now.runs - batchedSeen.runs);
    batchedSeen = now;
  };
  const batchedSteps = new Counter({
    name: `${p}batched_steps_total`,
    help: 'Chain steps run in one pass for the generations in flight (with batching on; every decoder in the process)',
    registers: [registry],
    collect: catchUpBatched,
  });
  const batchedRuns = new Counter({
    name: `${p}batched_step_generations_total`,
    help: 'Generations those steps held, summed: over batched_steps_total, the mean batch',
    registers: [registry],
    collect: catchUpBatched,
  });
  new Gauge({
    name: `${p}mean_batch`,
    help: 'Generations per batched chain step since the server started',
    registers: [registry],
    collect() {
      const now = chainBatchStats();
      const steps = now.steps - batchedFrom.steps;
      this.set(steps ? (now.runs - batchedFrom.runs) / steps : 0);
    },
  });
  const updates = new Counter({ name: `${p}draft_updates_total`, help: 'Online distillation updates applied to the draft', labelNames: ['draft'], registers: [registry] });
  const rollbacks = new Counter({ name: `${p}draft_rollbacks_total`, help: 'Online distillation updates rolled back', labelNames: ['draft'], registers: [registry] });
  const updateErrors = new Counter({
    name: `${p}draft_update_errors_total`,
    help: 'Online distillation updates (or autosaves, or the resume) that failed; serving went on with the weights in place',
    labelNames: ['draft'],
    registers: [registry],
  });
  const updateSeconds = new Histogram({
    name: `${p}draft_update_duration_seconds`,
    help: 'Time of one online distillation update (off the decoding path)',
    labelNames: ['draft'],
    buckets: [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60],
    registers: [registry],
  });
  // Pass counts and times come from the decoder's totals (finished generations), read at scrape time.
  const passSeen = { target: { n: 0, ms: 0 }, draft: { n: 0, ms: 0 } };
  const syncPasses = () => {
    const m = decoder.metrics();
    for (const [model, n, ms] of [['target', m.targetPasses, m.targetMs], ['draft', m.draftPasses, m.draftMs]] as const) {
      const seen = passSeen[model];
      if (n > seen.n) passes.inc({ model }, n - seen.n);
      if (ms > seen.ms) passSecondsTotal.inc({ model }, (ms - seen.ms) / 1000);
      passSeen[model] = { n: Math.max(n, seen.n), ms: Math.max(ms, seen.ms) };
      passMean.set({ model }, n ? ms / n / 1000 : 0);
    }
  };
  const passes = new Counter({
    name: `${p}passes_total`,
    help: 'Forward passes of finished generations, by model (target or draft)',
    labelNames: ['model'],
    registers: [registry],
    collect: syncPasses,
  });
  const passSecondsTotal = new Counter({
    name: `${p}pass_seconds_total`,
    help: 'Time in forward passes of finished generations, by model',
    labelNames: ['model'],
    registers: [registry],
    collect: syncPasses,
  });
  const passMean = new Gauge({
    name: `${p}pass_duration_seconds`,
    help: 'Mean time of one forward pass (a target verification or a draft step) since the server started, by model',
    labelNames: ['model'],
    registers: [registry],
    collect: syncPasses,
  });
  for (const model of ['target', 'draft']) {
    passes.inc({ model }, 0);
    passSecondsTotal.inc({ model }, 0);
  }
  if (online !== false)
    new Gauge({
      name: `${p}draft_recent_acceptance_rate`,
      help: 'Acceptance over the last guardWindow requests, per draft',
      labelNames: ['draft'],
      registers: [registry],
      collect() {
        this.set({ draft: draftName }, (decoder as OnlineDecoder).metrics().recentAcceptance);
      },
    });
  // Make sure the per-draft series exist from the start (0 until traffic arrives).
  for (const c of [drafted, accepted, steps, updates, rollbacks, updateErrors]) c.inc({ draft: draftName }, 0);
  for (const kind of ['prompt', 'completion']) tokens.inc({ kind }, 0);
  for (const c of [lookupProposed, lookupAccepted]) c.inc(0);

  const onStep = (e: StepEvent) => {
    counts.drafted += e.drafted;
    counts.accepted += e.accepted;
    counts.steps += 1;
    drafted.inc({ draft: draftName }, e.drafted);
    accepted.inc({ draft: draftName }, e.accepted);
    steps.inc({ draft: draftName });
    acceptedLength.observe({ draft: draftName }, e.accepted);
    if (e.lookup) {
      lookupProposed.inc(e.lookup.proposed);
      lookupAccepted.inc(e.lookup.accepted);
    }
  };
  const onUpdate = (e: UpdateEvent) => {
    updates.inc({ draft: draftName });
    updateSeconds.observe({ draft: draftName }, e.durationMs / 1000);
  };
  const onRollback = (_e: RollbackEvent) => rollbacks.inc({ draft: draftName });
  const onUpdateError = () => updateErrors.inc({ draft: draftName });
  decoder.on('step', onStep);
  if (decoder instanceof OnlineDecoder) {
    decoder.on('update', onUpdate);
    decoder.on('rollback', onRollback);
    decoder.on('update-error', onUpdateError);
  }

  // ------------------------------------------------------------ generation
  let active = 0;
  let closing = false;
  const inflight = new Set<Promise<void>>();

  function promptTokens(prompt: string, special: boolean): Int32Array {
    if (!tk) throw new HttpError(400, 'this model has no tokenizer: send the prompt as an array of token ids', 'prompt', 'invalid_value');
    checkLength(leastTokens(tk, prompt, context), 'prompt', 'at least ');
    return tk.encode(prompt, { addBos: tk.addBos, special });
  }

  /** A prompt of n tokens must leave one to generate; `least` marks a lower bound found before encoding. */
  function checkLength(n: number, param: string, least = ''): void {
    if (n >= context)
      throw new HttpError(
        400,
        `This model's maximum context length is ${context} tokens, and the prompt has ${least}${n} tokens (at least one token must be left to generate).`,
        param,
        'context_length_exceeded',
      );
  }

  function checkPrompt(t: Int32Array, param: string): void {
    if (t.length === 0) throw new HttpError(400, 'the prompt encodes to no tokens', param, 'invalid_value');
    checkLength(t.length, param);
  }

  /** Fields unknown to the endpoint (null counts as absent) are refused, unless strictFields is false. */
  function checkFields(kind: 'completion' | 'chat', body: Record<string, unknown>): void {
    if (!strictFields) return;
    for (const k of Object.keys(body))
      if (!FIELDS[kind].has(k) && body[k] !== null && body[k] !== undefined)
        throw new HttpError(400, `Unrecognized request argument supplied: ${k}`, k, 'unknown_parameter');
  }

  /** Common sampling parameters. */
  function parseCommon(body: Record<string, unknown>, defaultMax: number, promptLength: number): Omit<Job, 'tokens' | 'signal' | 'stop'> {
    if (body.n !== undefined && body.n !== null && body.n !== 1) throw new HttpError(400, 'only n = 1 is supported', 'n', 'unsupported_parameter');
    if (body.best_of !== undefined && body.best_of !== null && body.best_of !== 1) throw new HttpError(400, 'only best_of = 1 is supported', 'best_of', 'unsupported_parameter');
    if (body.echo === true) throw new HttpError(400, 'echo is not supported', 'echo', 'unsupported_parameter');
    if (body.logprobs !== undefined && body.logprobs !== null && body.logprobs !== false) throw new HttpError(400, 'logprobs are not supported', 'logprobs', 'unsupported_parameter');
    // Features a client relies on for the answer's shape or content: refused rather than ignored
    // (plain text in place of a tool call or of JSON mode breaks the client quietly).
    const given = (k: string) => body[k] !== undefined && body[k] !== null;
    for (const k of ['tools', 'tool_choice', 'functions', 'function_call'])
      if (given(k) && !(Array.isArray(body[k]) && (body[k] as unknown[]).length === 0) && body[k] !== 'none')
        throw new HttpError(400, `${k} is not supported (this server returns plain text)`, k, 'unsupported_parameter');
    if (given('response_format') && !(isObject(body.response_format) && body.response_format.type === 'text'))
      throw new HttpError(400, "response_format is not supported beyond { type: 'text' }", 'response_format', 'unsupported_parameter');
    if (given('logit_bias') && !(isObject(body.logit_bias) && Object.keys(body.logit_bias).length === 0))
      throw new HttpError(400, 'logit_bias is not supported', 'logit_bias', 'unsupported_parameter');
    for (const k of ['frequency_penalty', 'presence_penalty'])
      if (given(k) && body[k] !== 0) throw new HttpError(400, `${k} is not supported (only 0)`, k, 'unsupported_parameter');
    if (given('suffix') && body.suffix !== '') throw new HttpError(400, 'suffix is not supported', 'suffix', 'unsupported_parameter');
    if (given('top_logprobs') && body.top_logprobs !== 0) throw new HttpError(400, 'top_logprobs is not supported', 'top_logprobs', 'unsupported_parameter');
    for (const k of ['audio', 'prediction', 'web_search_options', 'reasoning_effort'])
      if (given(k)) throw new HttpError(400, `${k} is not supported with this model`, k, 'unsupported_parameter');
    if (given('modalities') && !(Array.isArray(body.modalities) && body.modalities.every((m) => m === 'text')))
      throw new HttpError(400, "modalities is not supported beyond ['text']", 'modalities', 'unsupported_parameter');
    const name = body.max_completion_tokens !== undefined && body.max_completion_tokens !== null ? 'max_completion_tokens' : 'max_tokens';
    const mt = body[name];
    let maxTokens: number;
    if (mt === undefined || mt === null) maxTokens = Math.max(1, Math.min(defaultMax, context - promptLength));
    else if (typeof mt !== 'number' || !Number.isInteger(mt) || mt < 1 || mt > context)
      throw new HttpError(400, `${name} must be an integer in [1, ${context}] (the context length), got ${JSON.stringify(mt)}`, name, 'invalid_value');
    else if (promptLength + mt > context)
      // As OpenAI does: the request cannot be served as asked, so it is refused rather than cut short.
      throw new HttpError(
        400,
        `This model's maximum context length is ${context} tokens. However, you requested ${promptLength + mt} tokens (${promptLength} in the prompt, ${mt} in the completion). Reduce the prompt or ${name}.`,
        name,
        'context_length_exceeded',
      );
    else maxTokens = mt;
    const temperature = optNumber(body, 'temperature', 0, 2) ?? 1;
    const topP = optNumber(body, 'top_p', 0, 1) ?? 1;
    const topK = optNumber(body, 'top_k', 0, Number.MAX_SAFE_INTEGER) ?? 0;
    if (!Number.isInteger(topK)) throw new HttpError(400, `top_k must be an integer >= 0, got ${JSON.stringify(body.top_k)}`, 'top_k', 'invalid_value');
    // The kernels take float32 settings. A temperature below float32's least normal number (where
    // 1 / T overflows) or a top_p that rounds to 0 is sampling's limit: greedy, as top_p 0 is.
    const greedy = Math.fround(temperature) < 2 ** -126 || Math.fround(topP) === 0;
    const sampling: SamplingOptions = greedy ? { temperature: 0 } : { temperature, topP, ...(topK > 0 ? { topK: Math.min(topK, 2 ** 31 - 1) } : {}) };
    let seed: Seed;
    const s = body.seed;
    // Without a seed, a random 64-bit one: a seed samples with stream 0, so two requests share their
    // draws only when their seeds collide. OpenAI's seeds are 64-bit; JSON numbers past 2^53 arrive
    // rounded, and are taken as they arrive.
    if (s === undefined || s === null) seed = randomBytes(8).readBigUInt64LE();
    else if (typeof s !== 'number' || !Number.isInteger(s) || s < -(2 ** 63) || s >= 2 ** 64)
      throw new HttpError(400, `seed must be an integer in [-2^63, 2^64), got ${JSON.stringify(s)}`, 'seed', 'invalid_value');
    else seed = Number.isSafeInteger(s) && s >= 0 ? s : BigInt.asUintN(64, BigInt(s));
    return { maxTokens, sampling, seed };
  }

  function checkModel(body: Record<string, unknown>): void {
    const m = body.model;
    if (m === undefined || m === null) return;
    if (typeof m !== 'string') throw new HttpError(400, 'model must be a string', 'model', 'invalid_value');
    if (m !== modelId) throw new HttpError(404, `The model '${m}' does not exist (this server serves '${modelId}')`, 'model', 'model_not_found', 'invalid_request_error');
  }

  /** Runs one generation and yields text (cut at stop strings); the caller holds a decoding slot. */
  async function* generate(job: Job, out: { completionTokens: number; finish: Finish }): AsyncGenerator<string, void, void> {
    yield* decode(job, out, new StopFilter(job.stop));
  }

  async function* decode(job: Job, out: { completionTokens: number; finish: Finish }, filter: StopFilter): AsyncGenerator<string, void, void> {
    // A seed samples with Philox stream 0, so a seeded request is reproducible with a fixed draft.
    const it = decoder.stream({
      tokens: job.tokens,
      maxTokens: job.maxTokens,
      sampling: job.sampling,
      seed: job.seed,
      stop: job.stop,
      signal: job.signal,
    } as SpeculativeGenerateOptions);
    let done = false;
    try {
      for (;;) {
        const r = await it.next();
        if (r.done) {
          done = true;
          out.finish = r.value === 'maxTokens' || r.value === 'context' ? 'length' : 'stop';
          break;
        }
        const chunk: StreamChunk = r.value;
        out.completionTokens += chunk.tokens.length;
        tokens.inc({ kind: 'completion' }, chunk.tokens.length);
        // After a stop string the decoder ends on its own within this step; keep draining it (the
        // online distiller learns only from requests that complete).
        const text = filter.push(chunk.text);
        if (text) yield text;
      }
      const tail = filter.flush();
      if (tail) yield tail;
      if (filter.stopped) out.finish = 'stop';
    } finally {
      if (!done) await it.return(undefined as never);
    }
  }

  function admit(): void {
    if (closing) throw new HttpError(503, 'the server is shutting down', null, 'shutting_down', 'overloaded_error');
    if (active >= maxQueued) throw new HttpError(503, `the server is at capacity (${maxQueued} generations in flight); retry later`, null, 'server_overloaded', 'overloaded_error', { 'Retry-After': '1' });
  }

  function writeEvent(res: ServerResponse, data: unknown): Promise<void> | void {
    if (res.destroyed || res.writableEnded) return;
    if (!res.write(`data: ${typeof data === 'string' ? data : JSON.stringify(data)}\n\n`))
      return new Promise<void>((resolve) => {
        const done = () => {
          res.off('drain', done);
          res.off('close', done);
          resolve();
        };
        res.on('drain', done);
        res.on('close', done);
      });
  }

  async function serveGeneration(
    req: IncomingMessage,
    res: ServerResponse,
    endpoint: string,
    kind: 'completion' | 'chat',
    job: Omit<Job, 'signal'>,
    stream: boolean,
    withUsage: boolean,
  ): Promise<void> {
    admit();
    const started = performance.now();
    const controller = new AbortController();
    let clientGone = false;
    const onClose = () => {
      if (!res.writableFinished) {
        clientGone = true;
        controller.abort();
      }
    };
    res.on('close', onClose);
    if (res.destroyed || res.socket?.destroyed) onClose(); // gone while the body was read
    active++;
    activeGauge.inc();
    const id = `${kind === 'chat' ? 'chatcmpl' : 'cmpl'}-${randomUUID().replaceAll('-', '')}`;
    const createdAt = Math.floor(Date.now() / 1000);
    const out = { completionTokens: 0, finish: 'length' as Finish };
    const usage = () => ({ prompt_tokens: job.tokens.length, completion_tokens: out.completionTokens, total_tokens: job.tokens.length + out.completionTokens });
    let first = true;
    let slot = false;
    const gen = generate({ ...job, signal: controller.signal }, out);
    try {
      // The decoding slot first: a request refused while queued (shutdown) still gets its status,
      // where a stream's headers would already have said 200.
      await slots.acquire(controller.signal);
      slot = true;
      tokens.inc({ kind: 'prompt' }, job.tokens.length);
      if (stream) {
        res.writeHead(200, { 'Content-Type': 'text/event-stream; charset=utf-8', 'Cache-Control': 'no-cache', Connection: 'keep-alive', 'X-Accel-Buffering': 'no' });
        res.flushHeaders();
        // With include_usage every chunk carries usage: null until the last one, as OpenAI's do.
        const nullUsage = withUsage ? { usage: null } : {};
        const chunk = (choice: object) =>
          kind === 'chat'
            ? { id, object: 'chat.completion.chunk', created: createdAt, model: modelId, choices: [{ index: 0, logprobs: null, finish_reason: null, ...choice }], ...nullUsage }
            : { id, object: 'text_completion', created: createdAt, model: modelId, choices: [{ index: 0, logprobs: null, finish_reason: null, ...choice }], ...nullUsage };
        if (kind === 'chat') await writeEvent(res, chunk({ delta: { role: 'assistant', content: '' } }));
        try {
          for await (const text of gen) {
            if (first) {
              ttft.observe((performance.now() - started) / 1000);
              first = false;
            }
            await writeEvent(res, chunk(kind === 'chat' ? { delta: { content: text } } : { text }));
          }
        } catch (e) {
          if (clientGone) throw e;
          // Headers are out: report the failure as an event, in the same shape as a JSON error.
          const he = toHttpError(e);
          await writeEvent(res, errorBody(he));
          res.end();
          requests.inc({ endpoint, status: String(he.status) });
          return;
        }
        await writeEvent(res, chunk(kind === 'chat' ? { delta: {}, finish_reason: out.finish } : { text: '', finish_reason: out.finish }));
        if (withUsage) {
          const u = { id, object: kind === 'chat' ? 'chat.completion.chunk' : 'text_completion', created: createdAt, model: modelId, choices: [], usage: usage() };
          await writeEvent(res, u);
        }
        await writeEvent(res, '[DONE]');
        res.end();
      } else {
        let text = '';
        for await (const t of gen) {
          if (first) {
            ttft.observe((performance.now() - started) / 1000);
            first = false;
          }
          text += t;
        }
        const body =
          kind === 'chat'
            ? {
                id,
                object: 'chat.completion',
                created: createdAt,
                model: modelId,
                choices: [{ index: 0, message: { role: 'assistant', content: text, refusal: null }, logprobs: null, finish_reason: out.finish }],
                usage: usage(),
              }
            : { id, object: 'text_completion', created: createdAt, model: modelId, choices: [{ index: 0, text, logprobs: null, finish_reason: out.finish }], usage: usage() };
        sendJson(res, 200, body);
      }
      requests.inc({ endpoint, status: '200' });
      duration.observe({ endpoint }, (performance.now() - started) / 1000);
    } catch (e) {
      if (clientGone && isAbort(e)) {
        disconnects.inc();
        requests.inc({ endpoint, status: '499' });
        return;
      }
      throw e;
    } finally {
      if (slot) slots.release();
      res.off('close', onClose);
      active--;
      activeGauge.dec();
    }
  }

  async function completions(req: IncomingMessage, res: ServerResponse, body: Record<string, unknown>): Promise<void> {
    checkModel(body);
    checkFields('completion', body);
    let prompt = body.prompt;
    if (Array.isArray(prompt) && prompt.length === 1 && (typeof prompt[0] === 'string' || Array.isArray(prompt[0]))) prompt = prompt[0];
    let t: Int32Array;
    if (typeof prompt === 'string') t = promptTokens(prompt, false);
    else if (Array.isArray(prompt) && prompt.length > 0 && prompt.every((x) => typeof x === 'number')) {
      const V = Math.min(target.info.vocabSize, draft.info.vocabSize);
      if (!prompt.every((x: number) => Number.isInteger(x) && x >= 0 && x < V))
        throw new HttpError(400, `prompt token ids must be integers in [0, ${V})`, 'prompt', 'invalid_value');
      t = Int32Array.from(prompt as number[]);
    } else if (Array.isArray(prompt) && prompt.length > 1 && prompt.every((p) => typeof p === 'string' || Array.isArray(p))) throw new HttpError(400, 'batched prompts are not supported: send one prompt per request', 'prompt', 'unsupported_parameter');
    else throw new HttpError(400, 'prompt must be a string, an array of token ids, or an array holding one of those', 'prompt', prompt === undefined ? 'missing_required_parameter' : 'invalid_value');
    checkPrompt(t, 'prompt');
    const common = parseCommon(body, 16, t.length);
    const stream = parseStream(body);
    await serveGeneration(req, res, '/v1/completions', 'completion', { ...common, tokens: t, stop: parseStop(body.stop) }, stream, includeUsage(body, stream));
  }

  async function chat(req: IncomingMessage, res: ServerResponse, body: Record<string, unknown>): Promise<void> {
    checkModel(body);
    checkFields('chat', body);
    const raw = body.messages;
    if (!Array.isArray(raw) || raw.length === 0) throw new HttpError(400, 'messages must be a non-empty array', 'messages', raw === undefined ? 'missing_required_parameter' : 'invalid_value');
    const messages: ChatMessage[] = raw.map((m: unknown, i) => {
      if (!isObject(m) || typeof m.role !== 'string' || m.role.length === 0) throw new HttpError(400, `messages[${i}] must be an object with a role`, `messages[${i}]`, 'invalid_value');
      if (!ROLES.has(m.role))
        throw new HttpError(400, `messages[${i}].role must be one of ${[...ROLES].join(', ')}, got ${JSON.stringify(m.role)}`, `messages[${i}].role`, 'invalid_value');
      // 'developer' is OpenAI's newer name for 'system'; chat templates know 'system'.
      return { role: m.role === 'developer' ? 'system' : m.role, content: parseContent(m.content, i) };
    });
    let rendered: ReturnType<typeof renderChat>;
    let t: Int32Array;
    try {
      rendered = renderChat(target, messages);
      // A rendered prompt too long for the context is refused before anything is encoded (the
      // template may trim or drop messages, so the bound is taken on what it rendered).
      const tk = target.tokenizer;
      if (tk) checkLength(leastTokens(tk, rendered.prompt, context), 'messages', 'at least ');
      // The template's prompt is tokenized with its special tokens parsed, so markup such as
      // "<|im_end|>" typed into a message would become a control token (a user could forge a system
      // turn): message text that holds a special token's text is refused.
      if (rendered.template && tk)
        messages.forEach((m, i) => {
          const text = typeof m.content === 'string' ? m.content : '';
          if (text && tk.encode(text, { special: true }).join() !== tk.encode(text, { special: false }).join())
            throw new HttpError(400, `messages[${i}].content contains the text of one of the model's special tokens`, `messages[${i}].content`, 'invalid_value');
        });
      t = rendered.template ? target.applyChatTemplate(messages, { addGenerationPrompt: true, tokenize: true }) : promptTokens(rendered.prompt, false);
    } catch (e) {
      if (e instanceof HttpError) throw e;
      throw new HttpError(400, `the model's chat template rejected the messages: ${(e as Error).message}`, 'messages', 'invalid_value');
    }
    checkPrompt(t, 'messages');
    const common = parseCommon(body, defaultMaxTokens, t.length);
    const stream = parseStream(body);
    const stop = [...parseStop(body.stop), ...rendered.stop];
    await serveGeneration(req, res, '/v1/chat/completions', 'chat', { ...common, tokens: t, stop }, stream, includeUsage(body, stream));
  }

  function parseStream(body: Record<string, unknown>): boolean {
    const s = body.stream;
    if (s === undefined || s === null) return false;
    if (typeof s !== 'boolean') throw new HttpError(400, 'stream must be a boolean', 'stream', 'invalid_value');
    return s;
  }

  function includeUsage(body: Record<string, unknown>, stream: boolean): boolean {
    const o = body.stream_options;
    if (o === undefined || o === null) return false;
    if (!stream) throw new HttpError(400, 'stream_options is only allowed when stream is true', 'stream_options', 'invalid_value');
    if (!isObject(o)) throw new HttpError(400, 'stream_options must be an object', 'stream_options', 'invalid_value');
    return o.include_usage === true;
  }

  function modelObject() {
    return { id: modelId, object: 'model', created, owned_by: 'online-specdec' };
  }

  async function route(req: IncomingMessage, res: ServerResponse, next: ((err?: unknown) => void) | undefined): Promise<void> {
    const url = req.url ?? '/';
    const q = url.indexOf('?');
    let path = q >= 0 ? url.slice(0, q) : url;
    if (path.length > 1 && path.endsWith('/')) path = path.slice(0, -1);
    let endpoint = path;
    let method: string | undefined = ROUTES[path];
    if (method === undefined && path.startsWith('/v1/models/')) {
      method = 'GET';
      endpoint = '/v1/models/{id}';
    }
    if (method === undefined) {
      if (next) return next();
      throw new HttpError(404, `Unknown route: ${req.method} ${path}`, null, 'not_found', 'not_found_error');
    }
    res.once('finish', () => {
      if (endpoint !== '/v1/completions' && endpoint !== '/v1/chat/completions') requests.inc({ endpoint, status: String(res.statusCode) });
    });
    // HEAD is GET without the body (Node's response omits it; load balancers' checks use HEAD).
    if (req.method !== method && !(req.method === 'HEAD' && method === 'GET'))
      throw new HttpError(405, `Method ${req.method} is not allowed on ${path}; use ${method}`, null, 'method_not_allowed', 'invalid_request_error', { Allow: method === 'GET' ? 'GET, HEAD' : method });
    if (closing && method === 'POST') throw new HttpError(503, 'the server is shutting down', null, 'shutting_down', 'overloaded_error');
    switch (endpoint) {
      case '/v1/models':
        return sendJson(res, 200, { object: 'list', data: [modelObject()] });
      case '/v1/models/{id}': {
        let id: string;
        try {
          id = decodeURIComponent(path.slice('/v1/models/'.length));
        } catch {
          throw new HttpError(400, `the path ${path} has a malformed percent-escape`, null, 'invalid_path');
        }
        if (id !== modelId) throw new HttpError(404, `The model '${id}' does not exist`, 'model', 'model_not_found');
        return sendJson(res, 200, modelObject());
      }
      case '/metrics': {
        const text = await registry.metrics();
        res.writeHead(200, { 'Content-Type': registry.contentType, 'Content-Length': Buffer.byteLength(text) });
        res.end(text);
        return;
      }
      case '/health':
        return sendJson(res, closing ? 503 : 200, { status: closing ? 'closing' : 'ok', model: modelId, active });
    }
    const body = await readBody(req, maxBodyBytes);
    if (!isObject(body)) throw new HttpError(400, 'the request body must be a JSON object', null, 'invalid_json');
    if (endpoint === '/v1/completions') return completions(req, res, body);
    return chat(req, res, body);
  }

  /** Errors of the generation endpoints and of unknown routes (the other routes count on 'finish'). */
  function countError(req: IncomingMessage, e: HttpError): void {
    let path = (req.url ?? '/').split('?')[0]!;
    if (path.length > 1 && path.endsWith('/')) path = path.slice(0, -1);
    if (path === '/v1/completions' || path === '/v1/chat/completions') requests.inc({ endpoint: path, status: String(e.status) });
    else if (ROUTES[path] === undefined && !path.startsWith('/v1/models/')) requests.inc({ endpoint: 'other', status: String(e.status) });
  }

  const handler = function osdHandler(req: IncomingMessage, res: ServerResponse, next?: (err?: unknown) => void): void {
    const work = route(req, res, typeof next === 'function' ? next : undefined).catch((e: unknown) => {
      if (isAbort(e) && res.destroyed) return;
      const he = toHttpError(e);
      countError(req, he);
      if (res.headersSent) {
        res.end();
        return;
      }
      sendJson(res, he.status, errorBody(he), he.headers);
      // A body we stopped reading (too large) must not be parsed as the next request.
      if (he.status === 413) req.destroy();
    });
    inflight.add(work);
    void work.finally(() => inflight.delete(work));
  } as OsdRequestHandler;

  const fastify = async (instance: FastifyInstanceLike): Promise<void> => {
    // Documented Fastify pattern: a catch-all content-type parser that leaves the body unread (in this
    // plugin's scope only), and hijacked replies, so the handler reads request.raw and writes reply.raw.
    instance.removeAllContentTypeParsers();
    instance.addContentTypeParser('*', (_request, _payload, done) => done(null));
    const prefix = instance.prefix ?? '';
    instance.all('/*', (request, reply) => {
      reply.hijack();
      const raw = request.raw;
      if (prefix && raw.url?.startsWith(prefix)) raw.url = raw.url.slice(prefix.length) || '/';
      handler(raw, reply.raw);
    });
  };

  let disposed: Promise<void> | undefined;
  const dispose = (): Promise<void> =>
    (disposed ??= (async () => {
      closing = true;
      slots.rejectAll(disposedError('decoder'));
      await decoder.dispose();
      await Promise.allSettled([...inflight]);
      decoder.off('step', onStep);
      if (decoder instanceof OnlineDecoder) {
        decoder.off('update', onUpdate);
        decoder.off('rollback', onRollback);
        decoder.off('update-error', onUpdateError);
      }
    })());

  const drain = async (timeoutMs = 30_000): Promise<void> => {
    if (!(typeof timeoutMs === 'number' && timeoutMs >= 0)) throw new RangeError(`timeoutMs must be a number >= 0, got ${String(timeoutMs)}`);
    closing = true;
    let timer: NodeJS.Timeout | undefined;
    // Infinity waits for every request; setTimeout cannot wait longer than MAX_TIMER_MS (24.8 days).
    const deadline = Number.isFinite(timeoutMs) ? new Promise<void>((r) => (timer = setTimeout(r, Math.min(timeoutMs, MAX_TIMER_MS)))) : new Promise<void>(() => {});
    await Promise.race([Promise.allSettled([...inflight]), deadline]);
    clearTimeout(timer);
    await dispose();
  };

  Object.defineProperties(handler, {
    fastify: { value: fastify, enumerable: true },
    registry: { value: registry, enumerable: true },
    decoder: { value: decoder, enumerable: true },
    modelId: { value: modelId, enumerable: true },
    active: { get: () => active, enumerable: true },
    dispose: { value: dispose, enumerable: true },
    close: { value: dispose, enumerable: true },
    drain: { value: drain, enumerable: true },
    [Symbol.asyncDispose]: { value: dispose },
  });
  return handler;
}
