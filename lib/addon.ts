// Loads the native addon: OSD_ADDON_PATH if set; else a CUDA prebuild whose CUDA version the
// installed driver supports (probed in a child process); else the CPU build through node-gyp-build
// (build/Release, or a prebuild in prebuilds/<platform>-<arch>). A failure explains what was tried
// and how to fix it.
import { createRequire } from 'node:module';
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { NativeAddon } from './addonTypes.js';

const require = createRequire(import.meta.url);

/** The package root: lib/ and dist/ both sit directly below it. */
export const packageRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..');

/** A CUDA prebuild: prebuilds/<platform>-<arch>-cuda<major>/online_specdec.node. */
interface CudaPrebuild {
  major: number;
  path: string;
}

/** CUDA prebuilds shipped with the package, newest CUDA first. They sit outside node-gyp-build's
 *  prebuilds/<platform>-<arch>/ folder on purpose: it ignores tags it does not know and could pick one. */
export function cudaPrebuilds(root = packageRoot): CudaPrebuild[] {
  const dir = join(root, 'prebuilds');
  if (!existsSync(dir)) return [];
  const re = new RegExp(`^${process.platform}-${process.arch}-cuda(\\d+)$`);
  const found: CudaPrebuild[] = [];
  for (const name of readdirSync(dir)) {
    const m = re.exec(name);
    const path = join(dir, name, 'online_specdec.node');
    if (m && existsSync(path)) found.push({ major: Number(m[1]), path });
  }
  return found.sort((a, b) => b.major - a.major);
}

/** Why no NVIDIA driver can be there, or undefined when one may be (then only a probe can tell). */
function noDriverReason(): string | undefined {
  if (process.platform !== 'linux') return undefined;
  // The kernel module's file: device nodes alone can outlive an unloaded driver.
  return existsSync('/proc/driver/nvidia/version') ? undefined : 'no NVIDIA driver (no /proc/driver/nvidia/version)';
}

/**
 * Loads a CUDA prebuild in a child process first and asks it whether CUDA is usable: a broken
 * driver can then only take down the child, never the host server.
 */
function probeCuda(path: string): { usable: boolean; detail: string } {
  const code =
    `const a = require(${JSON.stringify(path)});` +
    "const c = a.backends().find((b) => b.name === 'cuda');" +
    'process.stdout.write(JSON.stringify(c ?? { usable: false, detail: "no cuda backend in this build" }));';
  const r = spawnSync(process.execPath, ['-e', code], { encoding: 'utf8', timeout: 20_000, env: { ...process.env, OSD_BACKEND: 'cpu' } });
  if (r.status === 0) {
    try {
      const c = JSON.parse(r.stdout) as { usable: boolean; detail: string };
      return { usable: c.usable === true, detail: String(c.detail) };
    } catch {
      /* fall through */
    }
  }
  const how = r.error ? r.error.message : r.signal ? `killed by ${r.signal}` : `exit code ${r.status}`;
  return { usable: false, detail: `the probe process failed (${how}): ${(r.stderr || '').trim().split('\n').pop() ?? ''}` };
}

/** What the loader decided about CUDA prebuilds (shown by backends() when the CPU build was loaded). */
export const loaderNotes: string[] = [];

/** A reason for not using CUDA, with what the loader found out about the CUDA prebuilds. */
export function withLoaderNotes(reason: string): string {
  return loaderNotes.length ? `${reason}; ${loaderNotes.join('; ')}` : reason;
}

function load(): { addon: NativeAddon; path: string } {
  const tried: string[] = [];
  const override = process.env.OSD_ADDON_PATH;
  if (override) {
    try {
      return { addon: require(resolve(override)) as NativeAddon, path: resolve(override) };
    } catch (e) {
      throw new Error(
        `online-specdec: OSD_ADDON_PATH=${override} could not be loaded: ${(e as Error).message}\n` +
          'Unset OSD_ADDON_PATH to use the bundled build.',
      );
    }
  }
  // A CUDA prebuild when the driver supports it (OSD_BACKEND=cpu skips them), else the CPU build.
  const wanted = process.env.OSD_BACKEND;
  const cuda = wanted === 'cpu' ? [] : cudaPrebuilds();
  // Without a driver the probe is skipped, unless OSD_BACKEND=cuda insists on hearing CUDA's own reason.
  const noDriver = cuda.length > 0 && wanted !== 'cuda' ? noDriverReason() : undefined;
  if (noDriver) loaderNotes.push(`CUDA ${cuda.map((p) => p.major).join(', ')} prebuild${cuda.length > 1 ? 's' : ''} not usable: ${noDriver}`);
  for (const p of noDriver ? [] : cuda) {
    const probe = probeCuda(p.path);
    if (probe.usable) {
      try {
        return { addon: require(p.path) as NativeAddon, path: p.path };
      } catch (e) {
        loaderNotes.push(`CUDA ${p.major} prebuild: ${(e as Error).message.split('\n')[0]}`);
        continue;
      }
    }
    loaderNotes.push(`CUDA ${p.major} prebuild not usable: ${probe.detail}`);
  }
  try {
    const nodeGypBuild = require('node-gyp-build') as { (dir: string): unknown; resolve(dir: string): string };
    const path = nodeGypBuild.resolve(packageRoot);
    return { addon: require(path) as NativeAddon, path };
  } catch (e) {
    tried.push(`node-gyp-build in ${packageRoot} (prebuilds/${process.platform}-${process.arch}, build/Release): ${(e as Error).message.split('\n')[0]}`);
  }
  const cmakeBuild = join(packageRoot, 'build-cmake', 'Release', 'online_specdec.node');
  if (existsSync(cmakeBuild)) {
    try {
      return { addon: require(cmakeBuild) as NativeAddon, path: cmakeBuild };
    } catch (e) {
      tried.push(`${cmakeBuild}: ${(e as Error).message.split('\n')[0]}`);
    }
  }
  throw new Error(
    'online-specdec: the native addon could not be loaded.\nTried:\n' +
      tried.map((t) => `  - ${t}`).join('\n') +
      '\nPossible solutions:\n' +
      '  - Rebuild it from source: `npm rebuild online-specdec` (needs python3, make and a C++17 compiler).\n' +
      '    npm 12 and newer skip a dependency\'s install script unless your package.json allows it:\n' +
      '    "allowScripts": { "online-specdec": true }.\n' +
      `  - Check that a prebuild exists for ${process.platform}-${process.arch} (Node-API 8).\n` +
      '  - Point OSD_ADDON_PATH at a built online_specdec.node.',
  );
}

const loaded = load();

// The kernels' backend is chosen once at load: OSD_BACKEND (cpu | cuda | auto), default auto.
// selectBackend() in backend.ts changes it later; a bad or unusable OSD_BACKEND fails loudly here.
{
  const env = process.env.OSD_BACKEND || 'auto';
  try {
    loaded.addon.selectBackend(env);
  } catch (e) {
    throw new Error(`online-specdec: OSD_BACKEND=${env}: ${withLoaderNotes((e as Error).message)}`);
  }
}

/** The raw native module. Prefer the typed wrappers exported from the package root. */
export const addon: NativeAddon = loaded.addon;
/** Where the addon was loaded from. */
export const addonPath: string = loaded.path;
