// The bfloat16 decode path of paged_attention on CPUs with AVX512-BF16, over the tiled cache.
//
// Same contract as attend_rows in paged_attention.cpp (one task per query row and kv head, keys
// and values read in place through the block table), but the cache is stored in tiles of 16
// tokens laid out for vdpbf16ps, which multiplies pairs of bf16 and accumulates in float32
// (see "tiled" in falconet/models/kv_cache.py; store_kv writes it):
// - key tile [dim/2][16 tokens][2]: one 64-byte load holds a pair of dimensions for all 16 keys,
//   so one instruction gives 16 keys' partial dot products, with no per-key horizontal sums and
//   no transposes (transposing standard-layout tiles in registers was most of this kernel's work);
// - value tile [8 token pairs][dim][2]: one load holds 16 dimensions of two consecutive tokens,
//   so one instruction adds p_t * v_t + p_t1 * v_t1 for 16 dimensions.
// Probabilities are rounded to bf16 for the value product, as torch's bf16 path does.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec_math.h"

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>

namespace {

constexpr int kTile = 16;  // tokens per tile: one zmm of float32 scores
constexpr int kPrefetch = 4;  // tiles requested ahead of use

// Ask for a tile ahead of use: each tile is a separate piece of the cache, so the hardware
// prefetcher cannot see the next one coming and the loads would wait on DRAM latency.
inline void prefetch_tile(const uint16_t* tile, int64_t dim) {
  const char* p = reinterpret_cast<const char*>(tile);
  for (int64_t off = 0; off < kTile * dim * 2; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
}

inline __m512bh bcast_pair(uint32_t pair) { return (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(pair)); }

// Several query heads of one kv head at once: each key (value) load then serves all of them,
// and their independent sums hide vdpbf16ps's latency (one head's 4 sums alone could not).
// Each head's own arithmetic is exactly the one-head loop's, so results do not change.

// Scores of GB query heads (q pairs `pairs` apart, rows of `n` scores apart) against one key tile.
template <int GB, int C>
inline void score_tile(const uint16_t* tile, const uint32_t* q, float* out, int64_t n, float scale) {
  constexpr int64_t pairs = 16 * C;
  __m512 s[GB][4];
  for (int g = 0; g < GB; ++g)
    for (int j = 0; j < 4; ++j) s[g][j] = _mm512_setzero_ps();
#pragma GCC unroll 64
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh k = (__m512bh)_mm512_loadu_si512(tile + p * 2 * kTile);
    for (int g = 0; g < GB; ++g) s[g][p % 4] = _mm512_dpbf16_ps(s[g][p % 4], k, bcast_pair(q[g * pairs + p]));
  }
  for (int g = 0; g < GB; ++g) {
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(s[g][0], s[g][1]), _mm512_add_ps(s[g][2], s[g][3]));
    _mm512_storeu_ps(out + g * n, _mm512_mul_ps(sum, _mm512_set1_ps(scale)));
  }
}

// GB query heads' value sums over one value tile: probability pairs of head g at p + g * stride,
// `full_pairs` whole token pairs and, with `odd`, one more token; sums at acc[g * 2C + c].
template <int GB, int C>
inline void value_tile(const uint16_t* tile, const uint32_t* p, int64_t stride, int64_t full_pairs, bool odd,
                       __m512* acc) {
  constexpr int64_t dim = 32 * C, chunks = 2 * C;
  __m512 a[GB][chunks];
  for (int g = 0; g < GB; ++g)
    for (int c = 0; c < chunks; ++c) a[g][c] = acc[g * chunks + c];
  for (int64_t tp = 0; tp < full_pairs; ++tp) {
    __m512bh v[chunks];
    for (int c = 0; c < chunks; ++c) v[c] = (__m512bh)_mm512_loadu_si512(tile + tp * 2 * dim + c * 32);
    for (int g = 0; g < GB; ++g) {
      const __m512bh pb = bcast_pair(p[g * stride + tp]);
#pragma GCC unroll 16
      for (int c = 0; c < chunks; ++c) a[g][c] = _mm512_dpbf16_ps(a[g][c], v[c], pb);
    }
  }
  if (odd) {
    // The pair's second token is past the end and its slot may hold anything (NaN):
    // load only the first token's halves.
    __m512bh v[chunks];
    for (int c = 0; c < chunks; ++c)
      v[c] = (__m512bh)_mm512_maskz_loadu_epi16(0x55555555u, tile + full_pairs * 2 * dim + c * 32);
    for (int g = 0; g < GB; ++g) {
      const __m512bh pb = bcast_pair(p[g * stride + full_pairs]);
      for (int c = 0; c < chunks; ++c) a[g][c] = _mm512_dpbf16_ps(a[g][c], v[c], pb);
    }
  }
  for (int g = 0; g < GB; ++g)
    for (int c = 0; c < chunks; ++c) acc[g * chunks + c] = a[g][c];
}

