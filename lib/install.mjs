// npm's install hook (plain JavaScript: it runs before anything is compiled). A prebuild in
// prebuilds/<platform>-<arch>/ or an earlier build in build/Release that loads is used as is;
// otherwise the addon is built from source with node-gyp, saying so first, and saying what to do
// when that fails. CUDA prebuilds (prebuilds/<platform>-<arch>-cuda<N>/) are chosen at run time.
import { spawnSync } from 'node:child_process';
import { createRequire } from 'node:module';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const require = createRequire(import.meta.url);
const nodeGypBuild = require('node-gyp-build');

function usableBuild() {
  if (process.env.npm_config_build_from_source === 'true') return undefined;
  try {
    const path = nodeGypBuild.resolve(root);
    require(path);
    return path;
  } catch {
    return undefined;
  }
}

const found = usableBuild();
if (found) {
  console.log(`online-specdec: using ${found}`);
  process.exit(0);
}
console.log(
  `online-specdec: no prebuilt binary for ${process.platform}-${process.arch} (Node-API 8) loads here; ` +
    'building from source with node-gyp (needs python3, make and a C++17 compiler)',
);
const r = spawnSync(process.execPath, [require.resolve('node-gyp-build/bin.js')], {
  cwd: root,
  stdio: 'inherit',
  env: { ...process.env, npm_config_build_from_source: 'true' },
});
if (r.status !== 0) {
  console.error(
    'online-specdec: the source build failed. Either install the build tools (Debian/Ubuntu: ' +
      '`apt-get install python3 make g++`) and run `npm rebuild online-specdec`, or install on ' +
      'linux-x64, where a prebuilt binary ships with the package.',
  );
  process.exit(r.status ?? 1);
}
