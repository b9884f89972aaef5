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
  // GradDrop (csrc/cpu/graddrop_cpu.cpp): out[k] = the sign-dropped sum of grads[t * K + k] over t,
  // with per-task leak values and the uniforms drawn from Philox keyed by (seed, element index).
  // Returns, per task, the index of the first tensor holding a NaN or Inf, or -1 (all -1 without
  // check_finite); when one is found nothing is written.
  m.def(
      "graddrop(Tensor[] grads, int num_tasks, Tensor leak, int seed, bool check_finite, "
      "Tensor(a!)[] out) -> Tensor nonfinite");

  // Solvers on the float64 CPU Gram matrix (csrc/solvers/), each returning float64 task weights.
  // `seed` drives a method's random choices (drawn from a torch.Generator by the caller).
  m.def("pcgrad_weights(Tensor gram, int seed) -> Tensor");
  // `reg_eps` is added to the diagonal of G / trace(G) (TorchJD's convention); 0 solves exactly.
  m.def("upgrad_weights(Tensor gram, float reg_eps) -> Tensor");
  m.def("dualproj_weights(Tensor gram, float reg_eps) -> Tensor");
  // `normalization`: 'none', 'l2', 'loss' or 'loss+'; the last two need `losses` (T values).
  m.def("mgda_weights(Tensor gram, str normalization, Tensor? losses) -> Tensor");
  m.def("gradient_matching_weights(Tensor gram, int main) -> Tensor");
  // Nash-MTL: (alpha, weights); `start` is the previous alpha (or empty), optim_niter = 0 reuses it.
  m.def("nash_mtl_weights(Tensor gram, Tensor start, int optim_niter, float max_norm) -> (Tensor, Tensor)");
  m.def("rlw_weights(Tensor gram, int seed) -> Tensor");
  m.def("imtlg_weights(Tensor gram) -> Tensor");
  // Auxiliary-task methods: `main` is the index of the main task.
  m.def("cosine_gating_weights(Tensor gram, int main, bool weighted) -> Tensor");
  m.def("hydalearn_weights(Tensor gram, int main) -> Tensor");
  // Returns the weights and the updated T x T EMA targets (the input targets are not modified).
  m.def("gradvac_weights(Tensor gram, Tensor targets, float beta, int seed) -> (Tensor, Tensor)");
  m.def("config_weights(Tensor gram) -> Tensor");
  m.def("aligned_mtl_weights(Tensor gram, str scale_mode) -> Tensor");
  m.def("fairgrad_weights(Tensor gram, float alpha) -> Tensor");
  m.def("cagrad_weights(Tensor gram, float c, int rescale) -> Tensor");
}
