// CUDA implementations of the mtlgrad ops: argument checks (shared with the CPU, task_grads.h),
// the multi-tensor table, launches on the current stream. No host synchronisation: the table goes
// up with one asynchronous copy from pinned memory, the weights are read on the device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <tuple>
#include <vector>

#include "../task_grads.h"
#include "combine_kernels.cuh"
#include "graddrop_kernels.cuh"
#include "gram_kernels.cuh"
#include "multi_tensor.cuh"

namespace mtlgrad::cuda {
namespace {

constexpr int kThreads = 256;

std::vector<int64_t> tensor_sizes(const TaskGradLayout& layout) {
  std::vector<int64_t> sizes(static_cast<size_t>(layout.num_tensors));
  for (int64_t k = 0; k < layout.num_tensors; ++k) sizes[k] = layout.offsets[k + 1] - layout.offsets[k];
  return sizes;
}

std::vector<int64_t> tensor_sizes(const DTypeGroup& group) {
  std::vector<int64_t> sizes(group.tensors.size());
  for (size_t i = 0; i < sizes.size(); ++i) sizes[i] = group.offsets[i + 1] - group.offsets[i];
  return sizes;
}

// The table of an op that writes one output per tensor: the output pointers travel after the
// gradients' (as a (T+1)-th task, so they share the alignment flags); `out` gets their device copy.
TaskTable table_with_outputs(const std::vector<const void*>& ptrs, const std::vector<void*>& out_ptrs,
                             const std::vector<int64_t>& sizes, int64_t num_tasks, const c10::Device& device,
                             at::Tensor& storage, void* const*& out) {
  std::vector<const void*> table_ptrs = ptrs;
  table_ptrs.insert(table_ptrs.end(), out_ptrs.begin(), out_ptrs.end());
  TaskTable tab = upload_table(table_ptrs, sizes, num_tasks + 1, {}, device, storage);
  tab.num_tasks = static_cast<int32_t>(num_tasks);
  out = const_cast<void* const*>(tab.ptrs + num_tasks * static_cast<int64_t>(sizes.size()));
  return tab;
}

std::vector<int32_t> tensor_ids(const DTypeGroup& group) {
  return std::vector<int32_t>(group.tensors.begin(), group.tensors.end());
}

// Runs f.template operator()<scalar_t, acc_t>() for a gradient dtype.
template <typename F>
void dispatch_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat:
      return f.template operator()<float, float>();
    case at::kDouble:
      return f.template operator()<double, double>();
    case at::kHalf:
      return f.template operator()<c10::Half, float>();
    case at::kBFloat16:
      return f.template operator()<c10::BFloat16, float>();
    default:
      TORCH_CHECK(false, "unreachable: unsupported dtype ", dtype);
  }
}

