// Distillation losses and their gradients against an independent float64 reference:
// forward KL(p||q), reverse KL(q||p), JSD(beta) against m = beta p + (1 - beta) q, and total
// variation, with a dense teacher (logits) or a sparse one (top-k probabilities + the rest).
import { describe, expect, it } from 'vitest';
import { distillLoss, type DistillLossKind, type DistillLossOptions, type SparseTeacher } from '../lib/index.js';
import { Rng } from './helpers/rng.js';

const KINDS: DistillLossKind[] = ['forward-kl', 'reverse-kl', 'jsd', 'tvd'];
// Reverse KL floors the teacher's log-probability at log(1e-12) so a zero teacher bin does not
// make the loss infinite (native/distill/losses.cpp); the reference does the same.
const LOG_P_FLOOR = Math.log(1e-12);

interface RefInput {
  kind: DistillLossKind;
  student: Float32Array;
  teacherLogits?: Float32Array;
  teacher?: SparseTeacher;
  V: number;
  T?: number;
  beta?: number;
  mask?: Uint8Array;
}

function logSumExp(xs: number[]): number {
  let m = -Infinity;
  for (const x of xs) m = Math.max(m, x);
  if (m === -Infinity) return -Infinity;
  let s = 0;
  for (const x of xs) s += Math.exp(x - m);
  return m + Math.log(s);
}

function logSoftmax(x: ArrayLike<number>, off: number, V: number, T: number): number[] {
  const z = Array.from({ length: V }, (_, j) => (x[off + j] as number) / T);
  const lse = logSumExp(z);
  return z.map((v) => v - lse);
}

/** The loss over bins given log-probabilities of teacher (lp) and student (lq). */
function binLoss(kind: DistillLossKind, lp: number[], lq: number[], beta: number): number {
  let l = 0;
  for (let b = 0; b < lp.length; ++b) {
    const LP = lp[b] as number;
    const LQ = lq[b] as number;
    const p = Math.exp(LP);
    const q = Math.exp(LQ);
    if (kind === 'forward-kl') l += p > 0 ? p * (LP - LQ) : 0;
    else if (kind === 'reverse-kl') l += q > 0 ? q * (LQ - Math.max(LP, LOG_P_FLOOR)) : 0;
    else if (kind === 'jsd') {
      const lm = logSumExp([Math.log(beta) + LP, Math.log1p(-beta) + LQ]);
      l += (p > 0 ? beta * p * (LP - lm) : 0) + (q > 0 ? (1 - beta) * q * (LQ - lm) : 0);
    } else l += 0.5 * Math.abs(p - q);
  }
  return l;
}

/** Float64 reference of the mean loss over the counted rows; student may be float64. */
function refLoss(o: RefInput, student: ArrayLike<number> = o.student): number {
  const V = o.V;
  const T = o.T ?? 1;
  const beta = o.beta ?? 0.5;
  const N = o.student.length / V;
  let total = 0;
  let counted = 0;
  for (let r = 0; r < N; ++r) {
    if (o.mask && !o.mask[r]) continue;
    ++counted;
    const lq = logSoftmax(student, r * V, V, T);
    if (o.teacherLogits) {
      total += binLoss(o.kind, logSoftmax(o.teacherLogits, r * V, V, T), lq, beta);
      continue;
    }
    const t = o.teacher as SparseTeacher;
    const k = t.indices.length / N;
    const ids = Array.from(t.indices.subarray(r * k, (r + 1) * k));
    const probs = Array.from(t.probs.subarray(r * k, (r + 1) * k));
    const psum = probs.reduce((a, b) => a + b, 0);
    // With k = V there is no "rest": any residual is rounding.
    const pres = k === V ? 0 : t.residual ? (t.residual[r] as number) : Math.max(0, 1 - psum);
    const pnorm = psum + pres;
    const lpBins = [...probs.map((p) => (p > 0 ? Math.log(p / pnorm) : -Infinity))];
    const lqBins = ids.map((id) => lq[id] as number);
    if (k < V) {
      lpBins.push(pres > 0 ? Math.log(pres / pnorm) : -Infinity);
      lqBins.push(logSumExp(lq.filter((_, j) => !ids.includes(j))));
    }
    total += binLoss(o.kind, lpBins, lqBins, beta);
  }
  return counted ? total / counted : 0;
}

