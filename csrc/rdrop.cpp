// The CPU kernels' vocabulary passes for R-Drop's fused loss: two cross entropies and the symmetric KL between the
// softmaxes of two dropout passes (docs/math.md, "R-Drop"); the per-row terms from these statistics are
// dropreg/ops.py's. Same tile loops as vocab_passes.cpp: row-parallel statistics with two online softmaxes per
// row, vocabulary-parallel gradient sweep.
//
// kl = (E_p1[D] - E_p2[D]) / 2 with D = z1 - z2 (the bias cancels). Multiply-adds: forward 2 NVd (the two
// logit GEMMs; D and its expectations come from the same tiles); backward 6 NVd (logit recompute 2,
// grad_input 2, grad_weight 2): 8 NVd in all.
#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include <vector>

#include "rdrop.h"
#include "tile_loops.h"

namespace dropreg {

namespace {

// Exponentiates both rows in place with their shifts; adds sum e and sum e * (z1 - z2) for each row.
template <typename T>
void absorb_pair(T* z1, T* z2, int64_t n, T shift1, T shift2, T sums[2], T weighted[2]) {
  using Vec = at::vec::Vectorized<T>;
  const Vec vshift1(shift1), vshift2(shift2);
  Vec s1(T(0)), s2(T(0)), w1(T(0)), w2(T(0));
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec a = Vec::loadu(z1 + j), b = Vec::loadu(z2 + j);
    const Vec diff = a - b;
    const Vec e1 = (a - vshift1).exp(), e2 = (b - vshift2).exp();
    e1.store(z1 + j);
    e2.store(z2 + j);
    s1 = s1 + e1;
    s2 = s2 + e2;
    w1 = at::vec::fmadd(e1, diff, w1);
    w2 = at::vec::fmadd(e2, diff, w2);
  }
  T lanes[4][Vec::size()];
  s1.store(lanes[0]);
  s2.store(lanes[1]);
  w1.store(lanes[2]);
  w2.store(lanes[3]);
  T acc[4] = {0, 0, 0, 0};
  for (int l = 0; l < 4; ++l)
    for (int64_t k = 0; k < Vec::size(); ++k) acc[l] += lanes[l][k];
  for (; j < n; ++j) {
    const T diff = z1[j] - z2[j];
    z1[j] = std::exp(z1[j] - shift1);
    z2[j] = std::exp(z2[j] - shift2);
    acc[0] += z1[j];
    acc[1] += z2[j];
    acc[2] += z1[j] * diff;
    acc[3] += z2[j] * diff;
  }
  sums[0] += acc[0];
  sums[1] += acc[1];
  weighted[0] += acc[2];
  weighted[1] += acc[3];
}

// Logit gradients in place of the logits (docs/math.md): with p_i = exp(z_i - lse_i), D = z1 - z2 and
// k = g_kl / 2:  g1 = g_ce1 p1 + k (p1 (D - E_p1 D) + p1 - p2),  g2 = g_ce2 p2 + k (-p2 (D - E_p2 D) - p1 + p2).
template <typename T>
void pair_gradient_row(T* z1, T* z2, int64_t n, T lse1, T lse2, T expected1, T expected2, T g_ce1, T g_ce2,
                       T half_kl) {
  using Vec = at::vec::Vectorized<T>;
  const Vec vlse1(lse1), vlse2(lse2), vk(half_kl);
  const Vec c1(g_ce1 + half_kl * (T(1) - expected1)), c2(g_ce2 + half_kl * (T(1) + expected2));
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec a = Vec::loadu(z1 + j), b = Vec::loadu(z2 + j);
    const Vec diff = a - b;
    const Vec p1 = (a - vlse1).exp(), p2 = (b - vlse2).exp();
    (p1 * (c1 + vk * diff) - vk * p2).store(z1 + j);
    (p2 * (c2 - vk * diff) - vk * p1).store(z2 + j);
  }
  for (; j < n; ++j) {
    const T diff = z1[j] - z2[j];
    const T p1 = std::exp(z1[j] - lse1), p2 = std::exp(z2[j] - lse2);
    z1[j] = p1 * (g_ce1 + half_kl * (diff - expected1 + T(1))) - half_kl * p2;
    z2[j] = p2 * (g_ce2 - half_kl * (diff - expected2 - T(1))) - half_kl * p1;
  }
}