// Adds the Gram matrix of the table's tensors to `gram` (`accumulate`), or writes it; `finalize`
// on the last group of the list.
template <typename scalar_t, typename acc_t>
void launch_gram(const TaskTable& tab, int64_t T, bool accumulate, bool finalize, at::Tensor& gram,
                 at::Tensor& nonfinite) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto options = gram.options();
  const int sms = multiprocessor_count();
  long long* bad = reinterpret_cast<long long*>(nonfinite.data_ptr<int64_t>());
  if (T <= 8) {
    const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(tab.num_chunks, 4 * sms)));
    const int64_t P = T * (T + 1) / 2;
    at::Tensor partials = at::empty({blocks * P}, options);
    double* out = partials.data_ptr<double>();
    switch (T) {
#define MTLGRAD_GRAM_SMALL(N)                                                              \
  case N:                                                                                  \
    gram_small_kernel<scalar_t, acc_t, N><<<blocks, kThreads, 0, stream>>>(tab, out, bad); \
    break;
      MTLGRAD_GRAM_SMALL(1)
      MTLGRAD_GRAM_SMALL(2)
      MTLGRAD_GRAM_SMALL(3)
      MTLGRAD_GRAM_SMALL(4)
      MTLGRAD_GRAM_SMALL(5)
      MTLGRAD_GRAM_SMALL(6)
      MTLGRAD_GRAM_SMALL(7)
      MTLGRAD_GRAM_SMALL(8)
#undef MTLGRAD_GRAM_SMALL
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int reduce_blocks = static_cast<int>((T * T + kThreads - 1) / kThreads);
    gram_reduce_kernel<<<reduce_blocks, kThreads, 0, stream>>>(
        out, blocks, static_cast<int>(T), false, 0, accumulate, finalize, gram.data_ptr<double>(), bad);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // Upper-triangle tile blocks, row by row (the order gram_reduce_kernel assumes).
  const int nb = static_cast<int>((T + kTile - 1) / kTile);
  std::vector<int2> tiles;
  for (int i = 0; i < nb; ++i)
    for (int j = i; j < nb; ++j) tiles.push_back(make_int2(i, j));
  const int num_tiles = static_cast<int>(tiles.size());
  at::Tensor tiles_host = at::empty({num_tiles * 2}, at::TensorOptions().dtype(at::kInt).pinned_memory(true));
  std::memcpy(tiles_host.data_ptr<int32_t>(), tiles.data(), tiles.size() * sizeof(int2));
  at::Tensor tiles_device = tiles_host.to(gram.device(), /*non_blocking=*/true);
  const int blocks = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(tab.num_chunks, std::max(1, 4 * sms / num_tiles))));
  at::Tensor partials = at::empty({int64_t(blocks) * num_tiles * kTile * kTile}, options);
  double* out = partials.data_ptr<double>();
  const dim3 grid(blocks, num_tiles);
  gram_tiled_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
      tab, reinterpret_cast<const int2*>(tiles_device.data_ptr<int32_t>()), out, bad);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int reduce_blocks = static_cast<int>((T * T + kThreads - 1) / kThreads);
  gram_reduce_kernel<<<reduce_blocks, kThreads, 0, stream>>>(
      out, blocks, static_cast<int>(T), true, num_tiles, accumulate, finalize, gram.data_ptr<double>(), bad);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> gram_cuda(at::TensorList grads, int64_t num_tasks) {
  const TaskGradLayout layout = check_task_grads("mtlgrad.gram", grads, num_tasks, DTypes::PerTensor);
  const int64_t T = num_tasks;
  const c10::Device device = layout.num_tensors > 0 ? layout.device : c10::Device(c10::kCUDA);
  const c10::cuda::CUDAGuard guard(device);
  const auto f64 = at::TensorOptions().dtype(at::kDouble).device(device);
  at::Tensor gram = at::zeros({T, T}, f64);
  if (layout.num_tensors == 0 || layout.numel_per_task() == 0) {
    return {gram, at::full({T}, -1, at::TensorOptions().dtype(at::kLong).device(device))};
  }
  TORCH_CHECK_VALUE(device.is_cuda(), "mtlgrad.gram: the CUDA kernel got tensors on ", device);
  at::Tensor nonfinite = at::full({T}, LLONG_MAX, at::TensorOptions().dtype(at::kLong).device(device));
  std::vector<at::Tensor> keep;
  const std::vector<const void*> ptrs = contiguous_pointers(grads, keep);
  // One pass per dtype group, each added to G in group order by its reduction (deterministic);
  // a list of one dtype is one group.
  const std::vector<DTypeGroup> groups = dtype_groups(layout);
  std::vector<at::Tensor> storage(groups.size());
  for (size_t i = 0; i < groups.size(); ++i) {
    const DTypeGroup& group = groups[i];
    const TaskTable tab = upload_table(group.task_major(ptrs, T, layout.num_tensors), tensor_sizes(group), T,
                                       {}, device, storage[i], tensor_ids(group));
    dispatch_dtype(group.dtype, [&]<typename scalar_t, typename acc_t>() {
      launch_gram<scalar_t, acc_t>(tab, T, i > 0, i + 1 == groups.size(), gram, nonfinite);
    });
  }
  return {gram, nonfinite};
}

template <typename scalar_t, typename acc_t>
void launch_combine(const TaskTable& tab, void* const* out_ptrs, const double* weights, bool accumulate) {
  const int blocks =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(tab.num_chunks, 8 * multiprocessor_count())));
  const size_t shared = sizeof(acc_t) * static_cast<size_t>(tab.num_tasks);
  combine_kernel<scalar_t, acc_t>
      <<<blocks, kThreads, shared, c10::cuda::getCurrentCUDAStream()>>>(tab, out_ptrs, weights, accumulate);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void combine_cuda(at::TensorList grads, int64_t num_tasks, const at::Tensor& weights, at::TensorList out,
                  bool accumulate) {
  const TaskGradLayout layout = check_task_grads("mtlgrad.combine", grads, num_tasks, DTypes::PerTensor);
  check_combine_args(layout, grads, weights, out, layout.num_tensors > 0 ? layout.device : weights.device());
  const int64_t K = layout.num_tensors;
  if (K == 0 || layout.numel_per_task() == 0) return;
  const c10::cuda::CUDAGuard guard(layout.device);
  std::vector<at::Tensor> keep;
  const std::vector<const void*> ptrs = contiguous_pointers(grads, keep);
  const at::Tensor w = weights.to(at::kDouble).contiguous();

  // Outputs that are not contiguous or overlap an input are computed apart (in a copy of out with
  // accumulate) and copied at the end.
  std::vector<at::Tensor> staged;
  const std::vector<void*> out_ptrs = output_pointers(layout, grads, out, staged, accumulate);
  // One launch per dtype group (one for a list of one dtype).
  const std::vector<DTypeGroup> groups = dtype_groups(layout);
  std::vector<at::Tensor> storage(groups.size());
  for (size_t i = 0; i < groups.size(); ++i) {
    const DTypeGroup& group = groups[i];
    void* const* device_out = nullptr;
    const TaskTable tab =
        table_with_outputs(group.task_major(ptrs, num_tasks, K), group.per_tensor(out_ptrs),
                           tensor_sizes(group), num_tasks, layout.device, storage[i], device_out);
    dispatch_dtype(group.dtype, [&]<typename scalar_t, typename acc_t>() {
      launch_combine<scalar_t, acc_t>(tab, device_out, w.data_ptr<double>(), accumulate);
    });
  }
  copy_staged(out, staged);
}