/** Float64 gradient of the reference by central differences (eps 1e-6 relative to the scale). */
function refGrad(o: RefInput): Float64Array {
  const s = Float64Array.from(o.student);
  const g = new Float64Array(s.length);
  for (let i = 0; i < s.length; ++i) {
    const x = s[i] as number;
    const h = 1e-6 * Math.max(1, Math.abs(x));
    s[i] = x + h;
    const up = refLoss(o, s);
    s[i] = x - h;
    const down = refLoss(o, s);
    s[i] = x;
    g[i] = (up - down) / (2 * h);
  }
  return g;
}

function kernel(o: RefInput, computeGrad = true): { loss: number; grad?: Float32Array } {
  const opts: DistillLossOptions = { kind: o.kind, studentLogits: o.student, vocabSize: o.V, computeGrad };
  if (o.teacherLogits) opts.teacherLogits = o.teacherLogits;
  if (o.teacher) opts.teacher = o.teacher;
  if (o.T !== undefined) opts.temperature = o.T;
  if (o.beta !== undefined) opts.beta = o.beta;
  if (o.mask) opts.mask = o.mask;
  return distillLoss(opts);
}

/** A sparse teacher: the top-k of softmax(logits) per row (as float32) and the rest as residual. */
function sparseFrom(logits: Float32Array, V: number, k: number, withResidual: boolean): SparseTeacher {
  const N = logits.length / V;
  const indices = new Int32Array(N * k);
  const probs = new Float32Array(N * k);
  const residual = new Float32Array(N);
  for (let r = 0; r < N; ++r) {
    const lp = logSoftmax(logits, r * V, V, 1);
    const order = Array.from({ length: V }, (_, j) => j).sort((a, b) => (lp[b] as number) - (lp[a] as number));
    let s = 0;
    for (let i = 0; i < k; ++i) {
      // Not sorted by id: the kernel must not assume any order.
      const id = order[(i * 7) % k] as number;
      indices[r * k + i] = id;
      probs[r * k + i] = Math.exp(lp[id] as number);
      s += probs[r * k + i] as number;
    }
    residual[r] = Math.max(0, 1 - s);
  }
  return withResidual ? { indices, probs, residual } : { indices, probs };
}

/**
 * Random inputs. For TVD (not smooth where p = q) every bin's |p - q| is kept above 2% of
 * max(p, q), so no finite-difference step below 1e-2 can cross a kink.
 */
function randomInput(rng: Rng, kind: DistillLossKind, sparse: boolean, T: number, N = 3, V = 10, k = 4): RefInput {
  for (;;) {
    const o: RefInput = { kind, student: rng.normals(N * V, 1.5), V, T };
    const t = rng.normals(N * V, 1.5);
    if (sparse) o.teacher = sparseFrom(t, V, k, rng.float() < 0.5);
    else o.teacherLogits = t;
    if (kind === 'jsd') o.beta = rng.pick([0.1, 0.5, 0.9]);
    if (kind !== 'tvd' || minRelativeBinGap(o) > 0.02) return o;
  }
}

function minRelativeBinGap(o: RefInput): number {
  const V = o.V;
  const N = o.student.length / V;
  let gap = Infinity;
  const see = (p: number, q: number): void => {
    gap = Math.min(gap, Math.abs(p - q) / Math.max(p, q));
  };
  for (let r = 0; r < N; ++r) {
    const lq = logSoftmax(o.student, r * V, V, o.T ?? 1);
    if (o.teacherLogits) {
      const lp = logSoftmax(o.teacherLogits, r * V, V, o.T ?? 1);
      for (let j = 0; j < V; ++j) see(Math.exp(lp[j] as number), Math.exp(lq[j] as number));
    } else {
      const t = o.teacher as SparseTeacher;
      const k = t.indices.length / N;
      let qk = 0;
      let pk = 0;
      for (let i = 0; i < k; ++i) {
        const q = Math.exp(lq[t.indices[r * k + i] as number] as number);
        const p = t.probs[r * k + i] as number;
        qk += q;
        pk += p;
        see(p, q);
      }
      see(1 - pk, 1 - qk);
    }
  }
  return gap;
}

