// The two vocabulary passes of a softcapped head (docs/math.md 3.6) on CPU; the per-row algebra around them is
// dropreg/softcap.py's, shared with the "torch" backend.
//
// Each element's raw logit r gives t = tanh(r / s), the capped logit z = s t and its derivatives in r:
// c = 1 - t^2, z2 = -2 t c / s, z3 = -2 c (c - 2 t^2) / s^2; phi = c^2 + z2 and psi = c phi + 2 c z2 + z3,
// computed a vector of entries at a time (ATen's vectorized tanh and exp), the row's tail one by one.
//
// softcap_statistics: row blocks in parallel, vocabulary tiles streamed with the online softmax of z;
//   M1 += (e c) @ W_t (1 RCd) and M2 += (e phi) @ (W_t * W_t) (1 RCd) beside z = h W_t^T (1 RCd); with label
//   smoothing's weights omega (docs/math.md 3.7), S += sum_v omega_v z_v elementwise.
// softcap_gradient_sweep: vocabulary tiles in parallel (each thread owns its rows of grad_weight, as in the
//   uncapped backward); per tile and row block: the z recompute (1 RCd), T W_t^T and Q (W_t*W_t)^T (2 RCd),
//   G = s (c row_const + phi (T W^T) + psi (Q (W*W)^T)) - amount [v = y] (+ gS omega c with smoothing),
//   grad_input += G W_t (1 RCd),
//   grad_W_t += G^T h + (s c)^T T + 2 W_t * (s phi)^T Q (3 RCd).
#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include <vector>

#include "vocab_passes.h"
#include "tile_loops.h"

