// A freshly initialised llama GGUF carrying a tokenizer: shared by the default pair's trainer and the
// SmolLM2 draft builder. Matrices are N(0, 0.02) with the residual projections scaled by
// 1/sqrt(2 L); norms are ones (the output norm may take a gain).
import { readGgufMetadata, writeGguf, type GgufMetadataEntry, type GgufTensorInput } from './bpe.js';

/** A small deterministic PRNG (xorshift32) for window sampling and initialisation. */
export class XorShift {
  #s: number;
  constructor(seed: number) {
    this.#s = seed >>> 0 || 0x9e3779b9;
  }
  next(): number {
    let x = this.#s;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.#s = x >>> 0;
    return this.#s / 4294967296;
  }
  normal(): number {
    const u = Math.max(1e-12, this.next());
    return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * this.next());
  }
}

export interface LlamaShape {
  vocabSize: number;
  embeddingLength: number;
  layers: number;
  heads: number;
  kvHeads: number;
  feedForwardLength: number;
  contextLength: number;
}

/** The tokenizer.* entries of a GGUF (a vocabulary file or a model), ready to be written into a model. */
export function tokenizerEntries(path: string): GgufMetadataEntry[] {
  const meta = readGgufMetadata(path, { maxArrayLength: 1 << 24 });
  const out: GgufMetadataEntry[] = [];
  for (const [key, value] of Object.entries(meta.metadata)) {
    if (!key.startsWith('tokenizer.')) continue;
    const t = meta.types[key];
    if (t === 'string') out.push({ key, type: 'string', value: value as string });
    else if (t === 'uint32') out.push({ key, type: 'u32', value: value as number });
    else if (t === 'int32') out.push({ key, type: 'i32', value: value as number });
    else if (t === 'bool') out.push({ key, type: 'bool', value: value as boolean });
    else if (t === 'array[string]') out.push({ key, type: 'string[]', value: value as string[] });
    else if (t === 'array[float32]') out.push({ key, type: 'f32[]', value: value as number[] });
    else if (t === 'array[int32]') out.push({ key, type: 'i32[]', value: value as number[] });
    else throw new Error(`${path}: unexpected type ${t} for ${key}`);
  }
  return out;
}

export interface LlamaInitOptions {
  /** general.name */
  name: string;
  /** The GGUF whose tokenizer.* entries the model carries. */
  tokenizerPath: string;
  /** Seed of the random matrices (drawn in file order: token_embd unless given, then each layer). */
  seed: number;
  /** Token embeddings [vocab x dim] to use instead of random ones. */
  embedding?: Float32Array;
  /** Value of every output-norm weight. Default 1. */
  outputNormGain?: number;
}

/** Writes the model as F32 GGUF (llama architecture, tied embeddings, RoPE base 10000). */
export function writeLlamaInit(path: string, c: LlamaShape, o: LlamaInitOptions): void {
  const rng = new XorShift(o.seed);
  const D = c.embeddingLength;
  const hd = D / c.heads;
  const tensors: GgufTensorInput[] = [];
  const mat = (name: string, rows: number, cols: number, std: number) => {
    const data = new Float32Array(rows * cols);
    for (let i = 0; i < data.length; i++) data[i] = rng.normal() * std;
    tensors.push({ name, type: 'F32', dims: [cols, rows], data });
  };
  const fill = (name: string, n: number, v: number) => tensors.push({ name, type: 'F32', dims: [n], data: new Float32Array(n).fill(v) });
  const resid = 0.02 / Math.sqrt(2 * c.layers);
  if (o.embedding) tensors.push({ name: 'token_embd.weight', type: 'F32', dims: [D, c.vocabSize], data: o.embedding });
  else mat('token_embd.weight', c.vocabSize, D, 0.02);
  fill('output_norm.weight', D, o.outputNormGain ?? 1);
  for (let l = 0; l < c.layers; l++) {
    const p = `blk.${l}.`;
    fill(p + 'attn_norm.weight', D, 1);
    mat(p + 'attn_q.weight', c.heads * hd, D, 0.02);
    mat(p + 'attn_k.weight', c.kvHeads * hd, D, 0.02);
    mat(p + 'attn_v.weight', c.kvHeads * hd, D, 0.02);
    mat(p + 'attn_output.weight', D, c.heads * hd, resid);
    fill(p + 'ffn_norm.weight', D, 1);
    mat(p + 'ffn_gate.weight', c.feedForwardLength, D, 0.02);
    mat(p + 'ffn_up.weight', c.feedForwardLength, D, 0.02);
    mat(p + 'ffn_down.weight', D, c.feedForwardLength, resid);
  }
  writeGguf(path, {
    metadata: [
      { key: 'general.architecture', type: 'string', value: 'llama' },
      { key: 'general.name', type: 'string', value: o.name },
      { key: 'llama.context_length', type: 'u32', value: c.contextLength },
      { key: 'llama.embedding_length', type: 'u32', value: D },
      { key: 'llama.block_count', type: 'u32', value: c.layers },
      { key: 'llama.feed_forward_length', type: 'u32', value: c.feedForwardLength },
      { key: 'llama.attention.head_count', type: 'u32', value: c.heads },
      { key: 'llama.attention.head_count_kv', type: 'u32', value: c.kvHeads },
      { key: 'llama.rope.freq_base', type: 'f32', value: 10000 },
      { key: 'llama.attention.layer_norm_rms_epsilon', type: 'f32', value: 1e-5 },
      ...tokenizerEntries(o.tokenizerPath),
    ],
    tensors,
  });
}
