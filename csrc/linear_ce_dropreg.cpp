// CPU forward and backward of the fused linear cross entropy with dropout's explicit and implicit terms.
// docs/math.md is the specification; the comments name its symbols.
//
// Forward: row blocks run in parallel; each streams vocabulary tiles with the online merge of
// (max, L, A1 = sum e W, A2 = sum e W*W). Per tile: z = h W_t^T (1 RCd), e @ [W_t | W_t*W_t] (2 RCd).
//
// Backward: vocabulary tiles run in parallel, each thread owning its tiles. Owning the tiles makes
// grad_weight and grad_bias race-free and lets each tile's grad_weight be finished once (the 2 W * (.)
// term and the implicit target scatter) instead of once per row block; grad_input, which every tile
// touches, goes to per-thread N x d partials summed at the end (N x d is small next to V x d, and
// per-thread V x d copies of grad_weight would not be). Per tile and row block: z recompute (1 RCd),
// [T | gR' q] @ [W_t | W_t*W_t]^T (2 RCd), G @ W_t (1 RCd), G^T H (1 RCd), S^T [T | gR' q] (2 RCd).
// Forward + backward = 10 NVd multiply-adds, docs/math.md's floor; switched-off terms drop their share.
#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <vector>

#include "linear_ce_dropreg.h"
#include "philox.h"
#include "tile_loops.h"

