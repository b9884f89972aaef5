// GradDrop (Chen et al., 2020, "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign
// Dropout", arXiv:2010.06808, Algorithm 1) as one fused elementwise pass over the task-major lists.
// For every element, over the tasks i:
//
//     P = ½ (1 + Σ_i g_i / Σ_i |g_i|)                      (gradient positive sign purity)
//     keep the positive g_i if U < P, the negative ones otherwise   (U uniform, shared by all tasks)
//     out = Σ_i (ℓ_i + (1 − ℓ_i) M_i) g_i                   (M_i = 1 for a kept sign; ℓ_i the leak)
//
// U comes from a counter-based generator keyed by (seed, element index e), so the result does not
// depend on how the elements are split over threads, and a CUDA kernel can reproduce it bit for bit:
// Philox4x32-10 (the generator of torch's CUDA kernels) with key (lo, hi)(seed) and counter
// (0, 0, lo, hi)(e / 4), i.e. the words of at::Philox4_32(seed, /*subsequence=*/e / 4); U is
// (word (e mod 4) >> 8) · 2⁻²⁴, exactly representable in float. e is the element's index in the
// flattened concatenation of a task's tensors. Sums run over the tasks in order in the accumulation
// type (fp32 for fp32/fp16/bf16 input, fp64 for fp64), and P is compared with U in that type, so the
// kept signs are the same on every CPU; with leak values other than 0 and 1 the last bit of the
// output may depend on whether the CPU fuses multiply-adds.
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../task_grads.h"

namespace mtlgrad {
namespace {

constexpr int64_t kChunk = 512;  // elements of one tensor handled together (fits in L1 for all tasks)

void check_graddrop_args(const TaskGradLayout& layout, at::TensorList grads, const at::Tensor& leak,
                         at::TensorList out) {
  const char* op = "mtlgrad.graddrop";
  const int64_t T = layout.num_tasks;
  const int64_t K = layout.num_tensors;
  TORCH_CHECK_VALUE(leak.dim() == 1 && leak.numel() == T, op, ": leak must have shape [", T,
                    "] (one value per task), got ", leak.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(leak.scalar_type()), op, ": leak must be a floating-point tensor, got ",
                   leak.scalar_type());
  TORCH_CHECK_VALUE(leak.device().is_cpu(), op, ": leak is on ", leak.device(), " but must be on cpu");
  const at::Tensor l = leak.to(at::kDouble).contiguous();
  for (const auto t : c10::irange(T)) {
    const double v = l.data_ptr<double>()[t];
    TORCH_CHECK_VALUE(v >= 0 && v <= 1, op, ": leak[", t, "] = ", v, " is outside [0, 1]");
  }
  check_outputs(op, layout, grads, out);
}

// Calls fn(k, first, last) for the pieces of the global element range [begin, end) that lie in
// tensor k (first, last: offsets within that tensor), in order.
template <typename Fn>
void for_each_piece(const TaskGradLayout& layout, int64_t begin, int64_t end, Fn&& fn) {
  const auto& offsets = layout.offsets;
  int64_t k = int64_t(std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin()) - 1;
  for (; begin < end; ++k) {
    const int64_t stop = std::min(end, offsets[size_t(k) + 1]);
    if (stop > begin) fn(k, begin - offsets[size_t(k)], stop - offsets[size_t(k)]);
    begin = stop;
  }
}

// The hot loops are compiled for AVX-512, AVX2 and the baseline, and the widest the CPU supports is
// chosen when the library loads (GCC function multi-versioning), like the kernels of the other ops.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MTLGRAD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MTLGRAD_CLONES
#endif

// The loops of one chunk, on restrict-qualified arrays so that they vectorise (not inlined: GCC
// drops `restrict` when it inlines), and branch-free: the signs and the uniforms are random, so
// branches on them would be mispredicted half the time.
template <typename scalar_t, typename acc_t>
MTLGRAD_CLONES [[gnu::noinline]] void add_sums(const scalar_t* __restrict g, acc_t* __restrict sum,
                                               acc_t* __restrict abs_sum, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const acc_t v = static_cast<acc_t>(g[j]);
    sum[j] += v;
    abs_sum[j] += std::abs(v);
  }
}

// keep[j] = 1 when the positive values of element j are kept: U < P.
template <typename acc_t>
MTLGRAD_CLONES [[gnu::noinline]] void choose_signs(const uint32_t* __restrict words,
                                                   const acc_t* __restrict sum,
                                                   const acc_t* __restrict abs_sum, acc_t* __restrict keep,
                                                   int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const acc_t u = static_cast<acc_t>(static_cast<int32_t>(words[j] >> 8)) * static_cast<acc_t>(0x1p-24);
    // An all-zero element (abs_sum 0, hence sum 0) gets P = ½; it sums to 0 whatever is kept. (A
    // max rather than a test: the compiler does not speculate a division, so a test would stop
    // the loop from vectorising.)
    const acc_t denominator = std::max(abs_sum[j], std::numeric_limits<acc_t>::min());
    const acc_t purity = acc_t(0.5) * (acc_t(1) + sum[j] / denominator);
    keep[j] = u < purity ? acc_t(1) : acc_t(0);
  }
}

