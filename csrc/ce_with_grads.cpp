// CE only, with the gradients formed during the forward (docs/math.md, "CE only"): 3 NVd multiply-adds
// instead of 4, because the backward's upstream gradient of a "mean"/"sum" loss is one scalar that only
// scales them. The price is one row block's full-vocabulary logits (block_rows x V, the workspace).
//
// Row blocks run one after another; inside a block the vocabulary panels run in parallel, each thread owning
// its panels (so its rows of grad_weight, race-free) and a private block_rows x d partial of grad_input
// (threads x block_rows x d fp32 beside the workspace).
//   pass 1, per panel: z_t = h W_t^T (+ b_t) (1 RCd); e = exp(z_t - m_t) stored in place with the panel's row
//           max m_t; the thread's running (max, sum) per row; the target logit captured.
//   merge:  lse per row from the threads' (max, sum).
//   pass 2, per panel: G_t = (w + 2 zw lse) e exp(m_t - lse) - w [v = y] in place (zw: the z-loss's row weight,
//           0 without it); grad_input += G_t W_t (1 RCd);
//           grad_weight_t += G_t^T h (1 RCd); grad_bias_t += column sums of G_t.
// With a softcap s (docs/math.md 3.6) pass 1 caps the panel in place, z = s tanh(r / s), and keeps it (the
// cap's derivative 1 - (z / s)^2 needs it) instead of storing e; pass 2 forms G from z. Label smoothing's
// weights omega (docs/math.md 3.7) add -rs sum_v omega_v z_v to the loss and -rs omega_v to G (before the cap's
// factor), rs the rows' smoothing weights.
#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include <vector>

#include "vocab_passes.h"
#include "tile_loops.h"

