// Small dense float64 linear algebra for the solvers on the T x T Gram matrix (T up to a few
// hundred): a row-major matrix type, conversions from and to tensors, trace normalisation, a
// symmetric eigen-decomposition and the pseudo-inverse built on it, linear solves.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace mtlgrad::solvers {

struct Matrix {
  int64_t n = 0;
  std::vector<double> data;  // row-major n x n

  Matrix() = default;
  explicit Matrix(int64_t size, double fill = 0.0) : n(size), data(static_cast<size_t>(size * size), fill) {}
  double& operator()(int64_t i, int64_t j) { return data[size_t(i * n + j)]; }
  double operator()(int64_t i, int64_t j) const { return data[size_t(i * n + j)]; }
  static Matrix identity(int64_t size);
};

using Vector = std::vector<double>;

// Checks that `gram` is a square, float64, CPU tensor (`op` names the solver in errors) and copies
// it, symmetrised ((G + Gᵀ) / 2).
Matrix gram_matrix(const at::Tensor& gram, const char* op);

// Divides G by its mean diagonal entry (a scale-free problem: inputs scaled by 1e-15 or 1e15 give
// the same weights); returns that scale, or 0 for a zero (or non-positive-trace) G, left as is.
double normalise_trace(Matrix& G);

// Float64 CPU tensor holding v.
at::Tensor to_tensor(const Vector& v);

// y = A x
Vector multiply(const Matrix& A, const Vector& x);
double dot(const Vector& a, const Vector& b);

// Σ a_t b_t over n values with four independent partial sums: the compiler may not reorder a
// floating-point reduction itself, and one running sum is bound by the adder's latency. Fixed
// order: results depend on nothing but the inputs.
inline double dot(const double* a, const double* b, int64_t n) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) {
    s0 += a[t] * b[t];
    s1 += a[t + 1] * b[t + 1];
    s2 += a[t + 2] * b[t + 2];
    s3 += a[t + 3] * b[t + 3];
  }
  for (; t < n; ++t) s0 += a[t] * b[t];
  return (s0 + s1) + (s2 + s3);
}

// Symmetric eigen-decomposition A = V diag(values) Vᵀ, values ascending, eigenvectors in the
// columns of V: cyclic Jacobi rotations up to 32 x 32 (accurate to a few ulps of ||A||, and
// cheaper than a library call at that size), LAPACK's syevd through torch above.
void symmetric_eigen(const Matrix& A, Vector& values, Matrix& vectors);

// Moore-Penrose pseudo-inverse of a symmetric matrix; eigenvalues below rtol * max |eigenvalue|
// count as zero.
Matrix symmetric_pseudo_inverse(const Matrix& A, double rtol = 1e-10);

// Solves A x = b for a general square A by Gaussian elimination with partial pivoting. Returns
// false (x unspecified) when a pivot falls below rtol * max |A_ij|.
bool solve(Matrix A, Vector b, Vector& x, double rtol = 1e-13);

}  // namespace mtlgrad::solvers
