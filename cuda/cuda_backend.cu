// CudaBackend: the Backend contract on the GPU. Host pointers in; inputs are staged into device
// buffers that grow and are reused; one stream; one call at a time (a mutex).
// Build (standalone check of this file): nvcc -std=c++17 -O3 -arch=sm_90 -I native -c cuda/cuda_backend.cu
// Parity: test/native/test_cuda.cu runs every method against cpu_backend().
#include <algorithm>
#include <cstring>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "adamw.cuh"
#include "core/error.h"
#include "cuda_backend.h"
#include "distill.cuh"
#include "tree_kv.cuh"
#include "verify.cuh"

#ifndef OSD_CUDA_ARCHS
#define OSD_CUDA_ARCHS ""
#endif

namespace osd {

namespace cuda {

[[noreturn]] void throw_cuda(cudaError_t e, const char* what, const char* file, int line) {
  const char* base = std::strrchr(file, '/');
  throw_state(std::string("CUDA error: ") + what + " failed with " + cudaGetErrorName(e) + " (" +
              cudaGetErrorString(e) + ") at " + (base ? base + 1 : file) + ":" + std::to_string(line));
}

}  // namespace cuda

using cuda::DeviceBuffer;

namespace {

template <class T>
T* stage(DeviceBuffer& buf, const T* host, size_t count, cudaStream_t s) {
  T* d = buf.as<T>(std::max<size_t>(count, 1));
  if (count) OSD_CUDA_CHECK(cudaMemcpyAsync(d, host, count * sizeof(T), cudaMemcpyHostToDevice, s));
  return d;
}

template <class T>
void fetch(T* host, const T* dev, size_t count, cudaStream_t s) {
  if (count) OSD_CUDA_CHECK(cudaMemcpyAsync(host, dev, count * sizeof(T), cudaMemcpyDeviceToHost, s));
}

__global__ void probe_kernel(int* out) { *out = 42; }

}  // namespace

struct CudaBackend::Impl {
  std::mutex mu;
  cudaStream_t stream = nullptr;
  cuda::Workspace ws;
  DeviceBuffer a, b, c, d, e, o1, o2, o3;
  cudaDeviceProp prop{};
};

CudaBackend::CudaBackend() : impl_(new Impl) {
  int dev = 0;
  OSD_CUDA_CHECK(cudaGetDevice(&dev));
  OSD_CUDA_CHECK(cudaGetDeviceProperties(&impl_->prop, dev));
  OSD_CUDA_CHECK(cudaStreamCreateWithFlags(&impl_->stream, cudaStreamNonBlocking));
}

CudaBackend::~CudaBackend() {
  if (impl_ && impl_->stream) cudaStreamDestroy(impl_->stream);
}

std::string CudaBackend::device_name() const {
  const cudaDeviceProp& p = impl_->prop;
  return std::string(p.name) + " (sm_" + std::to_string(p.major) + std::to_string(p.minor) + ", " +
         std::to_string(p.multiProcessorCount) + " SMs)";
}

void CudaBackend::verify_chain_batch(const ChainBatch& in, ChainBatchOut& out, Fault fault) {
  validate_chain_batch(in);
  std::lock_guard<std::mutex> lock(impl_->mu);
  Impl& I = *impl_;
  cudaStream_t s = I.stream;
  const int32_t B = in.batch, V = in.vocab;
  size_t nt = 0, nd = 0;
  bool sampled = false;
  for (int32_t b = 0; b < B; ++b) nt += in.lengths[b] + 1, nd += in.lengths[b], sampled |= !in.sampling[b].greedy();
  if (sampled && nd > 0 && !in.draft) throw_range("draftLogits are required unless every sequence is greedy");
  cuda::ChainBatchDevice d;
  d.target = stage(I.a, in.target, nt * V, s);
  d.draft = (sampled && in.draft) ? stage(I.b, in.draft, nd * V, s) : nullptr;
  d.tokens = stage(I.c, in.tokens, nd, s);
  d.lengths = in.lengths;
  d.streams = in.streams;
  d.sampling = in.sampling;
  d.batch = B;
  d.vocab = V;
  d.seed = in.seed;
  d.accepted = I.o1.as<int32_t>(std::max(B, 1));
  d.out_tokens = I.o2.as<int32_t>(std::max<size_t>(nt, 1));
  std::vector<cuda::RowOrigin> origins;
  cuda::chain_verify_launch(d, fault, I.ws, s, &origins);
  std::vector<int32_t> acc(B), toks(nt);
  fetch(acc.data(), d.accepted, B, s);
  fetch(toks.data(), d.out_tokens, nt, s);
  const std::string err = cuda::first_row_error(I.ws, origins, s, false);
  if (!err.empty()) throw_range(err);
  size_t off = 0;
  for (int32_t b = 0; b < B; ++b) {
    // Every row is valid here, so every sequence has 0 <= accepted <= g; anything else is a kernel
    // fault, reported instead of copying past the sequence's tokens.
    if (acc[b] < 0 || acc[b] > in.lengths[b])
      throw_state("CUDA chain verification returned accepted = " + std::to_string(acc[b]) + " for sequence " +
                  std::to_string(b));
    out.accepted[b] = acc[b];
    for (int32_t i = 0; i <= acc[b]; ++i) out.tokens[off + i] = toks[off + i];
    off += in.lengths[b] + 1;
  }
}

void CudaBackend::verify_tree_batch(TreeBatchItem* items, int32_t count, uint64_t seed, Fault fault) {
  for (int32_t r = 0; r < count; ++r) {
    validate_tree(items[r].in);
    validate_sampling(items[r].sampling, count > 1 ? "sampling[" + std::to_string(r) + "]" : "sampling");
  }
  std::lock_guard<std::mutex> lock(impl_->mu);
  Impl& I = *impl_;
  cudaStream_t s = I.stream;
  size_t nt = 0, nd = 0, nout = 0;
  for (int32_t r = 0; r < count; ++r) {
    const TreeBatchItem& it = items[r];
    const bool use_draft = !it.sampling.greedy() && it.mode != TreeChildren::Deterministic;
    if (use_draft && !it.in.draft) throw_range("draftLogits are required for sampled trees with drawn children");
    nt += static_cast<size_t>(it.in.n + 1) * it.in.vocab;
    nd += use_draft ? static_cast<size_t>(it.in.n + 1) * it.in.vocab : 0;
    nout += 2 * static_cast<size_t>(it.in.n) + 3;
  }
  float* t = I.a.as<float>(std::max<size_t>(nt, 1));
  float* dr = I.b.as<float>(std::max<size_t>(nd, 1));
  int32_t* outs = I.o1.as<int32_t>(std::max<size_t>(nout, 1));
  std::vector<cuda::TreeRequestDevice> reqs(count);
  size_t to = 0, dof = 0, oo = 0;
  for (int32_t r = 0; r < count; ++r) {
    const TreeBatchItem& it = items[r];
    const size_t rows = static_cast<size_t>(it.in.n + 1) * it.in.vocab;
    const bool use_draft = !it.sampling.greedy() && it.mode != TreeChildren::Deterministic;
    cuda::TreeRequestDevice& q = reqs[r];
    q.parents = it.in.parents;
    q.tokens = it.in.tokens;
    q.n = it.in.n;
    q.vocab = it.in.vocab;
    q.sampling = it.sampling;
    q.mode = it.mode;
    q.stream = it.stream;
    OSD_CUDA_CHECK(cudaMemcpyAsync(t + to, it.in.target, rows * sizeof(float), cudaMemcpyHostToDevice, s));
    q.target = t + to;
    to += rows;
    if (use_draft) {
      OSD_CUDA_CHECK(cudaMemcpyAsync(dr + dof, it.in.draft, rows * sizeof(float), cudaMemcpyHostToDevice, s));
      q.draft = dr + dof;
      dof += rows;
    }
    q.out_counts = outs + oo;
    q.out_tokens = outs + oo + 2;
    q.out_path = outs + oo + 3 + it.in.n;
    oo += 2 * static_cast<size_t>(it.in.n) + 3;
  }
  std::vector<cuda::RowOrigin> origins;
  cuda::tree_verify_launch(reqs.data(), count, seed, fault, I.ws, s, &origins);
  std::vector<int32_t> host(nout);
  fetch(host.data(), outs, nout, s);
  const std::string err = cuda::first_row_error(I.ws, origins, s, true);
  if (!err.empty()) throw_range(err);
  oo = 0;
  for (int32_t r = 0; r < count; ++r) {
    TreeBatchItem& it = items[r];
    const int32_t* h = host.data() + oo;
    it.result.path_len = h[0];
    it.result.emitted = h[1];
    for (int32_t i = 0; i < h[1]; ++i) it.out[i] = h[2 + i];
    for (int32_t i = 0; i < h[0]; ++i) it.path[i] = h[3 + it.in.n + i];
    oo += 2 * static_cast<size_t>(it.in.n) + 3;
  }
}

TreeResult CudaBackend::verify_tree(const TreeInput& in, const Sampling& s, TreeChildren mode, uint64_t seed,
                                    uint64_t stream, int32_t* path, int32_t* out, Fault fault) {
  TreeBatchItem it;
  it.in = in;
  it.sampling = s;
  it.mode = mode;
  it.stream = stream;
  it.path = path;
  it.out = out;
  verify_tree_batch(&it, 1, seed, fault);
  return it.result;
}

void CudaBackend::warp_rows(const float* logits, int32_t rows, int32_t vocab, const Sampling& smp, float* probs) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  Impl& I = *impl_;
  cudaStream_t s = I.stream;
  const size_t n = static_cast<size_t>(rows) * vocab;
  const float* dl = stage(I.a, logits, n, s);
  float* dp = I.o1.as<float>(std::max<size_t>(n, 1));
  std::vector<cuda::RowOrigin> origins;
  cuda::warp_rows_launch(dl, rows, vocab, smp, dp, I.ws, s, &origins);
  fetch(probs, dp, n, s);
  const std::string err = cuda::first_row_error(I.ws, origins, s, false, "logits");
  if (!err.empty()) throw_range(err);
}