namespace dropreg {

namespace {

// Vocabulary columns per task: up to 2048, so that a panel's G is formed once and its grad_input GEMM runs with
// K = 2048 instead of re-reading grad_input's partial every 256 columns; narrower (down to 256) when that is
// needed to give every thread at least one panel.
constexpr int64_t kMaxPanel = 2048;
constexpr int64_t kMinPanel = 256;

int64_t panel_width(int64_t vocab, int64_t threads) {
  const int64_t even_share = ceil_div(ceil_div(vocab, threads), kMinPanel) * kMinPanel;
  return std::max(kMinPanel, std::min(kMaxPanel, even_share));
}

// The calling thread's slot in per-thread state sized by at::get_num_threads().
int64_t thread_slot(int64_t threads) {
  const int64_t slot = at::get_thread_num();
  TORCH_CHECK(slot >= 0 && slot < threads, "dropreg::linear_ce_with_grads: thread number ", slot,
              " outside the ", threads, " threads the per-thread buffers were sized for");
  return slot;
}

template <typename acc_t>
struct RowState {  // one thread's online softmax over its panels, for every row of the block
  std::vector<acc_t> max, sum;
  std::vector<acc_t> smoothing_sum;  // sum_v omega_v z_v over the thread's panels (with label smoothing)
  explicit RowState(int64_t rows)
      : max(rows, -std::numeric_limits<acc_t>::infinity()), sum(rows, acc_t(0)), smoothing_sum(rows, acc_t(0)) {}
  void absorb(int64_t i, acc_t part_max, acc_t part_sum) {  // part_sum = sum exp(z - shift_of(part_max))
    if (part_max == -std::numeric_limits<acc_t>::infinity()) return;  // an all -inf part adds nothing
    const acc_t new_max = nan_max(max[i], part_max);
    const acc_t shift = OnlineSoftmax<acc_t>::shift_of(new_max);
    sum[i] = sum[i] * std::exp(max[i] - shift) + part_sum * std::exp(OnlineSoftmax<acc_t>::shift_of(part_max) - shift);
    max[i] = new_max;
  }
};

// A softcapped row's logit gradient in place of its capped logits z, one element step at j (V wide):
// g_v = (scale exp(z_v - lse) - smoothing omega_v) (1 - (z_v / cap)^2); omega may be null (no smoothing).
template <typename V, typename T>
void capped_gradient_step(T* z, const T* omega, int64_t j, T lse, T scale, T smoothing, T cap) {
  const V capped = load_at(z + j, V()), t = capped / V(cap);
  V g = V(scale) * exp_of(capped - V(lse));
  if (omega) g = g - V(smoothing) * load_at(omega + j, V());
  store_at(z + j, g * (V(1) - t * t));
}

template <typename T>
void capped_gradient_row(T* z, const T* omega, int64_t n, T lse, T scale, T smoothing, T cap) {
  using Vec = at::vec::Vectorized<T>;
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) capped_gradient_step<Vec>(z, omega, j, lse, scale, smoothing, cap);
  for (; j < n; ++j) capped_gradient_step<T>(z, omega, j, lse, scale, smoothing, cap);
}

// Rows [v0, v0 + cols) of the weight in the accumulation dtype: a view when no upcast is needed (flat_buffer
// undefined), else an upcast copy into flat_buffer.
inline Tensor weight_tile(const Tensor& weight, int64_t v0, int64_t cols, const Tensor& flat_buffer) {
  if (!flat_buffer.defined()) return weight.narrow(0, v0, cols);
  return load_weight_tile(weight, v0, cols, flat_buffer, false);
}

template <typename acc_t>
void ce_with_grads_impl(const Tensor& h, const Tensor& weight, const Tensor& bias, const Tensor& target,
                        const Tensor& row_weight, const Tensor& z_weight, acc_t cap, const Tensor& omega_weights,
                        const Tensor& smoothing_row_weight, int64_t block_rows, bool want_h, bool want_w,
                        bool want_b, Tensor& loss, Tensor& grad_h, Tensor& grad_w, Tensor& grad_b) {
  const int64_t rows = h.size(0), dim = h.size(1), vocab = weight.size(0);
  const int64_t threads = at::get_num_threads();
  const int64_t panel = panel_width(vocab, threads);
  const int64_t n_panels = ceil_div(vocab, panel);
  const bool upcast_weight = weight.scalar_type() != h.scalar_type();
  const bool any_grad = want_h || want_w || want_b;
  const auto opts = h.options();
  const int64_t* y = target.data_ptr<int64_t>();
  const acc_t* rw = row_weight.data_ptr<acc_t>();
  const acc_t* zw = z_weight.defined() ? z_weight.data_ptr<acc_t>() : nullptr;
  const bool capped = cap > acc_t(0);
  const acc_t* omega = omega_weights.defined() ? omega_weights.data_ptr<acc_t>() : nullptr;
  const acc_t* rs = omega ? smoothing_row_weight.data_ptr<acc_t>() : nullptr;
  Tensor logits = at::empty({block_rows, vocab}, opts);  // the workspace: e, then G, of one row block
  std::vector<acc_t> panel_max(block_rows * n_panels);
  std::vector<acc_t> target_logit(block_rows), lse(block_rows);
  Tensor grad_h_partials = want_h ? at::empty({threads, block_rows, dim}, opts) : Tensor();
  double total = 0, total_z = 0;
  for (int64_t r0 = 0; r0 < rows; r0 += block_rows) {
    const int64_t n = std::min(block_rows, rows - r0);
    const Tensor h_block = h.narrow(0, r0, n);
    Tensor block = logits.narrow(0, 0, n);
    acc_t* z = block.data_ptr<acc_t>();
    std::vector<RowState<acc_t>> states(threads, RowState<acc_t>(n));
    at::parallel_for(0, n_panels, 1, [&](int64_t t0, int64_t t1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      Tensor weight_flat = upcast_weight ? at::empty({panel * dim}, opts) : Tensor();
      RowState<acc_t>& state = states[thread_slot(threads)];
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t v0 = t * panel, cols = std::min(panel, vocab - v0);
        const Tensor w = weight_tile(weight, v0, cols, weight_flat);
        Tensor z_panel = block.narrow(1, v0, cols);
        tile_logits(z_panel, h_block, w, bias, v0);
        for (int64_t i = 0; i < n; ++i) {
          acc_t* row = z + i * vocab + v0;
          if (capped) softcap_inplace(row, cols, cap);
          const int64_t yt = y[r0 + i] - v0;
          if (yt >= 0 && yt < cols) target_logit[i] = row[yt];
          if (omega) state.smoothing_sum[i] += dot(row, omega + v0, cols);
          const acc_t m = row_max(row, cols);
          panel_max[i * n_panels + t] = m;
          const acc_t shift = OnlineSoftmax<acc_t>::shift_of(m);
          state.absorb(i, m, capped ? exp_shifted_sum(row, cols, shift) : exp_shifted_sum_inplace(row, cols, shift));
        }
      }
    });
    for (int64_t i = 0; i < n; ++i) {
      RowState<acc_t> merged(1);
      for (const auto& s : states) merged.absorb(0, s.max[i], s.sum[i]);
      lse[i] = OnlineSoftmax<acc_t>::shift_of(merged.max[0]) + std::log(merged.sum[0]);
      if (rw[r0 + i] != acc_t(0)) total += rw[r0 + i] * (lse[i] - target_logit[i]);
      if (zw && zw[r0 + i] != acc_t(0)) total_z += zw[r0 + i] * lse[i] * lse[i];
      if (rs && rs[r0 + i] != acc_t(0)) {
        acc_t smoothing_sum = 0;
        for (const auto& s : states) smoothing_sum += s.smoothing_sum[i];
        total -= rs[r0 + i] * smoothing_sum;
      }
    }
    if (!any_grad) continue;
    if (want_h) grad_h_partials.zero_();
    at::parallel_for(0, n_panels, 1, [&](int64_t t0, int64_t t1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      Tensor weight_flat = upcast_weight && (want_h || want_w) ? at::empty({panel * dim}, opts) : Tensor();
      Tensor grad_h_part = want_h ? grad_h_partials[thread_slot(threads)].narrow(0, 0, n) : Tensor();
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t v0 = t * panel, cols = std::min(panel, vocab - v0);
        for (int64_t i = 0; i < n; ++i) {
          acc_t* row = z + i * vocab + v0;
          const acc_t w_i = rw[r0 + i];
          const acc_t s_i = zw ? w_i + 2 * zw[r0 + i] * lse[i] : w_i;  // what the softmax part is scaled by
          if (capped) {  // capped logits are finite: no empty panel
            capped_gradient_row(row, omega ? omega + v0 : nullptr, cols, lse[i], s_i, rs ? rs[r0 + i] : acc_t(0), cap);
            const acc_t t_y = target_logit[i] / cap;
            subtract_at_target(row, y[r0 + i], v0, cols, w_i * (acc_t(1) - t_y * t_y));
            continue;
          }
          const acc_t m = panel_max[i * n_panels + t];
          // e = exp(z - m) is 0 on an all -inf panel: scale by 0 there, not by a factor that may overflow.
          const bool empty_panel = m == -std::numeric_limits<acc_t>::infinity();
          scale_inplace(row, cols, empty_panel ? acc_t(0) : s_i * std::exp(m - lse[i]));
          if (omega) subtract_scaled(row, omega + v0, cols, rs[r0 + i]);
          subtract_at_target(row, y[r0 + i], v0, cols, w_i);
        }
        const Tensor g = block.narrow(1, v0, cols);
        if (want_b) {
          acc_t* gb = grad_b.data_ptr<acc_t>() + v0;
          for (int64_t i = 0; i < n; ++i) add_columns(gb, z + i * vocab + v0, cols);
        }
        if (!want_h && !want_w) continue;
        const Tensor w = weight_tile(weight, v0, cols, weight_flat);
        if (want_h) grad_h_part.addmm_(g, w);
        if (want_w) grad_w.narrow(0, v0, cols).addmm_(g.t(), h_block);
      }
    });
    if (want_h) grad_h.narrow(0, r0, n).copy_(grad_h_partials.narrow(1, 0, n).sum(0));
  }
  loss[0].fill_(static_cast<acc_t>(total));
  loss[1].fill_(static_cast<acc_t>(total_z));
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_ce_with_grads(
    const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias, const Tensor& target,
    const Tensor& row_weight, const c10::optional<Tensor>& z_weight, int64_t block_rows,
    std::array<bool, 3> output_mask, c10::optional<double> softcap, const c10::optional<Tensor>& smoothing_weights,
    const c10::optional<Tensor>& smoothing_row_weight) {
  TORCH_CHECK(input.dim() == 2 && weight.dim() == 2 && input.size(1) == weight.size(1),
              "dropreg::linear_ce_with_grads: input (N, d) and weight (V, d) expected");
  TORCH_CHECK(block_rows >= 1, "dropreg::linear_ce_with_grads: block_rows must be >= 1, got ", block_rows);
  TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 && target.size(0) == input.size(0),
              "dropreg::linear_ce_with_grads: target must be int64 of shape (N,)");
  TORCH_CHECK(row_weight.dim() == 1 && row_weight.size(0) == input.size(0),
              "dropreg::linear_ce_with_grads: row_weight must have shape (N,)");
  const bool has_z = z_weight.has_value() && z_weight->defined();
  TORCH_CHECK(!has_z || (z_weight->dim() == 1 && z_weight->size(0) == input.size(0)),
              "dropreg::linear_ce_with_grads: z_weight must have shape (N,)");
  TORCH_CHECK(!softcap.has_value() || *softcap > 0, "dropreg::linear_ce_with_grads: softcap must be > 0, got ",
              softcap.value_or(0.0));
  const bool has_smoothing = smoothing_weights.has_value() && smoothing_weights->defined();
  TORCH_CHECK(has_smoothing == (smoothing_row_weight.has_value() && smoothing_row_weight->defined()),
              "dropreg::linear_ce_with_grads: smoothing_weights and smoothing_row_weight are given together");
  TORCH_CHECK(!has_smoothing || (smoothing_weights->dim() == 1 && smoothing_weights->size(0) == weight.size(0)),
              "dropreg::linear_ce_with_grads: smoothing_weights must have shape (", weight.size(0), ",), got ",
              has_smoothing ? smoothing_weights->sizes() : at::IntArrayRef());
  TORCH_CHECK(!has_smoothing || (smoothing_row_weight->dim() == 1 && smoothing_row_weight->size(0) == input.size(0)),
              "dropreg::linear_ce_with_grads: smoothing_row_weight must have shape (", input.size(0), ",), got ",
              has_smoothing ? smoothing_row_weight->sizes() : at::IntArrayRef());
  RECORD_FUNCTION("dropreg::ce_with_grads", std::vector<c10::IValue>());
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // autograd is registered in Python
  const bool has_bias = bias.has_value() && bias->defined();
  const bool want_h = output_mask[0], want_w = output_mask[1], want_b = output_mask[2] && has_bias;
  const auto acc = accumulation_type(input);
  const int64_t rows = input.size(0), dim = input.size(1), vocab = weight.size(0);
  const Tensor h = input.to(acc).contiguous();
  const Tensor w = weight.contiguous();
  const Tensor b = has_bias ? bias->to(acc).contiguous() : Tensor();
  Tensor loss = at::empty({2}, h.options());  // [sum row_weight ce, sum z_weight lse^2]
  Tensor grad_h = want_h ? at::empty({rows, dim}, h.options()) : at::empty({0}, input.options());
  Tensor grad_w = want_w ? at::zeros({vocab, dim}, h.options()) : at::empty({0}, weight.options());
  Tensor grad_b = want_b ? at::zeros({vocab}, h.options()) : at::empty({0}, input.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "linear_ce_with_grads", [&] {
    ce_with_grads_impl<scalar_t>(h, w, b, target.contiguous(), row_weight.to(acc).contiguous(),
                                 has_z ? z_weight->to(acc).contiguous() : Tensor(),
                                 static_cast<scalar_t>(softcap.value_or(0.0)),
                                 has_smoothing ? smoothing_weights->to(acc).contiguous() : Tensor(),
                                 has_smoothing ? smoothing_row_weight->to(acc).contiguous() : Tensor(),
                                 std::min(block_rows, std::max<int64_t>(rows, 1)), want_h, want_w, want_b, loss,
                                 grad_h, grad_w, grad_b);
  });
  return {loss, want_h ? grad_h.to(input.scalar_type()) : grad_h, want_w ? grad_w.to(weight.scalar_type()) : grad_w,
          want_b ? grad_b.to(bias->scalar_type()) : grad_b};
}

}  // namespace dropreg
