// The Python extension module mtlgrad._C. Loading it registers the ops (torch.ops.mtlgrad.*);
// the module itself only carries build information and the CPU kernel selection.
#include <c10/util/Exception.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "cpu/dispatch.h"

#ifndef MTLGRAD_TORCH_VERSION
#error "MTLGRAD_TORCH_VERSION must be defined by the build"
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "mtlgrad native ops (registered as torch.ops.mtlgrad.*)";
  m.attr("torch_version") = MTLGRAD_TORCH_VERSION;
#ifdef MTLGRAD_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def(
      "cpu_kernels", []() { return std::string(mtlgrad::cpu::active_kernels().name); },
      "Name of the CPU kernel set in use (generic, avx2 or avx512).");
  m.def("supported_cpu_kernels", &mtlgrad::cpu::supported_kernels,
        "Names of the CPU kernel sets this CPU can run, narrowest first.");
  m.def(
      "set_cpu_kernels",
      [](const std::string& name) {
        try {
          return mtlgrad::cpu::set_cpu_kernels(name);
        } catch (const c10::Error& e) {
          throw pybind11::value_error(e.what_without_backtrace());
        }
      },
      pybind11::arg("name"), "Selects the CPU kernel set by name; returns the previous one.");
}
