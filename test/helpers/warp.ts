// An independent float64 reference of the warping semantics (temperature, top-k, top-p) and of
// sampling from a warped distribution. Written from the spec, not from the C++ code:
// - temperature 0 is greedy: a one-hot distribution on the argmax, ties to the lowest id;
// - top-k keeps the k largest logits (ties to the lower id); 0 or k >= V means off;
// - top-p (after top-k) sorts by probability descending (ties to the lower id), keeps the
//   minimal prefix whose cumulative probability reaches topP, and renormalises; 1 means off.
// -Infinity logits have probability 0.

export interface Warp {
  temperature: number;
  topK?: number;
  topP?: number;
}

/** Index of the largest value, ties to the lowest index. */
export function argmax(row: ArrayLike<number>, offset = 0, n = row.length - offset): number {
  let best = 0;
  for (let j = 1; j < n; ++j) if ((row[offset + j] as number) > (row[offset + best] as number)) best = j;
  return best;
}

/** The warped distribution of logits[offset .. offset + V). */
export function warp(logits: ArrayLike<number>, V: number, s: Warp, offset = 0): Float64Array {
  const out = new Float64Array(V);
  if (s.temperature === 0) {
    out[argmax(logits, offset, V)] = 1;
    return out;
  }
  // The kernel takes temperature and topP as float32; use the same values.
  const T = Math.fround(s.temperature);
  const topK = s.topK ?? 0;
  const topP = Math.fround(s.topP ?? 1);
  let max = -Infinity;
  for (let j = 0; j < V; ++j) max = Math.max(max, logits[offset + j] as number);
  // Candidates in order of decreasing logit (= decreasing probability), ties to the lower id.
  const order = Array.from({ length: V }, (_, j) => j);
  order.sort((a, b) => {
    const la = logits[offset + a] as number;
    const lb = logits[offset + b] as number;
    return la !== lb ? lb - la : a - b;
  });
  const keepK = topK > 0 && topK < V ? topK : V;
  const w = new Float64Array(keepK);
  let total = 0;
  for (let i = 0; i < keepK; ++i) {
    w[i] = Math.exp(((logits[offset + (order[i] as number)] as number) - max) / T);
    total += w[i] as number;
  }
  let keep = keepK;
  if (topP < 1) {
    let cum = 0;
    for (let i = 0; i < keepK; ++i) {
      cum += (w[i] as number) / total;
      if (cum >= topP) {
        keep = i + 1;
        break;
      }
    }
  }
  let kept = 0;
  for (let i = 0; i < keep; ++i) kept += w[i] as number;
  for (let i = 0; i < keep; ++i) out[order[i] as number] = (w[i] as number) / kept;
  return out;
}

/** Inverse-CDF sample from a (normalised) distribution with a uniform u in [0, 1). */
export function sample(dist: ArrayLike<number>, u: number): number {
  let cum = 0;
  let last = -1;
  for (let j = 0; j < dist.length; ++j) {
    const p = dist[j] as number;
    if (p <= 0) continue;
    cum += p;
    last = j;
    if (cum > u) return j;
  }
  if (last < 0) throw new Error('sample: distribution has no mass');
  return last;
}

/** The ids of the k most probable tokens of dist (ties to the lower id), most probable first. */
export function topTokens(dist: ArrayLike<number>, k: number): number[] {
  const ids = Array.from({ length: dist.length }, (_, j) => j).filter((j) => (dist[j] as number) > 0);
  ids.sort((a, b) => ((dist[b] as number) !== (dist[a] as number) ? (dist[b] as number) - (dist[a] as number) : a - b));
  return ids.slice(0, k);
}

/** Number of tokens with positive probability. */
export function supportSize(dist: ArrayLike<number>): number {
  let n = 0;
  for (let j = 0; j < dist.length; ++j) if ((dist[j] as number) > 0) ++n;
  return n;
}
