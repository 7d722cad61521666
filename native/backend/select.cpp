#include "backend/select.h"

#include <atomic>
#include <mutex>
#include <stdexcept>

#include "core/thread_pool.h"

namespace osd {

namespace {

struct Device {
  std::string name;
  DeviceProbe probe = nullptr;
  std::string targets;
};

struct Registry {
  std::mutex mu;
  std::vector<Device> devices;
  BackendChoice active{&cpu_backend(), "cpu", "the CPU reference (default)"};
};

Registry& registry() {
  static Registry r;
  return r;
}

std::atomic<Backend*> g_current{nullptr};

// The device backends this engine has code for, whether or not this binary was linked with them.
const char* const kKnownDevices[] = {"cuda"};

const Device* find_device(const std::vector<Device>& devices, const std::string& name) {
  for (const Device& d : devices)
    if (d.name == name) return &d;
  return nullptr;
}

std::string cpu_detail() {
  const int n = default_threads();
  return "C++ reference, " + std::to_string(n) + (n == 1 ? " thread" : " threads");
}

}  // namespace

void register_device(const std::string& name, DeviceProbe probe, const std::string& targets) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  for (Device& d : r.devices)
    if (d.name == name) {
      d = {name, probe, targets};
      return;
    }
  r.devices.push_back({name, probe, targets});
}

std::vector<BackendInfo> backend_infos() {
  Registry& r = registry();
  std::vector<Device> devices;
  {
    std::lock_guard<std::mutex> lock(r.mu);
    devices = r.devices;
  }
  std::vector<BackendInfo> out{{"cpu", true, true, cpu_detail()}};
  for (const char* known : kKnownDevices) {
    const Device* d = find_device(devices, known);
    if (!d) {
      out.push_back({known, false, false, "not compiled into this addon (built without " + std::string(known) + ")"});
      continue;
    }
    std::string why;
    Backend* be = d->probe(&why);
    out.push_back({d->name, true, be != nullptr,
                   "compiled for " + d->targets + (be ? "" : ", not usable: " + why)});
  }
  return out;
}

BackendChoice resolve_backend(const std::string& requested) {
  if (requested == "cpu") return {&cpu_backend(), "cpu", "requested"};
  if (requested != "auto" && requested != "cuda")
    throw std::invalid_argument("backend must be 'cpu', 'cuda' or 'auto', got '" + requested + "'");
  Registry& r = registry();
  Device cuda;
  {
    std::lock_guard<std::mutex> lock(r.mu);
    if (const Device* d = find_device(r.devices, "cuda")) cuda = *d;
  }
  std::string why = "not compiled into this addon (built without cuda)";
  if (cuda.probe) {
    if (Backend* be = cuda.probe(&why)) return {be, requested, requested == "auto" ? "a CUDA device is usable" : "requested"};
    why = "compiled for " + cuda.targets + ", not usable: " + why;
  }
  if (requested == "cuda") throw std::runtime_error("the cuda backend cannot be used: " + why);
  return {&cpu_backend(), "auto", "cuda " + why};
}

BackendChoice select_backend(const std::string& requested) {
  BackendChoice c = resolve_backend(requested);
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  r.active = c;
  g_current.store(c.backend, std::memory_order_release);
  return c;
}

BackendChoice active_backend() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  return r.active;
}

Backend& current_backend() {
  Backend* be = g_current.load(std::memory_order_acquire);
  return be ? *be : cpu_backend();
}

}  // namespace osd