describe('distillLoss: values and gradients', () => {
  const cases = KINDS.flatMap((kind) => [false, true].flatMap((sparse) => [1, 2].map((T) => [kind, sparse ? 'sparse' : 'dense', T] as const)));

  it.each(cases)('%s, %s teacher, T=%d: loss equals the float64 reference', (kind, teacher, T) => {
    const rng = new Rng(100 + KINDS.indexOf(kind) * 10 + T + (teacher === 'sparse' ? 5 : 0));
    for (let trial = 0; trial < 20; ++trial) {
      const o = randomInput(rng, kind, teacher === 'sparse', T);
      const ref = refLoss(o);
      const got = kernel(o).loss;
      expect(Math.abs(got - ref), `trial ${trial}: ${got} vs ${ref}`).toBeLessThan(2e-6 * Math.max(1, Math.abs(ref)));
      expect(kernel(o, false).loss).toBe(got);
      expect(kernel(o, false).grad).toBeUndefined();
    }
  });

  it.each(cases)('%s, %s teacher, T=%d: gradient matches central differences of the kernel loss', (kind, teacher, T) => {
    const rng = new Rng(200 + KINDS.indexOf(kind) * 10 + T + (teacher === 'sparse' ? 5 : 0));
    for (let trial = 0; trial < 3; ++trial) {
      const o = randomInput(rng, kind, teacher === 'sparse', T);
      const grad = kernel(o).grad as Float32Array;
      const eps = kind === 'tvd' ? 3e-3 : 1e-2;
      for (let i = 0; i < o.student.length; ++i) {
        const x = o.student[i] as number;
        const s = Float32Array.from(o.student);
        s[i] = x + eps;
        const hi = s[i] as number;
        const up = kernel({ ...o, student: s }, false).loss;
        s[i] = x - eps;
        const lo = s[i] as number;
        const down = kernel({ ...o, student: s }, false).loss;
        const fd = (up - down) / (hi - lo);
        const g = grad[i] as number;
        expect(Math.abs(fd - g), `trial ${trial}, coordinate ${i}: fd ${fd} vs grad ${g}`).toBeLessThan(
          1e-2 * Math.max(Math.abs(g), Math.abs(fd)) + 2e-4,
        );
      }
    }
  });

  it.each(cases)('%s, %s teacher, T=%d: gradient matches the float64 reference gradient', (kind, teacher, T) => {
    const rng = new Rng(300 + KINDS.indexOf(kind) * 10 + T + (teacher === 'sparse' ? 5 : 0));
    for (let trial = 0; trial < 10; ++trial) {
      const o = randomInput(rng, kind, teacher === 'sparse', T);
      const grad = kernel(o).grad as Float32Array;
      const ref = refGrad(o);
      for (let i = 0; i < grad.length; ++i)
        expect(Math.abs((grad[i] as number) - (ref[i] as number)), `trial ${trial}, coordinate ${i}`).toBeLessThan(
          1e-4 * Math.abs(ref[i] as number) + 1e-6,
        );
    }
  });

  it('forward KL with a dense teacher has the closed-form gradient (q - p) / T / N', () => {
    const rng = new Rng(400);
    for (const T of [0.5, 1, 3]) {
      const N = 4;
      const V = 37;
      const o: RefInput = { kind: 'forward-kl', student: rng.normals(N * V, 2), teacherLogits: rng.normals(N * V, 2), V, T };
      const grad = kernel(o).grad as Float32Array;
      for (let r = 0; r < N; ++r) {
        const lq = logSoftmax(o.student, r * V, V, T);
        const lp = logSoftmax(o.teacherLogits as Float32Array, r * V, V, T);
        for (let j = 0; j < V; ++j) {
          const want = (Math.exp(lq[j] as number) - Math.exp(lp[j] as number)) / T / N;
          expect(Math.abs((grad[r * V + j] as number) - want)).toBeLessThan(1e-6);
        }
      }
    }
  });

  it('forward KL with a sparse teacher has the closed-form gradient', () => {
    const rng = new Rng(401);
    const N = 3;
    const V = 20;
    const k = 5;
    const o: RefInput = { kind: 'forward-kl', student: rng.normals(N * V, 2), teacher: sparseFrom(rng.normals(N * V, 2), V, k, true), V, T: 1.5 };
    const t = o.teacher as SparseTeacher;
    const grad = kernel(o).grad as Float32Array;
    for (let r = 0; r < N; ++r) {
      const lq = logSoftmax(o.student, r * V, V, 1.5);
      const q = lq.map(Math.exp);
      const ids = Array.from(t.indices.subarray(r * k, (r + 1) * k));
      const qRest = q.reduce((a, v, j) => (ids.includes(j) ? a : a + v), 0);
      const pRest = t.residual?.[r] as number;
      for (let j = 0; j < V; ++j) {
        const b = ids.indexOf(j);
        const want = (b >= 0 ? (q[j] as number) - (t.probs[r * k + b] as number) : (q[j] as number) * (1 - pRest / qRest)) / 1.5 / N;
        expect(Math.abs((grad[r * V + j] as number) - want)).toBeLessThan(1e-6);
      }
    }
  });

  it('temperature scales logits and the gradient by 1/T', () => {
    const rng = new Rng(402);
    for (const kind of KINDS)
      for (const sparse of [false, true]) {
        const o = randomInput(rng, kind, sparse, 1);
        const T = 2.5;
        const scaled: RefInput = { ...o, student: o.student.map((x) => x / T), T: 1 };
        if (o.teacherLogits) scaled.teacherLogits = o.teacherLogits.map((x) => x / T);
        const a = kernel({ ...o, T });
        const b = kernel(scaled);
        expect(a.loss).toBeCloseTo(b.loss, 5);
        for (let i = 0; i < o.student.length; ++i)
          expect(Math.abs((a.grad?.[i] as number) - (b.grad?.[i] as number) / T)).toBeLessThan(1e-6);
      }
  });
});

