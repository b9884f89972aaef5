#include "dispatch.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

namespace mtlgrad::cpu {
namespace {

struct Candidate {
  const char* name;
  bool (*supported)();
  const Kernels& (*kernels)();
};

bool always() { return true; }

#if defined(__x86_64__) || defined(_M_X64)
bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool has_avx512() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
const Candidate kCandidates[] = {
    {"generic", &always, &generic_kernels},
    {"avx2", &has_avx2, &avx2_kernels},
    {"avx512", &has_avx512, &avx512_kernels},
};
#else
const Candidate kCandidates[] = {{"generic", &always, &generic_kernels}};
#endif

const Candidate* find(const std::string& name) {
  for (const Candidate& c : kCandidates)
    if (name == c.name) return &c;
  return nullptr;
}

const Kernels* initial_choice() {
  if (const char* env = std::getenv("MTLGRAD_CPU_KERNELS"); env != nullptr && *env != '\0') {
    const Candidate* c = find(env);
    TORCH_CHECK(c != nullptr && c->supported(), "MTLGRAD_CPU_KERNELS=", env,
                " is not a kernel set this CPU supports (generic, avx2, avx512)");
    return &c->kernels();
  }
  const Kernels* best = nullptr;
  for (const Candidate& c : kCandidates)
    if (c.supported()) best = &c.kernels();
  return best;
}

std::atomic<const Kernels*>& current() {
  static std::atomic<const Kernels*> kernels{initial_choice()};
  return kernels;
}

}  // namespace

const Kernels& active_kernels() { return *current().load(std::memory_order_relaxed); }

std::vector<std::string> supported_kernels() {
  std::vector<std::string> names;
  for (const Candidate& c : kCandidates)
    if (c.supported()) names.emplace_back(c.name);
  return names;
}

std::string set_cpu_kernels(const std::string& name) {
  const Candidate* c = find(name);
  TORCH_CHECK_VALUE(c != nullptr, "unknown CPU kernel set '", name, "'; expected generic, avx2 or avx512");
  TORCH_CHECK_VALUE(c->supported(), "this CPU cannot run the '", name, "' kernels");
  return current().exchange(&c->kernels())->name;
}

}  // namespace mtlgrad::cpu
