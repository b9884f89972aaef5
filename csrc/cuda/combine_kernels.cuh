// CUDA kernel of combine: out[k] = Σ_t w_t g_t[k] (or out[k] += ...) over a task-major gradient
// list, one launch for the whole list (per dtype). The weights are read from device memory (no
// host round trip) into shared memory; 16-byte vector loads and stores where every pointer of the
// tensor is aligned.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "../precision.h"
#include "gram_kernels.cuh"
#include "multi_tensor.cuh"

namespace mtlgrad::cuda {

template <typename scalar_t, int N>
struct alignas(16) Pack {
  scalar_t v[N];
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t from_acc(acc_t x) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return x;
  } else {
    return static_cast<scalar_t>(static_cast<float>(x));  // fp64 -> fp16/bf16 through fp32
  }
}

// The block's chunks of out = Σ_t w_t g_t (or out += ... with `accumulate`: out is read once,
// summed with the products in acc_t and written once).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void combine_chunks(const TaskTable& tab, void* const* out_ptrs, const acc_t* w,
                                               bool accumulate) {
  constexpr int V = 16 / sizeof(scalar_t);
  using P = Pack<scalar_t, V>;
  for (int64_t c = blockIdx.x; c < tab.num_chunks; c += gridDim.x) {
    const ChunkInfo ch = tab.chunks[c];
    scalar_t* out = static_cast<scalar_t*>(out_ptrs[ch.tensor]) + ch.offset;
    const bool vector = tab.aligned[ch.tensor] != 0;
    const int vectors = vector ? ch.length / V : 0;
    for (int i = threadIdx.x; i < vectors; i += blockDim.x) {
      acc_t acc[V];
      if (accumulate) {
        const P o = reinterpret_cast<const P*>(out)[i];
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] = to_acc<acc_t>(o.v[j]);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] = 0;
      }
      for (int t = 0; t < tab.num_tasks; ++t) {
        const P x = reinterpret_cast<const P*>(task_row<scalar_t>(tab, t, ch))[i];
        const acc_t wt = w[t];
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] += wt * to_acc<acc_t>(x.v[j]);
      }
      P y;
#pragma unroll
      for (int j = 0; j < V; ++j) y.v[j] = from_acc<scalar_t>(acc[j]);
      reinterpret_cast<P*>(out)[i] = y;
    }
    for (int i = vectors * V + threadIdx.x; i < ch.length; i += blockDim.x) {  // tail / unaligned
      acc_t acc = accumulate ? to_acc<acc_t>(out[i]) : acc_t(0);
      for (int t = 0; t < tab.num_tasks; ++t) acc += w[t] * to_acc<acc_t>(task_row<scalar_t>(tab, t, ch)[i]);
      out[i] = from_acc<scalar_t>(acc);
    }
  }
}

// Sums in acc_t (fp32 for 16- and 32-bit input), or in fp64 when some weight lies outside the
// fp32-safe band (precision.h; the same rule as the CPU's): decided per block from the weights in
// shared memory, so no host round trip and no divergence within a block.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(256)
    combine_kernel(TaskTable tab, void* const* out_ptrs, const double* weights, bool accumulate) {
  extern __shared__ unsigned char shared_bytes[];
  acc_t* w = reinterpret_cast<acc_t*>(shared_bytes);
  bool wide = false;
  for (int t = threadIdx.x; t < tab.num_tasks; t += blockDim.x) {
    const double x = weights[t];
    w[t] = static_cast<acc_t>(x);
    wide |= needs_wide_combine(x);
  }
  wide = __syncthreads_or(wide) != 0;
  if constexpr (!std::is_same_v<acc_t, double>) {
    if (wide) {  // rare: the fp64 weights are read where they are (cached), not staged
      combine_chunks<scalar_t, double>(tab, out_ptrs, weights, accumulate);
      return;
    }
  }
  combine_chunks<scalar_t, acc_t>(tab, out_ptrs, w, accumulate);
}

}  // namespace mtlgrad::cuda
