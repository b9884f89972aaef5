// Vector layer for the CPU kernels: native-width GCC vector types, unaligned loads and stores,
// and conversions of fp16 / bf16 to and from fp32. Included only by the per-instruction-set
// kernel translation units, inside their own namespace, and selected by the compiler flags of
// that unit (-mavx512f..., -mavx2 -mfma -mf16c, or the x86-64 / aarch64 baseline).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#ifndef MTLGRAD_ISA
#error "define MTLGRAD_ISA (the instruction set's namespace) before including simd.h"
#endif

// Everything below lives in the instruction set's own namespace, so the copies compiled with
// different flags never meet at link time.
namespace mtlgrad::cpu::MTLGRAD_ISA {

// Storage types of the 16-bit inputs (bit patterns; arithmetic is done in fp32).
struct Half16 {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#elif defined(__AVX2__)
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;
#endif

typedef float FloatVec __attribute__((vector_size(kVectorBytes)));
typedef double DoubleVec __attribute__((vector_size(kVectorBytes)));
typedef float HalfFloatVec __attribute__((vector_size(kVectorBytes / 2)));  // one DoubleVec's floats

template <typename S>
struct Simd;

template <>
struct Simd<float> {
  using V = FloatVec;
  static constexpr int W = kVectorBytes / 4;
};

template <>
struct Simd<double> {
  using V = DoubleVec;
  static constexpr int W = kVectorBytes / 8;
};

template <typename V, typename S>
static inline V vload(const S* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename S>
static inline void vstore(S* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// Sum of the lanes by halving, in a fixed order (results are reproducible run to run). Shuffles,
// not memory: taking the accumulators' address would keep them out of registers.
template <typename S, typename V>
static inline S hsum(V v) {
  constexpr int w = int(sizeof(V) / sizeof(S));
  if constexpr (w == 16) {
    return hsum<S>(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                   __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
  } else if constexpr (w == 8) {
    return hsum<S>(__builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7));
  } else if constexpr (w == 4) {
    return (v[0] + v[2]) + (v[1] + v[3]);
  } else {
    static_assert(w == 2, "unexpected vector width");
    return v[0] + v[1];
  }
}

// ---- scalar conversions ------------------------------------------------------------------

static inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

static inline float to_float(BFloat16 x) { return bits_to_float(uint32_t(x.bits) << 16); }

static inline BFloat16 bfloat16_from_float(float f) {
  // Round to nearest even; NaN becomes a quiet NaN (as c10::BFloat16 does).
  if (std::isnan(f)) return BFloat16{0x7fc0};
  const uint32_t u = float_to_bits(f);
  return BFloat16{uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

#if defined(__AVX2__) || defined(__AVX512F__)
static inline float to_float(Half16 x) { return _cvtsh_ss(x.bits); }
static inline Half16 half_from_float(float f) {
  return Half16{uint16_t(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT))};
}
#else
static inline float to_float(Half16 x) {
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    // Zero or subnormal: exactly mantissa * 2^-24.
    const float magnitude = float(mantissa) * 5.9604644775390625e-08f;
    return sign ? -magnitude : magnitude;
  }
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

static inline Half16 half_from_float(float f) {
  // Round to nearest even with overflow to infinity and gradual underflow.
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return Half16{uint16_t(sign | 0x7e00u)};   // NaN
  if (a >= 0x477ff000u) return Half16{uint16_t(sign | 0x7c00u)};  // >= 65520: infinity
  if (a < 0x38800000u) {                                          // below 2^-14: subnormal
    // Adding 0.5 moves the value into the binade where the float's last mantissa bits are the
    // half's subnormal bits, and the float addition rounds to nearest even for us.
    const float shifted = bits_to_float(a) + 0.5f;
    return Half16{uint16_t(sign | (float_to_bits(shifted) - 0x3f000000u))};
  }
  const uint32_t rounded = a + 0x0fffu + ((a >> 13) & 1u) - 0x38000000u;
  return Half16{uint16_t(sign | (rounded >> 13))};
}
#endif

static inline float to_float(float x) { return x; }
static inline double to_double(double x) { return x; }

template <typename In>
static inline double to_double(In x) {
  return double(to_float(x));
}

template <typename S>
static inline S narrow(S x, const S*) {
  return x;
}
static inline Half16 narrow(float x, const Half16*) { return half_from_float(x); }
static inline BFloat16 narrow(float x, const BFloat16*) { return bfloat16_from_float(x); }

// ---- vector loads with conversion to the working precision S --------------------------------

template <typename S>
static inline typename Simd<S>::V load_as(const S* p) {
  return vload<typename Simd<S>::V>(p);
}

template <typename S>
static inline void store_from(S* p, typename Simd<S>::V v) {
  vstore(p, v);
}

#if defined(__AVX512F__)
static inline FloatVec load_as(const Half16* p) {
  return FloatVec(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
}
static inline FloatVec load_as(const BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return FloatVec(_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)));
}
static inline void store_from(Half16* p, FloatVec v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(__m512(v), _MM_FROUND_TO_NEAREST_INT));
}
static inline void store_from(BFloat16* p, FloatVec v) {
  const __m512i u = _mm512_castps_si512(__m512(v));
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(__m512(v), __m512(v), _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}
#elif defined(__AVX2__)
static inline FloatVec load_as(const Half16* p) {
  return FloatVec(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
static inline FloatVec load_as(const BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return FloatVec(_mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
}
static inline void store_from(Half16* p, FloatVec v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(__m256(v), _MM_FROUND_TO_NEAREST_INT));
}
static inline void store_from(BFloat16* p, FloatVec v) {
  const __m256i u = _mm256_castps_si256(__m256(v));
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(__m256(v), __m256(v), _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
  // Values fit in 16 bits, so the saturating pack is exact; it works per 128-bit lane.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xd8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
#else
template <typename In>
static inline FloatVec load_converted(const In* p) {
  FloatVec v;
#pragma GCC unroll 16
  for (int i = 0; i < Simd<float>::W; ++i) v[i] = to_float(p[i]);
  return v;
}
template <typename Out>
static inline void store_converted(Out* p, FloatVec v) {
#pragma GCC unroll 16
  for (int i = 0; i < Simd<float>::W; ++i) p[i] = narrow(v[i], p);
}
static inline FloatVec load_as(const Half16* p) { return load_converted(p); }
static inline FloatVec load_as(const BFloat16* p) { return load_converted(p); }
static inline void store_from(Half16* p, FloatVec v) { store_converted(p, v); }
static inline void store_from(BFloat16* p, FloatVec v) { store_converted(p, v); }
#endif

// ---- fp64 from and to any input type, a FloatVec's worth of elements at a time ---------------

// The Simd<float>::W elements at p, converted exactly, as two vectors of doubles.
template <typename In>
static inline void load_as_doubles(const In* p, DoubleVec& low, DoubleVec& high) {
  const FloatVec x = load_as(p);
  HalfFloatVec a, b;
  std::memcpy(&a, &x, sizeof(a));
  std::memcpy(&b, reinterpret_cast<const char*>(&x) + sizeof(a), sizeof(b));
  low = __builtin_convertvector(a, DoubleVec);
  high = __builtin_convertvector(b, DoubleVec);
}

// Stores two vectors of doubles as Simd<float>::W elements of type Out (through fp32 for the 16-bit
// types: rounded twice, which can differ from one rounding in the last bit of a tie).
template <typename Out>
static inline void store_from_doubles(Out* p, DoubleVec low, DoubleVec high) {
  const HalfFloatVec a = __builtin_convertvector(low, HalfFloatVec);
  const HalfFloatVec b = __builtin_convertvector(high, HalfFloatVec);
  FloatVec x;
  std::memcpy(&x, &a, sizeof(a));
  std::memcpy(reinterpret_cast<char*>(&x) + sizeof(a), &b, sizeof(b));
  store_from(p, x);
}

}  // namespace mtlgrad::cpu::MTLGRAD_ISA
