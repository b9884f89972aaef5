// Interface between the host code (which sees torch) and the CPU kernels (which do not).
//
// The kernels are compiled once per instruction set (kernels_generic.cpp, kernels_avx2.cpp,
// kernels_avx512.cpp) and must not include any torch header: an inline function from a header
// compiled with -mavx512f could otherwise be picked by the linker for code that runs on a CPU
// without AVX-512.
#pragma once

#include <cstdint>

namespace mtlgrad::cpu {

enum class DType : int32_t { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// A task-major list of gradients: `num_tensors` contiguous tensors per task, all of one dtype.
// Element e of the flattened (concatenated) task vector lives in tensor k where
// offsets[k] <= e < offsets[k + 1]; nothing is ever concatenated for real.
struct TaskTensors {
  int64_t num_tasks;
  int64_t num_tensors;
  DType dtype;
  const void* const* data;  // num_tasks * num_tensors pointers, task-major
  const int64_t* offsets;   // num_tensors + 1 prefix sums of the tensor sizes
};

// Number of elements (per task) that one Gram chunk covers for `num_tasks` tasks: chunk c covers
// elements [c * L, (c + 1) * L) of the flattened vectors. Products within a chunk are accumulated
// in the working precision (fp32 for 16- and 32-bit input, fp64 for fp64), chunks are added in
// fp64. L is a multiple of 64 and does not depend on the instruction set, so the chunking (and
// with it the host's split of the work over threads) is the same on every CPU.
static inline int64_t gram_chunk_elements(int64_t num_tasks, DType dtype) {
  // About 24 KiB for all tasks, so the tiles re-read the chunk from L1 (T = 8: 768 elements);
  // at least 512 elements, so that for large T (chunk in L2) the per-chunk horizontal sums stay
  // a small part of the work. Larger chunks measured slower at T = 8 (more L1 misses).
  const int64_t bytes = dtype == DType::Float64 ? 8 : 4;
  int64_t l = (24 * 1024) / (num_tasks * bytes);
  l = l < 512 ? 512 : l;
  l = l > 4096 ? 4096 : l;
  return l / 64 * 64;
}

// Internal linkage (static): each instruction-set translation unit gets its own copy.
// Number of packed upper-triangle entries of a T x T symmetric matrix.
static inline int64_t num_pairs(int64_t num_tasks) { return num_tasks * (num_tasks + 1) / 2; }

// Index of (i, j), i <= j, in the packed row-major upper triangle.
static inline int64_t pair_index(int64_t i, int64_t j, int64_t num_tasks) {
  return i * num_tasks - i * (i - 1) / 2 + (j - i);
}

struct Kernels {
  const char* name;
  // Adds, for chunks [chunk_begin, chunk_end), every chunk's products to `gram` (packed upper
  // triangle, fp64, in chunk order). For each task t with a non-finite element in those chunks,
  // lowers first_nonfinite[t] to the index of the first such tensor.
  void (*gram)(const TaskTensors& grads, int64_t chunk_begin, int64_t chunk_end, double* gram,
               int64_t* first_nonfinite);
  // out[k][i] = sum_t weights[t] * grads[t][k][i] for flattened elements [begin, end), or
  // out[k][i] += that sum with `accumulate` (rounded once); out holds num_tensors pointers of the
  // grads' dtype.
  void (*combine)(const TaskTensors& grads, const double* weights, void* const* out, int64_t begin,
                  int64_t end, bool accumulate);
};

const Kernels& generic_kernels();
const Kernels& avx2_kernels();
const Kernels& avx512_kernels();

}  // namespace mtlgrad::cpu
