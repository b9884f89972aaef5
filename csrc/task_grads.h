// Validation and layout of the flat, task-major gradient lists that every mtlgrad op takes:
// grads = [task 0's tensors..., task 1's tensors..., ...], the same shapes in the same order for
// every task. Shared by the CPU and CUDA implementations so that both say the same thing about
// bad input.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace mtlgrad {

struct TaskGradLayout {
  int64_t num_tasks = 0;
  int64_t num_tensors = 0;       // per task
  std::vector<int64_t> offsets;  // num_tensors + 1 prefix sums of the tensor sizes
  at::ScalarType dtype = at::kFloat;
  c10::Device device = c10::kCPU;

  int64_t numel_per_task() const { return offsets.back(); }
};

// Checks the list (count, dtypes, devices, shapes) and returns its layout. `op` names the op in
// error messages, e.g. "mtlgrad.gram".
TaskGradLayout check_task_grads(const char* op, at::TensorList grads, int64_t num_tasks);

// Checks one output per tensor of a task: same shape, dtype and device as the gradients.
void check_outputs(const char* op, const TaskGradLayout& layout, at::TensorList grads, at::TensorList out);

// Checks combine's weights (1-D, num_tasks floats, on `device`) and outputs.
void check_combine_args(const TaskGradLayout& layout, at::TensorList grads, const at::Tensor& weights,
                        at::TensorList out, c10::Device weights_device);

// Raw pointers to contiguous versions of the tensors; non-contiguous ones are copied (the copies
// are kept alive in `keep`).
std::vector<const void*> contiguous_pointers(at::TensorList tensors, std::vector<at::Tensor>& keep);

// Where an op writes output k: out[k] itself when it is contiguous and shares no memory with any
// task's tensor k (the kernels read the inputs while they write), else a fresh tensor in
// `staged[k]`, to be copied into out[k] afterwards (see copy_staged).
std::vector<void*> output_pointers(const TaskGradLayout& layout, at::TensorList grads, at::TensorList out,
                                   std::vector<at::Tensor>& staged);

// out[k].copy_(staged[k]) for every staged output.
void copy_staged(at::TensorList out, const std::vector<at::Tensor>& staged);

}  // namespace mtlgrad
