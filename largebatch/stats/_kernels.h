// Memory-bound passes over gradients that also add up squared norms, shared
// by the compiled DDP hook (_ddp_hook.cpp) and the accumulation hook
// (_accumulate.cpp). Squares are summed in double, or in float lanes over
// short blocks, so the loops vectorise and a float32 tensor of millions of
// elements keeps its norm to float32 precision.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace largebatch {
namespace {

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define LARGEBATCH_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LARGEBATCH_VECTOR_CLONES
#endif

// Helpers of the vector loops, inlined into each clone (so built for its target).
#define LARGEBATCH_INLINE inline __attribute__((always_inline))

constexpr int64_t kLanes = 16;  // independent partial sums, so the loop vectorises

enum class Write { kNothing, kInPlace, kCopy };

// sum(x^2) over n elements, accumulated in double; also x *= scale
// (kInPlace) or out = scale * x (kCopy; out does not overlap x) in the same
// pass, with the squares of what is written (kSquareOutput) or of x. One
// pointer per array and no possible overlap: otherwise the compiler guards
// the vector loop with a runtime alias check and, in place, takes its scalar
// fallback.
template <typename T, Write kWrite, bool kSquareOutput = false>
LARGEBATCH_VECTOR_CLONES double sum_of_squares(T* __restrict x, T* __restrict out, int64_t n, T scale) {
  static_assert(!kSquareOutput || kWrite != Write::kNothing, "nothing is written");
  T* const target = kWrite == Write::kInPlace ? x : out;
  double lanes[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const T v = x[i + j];
      const T w = v * scale;
      const T squared = kSquareOutput ? w : v;
      lanes[j] += static_cast<double>(squared) * static_cast<double>(squared);
      if constexpr (kWrite != Write::kNothing) target[i + j] = w;
    }
  }
  double total = 0;
  for (int64_t j = 0; j < kLanes; ++j) total += lanes[j];
  for (; i < n; ++i) {
    const T v = x[i];
    const T w = v * scale;
    const T squared = kSquareOutput ? w : v;
    total += static_cast<double>(squared) * static_cast<double>(squared);
    if constexpr (kWrite != Write::kNothing) target[i] = w;
  }
  return total;
}

struct AccumulatedSquares {
  double added = 0;    // sum(g^2): the incoming gradient's
  double updated = 0;  // sum((acc + g)^2): the accumulated gradient's, after the add
};

inline AccumulatedSquares& operator+=(AccumulatedSquares& a, const AccumulatedSquares& b) {
  a.added += b.added;
  a.updated += b.updated;
  return a;
}

// acc += g (the same IEEE sums as AccumulateGrad's in-place add), with both
// squared norms taken in the same pass. Written with GCC/Clang vector types:
// with two sums per element GCC does not vectorise the plain loop.
typedef float Float8 __attribute__((vector_size(32)));
typedef double Double4 __attribute__((vector_size(32)));

template <typename V>
LARGEBATCH_INLINE V load(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof v);  // unaligned
  return v;
}

template <typename V>
LARGEBATCH_INLINE void save(void* p, const V& v) {
  std::memcpy(p, &v, sizeof v);
}

template <typename V>
LARGEBATCH_INLINE double horizontal_sum(const V& lanes) {
  double total = 0;
  for (size_t j = 0; j < sizeof(V) / sizeof(lanes[0]); ++j) total += static_cast<double>(lanes[j]);
  return total;
}

template <typename T>
void accumulate_tail(T* acc, const T* g, int64_t n, AccumulatedSquares& total) {
  for (int64_t i = 0; i < n; ++i) {
    const T v = g[i];
    const T a = acc[i] + v;
    acc[i] = a;
    total.added += static_cast<double>(v) * static_cast<double>(v);
    total.updated += static_cast<double>(a) * static_cast<double>(a);
  }
}

// Squares summed in the vector's lanes over blocks of kBlock elements (for
// float32 each lane adds kBlock / 16 of them: relative error under 1e-6),
// the blocks in double. Summing float32 in double throughout converts every
// element and ran at a third of the speed of the add itself on
// cache-resident data.
constexpr int64_t kBlock = 1024;

template <typename T, typename V>
LARGEBATCH_INLINE AccumulatedSquares accumulate_blocks(T* __restrict acc, const T* __restrict g, int64_t n) {
  constexpr int64_t kHalf = static_cast<int64_t>(sizeof(V) / sizeof(T));
  constexpr int64_t kStep = 2 * kHalf;  // two vectors per step
  AccumulatedSquares total;
  int64_t i = 0;
  while (i + kStep <= n) {
    V added0 = {0}, added1 = {0}, updated0 = {0}, updated1 = {0};
    const int64_t stop = std::min(n, i + kBlock) - (kStep - 1);
    for (; i < stop; i += kStep) {
      const V v0 = load<V>(g + i), v1 = load<V>(g + i + kHalf);
      const V a0 = load<V>(acc + i) + v0, a1 = load<V>(acc + i + kHalf) + v1;
      save(acc + i, a0);
      save(acc + i + kHalf, a1);
      added0 += v0 * v0;
      added1 += v1 * v1;
      updated0 += a0 * a0;
      updated1 += a1 * a1;
    }
    total.added += horizontal_sum(added0 + added1);
    total.updated += horizontal_sum(updated0 + updated1);
  }
  accumulate_tail(acc + i, g + i, n - i, total);
  return total;
}

LARGEBATCH_VECTOR_CLONES AccumulatedSquares accumulate(float* __restrict acc, const float* __restrict g, int64_t n) {
  return accumulate_blocks<float, Float8>(acc, g, n);
}

LARGEBATCH_VECTOR_CLONES AccumulatedSquares accumulate(double* __restrict acc, const double* __restrict g, int64_t n) {
  return accumulate_blocks<double, Double4>(acc, g, n);
}

// vector[k] = value (or += value): one entry of a float32/float64 statistics
// vector, written from C++ without an ATen op.
inline void store_slot(const at::Tensor& vector, int64_t k, double value, bool add = false) {
  AT_DISPATCH_FLOATING_TYPES(vector.scalar_type(), "largebatch_store_slot", [&] {
    scalar_t& slot = vector.data_ptr<scalar_t>()[k];
    slot = static_cast<scalar_t>(add ? slot + value : value);
  });
}

// Work in fixed chunks, over ATen's intra-op threads, and sum the chunks'
// results in order: the same numbers whatever the thread count.
constexpr int64_t kChunk = int64_t{1} << 16;

template <typename Result, typename F>
Result over_chunks(int64_t n, F&& chunk_result) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  if (chunks <= 1) return chunk_result(int64_t{0}, n);
  std::vector<Result> partial(static_cast<size_t>(chunks));
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const int64_t begin = c * kChunk;
      partial[static_cast<size_t>(c)] = chunk_result(begin, std::min(n, begin + kChunk) - begin);
    }
  });
  Result total{};
  for (const Result& r : partial) total += r;
  return total;
}

}  // namespace
}  // namespace largebatch