// C = dim / 32: the head dimension is a compile-time constant so the accumulators live in registers.
template <int C>
void attend_tiled(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache, uint16_t* out,
                  const int64_t* tables, const int64_t* lengths, int64_t rows, int64_t heads, int64_t kv_heads,
                  int64_t slots, int64_t max_blocks, int64_t block_size, int64_t window, float scale) {
  constexpr int64_t dim = 32 * C, pairs = 16 * C, chunks = 2 * C;  // chunks: 16 float32 outputs each
  // query heads per pass: all of their sums and one tile's values must fit in the registers
  constexpr int64_t kHeadsAtOnce = 4, kValueHeads = chunks <= 4 ? 4 : chunks <= 8 ? 2 : 1;
  const int64_t group = heads / kv_heads;
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<uint32_t> ppairs;
    std::vector<__m512> acc(group * chunks);
    std::vector<float> total(group);
    int64_t last_head = -1, last_block = -1;
    for (int64_t task = begin; task < end; ++task) {
      // Head-major: a thread takes the rows of one kv head one after another, so rows of one
      // sequence (a token tree's, a chain's) find its keys and values still in cache. Their
      // tiles are then requested ahead only for the first such row: issuing the prefetches
      // again for data already in cache cost more than they saved.
      const int64_t h = task / rows, r = task % rows;
      const bool fetch = h != last_head || tables[r * max_blocks] != last_block;
      last_head = h;
      last_block = tables[r * max_blocks];
      const int64_t length = lengths[r];
      const int64_t first = window > 0 ? std::max<int64_t>(0, length - window) : 0;
      const int64_t t_begin = first / kTile * kTile;  // tiles start on 16-token boundaries
      const int64_t n = (length - t_begin + kTile - 1) / kTile * kTile;
      const int64_t* table = tables + r * max_blocks;
      const uint16_t* kh = k_cache + h * slots * dim;
      const uint16_t* vh = v_cache + h * slots * dim;
      const uint32_t* qpairs = reinterpret_cast<const uint32_t*>(q + (r * heads + h * group) * dim);
      scores.resize(group * n);
      auto tile_at = [&](const uint16_t* cache, int64_t t0) {
        return cache + (table[t0 / block_size] * block_size + t0 % block_size) * dim;
      };

      // Scores: per tile, per query head, one dpbf16 per pair of dimensions for all 16 keys.
      for (int64_t t0 = t_begin; fetch && t0 < length && t0 < t_begin + kPrefetch * kTile; t0 += kTile)
        prefetch_tile(tile_at(kh, t0), dim);
      for (int64_t t0 = t_begin; t0 < length; t0 += kTile) {
        if (fetch && t0 + kPrefetch * kTile < length) prefetch_tile(tile_at(kh, t0 + kPrefetch * kTile), dim);
        const uint16_t* tile = tile_at(kh, t0);
        float* srow = scores.data() + (t0 - t_begin);
        for (int64_t g = 0; g < group; g += kHeadsAtOnce) {
          const int gb = static_cast<int>(std::min<int64_t>(kHeadsAtOnce, group - g));
          const uint32_t* qg = qpairs + g * pairs;
          float* sg = srow + g * n;
          switch (gb) {
            case 1: score_tile<1, C>(tile, qg, sg, n, scale); break;
            case 2: score_tile<2, C>(tile, qg, sg, n, scale); break;
            case 3: score_tile<3, C>(tile, qg, sg, n, scale); break;
            default: score_tile<4, C>(tile, qg, sg, n, scale); break;
          }
        }
      }

      // Softmax per query head; keys outside [first, length) get probability 0.
      for (int64_t g = 0; g < group; ++g) {
        float* sg = scores.data() + g * n;
        for (int64_t i = 0; i < first - t_begin; ++i) sg[i] = -INFINITY;
        for (int64_t i = length - t_begin; i < n; ++i) sg[i] = -INFINITY;
        // (n is whole tiles; a NaN score is passed over, as std::max would: max_ps keeps its
        // second operand when the first is NaN)
        __m512 mv = _mm512_set1_ps(-INFINITY);
        for (int64_t i = 0; i < n; i += kTile) mv = _mm512_max_ps(_mm512_loadu_ps(sg + i), mv);
        const float m = _mm512_reduce_max_ps(mv);
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < n; ++i) {
          sg[i] = falconet::exp_nonpositive(sg[i] - m);
          sum += sg[i];
        }
        total[g] = sum;
      }

      // Probabilities as bf16 pairs (p_t, p_t+1): the broadcast operand of the value product.
      ppairs.resize(group * n / 2);
      for (int64_t g = 0; g < group; ++g) {
        for (int64_t i = 0; i < n; i += 32) {
          const __m512 lo = _mm512_loadu_ps(scores.data() + g * n + i);
          const __m512 hi = i + 16 < n ? _mm512_loadu_ps(scores.data() + g * n + i + 16) : _mm512_setzero_ps();
          alignas(64) uint32_t tmp[16];
          _mm512_store_si512(tmp, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
          std::memcpy(ppairs.data() + g * n / 2 + i / 2, tmp, std::min<int64_t>(16, (n - i) / 2) * 4);
        }
      }

      // Values: per tile, per query head, one dpbf16 per token pair and 16 dimensions.
      std::fill(acc.begin(), acc.end(), _mm512_setzero_ps());
      for (int64_t t0 = t_begin; fetch && t0 < length && t0 < t_begin + kPrefetch * kTile; t0 += kTile)
        prefetch_tile(tile_at(vh, t0), dim);
      for (int64_t t0 = t_begin; t0 < length; t0 += kTile) {
        if (fetch && t0 + kPrefetch * kTile < length) prefetch_tile(tile_at(vh, t0 + kPrefetch * kTile), dim);
        const uint16_t* tile = tile_at(vh, t0);
        const int64_t valid = std::min<int64_t>(kTile, length - t0);
        const int64_t full_pairs = valid / 2;
        const uint32_t* pt = ppairs.data() + (t0 - t_begin) / 2;
        for (int64_t g = 0; g < group; g += kValueHeads) {
          const int gb = static_cast<int>(std::min<int64_t>(kValueHeads, group - g));
          __m512* ag = acc.data() + g * chunks;
          const uint32_t* pg = pt + g * n / 2;
          switch (gb) {
            case 1: value_tile<1, C>(tile, pg, n / 2, full_pairs, valid % 2, ag); break;
            case 2: value_tile<2, C>(tile, pg, n / 2, full_pairs, valid % 2, ag); break;
            case 3: value_tile<3, C>(tile, pg, n / 2, full_pairs, valid % 2, ag); break;
            default: value_tile<4, C>(tile, pg, n / 2, full_pairs, valid % 2, ag); break;
          }
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        const __m512 inv = _mm512_set1_ps(1.0f / total[g]);
        uint16_t* orow = out + (r * heads + h * group + g) * dim;
        for (int c = 0; c < chunks; ++c) {
          const __m256bh v = _mm512_cvtneps_pbh(_mm512_mul_ps(acc[g * chunks + c], inv));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(orow + c * 16), (__m256i)v);
        }
      }
    }
  });
}

}  // namespace