namespace dropreg {

namespace {

// V: a scalar or an at::vec::Vectorized of one (the element loops run vector steps, then a scalar tail).
template <typename V>
struct CapDerivatives {
  V z, c, z2, z3;
  CapDerivatives(V raw, V cap) {
    const V t = tanh_of(raw / cap), one(1), two(2);
    z = cap * t;
    c = one - t * t;
    z2 = V(-2) * t * c / cap;
    z3 = V(-2) * c * (c - two * t * t) / (cap * cap);
  }
  V phi() const { return c * c + z2; }
  V psi() const { return c * phi() + V(2) * c * z2 + z3; }
};

// Statistics pass, one element step at j (V wide): the softmax weights' factors c and phi where wanted, the capped
// logit in place of the raw one; returns omega z (0 without smoothing) for the caller's sum.
template <typename V, typename T>
V statistics_step(T* row, T* ec_row, T* ephi_row, const T* omega, int64_t j, T cap) {
  const CapDerivatives<V> d(load_at(row + j, V()), V(cap));
  if (ec_row) store_at(ec_row + j, d.c);
  if (ephi_row) store_at(ephi_row + j, d.phi());
  store_at(row + j, d.z);
  return omega ? load_at(omega + j, V()) * d.z : V(0);
}

// Gradient sweep, one element step at k (V wide): s and G in place of the raw logit and of T . W_v, s c and s phi
// where wanted (docs/math.md 3.6, 3.7).
template <typename V, typename T>
void sweep_step(T* s, T* g, const T* q_dot, T* pc, T* pphi, const T* omega, int64_t k, int64_t j, T lse, T row_const,
                T grad_sum, T cap) {
  const CapDerivatives<V> d(load_at(s + k, V()), V(cap));
  const V p = exp_of(d.z - V(lse));
  V inner = d.c * V(row_const);
  if (pc) {
    inner = inner + d.phi() * load_at(g + k, V());
    store_at(pc + k, p * d.c);
  }
  if (pphi) {
    inner = inner + d.psi() * load_at(q_dot + k, V());
    store_at(pphi + k, p * d.phi());
  }
  store_at(s + k, p);
  V grad = p * inner;
  if (omega) grad = grad + V(grad_sum) * load_at(omega + j, V()) * d.c;
  store_at(g + k, grad);
}

template <typename acc_t>
void statistics_impl(const Tensor& h, const Tensor& weight, const Tensor& bias, acc_t cap, bool need_m1,
                     bool need_m2, const Tensor& omega, Tensor& lse, Tensor& m1, Tensor& m2, Tensor& smoothing_sum) {
  const int64_t rows = h.size(0), dim = h.size(1), vocab = weight.size(0);
  const int64_t row_block = forward_row_block(rows);
  const auto opts = h.options();
  acc_t* lse_ptr = lse.data_ptr<acc_t>();
  const acc_t* om = omega.defined() ? omega.data_ptr<acc_t>() : nullptr;
  acc_t* sum_ptr = om ? smoothing_sum.data_ptr<acc_t>() : nullptr;
  parallel_blocks(rows, row_block, [&] {
    Tensor logits_flat = at::empty({row_block * kVocabTile}, opts);
    Tensor ec_flat = at::empty({need_m1 ? row_block * kVocabTile : 0}, opts);
    Tensor ephi_flat = at::empty({need_m2 ? row_block * kVocabTile : 0}, opts);
    Tensor weight_flat = at::empty({kVocabTile * (need_m2 ? 2 : 1) * dim}, opts);
    return [&, logits_flat, ec_flat, ephi_flat, weight_flat](int64_t r0, int64_t n) {
      const Tensor h_block = h.narrow(0, r0, n);
      Tensor m1_block = need_m1 ? m1.narrow(0, r0, n) : Tensor();
      Tensor m2_block = need_m2 ? m2.narrow(0, r0, n) : Tensor();
      std::vector<OnlineSoftmax<acc_t>> softmax(n);
      for (int64_t v0 = 0; v0 < vocab; v0 += kVocabTile) {
        const int64_t cols = std::min(kVocabTile, vocab - v0);
        const Tensor stacked = load_weight_tile(weight, v0, cols, weight_flat, need_m2);
        Tensor logits = scratch_view(logits_flat, n, cols);
        Tensor ec = need_m1 ? scratch_view(ec_flat, n, cols) : Tensor();
        Tensor ephi = need_m2 ? scratch_view(ephi_flat, n, cols) : Tensor();
        tile_logits(logits, h_block, stacked.narrow(1, 0, dim), bias, v0);
        acc_t* z = logits.data_ptr<acc_t>();
        for (int64_t i = 0; i < n; ++i) {
          acc_t* row = z + i * cols;
          acc_t* ec_row = need_m1 ? ec.data_ptr<acc_t>() + i * cols : nullptr;
          acc_t* ephi_row = need_m2 ? ephi.data_ptr<acc_t>() + i * cols : nullptr;
          using Vec = at::vec::Vectorized<acc_t>;
          const acc_t* om_tile = om ? om + v0 : nullptr;
          Vec smoothed_lanes(0);
          int64_t j = 0;
          for (; j + Vec::size() <= cols; j += Vec::size())
            smoothed_lanes = smoothed_lanes + statistics_step<Vec>(row, ec_row, ephi_row, om_tile, j, cap);
          acc_t smoothed = sum_lanes(smoothed_lanes);
          for (; j < cols; ++j) smoothed += statistics_step<acc_t>(row, ec_row, ephi_row, om_tile, j, cap);
          if (om) sum_ptr[r0 + i] += smoothed;
          const acc_t rescale = softmax[i].rescale_for(row_max(row, cols));
          softmax[i].sum += exp_shifted_sum_inplace(row, cols, softmax[i].shift());
          for (int64_t j = 0; j < cols; ++j) {
            if (need_m1) ec_row[j] *= row[j];
            if (need_m2) ephi_row[j] *= row[j];
          }
          if (rescale != acc_t(1)) {
            if (need_m1) scale_inplace(m1_block.data_ptr<acc_t>() + i * dim, dim, rescale);
            if (need_m2) scale_inplace(m2_block.data_ptr<acc_t>() + i * dim, dim, rescale);
          }
        }
        if (need_m1) m1_block.addmm_(ec, stacked.narrow(1, 0, dim));
        if (need_m2) m2_block.addmm_(ephi, stacked.narrow(1, dim, dim));
      }
      for (int64_t i = 0; i < n; ++i) {
        lse_ptr[r0 + i] = softmax[i].lse();
        const acc_t inv = acc_t(1) / softmax[i].sum;
        if (need_m1) scale_inplace(m1_block.data_ptr<acc_t>() + i * dim, dim, inv);
        if (need_m2) scale_inplace(m2_block.data_ptr<acc_t>() + i * dim, dim, inv);
      }
    };
  });
}

struct SweepRows {
  Tensor h, lse, amount, row_const, T, Q;  // accumulation dtype; T / Q undefined when unused
  Tensor omega, grad_sum;                  // label smoothing's weights (V) and dF/dS (N); undefined without it
  const int64_t* target;
};

template <typename acc_t>
void sweep_impl(const SweepRows& r, const Tensor& weight, const Tensor& bias, acc_t cap, bool want_h, bool want_w,
                bool want_b, Tensor& grad_h_partials, Tensor& grad_w, Tensor& grad_b) {
  const int64_t rows = r.h.size(0), dim = r.h.size(1), vocab = weight.size(0);
  const bool has_T = r.T.defined(), has_Q = r.Q.defined();
  const auto opts = r.h.options();
  const acc_t* lse = r.lse.data_ptr<acc_t>();
  const acc_t* amount = r.amount.data_ptr<acc_t>();
  const acc_t* row_const = r.row_const.data_ptr<acc_t>();
  const acc_t* om = r.omega.defined() ? r.omega.data_ptr<acc_t>() : nullptr;
  const acc_t* grad_sum = om ? r.grad_sum.data_ptr<acc_t>() : nullptr;
  parallel_blocks(vocab, kVocabTile, [&] {
    struct Scratch {
      Tensor grad_h_part, probs, grad, t2, pc, pphi, weight_flat, acc_w, acc_st_Q;
      std::vector<acc_t> acc_b;
    };
    const int64_t tile = kRowBlock * kVocabTile;
    Scratch t{want_h ? grad_h_partials[at::get_thread_num()] : Tensor(), at::empty({tile}, opts),
              at::empty({tile}, opts), at::empty({has_Q ? tile : 0}, opts), at::empty({has_T ? tile : 0}, opts),
              at::empty({has_Q ? tile : 0}, opts), at::empty({kVocabTile * (has_Q ? 2 : 1) * dim}, opts),
              at::empty({kVocabTile, dim}, opts), at::empty({has_Q ? kVocabTile : 0, dim}, opts),
              std::vector<acc_t>(kVocabTile)};
    return [&, t](int64_t v0, int64_t cols) mutable {
      const Tensor stacked = load_weight_tile(weight, v0, cols, t.weight_flat, has_Q);
      const Tensor w = stacked.narrow(1, 0, dim);
      Tensor tile_w = t.acc_w.narrow(0, 0, cols).zero_();
      Tensor tile_st_Q = has_Q ? t.acc_st_Q.narrow(0, 0, cols).zero_() : Tensor();
      std::fill(t.acc_b.begin(), t.acc_b.end(), acc_t(0));
      for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
        const int64_t n = std::min(kRowBlock, rows - r0);
        const Tensor h_block = r.h.narrow(0, r0, n);
        Tensor probs = scratch_view(t.probs, n, cols), grad = scratch_view(t.grad, n, cols);
        Tensor t2 = has_Q ? scratch_view(t.t2, n, cols) : Tensor();
        Tensor pc = has_T ? scratch_view(t.pc, n, cols) : Tensor();
        Tensor pphi = has_Q ? scratch_view(t.pphi, n, cols) : Tensor();
        tile_logits(probs, h_block, w, bias, v0);
        if (has_T) at::mm_out(grad, r.T.narrow(0, r0, n), w.t());                       // T . W_v
        if (has_Q) at::mm_out(t2, r.Q.narrow(0, r0, n), stacked.narrow(1, dim, dim).t());  // Q . W_v^2
        acc_t* s = probs.data_ptr<acc_t>();
        acc_t* g = grad.data_ptr<acc_t>();
        acc_t* q_dot = has_Q ? t2.data_ptr<acc_t>() : nullptr;
        acc_t* pc_ptr = has_T ? pc.data_ptr<acc_t>() : nullptr;
        acc_t* pphi_ptr = has_Q ? pphi.data_ptr<acc_t>() : nullptr;
        for (int64_t i = 0; i < n; ++i) {
          using Vec = at::vec::Vectorized<acc_t>;
          const int64_t row = r0 + i;
          const acc_t* om_tile = om ? om + v0 : nullptr;
          const acc_t row_grad_sum = om ? grad_sum[row] : acc_t(0);
          int64_t j = 0;
          for (; j + Vec::size() <= cols; j += Vec::size())
            sweep_step<Vec>(s, g, q_dot, pc_ptr, pphi_ptr, om_tile, i * cols + j, j, lse[row], row_const[row],
                            row_grad_sum, cap);
          for (; j < cols; ++j)
            sweep_step<acc_t>(s, g, q_dot, pc_ptr, pphi_ptr, om_tile, i * cols + j, j, lse[row], row_const[row],
                              row_grad_sum, cap);
          subtract_at_target(g + i * cols, r.target[row], v0, cols, amount[row]);
          if (want_b) add_columns(t.acc_b.data(), g + i * cols, cols);
        }
        if (want_h) t.grad_h_part.narrow(0, r0, n).addmm_(grad, w);
        if (want_w) {
          tile_w.addmm_(grad.t(), h_block);
          if (has_T) tile_w.addmm_(pc.t(), r.T.narrow(0, r0, n));          // (s c)^T T
          if (has_Q) tile_st_Q.addmm_(pphi.t(), r.Q.narrow(0, r0, n));     // (s phi)^T Q
        }
      }
      if (want_w) {
        if (has_Q) tile_w.addcmul_(w, tile_st_Q, 2);
        grad_w.narrow(0, v0, cols).copy_(tile_w);
      }
      if (want_b) std::copy(t.acc_b.begin(), t.acc_b.begin() + cols, grad_b.data_ptr<acc_t>() + v0);
    };
  });
}

}  // namespace

