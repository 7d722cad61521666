// loadModel's `device` option: the model pass on the GPU. Everywhere: bad values are RangeErrors,
// 'cuda' rejects saying why where it cannot run (this addon, and the cmake-js CUDA addon in a child
// process when it is built), and the device plumbing (sequences, speculative and online decoding,
// setWeights and convert following the device) runs through 'mirror', the engine's CPU stand-in for
// a device, with the CPU's bits. On a GPU (npm run test:gpu): logits within rounding of the CPU engine's,
// the KV cache on the device through trees, keepPath and forks, copies and setWeights keeping a
// model on the GPU, and exact speculative decoding with both models there.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { addon, packageRoot } from '../lib/addon.js';
import {
  backends,
  chainBatchStats,
  createOnlineDecoder,
  defaultDraftPath,
  defaultTargetPath,
  loadModel,
  SpeculativeDecoder,
  type Model,
  type ModelDevice,
} from '../lib/index.js';

const cuda = backends().find((b) => b.name === 'cuda');
const gpu = !!cuda?.usable;

// max |a - b| over a row, relative to the row's largest |a| (at least 1).
function worstRowError(a: Float32Array, b: Float32Array, vocab: number): number {
  let worst = 0;
  for (let r = 0; r < a.length / vocab; r++) {
    let scale = 1;
    let d = 0;
    for (let j = r * vocab; j < (r + 1) * vocab; j++) {
      if (a[j] === -Infinity && b[j] === -Infinity) continue; // outside a restricted head
      scale = Math.max(scale, Math.abs(a[j]));
      d = Math.max(d, Number.isNaN(a[j] - b[j]) ? Infinity : Math.abs(a[j] - b[j]));
    }
    worst = Math.max(worst, d / scale);
  }
  return worst;
}

describe('loadModel device option', () => {
  it("defaults to the CPU and reports it in info.device", async () => {
    const m = await loadModel(defaultDraftPath);
    try {
      expect(m.info.device).toBe('cpu');
    } finally {
      await m.dispose();
    }
  });

  it('rejects bad values with errors naming the option', async () => {
    await expect(loadModel(defaultDraftPath, { device: 'gpu' as never })).rejects.toThrow(RangeError);
    await expect(loadModel(defaultDraftPath, { device: 'gpu' as never })).rejects.toThrow(
      /options.device must be 'cpu' or 'cuda', got 'gpu'/,
    );
    await expect(loadModel(defaultDraftPath, { device: Object.create(null) as never })).rejects.toThrow(
      new RangeError("options.device must be 'cpu' or 'cuda', got object"),
    );
    await expect(loadModel(defaultDraftPath, { device: 1 as never })).rejects.toThrow(/options.device/);
    expect(() => (addon as unknown as { loadModel(p: string, d: unknown): unknown }).loadModel(defaultDraftPath, 'tpu')).toThrow(
      /device must be 'cpu' or 'cuda'/,
    );
  });

  it.skipIf(gpu)("'cuda' rejects with the reason where it cannot run", async () => {
    const err = await loadModel(defaultDraftPath, { device: 'cuda' }).catch((e: Error) => e);
    expect(err).toBeInstanceOf(Error);
    if (cuda?.compiled) expect((err as Error).message).toMatch(/^device 'cuda' is not usable here: /);
    else expect((err as Error).message).toMatch(/needs the CUDA build of the addon, and this one is CPU-only/);
  });

  const cmakeAddon = join(packageRoot, 'build-cmake', 'Release', 'online_specdec.node');
  it.skipIf(gpu || !existsSync(cmakeAddon))("the CUDA addon without a GPU rejects 'cuda' saying why", () => {
    const code = `
import * as osd from './lib/index.ts';
const c = osd.backends().find((b) => b.name === 'cuda');
const e = await osd.loadModel(osd.defaultDraftPath, { device: 'cuda' }).catch((e) => e);
console.log(JSON.stringify({ compiled: c.compiled, usable: c.usable, message: String(e?.message ?? e) }));`;
    const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', code], {
      cwd: packageRoot,
      encoding: 'utf8',
      env: { ...process.env, OSD_ADDON_PATH: cmakeAddon, OSD_BACKEND: 'auto' },
      timeout: 60_000,
    });
    expect(r.status, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout);
    if (!out.compiled) return; // built without nvcc: nothing CUDA-specific to check
    expect(out.usable).toBe(false);
    expect(out.message).toMatch(/^device 'cuda' is not usable here: no/);
  });
});

