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
  int64_t num_tensors = 0;             // per task
  std::vector<int64_t> offsets;        // num_tensors + 1 prefix sums of the tensor sizes
  std::vector<at::ScalarType> dtypes;  // per tensor k: the dtype of every task's tensor k
  at::ScalarType dtype = at::kFloat;   // tensor 0's (the only one unless dtypes are per tensor)
  c10::Device device = c10::kCPU;

  int64_t numel_per_task() const { return offsets.back(); }
};

// Whether the tensors of a task may have different dtypes (tensor k of every task having the
// dtype of task 0's tensor k, e.g. a bf16 trunk with fp32 norm layers), or must all share one.
enum class DTypes { One, PerTensor };

// Checks the list (count, dtypes, devices, shapes) and returns its layout. `op` names the op in
// error messages, e.g. "mtlgrad.gram".
TaskGradLayout check_task_grads(const char* op, at::TensorList grads, int64_t num_tasks,
                                DTypes dtypes = DTypes::One);

// The tensors of one dtype: the kernels run once per group, each over a task-major list of the
// group's tensors only (`offsets` within the group).
struct DTypeGroup {
  at::ScalarType dtype;
  std::vector<int64_t> tensors;  // indices k (within a task's list), ascending
  std::vector<int64_t> offsets;  // tensors.size() + 1 prefix sums of their sizes

  int64_t numel_per_task() const { return offsets.back(); }
  // The group's entries of a task-major list of T * K pointers (task_major) or of a list of K
  // (one per tensor, e.g. the outputs).
  template <typename P>
  std::vector<P> task_major(const std::vector<P>& all, int64_t num_tasks, int64_t num_tensors) const {
    std::vector<P> picked;
    picked.reserve(static_cast<size_t>(num_tasks) * tensors.size());
    for (int64_t t = 0; t < num_tasks; ++t)
      for (const int64_t k : tensors) picked.push_back(all[t * num_tensors + k]);
    return picked;
  }
  template <typename P>
  std::vector<P> per_tensor(const std::vector<P>& all) const {
    std::vector<P> picked;
    picked.reserve(tensors.size());
    for (const int64_t k : tensors) picked.push_back(all[k]);
    return picked;
  }
};

// The groups of tensors by dtype, in the order of each dtype's first tensor; tensors without
// elements are left out (so are groups without any). One group for a list of one dtype.
std::vector<DTypeGroup> dtype_groups(const TaskGradLayout& layout);

// Checks one output per tensor of a task: output k has the shape, dtype and device of tensor k.
void check_outputs(const char* op, const TaskGradLayout& layout, at::TensorList grads, at::TensorList out);

// Checks combine's weights (1-D, num_tasks floats, on `device`) and outputs.
void check_combine_args(const TaskGradLayout& layout, at::TensorList grads, const at::Tensor& weights,
                        at::TensorList out, c10::Device weights_device);

// Raw pointers to contiguous versions of the tensors; non-contiguous ones are copied (the copies
// are kept alive in `keep`).
std::vector<const void*> contiguous_pointers(at::TensorList tensors, std::vector<at::Tensor>& keep);

// Where an op writes output k: out[k] itself when it is contiguous and shares no memory with any
// task's tensor k (the kernels read the inputs while they write), else a fresh tensor in
// `staged[k]`, to be copied into out[k] afterwards (see copy_staged). With `accumulate` (an op
// that adds to out) a staged output starts as a contiguous copy of out[k].
std::vector<void*> output_pointers(const TaskGradLayout& layout, at::TensorList grads, at::TensorList out,
                                   std::vector<at::Tensor>& staged, bool accumulate = false);

// out[k].copy_(staged[k]) for every staged output.
void copy_staged(at::TensorList out, const std::vector<at::Tensor>& staged);

}  // namespace mtlgrad
