// The bfloat16 decode path of paged_attention on CPUs with AVX512-BF16.
//
// Same contract as attend_rows in paged_attention.cpp (one task per query row and kv head, keys
// and values read in place through the block table), but both products run on vdpbf16ps, which
// multiplies pairs of bf16 and accumulates in float32:
// - scores: a tile of 16 keys is transposed in registers so that one instruction gives 16 keys'
//   partial dot products over a pair of dimensions (no per-key horizontal sums);
// - values: rows t and t+1 are interleaved so that one instruction adds p_t * v_t + p_t1 * v_t1
//   for 16 dimensions.
// The transposes and interleaves permute lanes in fixed ways, worked out once at start-up by
// running them on index patterns. Probabilities are rounded to bf16 for the value product, as
// torch's bf16 path does.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec_math.h"

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>

namespace {

constexpr int kKeys = 16;  // keys per tile: one zmm of float32 scores
constexpr int kPrefetch = 2;  // tiles requested ahead of use

// 16x16 transpose of 32-bit elements, up to fixed permutations of rows and lanes (see Layout).
inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(u[i], u[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(u[i], u[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(u[i + 8], u[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(u[i + 8], u[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
}

// Where transpose16 puts things: output vector c holds input column column_of[c], and its lane l
// holds input row row_of_lane[l] (the same for every c, checked). unpack_dim[m] is the dimension
// (within a 32-dim chunk) in pair lane m of unpacklo; unpackhi gives that + 4.
struct Layout {
  std::array<int, 16> column_of{}, row_of_lane{};
  __m512i unpermute_scores;  // permutexvar index: lane j <- lane holding row j
  std::array<int, 16> unpack_dim{};
  bool ok = true;

  Layout() {
    __m512i r[16];
    for (int j = 0; j < 16; ++j) {
      alignas(64) int32_t v[16];
      for (int i = 0; i < 16; ++i) v[i] = j * 16 + i;
      r[j] = _mm512_load_si512(v);
    }
    transpose16(r);
    alignas(64) int32_t lane_of_row[16];
    for (int c = 0; c < 16; ++c) {
      alignas(64) int32_t v[16];
      _mm512_store_si512(v, r[c]);
      column_of[c] = v[0] % 16;
      for (int l = 0; l < 16; ++l) {
        ok = ok && v[l] % 16 == column_of[c];
        if (c == 0) row_of_lane[l] = v[l] / 16;
        ok = ok && v[l] / 16 == row_of_lane[l];
      }
    }
    for (int l = 0; l < 16; ++l) lane_of_row[row_of_lane[l]] = l;
    unpermute_scores = _mm512_load_si512(lane_of_row);
    alignas(64) int16_t a[32], b[32];
    for (int w = 0; w < 32; ++w) a[w] = static_cast<int16_t>(w), b[w] = static_cast<int16_t>(100 + w);
    alignas(64) int32_t lo[16];
    _mm512_store_si512(lo, _mm512_unpacklo_epi16(_mm512_load_si512(a), _mm512_load_si512(b)));
    for (int m = 0; m < 16; ++m) {
      unpack_dim[m] = lo[m] & 0xffff;
      ok = ok && (lo[m] >> 16) == 100 + unpack_dim[m];
    }
  }
};

const Layout& layout() {
  static const Layout l;
  return l;
}

// Ask for a 16-key tile ahead of use: each tile is a separate 2 KB piece of the cache, so the
// hardware prefetcher cannot see the next one coming and the loads would wait on DRAM latency.
inline void prefetch_tile(const uint16_t* tile, int64_t dim) {
  const char* p = reinterpret_cast<const char*>(tile);
  for (int64_t off = 0; off < kKeys * dim * 2; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
}

}  // namespace

bool paged_attention_bf16_supported(int64_t dim, int64_t block_size, int64_t group) {
  return layout().ok && dim % 32 == 0 && dim <= 256 && block_size % kKeys == 0 && group <= 16;
}

// q [rows, heads, dim], caches [kv_heads, slots, dim], all bf16 as uint16 bits.
void paged_attention_bf16(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache, uint16_t* out,
                          const int64_t* tables, const int64_t* lengths, int64_t rows, int64_t heads,
                          int64_t kv_heads, int64_t dim, int64_t slots, int64_t max_blocks, int64_t block_size,
                          int64_t window, float scale) {
  const Layout& lay = layout();
  const int64_t group = heads / kv_heads, pairs = dim / 2, chunks = dim / 32;
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<uint32_t> ppairs;
    std::vector<__m512> acc(group * 2 * chunks);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / kv_heads, h = task % kv_heads;
      const int64_t length = lengths[r];
      const int64_t first = window > 0 ? std::max<int64_t>(0, length - window) : 0;
      const int64_t t_begin = first / kKeys * kKeys;  // tiles start on 16-key boundaries
      const int64_t n = (length - t_begin + kKeys - 1) / kKeys * kKeys;
      const int64_t* table = tables + r * max_blocks;
      const uint16_t* kh = k_cache + h * slots * dim;
      const uint16_t* vh = v_cache + h * slots * dim;
      const uint32_t* qpairs = reinterpret_cast<const uint32_t*>(q + (r * heads + h * group) * dim);
      scores.resize(group * n);

      // Scores, a tile of 16 keys at a time: transpose the tile's key pairs, then one dpbf16 per
      // pair of dimensions for all 16 keys.
      auto tile_at = [&](const uint16_t* cache, int64_t t0) {
        return cache + (table[t0 / block_size] * block_size + t0 % block_size) * dim;
      };
      for (int64_t t0 = t_begin; t0 < length && t0 < t_begin + kPrefetch * kKeys; t0 += kKeys) {
        prefetch_tile(tile_at(kh, t0), dim);
      }
      for (int64_t t0 = t_begin; t0 < length; t0 += kKeys) {
        if (t0 + kPrefetch * kKeys < length) prefetch_tile(tile_at(kh, t0 + kPrefetch * kKeys), dim);
        const uint16_t* tile = tile_at(kh, t0);
        __m512 s[16];
        for (int64_t g = 0; g < group; ++g) s[g] = _mm512_setzero_ps();
        for (int64_t c = 0; c < pairs / 16; ++c) {
          __m512i cols[16];
          for (int j = 0; j < 16; ++j) cols[j] = _mm512_loadu_si512(tile + j * dim + c * 32);
          transpose16(cols);
          for (int i = 0; i < 16; ++i) {
            const int64_t p = c * 16 + lay.column_of[i];
            for (int64_t g = 0; g < group; ++g) {
              const __m512bh qb = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(qpairs[g * pairs + p]));
              s[g] = _mm512_dpbf16_ps(s[g], (__m512bh)cols[i], qb);
            }
          }
        }
        for (int64_t g = 0; g < group; ++g) {
          const __m512 v = _mm512_permutexvar_ps(lay.unpermute_scores, s[g]);
          _mm512_storeu_ps(scores.data() + g * n + (t0 - t_begin), _mm512_mul_ps(v, _mm512_set1_ps(scale)));
        }
      }

      // Softmax per query head; keys outside [first, length) get probability 0.
      std::vector<float> total(group);
      for (int64_t g = 0; g < group; ++g) {
        float* sg = scores.data() + g * n;
        for (int64_t i = 0; i < first - t_begin; ++i) sg[i] = -INFINITY;
        for (int64_t i = length - t_begin; i < n; ++i) sg[i] = -INFINITY;
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

      // Values: rows t and t+1 interleaved into dimension pairs; one dpbf16 adds both rows.
      ppairs.resize(group * n / 2);
      for (int64_t g = 0; g < group; ++g) {
        for (int64_t i = 0; i < n; i += 32) {
          const __m512 lo = _mm512_loadu_ps(scores.data() + g * n + i);
          const __m512 hi = i + 16 < n ? _mm512_loadu_ps(scores.data() + g * n + i + 16) : _mm512_setzero_ps();
          const __m512i packed = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
          alignas(64) uint32_t tmp[16];
          _mm512_store_si512(tmp, packed);
          std::memcpy(ppairs.data() + g * n / 2 + i / 2, tmp, std::min<int64_t>(16, (n - i) / 2) * 4);
        }
      }
      std::fill(acc.begin(), acc.end(), _mm512_setzero_ps());
      for (int64_t t0 = t_begin; t0 < length && t0 < t_begin + kPrefetch * kKeys; t0 += kKeys) {
        prefetch_tile(tile_at(vh, t0), dim);
      }
      for (int64_t t = t_begin; t < length; t += 2) {
        if (t % kKeys == 0 && t + kPrefetch * kKeys < length) prefetch_tile(tile_at(vh, t + kPrefetch * kKeys), dim);
        const int64_t slot = table[t / block_size] * block_size + t % block_size;
        const uint16_t* row0 = vh + slot * dim;  // t even, block size even: t+1 is the next slot
        const bool second = t + 1 < length;  // past the end the slot may hold anything: use zeros
        for (int64_t c = 0; c < chunks; ++c) {
          const __m512i a = _mm512_loadu_si512(row0 + c * 32);
          const __m512i b = second ? _mm512_loadu_si512(row0 + dim + c * 32) : _mm512_setzero_si512();
          const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(a, b);
          const __m512bh hi = (__m512bh)_mm512_unpackhi_epi16(a, b);
          for (int64_t g = 0; g < group; ++g) {
            const __m512bh pb =
                (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(ppairs[g * n / 2 + (t - t_begin) / 2]));
            __m512* ag = acc.data() + (g * chunks + c) * 2;
            ag[0] = _mm512_dpbf16_ps(ag[0], lo, pb);
            ag[1] = _mm512_dpbf16_ps(ag[1], hi, pb);
          }
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        alignas(64) float lanes[2][16];
        float o[256];
        for (int64_t c = 0; c < chunks; ++c) {
          _mm512_store_ps(lanes[0], acc[(g * chunks + c) * 2]);
          _mm512_store_ps(lanes[1], acc[(g * chunks + c) * 2 + 1]);
          for (int m = 0; m < 16; ++m) {
            o[c * 32 + lay.unpack_dim[m]] = lanes[0][m];
            o[c * 32 + lay.unpack_dim[m] + 4] = lanes[1][m];
          }
        }
        const __m512 inv = _mm512_set1_ps(1.0f / total[g]);
        uint16_t* orow = out + (r * heads + h * group + g) * dim;
        for (int64_t d0 = 0; d0 < dim; d0 += 16) {
          const __m256bh v = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(o + d0), inv));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(orow + d0), (__m256i)v);
        }
      }
    }
  });
}

#else

bool paged_attention_bf16_supported(int64_t, int64_t, int64_t) { return false; }

void paged_attention_bf16(const uint16_t*, const uint16_t*, const uint16_t*, uint16_t*, const int64_t*,
                          const int64_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                          float) {
  TORCH_CHECK(false, "paged_attention_bf16 needs a CPU with AVX512-BF16");
}

#endif