namespace dropreg {

namespace {

Tensor signs_for(const c10::optional<Tensor>& signs, int64_t seed, int64_t rows, int64_t dim,
                 at::ScalarType acc) {
  if (signs.has_value() && signs->defined()) return signs->to(acc).contiguous();
  return philox_signs(static_cast<uint64_t>(seed), rows, dim, acc);
}

// lse (N) and the normalized moments [mu | m2] (N x k d), k = 0, 1 or 2.
template <typename acc_t>
void forward_statistics(const Tensor& h, const Tensor& weight, const Tensor& bias, int64_t k, Tensor& lse,
                        Tensor& moments) {
  const int64_t rows = h.size(0), dim = h.size(1), vocab = weight.size(0);
  const int64_t row_block = forward_row_block(rows);
  const int64_t width = k * dim;
  const bool with_squares = k == 2;
  const auto opts = h.options();
  acc_t* lse_ptr = lse.data_ptr<acc_t>();
  parallel_blocks(rows, row_block, [&] {
    Tensor logits_flat = at::empty({row_block * kVocabTile}, opts);
    Tensor weight_flat = at::empty({kVocabTile * std::max<int64_t>(k, 1) * dim}, opts);
    return [&, logits_flat, weight_flat](int64_t r0, int64_t n) {
      const Tensor h_block = h.narrow(0, r0, n);
      Tensor acc_moments = k ? moments.narrow(0, r0, n) : Tensor();
      acc_t* moments_ptr = k ? acc_moments.data_ptr<acc_t>() : nullptr;
      std::vector<OnlineSoftmax<acc_t>> softmax(n);
      for (int64_t v0 = 0; v0 < vocab; v0 += kVocabTile) {
        const int64_t cols = std::min(kVocabTile, vocab - v0);
        const Tensor stacked = load_weight_tile(weight, v0, cols, weight_flat, with_squares);
        Tensor logits = scratch_view(logits_flat, n, cols);
        tile_logits(logits, h_block, stacked.narrow(1, 0, dim), bias, v0);
        acc_t* z = logits.data_ptr<acc_t>();
        for (int64_t i = 0; i < n; ++i) {
          acc_t* row = z + i * cols;
          const acc_t rescale = softmax[i].rescale_for(row_max(row, cols));
          softmax[i].sum += exp_shifted_sum_inplace(row, cols, softmax[i].shift());
          if (k && rescale != acc_t(1)) scale_inplace(moments_ptr + i * width, width, rescale);
        }
        if (k) acc_moments.addmm_(logits, stacked);  // e @ [W_t | W_t*W_t]
      }
      for (int64_t i = 0; i < n; ++i) {
        lse_ptr[r0 + i] = softmax[i].lse();
        if (k) scale_inplace(moments_ptr + i * width, width, acc_t(1) / softmax[i].sum);
      }
    };
  });
}

struct BackwardRows {
  Tensor h;           // N x d, accumulation dtype
  Tensor T_stack;     // N x k d: [T | gR' q] (or T); undefined when no modulation
  Tensor row_const;   // N: g_ce + the row constants of G (docs/math.md, GEMM-friendly form)
  Tensor g_ce;        // N
  Tensor scatter;     // N x d: -gI' u, added to grad_weight at row y (undefined without implicit)
  std::vector<int64_t> rows_by_target;  // row indices sorted by target, for the scatter
  std::vector<int64_t> sorted_target;
};

template <typename acc_t>
void backward_tiles(const BackwardRows& r, const Tensor& weight, const Tensor& bias, const Tensor& target,
                    const Tensor& lse, int64_t k, bool want_h, bool want_w, bool want_b, Tensor& grad_h_partials,
                    Tensor& grad_w, Tensor& grad_b) {
  const int64_t rows = r.h.size(0), dim = r.h.size(1), vocab = weight.size(0);
  const bool modulated = r.T_stack.defined();
  const bool with_squares = k == 2;
  const auto opts = r.h.options();
  const int64_t* y = target.data_ptr<int64_t>();
  const acc_t* lse_ptr = lse.data_ptr<acc_t>();
  const acc_t* row_const_ptr = (modulated ? r.row_const : r.g_ce).data_ptr<acc_t>();
  const acc_t* g_ce_ptr = r.g_ce.data_ptr<acc_t>();
  parallel_blocks(vocab, kVocabTile, [&] {
    struct Scratch {
      Tensor grad_h_part, probs_flat, grad_flat, weight_flat, acc_w, acc_st_T_stack;
      std::vector<acc_t> acc_b;
    };
    Scratch t{want_h ? grad_h_partials[at::get_thread_num()] : Tensor(),
              at::empty({kRowBlock * kVocabTile}, opts), at::empty({kRowBlock * kVocabTile}, opts),
              at::empty({kVocabTile * std::max<int64_t>(k, 1) * dim}, opts), at::empty({kVocabTile, dim}, opts),
              at::empty({kVocabTile, std::max<int64_t>(k, 1) * dim}, opts), std::vector<acc_t>(kVocabTile)};
    return [&, t](int64_t v0, int64_t cols) mutable {
      const Tensor stacked = load_weight_tile(weight, v0, cols, t.weight_flat, with_squares);
      const Tensor w = stacked.narrow(1, 0, dim);
      Tensor tile_w = t.acc_w.narrow(0, 0, cols).zero_();
      Tensor tile_st_T_stack = t.acc_st_T_stack.narrow(0, 0, cols).zero_();
      std::fill(t.acc_b.begin(), t.acc_b.end(), acc_t(0));
      for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
        const int64_t n = std::min(kRowBlock, rows - r0);
        const Tensor h_block = r.h.narrow(0, r0, n);
        Tensor probs = scratch_view(t.probs_flat, n, cols);
        Tensor grad = scratch_view(t.grad_flat, n, cols);
        tile_logits(probs, h_block, w, bias, v0);
        Tensor T_stack_block = modulated ? r.T_stack.narrow(0, r0, n) : Tensor();
        if (modulated) at::mm_out(grad, T_stack_block, stacked.t());  // gR' (W*W)_v . q + W_v . T
        acc_t* s = probs.data_ptr<acc_t>();
        acc_t* g = grad.data_ptr<acc_t>();
        for (int64_t i = 0; i < n; ++i) {
          const int64_t row = r0 + i;
          softmax_gradient_row(s + i * cols, g + i * cols, cols, lse_ptr[row], row_const_ptr[row], modulated);
          subtract_at_target(g + i * cols, y[row], v0, cols, g_ce_ptr[row]);
          if (want_b) add_columns(t.acc_b.data(), g + i * cols, cols);
        }
        if (want_h) t.grad_h_part.narrow(0, r0, n).addmm_(grad, w);
        if (want_w) {
          tile_w.addmm_(grad.t(), h_block);
          if (modulated) tile_st_T_stack.addmm_(probs.t(), T_stack_block);  // S^T [T | gR' q]
        }
      }
      if (want_w) {
        if (modulated) {
          tile_w.add_(tile_st_T_stack.narrow(1, 0, dim));
          if (with_squares) tile_w.addcmul_(w, tile_st_T_stack.narrow(1, dim, dim), 2);
        }
        if (r.scatter.defined()) {  // implicit term: -gI' u at each row's target
          auto lo = std::lower_bound(r.sorted_target.begin(), r.sorted_target.end(), v0);
          auto hi = std::lower_bound(lo, r.sorted_target.end(), v0 + cols);
          acc_t* tile_w_ptr = tile_w.data_ptr<acc_t>();
          const acc_t* scatter_ptr = r.scatter.data_ptr<acc_t>();
          for (auto it = lo; it != hi; ++it) {
            const acc_t* src = scatter_ptr + r.rows_by_target[it - r.sorted_target.begin()] * dim;
            acc_t* dst = tile_w_ptr + (*it - v0) * dim;
            for (int64_t j = 0; j < dim; ++j) dst[j] += src[j];
          }
        }
        grad_w.narrow(0, v0, cols).copy_(tile_w);
      }
      if (want_b) std::copy(t.acc_b.begin(), t.acc_b.begin() + cols, grad_b.data_ptr<acc_t>() + v0);
    };
  });
}

// backward_tiles into freshly allocated buffers: grad_input (summed over the per-thread partials; undefined
// when not wanted), grad_weight (empty when not wanted) and grad_bias in the accumulation dtype (undefined).
std::tuple<Tensor, Tensor, Tensor> run_backward_tiles(const BackwardRows& r, const Tensor& w, const Tensor& b,
                                                      const Tensor& target, const Tensor& lse, int64_t k,
                                                      bool want_h, bool want_w, bool want_b) {
  const int64_t rows = r.h.size(0), dim = r.h.size(1);
  Tensor grad_h_partials = want_h ? at::zeros({at::get_num_threads(), rows, dim}, r.h.options()) : Tensor();
  Tensor grad_w = want_w ? at::empty_like(w) : at::empty({0}, w.options());
  Tensor grad_b = want_b ? at::empty({w.size(0)}, r.h.options()) : Tensor();
  if (want_h || want_w || want_b) {
    RECORD_FUNCTION("dropreg::backward_tiles", std::vector<c10::IValue>());
    AT_DISPATCH_FLOATING_TYPES(r.h.scalar_type(), "backward_tiles", [&] {
      backward_tiles<scalar_t>(r, w, b, target, lse.contiguous(), k, want_h, want_w, want_b, grad_h_partials,
                               grad_w, grad_b);
    });
  }
  return {want_h ? grad_h_partials.sum(0) : Tensor(), grad_w, grad_b};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> linear_ce_forward(
    const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias, const Tensor& target,
    const c10::optional<Tensor>& signs, int64_t seed, bool need_explicit, bool need_implicit) {
  TORCH_CHECK(input.dim() == 2 && weight.dim() == 2 && input.size(1) == weight.size(1),
              "dropreg::linear_ce_forward: input (N, d) and weight (V, d) expected");
  RECORD_FUNCTION("dropreg::forward_stats", std::vector<c10::IValue>());
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // autograd is registered in Python
  const auto acc = accumulation_type(input);
  const int64_t rows = input.size(0), dim = input.size(1);
  const int64_t k = need_explicit ? 2 : (need_implicit ? 1 : 0);
  const Tensor h = input.to(acc).contiguous();
  const Tensor w = weight.contiguous();
  const Tensor b = bias.has_value() && bias->defined() ? bias->to(acc).contiguous() : Tensor();
  Tensor lse = at::empty({rows}, h.options());
  Tensor moments = at::zeros({rows, k * dim}, h.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "linear_ce_forward", [&] {
    forward_statistics<scalar_t>(h, w, b, k, lse, moments);
  });
  const Tensor w_target = w.index_select(0, target).to(acc);
  Tensor ce = lse - target_logits(h, w, b, target);
  Tensor quadratic = at::zeros_like(ce), sign_term = at::zeros_like(ce);
  Tensor mu = k ? moments.narrow(1, 0, dim).contiguous() : at::empty({0, dim}, h.options());
  Tensor var = at::empty({0, dim}, h.options());
  if (need_explicit) {
    var = moments.narrow(1, dim, dim) - mu * mu;
    quadratic = (h * h * var).sum(1);
  }
  if (need_implicit) {
    sign_term = (signs_for(signs, seed, rows, dim, acc) * h * (mu - w_target)).sum(1);
  }
  return {ce, quadratic, sign_term, lse, mu, var};
}

std::tuple<Tensor, Tensor, Tensor> linear_ce_backward(
    const Tensor& grad_ce, const Tensor& grad_quadratic, const Tensor& grad_sign_term,
    const c10::optional<Tensor>& grad_mu, const Tensor& input,
    const Tensor& weight, const c10::optional<Tensor>& bias, const Tensor& target,
    const c10::optional<Tensor>& signs, int64_t seed, const Tensor& lse, const Tensor& mu, const Tensor& var,
    bool need_explicit, bool need_implicit, std::array<bool, 3> output_mask) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const bool has_bias = bias.has_value() && bias->defined();
  const bool want_h = output_mask[0], want_w = output_mask[1], want_b = output_mask[2] && has_bias;
  const auto acc = accumulation_type(input);
  const int64_t rows = input.size(0), dim = input.size(1);
  const int64_t k = need_explicit ? 2 : (need_implicit ? 1 : 0);
  const Tensor w = weight.contiguous();
  const Tensor b = has_bias ? bias->to(acc).contiguous() : Tensor();

  BackwardRows r;
  r.h = input.to(acc).contiguous();
  r.g_ce = grad_ce.to(acc).contiguous();
  Tensor row_const = r.g_ce.clone();
  Tensor T_vec, g_r_q, g_r, g_i, sgn;
  if (need_explicit) {  // T -= 2 gR' q mu;  row_const += gR' (q . mu^2 - q . var)
    g_r = grad_quadratic.to(acc).unsqueeze(1);
    g_r_q = g_r * r.h * r.h;
    T_vec = -2 * g_r_q * mu;
    row_const.add_((g_r_q * (mu * mu - var)).sum(1));
  }
  if (need_implicit) {  // T += gI' u;  row_const -= gI' mu . u
    g_i = grad_sign_term.to(acc).unsqueeze(1);
    sgn = signs_for(signs, seed, rows, dim, acc);
    const Tensor g_i_u = g_i * sgn * r.h;
    T_vec = T_vec.defined() ? T_vec + g_i_u : g_i_u;
    row_const.sub_((mu * g_i_u).sum(1));
    if (want_w) {
      r.scatter = (-g_i_u).contiguous();
      const Tensor target_cpu = target.contiguous();
      const int64_t* y = target_cpu.data_ptr<int64_t>();
      r.rows_by_target.resize(rows);
      for (int64_t i = 0; i < rows; ++i) r.rows_by_target[i] = i;
      std::stable_sort(r.rows_by_target.begin(), r.rows_by_target.end(),
                       [&](int64_t a, int64_t c) { return y[a] < y[c]; });
      r.sorted_target.resize(rows);
      for (int64_t i = 0; i < rows; ++i) r.sorted_target[i] = y[r.rows_by_target[i]];
    }
  }
  if (k && grad_mu.has_value() && grad_mu->defined() && grad_mu->numel()) {  // mu's own gradient gbar:
    const Tensor g_mu = grad_mu->to(acc);                                    // T += gbar; row_const -= mu . gbar
    T_vec = T_vec + g_mu;
    row_const.sub_((mu * g_mu).sum(1));
  }
  if (k) r.T_stack = (need_explicit ? at::cat({T_vec, g_r_q}, 1) : T_vec).contiguous();
  r.row_const = row_const.contiguous();

  auto [g, grad_w, grad_b_acc] = run_backward_tiles(r, w, b, target.contiguous(), lse, k, want_h, want_w, want_b);
  Tensor grad_h = at::empty({0}, input.options());
  if (want_h) {
    RECORD_FUNCTION("dropreg::grad_input", std::vector<c10::IValue>());
    if (need_explicit) g.add_(2 * g_r * r.h * var);
    if (need_implicit) g.add_(g_i * sgn * (mu - w.index_select(0, target).to(acc)));
    grad_h = g.to(input.scalar_type());
  }
  Tensor grad_b = want_b ? grad_b_acc.to(bias->scalar_type()) : at::empty({0}, input.options());
  return {grad_h, grad_w, grad_b};
}

}  // namespace dropreg

