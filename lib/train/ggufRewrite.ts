// A byte-level GGUF rewriter: reads a file's key/value entries and tensor table, and writes a new
// file that keeps chosen entries (raw bytes, so every value type survives), overrides a few, and
// copies chosen tensors as they are stored (quantised blocks included), whole or row by row, next to
// new F32 tensors. Used to cut drafts out of a target (early exit, restricted heads).
import { closeSync, fsyncSync, openSync, readSync, renameSync, rmSync, writeSync, fstatSync } from 'node:fs';

/** Block size and bytes per block of the GGML tensor types (ids as in ggml.h). */
export const GGML_TYPES: Record<number, { name: string; block: number; bytes: number }> = {
  0: { name: 'F32', block: 1, bytes: 4 },
  1: { name: 'F16', block: 1, bytes: 2 },
  2: { name: 'Q4_0', block: 32, bytes: 18 },
  3: { name: 'Q4_1', block: 32, bytes: 20 },
  6: { name: 'Q5_0', block: 32, bytes: 22 },
  7: { name: 'Q5_1', block: 32, bytes: 24 },
  8: { name: 'Q8_0', block: 32, bytes: 34 },
  10: { name: 'Q2_K', block: 256, bytes: 84 },
  11: { name: 'Q3_K', block: 256, bytes: 110 },
  12: { name: 'Q4_K', block: 256, bytes: 144 },
  13: { name: 'Q5_K', block: 256, bytes: 176 },
  14: { name: 'Q6_K', block: 256, bytes: 210 },
  20: { name: 'IQ4_NL', block: 32, bytes: 18 },
  23: { name: 'IQ4_XS', block: 256, bytes: 136 },
  30: { name: 'BF16', block: 1, bytes: 2 },
};

export interface GgufKv {
  key: string;
  /** The entry's bytes after the key: value type (u32) and value. */
  raw: Buffer;
}

export interface GgufTensor {
  name: string;
  dims: number[];
  type: number;
  /** Absolute file offset of the data. */
  fileOffset: number;
  nBytes: number;
  /** Bytes of one row (dims[0] elements). */
  rowBytes: number;
}

export interface GgufFile {
  path: string;
  version: number;
  alignment: number;
  kvs: GgufKv[];
  tensors: GgufTensor[];
}

class Reader {
  pos = 0;
  constructor(private fd: number, private buf: Buffer) {}
  ensure(n: number): void {
    if (this.pos + n <= this.buf.length) return;
    const next = Buffer.alloc(Math.max(this.buf.length * 2, this.pos + n + (1 << 20)));
    const have = this.buf.length;
    this.buf.copy(next);
    readSync(this.fd, next, have, next.length - have, have);
    this.buf = next;
  }
  u32(): number {
    this.ensure(4);
    const v = this.buf.readUInt32LE(this.pos);
    this.pos += 4;
    return v;
  }
  u64(): number {
    this.ensure(8);
    const v = Number(this.buf.readBigUInt64LE(this.pos));
    this.pos += 8;
    return v;
  }
  str(): string {
    const n = this.u64();
    this.ensure(n);
    const s = this.buf.toString('utf8', this.pos, this.pos + n);
    this.pos += n;
    return s;
  }
  skipValue(type: number): void {
    const fixed: Record<number, number> = { 0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8 };
    if (type in fixed) {
      this.ensure(fixed[type]!);
      this.pos += fixed[type]!;
    } else if (type === 8) this.str();
    else if (type === 9) {
      const et = this.u32();
      const n = this.u64();
      if (et in fixed) {
        this.ensure(n * fixed[et]!);
        this.pos += n * fixed[et]!;
      } else for (let i = 0; i < n; i++) this.skipValue(et);
    } else throw new Error(`GGUF: unknown value type ${type}`);
  }
  slice(a: number, b: number): Buffer {
    return Buffer.from(this.buf.subarray(a, b));
  }
  peekU32(at: number): number {
    return this.buf.readUInt32LE(at);
  }
}

