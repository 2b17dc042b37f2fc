// Attention of a few query tokens per sequence straight from the paged KV cache.
//
// The pure-PyTorch path first gathers each sequence's keys and values out of their blocks into a
// contiguous tensor, then runs two matmuls: the K/V bytes cross memory three times. Here each
// (query row, kv head) task walks its block table and reads every key and value row once, in
// place, which is what bounds batched decode on a CPU.
//
// Layout (see falconet/models/kv_cache.py): cache [kv_heads, slots, head_dim], slot =
// block * block_size + offset; queries [rows, heads, head_dim]; row r sees the first
// lengths[r] positions of the sequence whose blocks are tables[r] (minus a sliding window).
// Scores, softmax and the weighted sum of values are in float32; bf16 is widened on load.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec_math.h"

namespace {

inline void widen(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

inline void widen(const at::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t w = static_cast<uint32_t>(bits[i]) << 16;
    std::memcpy(dst + i, &w, sizeof(float));
  }
}

inline void narrow(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

inline void narrow(const float* src, at::BFloat16* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<at::BFloat16>(src[i]);  // round to nearest even
}

template <int64_t DIM>
inline float dot(const float* a, const float* b, int64_t n) {
  if constexpr (DIM > 0) n = DIM;  // a compile-time length unrolls into a few vector FMAs
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <int64_t DIM>
inline void axpy(float alpha, const float* x, float* y, int64_t n) {
  if constexpr (DIM > 0) n = DIM;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

template <typename T, int64_t DIM>
void attend_rows(const T* q, const T* k_cache, const T* v_cache, T* out, const int64_t* tables,
                 const int64_t* lengths, int64_t rows, int64_t heads, int64_t kv_heads, int64_t dim,
                 int64_t slots, int64_t max_blocks, int64_t block_size, int64_t window, float scale) {
  const int64_t group = heads / kv_heads;
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * dim), acc(group * dim), tile(block_size * dim), total(group), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / kv_heads, h = task % kv_heads;
      const int64_t length = lengths[r];
      const int64_t first = window > 0 ? std::max<int64_t>(0, length - window) : 0;
      const int64_t n = length - first;
      const int64_t* table = tables + r * max_blocks;
      const T* kh = k_cache + h * slots * dim;
      const T* vh = v_cache + h * slots * dim;
      widen(q + (r * heads + h * group) * dim, qf.data(), group * dim);
      for (int64_t i = 0; i < group * dim; ++i) qf[i] *= scale;
      scores.resize(group * n);

      // Scores, a block at a time: a block's rows are contiguous in the cache.
      for (int64_t b = first / block_size; b * block_size < length; ++b) {
        const int64_t t0 = std::max(first, b * block_size), t1 = std::min(length, (b + 1) * block_size);
        const int64_t slot0 = table[b] * block_size + (t0 - b * block_size);
        widen(kh + slot0 * dim, tile.data(), (t1 - t0) * dim);
        for (int64_t t = t0; t < t1; ++t) {
          const float* kt = tile.data() + (t - t0) * dim;
          for (int64_t g = 0; g < group; ++g) scores[g * n + (t - first)] = dot<DIM>(qf.data() + g * dim, kt, dim);
        }
      }

      for (int64_t g = 0; g < group; ++g) {
        float* sg = scores.data() + g * n;
        float m = -INFINITY;
        for (int64_t i = 0; i < n; ++i) m = std::max(m, sg[i]);
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < n; ++i) {
          sg[i] = falconet::exp_nonpositive(sg[i] - m);
          sum += sg[i];
        }
        total[g] = sum;
      }

      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t b = first / block_size; b * block_size < length; ++b) {
        const int64_t t0 = std::max(first, b * block_size), t1 = std::min(length, (b + 1) * block_size);
        const int64_t slot0 = table[b] * block_size + (t0 - b * block_size);
        widen(vh + slot0 * dim, tile.data(), (t1 - t0) * dim);
        for (int64_t t = t0; t < t1; ++t) {
          const float* vt = tile.data() + (t - t0) * dim;
          for (int64_t g = 0; g < group; ++g) axpy<DIM>(scores[g * n + (t - first)], vt, acc.data() + g * dim, dim);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        const float inv = 1.0f / total[g];
        for (int64_t d = 0; d < dim; ++d) acc[g * dim + d] *= inv;
      }
      narrow(acc.data(), out + (r * heads + h * group) * dim, group * dim);
    }
  });
}