describe.skipIf(!gpu)('the model pass on the GPU', () => {
  let cpuTarget: Model, gpuTarget: Model, cpuDraft: Model, gpuDraft: Model;
  beforeAll(async () => {
    cpuTarget = await loadModel(defaultTargetPath);
    gpuTarget = await loadModel(defaultTargetPath, { device: 'cuda' });
    cpuDraft = await loadModel(defaultDraftPath);
    gpuDraft = await loadModel(defaultDraftPath, { device: 'cuda' });
  });
  afterAll(async () => {
    for (const m of [cpuTarget, gpuTarget, cpuDraft, gpuDraft]) await m?.dispose();
  });

  it('reports the device, and gives the CPU engine logits within rounding', async () => {
    expect(gpuTarget.info.device).toMatch(/^cuda: /);
    const V = cpuTarget.info.vocabSize;
    const tokens = Int32Array.from({ length: 40 }, (_, i) => (i * 977 + 13) % V);
    const a = await cpuTarget.forward(tokens);
    const b = await gpuTarget.forward(tokens);
    expect(b.length).toBe(a.length);
    expect(worstRowError(a, b, V)).toBeLessThan(2e-3);
  });

  it('keeps the cache on the device through trees, keepPath and forks', async () => {
    const V = cpuTarget.info.vocabSize;
    const prompt = Int32Array.from({ length: 12 }, (_, i) => (i * 31 + 7) % V);
    const nodes = Int32Array.from([5, 9, 11, 40, 41]);
    const parents = Int32Array.from([-1, 0, 0, 1, 2]);
    const rows: Float32Array[][] = [];
    for (const m of [cpuTarget, gpuTarget]) {
      const s = m.createSequence();
      await s.evaluate(prompt);
      const tree = await s.evaluate(nodes, { treeParents: parents });
      s.keepPath(prompt.length, [0, 2, 4]);
      const fork = s.fork();
      const after = await fork.evaluate([3]);
      const own = await s.evaluate([4]);
      rows.push([tree, after, own]);
      await fork.dispose();
      await s.dispose();
    }
    for (let k = 0; k < 3; k++) expect(worstRowError(rows[0][k], rows[1][k], V)).toBeLessThan(2e-3);
  });

  it('copies stay on the GPU, and CPU weights given by setWeights move there', async () => {
    const copy = await gpuDraft.convert('keep');
    const cpuCopy = await cpuDraft.convert('keep');
    try {
      expect(copy.info.device).toMatch(/^cuda: /);
      expect(cpuCopy.info.device).toBe('cpu');
      copy.setWeights(cpuCopy);
      expect(copy.info.device).toMatch(/^cuda: /);
      const V = cpuDraft.info.vocabSize;
      const tokens = Int32Array.from({ length: 16 }, (_, i) => (i * 37 + 1) % V);
      expect(worstRowError(await cpuDraft.forward(tokens), await copy.forward(tokens), V)).toBeLessThan(2e-3);
    } finally {
      await copy.dispose();
      await cpuCopy.dispose();
    }
  });

  it('a restricted head runs there too: its logits within rounding, -Infinity elsewhere, and exact greedy decoding', async () => {
    const V = cpuDraft.info.vocabSize;
    const ids = Array.from({ length: V }, (_, i) => i).filter((i) => i % 4 !== 3);
    const gpuHead = await gpuDraft.withHead(ids);
    const cpuHead = await cpuDraft.withHead(ids);
    try {
      expect(gpuHead.info.device).toMatch(/^cuda: /);
      const tokens = Int32Array.from({ length: 24 }, (_, i) => (i * 53 + 2) % V);
      const a = await cpuHead.forward(tokens);
      const b = await gpuHead.forward(tokens);
      for (let j = 3; j < b.length; j += 4) expect(b[j]).toBe(-Infinity);
      expect(worstRowError(a, b, V)).toBeLessThan(2e-3);
      const prompt = 'Once upon a time';
      const plain = await gpuTarget.generate({ prompt, maxTokens: 48 });
      const dec = new SpeculativeDecoder({ target: gpuTarget, draft: gpuHead, strategy: { kind: 'chain', length: 4 } });
      try {
        expect(Array.from((await dec.generate({ prompt, maxTokens: 48 })).tokens)).toEqual(Array.from(plain.tokens));
      } finally {
        await dec.dispose();
      }
    } finally {
      await gpuHead.dispose();
      await cpuHead.dispose();
    }
  });

  it('speculative decoding with both models on the GPU gives the target-only greedy tokens', async () => {
    const prompt = 'Once upon a time';
    const plain = await gpuTarget.generate({ prompt, maxTokens: 48 });
    const dec = new SpeculativeDecoder({ target: gpuTarget, draft: gpuDraft, strategy: { kind: 'chain', length: 4 } });
    try {
      const spec = await dec.generate({ prompt, maxTokens: 48 });
      expect(Array.from(spec.tokens)).toEqual(Array.from(plain.tokens));
    } finally {
      await dec.dispose();
    }
  });
});