describe('distillLoss: masks', () => {
  it.each(KINDS)('%s: masked rows have zero gradient and do not count in the mean', (kind) => {
    const rng = new Rng(500 + KINDS.indexOf(kind));
    for (const sparse of [false, true]) {
      const o = randomInput(rng, kind, sparse, 1, 5, 8, 3);
      const mask = Uint8Array.from([1, 0, 1, 0, 0]);
      const masked = kernel({ ...o, mask });
      expect(Math.abs(masked.loss - refLoss({ ...o, mask }))).toBeLessThan(2e-6);
      // The same as computing on the counted rows only.
      const rows = [0, 2];
      const sub: RefInput = { ...o, student: Float32Array.from(rows.flatMap((r) => Array.from(o.student.subarray(r * 8, r * 8 + 8)))) };
      if (o.teacherLogits) sub.teacherLogits = Float32Array.from(rows.flatMap((r) => Array.from((o.teacherLogits as Float32Array).subarray(r * 8, r * 8 + 8))));
      if (o.teacher) {
        const t = o.teacher;
        sub.teacher = {
          indices: Int32Array.from(rows.flatMap((r) => Array.from(t.indices.subarray(r * 3, r * 3 + 3)))),
          probs: Float32Array.from(rows.flatMap((r) => Array.from(t.probs.subarray(r * 3, r * 3 + 3)))),
          ...(t.residual ? { residual: Float32Array.from(rows.map((r) => t.residual?.[r] as number)) } : {}),
        };
      }
      const only = kernel(sub);
      expect(masked.loss).toBeCloseTo(only.loss, 6);
      const g = masked.grad as Float32Array;
      for (const r of [1, 3, 4]) expect(Array.from(g.subarray(r * 8, r * 8 + 8))).toEqual(new Array(8).fill(0));
      rows.forEach((r, i) => {
        for (let j = 0; j < 8; ++j) expect(g[r * 8 + j]).toBeCloseTo(only.grad?.[i * 8 + j] as number, 7);
      });
      // A nonzero mask value other than 1 also counts.
      expect(kernel({ ...o, mask: Uint8Array.from([7, 0, 255, 0, 0]) }).loss).toBe(masked.loss);
    }
  });

  it.each(KINDS)('%s: all rows masked gives loss 0 and a zero gradient', (kind) => {
    const o = randomInput(new Rng(510), kind, false, 1);
    const r = kernel({ ...o, mask: new Uint8Array(3) });
    expect(r.loss).toBe(0);
    expect((r.grad as Float32Array).every((x) => x === 0)).toBe(true);
    // No rows at all: loss 0.
    expect(kernel({ ...o, student: new Float32Array(0), teacherLogits: new Float32Array(0) }).loss).toBe(0);
  });
});

