// Streamed Gumbel-max sampling of targets from each row's softmax (the every-site explicit term's labels).
// Definition in dropreg/signs.py: class v of row n in draw k gets word v % 4 of Philox4x32-10 at counter
// (v / 4, n, k, 1) with key = seed, u = (word + 1/2) 2^-32 and g = -log(-log u) in double; the draw is
// argmax_v (z_v + g_v), the lowest class winning a tie. Rows run in parallel; each streams vocabulary tiles
// (one logit GEMM per tile, 1 NVd in all) and keeps a running (best score, class) per draw.
#include <ATen/ATen.h>
#include <ATen/core/PhiloxRNGEngine.h>
#include <ATen/record_function.h>

#include <vector>

#include "vocab_passes.h"
#include "tile_loops.h"

namespace dropreg {

namespace {

constexpr uint64_t kSamplingStreamTag = 1;  // counter word 3 (the sign stream uses 0)

// noise[j] = Gumbel noise of class v0 + j, for j < cols.
void gumbel_tile(uint64_t seed, int64_t sample, int64_t row, int64_t v0, int64_t cols, double* noise) {
  using Vec = at::vec::Vectorized<double>;
  const uint64_t subsequence = static_cast<uint64_t>(sample) | (kSamplingStreamTag << 32);
  const uint64_t row_word = static_cast<uint64_t>(row) & 0xFFFFFFFFull;
  for (int64_t v = v0; v < v0 + cols;) {
    const uint64_t group = static_cast<uint64_t>(v / 4);
    at::Philox4_32 engine(seed, subsequence, group | (row_word << 32));
    uint32_t words[4];
    for (auto& word : words) word = engine();
    for (; v < v0 + cols && static_cast<uint64_t>(v / 4) == group; ++v) {
      noise[v - v0] = (static_cast<double>(words[v % 4]) + 0.5) * 0x1p-32;
    }
  }
  int64_t j = 0;
  for (; j + Vec::size() <= cols; j += Vec::size()) {
    Vec u = Vec::loadu(noise + j);
    (u.log().neg().log().neg()).store(noise + j);
  }
  for (; j < cols; ++j) noise[j] = -std::log(-std::log(noise[j]));
}

template <typename acc_t>
void sample_rows(const Tensor& h, const Tensor& weight, const Tensor& bias, int64_t samples, uint64_t seed,
                 Tensor& drawn) {
  const int64_t rows = h.size(0), dim = h.size(1), vocab = weight.size(0);
  const int64_t row_block = forward_row_block(rows);
  int64_t* drawn_ptr = drawn.data_ptr<int64_t>();
  parallel_blocks(rows, row_block, [&] {
    Tensor logits_flat = at::empty({row_block * kVocabTile}, h.options());
    Tensor weight_flat = at::empty({kVocabTile * dim}, h.options());
    return [&, logits_flat, weight_flat](int64_t r0, int64_t n) {
      std::vector<double> best(samples * n, -std::numeric_limits<double>::infinity());
      std::vector<int64_t> best_class(samples * n, 0);
      std::vector<double> noise(kVocabTile);
      for (int64_t v0 = 0; v0 < vocab; v0 += kVocabTile) {
        const int64_t cols = std::min(kVocabTile, vocab - v0);
        const Tensor w_tile = load_weight_tile(weight, v0, cols, weight_flat, false);
        Tensor logits = scratch_view(logits_flat, n, cols);
        tile_logits(logits, h.narrow(0, r0, n), w_tile, bias, v0);
        const acc_t* z = logits.data_ptr<acc_t>();
        for (int64_t k = 0; k < samples; ++k) {
          for (int64_t i = 0; i < n; ++i) {
            gumbel_tile(seed, k, r0 + i, v0, cols, noise.data());
            double& top = best[k * n + i];
            for (int64_t j = 0; j < cols; ++j) {
              const double score = static_cast<double>(z[i * cols + j]) + noise[j];
              if (score > top) {  // strict: the lowest class wins a tie
                top = score;
                best_class[k * n + i] = v0 + j;
              }
            }
          }
        }
      }
      for (int64_t k = 0; k < samples; ++k) {
        for (int64_t i = 0; i < n; ++i) drawn_ptr[k * rows + r0 + i] = best_class[k * n + i];
      }
    };
  });
}

}  // namespace

Tensor sample_targets(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias, int64_t samples,
                      int64_t seed) {
  TORCH_CHECK(input.dim() == 2 && weight.dim() == 2 && input.size(1) == weight.size(1),
              "dropreg::sample_targets: input (N, d) and weight (V, d) expected");
  TORCH_CHECK(samples >= 1, "dropreg::sample_targets: samples >= 1 expected");
  RECORD_FUNCTION("dropreg::sample_targets", std::vector<c10::IValue>());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto acc = accumulation_type(input);
  const Tensor h = input.to(acc).contiguous();
  const Tensor b = bias.has_value() && bias->defined() ? bias->to(acc).contiguous() : Tensor();
  Tensor drawn = at::zeros({samples, h.size(0)}, input.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(acc, "sample_targets", [&] {
    sample_rows<scalar_t>(h, weight.contiguous(), b, samples, static_cast<uint64_t>(seed), drawn);
  });
  return drawn;
}

}  // namespace dropreg
