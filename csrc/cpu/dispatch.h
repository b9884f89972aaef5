// Run-time choice of the CPU kernels: the widest instruction set this CPU supports, unless the
// environment variable MTLGRAD_CPU_KERNELS (generic, avx2, avx512) or set_cpu_kernels() says
// otherwise.
#pragma once

#include <string>
#include <vector>

#include "kernels.h"

namespace mtlgrad::cpu {

const Kernels& active_kernels();

// Names of the kernel sets this CPU can run, narrowest first.
std::vector<std::string> supported_kernels();

// Selects a kernel set by name (must be supported); returns the name of the previous one.
std::string set_cpu_kernels(const std::string& name);

}  // namespace mtlgrad::cpu
