// CUDA kernels of the Gram matrix G = J Jᵀ over a task-major gradient list (see multi_tensor.cuh).
//
// Each thread accumulates its products over its share of one chunk in the working precision
// (fp32, fp64 for fp64 input), adds them to fp64 accumulators after every chunk, and the blocks'
// fp64 partials are summed in block order by gram_reduce_kernel: deterministic run to run.
// - gram_small_kernel<T> (T <= 8): element-parallel, every thread holds all T(T+1)/2 products
//   in registers; one fp64 block reduction at the end.
// - gram_tiled_kernel (any T): 32 x 32 tiles of task pairs (upper-triangle tile blocks only),
//   slices of the chunk staged in shared memory, 2 x 2 register micro-tiles per thread.
// Non-finite input is detected from the per-chunk diagonal: the thread scans the chunk for NaN/Inf
// and lowers nonfinite[t] to the tensor index; a finite chunk whose fp32 sums overflowed, or may
// have underflowed (a task's sum of squares below kTinyChunkSumOfSquares while it has a nonzero
// element there, see precision.h), is recomputed in fp64 by the same thread.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "../precision.h"
#include "multi_tensor.cuh"

namespace mtlgrad::cuda {

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t to_acc(scalar_t x) {
  return static_cast<acc_t>(static_cast<float>(x));
}
template <>
__device__ __forceinline__ double to_acc<double, double>(double x) {
  return x;
}
template <>
__device__ __forceinline__ float to_acc<float, float>(float x) {
  return x;
}

template <typename scalar_t>
__device__ __forceinline__ const scalar_t* task_row(const TaskTable& tab, int t, const ChunkInfo& ch) {
  return static_cast<const scalar_t*>(tab.ptrs[int64_t(t) * tab.num_tensors + ch.tensor]) + ch.offset;
}

// Scans elements i = first, first + stride, ... of task t's chunk; lowers nonfinite[t] to the
// chunk's tensor (its index in the whole list) when one is NaN/Inf. Returns whether one was.
template <typename scalar_t>
__device__ bool flag_nonfinite(const TaskTable& tab, const ChunkInfo& ch, int t, int first, int stride,
                               long long* nonfinite) {
  const scalar_t* row = task_row<scalar_t>(tab, t, ch);
  for (int i = first; i < ch.length; i += stride) {
    if (!isfinite(to_acc<double>(row[i]))) {
      const int32_t tensor = tab.ids != nullptr ? tab.ids[ch.tensor] : ch.tensor;
      atomicMin(nonfinite + t, static_cast<long long>(tensor));
      return true;
    }
  }
  return false;
}

template <typename scalar_t, typename acc_t, int T>
__global__ void __launch_bounds__(256)
    gram_small_kernel(TaskTable tab, double* partials, long long* nonfinite) {
  constexpr int P = T * (T + 1) / 2;
  constexpr bool kNarrow = std::is_same_v<acc_t, float>;  // fp32 sums can underflow
  double total[P];
#pragma unroll
  for (int q = 0; q < P; ++q) total[q] = 0;

  for (int64_t c = blockIdx.x; c < tab.num_chunks; c += gridDim.x) {
    const ChunkInfo ch = tab.chunks[c];
    const scalar_t* rows[T];
#pragma unroll
    for (int t = 0; t < T; ++t) rows[t] = task_row<scalar_t>(tab, t, ch);
    acc_t acc[P];
#pragma unroll
    for (int q = 0; q < P; ++q) acc[q] = 0;
    unsigned nonzero = 0;  // bit t: task t has a nonzero element in this thread's share
    for (int i = threadIdx.x; i < ch.length; i += blockDim.x) {
      acc_t x[T];
#pragma unroll
      for (int t = 0; t < T; ++t) x[t] = to_acc<acc_t>(rows[t][i]);
      if constexpr (kNarrow) {
#pragma unroll
        for (int t = 0; t < T; ++t) nonzero |= unsigned(x[t] != acc_t(0)) << t;
      }
      int q = 0;
#pragma unroll
      for (int a = 0; a < T; ++a)
#pragma unroll
        for (int b = a; b < T; ++b) acc[q++] += x[a] * x[b];
    }
    bool finite = true;
    bool tiny = false;
    {
      int q = 0;
#pragma unroll
      for (int a = 0; a < T; ++a) {
        finite &= isfinite(static_cast<double>(acc[q]));
        if constexpr (kNarrow) tiny |= acc[q] < kTinyChunkSumOfSquares && ((nonzero >> a) & 1u) != 0;
        q += T - a;
      }
    }
    if (!finite || tiny) {
      bool bad = false;
      if (!finite) {
        for (int t = 0; t < T; ++t)
          bad |= flag_nonfinite<scalar_t>(tab, ch, t, threadIdx.x, blockDim.x, nonfinite);
      }
      if (!bad) {  // finite input, over- or underflowed sums: redo this thread's share in fp64
        double exact[P];
#pragma unroll
        for (int q = 0; q < P; ++q) exact[q] = 0;
        for (int i = threadIdx.x; i < ch.length; i += blockDim.x) {
          double x[T];
#pragma unroll
          for (int t = 0; t < T; ++t) x[t] = to_acc<double>(rows[t][i]);
          int q = 0;
#pragma unroll
          for (int a = 0; a < T; ++a)
#pragma unroll
            for (int b = a; b < T; ++b) exact[q++] += x[a] * x[b];
        }
#pragma unroll
        for (int q = 0; q < P; ++q) total[q] += exact[q];
        continue;
      }
    }
#pragma unroll
    for (int q = 0; q < P; ++q) total[q] += static_cast<double>(acc[q]);
  }

  // Block reduction in a fixed order: warps by shuffles, then warp 0 over the warps.
  __shared__ double warp_sums[8][P];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int q = 0; q < P; ++q) {
    double v = total[q];
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) v += __shfl_down_sync(0xffffffffu, v, s);
    if (lane == 0) warp_sums[warp][q] = v;
  }
  __syncthreads();
  const int warps = blockDim.x / 32;
  for (int q = threadIdx.x; q < P; q += blockDim.x) {
    double v = 0;
    for (int w = 0; w < warps; ++w) v += warp_sums[w][q];
    partials[int64_t(blockIdx.x) * P + q] = v;
  }
}

