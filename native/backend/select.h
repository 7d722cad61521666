// Which backend the exported kernels run on. The CPU reference is always there; a device backend
// is known only when the binary was linked with it, which registers a probe (see register_device).
// Selection: "cpu", "cuda" (an error when not usable, with the reason) or "auto" (the device when
// usable, else the CPU, with the reason kept).
#pragma once
#include <string>
#include <vector>

#include "backend/backend.h"

namespace osd {

struct BackendInfo {
  std::string name;
  bool compiled = false;
  bool usable = false;
  std::string detail;  // what it is, or why it cannot be used
};

struct BackendChoice {
  Backend* backend = nullptr;
  std::string requested;  // "cpu", "cuda" or "auto"
  std::string reason;     // why this backend was chosen (always set for "auto")
};

// A device backend compiled into this binary. probe returns the backend or null with *why set;
// targets says what it was compiled for (e.g. "sm_80, sm_86 + PTX compute_90"). Registering a name
// again replaces it.
using DeviceProbe = Backend* (*)(std::string* why);
void register_device(const std::string& name, DeviceProbe probe, const std::string& targets);

// Every backend this binary knows, compiled or not (cpu first).
std::vector<BackendInfo> backend_infos();

// Resolves a request without changing the active backend. Throws std::invalid_argument for an
// unknown name and std::runtime_error (with the reason) for "cuda" when it is not usable.
BackendChoice resolve_backend(const std::string& requested);

// Resolves and makes it the backend of the exported kernels.
BackendChoice select_backend(const std::string& requested);
BackendChoice active_backend();
// The active backend itself (lock-free: the kernels ask on every call).
Backend& current_backend();

}  // namespace osd
