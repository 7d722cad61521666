// The install a user on a slim production image gets: `npm pack`, then `npm install` of the tarball
// into a fresh project with every compiler hidden from PATH, then load the package and generate.
// The CPU prebuild is this checkout's build/Release addon (CI builds native code once), staged the
// way `npm run prebuildify` lays it out; the CUDA prebuild is the cmake-js addon when it has CUDA.
import { execFileSync, spawnSync } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, mkdtempSync, realpathSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { loadModel } from '../lib/index.js';
import { packageRoot as root } from '../lib/addon.js';

const platformDir = `${process.platform}-${process.arch}`;
const cpuAddon = join(root, 'build', 'Release', 'online_specdec.node');
const cmakeAddon = join(root, 'build-cmake', 'Release', 'online_specdec.node');
const COMPILERS = ['gcc', 'g++', 'cc', 'c++', 'clang', 'clang++', 'make', 'nvcc', 'cmake', 'python3'];

function npmCli(): string | undefined {
  const fromEnv = process.env.npm_execpath;
  if (fromEnv && fromEnv.endsWith('.js') && existsSync(fromEnv)) return fromEnv;
  const r = spawnSync('sh', ['-c', 'command -v npm'], { encoding: 'utf8' });
  if (r.status !== 0) return undefined;
  const cli = join(dirname(realpathSync(r.stdout.trim())), 'npm-cli.js');
  return existsSync(cli) ? cli : undefined;
}

/** The CUDA major of the cmake-js addon when it was built with CUDA, else undefined. */
function cmakeAddonCudaMajor(): number | undefined {
  if (!existsSync(cmakeAddon)) return undefined;
  const code = `const c = require(${JSON.stringify(cmakeAddon)}).backends().find((b) => b.name === 'cuda'); process.stdout.write(String(!!(c && c.compiled)));`;
  if (spawnSync(process.execPath, ['-e', code], { encoding: 'utf8' }).stdout !== 'true') return undefined;
  const v = spawnSync('nvcc', ['--version'], { encoding: 'utf8' });
  const m = /release (\d+)\./.exec(v.stdout ?? '');
  return m ? Number(m[1]) : undefined;
}

const npm = npmCli();
const temps: string[] = [];
afterAll(() => temps.forEach((d) => rmSync(d, { recursive: true, force: true })));

