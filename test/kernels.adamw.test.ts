// adamwStep against a float64 reference of PyTorch's AdamW (torch.optim.AdamW, amsgrad off):
//   p <- p * (1 - lr * wd)
//   m <- beta1 m + (1 - beta1) g;  v <- beta2 v + (1 - beta2) g^2
//   p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// with g = gradScale * grad. globalNorm against a float64 sum of squares.
import { afterAll, describe, expect, it } from 'vitest';
import { adamwStep, globalNorm, setThreads, type AdamWOptions } from '../lib/index.js';
import { Rng } from './helpers/rng.js';

interface Hyper {
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  gradScale: number;
}
const DEFAULTS: Hyper = { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.01, gradScale: 1 };

class RefAdamW {
  readonly p: Float64Array;
  readonly m: Float64Array;
  readonly v: Float64Array;
  constructor(params: Float32Array) {
    this.p = Float64Array.from(params);
    this.m = new Float64Array(params.length);
    this.v = new Float64Array(params.length);
  }
  step(grads: Float32Array, t: number, hyper: Hyper): void {
    // The kernel takes its hyperparameters as float32 (so beta2 = 0.999 is 0.99900001287...);
    // the reference uses the same values and computes everything else in float64.
    const h = Object.fromEntries(Object.entries(hyper).map(([k, x]) => [k, Math.fround(x)])) as unknown as Hyper;
    const bc1 = 1 - h.beta1 ** t;
    const bc2 = 1 - h.beta2 ** t;
    for (let i = 0; i < this.p.length; ++i) {
      const g = (grads[i] as number) * h.gradScale;
      this.p[i] = (this.p[i] as number) * (1 - h.lr * h.weightDecay);
      this.m[i] = h.beta1 * (this.m[i] as number) + (1 - h.beta1) * g;
      this.v[i] = h.beta2 * (this.v[i] as number) + (1 - h.beta2) * g * g;
      const denom = Math.sqrt(this.v[i] as number) / Math.sqrt(bc2) + h.eps;
      this.p[i] = (this.p[i] as number) - (h.lr / bc1) * ((this.m[i] as number) / denom);
    }
  }
}

/** |got - want| <= rtol |want| + atol(i) for every element. */
function expectClose(got: Float32Array, want: Float64Array, rtol: number, atol: number | ((i: number) => number), label: string): void {
  let worst = 0;
  let at = -1;
  for (let i = 0; i < got.length; ++i) {
    const a = typeof atol === 'number' ? atol : atol(i);
    const err = (Math.abs((got[i] as number) - (want[i] as number)) - rtol * Math.abs(want[i] as number)) / a;
    if (err > worst) (worst = err), (at = i);
  }
  expect(worst, `${label}: worst at ${at}: ${got[at]} vs ${want[at]}`).toBeLessThanOrEqual(1);
}