template <typename acc_t>
void rdrop_forward_statistics(const Tensor& h1, const Tensor& h2, const Tensor& weight, const Tensor& bias,
                              Tensor& lse, Tensor& expected_d) {
  const int64_t rows = h1.size(0), dim = h1.size(1), vocab = weight.size(0);
  const int64_t row_block = forward_row_block(rows);
  const auto opts = h1.options();
  acc_t* lse_ptr = lse.data_ptr<acc_t>();
  acc_t* expected_ptr = expected_d.data_ptr<acc_t>();
  parallel_blocks(rows, row_block, [&] {
    Tensor z1_flat = at::empty({row_block * kVocabTile}, opts), z2_flat = at::empty({row_block * kVocabTile}, opts);
    Tensor weight_flat = at::empty({kVocabTile * dim}, opts);
    return [&, z1_flat, z2_flat, weight_flat](int64_t r0, int64_t n) {
      std::vector<OnlineSoftmax<acc_t>> softmax1(n), softmax2(n);
      std::vector<acc_t> weighted1(n, acc_t(0)), weighted2(n, acc_t(0));  // sum e_i * D, rescaled
      for (int64_t v0 = 0; v0 < vocab; v0 += kVocabTile) {
        const int64_t cols = std::min(kVocabTile, vocab - v0);
        const Tensor w = load_weight_tile(weight, v0, cols, weight_flat, false);
        Tensor z1 = scratch_view(z1_flat, n, cols), z2 = scratch_view(z2_flat, n, cols);
        tile_logits(z1, h1.narrow(0, r0, n), w, bias, v0);
        tile_logits(z2, h2.narrow(0, r0, n), w, bias, v0);
        acc_t* a = z1.data_ptr<acc_t>();
        acc_t* b = z2.data_ptr<acc_t>();
        for (int64_t i = 0; i < n; ++i) {
          acc_t* row1 = a + i * cols;
          acc_t* row2 = b + i * cols;
          weighted1[i] *= softmax1[i].rescale_for(row_max(row1, cols));
          weighted2[i] *= softmax2[i].rescale_for(row_max(row2, cols));
          acc_t sums[2] = {0, 0}, weighted[2] = {0, 0};
          absorb_pair(row1, row2, cols, softmax1[i].shift(), softmax2[i].shift(), sums, weighted);
          softmax1[i].sum += sums[0];
          softmax2[i].sum += sums[1];
          weighted1[i] += weighted[0];
          weighted2[i] += weighted[1];
        }
      }
      for (int64_t i = 0; i < n; ++i) {
        lse_ptr[r0 + i] = softmax1[i].lse();
        lse_ptr[rows + r0 + i] = softmax2[i].lse();
        expected_ptr[r0 + i] = weighted1[i] / softmax1[i].sum;
        expected_ptr[rows + r0 + i] = weighted2[i] / softmax2[i].sum;
      }
    };
  });
}

template <typename acc_t>
void rdrop_backward_tiles(const Tensor& h1, const Tensor& h2, const Tensor& weight, const Tensor& bias,
                          const Tensor& target, const Tensor& lse, const Tensor& expected_d, const Tensor& g_ce1,
                          const Tensor& g_ce2, const Tensor& g_kl, bool want_h, bool want_w, bool want_b,
                          Tensor& grad_h_partials, Tensor& grad_w, Tensor& grad_b) {
  const int64_t rows = h1.size(0), dim = h1.size(1), vocab = weight.size(0);
  const auto opts = h1.options();
  const int64_t* y = target.data_ptr<int64_t>();
  const acc_t* lse_ptr = lse.data_ptr<acc_t>();
  const acc_t* expected_ptr = expected_d.data_ptr<acc_t>();
  const acc_t* g1_ptr = g_ce1.data_ptr<acc_t>();
  const acc_t* g2_ptr = g_ce2.data_ptr<acc_t>();
  const acc_t* gkl_ptr = g_kl.data_ptr<acc_t>();
  parallel_blocks(vocab, kVocabTile, [&] {
    struct Scratch {
      Tensor grad_h_part, z1_flat, z2_flat, weight_flat, acc_w;
      std::vector<acc_t> acc_b;
    };
    Scratch t{want_h ? grad_h_partials[at::get_thread_num()] : Tensor(),
              at::empty({kRowBlock * kVocabTile}, opts), at::empty({kRowBlock * kVocabTile}, opts),
              at::empty({kVocabTile * dim}, opts), at::empty({kVocabTile, dim}, opts),
              std::vector<acc_t>(kVocabTile)};
    return [&, t](int64_t v0, int64_t cols) mutable {
      const Tensor w = load_weight_tile(weight, v0, cols, t.weight_flat, false);
      Tensor tile_w = t.acc_w.narrow(0, 0, cols).zero_();
      std::fill(t.acc_b.begin(), t.acc_b.end(), acc_t(0));
      for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
        const int64_t n = std::min(kRowBlock, rows - r0);
        const Tensor h1_block = h1.narrow(0, r0, n), h2_block = h2.narrow(0, r0, n);
        Tensor z1 = scratch_view(t.z1_flat, n, cols), z2 = scratch_view(t.z2_flat, n, cols);
        tile_logits(z1, h1_block, w, bias, v0);
        tile_logits(z2, h2_block, w, bias, v0);
        acc_t* a = z1.data_ptr<acc_t>();
        acc_t* b = z2.data_ptr<acc_t>();
        for (int64_t i = 0; i < n; ++i) {
          const int64_t row = r0 + i;
          pair_gradient_row(a + i * cols, b + i * cols, cols, lse_ptr[row], lse_ptr[rows + row], expected_ptr[row],
                            expected_ptr[rows + row], g1_ptr[row], g2_ptr[row], acc_t(0.5) * gkl_ptr[row]);
          subtract_at_target(a + i * cols, y[row], v0, cols, g1_ptr[row]);
          subtract_at_target(b + i * cols, y[row], v0, cols, g2_ptr[row]);
          if (want_b) {
            add_columns(t.acc_b.data(), a + i * cols, cols);
            add_columns(t.acc_b.data(), b + i * cols, cols);
          }
        }
        if (want_h) {
          t.grad_h_part[0].narrow(0, r0, n).addmm_(z1, w);
          t.grad_h_part[1].narrow(0, r0, n).addmm_(z2, w);
        }
        if (want_w) tile_w.addmm_(z1.t(), h1_block).addmm_(z2.t(), h2_block);
      }
      if (want_w) grad_w.narrow(0, v0, cols).copy_(tile_w);
      if (want_b) std::copy(t.acc_b.begin(), t.acc_b.begin() + cols, grad_b.data_ptr<acc_t>() + v0);
    };
  });
}

}  // namespace