constexpr int kTile = 32;   // task pairs per tile side
constexpr int kSlice = 32;  // elements per shared-memory slice

// The sum of squares of the elements a thread loads of its row (acc_t) and whether one of them is
// nonzero: after the chunk, the 8 threads of a row add theirs to tell whether the row's fp32
// products may have underflowed.
template <typename acc_t>
struct RowScale {
  acc_t squares = 0;
  bool nonzero = false;

  // Whether the row's fp32 sums over the chunk may have underflowed (see precision.h): combines
  // the 8 consecutive lanes of the row (every lane of the warp takes part).
  __device__ __forceinline__ bool tiny_over_row() const {
    acc_t s = squares;
    int any = nonzero ? 1 : 0;
#pragma unroll
    for (int m = 4; m > 0; m >>= 1) {
      s += __shfl_xor_sync(0xffffffffu, s, m);
      any |= __shfl_xor_sync(0xffffffffu, any, m);
    }
    return any != 0 && s < acc_t(kTinyChunkSumOfSquares);
  }
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_slice(acc_t (*dst)[kSlice + 1], const TaskTable& tab,
                                           const ChunkInfo& ch, int task0, int e0, RowScale<acc_t>& scale) {
  // 256 threads: 8 per task row, 4 consecutive elements each (coalesced along the row).
  const int row = threadIdx.x / 8;
  const int col = (threadIdx.x % 8) * 4;
  const int t = task0 + row;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int e = e0 + col + j;
    acc_t v = 0;
    if (t < tab.num_tasks && e < ch.length) v = to_acc<acc_t>(task_row<scalar_t>(tab, t, ch)[e]);
    dst[row][col + j] = v;
    if constexpr (std::is_same_v<acc_t, float>) {
      scale.squares += v * v;
      scale.nonzero |= v != acc_t(0);
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(256)
    gram_tiled_kernel(TaskTable tab, const int2* tile_blocks, double* partials, long long* nonfinite) {
  __shared__ acc_t A[kTile][kSlice + 1];
  __shared__ acc_t B[kTile][kSlice + 1];
  __shared__ bool tiny_rows[2][kTile];  // per row of A and of B: its fp32 sums may have underflowed
  constexpr bool kNarrow = std::is_same_v<acc_t, float>;
  const int2 tb = tile_blocks[blockIdx.y];
  const bool diagonal = tb.x == tb.y;
  const int tx = threadIdx.x % 16;
  const int ty = threadIdx.x / 16;
  const int r0 = tb.x * kTile + ty * 2;  // this thread's two rows (tasks)
  const int c0 = tb.y * kTile + tx * 2;  // and two columns
  double total[2][2] = {{0, 0}, {0, 0}};

  for (int64_t c = blockIdx.x; c < tab.num_chunks; c += gridDim.x) {
    const ChunkInfo ch = tab.chunks[c];
    acc_t acc[2][2] = {{0, 0}, {0, 0}};
    RowScale<acc_t> scale_a, scale_b;
    for (int e0 = 0; e0 < ch.length; e0 += kSlice) {
      load_slice<scalar_t, acc_t>(A, tab, ch, tb.x * kTile, e0, scale_a);
      if (!diagonal) load_slice<scalar_t, acc_t>(B, tab, ch, tb.y * kTile, e0, scale_b);
      __syncthreads();
      const acc_t(*Bs)[kSlice + 1] = diagonal ? A : B;
#pragma unroll 8
      for (int e = 0; e < kSlice; ++e) {
        const acc_t a0 = A[ty * 2][e], a1 = A[ty * 2 + 1][e];
        const acc_t b0 = Bs[tx * 2][e], b1 = Bs[tx * 2 + 1][e];
        acc[0][0] += a0 * b0;
        acc[0][1] += a0 * b1;
        acc[1][0] += a1 * b0;
        acc[1][1] += a1 * b1;
      }
      __syncthreads();
    }
    if constexpr (kNarrow) {
      // The previous chunk's flags were read before this chunk's slices (and their barriers).
      const bool tiny_a = scale_a.tiny_over_row();
      const bool tiny_b = diagonal ? tiny_a : scale_b.tiny_over_row();
      if (threadIdx.x % 8 == 0) {
        tiny_rows[0][threadIdx.x / 8] = tiny_a;
        tiny_rows[1][threadIdx.x / 8] = tiny_b;
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int r = r0 + i, col = c0 + j;
        double v = static_cast<double>(acc[i][j]);
        bool tiny = false;
        if constexpr (kNarrow) tiny = tiny_rows[0][ty * 2 + i] || tiny_rows[1][tx * 2 + j];
        if ((!isfinite(v) || tiny) && r < tab.num_tasks && col < tab.num_tasks) {
          bool bad = false;
          if (!isfinite(v)) {
            const bool bad_r = flag_nonfinite<scalar_t>(tab, ch, r, 0, 1, nonfinite);
            const bool bad_c = flag_nonfinite<scalar_t>(tab, ch, col, 0, 1, nonfinite);
            bad = bad_r || bad_c;
          }
          if (!bad) {  // over- or underflow of finite input: this entry again in fp64
            const scalar_t* x = task_row<scalar_t>(tab, r, ch);
            const scalar_t* y = task_row<scalar_t>(tab, col, ch);
            v = 0;
            for (int e = 0; e < ch.length; ++e) v += to_acc<double>(x[e]) * to_acc<double>(y[e]);
          }
        }
        total[i][j] += v;
      }
    }
  }
  const int64_t base = (int64_t(blockIdx.x) * gridDim.y + blockIdx.y) * kTile * kTile;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) partials[base + (ty * 2 + i) * kTile + tx * 2 + j] = total[i][j];
}

// G (T x T, fp64) from the per-block partials, summed in block order, and added to `gram` when
// `accumulate` (the groups of a list of several dtypes, in group order). The last launch
// (`finalize`) turns the "no non-finite value" marker of nonfinite into -1.
__global__ void gram_reduce_kernel(const double* partials, int blocks, int num_tasks, bool tiled,
                                   int num_tile_blocks, bool accumulate, bool finalize, double* gram,
                                   long long* nonfinite) {
  const int64_t pair = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t T = num_tasks;
  if (pair >= T * T) return;
  const int i = int(pair / T), j = int(pair % T);
  if (finalize && i == j && nonfinite[i] == LLONG_MAX) nonfinite[i] = -1;
  if (i > j) return;
  double s = 0;
  if (!tiled) {
    const int64_t P = T * (T + 1) / 2;
    const int64_t q = int64_t(i) * T - int64_t(i) * (i - 1) / 2 + (j - i);
    for (int b = 0; b < blocks; ++b) s += partials[b * P + q];
  } else {
    // Upper-triangle tile blocks are numbered row by row: (0,0), (0,1), ..., (1,1), ...
    const int nb = (num_tasks + kTile - 1) / kTile;
    const int bi = i / kTile, bj = j / kTile;
    const int tb = bi * nb - bi * (bi - 1) / 2 + (bj - bi);
    const int64_t within = (i % kTile) * kTile + (j % kTile);
    for (int b = 0; b < blocks; ++b)
      s += partials[(int64_t(b) * num_tile_blocks + tb) * kTile * kTile + within];
  }
  if (accumulate) s += gram[int64_t(i) * T + j];
  gram[int64_t(i) * T + j] = s;
  gram[int64_t(j) * T + i] = s;
}

}  // namespace mtlgrad::cuda
