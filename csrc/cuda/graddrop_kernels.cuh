// CUDA kernels of GradDrop (Chen et al. 2020), bit-compatible in their random choices with the CPU
// op (csrc/cpu/graddrop_cpu.cpp): element e of a task's flattened gradient uses word (e mod 4) of
// Philox4x32-10 with key `seed` and counter (0, 0, e / 4), U = (word >> 8) · 2⁻²⁴; P = ½(1 + Σ g /
// Σ |g|) over the tasks in order; positive values are kept when U < P.
#pragma once

#include <climits>
#include <cstdint>

#include "gram_kernels.cuh"
#include "multi_tensor.cuh"

namespace mtlgrad::cuda {

__device__ __forceinline__ uint32_t philox_word(uint64_t seed, uint64_t element) {
  const uint64_t block = element >> 2;
  uint32_t c0 = 0, c1 = 0, c2 = uint32_t(block), c3 = uint32_t(block >> 32);
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  switch (element & 3) {
    case 0:
      return c0;
    case 1:
      return c1;
    case 2:
      return c2;
    default:
      return c3;
  }
}

// Lowers bad[t] to the tensor index of each chunk where task t holds a NaN or Inf.
template <typename scalar_t>
__global__ void __launch_bounds__(256) graddrop_check_kernel(TaskTable tab, long long* bad) {
  for (int64_t c = blockIdx.x; c < tab.num_chunks; c += gridDim.x) {
    const ChunkInfo ch = tab.chunks[c];
    for (int t = 0; t < tab.num_tasks; ++t) {
      const scalar_t* row = task_row<scalar_t>(tab, t, ch);
      bool found = false;
      for (int i = threadIdx.x; i < ch.length; i += blockDim.x) found |= !isfinite(to_acc<double>(row[i]));
      if (__syncthreads_or(found) && threadIdx.x == 0) atomicMin(bad + t, static_cast<long long>(ch.tensor));
    }
  }
}

// out[k] = Σ_t (leak_t + (1 − leak_t) M_t) g_t[k]; with `bad` (check_finite) a block writes nothing
// when any task has a non-finite value, so the op leaves `out` untouched without a host round trip.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(256)
    graddrop_kernel(TaskTable tab, void* const* out_ptrs, const double* leak, uint64_t seed,
                    const long long* bad) {
  extern __shared__ unsigned char shared_bytes[];
  acc_t* leak_s = reinterpret_cast<acc_t*>(shared_bytes);
  __shared__ int skip;
  if (threadIdx.x == 0) skip = 0;
  __syncthreads();
  for (int t = threadIdx.x; t < tab.num_tasks; t += blockDim.x) {
    leak_s[t] = static_cast<acc_t>(leak[t]);
    if (bad != nullptr && bad[t] != LLONG_MAX) skip = 1;
  }
  __syncthreads();
  if (skip) return;

  for (int64_t c = blockIdx.x; c < tab.num_chunks; c += gridDim.x) {
    const ChunkInfo ch = tab.chunks[c];
    scalar_t* out = static_cast<scalar_t*>(out_ptrs[ch.tensor]) + ch.offset;
    const uint64_t first = static_cast<uint64_t>(tab.starts[ch.tensor] + ch.offset);
    for (int i = threadIdx.x; i < ch.length; i += blockDim.x) {
      acc_t sum = 0, abs_sum = 0;
      for (int t = 0; t < tab.num_tasks; ++t) {
        const acc_t v = to_acc<acc_t>(task_row<scalar_t>(tab, t, ch)[i]);
        sum += v;
        abs_sum += fabs(v);
      }
      const uint32_t word = philox_word(seed, first + i);
      const acc_t u = static_cast<acc_t>(static_cast<int32_t>(word >> 8)) * static_cast<acc_t>(0x1p-24);
      const acc_t denominator =
          fmax(abs_sum, acc_t(sizeof(acc_t) == 4 ? 1.17549435e-38 : 2.2250738585072014e-308));
      const acc_t purity = acc_t(0.5) * (acc_t(1) + sum / denominator);
      const acc_t keep = u < purity ? acc_t(1) : acc_t(0);
      acc_t result = 0;
      for (int t = 0; t < tab.num_tasks; ++t) {
        const acc_t v = to_acc<acc_t>(task_row<scalar_t>(tab, t, ch)[i]);
        const acc_t positive = v > 0 ? acc_t(1) : acc_t(0), negative = v < 0 ? acc_t(1) : acc_t(0);
        const acc_t kept = negative + keep * (positive - negative);
        result += (kept + (1 - kept) * leak_s[t]) * v;
      }
      out[i] = static_cast<scalar_t>(result);
    }
  }
}

__global__ void mark_finite_kernel(long long* bad, int num_tasks) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t < num_tasks && bad[t] == LLONG_MAX) bad[t] = -1;
}

}  // namespace mtlgrad::cuda
