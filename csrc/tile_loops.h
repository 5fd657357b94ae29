// Shared pieces of the CPU tile loops: tile sizes, weight-tile loading, and the vectorized row epilogues
// (NaN-propagating max, shifted exp with sum) that run on cache-resident logit tiles.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>

namespace dropreg {

using at::Tensor;

// Rows x vocabulary tile. A 256 x 256 fp32 logit tile is 256 KiB and stays in L2 with the weight tile.
constexpr int64_t kRowBlock = 256;
constexpr int64_t kVocabTile = 256;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
inline T nan_max(T a, T b) {
  if (std::isnan(a)) return a;
  if (std::isnan(b)) return b;
  return a > b ? a : b;
}

// Largest of x[0..n); NaN if any element is NaN.
template <typename T>
T row_max(const T* x, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  T result = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  if (n >= Vec::size()) {
    Vec acc(-std::numeric_limits<T>::infinity());
    for (; j + Vec::size() <= n; j += Vec::size()) acc = at::vec::maximum(acc, Vec::loadu(x + j));
    T lanes[Vec::size()];
    acc.store(lanes);
    for (int64_t k = 0; k < Vec::size(); ++k) result = nan_max(result, lanes[k]);
  }
  for (; j < n; ++j) result = nan_max(result, x[j]);
  return result;
}

// x[j] = exp(x[j] - shift); returns the sum of the new values.
template <typename T>
T exp_shifted_sum_inplace(T* x, int64_t n, T shift) {
  using Vec = at::vec::Vectorized<T>;
  const Vec vshift(shift);
  Vec vsum(T(0));
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec e = (Vec::loadu(x + j) - vshift).exp();
    e.store(x + j);
    vsum = vsum + e;
  }
  T lanes[Vec::size()];
  vsum.store(lanes);
  T sum = T(0);
  for (int64_t k = 0; k < Vec::size(); ++k) sum += lanes[k];
  for (; j < n; ++j) {
    x[j] = std::exp(x[j] - shift);
    sum += x[j];
  }
  return sum;
}

template <typename T>
void scale_inplace(T* x, int64_t n, T factor) {
  using Vec = at::vec::Vectorized<T>;
  const Vec vfactor(factor);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) (Vec::loadu(x + j) * vfactor).store(x + j);
  for (; j < n; ++j) x[j] *= factor;
}

// probs[j] = exp(z[j] - lse) in place; grad[j] = probs[j] * (grad[j] + offset), or probs[j] * offset
// when `modulated` is false (grad's input is then ignored).
template <typename T>
void softmax_gradient_row(T* z, T* grad, int64_t n, T lse, T offset, bool modulated) {
  using Vec = at::vec::Vectorized<T>;
  const Vec vlse(lse), voffset(offset);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec s = (Vec::loadu(z + j) - vlse).exp();
    s.store(z + j);
    Vec g = modulated ? s * (Vec::loadu(grad + j) + voffset) : s * voffset;
    g.store(grad + j);
  }
  for (; j < n; ++j) {
    const T s = std::exp(z[j] - lse);
    z[j] = s;
    grad[j] = modulated ? s * (grad[j] + offset) : s * offset;
  }
}

// A contiguous (rows, cols) view at the start of a flat scratch buffer.
inline Tensor scratch_view(const Tensor& flat, int64_t rows, int64_t cols) {
  return flat.narrow(0, 0, rows * cols).view({rows, cols});
}

// stacked[:, :d] = weight[v0 : v0 + cols] (upcast); stacked[:, d:2d] = its square when with_squares.
inline Tensor load_weight_tile(const Tensor& weight, int64_t v0, int64_t cols, const Tensor& flat_buffer,
                               bool with_squares) {
  const int64_t dim = weight.size(1);
  Tensor stacked = scratch_view(flat_buffer, cols, with_squares ? 2 * dim : dim);
  Tensor w = stacked.narrow(1, 0, dim);
  w.copy_(weight.narrow(0, v0, cols));
  if (with_squares) {
    Tensor squares = stacked.narrow(1, dim, dim);
    at::mul_out(squares, w, w);
  }
  return stacked;
}

}  // namespace dropreg
