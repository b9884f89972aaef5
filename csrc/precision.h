// Where the kernels leave their fp32 working precision for fp64: shared by the CPU
// kernels (compiled once per instruction set, hence no torch header and internal linkage only) and
// the CUDA kernels, so both devices switch for the same input.
#pragma once

namespace mtlgrad {

// gram: a task whose fp32 sum of squares over a chunk is below this bound while the chunk holds a
// nonzero element of it has products that may have fallen below fp32's normal range (2^-126); the
// chunk is then summed again in fp64. Above it, the at most 2^14 products of a chunk, each off by
// less than 2^-126 even where subnormals are flushed to zero, change a sum of at least 2^-90 by
// less than 2^-22 relative, and an entry G_ij by less than that relative to sqrt(G_ii G_jj).
// Ordinary gradients are many orders of magnitude above it; zero ones (a task that does not reach
// a parameter) fail the nonzero test and stay on the fast path.
constexpr float kTinyChunkSumOfSquares = 0x1p-90f;

}  // namespace mtlgrad