describe('adamwStep', () => {
  afterAll(() => {
    setThreads(0);
  });

  it.each([
    ['defaults', {}],
    ['lr 1e-2, wd 0.1', { lr: 1e-2, weightDecay: 0.1 }],
    ['no weight decay, beta2 0.99', { weightDecay: 0, beta2: 0.99, lr: 3e-3 }],
    ['beta1 0, large eps', { beta1: 0, eps: 1e-3, lr: 1e-2 }],
    ['gradScale 0.25', { gradScale: 0.25, lr: 5e-3 }],
  ] as Array<[string, Partial<Hyper>]>)('matches the float64 reference over 25 steps: %s', (_name, over) => {
    const h: Hyper = { ...DEFAULTS, ...over };
    const rng = new Rng(1 + _name.length);
    const n = 1000;
    const params = rng.normals(n);
    const m = new Float32Array(n);
    const v = new Float32Array(n);
    const ref = new RefAdamW(params);
    for (let t = 1; t <= 25; ++t) {
      // Gradients of very different scales, some exactly zero.
      const grads = new Float32Array(n);
      for (let i = 0; i < n; ++i) grads[i] = i % 17 === 0 ? 0 : rng.normal() * 10 ** ((i % 7) - 3);
      const before = Float32Array.from(grads);
      const opts: AdamWOptions = { params, grads, m, v, step: t, ...over };
      adamwStep(opts);
      ref.step(grads, t, h);
      expect(grads).toEqual(before);
      // m and v lose digits to cancellation only relative to the gradient's own scale.
      const gscale = (i: number): number => 10 ** ((i % 7) - 3) * h.gradScale;
      expectClose(m, ref.m, 1e-6, (i) => 1e-6 * gscale(i), `m, step ${t}`);
      expectClose(v, ref.v, 1e-6, (i) => 1e-6 * gscale(i) ** 2, `v, step ${t}`);
      // Float32 rounding of p accumulates (about 1e-7 |p| a step); real mistakes (bias correction,
      // coupled decay) show up at the scale of lr = 1e-3.
      expectClose(params, ref.p, 1e-5, 1e-6, `params, step ${t}`);
    }
  });

  it('the first step moves each parameter by about lr against the gradient sign (bias correction)', () => {
    const params = new Float32Array([1, 1, 1, 1]);
    const grads = new Float32Array([0.5, -2, 1e-3, -1e3]);
    adamwStep({ params, grads, m: new Float32Array(4), v: new Float32Array(4), step: 1, lr: 0.1, weightDecay: 0 });
    for (let i = 0; i < 4; ++i) expect(params[i]).toBeCloseTo(1 - 0.1 * Math.sign(grads[i] as number), 5);
  });

  it('applies decoupled weight decay even where the gradient is zero', () => {
    const params = new Float32Array([2, -4]);
    adamwStep({ params, grads: new Float32Array(2), m: new Float32Array(2), v: new Float32Array(2), step: 3, lr: 0.1, weightDecay: 0.5 });
    expect(params[0]).toBeCloseTo(2 * (1 - 0.05), 6);
    expect(params[1]).toBeCloseTo(-4 * (1 - 0.05), 6);
  });

  it('gradScale equals scaling the gradients first (for clipping by globalNorm)', () => {
    const rng = new Rng(7);
    const n = 500;
    const p0 = rng.normals(n);
    const grads = rng.normals(n, 3);
    const maxNorm = 1;
    const scale = maxNorm / globalNorm(grads);
    const a = { params: Float32Array.from(p0), grads, m: new Float32Array(n), v: new Float32Array(n), step: 1 };
    const b = { params: Float32Array.from(p0), grads: grads.map((g) => g * scale), m: new Float32Array(n), v: new Float32Array(n), step: 1 };
    for (let t = 1; t <= 3; ++t) {
      adamwStep({ ...a, step: t, gradScale: scale, lr: 1e-2 });
      adamwStep({ ...b, step: t, lr: 1e-2 });
    }
    for (let i = 0; i < n; ++i) {
      expect(a.params[i]).toBeCloseTo(b.params[i] as number, 6);
      expect(a.m[i]).toBeCloseTo(b.m[i] as number, 6);
    }
    // gradScale 0 leaves only the weight decay.
    const c = { params: Float32Array.from(p0), grads, m: new Float32Array(n), v: new Float32Array(n), step: 1, gradScale: 0, lr: 0.1, weightDecay: 0.1 };
    adamwStep(c);
    for (let i = 0; i < n; ++i) expect(c.params[i]).toBeCloseTo((p0[i] as number) * 0.99, 6);
  });

  it('large buffers split across threads give the same result as one thread and as the reference', () => {
    const rng = new Rng(8);
    const n = 200003;
    const p0 = rng.normals(n);
    const grads = rng.normals(n);
    const run = (threads: number): Float32Array => {
      setThreads(threads);
      const params = Float32Array.from(p0);
      const m = new Float32Array(n);
      const v = new Float32Array(n);
      for (let t = 1; t <= 3; ++t) adamwStep({ params, grads, m, v, step: t, lr: 1e-2 });
      return params;
    };
    const one = run(1);
    const many = run(0);
    expect(Buffer.from(many.buffer).equals(Buffer.from(one.buffer))).toBe(true);
    const ref = new RefAdamW(p0);
    for (let t = 1; t <= 3; ++t) ref.step(grads, t, { ...DEFAULTS, lr: 1e-2 });
    expectClose(many, ref.p, 1e-6, 1e-6, 'params');
  });
});

describe('globalNorm', () => {
  afterAll(() => {
    setThreads(0);
  });

  it('equals the float64 Euclidean norm', () => {
    const rng = new Rng(9);
    for (const n of [0, 1, 7, 8, 9, 1000, (1 << 16) - 1, 1 << 16, (1 << 16) * 3 + 5]) {
      const x = rng.normals(n, 2);
      let s = 0;
      for (let i = 0; i < n; ++i) s += (x[i] as number) * (x[i] as number);
      const want = Math.sqrt(s);
      const got = globalNorm(x);
      expect(Math.abs(got - want)).toBeLessThanOrEqual(1e-12 * Math.max(want, 1e-300));
    }
    expect(globalNorm(Float32Array.from([3, 4]))).toBe(5);
    // Values whose squares overflow float32 but not double.
    const big = Float32Array.from([3e30, 4e30]);
    expect(globalNorm(big) / Math.hypot(big[0] as number, big[1] as number)).toBeCloseTo(1, 14);
  });

  it('does not depend on the thread count', () => {
    const x = new Rng(10).normals((1 << 16) * 5 + 123);
    setThreads(1);
    const one = globalNorm(x);
    setThreads(0);
    expect(globalNorm(x)).toBe(one);
  });
});
