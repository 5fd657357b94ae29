#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

namespace dropreg {

// Per-row (ce, quadratic, sign_term) plus the saved statistics (lse, mu, var) that backward needs.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_ce_forward(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& target, const c10::optional<at::Tensor>& signs, int64_t seed, bool need_explicit,
    bool need_implicit);

// (grad_input, grad_weight, grad_bias); an output not asked for in output_mask is an empty tensor. grad_mu
// (optional): the upstream gradient of the mu output, used by loss options whose terms depend on mu (z_loss).
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_ce_backward(
    const at::Tensor& grad_ce, const at::Tensor& grad_quadratic, const at::Tensor& grad_sign_term,
    const c10::optional<at::Tensor>& grad_mu,
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& target, const c10::optional<at::Tensor>& signs, int64_t seed, const at::Tensor& lse,
    const at::Tensor& mu, const at::Tensor& var, bool need_explicit, bool need_implicit,
    std::array<bool, 3> output_mask);

// CE only: ([sum_i row_weight_i ce_i, sum_i z_weight_i lse_i^2], grad_input, grad_weight, grad_bias) in one pass
// of 3 NVd, the gradients those of the sum of both; block_rows rows of full-vocabulary logits are held at a time;
// z_weight (optional) is the z-loss's per-row weight; an output not asked for in output_mask is empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_ce_with_grads(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& target, const at::Tensor& row_weight, const c10::optional<at::Tensor>& z_weight,
    int64_t block_rows, std::array<bool, 3> output_mask, c10::optional<double> softcap,
    const c10::optional<at::Tensor>& smoothing_weights, const c10::optional<at::Tensor>& smoothing_row_weight);

// softmax_mean: (mu, lse) per row, and the gradients of mu (docs/math.md, every-site terms).
std::tuple<at::Tensor, at::Tensor> softmax_mean_forward(const at::Tensor& input, const at::Tensor& weight,
                                                        const c10::optional<at::Tensor>& bias);
std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_mean_backward(
    const at::Tensor& grad_mu, const at::Tensor& input, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& lse, const at::Tensor& mu,
    std::array<bool, 3> output_mask);

// The vocabulary passes of a softcapped head (docs/math.md 3.6; the per-row algebra is dropreg/softcap.py's):
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