describe('distillLoss: caller-provided gradOut', () => {
  it.each(KINDS)('%s: writes the same gradient into gradOut and returns that array', (kind) => {
    const rng = new Rng(900 + KINDS.indexOf(kind));
    const N = 3;
    const V = 3000;  // two blocks of the blocked forward-KL path
    const student = new Float32Array(N * V).map(() => 2 * rng.normal());
    const teacherLogits = new Float32Array(N * V).map(() => 2 * rng.normal());
    const mask = Uint8Array.from([1, 0, 1]);
    const base: DistillLossOptions = { kind, studentLogits: student, teacherLogits, vocabSize: V, temperature: 1.3, mask };
    const fresh = distillLoss(base);
    // Without gradOut every call gets its own array; computeGrad: false gives none.
    const again = distillLoss(base);
    expect(again.grad).not.toBe(fresh.grad);
    expect(again.grad).toEqual(fresh.grad);
    const lossOnly = distillLoss({ ...base, computeGrad: false });
    expect(lossOnly).toEqual({ loss: fresh.loss });
    const out = new Float32Array(N * V).fill(Number.NaN);  // stale contents, masked row included
    for (let call = 0; call < 2; ++call) {
      const r = distillLoss({ ...base, gradOut: out });
      expect(r.grad).toBe(out);
      expect(r.loss).toBe(fresh.loss);
      expect(out).toEqual(fresh.grad);
    }
  });
});