template <typename scalar_t, typename acc_t>
void launch_graddrop(const TaskTable& tab, void* const* out_ptrs, const double* leak, uint64_t seed,
                     long long* bad) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int blocks =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(tab.num_chunks, 8 * multiprocessor_count())));
  if (bad != nullptr) {
    graddrop_check_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(tab, bad);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const size_t shared = sizeof(acc_t) * static_cast<size_t>(tab.num_tasks);
  graddrop_kernel<scalar_t, acc_t><<<blocks, kThreads, shared, stream>>>(tab, out_ptrs, leak, seed, bad);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Same contract as the CPU op (csrc/cpu/graddrop_cpu.cpp): returns, per task, the first tensor
// holding a NaN or Inf (or -1); with check_finite nothing is written when there is one. The leak
// values must lie in [0, 1] (checked by the Python layer: reading them here would synchronise).
at::Tensor graddrop_cuda(at::TensorList grads, int64_t num_tasks, const at::Tensor& leak, int64_t seed,
                         bool check_finite, at::TensorList out) {
  const char* op = "mtlgrad.graddrop";
  const TaskGradLayout layout = check_task_grads(op, grads, num_tasks);
  const int64_t K = layout.num_tensors;
  const c10::Device device = K > 0 ? layout.device : leak.device();
  TORCH_CHECK_VALUE(leak.dim() == 1 && leak.numel() == num_tasks, op, ": leak must have shape [", num_tasks,
                    "] (one value per task), got ", leak.sizes());
  TORCH_CHECK_VALUE(leak.device() == device, op, ": leak is on ", leak.device(), " but must be on ", device);
  check_outputs(op, layout, grads, out);
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor nonfinite = at::full({num_tasks}, check_finite ? LLONG_MAX : -1,
                                  at::TensorOptions().dtype(at::kLong).device(device));
  if (K == 0 || layout.numel_per_task() == 0) {
    if (check_finite) nonfinite.fill_(-1);
    return nonfinite;
  }
  std::vector<at::Tensor> keep;
  const std::vector<const void*> ptrs = contiguous_pointers(grads, keep);
  const at::Tensor l = leak.to(at::kDouble).contiguous();
  std::vector<at::Tensor> staged;
  const std::vector<void*> out_ptrs = output_pointers(layout, grads, out, staged);
  at::Tensor storage;
  void* const* device_out = nullptr;
  const TaskTable tab =
      table_with_outputs(ptrs, out_ptrs, tensor_sizes(layout), num_tasks, layout.device, storage, device_out);
  long long* bad = check_finite ? reinterpret_cast<long long*>(nonfinite.data_ptr<int64_t>()) : nullptr;
  const double* lp = l.data_ptr<double>();
  const uint64_t s = static_cast<uint64_t>(seed);
  switch (layout.dtype) {
    case at::kFloat:
      launch_graddrop<float, float>(tab, device_out, lp, s, bad);
      break;
    case at::kDouble:
      launch_graddrop<double, double>(tab, device_out, lp, s, bad);
      break;
    case at::kHalf:
      launch_graddrop<c10::Half, float>(tab, device_out, lp, s, bad);
      break;
    case at::kBFloat16:
      launch_graddrop<c10::BFloat16, float>(tab, device_out, lp, s, bad);
      break;
    default:
      TORCH_CHECK(false, "unreachable");
  }
  // Staged outputs are copied only when the kernel wrote them; without a host round trip that is
  // decided on the device: copy through a mask that keeps `out` when a gradient was non-finite.
  for (int64_t k = 0; k < K; ++k) {
    if (!staged[k].defined()) continue;
    if (check_finite) {
      const at::Tensor ok = nonfinite.eq(LLONG_MAX).all();
      out[k].copy_(at::where(ok, staged[k], out[k]));
    } else {
      out[k].copy_(staged[k]);
    }
  }
  if (check_finite) {
    mark_finite_kernel<<<static_cast<int>((num_tasks + kThreads - 1) / kThreads), kThreads, 0,
                         c10::cuda::getCurrentCUDAStream()>>>(bad, static_cast<int>(num_tasks));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return nonfinite;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtlgrad, CUDA, m) {
  m.impl("gram", &gram_cuda);
  m.impl("combine", &combine_cuda);
  m.impl("graddrop", &graddrop_cuda);
}

}  // namespace mtlgrad::cuda