/** Reads the key/value entries and the tensor table of a GGUF v2/v3 file. */
export function readGgufLayout(path: string): GgufFile {
  const fd = openSync(path, 'r');
  try {
    const r = new Reader(fd, Buffer.alloc(0));
    r.ensure(24);
    if (r.u32() !== 0x46554747) throw new Error(`${path}: not a GGUF file`);
    const version = r.u32();
    if (version < 2) throw new Error(`${path}: GGUF v${version} is not supported`);
    const nTensors = r.u64();
    const nKv = r.u64();
    const kvs: GgufKv[] = [];
    let alignment = 32;
    for (let i = 0; i < nKv; i++) {
      const key = r.str();
      const start = r.pos;
      const type = r.u32();
      r.skipValue(type);
      const raw = r.slice(start, r.pos);
      if (key === 'general.alignment' && type === 4) alignment = raw.readUInt32LE(4);
      kvs.push({ key, raw });
    }
    const infos: Array<{ name: string; dims: number[]; type: number; offset: number }> = [];
    for (let i = 0; i < nTensors; i++) {
      const name = r.str();
      const nd = r.u32();
      const dims: number[] = [];
      for (let d = 0; d < nd; d++) dims.push(r.u64());
      const type = r.u32();
      const offset = r.u64();
      infos.push({ name, dims, type, offset });
    }
    const dataStart = Math.ceil(r.pos / alignment) * alignment;
    const size = fstatSync(fd).size;
    const tensors = infos.map((t) => {
      const ti = GGML_TYPES[t.type];
      if (!ti) throw new Error(`${path}: ${t.name} has unknown type ${t.type}`);
      const rowBytes = (t.dims[0]! / ti.block) * ti.bytes;
      const rows = t.dims.slice(1).reduce((a, b) => a * b, 1);
      const nBytes = rowBytes * rows;
      if (dataStart + t.offset + nBytes > size) throw new Error(`${path}: ${t.name} runs past the end of the file`);
      return { name: t.name, dims: t.dims, type: t.type, fileOffset: dataStart + t.offset, nBytes, rowBytes };
    });
    return { path, version, alignment, kvs, tensors };
  } finally {
    closeSync(fd);
  }
}

/** Reads a tensor's stored bytes (or the given rows of it, in that order). */
export function readTensorBytes(file: GgufFile, name: string, rows?: ArrayLike<number>): Buffer {
  const t = file.tensors.find((x) => x.name === name);
  if (!t) throw new Error(`${file.path}: no tensor ${name}`);
  const fd = openSync(file.path, 'r');
  try {
    if (!rows) {
      const b = Buffer.alloc(t.nBytes);
      readSync(fd, b, 0, t.nBytes, t.fileOffset);
      return b;
    }
    const b = Buffer.alloc(t.rowBytes * rows.length);
    for (let i = 0; i < rows.length; i++) readSync(fd, b, i * t.rowBytes, t.rowBytes, t.fileOffset + rows[i]! * t.rowBytes);
    return b;
  } finally {
    closeSync(fd);
  }
}

function halfToFloat(h: number): number {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 0x1f;
  const f = h & 0x3ff;
  if (e === 0) return s * f * 2 ** -24;
  if (e === 31) return f ? NaN : s * Infinity;
  return s * (1 + f / 1024) * 2 ** (e - 15);
}

