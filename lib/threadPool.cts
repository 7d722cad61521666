// The size of libuv's thread pool for the `osd` command line (CommonJS: bin.cts loads it before the
// pool starts). Node's default is 4 threads. `osd serve` decodes up to --max-concurrent generations at
// once, and each may hold a pool thread: a chain run waiting in a batch holds its thread.

import { parseArgs } from 'node:util';
import { CLI_OPTIONS, DEFAULT_MAX_CONCURRENT } from './cliOptions.cjs';

/** Node's own size when UV_THREADPOOL_SIZE is unset. */
export const DEFAULT_THREAD_POOL = 4;
/** libuv's largest pool. */
export const MAX_THREAD_POOL = 1024;

/** A pool for this many generations at once: one thread each, and Node's default 4 for the rest. */
export function poolFor(generations: number): number {
  return Math.min(MAX_THREAD_POOL, generations + DEFAULT_THREAD_POOL);
}

/**
 * UV_THREADPOOL_SIZE for `osd` with these arguments (process.argv without node and the script), or
 * undefined to leave it as it is: it is already set, or the command is not `serve`. For `serve`,
 * --max-concurrent (default DEFAULT_MAX_CONCURRENT, 4) threads on top of Node's default 4, for prompt prefills, the draft's
 * online training and the server's own file and DNS work. A bad --max-concurrent counts as the
 * default here; the command line then reports it.
 */
export function threadPoolSize(argv: readonly string[], env: NodeJS.ProcessEnv): number | undefined {
  if (env.UV_THREADPOOL_SIZE !== undefined) return undefined;
  // Parsed as the command line parses it, so that options may come before the command (osd --json serve).
  const { values, positionals } = parseArgs({ args: [...argv], options: CLI_OPTIONS, allowPositionals: true, strict: false });
  if (positionals[0] !== 'serve' || values.version || values.help) return undefined;
  const value = values['max-concurrent'];
  return poolFor(typeof value === 'string' && /^[1-9]\d{0,3}$/.test(value) ? Number(value) : DEFAULT_MAX_CONCURRENT);
}

/** The pool size libuv takes from UV_THREADPOOL_SIZE (as libuv reads it: atoi, 0 means 1, at most 1024). */
export function effectiveThreadPool(env: NodeJS.ProcessEnv): number {
  const raw = env.UV_THREADPOOL_SIZE;
  if (raw === undefined) return DEFAULT_THREAD_POOL;
  const n = Number.parseInt(raw, 10);
  if (!Number.isFinite(n) || n === 0) return 1;
  return n < 0 || n > MAX_THREAD_POOL ? MAX_THREAD_POOL : n;
}