template <typename scalar_t, typename acc_t>
MTLGRAD_CLONES [[gnu::noinline]] void add_kept(const scalar_t* __restrict g, const acc_t* __restrict keep,
                                               acc_t leak, acc_t* __restrict result, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const acc_t v = static_cast<acc_t>(g[j]);
    const acc_t positive = v > 0 ? acc_t(1) : acc_t(0), negative = v < 0 ? acc_t(1) : acc_t(0);
    const acc_t kept = negative + keep[j] * (positive - negative);  // M: 1 if v's sign is kept
    result[j] += (kept + (1 - kept) * leak) * v;                    // coefficient exactly 1 or leak
  }
}

// Philox4x32-10 words of blocks block0 .. block0 + count - 1 (counter (0, 0, lo, hi)(block), key
// (lo, hi)(seed)): the same words as four calls of at::Philox4_32(seed, block), written as a loop over
// blocks that the compiler can vectorise (tests/test_graddrop.py checks them against Random123's
// known answers).
MTLGRAD_CLONES [[gnu::noinline]] void philox_blocks(uint64_t seed, uint64_t block0, int64_t count,
                                                    uint32_t* __restrict words) {
  for (int64_t b = 0; b < count; ++b) {
    const uint64_t block = block0 + uint64_t(b);
    uint32_t c0 = 0, c1 = 0, c2 = uint32_t(block), c3 = uint32_t(block >> 32);
    uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      const uint64_t p0 = uint64_t(0xD2511F53u) * c0, p1 = uint64_t(0xCD9E8D57u) * c2;
      c0 = uint32_t(p1 >> 32) ^ c1 ^ k0;
      c1 = uint32_t(p1);
      c2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
      c3 = uint32_t(p0);
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    words[4 * b] = c0;
    words[4 * b + 1] = c1;
    words[4 * b + 2] = c2;
    words[4 * b + 3] = c3;
  }
}

template <typename scalar_t>
void graddrop_kernel(const TaskGradLayout& layout, const std::vector<const void*>& ptrs,
                     const std::vector<void*>& out_ptrs, const std::vector<double>& leak, uint64_t seed) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = layout.num_tasks, K = layout.num_tensors;
  const std::vector<acc_t> leak_acc(leak.begin(), leak.end());
  at::parallel_for(0, layout.numel_per_task(), 1 << 14, [&](int64_t begin, int64_t end) {
    alignas(64) acc_t sum[kChunk], abs_sum[kChunk], keep[kChunk], result[kChunk];
    alignas(64) uint32_t words[kChunk + 8];
    for_each_piece(layout, begin, end, [&](int64_t k, int64_t first, int64_t last) {
      for (int64_t base = first; base < last; base += kChunk) {
        const int64_t n = std::min(kChunk, last - base);
        const int64_t element0 = layout.offsets[size_t(k)] + base;  // global index of element base
        std::fill(sum, sum + n, acc_t(0));
        std::fill(abs_sum, abs_sum + n, acc_t(0));
        for (int64_t t = 0; t < T; ++t)
          add_sums(static_cast<const scalar_t*>(ptrs[size_t(t * K + k)]) + base, sum, abs_sum, n);
        // One Philox call gives the words of the 4 elements of a block; words[i] belongs to
        // element (element0 & ~3) + i.
        const int64_t block0 = element0 >> 2, skip = element0 & 3;
        philox_blocks(seed, uint64_t(block0), (skip + n + 3) / 4, words);
        choose_signs(words + skip, sum, abs_sum, keep, n);
        std::fill(result, result + n, acc_t(0));
        for (int64_t t = 0; t < T; ++t)
          add_kept(static_cast<const scalar_t*>(ptrs[size_t(t * K + k)]) + base, keep, leak_acc[size_t(t)],
                   result, n);
        scalar_t* o = static_cast<scalar_t*>(out_ptrs[size_t(k)]) + base;
        for (int64_t j = 0; j < n; ++j) o[j] = static_cast<scalar_t>(result[j]);
      }
    });
  });
}

