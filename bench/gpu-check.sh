#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU, nvcc, CMake and Ninja (Node is not needed): builds the
# native CUDA parity tests and benchmarks with plain CMake, runs them, and copies what they print to
# $OUT when it is set (packed, see below; else to bench/results/). Meant to finish in well under 8
# minutes, build included.
#
#   bash bench/gpu-check.sh            # sm_90 only (H100 / H200); GPU_ARCH=80 etc. for other GPUs
#   JOBS=16 bash bench/gpu-check.sh
#   PREV_SRC=path/to/earlier/checkout bash bench/gpu-check.sh
#                                      # also builds and runs the earlier version's bench_cuda first, on
#                                      # the same device, and prints each row's speedup over it
#
# The engine is compiled with -ffp-contract=off so the CPU reference rounds exactly as the CUDA
# kernels do (no fused multiply-adds); without it the parity test cpu_reference_rounds_without_contraction
# fails and the GPU may pick a different token than the CPU when a float sum differs in its last bit.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
arch="${GPU_ARCH:-90}"
jobs="${JOBS:-$(nproc 2>/dev/null || echo 4)}"
build="${BUILD_DIR:-build-gpu}"
# With $OUT (the device tool's folder, which brings back at most 8 files) the logs go to a folder
# that is packed into $OUT/gpu-check.tgz at the end, beside copies of the three main outputs.
if [ -n "${OUT:-}" ]; then dest="$(mktemp -d)/gpu-check"; else dest=bench/results; fi
mkdir -p "$dest"
pack() {
  [ -n "${OUT:-}" ] || return 0
  tar czf "$OUT/gpu-check.tgz" -C "$(dirname "$dest")" gpu-check
  for f in test_cuda.txt bench_cuda.txt bench_cuda.json bench_model_pass.txt bench_model_pass.json; do [ -f "$dest/$f" ] && cp "$dest/$f" "$OUT/"; done
  return 0
}
trap pack EXIT
log() { echo "[gpu-check $(($(date +%s) - start))s] $*"; }

log "host: $(uname -srm), $(nproc) cores"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$dest/gpu-check-device.txt"
else
  log "nvidia-smi not found"
fi
command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -2

log "configure (CMAKE_CUDA_ARCHITECTURES=$arch)"
cmake -S . -B "$build" -G Ninja -DOSD_CUDA=ON -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$arch" \
  -DCMAKE_CXX_FLAGS="-ffp-contract=off" >"$dest/gpu-check-configure.txt" 2>&1 || {
  tail -30 "$dest/gpu-check-configure.txt"
  log "configure failed"
  exit 1
}
log "build test_cuda test_backend bench_cuda bench_model_pass with $jobs jobs"
if ! cmake --build "$build" --target test_cuda test_backend bench_cuda bench_model_pass -j "$jobs" >"$dest/gpu-check-build.txt" 2>&1; then
  tail -40 "$dest/gpu-check-build.txt"
  log "build failed"
  exit 1
fi
log "built"

status=0
log "test_cuda"
timeout 300 "$build/test_cuda" 2>&1 | tee "$dest/test_cuda.txt"
rc=${PIPESTATUS[0]}
[ "$rc" -ne 0 ] && status=$rc && log "test_cuda exited with $rc"

# The model pass's graph replays and batched passes under compute-sanitizer's memcheck (a stale or
# freed pointer baked into a graph would read memory the bits cannot show).
if command -v compute-sanitizer >/dev/null 2>&1; then
  for t in model_pass_graphs model_pass_is_batch_invariant; do
    log "compute-sanitizer memcheck: test_cuda $t"
    timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 "$build/test_cuda" "$t" 2>&1 | tail -15 |
      tee -a "$dest/test_cuda_memcheck.txt"
    rc=${PIPESTATUS[0]}
    [ "$rc" -ne 0 ] && status=$rc && log "memcheck of $t exited with $rc"
  done
else
  log "compute-sanitizer not found: memcheck skipped"
fi

log "test_backend"
timeout 60 "$build/test_backend" 2>&1 | tee "$dest/test_backend.txt"
rc=${PIPESTATUS[0]}
[ "$rc" -ne 0 ] && status=$rc && log "test_backend exited with $rc"

baseline=()
if [ -n "${PREV_SRC:-}" ]; then
  log "previous version: build bench_cuda from $PREV_SRC"
  if cmake -S "$PREV_SRC" -B "$build-prev" -G Ninja -DOSD_CUDA=ON -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_CUDA_ARCHITECTURES="$arch" -DCMAKE_CXX_FLAGS="-ffp-contract=off" >"$dest/gpu-check-prev-build.txt" 2>&1 &&
    cmake --build "$build-prev" --target bench_cuda -j "$jobs" >>"$dest/gpu-check-prev-build.txt" 2>&1; then
    log "previous version: bench_cuda"
    timeout 180 "$build-prev/bench_cuda" --json "$dest/bench_cuda_prev.json" >"$dest/bench_cuda_prev.txt" 2>&1 &&
      baseline=(--baseline "$dest/bench_cuda_prev.json")
  else
    tail -20 "$dest/gpu-check-prev-build.txt"
    log "previous version did not build; no baseline"
  fi
fi

log "bench_cuda"
timeout 180 "$build/bench_cuda" --json "$dest/bench_cuda.json" "${baseline[@]}" 2>&1 | tee "$dest/bench_cuda.txt"
rc=${PIPESTATUS[0]}
[ "$rc" -ne 0 ] && status=$rc && log "bench_cuda exited with $rc"

log "bench_model_pass"
timeout 240 "$build/bench_model_pass" --json "$dest/bench_model_pass.json" 2>&1 | tee "$dest/bench_model_pass.txt"
rc=${PIPESTATUS[0]}
[ "$rc" -ne 0 ] && status=$rc && log "bench_model_pass exited with $rc"

log "done (status $status); outputs in ${OUT:+$OUT/gpu-check.tgz from }$dest"
exit $status
