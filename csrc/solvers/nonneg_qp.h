// Exact solver of the non-negative quadratic program
//
//     minimise ½ xᵀ Q x + cᵀ x   subject to x >= 0,
//
// for a symmetric positive semi-definite Q of a few hundred rows at most: the Lawson-Hanson
// active-set algorithm (Lawson & Hanson, "Solving Least Squares Problems", 1974, ch. 23) in its
// normal-equations form (Bro & De Jong, "A fast non-negativity-constrained least squares
// algorithm", J. Chemometrics 1997), which needs Q and c only. When Q = AᵀA and c = -Aᵀb it is
// the NNLS problem min ||A x - b|| over x >= 0; every Gram-matrix method of the form "projection
// onto a polyhedral cone" reduces to it (UPGrad, DualProj, MGDA through least-distance
// programming, gradient matching).
//
// Singular Q (duplicated or dependent gradients) needs no regulariser: an index enters the free
// set only when its dual value is positive, which in exact arithmetic means its column of A is
// independent of the free ones, so the free block of Q stays positive definite. Numerically, an
// index whose column is dependent to rounding (its new Cholesky pivot vanishes) is skipped.
//
// Scale: the solver works on the problem in y = D⁻¹ x with D ≈ diag(Q)^{-1/2} (powers of two),
// i.e. on D Q D (diagonal within [1/2, 2)) and D c, so that every test (dual values, pivots, step
// lengths) is relative to its own column's norm. For a Gram matrix, that is each gradient's own
// norm: a variable whose column is 1e-8 of the largest is resolved like any other, where a dual
// test scaled by the largest column would leave a helpful small gradient at zero. A variable with
// Q_jj = 0 (a zero gradient) stays 0.
//
// Warm start: every variable with a positive dual value at x = 0 enters at once (in decreasing
// order of that value, skipping dependent columns), the ones whose free-set solution comes out
// non-positive leave again, and Lawson-Hanson goes on from that feasible point. The answer is the
// same; when the guess is close, most O(n k) dual updates are saved (for a dual-cone projection
// the gradients that conflict with the projected one are usually the active constraints: T = 128
// random gradients take ~4 entries instead of ~60).
#pragma once

#include <cstdint>
#include <vector>

#include "dense.h"

namespace mtlgrad::solvers {

class NonnegQP {
 public:
  // Q is copied (scaled, see above); every solve reuses it.
  explicit NonnegQP(const Matrix& Q);

  // Solves the program for the linear term c (size n) and returns x (valid until the next call).
  // Stops when no scaled dual value -(Q x + c)_j / sqrt(Q_jj) of a bound variable exceeds a
  // tolerance relative to the terms it is made of (the KKT conditions to rounding, column by
  // column), or after a bounded number of iterations (the solution so far is feasible;
  // converged() tells which).
  const Vector& solve(const Vector& c);

  bool converged() const { return converged_; }
  int64_t iterations() const { return iterations_; }

 private:
  // The Cholesky factor L of Q[free, free] grows by index j (false: j is dependent, unchanged),
  bool append(int64_t j);
  // ... is built from empty for these indices in turn, leaving dependent ones out,
  void factor_all(const std::vector<int64_t>& indices);
  // ... loses its pos-th index (a rank-one update of the trailing block).
  void remove_at(int64_t pos);
  void solve_free(const Vector& c, Vector& z) const;  // Q[free, free] z = -c[free]
  void update_dual(const Vector& c);                  // dual = -(Q x + c)

  Matrix Q_;  // D Q D: diagonal in [1/2, 2) (zero for zero columns)
  int64_t n_;
  Vector scale_;                  // D: about 1 / sqrt(Q_jj) (a power of two), 0 where Q_jj <= 0
  Vector c_, result_;             // D c; the solution x = D y
  double q_max_ = 0;              // largest diagonal entry of D Q D (below 2; 0 for Q = 0)
  Vector x_, dual_, z_, column_;  // solution y, dual values, free-set solve, scratch
  Vector inv_diag_;               // 1 / L_rr: multiplications off the substitutions' critical path
  std::vector<int64_t> free_;     // indices of the free variables, in factor order
  std::vector<int64_t> order_;    // warm start: candidates by decreasing dual value
  std::vector<char> is_free_, skipped_;
  std::vector<double> L_;  // lower Cholesky factor of Q[free, free], row-major, leading dim n
  bool converged_ = false;
  int64_t iterations_ = 0;
};

// The ridge of the dual-cone projections (UPGrad, DualProj), in TorchJD's convention: reg_eps on
// the diagonal of G / trace(G). G here is already normalised to a mean diagonal of 1
// (normalise_trace), so that is T * reg_eps on its diagonal.
void add_trace_relative_ridge(Matrix& G, double reg_eps);

// The weights w (w >= 0, Σ w = 1) of the minimum-norm point of the convex hull of the gradients
// whose Gram matrix is G, min_{w in simplex} wᵀ G w, solved exactly by least-distance programming
// (Lawson & Hanson, 1974, ch. 23): the NNLS problem min_{y >= 0} ||Jᵀ y||² + (1ᵀ y − 1)², whose
// Gram form is the non-negative QP with Q = G + 1 1ᵀ and c = −1. Its KKT conditions are those of
// the simplex problem for w = y / 1ᵀy, and 1ᵀy = 1 / (1 + |Jᵀw|²) > 0 always, also when the
// min-norm point is 0 (where the plain reduction min_{y >= 0} ½ yᵀ G y − 1ᵀ y is unbounded).
// G is taken by value: it is rescaled and shifted in place.
Vector min_norm_weights(Matrix G);

}  // namespace mtlgrad::solvers
