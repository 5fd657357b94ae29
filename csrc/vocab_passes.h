#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

namespace dropreg {

// The vocabulary passes of the CPU kernels. They know no per-row algebra: that is dropreg/rows.py's, which turns
// their statistics into the terms and the upstream gradients into the per-row vectors they take back.

// Statistics pass: per row lse, mu = E_s[W] and m2 = E_s[W*W] (normalized; empty (0, d) unless asked; m2 implies
// mu's pass), in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> vocab_statistics(const at::Tensor& input, const at::Tensor& weight,
                                                                const c10::optional<at::Tensor>& bias, bool need_mu,
                                                                bool need_m2);

// Gradient sweep: G_v = s_v (row_const + T_stack . [W_v | W_v*W_v]) - target_amount [v = target] (T_stack's second
// half only with_squares; no T_stack: G_v = s_v row_const; no target: no correction; a target outside [0, V): none
// on that row). Returns (G W, G^T h + S^T T_stack[:, :d] + 2 W * S^T T_stack[:, d:], sum_rows G) in the
// accumulation dtype; an output not asked for in output_mask is empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor> logit_gradient_sweep(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& lse,
    const at::Tensor& row_const, const c10::optional<at::Tensor>& T_stack, bool with_squares,
    const c10::optional<at::Tensor>& target, const c10::optional<at::Tensor>& target_amount,
    std::array<bool, 3> output_mask);

// CE only: ([sum_i row_weight_i ce_i, sum_i z_weight_i lse_i^2], grad_input, grad_weight, grad_bias) in one pass
// of 3 NVd, the gradients those of the sum of both; block_rows rows of full-vocabulary logits are held at a time;
// z_weight (optional) is the z-loss's per-row weight; an output not asked for in output_mask is empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_ce_with_grads(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& target, const at::Tensor& row_weight, const c10::optional<at::Tensor>& z_weight,
    int64_t block_rows, std::array<bool, 3> output_mask, c10::optional<double> softcap,
    const c10::optional<at::Tensor>& smoothing_weights, const c10::optional<at::Tensor>& smoothing_row_weight);

// The vocabulary passes of a softcapped head (docs/math.md 3.6; the per-row algebra is dropreg/rows.py's):
// per row lse of the capped logits and M1 = sum_v s_v c_v W_v, M2 = sum_v s_v phi_v W_v^2 (empty unless asked),
// and label smoothing's S = sum_v omega_v z_v (docs/math.md 3.7; empty without smoothing_weights omega);
// and the backward sweep: grad_input of sum_v G_v W_v, grad_weight of G^T h + (s c)^T T + 2 W * (s phi)^T Q and
// grad_bias of sum_rows G (G including S's gS omega c), all in the accumulation dtype (empty when not asked for).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> softcap_statistics(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, double softcap,
    bool need_m1, bool need_m2, const c10::optional<at::Tensor>& smoothing_weights);
std::tuple<at::Tensor, at::Tensor, at::Tensor> softcap_gradient_sweep(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, double softcap,
    const at::Tensor& lse, const at::Tensor& target, const at::Tensor& amount, const at::Tensor& row_const,
    const c10::optional<at::Tensor>& T, const c10::optional<at::Tensor>& Q,
    const c10::optional<at::Tensor>& smoothing_weights, const c10::optional<at::Tensor>& grad_smoothing_sum,
    std::array<bool, 3> output_mask);

// (samples, N) classes drawn from each row's softmax by streamed Gumbel-max (dropreg/signs.py).
at::Tensor sample_targets(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                          int64_t samples, int64_t seed);

}  // namespace dropreg