double CudaBackend::distill_loss(const DistillInput& in, float* grad) {
  validate_distill(in);
  std::lock_guard<std::mutex> lock(impl_->mu);
  Impl& I = *impl_;
  cudaStream_t s = I.stream;
  int32_t counted = 0;
  for (int32_t r = 0; r < in.rows; ++r) counted += (!in.mask || in.mask[r]) ? 1 : 0;
  const size_t n = static_cast<size_t>(in.rows) * in.vocab;
  cuda::DistillDevice d;
  d.kind = in.kind;
  d.rows = in.rows;
  d.vocab = in.vocab;
  d.temperature = in.temperature;
  d.beta = in.beta;
  d.student = stage(I.a, in.student, n, s);
  d.mask = in.mask ? stage(I.e, in.mask, in.rows, s) : nullptr;
  if (in.teacher) {
    d.teacher = stage(I.b, in.teacher, n, s);
  } else {
    const size_t nk = static_cast<size_t>(in.rows) * in.k;
    d.topk_ids = stage(I.c, in.topk_ids, nk, s);
    d.topk_probs = stage(I.d, in.topk_probs, nk, s);
    d.residual = in.residual ? stage(I.o3, in.residual, in.rows, s) : nullptr;
    d.k = in.k;
  }
  d.scale = counted > 0 ? 1.0f / static_cast<float>(counted) : 0.0f;
  d.grad = grad ? I.o1.as<float>(std::max<size_t>(n, 1)) : nullptr;
  d.row_loss = I.o2.as<double>(std::max(in.rows, 1));
  int32_t* row_bad = I.ws.misc.as<int32_t>(std::max(in.rows, 1));
  d.row_bad = row_bad;
  cuda::distill_launch(d, I.ws, s);
  std::vector<double> loss(in.rows);
  std::vector<int32_t> bad(in.rows);
  fetch(loss.data(), d.row_loss, in.rows, s);
  fetch(bad.data(), row_bad, in.rows, s);
  if (grad) fetch(grad, d.grad, n, s);
  OSD_CUDA_CHECK(cudaStreamSynchronize(s));
  for (int32_t r = 0; r < in.rows; ++r)
    if (bad[r])
      throw_range(std::string(bad[r] == 1 ? "studentLogits" : "teacherLogits") + " row " + std::to_string(r) +
                  " contains NaN or Infinity");
  if (counted == 0) return 0.0;
  double total = 0.0;
  for (double l : loss) total += l;
  return total / counted;
}

