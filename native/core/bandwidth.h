// A memory-bandwidth probe: benchmarks report kernel throughput as a fraction of this, measured
// in the same process and run, because absolute times mean little on shared machines.
#pragma once
#include <cstddef>

namespace osd {

struct BandwidthResult {
  double read_bytes_per_s = 0;  // streaming read (sum) of the buffer
  double copy_bytes_per_s = 0;  // memcpy, counting read + write bytes
};

// Allocates `bytes`, touches it, then times `iterations` passes of each pattern on the default
// pool (best pass wins) and returns the rates.
BandwidthResult measure_bandwidth(size_t bytes, int iterations);

// Peak f32 multiply-add rate of the default pool: independent FMA chains in registers on every
// thread (AVX2 + FMA where the CPU has it), best of `iterations`. FLOP/s counts a multiply-add as 2.
double measure_peak_flops(int iterations);

}  // namespace osd