template <typename T>
void attend_rows_any(const T* q, const T* k, const T* v, T* out, const int64_t* tables, const int64_t* lengths,
                     int64_t rows, int64_t heads, int64_t kv_heads, int64_t dim, int64_t slots,
                     int64_t max_blocks, int64_t block_size, int64_t window, float scale) {
  auto run = [&](auto kernel) {
    kernel(q, k, v, out, tables, lengths, rows, heads, kv_heads, dim, slots, max_blocks, block_size, window,
           scale);
  };
  if (dim == 64) {
    run(attend_rows<T, 64>);
  } else if (dim == 128) {
    run(attend_rows<T, 128>);
  } else {
    run(attend_rows<T, 0>);
  }
}

}  // namespace

bool paged_attention_bf16_supported(int64_t dim, int64_t block_size, int64_t group);
void paged_attention_bf16(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache, uint16_t* out,
                          const int64_t* tables, const int64_t* lengths, int64_t rows, int64_t heads,
                          int64_t kv_heads, int64_t dim, int64_t slots, int64_t max_blocks, int64_t block_size,
                          int64_t window, float scale);

// Whether the tiled bf16 layout and its kernel are available for this shape (AVX512-BF16 CPUs).
bool has_tiled_kv(int64_t dim, int64_t block_size, int64_t group) {
  return paged_attention_bf16_supported(dim, block_size, group);
}

// q [rows, heads, dim]; k_cache, v_cache [kv_heads, slots, dim] (one layer; with `tiled`, bf16 in
// the tiled layout of kv_cache.py); tables [rows, max_blocks] int64; lengths [rows] int64 (>= 1).
// Returns [rows, heads, dim] in q's dtype.
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                              torch::Tensor tables, torch::Tensor lengths, int64_t block_size,
                              int64_t window, double scale, bool tiled) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3, "bad ranks");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "need contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "q and the cache must share a dtype");
  TORCH_CHECK(tables.scalar_type() == torch::kLong && lengths.scalar_type() == torch::kLong,
              "tables and lengths must be int64");
  TORCH_CHECK(tables.is_contiguous() && lengths.is_contiguous(), "tables and lengths must be contiguous");
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_cache.size(0), slots = k_cache.size(1);
  TORCH_CHECK(heads % kv_heads == 0 && k_cache.size(2) == dim, "shape mismatch");
  TORCH_CHECK(tables.size(0) == rows && lengths.size(0) == rows, "one table and length per row");
  auto out = torch::empty_like(q);
  if (tiled) {
    TORCH_CHECK(q.scalar_type() == torch::kBFloat16 && has_tiled_kv(dim, block_size, heads / kv_heads),
                "the tiled cache layout needs bfloat16 on an AVX512-BF16 CPU, head_dim 64/128/256 and "
                "block_size a multiple of 16");
    auto bits = [](const torch::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); };
    paged_attention_bf16(bits(q), bits(k_cache), bits(v_cache),
                         reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), tables.data_ptr<int64_t>(),
                         lengths.data_ptr<int64_t>(), rows, heads, kv_heads, dim, slots, tables.size(1), block_size,
                         window, static_cast<float>(scale));
  } else if (q.scalar_type() == torch::kFloat) {
    attend_rows_any<float>(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                       out.data_ptr<float>(), tables.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(), rows,
                       heads, kv_heads, dim, slots, tables.size(1), block_size, window,
                       static_cast<float>(scale));
  } else if (q.scalar_type() == torch::kBFloat16) {
    attend_rows_any<at::BFloat16>(q.data_ptr<at::BFloat16>(), k_cache.data_ptr<at::BFloat16>(),
                              v_cache.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(),
                              tables.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(), rows, heads, kv_heads,
                              dim, slots, tables.size(1), block_size, window, static_cast<float>(scale));
  } else {
    TORCH_CHECK(false, "paged_attention supports float32 and bfloat16");
  }
  return out;
}
