// The package surface: the CLI, the loader's error message, and the exports.
import { execFileSync, spawnSync } from 'node:child_process';
import { cpSync, readFileSync, statSync, symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import * as osd from '../lib/index.js';
import { tempDir } from './helpers/tmp.js';

const root = join(import.meta.dirname, '..');
const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'));

describe('package', () => {
  it('exports the kernels and reports the CPU backend', () => {
    for (const name of ['verifyChain', 'verifyChainBatch', 'verifyTree', 'distillLoss', 'adamwStep', 'backends']) {
      expect(typeof (osd as Record<string, unknown>)[name]).toBe('function');
    }
    expect(osd.version).toBe(pkg.version);
    const cpu = osd.backends().find((b) => b.name === 'cpu');
    expect(cpu).toMatchObject({ compiled: true, usable: true });
  });

  it('osd prints the version and the backends', () => {
    const out = execFileSync(process.execPath, ['--import', 'tsx', join(root, 'lib/cli.ts')], { encoding: 'utf8' });
    expect(out).toContain(`online-specdec ${pkg.version}`);
    expect(out).toMatch(/cpu: usable/);
    expect(out).toMatch(/cuda: (usable, compiled for|compiled for .*not usable: |not compiled into this addon)/);
    expect(out).toMatch(/kernels run on: (cpu|cuda) \(auto: /);
    const json = JSON.parse(
      execFileSync(process.execPath, ['--import', 'tsx', join(root, 'lib/cli.ts'), 'backends', '--json'], {
        encoding: 'utf8',
      }),
    );
    expect(json.version).toBe(pkg.version);
    expect(json.backends[0].name).toBe('cpu');
    expect(json.active.requested).toBe('auto');
  });

  it('osd -v, --version and help', () => {
    const cli = (...args: string[]) => spawnSync(process.execPath, ['--import', 'tsx', join(root, 'lib/cli.ts'), ...args], { encoding: 'utf8' });
    for (const flag of ['-v', '--version']) {
      const r = cli(flag);
      expect(r.status).toBe(0);
      expect(r.stdout).toContain(`online-specdec ${pkg.version}`);
    }
    const h = cli('help');
    expect(h.status).toBe(0);
    expect(h.stdout).toContain('Usage: osd');
    expect(h.stderr).toBe('');
  });

  it('osd convert writes a model in another storage type and says what each tensor became', async () => {
    const cli = (...args: string[]) => spawnSync(process.execPath, ['--import', 'tsx', join(root, 'lib/cli.ts'), ...args], { encoding: 'utf8' });
    const dir = tempDir('osd-convert-');
    const src = join(root, 'models/default-target.gguf');
    const out = join(dir, 'q8.gguf');
    const r = cli('convert', src, out, '--type', 'Q8_0', '--json');
    expect(r.status, r.stderr).toBe(0);
    const j = JSON.parse(r.stdout) as { type: string; bytesIn: number; bytesOut: number; tensorTypes: Record<string, number> };
    expect(j.type).toBe('Q8_0');
    expect(j.tensorTypes.Q8_0).toBeGreaterThan(0);
    expect(j.bytesOut).toBe(statSync(out).size);
    expect(j.bytesOut).toBeLessThan(j.bytesIn * 0.5);
    await using m = await osd.loadModel(out);
    expect(m.info.matrixType).toBe('mixed'); // Q8_0, and F16 where rows are not whole blocks
    const text = cli('convert', src, join(dir, 'iq4.gguf'), '--type', 'IQ4_XS');
    expect(text.status, text.stderr).toBe(0);
    expect(text.stdout).toMatch(/^osd: wrote .*iq4\.gguf: [\d.]+ MB \(from [\d.]+ MB\) in [\d.]+ s; tensors: .*IQ4_XS/);
    for (const [args, message] of [
      [['convert', src], 'give the model and the file to write'],
      [['convert', src, out, 'extra'], "'convert' takes two files, got also 'extra'"],
      [['convert', src, out, '--type', 'Q4_K'], "--type must be keep or one of F32, F16, BF16"],
      [['convert', src, out, '--model', 'x'], "--model is not an option of 'convert'"],
    ] as const) {
      const e = cli(...args);
      expect(e.status, args.join(' ')).toBe(2);
      expect(e.stderr).toContain(message);
    }
    const missing = cli('convert', join(dir, 'none.gguf'), out);
    expect(missing.status).toBe(1);
    expect(missing.stderr).toContain('none.gguf');
  });

  it('osd info says what a model file holds', () => {
    const cli = (...args: string[]) => spawnSync(process.execPath, ['--import', 'tsx', join(root, 'lib/cli.ts'), ...args], { encoding: 'utf8' });
    const src = join(root, 'models/default-target.gguf');
    const r = cli('info', src, '--json');
    expect(r.status, r.stderr).toBe(0);
    const j = JSON.parse(r.stdout);
    expect(j).toMatchObject({ path: src, bytes: statSync(src).size, format: 'gguf', architecture: 'llama', ropeFactors: false, headNorms: false, chatTemplate: false });
    expect(j.tensorTypes.F32).toBeGreaterThan(0);
    expect(j.tokenizer).toMatchObject({ model: 'gpt2', vocabSize: j.vocabSize });
    expect(j.layers).toBeGreaterThan(0);
    const text = cli('info', src);
    expect(text.status, text.stderr).toBe(0);
    expect(text.stdout).toMatch(/default-target\.gguf: [\d.]+ MB, GGUF/);
    expect(text.stdout).toMatch(new RegExp(`sizes +${j.layers} layers, embedding ${j.embeddingLength}`));
    expect(text.stdout).toMatch(/tokenizer +gpt2/);
    const none = cli('info');
    expect(none.status).toBe(2);
    expect(none.stderr).toContain('give a model: osd info model.gguf');
    const two = cli('info', src, src);
    expect(two.status).toBe(2);
    expect(two.stderr).toContain("'info' takes one file");
    const missing = cli('info', join(root, 'none.gguf'));
    expect(missing.status).toBe(1);
    expect(missing.stderr).toContain('none.gguf');
  });

  it("osd refuses another command's options and stray arguments (they were ignored silently)", () => {
    const cli = (...args: string[]) => spawnSync(process.execPath, ['--import', 'tsx', join(root, 'lib/cli.ts'), ...args], { encoding: 'utf8' });
    // A bad command line exits 2 (a failure while running, 1).
    const r = cli('serve', '--model', 'x.gguf');
    expect(r.status).toBe(2);
    expect(r.stderr).toContain("osd: --model is not an option of 'serve'");
    const b = cli('backends', 'extra');
    expect(b.status).toBe(2);
    expect(b.stderr).toContain("osd: 'backends' takes no arguments, got 'extra'");
    // Flag values are checked under the flag's name (the messages named the API options behind them).
    const t = cli('generate', '--max-tokens', '2.5', 'hi');
    expect(t.status).toBe(2);
    expect(t.stderr).toContain("--max-tokens must be an integer >= 1, got '2.5'");
    // Empty and non-decimal values were read as 0 and 16; sampling values are checked under the flags' names.
    for (const [flag, value, message] of [
      ['--temperature', '', "--temperature must be a number, got ''"],
      ['--max-tokens', '0x10', "--max-tokens must be a number, got '0x10'"],
      ['--top-p', '2', "--top-p must be in (0, 1], got '2'"],
      ['--temperature', '-1', "--temperature must be 0 (greedy) or a number >= 1.2e-38, got '-1'"],
    ] as const) {
      const e = cli('generate', `${flag}=${value}`, 'hi');
      expect(e.status, `${flag} ${value}`).toBe(2);
      expect(e.stderr).toContain(message);
    }
    expect(cli('generate', '--no-such-flag', 'hi').status).toBe(2);
    // --strategy: a kind and its size, checked before any model loads; only ngram runs without a draft.
    for (const [args, message] of [
      [['generate', '--strategy', 'beam', 'hi'], "--strategy must be chain[:G], tree[:NODES], adaptive[:MAX], adaptive+lookup[:MAX] or ngram[:G], got 'beam'"],
      [['generate', '--strategy', 'chain', 'hi'], '--strategy chain needs --draft PATH (only ngram runs without a draft)'],
      [['serve', '--strategy', 'tree:0'], "--strategy tree:N needs N in [1, 256], got 'tree:0'"],
    ] as const) {
      const e = cli(...args);
      expect(e.status, args.join(' ')).toBe(2);
      expect(e.stderr).toContain(message);
    }
    // Greedy n-gram lookup decoding gives the target's own tokens.
    const plain = JSON.parse(cli('generate', '--max-tokens', '24', '--json', 'Once upon a time').stdout) as { tokens: number[] };
    const looked = JSON.parse(cli('generate', '--strategy', 'ngram:3', '--max-tokens', '24', '--json', 'Once upon a time').stdout) as { tokens: number[]; stats: { drafted: number } };
    expect(looked.tokens).toEqual(plain.tokens);
    expect(looked.stats.drafted).toBeGreaterThan(0);
    // A plot folder that cannot be made fails before the demo runs (it failed after the whole run).
    const notDir = join(root, 'package.json');
    const d = cli('demo', '--requests', '1', '--max-tokens', '2', '--out', join(notDir, 'sub'));
    expect(d.status).toBe(1);
    expect(d.stderr).toContain(`--out: cannot make the folder ${join(notDir, 'sub')}`);
    expect(cli('generate', '--model', '/nonexistent.gguf', 'hi').status).toBe(1);
    expect(cli('serve', '--max-concurrent', '0').stderr).toContain("--max-concurrent must be an integer in [1, 1024], got '0'");
    expect(cli('generate', '--chat', '--template', '/nonexistent.jinja', 'hi').stderr).toContain('--template: cannot read /nonexistent.jinja');
    const dev = cli('generate', '--device', 'gpu', 'hi');
    expect(dev.status).toBe(2);
    expect(dev.stderr).toContain("--device must be cpu or cuda, got 'gpu'");
    expect(cli('info', '--device', 'cuda').stderr).toContain("--device is not an option of 'info'");
    // Where CUDA cannot run, --device cuda fails (exit 1) saying why.
    if (!osd.backends().find((b) => b.name === 'cuda')?.usable) {
      const c = cli('generate', '--device', 'cuda', '--max-tokens', '2', 'hi');
      expect(c.status).toBe(1);
      expect(c.stderr).toMatch(/device 'cuda' (needs the CUDA build|is not usable here)/);
    }
  });

  it('osd generate stops quietly when its reader goes away (osd generate ... | head)', async () => {
    const { spawn } = await import('node:child_process');
    const child = spawn(process.execPath, ['--import', 'tsx', join(root, 'lib/cli.ts'), 'generate', '--max-tokens', '400', 'Once upon a time'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d) => (stderr += d));
    await new Promise<void>((resolve) => child.stdout.once('data', () => resolve()));
    child.stdout.destroy(); // the reader is gone: the next writes fail with EPIPE
    const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
    expect(stderr).not.toContain('EPIPE');
    expect(code).toBe(0);
  });

  it('osd rejects an unknown command with usage', () => {
    const r = spawnSync(process.execPath, ['--import', 'tsx', join(root, 'lib/cli.ts'), 'frobnicate'], { encoding: 'utf8' });
    expect(r.status).toBe(2);
    expect(r.stderr).toContain("unknown command 'frobnicate'");
    expect(r.stderr).toContain('Usage: osd');
  });

  it('a broken addon path gives an error that says what was tried and how to fix it', () => {
    const r = spawnSync(
      process.execPath,
      ['--import', 'tsx', '-e', "await import('./lib/index.ts')"],
      { cwd: root, encoding: 'utf8', env: { ...process.env, OSD_ADDON_PATH: '/nonexistent/online_specdec.node' } },
    );
    expect(r.status).not.toBe(0);
    expect(r.stderr).toContain('OSD_ADDON_PATH=/nonexistent/online_specdec.node could not be loaded');
    expect(r.stderr).toContain('Unset OSD_ADDON_PATH');
  });

  it('a package with no loadable binary lists what it tried and how to build one', () => {
    // The compiled package without build/, build-cmake/ or prebuilds/, as an install whose
    // install script did not run (npm 12 skips it unless the project allows it).
    const dir = tempDir('osd-nobinary-');
    cpSync(join(root, 'dist'), join(dir, 'dist'), { recursive: true });
    cpSync(join(root, 'package.json'), join(dir, 'package.json'));
    symlinkSync(join(root, 'node_modules'), join(dir, 'node_modules'));
    const env = { ...process.env };
    delete env.OSD_ADDON_PATH;
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', "await import('./dist/index.js')"], { cwd: dir, encoding: 'utf8', env });
    expect(r.status).not.toBe(0);
    expect(r.stderr).toContain('the native addon could not be loaded');
    expect(r.stderr).toContain(`node-gyp-build in ${dir}`);
    expect(r.stderr).toContain('npm rebuild online-specdec');
    expect(r.stderr).toContain('"allowScripts": { "online-specdec": true }');
  });
});
