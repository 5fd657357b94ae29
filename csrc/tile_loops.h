// Shared pieces of the CPU tile loops: tile sizes, weight-tile loading, and the vectorized row epilogues
// (NaN-propagating max, shifted exp with sum) that run on cache-resident logit tiles.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
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

// Running max and sum of exp of one row's logits across vocabulary tiles: docs/math.md's online merge.
template <typename T>
struct OnlineSoftmax {
  T max = -std::numeric_limits<T>::infinity();
  T sum = T(0);

  // A row whose logits so far are all -inf shifts by 0: exp(-inf - -inf) would be NaN.
  static T shift_of(T m) { return m == -std::numeric_limits<T>::infinity() ? T(0) : m; }
  T shift() const { return shift_of(max); }
  T lse() const { return shift() + std::log(sum); }

  // Moves the running max to cover a new tile whose max is tile_max, rescales `sum`, and returns the
  // factor that the caller's other accumulators must be rescaled by. NaN propagates.
  T rescale_for(T tile_max) {
    const T new_max = nan_max(max, tile_max);
    const T factor = std::exp(max - shift_of(new_max));
    sum *= factor;
    max = new_max;
    return factor;
  }
};

// Splits [0, total) into blocks of `block` over the intra-op threads. make_worker() runs once per thread
// and returns the callable worker(start, size) for one block, so each thread owns its scratch buffers
// (and, for vocabulary tiles, the rows of grad_weight it writes).
template <typename MakeWorker>
void parallel_blocks(int64_t total, int64_t block, MakeWorker make_worker) {
  at::parallel_for(0, ceil_div(total, block), 1, [&](int64_t begin, int64_t end) {
    // The ops' autograd lives in Python; keep the internals off the autograd path. The guard is
    // thread-local, so every worker sets it.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto worker = make_worker();
    for (int64_t b = begin; b < end; ++b) {
      const int64_t start = b * block;
      worker(start, std::min(block, total - start));
    }
  });
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

// One element loop body serves a vector step and its scalar tail: loads, stores, tanh, exp and lane sums for both
// a scalar T and at::vec::Vectorized<T>.
template <typename T>
inline T load_at(const T* p, T) { return *p; }
template <typename T>
inline at::vec::Vectorized<T> load_at(const T* p, at::vec::Vectorized<T>) { return at::vec::Vectorized<T>::loadu(p); }
template <typename T>
inline void store_at(T* p, T x) { *p = x; }
template <typename T>
inline void store_at(T* p, const at::vec::Vectorized<T>& x) { x.store(p); }
template <typename T>
inline T tanh_of(T x) { return std::tanh(x); }
template <typename T>
inline at::vec::Vectorized<T> tanh_of(const at::vec::Vectorized<T>& x) { return x.tanh(); }
template <typename T>
inline T exp_of(T x) { return std::exp(x); }
template <typename T>
inline at::vec::Vectorized<T> exp_of(const at::vec::Vectorized<T>& x) { return x.exp(); }
template <typename T>
inline T sum_lanes(const at::vec::Vectorized<T>& x) {
  T lanes[at::vec::Vectorized<T>::size()];
  x.store(lanes);
  T sum = T(0);
  for (int64_t k = 0; k < at::vec::Vectorized<T>::size(); ++k) sum += lanes[k];
  return sum;
}

// sum_j exp(x[j] - shift); with kStore, x[j] = exp(x[j] - shift) in place as well.
template <bool kStore, typename T>
T exp_shifted_sum_impl(T* x, int64_t n, T shift) {
  using Vec = at::vec::Vectorized<T>;
  const Vec vshift(shift);
  Vec vsum(T(0));
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec e = (Vec::loadu(x + j) - vshift).exp();
    if (kStore) e.store(x + j);
    vsum = vsum + e;
  }
  T sum = sum_lanes(vsum);
  for (; j < n; ++j) {
    const T e = std::exp(x[j] - shift);
    if (kStore) x[j] = e;
    sum += e;
  }
  return sum;
}

// x[j] = exp(x[j] - shift); returns the sum of the new values.
template <typename T>
T exp_shifted_sum_inplace(T* x, int64_t n, T shift) { return exp_shifted_sum_impl<true>(x, n, shift); }

