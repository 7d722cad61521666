#!/usr/bin/env node
// The `osd` executable: sizes libuv's thread pool, then runs the command line (cli.ts). Node starts
// the pool at its first use, and loading an ES module is one, so cli.ts cannot size it itself; this
// file is CommonJS so that it runs before anything has used the pool.
import { threadPoolSize } from './threadPool.cjs';

const size = threadPoolSize(process.argv.slice(2), process.env);
if (size !== undefined) process.env.UV_THREADPOOL_SIZE = String(size);
import('./cli.js').catch((err: unknown) => {
  process.stderr.write(`osd: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exit(1);
});
