// Backend selection (backend/select.h): what backends() reports and what 'cpu', 'cuda' and 'auto'
// resolve to, in a CPU-only binary (no device registered, then a device whose probe fails) and, when
// built with the CUDA backend (OSD_WITH_CUDA), with the real probe on whatever machine runs it.
#include <stdexcept>
#include <cstdio>
#include <string>
#include <vector>

#include "backend/select.h"
#include "check.h"

#ifdef OSD_WITH_CUDA
#include "cuda_backend.h"
#endif

using namespace osd;

namespace {

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

const BackendInfo* info_of(const std::vector<BackendInfo>& list, const std::string& name) {
  for (const BackendInfo& b : list)
    if (b.name == name) return &b;
  return nullptr;
}

template <typename E>
std::string error_of(const std::string& requested) {
  try {
    resolve_backend(requested);
  } catch (const E& e) {
    return e.what();
  }
  return "";
}

Backend* failing_probe(std::string* why) {
  *why = "no CUDA driver (test probe)";
  return nullptr;
}

}  // namespace

OSD_TEST(cpu_is_the_default_and_always_usable) {
  CHECK(current_backend().name() == std::string("cpu"));
  CHECK(active_backend().backend == &cpu_backend());
  auto list = backend_infos();
  CHECK(!list.empty());
  CHECK(list[0].name == std::string("cpu"));
  CHECK(list[0].compiled && list[0].usable);
  CHECK(contains(list[0].detail, " thread"));
  CHECK(resolve_backend("cpu").backend == &cpu_backend());
  CHECK(contains(error_of<std::invalid_argument>("gpu"), "'cpu', 'cuda' or 'auto'"));
}

// Nothing is registered until the addon (or test 4) does it, so this state is testable in any build.
OSD_TEST(without_cuda_compiled_auto_falls_back_and_says_why) {
  const std::vector<BackendInfo> list = backend_infos();
  const BackendInfo* cuda = info_of(list, "cuda");
  CHECK(cuda != nullptr);
  if (!cuda) return;
  CHECK(!cuda->compiled && !cuda->usable);
  CHECK(contains(cuda->detail, "not compiled"));
  BackendChoice c = resolve_backend("auto");
  CHECK(c.backend == &cpu_backend());
  CHECK(contains(c.reason, "not compiled"));
  CHECK(contains(error_of<std::runtime_error>("cuda"), "not compiled"));
}

OSD_TEST(a_device_whose_probe_fails_is_reported_with_its_reason) {
  register_device("cuda", failing_probe, "sm_80, sm_90 + PTX compute_90");
  const std::vector<BackendInfo> list = backend_infos();
  const BackendInfo* cuda = info_of(list, "cuda");
  CHECK(cuda && cuda->compiled && !cuda->usable);
  if (cuda) CHECK(cuda->detail == std::string("compiled for sm_80, sm_90 + PTX compute_90, not usable: no CUDA driver (test probe)"));
  BackendChoice c = select_backend("auto");
  CHECK(c.backend == &cpu_backend());
  CHECK(c.reason == std::string("cuda compiled for sm_80, sm_90 + PTX compute_90, not usable: no CUDA driver (test probe)"));
  CHECK(&current_backend() == &cpu_backend());
  const std::string err = error_of<std::runtime_error>("cuda");
  CHECK(contains(err, "cannot be used") && contains(err, "test probe"));
}

#ifdef OSD_WITH_CUDA
OSD_TEST(the_real_cuda_probe_decides_auto) {
  register_device("cuda", cuda_backend_or_null, cuda_backend_targets());
  std::string why;
  Backend* gpu = cuda_backend_or_null(&why);
  const std::vector<BackendInfo> list = backend_infos();
  const BackendInfo* cuda = info_of(list, "cuda");
  CHECK(cuda && cuda->compiled);
  if (!cuda) return;
  CHECK_EQ(cuda->usable, gpu != nullptr);
  CHECK(contains(cuda->detail, "compiled for "));
  BackendChoice c = select_backend("auto");
  if (gpu) {
    std::printf("  cuda usable: %s\n", cuda->detail.c_str());
    CHECK(c.backend == gpu);
    CHECK(current_backend().name() == std::string("cuda"));
    CHECK(resolve_backend("cuda").backend == gpu);
  } else {
    std::printf("  cuda not usable here: %s\n", why.c_str());
    CHECK(c.backend == &cpu_backend());
    CHECK(contains(c.reason, why));
    CHECK(contains(error_of<std::runtime_error>("cuda"), why));
  }
  select_backend("cpu");
  CHECK(&current_backend() == &cpu_backend());
}
#endif

OSD_TEST_MAIN()
