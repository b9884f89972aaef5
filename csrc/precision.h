// Where the gram and combine kernels leave their fp32 working precision for fp64: shared by the CPU
// kernels (compiled once per instruction set, hence no torch header and internal linkage only) and
// the CUDA kernels, so both devices switch for the same input.
#pragma once

#if defined(__CUDACC__)
#define MTLGRAD_HOST_DEVICE __host__ __device__
#else
#define MTLGRAD_HOST_DEVICE
#endif

namespace mtlgrad {

// gram: a task whose fp32 sum of squares over a chunk is below this bound while the chunk holds a
// nonzero element of it has products that may have fallen below fp32's normal range (2^-126); the
// chunk is then summed again in fp64. Above it, the at most 2^14 products of a chunk, each off by
// less than 2^-126 even where subnormals are flushed to zero, change a sum of at least 2^-90 by
// less than 2^-22 relative, and an entry G_ij by less than that relative to sqrt(G_ii G_jj).
// Ordinary gradients are many orders of magnitude above it; zero ones (a task that does not reach
// a parameter) fail the nonzero test and stay on the fast path.
constexpr float kTinyChunkSumOfSquares = 0x1p-90f;

// combine: 16- and 32-bit gradients are summed in fp32 unless some weight lies outside
// [2^-60, 2^60] (zero aside), where they are summed in fp64. A weight beyond fp32's range cannot
// even be cast (PCGrad's weights reach 1e60 on rows of norms 1e30 and 1e-30), and within the band
// the products of the weights with gradient entries up to 2^±66 stay inside fp32's normal range,
// so the fp32 sum is as exact as its rounding. Summing in fp64 always measured 1.6x (fp32 input)
// to 2x (bf16) slower on the CPU (AVX2, T = 8, P = 1e7: twice the vectors, plus conversions);
// weights outside the band come only from badly scaled problems, so the common case keeps the
// fp32 speed. The CUDA kernel applies the same rule (fp64 is slow on many GPUs).
static inline MTLGRAD_HOST_DEVICE bool needs_wide_combine(double weight) {
  const double a = weight < 0 ? -weight : weight;
  return a > 0x1p60 || (a < 0x1p-60 && a != 0);
}

}  // namespace mtlgrad
