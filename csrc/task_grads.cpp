#include "task_grads.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>

namespace mtlgrad {
namespace {

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

TaskGradLayout check_task_grads(const char* op, at::TensorList grads, int64_t num_tasks, DTypes dtypes) {
  TORCH_CHECK_VALUE(num_tasks >= 1, op, ": num_tasks must be at least 1, got ", num_tasks);
  const int64_t n = static_cast<int64_t>(grads.size());
  TORCH_CHECK_VALUE(n % num_tasks == 0, op, ": got ", n, " tensors for num_tasks=", num_tasks,
                    "; grads must hold the same number of tensors for every task, task-major "
                    "(task 0's tensors, then task 1's, ...)");
  TaskGradLayout layout;
  layout.num_tasks = num_tasks;
  layout.num_tensors = n / num_tasks;
  layout.offsets.assign(static_cast<size_t>(layout.num_tensors) + 1, 0);
  if (n == 0) return layout;

  const at::Tensor& first = grads[0];
  layout.dtype = first.scalar_type();
  layout.device = first.device();
  const int64_t K = layout.num_tensors;
  for (int64_t t = 0; t < num_tasks; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      const at::Tensor& g = grads[t * K + k];
      TORCH_CHECK_VALUE(g.defined(), op, ": tensor ", k, " of task ", t, " is undefined (None)");
      TORCH_CHECK_VALUE(g.layout() == at::kStrided, op, ": tensor ", k, " of task ", t, " has layout ",
                        g.layout(), "; only dense (strided) tensors are supported");
      TORCH_CHECK_TYPE(supported_dtype(g.scalar_type()), op, ": tensor ", k, " of task ", t, " has dtype ",
                       g.scalar_type(), "; expected float32, float64, float16 or bfloat16");
      if (dtypes == DTypes::One) {
        TORCH_CHECK_TYPE(g.scalar_type() == layout.dtype, op, ": mixed dtypes: tensor ", k, " of task ", t,
                         " is ", g.scalar_type(), " but tensor 0 of task 0 is ", layout.dtype,
                         "; cast the gradients to one dtype");
      } else {
        TORCH_CHECK_TYPE(g.scalar_type() == grads[k].scalar_type(), op, ": mixed dtypes: tensor ", k,
                         " of task ", t, " is ", g.scalar_type(), " but tensor ", k, " of task 0 is ",
                         grads[k].scalar_type(), "; every task's tensor k must have the dtype of task 0's");
      }
      TORCH_CHECK_VALUE(g.device() == layout.device, op, ": mixed devices: tensor ", k, " of task ", t,
                        " is on ", g.device(), " but tensor 0 of task 0 is on ", layout.device);
      const at::Tensor& ref = grads[k];
      TORCH_CHECK_VALUE(g.sizes() == ref.sizes(), op, ": tensor ", k, " of task ", t, " has shape ",
                        g.sizes(), " but tensor ", k, " of task 0 has shape ", ref.sizes(),
                        "; every task must list the same shapes in the same order");
    }
  }
  layout.dtypes.resize(static_cast<size_t>(K));
  for (int64_t k = 0; k < K; ++k) {
    layout.offsets[k + 1] = layout.offsets[k] + grads[k].numel();
    layout.dtypes[k] = grads[k].scalar_type();
  }
  return layout;
}

std::vector<DTypeGroup> dtype_groups(const TaskGradLayout& layout) {
  std::vector<DTypeGroup> groups;
  for (int64_t k = 0; k < layout.num_tensors; ++k) {
    const int64_t n = layout.offsets[k + 1] - layout.offsets[k];
    if (n == 0) continue;
    auto group = std::find_if(groups.begin(), groups.end(),
                              [&](const DTypeGroup& g) { return g.dtype == layout.dtypes[k]; });
    if (group == groups.end()) group = groups.insert(groups.end(), DTypeGroup{layout.dtypes[k], {}, {0}});
    group->tensors.push_back(k);
    group->offsets.push_back(group->offsets.back() + n);
  }
  return groups;
}

void check_outputs(const char* op, const TaskGradLayout& layout, at::TensorList grads, at::TensorList out) {
  const int64_t K = layout.num_tensors;
  TORCH_CHECK_VALUE(static_cast<int64_t>(out.size()) == K, op, ": got ", out.size(), " output tensors for ",
                    K, " tensors per task; out needs one tensor per gradient tensor of a task");
  for (int64_t k = 0; k < K; ++k) {
    const at::Tensor& o = out[k];
    TORCH_CHECK_VALUE(o.defined(), op, ": output ", k, " is undefined (None)");
    TORCH_CHECK_VALUE(o.layout() == at::kStrided, op, ": output ", k, " has layout ", o.layout(),
                      "; only dense (strided) tensors are supported");
    TORCH_CHECK_VALUE(o.sizes() == grads[k].sizes(), op, ": output ", k, " has shape ", o.sizes(),
                      " but tensor ", k, " of each task has shape ", grads[k].sizes());
    TORCH_CHECK_TYPE(o.scalar_type() == layout.dtypes[k], op, ": output ", k, " has dtype ", o.scalar_type(),
                     " but tensor ", k, " of each task is ", layout.dtypes[k]);
    TORCH_CHECK_VALUE(o.device() == layout.device, op, ": output ", k, " is on ", o.device(),
                      " but the gradients are on ", layout.device);
  }
}

void check_combine_args(const TaskGradLayout& layout, at::TensorList grads, const at::Tensor& weights,
                        at::TensorList out, c10::Device weights_device) {
  const char* op = "mtlgrad.combine";
  const int64_t T = layout.num_tasks;
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.numel() == T, op, ": weights must have shape [", T,
                    "] (one per task), got ", weights.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(weights.scalar_type()), op,
                   ": weights must be a floating-point tensor, got ", weights.scalar_type());
  TORCH_CHECK_VALUE(weights.device() == weights_device, op, ": weights are on ", weights.device(),
                    " but must be on ", weights_device);
  check_outputs(op, layout, grads, out);
}

std::vector<const void*> contiguous_pointers(at::TensorList tensors, std::vector<at::Tensor>& keep) {
  std::vector<const void*> ptrs(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (tensors[i].is_contiguous()) {
      ptrs[i] = tensors[i].data_ptr();
    } else {
      keep.push_back(tensors[i].contiguous());
      ptrs[i] = keep.back().data_ptr();
    }
  }
  return ptrs;
}

std::vector<void*> output_pointers(const TaskGradLayout& layout, at::TensorList grads, at::TensorList out,
                                   std::vector<at::Tensor>& staged, bool accumulate) {
  const int64_t K = layout.num_tensors;
  staged.assign(static_cast<size_t>(K), at::Tensor());
  std::vector<void*> ptrs(static_cast<size_t>(K));
  for (int64_t k = 0; k < K; ++k) {
    bool direct = out[k].is_contiguous();
    for (int64_t t = 0; direct && t < layout.num_tasks; ++t)
      direct = at::get_overlap_status(out[k], grads[t * K + k]) == at::MemOverlapStatus::No;
    if (!direct) {
      staged[k] = accumulate ? out[k].clone(at::MemoryFormat::Contiguous)
                             : at::empty(out[k].sizes(), out[k].options());
    }
    ptrs[k] = direct ? out[k].data_ptr() : staged[k].data_ptr();
  }
  return ptrs;
}

void copy_staged(at::TensorList out, const std::vector<at::Tensor>& staged) {
  for (size_t k = 0; k < staged.size(); ++k)
    if (staged[k].defined()) out[k].copy_(staged[k]);
}

}  // namespace mtlgrad
