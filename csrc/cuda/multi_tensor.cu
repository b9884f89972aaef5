#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime.h>

#include <array>
#include <cstring>
#include <mutex>

#include "multi_tensor.cuh"

namespace mtlgrad::cuda {
namespace {

bool is_aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

}  // namespace

TaskTable upload_table(const std::vector<const void*>& ptrs, const std::vector<int64_t>& numels,
                       int64_t num_tasks, const std::vector<const void*>& also_aligned,
                       const c10::Device& device, at::Tensor& storage, const std::vector<int32_t>& ids) {
  const int64_t K = static_cast<int64_t>(numels.size());
  std::vector<ChunkInfo> chunks;
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t o = 0; o < numels[k]; o += kChunk) {
      const int64_t n = std::min<int64_t>(kChunk, numels[k] - o);
      chunks.push_back(ChunkInfo{o, static_cast<int32_t>(k), static_cast<int32_t>(n)});
    }
  }
  std::vector<int32_t> aligned(static_cast<size_t>(K), 1);
  for (int64_t t = 0; t < num_tasks; ++t)
    for (int64_t k = 0; k < K; ++k) aligned[k] &= is_aligned(ptrs[t * K + k]);
  for (size_t k = 0; k < also_aligned.size() && k < aligned.size(); ++k)
    aligned[k] &= also_aligned[k] == nullptr || is_aligned(also_aligned[k]);

  std::vector<int64_t> starts(static_cast<size_t>(K), 0);
  for (int64_t k = 1; k < K; ++k) starts[k] = starts[k - 1] + numels[k - 1];

  // Layout: pointers | chunks | aligned flags | starts | ids, each part 16-byte aligned.
  const int64_t ptr_bytes = round_up(static_cast<int64_t>(ptrs.size() * sizeof(void*)), 16);
  const int64_t chunk_bytes = round_up(static_cast<int64_t>(chunks.size() * sizeof(ChunkInfo)), 16);
  const int64_t flag_bytes = round_up(static_cast<int64_t>(aligned.size() * sizeof(int32_t)), 16);
  const int64_t start_bytes = round_up(static_cast<int64_t>(starts.size() * sizeof(int64_t)), 16);
  const int64_t id_bytes = round_up(static_cast<int64_t>(ids.size() * sizeof(int32_t)), 16);
  const int64_t total = std::max<int64_t>(ptr_bytes + chunk_bytes + flag_bytes + start_bytes + id_bytes, 16);
  at::Tensor host = at::empty({total}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  uint8_t* h = host.data_ptr<uint8_t>();
  std::memcpy(h, ptrs.data(), ptrs.size() * sizeof(void*));
  std::memcpy(h + ptr_bytes, chunks.data(), chunks.size() * sizeof(ChunkInfo));
  std::memcpy(h + ptr_bytes + chunk_bytes, aligned.data(), aligned.size() * sizeof(int32_t));
  std::memcpy(h + ptr_bytes + chunk_bytes + flag_bytes, starts.data(), starts.size() * sizeof(int64_t));
  std::memcpy(h + ptr_bytes + chunk_bytes + flag_bytes + start_bytes, ids.data(),
              ids.size() * sizeof(int32_t));
  storage = at::empty({total}, at::TensorOptions().dtype(at::kByte).device(device));
  storage.copy_(host, /*non_blocking=*/true);  // stream-ordered; the pinned block is reused safely

  const uint8_t* d = storage.data_ptr<uint8_t>();
  TaskTable table;
  table.ptrs = reinterpret_cast<const void* const*>(d);
  table.chunks = reinterpret_cast<const ChunkInfo*>(d + ptr_bytes);
  table.aligned = reinterpret_cast<const int32_t*>(d + ptr_bytes + chunk_bytes);
  table.starts = reinterpret_cast<const int64_t*>(d + ptr_bytes + chunk_bytes + flag_bytes);
  table.ids = ids.empty()
                  ? nullptr
                  : reinterpret_cast<const int32_t*>(d + ptr_bytes + chunk_bytes + flag_bytes + start_bytes);
  table.num_chunks = static_cast<int64_t>(chunks.size());
  table.num_tasks = static_cast<int32_t>(num_tasks);
  table.num_tensors = static_cast<int32_t>(K);
  return table;
}

int multiprocessor_count() {
  static std::array<int, 64> counts{};
  static std::mutex mutex;
  const int device = c10::cuda::current_device();
  std::lock_guard<std::mutex> lock(mutex);
  if (device < 64 && counts[device] > 0) return counts[device];
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (device < 64) counts[device] = count;
  return count;
}

}  // namespace mtlgrad::cuda
