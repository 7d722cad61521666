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
  const internalFailures = new Map(); // ctest test number -> failures the binary itself reported
  for (const line of out.split('\n')) {
    const m = /^(\d+): (\d+) passed, (\d+) failed(?:, (\d+) skipped)?$/.exec(line.trim());
    if (m) {
      passed += Number(m[2]);
      failed += Number(m[3]);
      skipped += Number(m[4] ?? 0);
      internalFailures.set(m[1], Number(m[3]));
    }
    if (/^\d+: (FAIL|  FAIL|skip)/.test(line.trim())) console.log(line);
    // A binary that crashed, was not built or failed without saying so still counts as a failure.
    const r = /Test\s+#(\d+): (\S+) \.+\s*(\*\*\*)?(.+?)\s+[\d.]+ sec/.exec(line);
    if (r) {
      console.log(line);
      if (r[4] !== 'Passed' && !internalFailures.get(r[1])) {
        console.log(`FAIL ${r[2]}: ${r[4]}`);
        failed += 1;
      }
    }
  }
  if (ctest.error) {
    console.log(out, ctest.error);
    failed += 1;
  }
}

// Fuzz: a short libFuzzer run of the GGUF reader over the kept corpus (needs clang with libFuzzer;
// skipped where it is missing). OSD_FUZZ_SECONDS sets the length (default 20; 0 skips).
const fuzzSeconds = Number(process.env.OSD_FUZZ_SECONDS ?? 20);
const clang = spawnSync('clang++', ['--version'], { encoding: 'utf8' });
if (fuzzSeconds <= 0 || clang.error || clang.status !== 0) {
  console.log(`skip fuzz_gguf: ${fuzzSeconds <= 0 ? 'OSD_FUZZ_SECONDS=0' : 'clang++ not found (apt-get install clang libclang-rt-14-dev)'}`);
  skipped += 1;
} else {
  const bin = join(buildDir, 'fuzz_gguf');
  const work = join(buildDir, 'fuzz_work');
  mkdirSync(work, { recursive: true });
  const build = spawnSync(
    'clang++',
    ['-std=c++17', '-g', '-O1', '-fsanitize=fuzzer,address,undefined', '-fno-sanitize-recover=undefined', '-Inative',
      'test/fuzz/fuzz_gguf.cpp', 'native/io/gguf.cpp', 'native/io/file.cpp', '-o', bin],
    { cwd: root, encoding: 'utf8' },
  );
  if (build.status !== 0) {
    console.log(`FAIL fuzz_gguf: build failed\n${build.stderr}`);
    failed += 1;
  } else {
    const run = spawnSync(bin, [`-max_total_time=${fuzzSeconds}`, '-max_len=4096', '-malloc_limit_mb=512', '-print_final_stats=1', work, 'test/fuzz/corpus'], {
      cwd: root,
      encoding: 'utf8',
    });
    const stats = /stat::number_of_executed_units:\s*(\d+)/.exec(run.stderr ?? '');
    if (run.status === 0) {
      console.log(`ok   fuzz_gguf: ${stats?.[1] ?? '?'} inputs in ${fuzzSeconds} s, no crash`);
      passed += 1;
    } else {
      console.log(`FAIL fuzz_gguf (exit ${run.status}):\n${(run.stderr ?? '').split('\n').slice(-40).join('\n')}`);
      failed += 1;
    }
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