// The bits of a value of each input type, and its exponent field: all ones for NaN and ±Inf.
template <typename scalar_t>
struct Bits;
template <>
struct Bits<float> {
  using type = uint32_t;
  static constexpr type exponent = 0x7f800000u;
};
template <>
struct Bits<double> {
  using type = uint64_t;
  static constexpr type exponent = 0x7ff0000000000000ull;
};
template <>
struct Bits<c10::Half> {
  using type = uint16_t;
  static constexpr type exponent = 0x7c00u;
};
template <>
struct Bits<c10::BFloat16> {
  using type = uint16_t;
  static constexpr type exponent = 0x7f80u;
};

// Whether g[0..n) holds a NaN or an Inf: an OR-reduction over integer tests, which vectorises
// (a floating-point test would be a serial reduction).
template <typename scalar_t>
MTLGRAD_CLONES [[gnu::noinline]] bool any_nonfinite(const scalar_t* __restrict g, int64_t n) {
  using U = typename Bits<scalar_t>::type;
  constexpr U exponent = Bits<scalar_t>::exponent;
  U bad = 0;
  for (int64_t j = 0; j < n; ++j) {
    U bits;
    std::memcpy(&bits, g + j, sizeof bits);
    bad |= U((bits & exponent) == exponent);
  }
  return bad != 0;
}

// For each task, the index (within its list) of the first tensor holding a NaN or Inf, or -1.
template <typename scalar_t>
std::vector<int64_t> first_nonfinite(const TaskGradLayout& layout, const std::vector<const void*>& ptrs) {
  const int64_t T = layout.num_tasks, K = layout.num_tensors, numel = layout.numel_per_task();
  const int64_t grain = 1 << 16;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), numel / grain + 1));
  constexpr int64_t none = std::numeric_limits<int64_t>::max();
  std::vector<int64_t> first(size_t(blocks * T), none);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for_each_piece(
          layout, b * numel / blocks, (b + 1) * numel / blocks, [&](int64_t k, int64_t lo, int64_t hi) {
            for (int64_t t = 0; t < T; ++t) {
              if (first[size_t(b * T + t)] != none) continue;  // pieces come in tensor order
              if (any_nonfinite(static_cast<const scalar_t*>(ptrs[size_t(t * K + k)]) + lo, hi - lo))
                first[size_t(b * T + t)] = k;
            }
          });
    }
  });
  std::vector<int64_t> result(size_t(T), -1);
  for (int64_t t = 0; t < T; ++t) {
    int64_t f = none;
    for (int64_t b = 0; b < blocks; ++b) f = std::min(f, first[size_t(b * T + t)]);
    if (f != none) result[size_t(t)] = f;
  }
  return result;
}

at::Tensor graddrop_cpu(at::TensorList grads, int64_t num_tasks, const at::Tensor& leak, int64_t seed,
                        bool check_finite, at::TensorList out) {
  const char* op = "mtlgrad.graddrop";
  const TaskGradLayout layout = check_task_grads(op, grads, num_tasks);
  check_graddrop_args(layout, grads, leak, out);
  at::Tensor nonfinite = at::full({num_tasks}, -1, at::TensorOptions().dtype(at::kLong));
  const int64_t K = layout.num_tensors;
  if (K == 0 || layout.numel_per_task() == 0) return nonfinite;
  TORCH_CHECK_VALUE(layout.device.is_cpu(), op, ": the CPU kernel got tensors on ", layout.device);

  std::vector<at::Tensor> keep;
  const std::vector<const void*> ptrs = contiguous_pointers(grads, keep);
  if (check_finite) {
    // A separate pass, so that nothing is written when a gradient holds NaN or Inf.
    std::vector<int64_t> first;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, layout.dtype, "graddrop_check",
                                    [&] { first = first_nonfinite<scalar_t>(layout, ptrs); });
    bool bad = false;
    for (int64_t t = 0; t < num_tasks; ++t) {
      nonfinite.data_ptr<int64_t>()[t] = first[size_t(t)];
      bad = bad || first[size_t(t)] >= 0;
    }
    if (bad) return nonfinite;
  }

  // Outputs that are not contiguous or that share memory with an input are computed into a fresh
  // tensor and copied at the end.
  std::vector<at::Tensor> staged;
  const std::vector<void*> out_ptrs = output_pointers(layout, grads, out, staged);
  const at::Tensor l = leak.to(at::kDouble).contiguous();
  const std::vector<double> leak_values(l.data_ptr<double>(), l.data_ptr<double>() + num_tasks);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, layout.dtype, "graddrop", [&] {
    graddrop_kernel<scalar_t>(layout, ptrs, out_ptrs, leak_values, static_cast<uint64_t>(seed));
  });
  copy_staged(out, staged);
  return nonfinite;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtlgrad, CPU, m) { m.impl("graddrop", &graddrop_cpu); }

}  // namespace mtlgrad