std::tuple<Tensor, Tensor> rdrop_statistics(const Tensor& input1, const Tensor& input2, const Tensor& weight,
                                            const c10::optional<Tensor>& bias) {
  TORCH_CHECK(input1.dim() == 2 && input1.sizes() == input2.sizes() && input1.size(1) == weight.size(1),
              "dropreg::rdrop_statistics: inputs (N, d) of equal shape and weight (V, d) expected");
  RECORD_FUNCTION("dropreg::rdrop_forward_stats", std::vector<c10::IValue>());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto acc = accumulation_type(input1);
  const int64_t rows = input1.size(0);
  const Tensor h1 = input1.to(acc).contiguous(), h2 = input2.to(acc).contiguous();
  const Tensor b = bias.has_value() && bias->defined() ? bias->to(acc).contiguous() : Tensor();
  Tensor lse = at::empty({2, rows}, h1.options());
  Tensor expected_d = at::empty({2, rows}, h1.options());  // E_p1[D], E_p2[D]
  AT_DISPATCH_FLOATING_TYPES(acc, "rdrop_statistics", [&] {
    rdrop_forward_statistics<scalar_t>(h1, h2, weight.contiguous(), b, lse, expected_d);
  });
  return {lse, expected_d};
}

std::tuple<Tensor, Tensor, Tensor> rdrop_gradient_sweep(
    const Tensor& input1, const Tensor& input2, const Tensor& weight, const c10::optional<Tensor>& bias,
    const Tensor& target, const Tensor& lse, const Tensor& expected_d, const Tensor& grad_ce1, const Tensor& grad_ce2,
    const Tensor& grad_kl, std::array<bool, 4> output_mask) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const bool has_bias = bias.has_value() && bias->defined();
  const bool want_h = output_mask[0] || output_mask[1], want_w = output_mask[2], want_b = output_mask[3] && has_bias;
  const auto acc = accumulation_type(input1);
  const int64_t rows = input1.size(0), dim = input1.size(1), vocab = weight.size(0);
  const Tensor h1 = input1.to(acc).contiguous(), h2 = input2.to(acc).contiguous();
  const Tensor b = has_bias ? bias->to(acc).contiguous() : Tensor();
  Tensor grad_h_partials = want_h ? at::zeros({at::get_num_threads(), 2, rows, dim}, h1.options()) : Tensor();
  Tensor grad_w = want_w ? at::empty({vocab, dim}, h1.options()) : at::empty({0}, h1.options());
  Tensor grad_b = want_b ? at::empty({vocab}, h1.options()) : at::empty({0}, h1.options());
  if (want_h || want_w || want_b) {
    RECORD_FUNCTION("dropreg::rdrop_backward_tiles", std::vector<c10::IValue>());
    AT_DISPATCH_FLOATING_TYPES(acc, "rdrop_gradient_sweep", [&] {
      rdrop_backward_tiles<scalar_t>(h1, h2, weight.contiguous(), b, target.contiguous(), lse.to(acc).contiguous(),
                                     expected_d.to(acc).contiguous(), grad_ce1.to(acc).contiguous(),
                                     grad_ce2.to(acc).contiguous(), grad_kl.to(acc).contiguous(), want_h, want_w,
                                     want_b, grad_h_partials, grad_w, grad_b);
    });
  }
  return {want_h ? grad_h_partials.sum(0) : at::empty({0}, h1.options()), grad_w, grad_b};
}

}  // namespace dropreg