// Label smoothing's weights (V,) in the accumulation dtype, or undefined.
static Tensor smoothing_weights_acc(const c10::optional<Tensor>& omega, int64_t vocab, at::ScalarType acc,
                                    const char* op) {
  if (!omega.has_value() || !omega->defined()) return Tensor();
  TORCH_CHECK(omega->dim() == 1 && omega->size(0) == vocab, op, ": smoothing_weights must have shape (", vocab,
              ",), got ", omega->sizes());
  return omega->to(acc).contiguous();
}

std::tuple<Tensor, Tensor, Tensor, Tensor> softcap_statistics(const Tensor& input, const Tensor& weight,
                                                              const c10::optional<Tensor>& bias, double softcap,
                                                              bool need_m1, bool need_m2,
                                                              const c10::optional<Tensor>& smoothing_weights) {
  TORCH_CHECK(input.dim() == 2 && weight.dim() == 2 && input.size(1) == weight.size(1),
              "dropreg::softcap_statistics: input (N, d) and weight (V, d) expected");
  TORCH_CHECK(softcap > 0, "dropreg::softcap_statistics: softcap must be positive, got ", softcap);
  RECORD_FUNCTION("dropreg::softcap_statistics", std::vector<c10::IValue>());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto acc = accumulation_type(input);
  const Tensor h = input.to(acc).contiguous();
  const Tensor b = bias.has_value() && bias->defined() ? bias->to(acc).contiguous() : Tensor();
  const int64_t rows = h.size(0), dim = h.size(1);
  Tensor lse = at::empty({rows}, h.options());
  Tensor m1 = at::zeros({need_m1 ? rows : 0, dim}, h.options());
  Tensor m2 = at::zeros({need_m2 ? rows : 0, dim}, h.options());
  const Tensor omega = smoothing_weights_acc(smoothing_weights, weight.size(0), acc, "dropreg::softcap_statistics");
  Tensor smoothing_sum = at::zeros({omega.defined() ? rows : 0}, h.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "softcap_statistics", [&] {
    statistics_impl<scalar_t>(h, weight.contiguous(), b, static_cast<scalar_t>(softcap), need_m1, need_m2, omega,
                              lse, m1, m2, smoothing_sum);
  });
  return {lse, m1, m2, smoothing_sum};
}