void CudaBackend::adamw_step(float* params, const float* grads, float* m, float* v, size_t n, const AdamWConfig& c) {
  validate_adamw(c);
  std::lock_guard<std::mutex> lock(impl_->mu);
  Impl& I = *impl_;
  cudaStream_t s = I.stream;
  float* dp = stage(I.a, params, n, s);
  const float* dg = stage(I.b, grads, n, s);
  float* dm = stage(I.c, m, n, s);
  float* dv = stage(I.d, v, n, s);
  cuda::adamw_launch(dp, dg, dm, dv, n, c, s);
  fetch(params, dp, n, s);
  fetch(m, dm, n, s);
  fetch(v, dv, n, s);
  OSD_CUDA_CHECK(cudaStreamSynchronize(s));
}

double CudaBackend::global_norm(const float* x, size_t n) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  Impl& I = *impl_;
  cudaStream_t s = I.stream;
  const float* dx = stage(I.a, x, n, s);
  const int parts = cuda::sum_squares_launch(dx, n, I.ws, s);
  std::vector<double> part(parts);
  fetch(part.data(), static_cast<const double*>(I.ws.misc.get()), parts, s);
  OSD_CUDA_CHECK(cudaStreamSynchronize(s));
  double t = 0.0;
  for (double p : part) t += p;
  return std::sqrt(t);
}

