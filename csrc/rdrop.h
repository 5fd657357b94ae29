#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

namespace dropreg {

// Per-row (ce1, ce2, kl) plus the saved statistics (lse (2, N), E_p[D] (2, N)) that backward needs.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rdrop_forward(
    const at::Tensor& input1, const at::Tensor& input2, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& target);

// (grad_input1, grad_input2, grad_weight, grad_bias); outputs not asked for in output_mask are empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rdrop_backward(
    const at::Tensor& grad_ce1, const at::Tensor& grad_ce2, const at::Tensor& grad_kl, const at::Tensor& input1,
    const at::Tensor& input2, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& target, const at::Tensor& lse, const at::Tensor& expected_d, std::array<bool, 4> output_mask);

}  // namespace dropreg
