// Pearson's chi-square goodness-of-fit test with an accurate upper regularised incomplete gamma
// function (series + Lentz continued fraction, as in Numerical Recipes, 3rd ed., 6.2).

/** log Gamma(x) for x > 0 (Lanczos, g = 7, n = 9; about 1e-15 relative). */
export function lnGamma(x: number): number {
  const c = [
    0.99999999999980993, 676.5203681218851, -1259.1392167224028, 771.32342877765313, -176.61502916214059,
    12.507343278686905, -0.13857109526572012, 9.9843695780195716e-6, 1.5056327351493116e-7,
  ];
  if (x < 0.5) return Math.log(Math.PI / Math.abs(Math.sin(Math.PI * x))) - lnGamma(1 - x);
  x -= 1;
  let a = c[0] as number;
  const t = x + 7.5;
  for (let i = 1; i < 9; ++i) a += (c[i] as number) / (x + i);
  return 0.5 * Math.log(2 * Math.PI) + (x + 0.5) * Math.log(t) - t + Math.log(a);
}

const EPS = 1e-16;
const FPMIN = 1e-300;

function gammaPSeries(a: number, x: number): number {
  let ap = a;
  let sum = 1 / a;
  let del = sum;
  for (let n = 0; n < 100000; ++n) {
    ap += 1;
    del *= x / ap;
    sum += del;
    if (Math.abs(del) < Math.abs(sum) * EPS) break;
  }
  return sum * Math.exp(-x + a * Math.log(x) - lnGamma(a));
}

function gammaQContinuedFraction(a: number, x: number): number {
  let b = x + 1 - a;
  let c = 1 / FPMIN;
  let d = 1 / b;
  let h = d;
  for (let i = 1; i < 100000; ++i) {
    const an = -i * (i - a);
    b += 2;
    d = an * d + b;
    if (Math.abs(d) < FPMIN) d = FPMIN;
    c = b + an / c;
    if (Math.abs(c) < FPMIN) c = FPMIN;
    d = 1 / d;
    const del = d * c;
    h *= del;
    if (Math.abs(del - 1) < EPS) break;
  }
  return Math.exp(-x + a * Math.log(x) - lnGamma(a)) * h;
}

/** The regularised upper incomplete gamma function Q(a, x) = Gamma(a, x) / Gamma(a). */
export function gammaQ(a: number, x: number): number {
  if (!(a > 0) || !(x >= 0)) throw new RangeError(`gammaQ: bad arguments a=${a}, x=${x}`);
  if (x === 0) return 1;
  if (x === Infinity) return 0;
  if (x < a + 1) return 1 - gammaPSeries(a, x);
  return gammaQContinuedFraction(a, x);
}

/** Upper tail of the chi-square distribution with df degrees of freedom. */
export function chiSquareSurvival(statistic: number, df: number): number {
  return gammaQ(df / 2, statistic / 2);
}

export interface ChiSquareResult {
  statistic: number;
  df: number;
  pValue: number;
  /** Cells after pooling. */
  cells: number;
}

/**
 * Pearson's chi-square test of observed counts against expected probabilities (normalised here).
 * Cells with expected count < 5 are merged into one pooled cell; if that pooled cell is still
 * below 5 it is merged into the smallest remaining cell. An observation in a cell of probability
 * 0 makes the statistic infinite (p = 0).
 */
export function chiSquareTest(observed: ArrayLike<number>, probs: ArrayLike<number>): ChiSquareResult {
  if (observed.length !== probs.length) throw new RangeError('chiSquareTest: length mismatch');
  let n = 0;
  let ptotal = 0;
  for (let i = 0; i < observed.length; ++i) {
    n += observed[i] as number;
    ptotal += probs[i] as number;
  }
  const obs: number[] = [];
  const exp: number[] = [];
  let pooledObs = 0;
  let pooledExp = 0;
  for (let i = 0; i < observed.length; ++i) {
    const e = ((probs[i] as number) / ptotal) * n;
    const o = observed[i] as number;
    if (e === 0 && o > 0) return { statistic: Infinity, df: Math.max(1, observed.length - 1), pValue: 0, cells: observed.length };
    if (e >= 5) {
      obs.push(o);
      exp.push(e);
    } else {
      pooledObs += o;
      pooledExp += e;
    }
  }
  if (pooledExp > 0 || pooledObs > 0) {
    if (pooledExp >= 5 || exp.length === 0) {
      obs.push(pooledObs);
      exp.push(pooledExp);
    } else {
      let s = 0;
      for (let i = 1; i < exp.length; ++i) if ((exp[i] as number) < (exp[s] as number)) s = i;
      obs[s] = (obs[s] as number) + pooledObs;
      exp[s] = (exp[s] as number) + pooledExp;
    }
  }
  const df = exp.length - 1;
  let statistic = 0;
  for (let i = 0; i < exp.length; ++i) {
    const d = (obs[i] as number) - (exp[i] as number);
    statistic += (d * d) / (exp[i] as number);
  }
  if (df <= 0) return { statistic, df: 0, pValue: statistic === 0 ? 1 : 0, cells: exp.length };
  return { statistic, df, pValue: chiSquareSurvival(statistic, df), cells: exp.length };
}
