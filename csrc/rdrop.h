#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

namespace dropreg {

// R-Drop's statistics pass: per pass i and row, lse_i and E_pi[D] with D = z1 - z2, each (2, N), accumulation dtype.
std::tuple<at::Tensor, at::Tensor> rdrop_statistics(const at::Tensor& input1, const at::Tensor& input2,
                                                    const at::Tensor& weight, const c10::optional<at::Tensor>& bias);

// Its gradient sweep: (grad_h (2, N, d) = [G1 W; G2 W], grad_weight, grad_bias) in the accumulation dtype, the
// target correction skipped on a row whose target lies outside [0, V) (e.g. -1); outputs not asked for in
// output_mask ([h1, h2, weight, bias]) are empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rdrop_gradient_sweep(
    const at::Tensor& input1, const at::Tensor& input2, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& target, const at::Tensor& lse,
    const at::Tensor& expected_d, const at::Tensor& grad_ce1, const at::Tensor& grad_ce2, const at::Tensor& grad_kl,
    std::array<bool, 4> output_mask);

}  // namespace dropreg
