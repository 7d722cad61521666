// Builds the CUDA prebuild for the nvcc on PATH (or --nvcc PATH) and puts it where the loader looks:
// prebuilds/<platform>-<arch>-cuda<major>/online_specdec.node. Covers sm_75 to sm_90 plus PTX for
// newer GPUs; the CUDA runtime is linked statically (CMakeLists.txt), so it loads without a driver.
//   npm run prebuild:cuda                         # CUDA from PATH
//   npm run prebuild:cuda -- --nvcc /usr/bin/nvcc --host-compiler clang++-14
//                                                 # Debian's CUDA 11.8 (it refuses g++ 12)
import { execFileSync, spawnSync } from 'node:child_process';
import { copyFileSync, mkdirSync, statSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const { values } = parseArgs({ options: { nvcc: { type: 'string' }, archs: { type: 'string' }, 'host-compiler': { type: 'string' } } });
const nvcc = values.nvcc ?? 'nvcc';
const archs = values.archs ?? '75-real;80-real;86-real;89-real;90-real;90-virtual';

let version;
try {
  version = /release (\d+)\.(\d+)/.exec(execFileSync(nvcc, ['--version'], { encoding: 'utf8' }));
} catch (e) {
  console.error(`prebuild:cuda: cannot run ${nvcc}: ${e.message.split('\n')[0]}`);
  process.exit(1);
}
if (!version) {
  console.error(`prebuild:cuda: cannot read the CUDA version from ${nvcc} --version`);
  process.exit(1);
}
const major = Number(version[1]);
const out = `build-prebuild-cuda${major}`;
const nvccPath = execFileSync('sh', ['-c', `command -v "${nvcc}"`], { encoding: 'utf8' }).trim();
console.log(`prebuild:cuda: CUDA ${version[1]}.${version[2]} (${nvccPath}), architectures ${archs}, into ${out}`);
const cmakeJs = join(root, 'node_modules', 'cmake-js', 'bin', 'cmake-js');
const r = spawnSync(
  process.execPath,
  [
    cmakeJs, 'build', '--out', out, '--CDOSD_CUDA=ON', `--CDCMAKE_CUDA_COMPILER=${nvccPath}`, `--CDCMAKE_CUDA_ARCHITECTURES=${archs}`,
    ...(values['host-compiler'] ? [`--CDCMAKE_CUDA_HOST_COMPILER=${values['host-compiler']}`] : []),
    '--target', 'osd_addon',
  ],
  // nvcc finds ptxas, fatbinary and nvlink on PATH: its own directory must come first.
  { cwd: root, stdio: 'inherit', env: { ...process.env, PATH: `${dirname(nvccPath)}:${process.env.PATH}` } },
);
if (r.status !== 0) process.exit(r.status ?? 1);
const dest = join(root, 'prebuilds', `${process.platform}-${process.arch}-cuda${major}`);
mkdirSync(dest, { recursive: true });
const file = join(dest, 'online_specdec.node');
copyFileSync(join(root, out, 'Release', 'online_specdec.node'), file);
spawnSync('strip', ['--strip-unneeded', file], { stdio: 'inherit' });
console.log(`prebuild:cuda: ${file} (${(statSync(file).size / 2 ** 20).toFixed(1)} MiB)`);
