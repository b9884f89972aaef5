#include "dense.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/linalg_eigh.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <numeric>

namespace mtlgrad::solvers {

Matrix Matrix::identity(int64_t size) {
  Matrix m(size);
  for (int64_t i = 0; i < size; ++i) m(i, i) = 1.0;
  return m;
}

Matrix gram_matrix(const at::Tensor& gram, const char* op) {
  TORCH_CHECK_VALUE(gram.dim() == 2 && gram.size(0) == gram.size(1), op,
                    ": expected a square T x T Gram matrix, got shape ", gram.sizes());
  TORCH_CHECK_VALUE(gram.size(0) >= 1, op, ": the Gram matrix is empty (no tasks)");
  TORCH_CHECK_TYPE(gram.scalar_type() == at::kDouble, op, ": the Gram matrix must be float64, got ",
                   gram.scalar_type());
  TORCH_CHECK_VALUE(gram.device().is_cpu(), op, ": the solvers run on the CPU; got a Gram matrix on ",
                    gram.device());
  const at::Tensor g = gram.contiguous();
  const double* p = g.data_ptr<double>();
  const int64_t n = g.size(0);
  Matrix m(n);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      const double v = 0.5 * (p[i * n + j] + p[j * n + i]);
      TORCH_CHECK_VALUE(std::isfinite(v), op, ": the Gram matrix holds NaN or Inf at (", i, ", ", j,
                        "): the task gradients or their products are not finite");
      m(i, j) = v;
    }
  }
  return m;
}

double normalise_trace(Matrix& G) {
  double trace = 0;
  for (int64_t i = 0; i < G.n; ++i) trace += G(i, i);
  const double scale = trace / double(G.n);
  if (!(scale > 0) || !std::isfinite(scale)) return 0.0;
  for (double& v : G.data) v /= scale;
  return scale;
}

at::Tensor to_tensor(const Vector& v) {
  at::Tensor t = at::empty({int64_t(v.size())}, at::TensorOptions().dtype(at::kDouble));
  std::copy(v.begin(), v.end(), t.data_ptr<double>());
  return t;
}

Vector multiply(const Matrix& A, const Vector& x) {
  Vector y(size_t(A.n), 0.0);
  for (int64_t i = 0; i < A.n; ++i) {
    double s = 0;
    for (int64_t j = 0; j < A.n; ++j) s += A(i, j) * x[size_t(j)];
    y[size_t(i)] = s;
  }
  return y;
}