bool paged_attention_bf16_supported(int64_t dim, int64_t block_size, int64_t group) {
  return (dim == 64 || dim == 128 || dim == 256) && block_size % kTile == 0 && group >= 1;
}

// q [rows, heads, dim], caches [kv_heads, slots, dim] in the tiled layout, all bf16 as uint16 bits.
void paged_attention_bf16(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache, uint16_t* out,
                          const int64_t* tables, const int64_t* lengths, int64_t rows, int64_t heads,
                          int64_t kv_heads, int64_t dim, int64_t slots, int64_t max_blocks, int64_t block_size,
                          int64_t window, float scale) {
  auto run = [&](auto kernel) {
    kernel(q, k_cache, v_cache, out, tables, lengths, rows, heads, kv_heads, slots, max_blocks, block_size,
           window, scale);
  };
  if (dim == 64) {
    run(attend_tiled<2>);
  } else if (dim == 128) {
    run(attend_tiled<4>);
  } else if (dim == 256) {
    run(attend_tiled<8>);
  } else {
    TORCH_CHECK(false, "paged_attention_bf16: unsupported head_dim ", dim);
  }
}

#else

bool paged_attention_bf16_supported(int64_t, int64_t, int64_t) { return false; }

void paged_attention_bf16(const uint16_t*, const uint16_t*, const uint16_t*, uint16_t*, const int64_t*,
                          const int64_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                          float) {
  TORCH_CHECK(false, "paged_attention_bf16 needs a CPU with AVX512-BF16");
}

#endif
