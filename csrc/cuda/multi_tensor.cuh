// The multi-tensor launcher's metadata: every tensor of a task-major gradient list is cut into
// chunks of at most kChunk elements; a small table (the T * K data pointers, one entry per chunk,
// one alignment flag per tensor) is uploaded with one asynchronous copy from pinned memory, and
// each block of a kernel walks the chunks blockIdx.x, blockIdx.x + gridDim.x, ... So one launch
// covers a whole model's gradients for all tasks, and the chunk-to-block assignment (hence the
// order of every floating-point sum) is fixed.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <vector>

namespace mtlgrad::cuda {

constexpr int64_t kChunk = 16384;  // elements of one tensor (per task) in one chunk

struct ChunkInfo {
  int64_t offset;  // first element within the tensor
  int32_t tensor;  // index k within a task's list
  int32_t length;  // <= kChunk
};

struct TaskTable {
  const void* const* ptrs;  // num_tasks * num_tensors, task-major
  const ChunkInfo* chunks;
  const int32_t* aligned;  // per tensor: 1 when every task's pointer (and the output's) is 16-byte aligned
  const int64_t* starts;   // per tensor: index of its first element in a task's flattened gradient
  const int32_t* ids;      // per tensor: its index in the whole list when the table holds a part of it
                           // (one dtype group), else nullptr (the table's index is that index)
  int64_t num_chunks;
  int32_t num_tasks;
  int32_t num_tensors;
};

// Device copy of the table for `ptrs` (T * K task-major data pointers, tensor sizes in `numels`,
// extra pointers `also_aligned` that must share the 16-byte alignment of tensor k, e.g. the
// outputs; `ids`: each tensor's index in the whole list, when the table covers a part of it).
// `storage` keeps the device memory alive for the caller's launches.
TaskTable upload_table(const std::vector<const void*>& ptrs, const std::vector<int64_t>& numels,
                       int64_t num_tasks, const std::vector<const void*>& also_aligned,
                       const c10::Device& device, at::Tensor& storage, const std::vector<int32_t>& ids = {});

// Number of multiprocessors of the current device (cached).
int multiprocessor_count();

}  // namespace mtlgrad::cuda