void CudaBackend::tree_mask(const int32_t* parents, int32_t n, int32_t base, int32_t* positions, uint32_t* mask,
                            int32_t words) {
  for (int32_t i = 0; i < n; ++i)
    if (parents[i] < -1 || parents[i] >= i)
      throw_range("treeParents[" + std::to_string(i) + "] = " + std::to_string(parents[i]) +
                  " must be -1 or an earlier index in the batch");
  if (words * 32 < n) throw_range("tree_mask: words must be at least ceil(n / 32)");
  std::lock_guard<std::mutex> lock(impl_->mu);
  Impl& I = *impl_;
  cudaStream_t s = I.stream;
  const int32_t meta[3] = {0, n, base};
  int32_t* dmeta = stage(I.c, meta, 3, s);
  cuda::TreeMaskBatch b;
  b.parents = stage(I.a, parents, n, s);
  b.node_offset = dmeta;
  b.base = dmeta + 2;
  b.count = 1;
  b.total_nodes = n;
  b.words = words;
  b.positions = I.o1.as<int32_t>(std::max(n, 1));
  b.mask = I.o2.as<uint32_t>(std::max<size_t>(static_cast<size_t>(n) * words, 1));
  cuda::tree_mask_launch(b, s);
  fetch(positions, b.positions, n, s);
  fetch(mask, b.mask, static_cast<size_t>(n) * words, s);
  OSD_CUDA_CHECK(cudaStreamSynchronize(s));
}

