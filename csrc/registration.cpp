// Schemas of the mtlgrad ops (namespace `mtlgrad`). One implementation file per device registers
// the kernels (cpu/ops_cpu.cpp, cuda/ops_cuda.cu); mtlgrad/ops.py registers the fake
// implementations used by torch.compile.
#include <torch/library.h>

TORCH_LIBRARY(mtlgrad, m) {
  // grads: task-major list (task 0's tensors, then task 1's, ...), same shapes for every task.
  // Returns the float64 T x T matrix of pairwise dot products, and for each task the index (within
  // its list) of the first tensor holding a NaN or Inf, or -1.
  m.def("gram(Tensor[] grads, int num_tasks) -> (Tensor gram, Tensor nonfinite)");
  // out[k] = sum_t weights[t] * grads[t * K + k], written in place.
  m.def("combine(Tensor[] grads, int num_tasks, Tensor weights, Tensor(a!)[] out) -> ()");

  // Solvers on the float64 CPU Gram matrix (csrc/solvers/), each returning float64 task weights.
  // `seed` drives a method's random choices (drawn from a torch.Generator by the caller).
  m.def("pcgrad_weights(Tensor gram, int seed) -> Tensor");
  // Returns the weights and the updated T x T EMA targets (the input targets are not modified).
  m.def("gradvac_weights(Tensor gram, Tensor targets, float beta, int seed) -> (Tensor, Tensor)");
  m.def("config_weights(Tensor gram) -> Tensor");
  m.def("aligned_mtl_weights(Tensor gram, str scale_mode) -> Tensor");
  m.def("fairgrad_weights(Tensor gram, float alpha) -> Tensor");
  m.def("cagrad_weights(Tensor gram, float c, int rescale) -> Tensor");
}
