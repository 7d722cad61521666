#!/usr/bin/env node
// `npm test`: the native ctest suites, then the vitest suites, then one summary line that counts
// every test case of both: "N passed, N failed" (plus skipped when any were skipped).
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';

const root = new URL('..', import.meta.url).pathname;
const results = join(root, 'test-results');
mkdirSync(results, { recursive: true });
const extra = process.argv.slice(2);

let passed = 0;
let failed = 0;
let skipped = 0;

// Native: ctest runs each test/native/test_*.cpp binary; each prints "N passed, N failed".
const buildDir = join(root, 'build-cmake');
if (!existsSync(join(buildDir, 'CTestTestfile.cmake'))) {
  console.error(`native tests are not built (${buildDir} has no CTestTestfile.cmake): run \`npm run build:native-tests\``);
  failed += 1;
} else {
  const ctest = spawnSync('ctest', ['--test-dir', buildDir, '-V', '--timeout', '600'], { encoding: 'utf8' });
  const out = (ctest.stdout ?? '') + (ctest.stderr ?? '');
  let sawCounts = false;
  for (const line of out.split('\n')) {
    const m = /^\d+: (\d+) passed, (\d+) failed(?:, (\d+) skipped)?$/.exec(line.trim());
    if (m) {
      sawCounts = true;
      passed += Number(m[1]);
      failed += Number(m[2]);
      skipped += Number(m[3] ?? 0);
    }
    if (/^\d+: (FAIL|  FAIL|skip)/.test(line.trim()) || /tests passed|tests failed|Test #\d+:/.test(line)) console.log(line);
  }
  if (ctest.error || ctest.status !== 0) {
    console.log(out);
    if (!/\d+ failed/.test(out) || !sawCounts) failed += 1;  // a crash or a missing binary still counts as a failure
  }
}

// JavaScript: vitest with a JSON report for the counts.
const vitestJson = join(results, 'vitest.json');
const vitest = spawnSync(
  'npx',
  ['vitest', 'run', '--config', 'test/vitest.config.ts', '--reporter=default', '--reporter=json', `--outputFile=${vitestJson}`, ...extra],
  { cwd: root, stdio: 'inherit' },
);
if (existsSync(vitestJson)) {
  const report = JSON.parse(readFileSync(vitestJson, 'utf8'));
  passed += report.numPassedTests;
  failed += report.numFailedTests;
  skipped += report.numPendingTests + (report.numTodoTests ?? 0);
  if (vitest.status !== 0 && report.numFailedTests === 0) failed += 1;  // e.g. a suite failed to load
} else {
  failed += 1;
}

console.log(`\n${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ''}`);
process.exit(failed === 0 ? 0 : 1);
