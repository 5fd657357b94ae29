// The implicit term's sign stream (the definition is in dropreg/signs.py): element i of the flattened
// (N, d) input takes bit i % 32 of word (i / 32) % 4 of Philox4x32-10 at counter i / 128, key = seed.
// ATen's Philox4_32(seed, 0, counter) yields exactly those four words (Triton's randint4x does too).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/PhiloxRNGEngine.h>

namespace dropreg {

constexpr int64_t kSignsPerCounter = 128;

// +-1 signs for flat indices [first, first + count) into out.
template <typename T>
void fill_philox_signs(uint64_t seed, int64_t first, int64_t count, T* out) {
  int64_t i = first;
  const int64_t end = first + count;
  while (i < end) {
    const int64_t counter = i / kSignsPerCounter;
    at::Philox4_32 engine(seed, 0, static_cast<uint64_t>(counter));
    uint32_t words[4];
    for (auto& word : words) word = engine();
    const int64_t counter_end = std::min(end, (counter + 1) * kSignsPerCounter);
    for (; i < counter_end; ++i) {
      const uint32_t bit = (words[(i / 32) % 4] >> (i % 32)) & 1u;
      out[i - first] = bit ? T(-1) : T(1);
    }
  }
}

// The (rows, dim) sign tensor for `seed` in `dtype`.
inline at::Tensor philox_signs(uint64_t seed, int64_t rows, int64_t dim, at::ScalarType dtype) {
  at::Tensor signs = at::empty({rows, dim}, at::TensorOptions().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(dtype, "philox_signs", [&] {
    fill_philox_signs<scalar_t>(seed, 0, rows * dim, signs.data_ptr<scalar_t>());
  });
  return signs;
}

}  // namespace dropreg