describe('pack and install without compilers', () => {
  it.skipIf(!npm || !existsSync(cpuAddon))(
    'installs from the tarball with no compiler on PATH, loads, and generates what this checkout generates',
    async () => {
      const work = mkdtempSync(join(tmpdir(), 'osd-install-'));
      temps.push(work);

      // 1. Stage exactly what `npm pack` would ship, plus the prebuilds.
      const listing = JSON.parse(execFileSync(process.execPath, [npm!, 'pack', '--dry-run', '--json', '--ignore-scripts'], { cwd: root, encoding: 'utf8' }));
      const stage = join(work, 'stage');
      for (const f of listing[0].files as { path: string }[]) cpSync(join(root, f.path), join(stage, f.path));
      const cpuPrebuild = join(stage, 'prebuilds', platformDir, 'online-specdec.node');
      if (!existsSync(cpuPrebuild)) cpSync(cpuAddon, cpuPrebuild);
      const cudaMajor = cmakeAddonCudaMajor();
      if (cudaMajor !== undefined && !existsSync(join(stage, 'prebuilds', `${platformDir}-cuda${cudaMajor}`)))
        cpSync(cmakeAddon, join(stage, 'prebuilds', `${platformDir}-cuda${cudaMajor}`, 'online_specdec.node'));
      const packed = JSON.parse(execFileSync(process.execPath, [npm!, 'pack', '--json', '--ignore-scripts', '--pack-destination', work], { cwd: stage, encoding: 'utf8' }));
      const tarball = join(work, packed[0].filename);
      console.log(`tarball ${(packed[0].size / 2 ** 20).toFixed(1)} MiB, unpacked ${(packed[0].unpackedSize / 2 ** 20).toFixed(1)} MiB, ${packed[0].entryCount} files`);

      // 2. A PATH with node and sh only: no gcc, g++, cc, make, nvcc, cmake or python3.
      const bin = join(work, 'bin');
      mkdirSync(bin);
      symlinkSync(process.execPath, join(bin, 'node'));
      symlinkSync('/bin/sh', join(bin, 'sh'));
      const env = { ...process.env, PATH: bin, OSD_ADDON_PATH: '', OSD_BACKEND: '', npm_config_build_from_source: '' };
      delete env.npm_execpath;
      const hidden = spawnSync('/bin/sh', ['-c', COMPILERS.map((c) => `command -v ${c}`).join('; ')], { env, encoding: 'utf8' });
      expect(hidden.stdout.trim(), 'a compiler is still on PATH').toBe('');

      // 3. Install into a fresh project.
      const app = join(work, 'app');
      mkdirSync(app);
      writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'app', private: true, type: 'module' }));
      const inst = spawnSync(process.execPath, [npm!, 'install', tarball, '--no-audit', '--no-fund', '--foreground-scripts'], {
        cwd: app,
        env,
        encoding: 'utf8',
        timeout: 300_000,
      });
      expect(inst.status, inst.stdout + inst.stderr).toBe(0);
      expect(inst.stdout).toMatch(new RegExp(`online-specdec: using .*prebuilds/${platformDir}/online-specdec\\.node`));
      expect(existsSync(join(app, 'node_modules', 'online-specdec', 'build'))).toBe(false);

      // 4. Load it and generate, greedy, with the embedded default target.
      const script = `
        import * as osd from 'online-specdec';
        const model = await osd.loadModel(new URL('./node_modules/online-specdec/models/default-target.gguf', import.meta.url).pathname);
        const r = await model.generate({ prompt: 'The president said', maxTokens: 12 });
        await model.dispose();
        console.log(JSON.stringify({ addon: osd.addonPath, backends: osd.backends(), active: osd.activeBackend(), tokens: [...r.tokens], text: r.text }));`;
      const run = spawnSync(process.execPath, ['--input-type=module', '-e', script], { cwd: app, env, encoding: 'utf8', timeout: 120_000 });
      expect(run.status, run.stderr).toBe(0);
      const got = JSON.parse(run.stdout);
      expect(got.addon).toContain(join('prebuilds', platformDir));
      expect(got.tokens.length).toBe(12);

      const model = await loadModel(join(root, 'models', 'default-target.gguf'));
      try {
        const want = await model.generate({ prompt: 'The president said', maxTokens: 12 });
        expect(got.tokens).toEqual([...want.tokens]);
      } finally {
        await model.dispose();
      }

      // 5. With a CUDA prebuild and no driver, the CPU prebuild is used and backends() says why;
      //    OSD_BACKEND=cuda probes it in a child process and fails with the reason.
      if (cudaMajor !== undefined && !existsSync('/proc/driver/nvidia/version')) {
        const cuda = got.backends.find((b: { name: string }) => b.name === 'cuda');
        expect(cuda.detail).toMatch(new RegExp(`CUDA (\\d+, )*${cudaMajor}(, \\d+)* prebuilds? not usable: no NVIDIA driver`));
        expect(got.active.reason).toMatch(/prebuilds? not usable: no NVIDIA driver/);
        const forced = spawnSync(process.execPath, ['--input-type=module', '-e', "await import('online-specdec');"], {
          cwd: app,
          env: { ...env, OSD_BACKEND: 'cuda' },
          encoding: 'utf8',
        });
        expect(forced.status).not.toBe(0);
        expect(forced.stderr).toMatch(new RegExp(`OSD_BACKEND=cuda: .*CUDA ${cudaMajor} prebuild not usable: .*cudaError`));
      }

      // 6. The CLI works from the installed package, through the executable npm linked (npx osd).
      const cli = spawnSync(join(app, 'node_modules', '.bin', 'osd'), ['backends'], { cwd: app, env, encoding: 'utf8' });
      expect(cli.status, cli.stderr).toBe(0);
      expect(cli.stdout).toMatch(/cpu: usable/);
    },
    600_000,
  );
  if (!npm) console.warn('skipped: npm-cli.js not found');
  if (!existsSync(cpuAddon)) console.warn(`skipped: ${cpuAddon} not built`);
});