namespace dropreg {

// softmax_mean (the every-site terms' mu = W^T s): the forward statistics with the first moment only,
// 2 NVd. Returns (mu, lse); lse is saved for the backward.
std::tuple<Tensor, Tensor> softmax_mean_forward(const Tensor& input, const Tensor& weight,
                                                const c10::optional<Tensor>& bias) {
  TORCH_CHECK(input.dim() == 2 && weight.dim() == 2 && input.size(1) == weight.size(1),
              "dropreg::softmax_mean_forward: input (N, d) and weight (V, d) expected");
  RECORD_FUNCTION("dropreg::softmax_mean_forward", std::vector<c10::IValue>());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto acc = accumulation_type(input);
  const Tensor h = input.to(acc).contiguous();
  const Tensor b = bias.has_value() && bias->defined() ? bias->to(acc).contiguous() : Tensor();
  Tensor lse = at::empty({h.size(0)}, h.options());
  Tensor mu = at::zeros({h.size(0), h.size(1)}, h.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "softmax_mean_forward", [&] {
    forward_statistics<scalar_t>(h, weight.contiguous(), b, 1, lse, mu);
  });
  return {mu, lse};
}

// Its backward is the linear_ce tile loop with T_stack = gbar = dL/dmu and row_const -mu . gbar, no target:
// G_v = s_v (W_v . gbar - mu . gbar), grad_input = G W, grad_W = G^T h + S^T gbar, grad_b = sum G (5 NVd).
std::tuple<Tensor, Tensor, Tensor> softmax_mean_backward(const Tensor& grad_mu, const Tensor& input,
                                                         const Tensor& weight, const c10::optional<Tensor>& bias,
                                                         const Tensor& lse, const Tensor& mu,
                                                         std::array<bool, 3> output_mask) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const bool has_bias = bias.has_value() && bias->defined();
  const bool want_h = output_mask[0], want_w = output_mask[1], want_b = output_mask[2] && has_bias;
  const auto acc = accumulation_type(input);
  const int64_t rows = input.size(0);
  const Tensor w = weight.contiguous();
  const Tensor b = has_bias ? bias->to(acc).contiguous() : Tensor();
  BackwardRows r;
  r.h = input.to(acc).contiguous();
  r.T_stack = grad_mu.to(acc).contiguous();  // gbar plays T's part
  r.row_const = (r.T_stack * mu).sum(1).neg_().contiguous();
  r.g_ce = at::zeros({rows}, r.h.options());
  const Tensor no_target = at::zeros({rows}, at::kLong);  // g_ce = 0: the target correction adds nothing
  auto [g, grad_w, grad_b_acc] = run_backward_tiles(r, w, b, no_target, lse, 1, want_h, want_w, want_b);
  Tensor grad_h = want_h ? g.to(input.scalar_type()) : at::empty({0}, input.options());
  Tensor grad_b = want_b ? grad_b_acc.to(bias->scalar_type()) : at::empty({0}, input.options());
  return {grad_h, grad_w, grad_b};
}

}  // namespace dropreg
