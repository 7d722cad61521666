// Temporary directories that the tests remove themselves, passed or failed, so that runs leave
// nothing behind in the OS temp directory.
import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, onTestFinished } from 'vitest';

const remove = (dir: string) => rmSync(dir, { recursive: true, force: true });

/** A new directory for the running test, removed when it finishes. Call it inside a test. */
export function tempDir(prefix: string): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  onTestFinished(() => remove(dir));
  return dir;
}

/**
 * A directory for the tests of the enclosing describe block (or file, at the top level): made before
 * the first of them, removed after the last. Call it in the block's body, before the hooks that use it.
 * The path is chosen now but the directory made in beforeAll, because vitest runs the body of a
 * skipped block but not its hooks: a skipped block makes nothing.
 */
export function suiteTempDir(prefix: string): string {
  const dir = join(tmpdir(), prefix + randomBytes(6).toString('hex'));
  beforeAll(() => {
    mkdirSync(dir, { mode: 0o700 }); // fails if it exists, as mkdtemp would
  });
  afterAll(() => remove(dir));
  return dir;
}
