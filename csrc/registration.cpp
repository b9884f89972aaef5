// Schemas of the elementwise mtlgrad ops (namespace `mtlgrad`) over task-major gradient lists. One
// implementation file per device registers their kernels (cpu/ops_cpu.cpp, cpu/graddrop_cpu.cpp,
// cuda/ops_cuda.cu); mtlgrad/ops/_fakes.py registers the fake implementations used by
// torch.compile. Each solver on the Gram matrix declares its own schema next to its
// implementation (csrc/solvers/<method>.cpp, TORCH_LIBRARY_FRAGMENT); mtlgrad/solvers derives
// their fake implementations from those schemas.
#include <torch/library.h>

TORCH_LIBRARY(mtlgrad, m) {
  // grads: task-major list (task 0's tensors, then task 1's, ...), same shapes for every task.
  // Returns the float64 T x T matrix of pairwise dot products, and for each task the index (within
  // its list) of the first tensor holding a NaN or Inf, or -1.
  m.def("gram(Tensor[] grads, int num_tasks) -> (Tensor gram, Tensor nonfinite)");
  // out[k] = sum_t weights[t] * grads[t * K + k], written in place; with accumulate,
  // out[k] += sum_t weights[t] * grads[t * K + k] in the same pass (one read and one write of out).
  m.def(
      "combine(Tensor[] grads, int num_tasks, Tensor weights, Tensor(a!)[] out, bool accumulate=False) -> "
      "()");
  // GradDrop (csrc/cpu/graddrop_cpu.cpp): out[k] = the sign-dropped sum of grads[t * K + k] over t,
  // with per-task leak values and the uniforms drawn from Philox keyed by (seed, element index).
  // Returns, per task, the index of the first tensor holding a NaN or Inf, or -1 (all -1 without
  // check_finite); when one is found nothing is written.
  m.def(
      "graddrop(Tensor[] grads, int num_tasks, Tensor leak, int seed, bool check_finite, "
      "Tensor(a!)[] out) -> Tensor nonfinite");
}