describe('distillLoss: numerical stability and consistency', () => {
  // Logits of +-1e4 plus a little noise: softmax underflows almost everywhere.
  function extreme(rng: Rng, N: number, V: number): Float32Array {
    const a = new Float32Array(N * V);
    for (let i = 0; i < a.length; ++i) a[i] = (rng.float() < 0.3 ? 1e4 : -1e4) + rng.normal();
    return a;
  }

  it.each(KINDS)('%s, dense teacher: logits of +-1e4 give a finite loss and gradient that match the reference', (kind) => {
    const rng = new Rng(600 + KINDS.indexOf(kind));
    for (let trial = 0; trial < 10; ++trial) {
      const o: RefInput = { kind, student: extreme(rng, 3, 12), teacherLogits: extreme(rng, 3, 12), V: 12 };
      if (trial % 2) o.T = 2;
      const r = kernel(o);
      const ref = refLoss(o);
      expect(Number.isFinite(r.loss)).toBe(true);
      expect(Math.abs(r.loss - ref), `trial ${trial}: ${r.loss} vs ${ref}`).toBeLessThan(1e-4 * Math.max(1, Math.abs(ref)));
      const g = r.grad as Float32Array;
      const rg = refGrad(o);
      for (let i = 0; i < g.length; ++i) {
        expect(Number.isFinite(g[i])).toBe(true);
        expect(Math.abs((g[i] as number) - (rg[i] as number)), `trial ${trial}, coordinate ${i}`).toBeLessThan(1e-4 * Math.abs(rg[i] as number) + 1e-5);
      }
    }
  });

  it.each(KINDS)('%s, dense teacher: logits offset by 1e4 match the reference on the float32 inputs', (kind) => {
    // Precision, not just finiteness: the loss must not lose digits to a large common offset.
    const rng = new Rng(650 + KINDS.indexOf(kind));
    for (let trial = 0; trial < 10; ++trial) {
      const o: RefInput = { kind, student: rng.normals(2 * 16, 1.5, 1e4), teacherLogits: rng.normals(2 * 16, 1.5, -1e4), V: 16 };
      const ref = refLoss(o);
      const got = kernel(o).loss;
      // Float32 kernels reach ~1e-7 here; losing digits to the offset shows as ~1e-4.
      expect(Math.abs(got - ref), `trial ${trial}: ${got} vs ${ref}`).toBeLessThan(1e-5 * Math.max(1, Math.abs(ref)));
    }
  });

  it.each(KINDS)('%s, sparse teacher: student logits of +-1e4 give a finite loss and gradient that match the reference', (kind) => {
    // The student puts (almost) all its mass on the teacher's top-k ids: its "rest" mass
    // underflows in float but is e^-2e4-ish, not 0.
    const rng = new Rng(700 + KINDS.indexOf(kind));
    const V = 10;
    const k = 3;
    for (let trial = 0; trial < 5; ++trial) {
      const teacher = sparseFrom(rng.normals(2 * V, 1.5), V, k, false);
      const student = new Float32Array(2 * V).fill(-1e4);
      for (let i = 0; i < 2 * k; ++i) student[Math.floor(i / k) * V + (teacher.indices[i] as number)] = 1e4 + rng.normal();
      const o: RefInput = { kind, student, teacher, V };
      const r = kernel(o);
      const ref = refLoss(o);
      expect(Number.isFinite(r.loss), `loss ${r.loss}`).toBe(true);
      expect(Math.abs(r.loss - ref), `trial ${trial}: ${r.loss} vs ${ref}`).toBeLessThan(1e-4 * Math.max(1, Math.abs(ref)));
      const g = r.grad as Float32Array;
      const rg = refGrad(o);
      for (let i = 0; i < g.length; ++i) {
        expect(Number.isFinite(g[i]), `grad[${i}] = ${g[i]}`).toBe(true);
        expect(Math.abs((g[i] as number) - (rg[i] as number)), `trial ${trial}, coordinate ${i}`).toBeLessThan(1e-4 * Math.abs(rg[i] as number) + 1e-5);
      }
    }
  });

  it.each(KINDS)('%s: a sparse teacher with k = V equals the dense teacher with the same probabilities', (kind) => {
    const rng = new Rng(800 + KINDS.indexOf(kind));
    const N = 8;
    const V = 9;
    const teacherLogits = rng.normals(N * V, 2);
    const student = rng.normals(N * V, 2);
    // Probabilities rounded to float32: their sum is within a few ulps of 1, either side.
    const teacher = sparseFrom(teacherLogits, V, V, false);
    const beta = kind === 'jsd' ? 0.3 : undefined;
    const dense = kernel({ kind, student, teacherLogits, V, ...(beta ? { beta } : {}) });
    const sparse = kernel({ kind, student, teacher, V, ...(beta ? { beta } : {}) });
    expect(Number.isFinite(sparse.loss), `sparse loss ${sparse.loss}`).toBe(true);
    expect(Math.abs(sparse.loss - dense.loss)).toBeLessThan(2e-6 * Math.max(1, dense.loss));
    for (let i = 0; i < N * V; ++i) expect(Math.abs((sparse.grad?.[i] as number) - (dense.grad?.[i] as number))).toBeLessThan(1e-6);
  });
});
