// The options of the `osd` command line, shared by cli.ts and by the executable's thread-pool sizing
// (threadPool.cts), which must find the command among them before any ES module loads.

/** `osd serve --max-concurrent` when not given. */
export const DEFAULT_MAX_CONCURRENT = 4;

export const CLI_OPTIONS = {
  json: { type: 'boolean' },
  help: { type: 'boolean', short: 'h' },
  version: { type: 'boolean', short: 'v' },
  model: { type: 'string' },
  draft: { type: 'string' },
  target: { type: 'string' },
  chat: { type: 'boolean' },
  system: { type: 'string' },
  template: { type: 'string' },
  'max-tokens': { type: 'string' },
  temperature: { type: 'string' },
  'top-p': { type: 'string' },
  'top-k': { type: 'string' },
  seed: { type: 'string' },
  requests: { type: 'string' },
  'requests-per-phase': { type: 'string' },
  lr: { type: 'string' },
  'save-draft': { type: 'string' },
  runs: { type: 'string' },
  out: { type: 'string' },
  port: { type: 'string' },
  host: { type: 'string' },
  'max-concurrent': { type: 'string' },
  'model-id': { type: 'string' },
  static: { type: 'boolean' },
  'no-batching': { type: 'boolean' },
  grace: { type: 'string' },
  type: { type: 'string' },
  device: { type: 'string' },
} as const;