// sum_j exp(x[j] - shift), x unchanged.
template <typename T>
T exp_shifted_sum(T* x, int64_t n, T shift) { return exp_shifted_sum_impl<false>(x, n, shift); }

// x[j] = cap * tanh(x[j] / cap): Gemma 2's logit softcap (docs/math.md 3.6), in place.
template <typename T>
void softcap_inplace(T* x, int64_t n, T cap) {
  using Vec = at::vec::Vectorized<T>;
  const Vec vcap(cap);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) (vcap * (Vec::loadu(x + j) / vcap).tanh()).store(x + j);
  for (; j < n; ++j) x[j] = cap * std::tanh(x[j] / cap);
}

// sum_j x[j] * y[j].
template <typename T>
T dot(const T* x, const T* y, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  Vec acc(T(0));
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) acc = at::vec::fmadd(Vec::loadu(x + j), Vec::loadu(y + j), acc);
  T sum = sum_lanes(acc);
  for (; j < n; ++j) sum += x[j] * y[j];
  return sum;
}

// x[j] -= factor * y[j].
template <typename T>
void subtract_scaled(T* x, const T* y, int64_t n, T factor) {
  for (int64_t j = 0; j < n; ++j) x[j] -= factor * y[j];
}

template <typename T>
void scale_inplace(T* x, int64_t n, T factor) {
  using Vec = at::vec::Vectorized<T>;
  const Vec vfactor(factor);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) (Vec::loadu(x + j) * vfactor).store(x + j);
  for (; j < n; ++j) x[j] *= factor;
}

// probs[j] = exp(z[j] - lse) in place; grad[j] = probs[j] * (grad[j] + row_const), or probs[j] * row_const
// when `modulated` is false (grad's input is then ignored).
template <typename T>
void softmax_gradient_row(T* z, T* grad, int64_t n, T lse, T row_const, bool modulated) {
  using Vec = at::vec::Vectorized<T>;
  const Vec vlse(lse), vrow_const(row_const);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec s = (Vec::loadu(z + j) - vlse).exp();
    s.store(z + j);
    Vec g = modulated ? s * (Vec::loadu(grad + j) + vrow_const) : s * vrow_const;
    g.store(grad + j);
  }
  for (; j < n; ++j) {
    const T s = std::exp(z[j] - lse);
    z[j] = s;
    grad[j] = modulated ? s * (grad[j] + row_const) : s * row_const;
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

// out = h_block @ w_tile^T (+ bias[v0 : v0 + cols]).
inline void tile_logits(Tensor& out, const Tensor& h_block, const Tensor& w_tile, const Tensor& bias, int64_t v0) {
  if (bias.defined()) {
    const int64_t rows = h_block.size(0), cols = w_tile.size(0);
    at::addmm_out(out, bias.narrow(0, v0, cols).unsqueeze(0).expand({rows, cols}), h_block, w_tile.t());
  } else {
    at::mm_out(out, h_block, w_tile.t());
  }
}

// grad_row[target - v0] -= amount when the target lies in this tile of `cols` entries.
template <typename T>
inline void subtract_at_target(T* grad_row, int64_t target, int64_t v0, int64_t cols, T amount) {
  const int64_t t = target - v0;
  if (t >= 0 && t < cols) grad_row[t] -= amount;
}

template <typename T>
inline void add_columns(T* column_sums, const T* row, int64_t cols) {
  for (int64_t j = 0; j < cols; ++j) column_sums[j] += row[j];
}

inline at::ScalarType accumulation_type(const Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// z_y = h . W[y] (+ b[y]) per row, in h's (accumulation) dtype.
inline Tensor target_logits(const Tensor& h, const Tensor& weight, const Tensor& bias, const Tensor& target) {
  Tensor logits = (h * weight.index_select(0, target).to(h.scalar_type())).sum(1);
  if (bias.defined()) logits.add_(bias.index_select(0, target));
  return logits;
}

// Row blocks for the row-parallel forward: enough blocks to keep every thread busy on small batches.
inline int64_t forward_row_block(int64_t rows) {
  const int64_t per_thread = ceil_div(rows, std::max<int64_t>(1, at::get_num_threads()));
  return std::max<int64_t>(1, std::min(kRowBlock, per_thread));
}

}  // namespace dropreg
