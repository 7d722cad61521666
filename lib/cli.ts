#!/usr/bin/env node
// The `osd` command line.
import { parseArgs } from 'node:util';

const HELP = `Usage: osd <command> [options]

Commands:
  version     print the package version and the backends found (default)
  backends    list the compiled backends and whether each is usable here

Options:
  --json      machine-readable output
  -h, --help  show this help
`;

async function main(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: { json: { type: 'boolean' }, help: { type: 'boolean', short: 'h' } },
  });
  if (values.help) {
    process.stdout.write(HELP);
    return 0;
  }
  const command = positionals[0] ?? 'version';
  const { version, backends, addonPath } = await import('./index.js');
  switch (command) {
    case 'version':
    case 'backends': {
      const list = backends();
      if (values.json) {
        process.stdout.write(JSON.stringify({ version, addon: addonPath, backends: list }, null, 2) + '\n');
      } else {
        if (command === 'version') process.stdout.write(`online-specdec ${version}\n`);
        for (const b of list) {
          process.stdout.write(`  ${b.name}: ${b.usable ? 'usable' : 'not usable'} (${b.detail})\n`);
        }
      }
      return 0;
    }
    default:
      process.stderr.write(`osd: unknown command '${command}'\n\n${HELP}`);
      return 2;
  }
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err: unknown) => {
    process.stderr.write(`osd: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exit(1);
  },
);
