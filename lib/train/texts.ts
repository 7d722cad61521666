// Training text from files and folders (`osd train-draft --text`): each file one document.
import { lstatSync, readdirSync, readFileSync, realpathSync, statSync } from 'node:fs';
import { join } from 'node:path';

export interface Texts {
  documents: string[];
  files: number;
  bytes: number;
  /** Files left out: binary (a NUL byte in their first 8 KiB) or empty. */
  skipped: number;
}

/**
 * Reads every file named, and every file below every folder named (dot entries, node_modules and
 * symbolic links inside folders left out: a link loop cannot recurse), in sorted order, each file
 * once. Binary and empty files are skipped; a path that does not exist, or no
 * text at all, is an Error naming it.
 */
export function readTexts(paths: readonly string[]): Texts {
  const out: Texts = { documents: [], files: 0, bytes: 0, skipped: 0 };
  // A file named twice (corpus/*.txt --text corpus) is read once: a copy could land in the held-out set.
  const seen = new Set<string>();
  const visit = (path: string, named: boolean) => {
    let st;
    try {
      st = named ? statSync(path) : lstatSync(path);
    } catch {
      throw new Error(`--text: ${path} does not exist`);
    }
    if (st.isDirectory()) {
      for (const name of readdirSync(path).sort()) {
        if (name.startsWith('.') || name === 'node_modules') continue;
        visit(join(path, name), false);
      }
      return;
    }
    if (!st.isFile()) {
      if (named) throw new Error(`--text: ${path} is not a file or a folder`);
      return;
    }
    const real = realpathSync(path);
    if (seen.has(real)) return;
    seen.add(real);
    const buf = readFileSync(path);
    if (buf.length === 0 || buf.subarray(0, 8192).includes(0)) {
      out.skipped++;
      return;
    }
    out.documents.push(buf.toString('utf8'));
    out.files++;
    out.bytes += buf.length;
  };
  for (const p of paths) visit(p, true);
  if (out.files === 0) throw new Error(`--text: no text found in ${paths.join(', ')}${out.skipped ? ` (${out.skipped} binary or empty files skipped)` : ''}`);
  return out;
}