/** Dequantises stored rows (F32, F16, Q8_0, Q4_0 or Q4_1) of `cols` elements each. */
export function dequantizeRows(bytes: Buffer, type: number, cols: number): Float32Array {
  const ti = GGML_TYPES[type]!;
  const rows = bytes.length / ((cols / ti.block) * ti.bytes);
  const out = new Float32Array(rows * cols);
  const nb = out.length / ti.block;
  if (type === 0) out.set(new Float32Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.length)));
  else if (type === 1) for (let i = 0; i < out.length; i++) out[i] = halfToFloat(bytes.readUInt16LE(2 * i));
  else if (type === 8)
    for (let b = 0; b < nb; b++) {
      const d = halfToFloat(bytes.readUInt16LE(34 * b));
      for (let j = 0; j < 32; j++) out[32 * b + j] = d * bytes.readInt8(34 * b + 2 + j);
    }
  else if (type === 2 || type === 3) {
    const q1 = type === 3;
    const bs = ti.bytes;
    const qo = q1 ? 4 : 2;
    for (let b = 0; b < nb; b++) {
      const o = bs * b;
      const d = halfToFloat(bytes.readUInt16LE(o));
      const m = q1 ? halfToFloat(bytes.readUInt16LE(o + 2)) : 0;
      for (let j = 0; j < 16; j++) {
        const q = bytes[o + qo + j]!;
        out[32 * b + j] = q1 ? d * (q & 15) + m : d * ((q & 15) - 8);
        out[32 * b + j + 16] = q1 ? d * (q >> 4) + m : d * ((q >> 4) - 8);
      }
    }
  } else throw new Error(`dequantizeRows: type ${ti.name} is not supported`);
  return out;
}

/** Raw value bytes of a u32 entry (type tag + value). */
export function kvU32(v: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeUInt32LE(4, 0);
  b.writeUInt32LE(v >>> 0, 4);
  return b;
}

export function kvString(s: string): Buffer {
  const sb = Buffer.from(s, 'utf8');
  const b = Buffer.alloc(12 + sb.length);
  b.writeUInt32LE(8, 0);
  b.writeBigUInt64LE(BigInt(sb.length), 4);
  sb.copy(b, 12);
  return b;
}

export interface OutTensor {
  name: string;
  dims: number[];
  type: number;
  data: Buffer;
}

/** Writes a GGUF v3 file atomically (temp file, fsync, rename). */
export function writeGgufRaw(path: string, kvs: GgufKv[], tensors: OutTensor[], alignment = 32): void {
  const parts: Buffer[] = [];
  const head = Buffer.alloc(24);
  head.writeUInt32LE(0x46554747, 0);
  head.writeUInt32LE(3, 4);
  head.writeBigUInt64LE(BigInt(tensors.length), 8);
  head.writeBigUInt64LE(BigInt(kvs.length), 16);
  parts.push(head);
  const strBuf = (s: string) => {
    const sb = Buffer.from(s, 'utf8');
    const b = Buffer.alloc(8 + sb.length);
    b.writeBigUInt64LE(BigInt(sb.length), 0);
    sb.copy(b, 8);
    return b;
  };
  for (const kv of kvs) parts.push(strBuf(kv.key), kv.raw);
  let offset = 0;
  const offsets: number[] = [];
  for (const t of tensors) {
    offsets.push(offset);
    offset = Math.ceil((offset + t.data.length) / alignment) * alignment;
  }
  for (const [i, t] of tensors.entries()) {
    const b = Buffer.alloc(4 + 8 * t.dims.length + 4 + 8);
    b.writeUInt32LE(t.dims.length, 0);
    t.dims.forEach((d, j) => b.writeBigUInt64LE(BigInt(d), 4 + 8 * j));
    b.writeUInt32LE(t.type, 4 + 8 * t.dims.length);
    b.writeBigUInt64LE(BigInt(offsets[i]!), 8 + 8 * t.dims.length);
    parts.push(strBuf(t.name), b);
  }
  const headerLen = parts.reduce((a, b) => a + b.length, 0);
  parts.push(Buffer.alloc(Math.ceil(headerLen / alignment) * alignment - headerLen));
  const tmp = `${path}.tmp-${process.pid}`;
  const fd = openSync(tmp, 'w');
  try {
    try {
      for (const p of parts) writeSync(fd, p);
      let pos = 0;
      for (const [i, t] of tensors.entries()) {
        if (offsets[i]! > pos) writeSync(fd, Buffer.alloc(offsets[i]! - pos));
        writeSync(fd, t.data);
        pos = offsets[i]! + t.data.length;
      }
      if (offset > pos) writeSync(fd, Buffer.alloc(offset - pos));
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    renameSync(tmp, path);
  } catch (e) {
    rmSync(tmp, { force: true }); // a failed write leaves no partial file beside the target
    throw e;
  }
}
