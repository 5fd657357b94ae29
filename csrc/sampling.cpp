// Streamed Gumbel-max sampling of targets from each row's softmax (the every-site explicit term's labels).
// Definition in dropreg/signs.py: class v of row n in draw k gets word v % 4 of Philox4x32-10 at counter
// (v / 4, n, k, 1) with key = seed, u = (word + 1/2) 2^-32 and g = -log(-log u) in double; the draw is
// argmax_v (z_v + g_v), the lowest class winning a tie. Rows run in parallel; each streams vocabulary tiles
// (one logit GEMM per tile, 1 NVd in all) and keeps a running (best score, class) per draw.
#include <ATen/ATen.h>
#include <ATen/core/PhiloxRNGEngine.h>
#include <ATen/record_function.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <vector>

#include "vocab_passes.h"
#include "tile_loops.h"

namespace dropreg {

namespace {

constexpr uint64_t kSamplingStreamTag = 1;  // counter word 3 (the sign stream uses 0)

// Philox4x32-10 of counters (group, row, sample, tag) for `count` consecutive groups from `first_group`, key = seed:
// words[4 * i + w] = word w of group first_group + i. Eight groups at a time in AVX2 lanes (the rounds of
// at::Philox4_32::single_round), the rest with at::Philox4_32 itself.
void philox_groups(uint64_t seed, uint64_t subsequence, uint64_t row_word, uint64_t first_group, int64_t count,
                   uint32_t* words) {
  int64_t i = 0;
#if defined(__AVX2__)
  const __m256i multiplier_a = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i multiplier_b = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  // (lo, hi) of a 32 x 32 -> 64-bit product per lane: even lanes from one multiply, odd lanes from another
  auto mulhilo = [](__m256i x, __m256i m, __m256i& hi) {
    const __m256i even = _mm256_mul_epu32(x, m);
    const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);
    hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    return _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  };
  for (; i + 8 <= count; i += 8) {
    // group indices are below 2^32 (a vocabulary of fewer than 2^34 classes): counter word 0 holds them
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(first_group + i)), lane);
    __m256i c1 = _mm256_set1_epi32(static_cast<int>(row_word));
    __m256i c2 = _mm256_set1_epi32(static_cast<int>(subsequence & 0xFFFFFFFFu));
    __m256i c3 = _mm256_set1_epi32(static_cast<int>(subsequence >> 32));
    uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      __m256i hi0, hi1;
      const __m256i lo0 = mulhilo(c0, multiplier_a, hi0);
      const __m256i lo1 = mulhilo(c2, multiplier_b, hi1);
      const __m256i next0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(key0)));
      const __m256i next2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(key1)));
      c0 = next0;
      c1 = lo1;
      c2 = next2;
      c3 = lo0;
      key0 += 0x9E3779B9u;
      key1 += 0xBB67AE85u;
    }
    alignas(32) uint32_t out[4][8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(out[0]), c0);
    _mm256_store_si256(reinterpret_cast<__m256i*>(out[1]), c1);
    _mm256_store_si256(reinterpret_cast<__m256i*>(out[2]), c2);
    _mm256_store_si256(reinterpret_cast<__m256i*>(out[3]), c3);
    for (int l = 0; l < 8; ++l)
      for (int w = 0; w < 4; ++w) words[4 * (i + l) + w] = out[w][l];
  }
#endif
  for (; i < count; ++i) {
    at::Philox4_32 engine(seed, subsequence, (first_group + i) | (row_word << 32));
    for (int w = 0; w < 4; ++w) words[4 * i + w] = engine();
  }
}

// noise[j] = Gumbel noise of class v0 + j, for j < cols. `words` holds cols / 4 + 2 groups' words.
void gumbel_tile(uint64_t seed, int64_t sample, int64_t row, int64_t v0, int64_t cols, uint32_t* words,
                 double* noise) {
  using Vec = at::vec::Vectorized<double>;
  const uint64_t subsequence = static_cast<uint64_t>(sample) | (kSamplingStreamTag << 32);
  const uint64_t row_word = static_cast<uint64_t>(row) & 0xFFFFFFFFull;
  const int64_t first_group = v0 / 4, last_group = (v0 + cols - 1) / 4;
  philox_groups(seed, subsequence, row_word, static_cast<uint64_t>(first_group), last_group - first_group + 1, words);
  const uint32_t* class_words = words + (v0 - 4 * first_group);  // word v % 4 of group v / 4, in class order
  for (int64_t j = 0; j < cols; ++j) noise[j] = (static_cast<double>(class_words[j]) + 0.5) * 0x1p-32;
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
      std::vector<uint32_t> words(4 * (kVocabTile / 4 + 2));
      for (int64_t v0 = 0; v0 < vocab; v0 += kVocabTile) {
        const int64_t cols = std::min(kVocabTile, vocab - v0);
        const Tensor w_tile = load_weight_tile(weight, v0, cols, weight_flat, false);
        Tensor logits = scratch_view(logits_flat, n, cols);
        tile_logits(logits, h.narrow(0, r0, n), w_tile, bias, v0);
        const acc_t* z = logits.data_ptr<acc_t>();
        for (int64_t k = 0; k < samples; ++k) {
          for (int64_t i = 0; i < n; ++i) {
            gumbel_tile(seed, k, r0 + i, v0, cols, words.data(), noise.data());
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
