// A small valid verifyTree input (three nodes: a chain of two and a second root child) over vocabSize V,
// for the tests that corrupt one argument at a time.
export function treeOptions(V: number) {
  return {
    parents: Int32Array.from([-1, 0, -1]),
    tokens: Int32Array.from([0, 1, 2]),
    targetLogits: new Float32Array(4 * V).map((_, i) => i % 3),
    draftLogits: new Float32Array(4 * V).map((_, i) => i % 2),
    vocabSize: V,
    sampling: { temperature: 1 },
    seed: 1,
  };
}
