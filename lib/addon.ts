// Loads the native addon: OSD_ADDON_PATH if set, else a prebuild from prebuilds/ or a local build
// (build/Release) through node-gyp-build. A failure explains what was tried and how to fix it.
import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { NativeAddon } from './addonTypes.js';

const require = createRequire(import.meta.url);

/** The package root: lib/ and dist/ both sit directly below it. */
export const packageRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..');

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
    throw new Error(`online-specdec: OSD_BACKEND=${env}: ${(e as Error).message}`);
  }
}

/** The raw native module. Prefer the typed wrappers exported from the package root. */
export const addon: NativeAddon = loaded.addon;
/** Where the addon was loaded from. */
export const addonPath: string = loaded.path;
