// The CPU kernels' vocabulary passes for the uncapped head (docs/math.md is the specification; the comments name
// its symbols). The per-row algebra around them (the terms, T_stack and row_const from the upstream gradients, the
// input-row gradient, the implicit term's target scatter) is dropreg/rows.py's.
//
// Statistics: row blocks run in parallel; each streams vocabulary tiles with the online merge of
// (max, L, A1 = sum e W, A2 = sum e W*W). Per tile: z = h W_t^T (1 RCd), e @ [W_t | W_t*W_t] (2 RCd).
//
// Gradient sweep: vocabulary tiles run in parallel, each thread owning its tiles. Owning the tiles makes
// grad_weight and grad_bias race-free and lets each tile's grad_weight be finished once (the 2 W * (.) term)
// instead of once per row block; grad_input, which every tile touches, goes to per-thread N x d partials summed
// at the end (N x d is small next to V x d, and per-thread V x d copies of grad_weight would not be). Per tile and
// row block: z recompute (1 RCd), [T | gR' q] @ [W_t | W_t*W_t]^T (2 RCd), G @ W_t (1 RCd), G^T H (1 RCd),
// S^T [T | gR' q] (2 RCd). Statistics + sweep = 10 NVd multiply-adds, docs/math.md's floor; switched-off terms drop
// their share.
#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <vector>

#include "tile_loops.h"
#include "vocab_passes.h"

namespace dropreg {

namespace {

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

struct SweepRows {
  Tensor h;              // N x d, accumulation dtype
  Tensor T_stack;        // N x k d: [T | gR' q] (or T); undefined when G is s * row_const
  Tensor row_const;      // N
  Tensor target;         // N int64; undefined: no target correction
  Tensor target_amount;  // N: what G loses at the target
};

template <typename acc_t>
void sweep_tiles(const SweepRows& r, const Tensor& weight, const Tensor& bias, const Tensor& lse, bool with_squares,
                 bool want_h, bool want_w, bool want_b, Tensor& grad_h_partials, Tensor& grad_w, Tensor& grad_b) {
  const int64_t rows = r.h.size(0), dim = r.h.size(1), vocab = weight.size(0);
  const bool modulated = r.T_stack.defined();
  const int64_t k = modulated ? r.T_stack.size(1) / dim : 0;
  const auto opts = r.h.options();
  const int64_t* y = r.target.defined() ? r.target.data_ptr<int64_t>() : nullptr;
  const acc_t* amount_ptr = r.target.defined() ? r.target_amount.data_ptr<acc_t>() : nullptr;
  const acc_t* lse_ptr = lse.data_ptr<acc_t>();
  const acc_t* row_const_ptr = r.row_const.data_ptr<acc_t>();
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
          if (y) subtract_at_target(g + i * cols, y[row], v0, cols, amount_ptr[row]);
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
        grad_w.narrow(0, v0, cols).copy_(tile_w);
      }
      if (want_b) std::copy(t.acc_b.begin(), t.acc_b.begin() + cols, grad_b.data_ptr<acc_t>() + v0);
    };
  });
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> vocab_statistics(const Tensor& input, const Tensor& weight,
                                                    const c10::optional<Tensor>& bias, bool need_mu, bool need_m2) {
  TORCH_CHECK(input.dim() == 2 && weight.dim() == 2 && input.size(1) == weight.size(1),
              "dropreg::vocab_statistics: input (N, d) and weight (V, d) expected");
  RECORD_FUNCTION("dropreg::forward_stats", std::vector<c10::IValue>());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto acc = accumulation_type(input);
  const int64_t rows = input.size(0), dim = input.size(1);
  const int64_t k = need_m2 ? 2 : (need_mu ? 1 : 0);
  const Tensor h = input.to(acc).contiguous();
  const Tensor b = bias.has_value() && bias->defined() ? bias->to(acc).contiguous() : Tensor();
  Tensor lse = at::empty({rows}, h.options());
  Tensor moments = at::zeros({rows, k * dim}, h.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "vocab_statistics", [&] {
    forward_statistics<scalar_t>(h, weight.contiguous(), b, k, lse, moments);
  });
  const Tensor empty = at::empty({0, dim}, h.options());
  return {lse, need_mu ? moments.narrow(1, 0, dim).contiguous() : empty,
          need_m2 ? moments.narrow(1, dim, dim).contiguous() : empty.clone()};
}

std::tuple<Tensor, Tensor, Tensor> logit_gradient_sweep(
    const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias, const Tensor& lse,
    const Tensor& row_const, const c10::optional<Tensor>& T_stack, bool with_squares,
    const c10::optional<Tensor>& target, const c10::optional<Tensor>& target_amount,
    std::array<bool, 3> output_mask) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const bool has_bias = bias.has_value() && bias->defined();
  const bool want_h = output_mask[0], want_w = output_mask[1], want_b = output_mask[2] && has_bias;
  const auto acc = accumulation_type(input);
  const int64_t rows = input.size(0), dim = input.size(1), vocab = weight.size(0);
  SweepRows r;
  r.h = input.to(acc).contiguous();
  r.row_const = row_const.to(acc).contiguous();
  if (T_stack.has_value() && T_stack->defined()) r.T_stack = T_stack->to(acc).contiguous();
  TORCH_CHECK(r.T_stack.defined() ? r.T_stack.size(1) == (with_squares ? 2 : 1) * dim : !with_squares,
              "dropreg::logit_gradient_sweep: T_stack must be (N, 2d) with_squares, (N, d) without");
  TORCH_CHECK(target.has_value() == target_amount.has_value(),
              "dropreg::logit_gradient_sweep: target and target_amount are given together");
  if (target.has_value() && target->defined()) {
    r.target = target->contiguous();
    r.target_amount = target_amount->to(acc).contiguous();
  }
  const Tensor b = has_bias ? bias->to(acc).contiguous() : Tensor();
  Tensor grad_h_partials = want_h ? at::zeros({at::get_num_threads(), rows, dim}, r.h.options()) : Tensor();
  Tensor grad_w = want_w ? at::empty({vocab, dim}, r.h.options()) : at::empty({0}, r.h.options());
  Tensor grad_b = want_b ? at::empty({vocab}, r.h.options()) : at::empty({0}, r.h.options());
  if (want_h || want_w || want_b) {
    RECORD_FUNCTION("dropreg::backward_tiles", std::vector<c10::IValue>());
    AT_DISPATCH_FLOATING_TYPES(acc, "logit_gradient_sweep", [&] {
      sweep_tiles<scalar_t>(r, weight.contiguous(), b, lse.to(acc).contiguous(), with_squares, want_h, want_w,
                            want_b, grad_h_partials, grad_w, grad_b);
    });
  }
  return {want_h ? grad_h_partials.sum(0) : at::empty({0}, r.h.options()), grad_w, grad_b};
}

}  // namespace dropreg
