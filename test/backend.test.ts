// Backend selection: backends() reports every backend with the reason it cannot be used, 'auto'
// falls back to the CPU saying why, 'cuda' fails clearly where it is not usable, OSD_BACKEND
// overrides the code. The cmake-js addon (built with CUDA when nvcc is present, as in CI) is
// checked in a child process: it must load without a GPU and report why CUDA is not usable, and
// its kernels must agree with the CPU's.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { activeBackend, backends, selectBackend, verifyChain } from '../lib/index.js';
import { packageRoot } from '../lib/addon.js';

const root = packageRoot;

function runChild(code: string, env: Record<string, string | undefined>) {
  const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', code], {
    cwd: root,
    encoding: 'utf8',
    env: { ...process.env, ...env },
    timeout: 60_000,
  });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

const PROBE = `
import * as osd from './lib/index.ts';
const V = 1000, g = 3;
const target = new Float32Array((g + 1) * V), draft = new Float32Array(g * V);
let x = 12345;
const rnd = () => ((x = (x * 1103515245 + 12345) >>> 0) / 2 ** 32) * 8 - 4;
target.forEach((_, i) => (target[i] = rnd()));
draft.forEach((_, i) => (draft[i] = rnd()));
const draftTokens = Int32Array.from([5, 17, 999]);
const out = [];
for (let seed = 0; seed < 20; seed++) {
  const r = osd.verifyChain({ targetLogits: target, draftLogits: draft, draftTokens, vocabSize: V, sampling: { temperature: 1 }, seed });
  out.push([r.acceptedCount, ...r.tokens]);
}
console.log(JSON.stringify({ backends: osd.backends(), active: osd.activeBackend(), out }));
`;

describe('backend selection', () => {
  const list = backends();
  const cuda = list.find((b) => b.name === 'cuda')!;

  it('lists the CPU first, always usable, and CUDA with its state', () => {
    expect(list[0]).toMatchObject({ name: 'cpu', compiled: true, usable: true });
    expect(list[0].detail).toMatch(/\d+ threads?$/);
    expect(cuda).toBeDefined();
    if (!cuda.compiled) expect(cuda.detail).toMatch(/not compiled into this addon/);
    else expect(cuda.detail).toMatch(/^compiled for sm_\d+/);
    if (cuda.compiled && !cuda.usable) expect(cuda.detail).toMatch(/not usable: /);
  });

  // Under OSD_BACKEND=cpu or cuda (npm run test:gpu sets cuda) every selectBackend call gets that
  // backend, and the reason says so.
  const forced = process.env.OSD_BACKEND && process.env.OSD_BACKEND !== 'auto' ? process.env.OSD_BACKEND : undefined;

  it("'auto' picks CUDA only when usable, and otherwise says why", () => {
    const sel = selectBackend('auto');
    if (forced) {
      expect(sel).toMatchObject({ name: forced, requested: forced });
      expect(sel.reason).toMatch(new RegExp(`^OSD_BACKEND=${forced} overrides 'auto'`));
    } else if (cuda.usable) expect(sel).toMatchObject({ name: 'cuda', requested: 'auto' });
    else {
      expect(sel).toMatchObject({ name: 'cpu', requested: 'auto' });
      expect(sel.reason).toMatch(/^cuda (not compiled|compiled for .*not usable)/);
    }
    expect(activeBackend()).toMatchObject({ name: sel.name, requested: sel.requested });
  });

  it("'cpu' always works; 'cuda' throws with the reason where it cannot be used", () => {
    const before = activeBackend();
    if (forced) {
      expect(selectBackend({ backend: 'cpu' })).toMatchObject({ name: forced, requested: forced });
      return;
    }
    expect(selectBackend({ backend: 'cpu' })).toMatchObject({ name: 'cpu', requested: 'cpu' });
    if (!cuda.usable) {
      expect(() => selectBackend('cuda')).toThrow(/the cuda backend cannot be used: /);
      expect(activeBackend().name).toBe('cpu');
    }
    selectBackend(before.requested);
  });

  it('rejects bad names with errors naming the argument', () => {
    expect(() => selectBackend('gpu' as never)).toThrow(RangeError);
    expect(() => selectBackend('gpu' as never)).toThrow(/backend must be 'cpu', 'cuda' or 'auto', got 'gpu'/);
    expect(() => selectBackend(1 as never)).toThrow(TypeError);
    expect(() => selectBackend({} as never)).toThrow(/backend must be a string/);
  });

  it('OSD_BACKEND chooses at load and overrides the code; a bad value fails loudly', () => {
    const over = runChild(
      "import * as osd from './lib/index.ts'; console.log(JSON.stringify([osd.activeBackend(), osd.selectBackend('auto')]));",
      { OSD_BACKEND: 'cpu' },
    );
    expect(over.status, over.stderr).toBe(0);
    const [atLoad, sel] = JSON.parse(over.stdout);
    expect(atLoad).toMatchObject({ name: 'cpu', requested: 'cpu' });
    expect(sel.name).toBe('cpu');
    expect(sel.reason).toMatch(/^OSD_BACKEND=cpu overrides 'auto'/);

    const bad = runChild("await import('./lib/index.ts');", { OSD_BACKEND: 'tpu' });
    expect(bad.status).not.toBe(0);
    expect(bad.stderr).toMatch(/OSD_BACKEND=tpu: backend must be 'cpu', 'cuda' or 'auto'/);
    if (!cuda.usable) {
      const forced = runChild("await import('./lib/index.ts');", { OSD_BACKEND: 'cuda' });
      expect(forced.status).not.toBe(0);
      expect(forced.stderr).toMatch(/OSD_BACKEND=cuda: the cuda backend cannot be used/);
    }
  });

  const cmakeAddon = join(root, 'build-cmake', 'Release', 'online_specdec.node');
  const haveCmake = existsSync(cmakeAddon);
  it.skipIf(!haveCmake)('the cmake-js addon loads, reports CUDA, and its kernels agree with this addon', () => {
    const here = runChild(PROBE, { OSD_BACKEND: 'cpu', OSD_ADDON_PATH: undefined });
    const there = runChild(PROBE, { OSD_BACKEND: 'auto', OSD_ADDON_PATH: cmakeAddon });
    expect(here.status, here.stderr).toBe(0);
    expect(there.status, there.stderr).toBe(0);
    const a = JSON.parse(here.stdout);
    const b = JSON.parse(there.stdout);
    const c = b.backends.find((x: { name: string }) => x.name === 'cuda');
    if (!c.compiled) {
      console.warn('build-cmake addon was built without nvcc: CUDA not compiled in, nothing CUDA-specific to check');
    } else {
      expect(c.detail).toMatch(/^compiled for sm_80, sm_86, sm_89, sm_90 \+ PTX compute_90/);
      if (!c.usable) expect(b.active).toMatchObject({ name: 'cpu', requested: 'auto' });
      else expect(b.active.name).toBe('cuda');
    }
    expect(b.out).toEqual(a.out);
  });
  if (!haveCmake) console.warn(`skipped: ${cmakeAddon} not built (npm run build:native-tests builds it)`);
});