// 'mirror' (model/mirror_pass.h): a device pass that computes on the CPU, so every answer must be the
// plain CPU model's, bit for bit. Allowed only with OSD_TEST_MIRROR_DEVICE=1.
describe('device plumbing through the mirror pass', () => {
  const mirror = 'mirror' as ModelDevice;
  let target: Model, draft: Model, mTarget: Model, mDraft: Model;
  beforeAll(async () => {
    process.env.OSD_TEST_MIRROR_DEVICE = '1';
    target = await loadModel(defaultTargetPath);
    draft = await loadModel(defaultDraftPath);
    mTarget = await loadModel(defaultTargetPath, { device: mirror });
    mDraft = await loadModel(defaultDraftPath, { device: mirror });
  });
  afterAll(async () => {
    delete process.env.OSD_TEST_MIRROR_DEVICE;
    for (const m of [target, draft, mTarget, mDraft]) await m?.dispose();
  });

  it('is refused without the environment switch', async () => {
    delete process.env.OSD_TEST_MIRROR_DEVICE;
    try {
      await expect(loadModel(defaultDraftPath, { device: mirror })).rejects.toThrow(/options.device must be 'cpu' or 'cuda'/);
    } finally {
      process.env.OSD_TEST_MIRROR_DEVICE = '1';
    }
  });

  it('gives the CPU bits through forward, trees, keepPath and forks', async () => {
    expect(mTarget.info.device).toBe('mirror');
    const V = target.info.vocabSize;
    const tokens = Int32Array.from({ length: 30 }, (_, i) => (i * 977 + 13) % V);
    expect(await mTarget.forward(tokens)).toEqual(await target.forward(tokens));
    const rows: Float32Array[][] = [];
    for (const m of [target, mTarget]) {
      const s = m.createSequence();
      await s.evaluate(tokens.subarray(0, 12));
      const tree = await s.evaluate(Int32Array.from([5, 9, 11, 40, 41]), { treeParents: Int32Array.from([-1, 0, 0, 1, 2]) });
      s.keepPath(12, [0, 2, 4]);
      const fork = s.fork();
      const a = await fork.evaluate([3]);
      s.truncate(13);
      const b = await s.evaluate([4, 6]);
      rows.push([tree, a, b]);
      await fork.dispose();
      await s.dispose();
    }
    for (let k = 0; k < 3; k++) expect(rows[1]![k]).toEqual(rows[0]![k]);
  });

  it('speculative decoding on the device gives the CPU pair its tokens, greedy and sampled', async () => {
    const prompt = 'Once upon a time';
    for (const sampling of [{ temperature: 0 }, { temperature: 0.8 }]) {
      const out: number[][] = [];
      for (const [t, d] of [
        [target, draft],
        [mTarget, mDraft],
      ] as const) {
        const dec = new SpeculativeDecoder({ target: t, draft: d, strategy: { kind: 'chain', length: 4 } });
        out.push(Array.from((await dec.generate({ prompt, maxTokens: 40, sampling, seed: 7 })).tokens));
        await dec.dispose();
      }
      expect(out[1]).toEqual(out[0]);
    }
    expect(Array.from((await mTarget.generate({ prompt, maxTokens: 40 })).tokens)).toEqual(
      Array.from((await target.generate({ prompt, maxTokens: 40 })).tokens),
    );
  });

  it('concurrent generations share batched device passes and give the CPU pair its tokens', async () => {
    const prompts = ['Once upon a time', 'The little dog', 'She went to the park', 'The sun was'];
    const run = async (t: Model, d: Model) => {
      const dec = new SpeculativeDecoder({ target: t, draft: d, strategy: { kind: 'chain', length: 4 }, maxConcurrent: 4 });
      try {
        const all = await Promise.all(
          prompts.map((prompt, i) => dec.generate({ prompt, maxTokens: 24, sampling: { temperature: i % 2 ? 0.8 : 0 }, seed: i })),
        );
        return all.map((r) => Array.from(r.tokens));
      } finally {
        await dec.dispose();
      }
    };
    const before = chainBatchStats();
    const onDevice = await run(mTarget, mDraft);
    const after = chainBatchStats();
    expect(onDevice).toEqual(await run(target, draft));
    // Some steps held several runs: the device pass ran batched passes of several sequences.
    expect(after.steps).toBeGreaterThan(before.steps);
    expect(after.runs - before.runs).toBeGreaterThan(after.steps - before.steps);
  });

  it('a restricted head stays on the device and gives the CPU bits', async () => {
    const V = draft.info.vocabSize;
    const ids = Array.from({ length: V }, (_, i) => i).filter((i) => i % 4 !== 3);
    await using onDevice = await mDraft.withHead(ids);
    await using onCpu = await draft.withHead(ids);
    expect(onDevice.info.device).toBe('mirror');
    expect(onDevice.info.headTokens).toBe(ids.length);
    const tokens = Int32Array.from({ length: 16 }, (_, i) => (i * 37 + 1) % V);
    expect(await onDevice.forward(tokens)).toEqual(await onCpu.forward(tokens));
  });

  it('copies stay on the device, and CPU weights given by setWeights move there', async () => {
    const copy = await mDraft.convert('keep');
    const cpuCopy = await draft.convert('keep');
    try {
      expect(copy.info.device).toBe('mirror');
      expect(cpuCopy.info.device).toBe('cpu');
      const plain = await loadModel(defaultDraftPath);
      try {
        plain.setWeights(copy); // a CPU model given device weights runs on the device from now on
        expect(plain.info.device).toBe('mirror');
      } finally {
        await plain.dispose();
      }
      // The given model stays where it is, and so do its running sequences (they forked into freed
      // cache memory when setWeights moved the given model itself).
      const running = cpuCopy.createSequence();
      await running.evaluate([1, 2, 3]);
      copy.setWeights(cpuCopy);
      expect(copy.info.device).toBe('mirror');
      expect(cpuCopy.info.device).toBe('cpu');
      const forked = running.fork();
      const ref = draft.createSequence();
      await ref.evaluate([1, 2, 3]);
      expect(await forked.evaluate([4])).toEqual(await ref.evaluate([4]));
      await Promise.all([running.dispose(), forked.dispose(), ref.dispose()]);
      const tokens = Int32Array.from({ length: 16 }, (_, i) => (i * 37 + 1) % draft.info.vocabSize);
      expect(await copy.forward(tokens)).toEqual(await draft.forward(tokens));
      expect(await cpuCopy.forward(tokens)).toEqual(await draft.forward(tokens));
    } finally {
      await copy.dispose();
      await cpuCopy.dispose();
    }
  });

  it('online updates keep the draft on the device and the output exact', async () => {
    const d = await loadModel(defaultDraftPath, { device: mirror });
    const dec = createOnlineDecoder({ target: mTarget, draft: d, strategy: { kind: 'chain', length: 3 }, distill: { interval: 2, guardMargin: 1 } });
    let updates = 0;
    dec.on('update', () => updates++);
    try {
      const prompts = ['Once upon a time', 'The little dog', 'She went to the park', 'The sun was'];
      for (const prompt of prompts) {
        const want = await target.generate({ prompt, maxTokens: 20 });
        const got = await dec.generate({ prompt, maxTokens: 20 });
        expect(Array.from(got.tokens)).toEqual(Array.from(want.tokens));
        await dec.updateNow().catch(() => null);
      }
      expect(updates).toBeGreaterThanOrEqual(1);
      expect(d.weightsVersion).toBeGreaterThanOrEqual(1);
      expect(d.info.device).toBe('mirror');
      const after = await dec.generate({ prompt: 'Once upon a time', maxTokens: 20 });
      expect(Array.from(after.tokens)).toEqual(Array.from((await target.generate({ prompt: 'Once upon a time', maxTokens: 20 })).tokens));
    } finally {
      await dec.dispose();
      await d.dispose();
    }
  });
});