std::tuple<Tensor, Tensor, Tensor> softcap_gradient_sweep(
    const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias, double softcap, const Tensor& lse,
    const Tensor& target, const Tensor& amount, const Tensor& row_const, const c10::optional<Tensor>& T,
    const c10::optional<Tensor>& Q, const c10::optional<Tensor>& smoothing_weights,
    const c10::optional<Tensor>& grad_smoothing_sum, std::array<bool, 3> output_mask) {
  TORCH_CHECK(input.dim() == 2 && weight.dim() == 2 && input.size(1) == weight.size(1),
              "dropreg::softcap_gradient_sweep: input (N, d) and weight (V, d) expected");
  TORCH_CHECK(softcap > 0, "dropreg::softcap_gradient_sweep: softcap must be positive, got ", softcap);
  const bool has_Q = Q.has_value() && Q->defined();
  const bool has_T = T.has_value() && T->defined();
  TORCH_CHECK(!has_Q || has_T, "dropreg::softcap_gradient_sweep: Q needs T");
  RECORD_FUNCTION("dropreg::softcap_gradient_sweep", std::vector<c10::IValue>());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const bool has_bias = bias.has_value() && bias->defined();
  const bool want_h = output_mask[0], want_w = output_mask[1], want_b = output_mask[2] && has_bias;
  const auto acc = accumulation_type(input);
  const int64_t rows = input.size(0), dim = input.size(1), vocab = weight.size(0);
  SweepRows r;
  r.h = input.to(acc).contiguous();
  r.lse = lse.to(acc).contiguous();
  r.amount = amount.to(acc).contiguous();
  r.row_const = row_const.to(acc).contiguous();
  if (has_T) r.T = T->to(acc).contiguous();
  if (has_Q) r.Q = Q->to(acc).contiguous();
  r.omega = smoothing_weights_acc(smoothing_weights, vocab, acc, "dropreg::softcap_gradient_sweep");
  if (r.omega.defined()) {
    TORCH_CHECK(grad_smoothing_sum.has_value() && grad_smoothing_sum->defined() &&
                    grad_smoothing_sum->dim() == 1 && grad_smoothing_sum->size(0) == rows,
                "dropreg::softcap_gradient_sweep: smoothing_weights need grad_smoothing_sum of shape (", rows, ",)");
    r.grad_sum = grad_smoothing_sum->to(acc).contiguous();
  }
  const Tensor target_c = target.contiguous();
  r.target = target_c.data_ptr<int64_t>();
  const Tensor b = has_bias ? bias->to(acc).contiguous() : Tensor();
  Tensor grad_h_partials = want_h ? at::zeros({at::get_num_threads(), rows, dim}, r.h.options()) : Tensor();
  Tensor grad_w = want_w ? at::empty({vocab, dim}, r.h.options()) : at::empty({0}, r.h.options());
  Tensor grad_b = want_b ? at::empty({vocab}, r.h.options()) : at::empty({0}, r.h.options());
  if (want_h || want_w || want_b) {
    AT_DISPATCH_FLOATING_TYPES(acc, "softcap_gradient_sweep", [&] {
      sweep_impl<scalar_t>(r, weight.contiguous(), b, static_cast<scalar_t>(softcap), want_h, want_w, want_b,
                           grad_h_partials, grad_w, grad_b);
    });
  }
  return {want_h ? grad_h_partials.sum(0) : at::empty({0}, r.h.options()), grad_w, grad_b};
}

}  // namespace dropreg