void CudaBackend::kv_keep_path(float* k, float* v, int32_t slots, int32_t kv_dim, int32_t base, const int32_t* path,
                               int32_t len) {
  if (base < 0 || base > slots) throw_range("keep_path: base is outside the sequence");
  for (int32_t i = 0; i < len; ++i)
    if (path[i] < 0 || base + path[i] >= slots)
      throw_range("keep_path: path[" + std::to_string(i) + "] is not an evaluated node");
  std::lock_guard<std::mutex> lock(impl_->mu);
  Impl& I = *impl_;
  cudaStream_t s = I.stream;
  const size_t n = static_cast<size_t>(slots) * kv_dim;
  cuda::KvPathJob job;
  float* dk = stage(I.a, k, n, s);
  float* dv = stage(I.b, v, n, s);
  job.k = reinterpret_cast<uint16_t*>(dk), job.v = reinterpret_cast<uint16_t*>(dv);
  job.row_stride = 2 * int64_t(kv_dim);  // a float is two 16-bit units
  job.kv_dim = 2 * kv_dim;
  job.base = base;
  job.path_offset = 0;
  job.len = len;
  const int32_t* dpath = stage(I.c, path, len, s);
  const cuda::KvPathJob* djob = stage(I.d, &job, 1, s);
  cuda::kv_keep_path_launch(djob, 1, dpath, 2 * kv_dim, s);
  fetch(k, dk, n, s);
  fetch(v, dv, n, s);
  OSD_CUDA_CHECK(cudaStreamSynchronize(s));
}

namespace {

std::string describe_error(cudaError_t e) {
  std::string detail = std::string(cudaGetErrorName(e)) + " (" + cudaGetErrorString(e) + ")";
  switch (e) {
    case cudaErrorInsufficientDriver:
      return "no usable CUDA driver: " + detail;
    case cudaErrorNoDevice:
      return "no CUDA device: " + detail;
    default:
      return "CUDA is not usable: " + detail;
  }
}

}  // namespace

std::string cuda_backend_targets() {
  std::string list = OSD_CUDA_ARCHS, real, ptx;
  std::stringstream ss(list);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    const size_t dash = item.find('-');
    const std::string num = item.substr(0, dash), kind = dash == std::string::npos ? "" : item.substr(dash + 1);
    if (kind != "virtual") real += (real.empty() ? "sm_" : ", sm_") + num;
    if (kind != "real") ptx += (ptx.empty() ? "compute_" : ", compute_") + num;
  }
  if (real.empty() && ptx.empty()) return "unknown targets";
  return real + (ptx.empty() ? "" : " + PTX " + ptx);
}

Backend* cuda_backend_or_null(std::string* why) {
  static std::mutex mu;
  static bool probed = false;
  static CudaBackend* instance = nullptr;
  static std::string reason;
  std::lock_guard<std::mutex> lock(mu);
  if (!probed) {
    probed = true;
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
      reason = describe_error(e);
      cudaGetLastError();
    } else if (n == 0) {
      reason = "no CUDA device";
    } else {
      cudaDeviceProp prop{};
      e = cudaGetDeviceProperties(&prop, 0);
      int* flag = nullptr;
      int host = 0;
      if (e == cudaSuccess) e = cudaSetDevice(0);
      if (e == cudaSuccess) e = cudaMalloc(&flag, sizeof(int));
      if (e == cudaSuccess) {
        probe_kernel<<<1, 1>>>(flag);
        e = cudaGetLastError();
        if (e == cudaSuccess) e = cudaMemcpy(&host, flag, sizeof(int), cudaMemcpyDeviceToHost);
        cudaFree(flag);
      }
      if (e != cudaSuccess || host != 42) {
        reason = "compiled for " + cuda_backend_targets() + ", device " + std::string(prop.name) + " is sm_" +
                 std::to_string(prop.major) + std::to_string(prop.minor) + ": " +
                 (e != cudaSuccess ? describe_error(e) : std::string("probe kernel did not run"));
        cudaGetLastError();
      } else {
        try {
          instance = new CudaBackend();
        } catch (const std::exception& ex) {
          reason = ex.what();
          instance = nullptr;
        }
      }
    }
  }
  if (!instance && why) *why = reason;
  return instance;
}

}  // namespace osd
