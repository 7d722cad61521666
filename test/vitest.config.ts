import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vitest/config';

export default defineConfig({
  // TypeScript in CommonJS files too (lib/threadPool.cts, which the osd executable loads before the pool starts).
  oxc: { include: /\.(m?ts|cts|[jt]sx)$/ },
  test: {
    root: fileURLToPath(new URL('..', import.meta.url)),
    include: ['test/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    // The native code already uses both cores; one test file at a time keeps the machine responsive.
    fileParallelism: false,
  },
});
