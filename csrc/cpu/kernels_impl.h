// The CPU kernels, written once and compiled once per instruction set (see kernels_*.cpp).
//
// gram: for every chunk of L elements (L = gram_chunk_elements), the T x T products are formed
// from register tiles: a symmetric tile over a group of up to kGroup tasks (its N(N+1)/2 unique
// pairs), and rectangular tiles of kRectRows x kGroup tasks between groups. Every tile keeps its
// accumulators in registers for the whole chunk, so exactly the T(T+1)/2 unique pairs are
// computed, the chunk stays in L1/L2 while the tiles re-read it, and each chunk's fp32 (fp64
// for fp64 input) sums are added to the fp64 result in chunk order. A chunk whose fp32 sums
// overflow (finite input) or may have underflowed (precision.h) is summed again in fp64.
//
// combine: out = sum_t w_t g_t (or out += ...) over pieces of at most kCombineBlock elements of one
// tensor, four tasks per pass over the piece, accumulated in fp32 (fp64 for fp64 input, and for
// any input when a weight lies outside fp32's safe band, see precision.h).
#pragma once

#include <cstdlib>
#include <type_traits>

#include "../precision.h"
#include "kernels.h"
#include "simd.h"

namespace mtlgrad::cpu::MTLGRAD_ISA {

#if defined(__AVX512F__)
// 32 vector registers: a 4-task symmetric tile holds 10 accumulators + 4 rows, a 4 x 4
// rectangular tile 16 accumulators + 4 columns + 1 row. Groups of 6 (21 and 24 accumulators) need
// fewer passes for large T, but more for T = 8, where they measured 1.3x slower.
constexpr int kGroup = 4;
constexpr int kRectRows = 4;
#else
// 16 vector registers: 10 accumulators + 4 rows, and 2 x 4 = 8 accumulators + 4 columns + 1 row.
constexpr int kGroup = 4;
constexpr int kRectRows = 2;
#endif

// Packed chunks are zero-padded to this many elements, so every tile loop runs whole vectors
// (and whole unrolled steps).
constexpr int64_t kPad = 64;
constexpr int64_t kCombineBlock = 2048;

template <typename T>
struct Buffer {
  T* data;
  explicit Buffer(int64_t n) : data(static_cast<T*>(std::malloc(sizeof(T) * size_t(n > 0 ? n : 1)))) {}
  ~Buffer() { std::free(data); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

template <typename V, typename S>
static inline V broadcast(S x) {
  V v;
#pragma GCC unroll 16
  for (int i = 0; i < int(sizeof(V) / sizeof(S)); ++i) v[i] = x;
  return v;
}

template <typename S, typename In>
static inline S scalar_as(In x) {
  if constexpr (std::is_same_v<S, double>) {
    return to_double(x);
  } else {
    return to_float(x);
  }
}

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// ---- Gram tiles -----------------------------------------------------------------------------

// Unique products of N rows over n elements (n a multiple of kPad); out gets the N(N+1)/2 sums
// in packed row-major order. Small tiles unroll over elements so that enough independent
// accumulators hide the FMA latency. Tiles are not inlined: each is register-allocated on its
// own, which keeps every accumulator in a register.
template <typename S, int N>
__attribute__((noinline)) static void symmetric_tile(const S* const* rows, int64_t n, S* out) {
  using V = typename Simd<S>::V;
  constexpr int W = Simd<S>::W;
  constexpr int M = N * (N + 1) / 2;
  constexpr int U = M >= 8 ? 1 : (M >= 3 ? 2 : 4);
  V acc[U][M];
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 32
    for (int q = 0; q < M; ++q) acc[u][q] = V{};
  for (int64_t e = 0; e < n; e += U * W) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      V x[N];
#pragma GCC unroll 8
      for (int i = 0; i < N; ++i) x[i] = vload<V>(rows[i] + e + u * W);
#pragma GCC unroll 8
      for (int i = 0; i < N; ++i)
#pragma GCC unroll 8
        for (int j = i; j < N; ++j) acc[u][i * N - i * (i - 1) / 2 + (j - i)] += x[i] * x[j];
    }
  }
#pragma GCC unroll 32
  for (int q = 0; q < M; ++q) {
    V total = acc[0][q];
#pragma GCC unroll 4
    for (int u = 1; u < U; ++u) total += acc[u][q];
    out[q] = hsum<S>(total);
  }
}

// Products of A rows with B columns over n elements; out gets A x B sums, row-major.
template <typename S, int A, int B>
__attribute__((noinline)) static void rectangular_tile(const S* const* rows, const S* const* cols, int64_t n,
                                                       S* out) {
  using V = typename Simd<S>::V;
  constexpr int W = Simd<S>::W;
  constexpr int U = A * B >= 8 ? 1 : 2;
  V acc[U][A][B];
#pragma GCC unroll 2
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
    for (int i = 0; i < A; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < B; ++j) acc[u][i][j] = V{};
  for (int64_t e = 0; e < n; e += U * W) {
#pragma GCC unroll 2
    for (int u = 0; u < U; ++u) {
      V y[B];
#pragma GCC unroll 8
      for (int j = 0; j < B; ++j) y[j] = vload<V>(cols[j] + e + u * W);
#pragma GCC unroll 8
      for (int i = 0; i < A; ++i) {
        const V x = vload<V>(rows[i] + e + u * W);
#pragma GCC unroll 8
        for (int j = 0; j < B; ++j) acc[u][i][j] += x * y[j];
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < A; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < B; ++j) {
      V total = acc[0][i][j];
#pragma GCC unroll 2
      for (int u = 1; u < U; ++u) total += acc[u][i][j];
      out[i * B + j] = hsum<S>(total);
    }
}

template <typename S>
static void run_symmetric(int size, const S* const* rows, int64_t n, S* out) {
  switch (size) {
    case 1:
      return symmetric_tile<S, 1>(rows, n, out);
    case 2:
      return symmetric_tile<S, 2>(rows, n, out);
    case 3:
      return symmetric_tile<S, 3>(rows, n, out);
    case 4:
      return symmetric_tile<S, 4>(rows, n, out);
  }
  if constexpr (kGroup >= 6) {
    switch (size) {
      case 5:
        return symmetric_tile<S, 5>(rows, n, out);
      case 6:
        return symmetric_tile<S, 6>(rows, n, out);
    }
  }
  std::abort();  // unreachable: size <= kGroup
}

template <typename S, int A>
static void run_rectangular_cols(int b, const S* const* rows, const S* const* cols, int64_t n, S* out) {
  switch (b) {
    case 1:
      return rectangular_tile<S, A, 1>(rows, cols, n, out);
    case 2:
      return rectangular_tile<S, A, 2>(rows, cols, n, out);
    case 3:
      return rectangular_tile<S, A, 3>(rows, cols, n, out);
    case 4:
      return rectangular_tile<S, A, 4>(rows, cols, n, out);
  }
  if constexpr (kGroup >= 6) {
    switch (b) {
      case 5:
        return rectangular_tile<S, A, 5>(rows, cols, n, out);
      case 6:
        return rectangular_tile<S, A, 6>(rows, cols, n, out);
    }
  }
  std::abort();
}

template <typename S>
static void run_rectangular(int a, int b, const S* const* rows, const S* const* cols, int64_t n, S* out) {
  switch (a) {
    case 1:
      return run_rectangular_cols<S, 1>(b, rows, cols, n, out);
    case 2:
      return run_rectangular_cols<S, 2>(b, rows, cols, n, out);
  }
  if constexpr (kRectRows >= 4) {
    switch (a) {
      case 3:
        return run_rectangular_cols<S, 3>(b, rows, cols, n, out);
      case 4:
        return run_rectangular_cols<S, 4>(b, rows, cols, n, out);
    }
  }
  std::abort();
}

// All T(T+1)/2 products of rows[0..T) over n elements into sums (packed upper triangle).
template <typename S>
static void chunk_products(const S* const* rows, int64_t T, int64_t n, S* sums) {
  S tile[kGroup * kGroup];
  for (int64_t g0 = 0; g0 < T; g0 += kGroup) {
    const int gs = int(min64(kGroup, T - g0));
    run_symmetric<S>(gs, rows + g0, n, tile);
    int q = 0;
    for (int i = 0; i < gs; ++i)
      for (int j = i; j < gs; ++j) sums[pair_index(g0 + i, g0 + j, T)] = tile[q++];
    // Rows r0.. of this group stay hot in L1 while the column groups stream past them.
    for (int64_t r0 = g0; r0 < g0 + gs; r0 += kRectRows) {
      const int rs = int(min64(kRectRows, g0 + gs - r0));
      for (int64_t h0 = g0 + kGroup; h0 < T; h0 += kGroup) {
        const int hs = int(min64(kGroup, T - h0));
        run_rectangular<S>(rs, hs, rows + r0, rows + h0, n, tile);
        for (int i = 0; i < rs; ++i)
          for (int j = 0; j < hs; ++j) sums[pair_index(r0 + i, h0 + j, T)] = tile[i * hs + j];
      }
    }
  }
}

// ---- conversions of a run of elements -------------------------------------------------------

template <typename In, typename S>
static inline void convert_run(const In* src, S* dst, int64_t n, int64_t prefetch_distance) {
  if constexpr (std::is_same_v<In, S>) {
    std::memcpy(dst, src, sizeof(S) * size_t(n));
  } else {
    using V = typename Simd<S>::V;
    constexpr int W = Simd<S>::W;
    int64_t e = 0;
    for (; e + W <= n; e += W) {
      // The same row of the next chunk: the packing pass is the only one that touches DRAM, and
      // its short per-row runs are too short for the hardware prefetcher (bf16 at T = 8 measured
      // 1.7x faster with this). Prefetches never fault, even past the tensor's end.
      __builtin_prefetch(src + e + prefetch_distance, 0, 3);
      vstore(dst + e, V(load_as(src + e)));
    }
    for (; e < n; ++e) dst[e] = scalar_as<S>(src[e]);
  }
}

// ---- gram -----------------------------------------------------------------------------------

// Whether any of x[0..n) (n a multiple of the vector width) is nonzero (-0 counts as zero).
static inline bool any_nonzero(const float* x, int64_t n) {
  typedef uint32_t Bits __attribute__((vector_size(kVectorBytes)));
  constexpr int W = Simd<float>::W;
  Bits any{};
  for (int64_t e = 0; e < n; e += W) any |= vload<Bits>(x + e);
  any &= broadcast<Bits>(uint32_t(0x7fffffffu));
  for (int i = 0; i < W; ++i)
    if (any[i] != 0) return true;
  return false;
}

// Whether some task's fp32 products over a chunk may have underflowed (see precision.h): its sum
// of squares is below the bound while one of its elements is nonzero.
template <typename S>
static bool chunk_underflowed(const S* const* rows, int64_t T, int64_t padded, const S* sums) {
  if constexpr (std::is_same_v<S, double>) {
    return false;
  } else {
    for (int64_t t = 0; t < T; ++t)
      if (sums[pair_index(t, t, T)] < kTinyChunkSumOfSquares && any_nonzero(rows[t], padded)) return true;
    return false;
  }
}

template <typename In, typename S>
static void gram_chunks(const TaskTensors& g, int64_t chunk_begin, int64_t chunk_end, double* gram,
                        int64_t* first_nonfinite) {
  const int64_t T = g.num_tasks;
  const int64_t K = g.num_tensors;
  const int64_t* off = g.offsets;
  const int64_t total = off[K];
  const int64_t L = gram_chunk_elements(T, g.dtype);
  const int64_t pairs = num_pairs(T);
  Buffer<S> scratch(T * L);
  Buffer<S> sums(pairs);
  Buffer<const S*> rows(T);
  // fp64 copies of a chunk whose fp32 sums over- or underflowed (allocated, never touched, for
  // the chunks that do not).
  constexpr bool narrow = !std::is_same_v<S, double>;
  Buffer<double> wide(narrow ? T * L : 0);
  Buffer<double> wide_sums(narrow ? pairs : 0);
  Buffer<const double*> wide_rows(narrow ? T : 0);

  int64_t k = 0;  // the tensor holding the chunk's first element
  for (int64_t c = chunk_begin; c < chunk_end; ++c) {
    const int64_t e0 = c * L;
    const int64_t e1 = min64(e0 + L, total);
    if (e0 >= e1) break;
    while (off[k + 1] <= e0) ++k;
    const int64_t n = e1 - e0;
    int64_t padded = n;
    if (std::is_same_v<In, S> && e1 <= off[k + 1] && n % kPad == 0) {
      // The chunk lies inside one tensor: read it where it is.
      for (int64_t t = 0; t < T; ++t) rows.data[t] = static_cast<const S*>(g.data[t * K + k]) + (e0 - off[k]);
    } else {
      // Gather the chunk (it spans tensors, needs conversion, or ends in a partial vector).
      padded = (n + kPad - 1) / kPad * kPad;
      for (int64_t t = 0; t < T; ++t) {
        S* dst = scratch.data + t * L;
        int64_t kk = k;
        for (int64_t pos = e0; pos < e1;) {
          while (off[kk + 1] <= pos) ++kk;
          const int64_t m = min64(e1, off[kk + 1]) - pos;
          convert_run(static_cast<const In*>(g.data[t * K + kk]) + (pos - off[kk]), dst + (pos - e0), m, L);
          pos += m;
        }
        for (int64_t e = n; e < padded; ++e) dst[e] = S(0);
        rows.data[t] = dst;
      }
    }

    chunk_products<S>(rows.data, T, padded, sums.data);

    bool finite = true;
    for (int64_t p = 0; p < pairs; ++p) finite &= bool(std::isfinite(sums.data[p]));
    // Either some task has NaN/Inf here (report it, keep the non-finite sums), or the fp32 sums
    // overflowed or underflowed: then redo this chunk in fp64.
    bool redo = finite ? chunk_underflowed<S>(rows.data, T, padded, sums.data) : narrow;
    if (!finite) {
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t e = 0; e < n; ++e) {
          if (!std::isfinite(rows.data[t][e])) {
            int64_t kk = k;
            while (off[kk + 1] <= e0 + e) ++kk;
            if (kk < first_nonfinite[t]) first_nonfinite[t] = kk;
            redo = false;
            break;
          }
        }
      }
    }
    if constexpr (narrow) {
      if (redo) {
        for (int64_t t = 0; t < T; ++t) {
          double* dst = wide.data + t * L;
          for (int64_t e = 0; e < padded; ++e) dst[e] = double(rows.data[t][e]);
          wide_rows.data[t] = dst;
        }
        chunk_products<double>(wide_rows.data, T, padded, wide_sums.data);
        for (int64_t p = 0; p < pairs; ++p) gram[p] += wide_sums.data[p];
        continue;
      }
    }
    for (int64_t p = 0; p < pairs; ++p) gram[p] += double(sums.data[p]);
  }
}

static void gram(const TaskTensors& g, int64_t chunk_begin, int64_t chunk_end, double* out,
                 int64_t* first_nonfinite) {
  switch (g.dtype) {
    case DType::Float32:
      return gram_chunks<float, float>(g, chunk_begin, chunk_end, out, first_nonfinite);
    case DType::Float64:
      return gram_chunks<double, double>(g, chunk_begin, chunk_end, out, first_nonfinite);
    case DType::Float16:
      return gram_chunks<Half16, float>(g, chunk_begin, chunk_end, out, first_nonfinite);
    case DType::BFloat16:
      return gram_chunks<BFloat16, float>(g, chunk_begin, chunk_end, out, first_nonfinite);
  }
}

// ---- combine --------------------------------------------------------------------------------

// Whether 16- or 32-bit input In is summed in fp64 (weights outside the fp32-safe band, see
// precision.h): its vectors are then converted a FloatVec at a time, into two DoubleVecs.
template <typename In, typename S>
constexpr bool kWidened = std::is_same_v<S, double> && !std::is_same_v<In, double>;

// dst[0..n) (+)= sum_j w[j] * rows[j][0..n) for M rows; `first` overwrites instead of adding.
template <typename In, typename S, int M>
static inline void weighted_rows(S* dst, const In* const* rows, const S* w, int64_t n, bool first) {
  using V = typename Simd<S>::V;
  int64_t e = 0;
  V wv[M];
#pragma GCC unroll 4
  for (int j = 0; j < M; ++j) wv[j] = broadcast<V>(w[j]);
  if constexpr (kWidened<In, S>) {
    constexpr int W = Simd<float>::W;
    constexpr int H = Simd<double>::W;
    for (; e + W <= n; e += W) {
      V low = first ? V{} : vload<V>(dst + e);
      V high = first ? V{} : vload<V>(dst + e + H);
#pragma GCC unroll 4
      for (int j = 0; j < M; ++j) {
        V a, b;
        load_as_doubles(rows[j] + e, a, b);
        low += wv[j] * a;
        high += wv[j] * b;
      }
      vstore(dst + e, low);
      vstore(dst + e + H, high);
    }
  } else {
    constexpr int W = Simd<S>::W;
    for (; e + W <= n; e += W) {
      V s = first ? V{} : vload<V>(dst + e);
#pragma GCC unroll 4
      for (int j = 0; j < M; ++j) s += wv[j] * V(load_as(rows[j] + e));
      vstore(dst + e, s);
    }
  }
  for (; e < n; ++e) {
    S s = first ? S(0) : dst[e];
#pragma GCC unroll 4
    for (int j = 0; j < M; ++j) s += w[j] * scalar_as<S>(rows[j][e]);
    dst[e] = s;
  }
}

// dst[0..n) = src[0..n) in the working precision S.
template <typename In, typename S>
static inline void widen_run(const In* src, S* dst, int64_t n) {
  int64_t e = 0;
  if constexpr (kWidened<In, S>) {
    constexpr int W = Simd<float>::W;
    for (; e + W <= n; e += W) {
      DoubleVec low, high;
      load_as_doubles(src + e, low, high);
      vstore(dst + e, low);
      vstore(dst + e + Simd<double>::W, high);
    }
  } else {
    constexpr int W = Simd<S>::W;
    for (; e + W <= n; e += W) vstore(dst + e, typename Simd<S>::V(load_as(src + e)));
  }
  for (; e < n; ++e) dst[e] = scalar_as<S>(src[e]);
}

// dst[0..n) = src[0..n) rounded to In.
template <typename In, typename S>
static inline void narrow_run(const S* src, In* dst, int64_t n) {
  int64_t e = 0;
  if constexpr (kWidened<In, S>) {
    constexpr int W = Simd<float>::W;
    for (; e + W <= n; e += W)
      store_from_doubles(dst + e, vload<DoubleVec>(src + e), vload<DoubleVec>(src + e + Simd<double>::W));
    for (; e < n; ++e) dst[e] = narrow(float(src[e]), dst);
  } else {
    constexpr int W = Simd<S>::W;
    for (; e + W <= n; e += W) store_from(dst + e, vload<typename Simd<S>::V>(src + e));
    for (; e < n; ++e) dst[e] = narrow(src[e], dst);
  }
}

template <typename In, typename S>
static void combine_range(const TaskTensors& g, const double* weights, void* const* out, int64_t begin,
                          int64_t end, bool accumulate) {
  const int64_t T = g.num_tasks;
  const int64_t K = g.num_tensors;
  const int64_t* off = g.offsets;
  Buffer<S> w(T);
  for (int64_t t = 0; t < T; ++t) w.data[t] = S(weights[t]);
  Buffer<S> acc(std::is_same_v<In, S> ? 0 : kCombineBlock);

  int64_t k = 0;
  for (int64_t pos = begin; pos < end;) {
    while (off[k + 1] <= pos) ++k;
    const int64_t n = min64(min64(end, off[k + 1]), pos + kCombineBlock) - pos;
    const int64_t local = pos - off[k];
    S* dst;
    if constexpr (std::is_same_v<In, S>) {
      dst = static_cast<S*>(out[k]) + local;
    } else {
      dst = acc.data;
      // out's values join the sum in the working precision.
      if (accumulate) widen_run<In, S>(static_cast<const In*>(out[k]) + local, dst, n);
    }
    for (int64_t t0 = 0; t0 < T; t0 += 4) {
      const In* rows[4];
      const int m = int(min64(4, T - t0));
      for (int j = 0; j < m; ++j) rows[j] = static_cast<const In*>(g.data[(t0 + j) * K + k]) + local;
      const bool first = t0 == 0 && !accumulate;
      switch (m) {
        case 1:
          weighted_rows<In, S, 1>(dst, rows, w.data + t0, n, first);
          break;
        case 2:
          weighted_rows<In, S, 2>(dst, rows, w.data + t0, n, first);
          break;
        case 3:
          weighted_rows<In, S, 3>(dst, rows, w.data + t0, n, first);
          break;
        default:
          weighted_rows<In, S, 4>(dst, rows, w.data + t0, n, first);
          break;
      }
    }
    if constexpr (!std::is_same_v<In, S>) narrow_run<In, S>(dst, static_cast<In*>(out[k]) + local, n);
    pos += n;
  }
}

static void combine(const TaskTensors& g, const double* weights, void* const* out, int64_t begin, int64_t end,
                    bool accumulate) {
  bool wide = false;
  for (int64_t t = 0; t < g.num_tasks; ++t) wide |= needs_wide_combine(weights[t]);
  switch (g.dtype) {
    case DType::Float32:
      return wide ? combine_range<float, double>(g, weights, out, begin, end, accumulate)
                  : combine_range<float, float>(g, weights, out, begin, end, accumulate);
    case DType::Float64:
      return combine_range<double, double>(g, weights, out, begin, end, accumulate);
    case DType::Float16:
      return wide ? combine_range<Half16, double>(g, weights, out, begin, end, accumulate)
                  : combine_range<Half16, float>(g, weights, out, begin, end, accumulate);
    case DType::BFloat16:
      return wide ? combine_range<BFloat16, double>(g, weights, out, begin, end, accumulate)
                  : combine_range<BFloat16, float>(g, weights, out, begin, end, accumulate);
  }
}

}  // namespace mtlgrad::cpu::MTLGRAD_ISA

// Defines the instruction set's entry point, e.g. mtlgrad::cpu::avx2_kernels().
#define MTLGRAD_DEFINE_KERNELS(isa)                                \
  namespace mtlgrad::cpu {                                         \
  const Kernels& isa##_kernels() {                                 \
    static const Kernels kernels{#isa, &isa::gram, &isa::combine}; \
    return kernels;                                                \
  }                                                                \
  }
