// CPU implementations of the mtlgrad ops: argument checks, contiguity, the split of the work over
// threads and the fixed-order reduction of the per-block partial sums. The arithmetic lives in
// the per-instruction-set kernels (kernels_impl.h).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "../task_grads.h"
#include "dispatch.h"
#include "kernels.h"

namespace mtlgrad {
namespace {

cpu::DType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cpu::DType::Float32;
    case at::kDouble:
      return cpu::DType::Float64;
    case at::kHalf:
      return cpu::DType::Float16;
    case at::kBFloat16:
      return cpu::DType::BFloat16;
    default:
      TORCH_CHECK(false, "unreachable: unsupported dtype ", t);
  }
}

void check_cpu(const TaskGradLayout& layout, const char* op) {
  TORCH_CHECK_VALUE(layout.device.is_cpu(), op, ": the CPU kernel got tensors on ", layout.device);
}

// Adds the Gram matrix of one dtype group's tensors to `total` (packed upper triangle) and lowers
// first[t] to the index (within the whole list) of task t's first tensor holding NaN or Inf.
void gram_group(const TaskGradLayout& layout, const DTypeGroup& group, const std::vector<const void*>& ptrs,
                double* total, int64_t* first) {
  const int64_t T = layout.num_tasks;
  const std::vector<const void*> group_ptrs = group.task_major(ptrs, T, layout.num_tensors);
  const cpu::TaskTensors tasks{T, static_cast<int64_t>(group.tensors.size()), to_kernel_dtype(group.dtype),
                               group_ptrs.data(), group.offsets.data()};
  const cpu::Kernels& kernels = cpu::active_kernels();

  // One block of consecutive chunks per thread; each block sums its chunks in fp64, and the
  // blocks are added in block order, so the result depends only on the thread count.
  const int64_t chunk = cpu::gram_chunk_elements(T, tasks.dtype);
  const int64_t chunks = (group.numel_per_task() + chunk - 1) / chunk;
  const int64_t blocks = std::min<int64_t>(std::max<int64_t>(at::get_num_threads(), 1), chunks);
  const int64_t pairs = cpu::num_pairs(T);
  std::vector<double> partial(static_cast<size_t>(blocks * pairs), 0.0);
  std::vector<int64_t> first_bad(static_cast<size_t>(blocks * T), std::numeric_limits<int64_t>::max());
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      kernels.gram(tasks, b * chunks / blocks, (b + 1) * chunks / blocks, partial.data() + b * pairs,
                   first_bad.data() + b * T);
    }
  });

  for (int64_t p = 0; p < pairs; ++p) {
    double s = 0;
    for (int64_t b = 0; b < blocks; ++b) s += partial[b * pairs + p];
    total[p] += s;
  }
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t local = first_bad[b * T + t];
      if (local != std::numeric_limits<int64_t>::max()) first[t] = std::min(first[t], group.tensors[local]);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> gram_cpu(at::TensorList grads, int64_t num_tasks) {
  const TaskGradLayout layout = check_task_grads("mtlgrad.gram", grads, num_tasks, DTypes::PerTensor);
  const int64_t T = num_tasks;
  at::Tensor gram = at::zeros({T, T}, at::TensorOptions().dtype(at::kDouble));
  at::Tensor nonfinite = at::full({T}, -1, at::TensorOptions().dtype(at::kLong));
  if (layout.num_tensors == 0 || layout.numel_per_task() == 0) return {gram, nonfinite};
  check_cpu(layout, "mtlgrad.gram");

  std::vector<at::Tensor> keep;
  const std::vector<const void*> ptrs = contiguous_pointers(grads, keep);
  // Tensors of different dtypes run as separate groups (one pass over each), added in group
  // order: deterministic, and a list of one dtype is one group.
  std::vector<double> total(static_cast<size_t>(cpu::num_pairs(T)), 0.0);
  std::vector<int64_t> first(static_cast<size_t>(T), std::numeric_limits<int64_t>::max());
  for (const DTypeGroup& group : dtype_groups(layout))
    gram_group(layout, group, ptrs, total.data(), first.data());

  double* g = gram.data_ptr<double>();
  int64_t* bad = nonfinite.data_ptr<int64_t>();
  for (int64_t i = 0; i < T; ++i) {
    for (int64_t j = i; j < T; ++j) {
      const double s = total[cpu::pair_index(i, j, T)];
      g[i * T + j] = s;
      g[j * T + i] = s;
    }
    if (first[i] != std::numeric_limits<int64_t>::max()) bad[i] = first[i];
  }
  return {gram, nonfinite};
}

void combine_cpu(at::TensorList grads, int64_t num_tasks, const at::Tensor& weights, at::TensorList out,
                 bool accumulate) {
  const TaskGradLayout layout = check_task_grads("mtlgrad.combine", grads, num_tasks, DTypes::PerTensor);
  check_combine_args(layout, grads, weights, out, c10::kCPU);
  const int64_t K = layout.num_tensors;
  if (K == 0 || layout.numel_per_task() == 0) return;
  check_cpu(layout, "mtlgrad.combine");

  std::vector<at::Tensor> keep;
  const std::vector<const void*> ptrs = contiguous_pointers(grads, keep);
  const at::Tensor w = weights.to(at::kDouble).contiguous();

  // Outputs that are not contiguous, or that share memory with an input (e.g. writing the result
  // over task 0's gradient), are computed into a fresh tensor (a copy of out with accumulate) and
  // copied at the end.
  std::vector<at::Tensor> staged;
  const std::vector<void*> out_ptrs = output_pointers(layout, grads, out, staged, accumulate);

  const cpu::Kernels& kernels = cpu::active_kernels();
  const double* wp = w.data_ptr<double>();
  for (const DTypeGroup& group : dtype_groups(layout)) {
    const std::vector<const void*> group_ptrs = group.task_major(ptrs, num_tasks, K);
    const std::vector<void*> group_out = group.per_tensor(out_ptrs);
    const cpu::TaskTensors tasks{num_tasks, static_cast<int64_t>(group.tensors.size()),
                                 to_kernel_dtype(group.dtype), group_ptrs.data(), group.offsets.data()};
    at::parallel_for(0, group.numel_per_task(), 1 << 16, [&](int64_t begin, int64_t end) {
      kernels.combine(tasks, wp, group_out.data(), begin, end, accumulate);
    });
  }
  copy_staged(out, staged);
}

}  // namespace

TORCH_LIBRARY_IMPL(mtlgrad, CPU, m) {
  m.impl("gram", &gram_cpu);
  m.impl("combine", &combine_cpu);
}

}  // namespace mtlgrad