double dot(const Vector& a, const Vector& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

namespace {

// LAPACK's divide-and-conquer (syevd, through torch): O(n³) with a small constant, for the sizes
// where Jacobi's sweeps cost too much (T = 128: about 1.3 ms against 26 ms).
void lapack_eigen(const Matrix& input, Vector& values, Matrix& vectors) {
  const int64_t n = input.n;
  at::Tensor a = at::empty({n, n}, at::TensorOptions().dtype(at::kDouble));
  std::copy(input.data.begin(), input.data.end(), a.data_ptr<double>());
  const auto [w, v] = at::linalg_eigh(a);
  const at::Tensor wc = w.contiguous(), vc = v.contiguous();
  values.assign(wc.data_ptr<double>(), wc.data_ptr<double>() + n);
  vectors = Matrix(n);
  std::copy(vc.data_ptr<double>(), vc.data_ptr<double>() + n * n, vectors.data.begin());
}

constexpr int64_t kJacobiMaxSize = 32;

}  // namespace

void symmetric_eigen(const Matrix& input, Vector& values, Matrix& vectors) {
  const int64_t n = input.n;
  if (n > kJacobiMaxSize) return lapack_eigen(input, values, vectors);
  Matrix A = input;
  vectors = Matrix::identity(n);
  double norm = 0;
  for (double v : A.data) norm += v * v;
  norm = std::sqrt(norm);
  for (int sweep = 0; sweep < 100; ++sweep) {
    double off = 0;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = i + 1; j < n; ++j) off += A(i, j) * A(i, j);
    if (std::sqrt(off) <= 1e-15 * norm || off == 0) break;
    for (int64_t p = 0; p < n; ++p) {
      for (int64_t q = p + 1; q < n; ++q) {
        const double apq = A(p, q);
        if (apq == 0) continue;
        // Rotation that zeroes A(p, q) (Golub & Van Loan, Algorithm 8.5.1).
        const double tau = (A(q, q) - A(p, p)) / (2 * apq);
        const double t = (tau >= 0 ? 1.0 : -1.0) / (std::abs(tau) + std::sqrt(1 + tau * tau));
        const double c = 1 / std::sqrt(1 + t * t);
        const double s = t * c;
        for (int64_t k = 0; k < n; ++k) {
          const double akp = A(k, p), akq = A(k, q);
          A(k, p) = c * akp - s * akq;
          A(k, q) = s * akp + c * akq;
        }
        for (int64_t k = 0; k < n; ++k) {
          const double apk = A(p, k), aqk = A(q, k);
          A(p, k) = c * apk - s * aqk;
          A(q, k) = s * apk + c * aqk;
        }
        for (int64_t k = 0; k < n; ++k) {
          const double vkp = vectors(k, p), vkq = vectors(k, q);
          vectors(k, p) = c * vkp - s * vkq;
          vectors(k, q) = s * vkp + c * vkq;
        }
      }
    }
  }
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return A(a, a) < A(b, b); });
  values.assign(size_t(n), 0.0);
  Matrix sorted(n);
  for (int64_t k = 0; k < n; ++k) {
    values[size_t(k)] = A(order[size_t(k)], order[size_t(k)]);
    for (int64_t i = 0; i < n; ++i) sorted(i, k) = vectors(i, order[size_t(k)]);
  }
  vectors = std::move(sorted);
}

Matrix symmetric_pseudo_inverse(const Matrix& A, double rtol) {
  Vector values;
  Matrix V;
  symmetric_eigen(A, values, V);
  double largest = 0;
  for (double v : values) largest = std::max(largest, std::abs(v));
  const int64_t n = A.n;
  Matrix P(n);
  for (int64_t k = 0; k < n; ++k) {
    const double lambda = values[size_t(k)];
    if (std::abs(lambda) <= rtol * largest || lambda == 0) continue;
    const double inv = 1 / lambda;
    for (int64_t i = 0; i < n; ++i) {
      const double vik = V(i, k) * inv;
      for (int64_t j = 0; j < n; ++j) P(i, j) += vik * V(j, k);
    }
  }
  return P;
}

bool solve(Matrix A, Vector b, Vector& x, double rtol) {
  const int64_t n = A.n;
  double largest = 0;
  for (double v : A.data) largest = std::max(largest, std::abs(v));
  if (largest == 0) return false;
  for (int64_t col = 0; col < n; ++col) {
    int64_t pivot = col;
    for (int64_t r = col + 1; r < n; ++r)
      if (std::abs(A(r, col)) > std::abs(A(pivot, col))) pivot = r;
    if (std::abs(A(pivot, col)) <= rtol * largest) return false;
    if (pivot != col) {
      for (int64_t k = 0; k < n; ++k) std::swap(A(col, k), A(pivot, k));
      std::swap(b[size_t(col)], b[size_t(pivot)]);
    }
    for (int64_t r = col + 1; r < n; ++r) {
      const double f = A(r, col) / A(col, col);
      if (f == 0) continue;
      for (int64_t k = col; k < n; ++k) A(r, k) -= f * A(col, k);
      b[size_t(r)] -= f * b[size_t(col)];
    }
  }
  x.assign(size_t(n), 0.0);
  for (int64_t r = n - 1; r >= 0; --r) {
    double s = b[size_t(r)];
    for (int64_t k = r + 1; k < n; ++k) s -= A(r, k) * x[size_t(k)];
    x[size_t(r)] = s / A(r, r);
  }
  return true;
}

}  // namespace mtlgrad::solvers
