// Which backend the kernels (verifyChain, verifyChainBatch, verifyTree, distillLoss, adamwStep,
// globalNorm) run on. One choice per process: 'cpu', 'cuda' or 'auto' (CUDA when a device is
// usable, else the CPU, with the reason). OSD_BACKEND overrides whatever the code asks for, so an
// operator can force the CPU (or insist on CUDA) without a code change. The model's own math runs
// on the CPU engine either way.
import { addon, withLoaderNotes } from './addon.js';

import type { BackendName, BackendSelection } from './addonTypes.js';

export type { BackendName, BackendSelection } from './addonTypes.js';

const NAMES: readonly string[] = ['cpu', 'cuda', 'auto'];

function checkName(value: unknown, what: string): BackendName {
  if (typeof value !== 'string') throw new TypeError(`${what} must be a string: 'cpu', 'cuda' or 'auto'`);
  if (!NAMES.includes(value)) throw new RangeError(`${what} must be 'cpu', 'cuda' or 'auto', got '${value}'`);
  return value as BackendName;
}

function fromEnv(): BackendName | undefined {
  const env = process.env.OSD_BACKEND;
  return env === undefined || env === '' ? undefined : checkName(env, 'OSD_BACKEND');
}

/**
 * Chooses the kernels' backend. `'cuda'` throws an Error with the reason when CUDA cannot be
 * used; `'auto'` never throws and reports its fallback in `reason`. OSD_BACKEND, when set, wins.
 */
export function selectBackend(backend: BackendName | { backend: BackendName }): BackendSelection {
  const asked = checkName(typeof backend === 'object' && backend !== null ? backend.backend : backend, 'backend');
  const env = fromEnv();
  let sel: BackendSelection;
  try {
    sel = addon.selectBackend(env ?? asked);
  } catch (e) {
    throw new Error(withLoaderNotes((e as Error).message));
  }
  if (sel.name === 'cpu' && sel.requested === 'auto') sel = { ...sel, reason: withLoaderNotes(sel.reason) };
  return env && env !== asked ? { ...sel, reason: `OSD_BACKEND=${env} overrides '${asked}': ${sel.reason}` } : sel;
}

/** The backend the kernels run on now, and why. */
export function activeBackend(): BackendSelection {
  const sel = addon.activeBackend();
  return sel.name === 'cpu' && sel.requested === 'auto' ? { ...sel, reason: withLoaderNotes(sel.reason) } : sel;
}
