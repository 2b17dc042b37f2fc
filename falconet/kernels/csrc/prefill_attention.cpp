// Causal attention of packed fresh prompts in bfloat16, flash-attention style (Dao et al., 2022):
// query tiles against key tiles with an online softmax, so the full score matrix never exists.
//
// Why our own: torch's CPU flash kernel reaches about a quarter of this machine's bf16 matmul
// rate on prompt-sized problems. Here both matmuls run on AVX512-BF16 dot products
// (vdpbf16ps: 32 multiply-adds per instruction), keys and values are repacked once per prompt
// into the pair layout that instruction wants, and the prompts of a step share one call.
//
// Prompts are packed as in Prepacking: prompt i is rows [starts[i], starts[i] + lengths[i]) of
// q [T, heads, dim] and k, v [T, kv_heads, dim]; each attends causally (and within a sliding
// window if one is given) to its own rows only, and writes its rows of `out` in place.
// A prompt may also be a chunk that continues a sequence (SARATHI's chunked prefill): then its
// keys are rows [key_starts[i], key_starts[i] + key_lengths[i]) of k, v, the cached context
// followed by the chunk's own keys, and its queries are the last lengths[i] of those positions.
// Scores, softmax and the output accumulators are float32; probabilities are rounded to bf16
// for the value product, as torch's bf16 kernels do. Without AVX512-BF16 the function is not
// available and callers use torch's scaled_dot_product_attention.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec_math.h"

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define FALCONET_HAS_BF16_ATTENTION 1
#endif

bool has_bf16_prefill_attention() {
#ifdef FALCONET_HAS_BF16_ATTENTION
  return true;
#else
  return false;
#endif
}

#ifdef FALCONET_HAS_BF16_ATTENTION
namespace {

constexpr int64_t kTile = 32;  // queries and keys per tile

struct Strides {
  int64_t row, head;  // in elements; the last dimension is contiguous
};

// Keys of one tile in dot-product pair layout: packed[p * kTile + j] = (K[j][2p], K[j][2p+1]).
void pack_keys(const uint16_t* k, Strides ks, int64_t rows, int64_t dim, uint32_t* packed) {
  for (int64_t j = 0; j < kTile; ++j) {
    const uint32_t* src = j < rows ? reinterpret_cast<const uint32_t*>(k + j * ks.row) : nullptr;
    for (int64_t p = 0; p < dim / 2; ++p) packed[p * kTile + j] = src ? src[p] : 0u;
  }
}

// Values of one tile paired along keys: packed[jp * dim + d] = (V[2jp][d], V[2jp+1][d]).
void pack_values(const uint16_t* v, Strides vs, int64_t rows, int64_t dim, uint32_t* packed) {
  for (int64_t jp = 0; jp < kTile / 2; ++jp) {
    const uint16_t* lo = 2 * jp < rows ? v + 2 * jp * vs.row : nullptr;
    const uint16_t* hi = 2 * jp + 1 < rows ? v + (2 * jp + 1) * vs.row : nullptr;
    for (int64_t d = 0; d < dim; ++d) {
      packed[jp * dim + d] = (lo ? lo[d] : 0u) | (static_cast<uint32_t>(hi ? hi[d] : 0u) << 16);
    }
  }
}

struct Task {
  int64_t prompt, head, tile, work;  // work: key tiles to visit, for the schedule
};

template <int64_t DIM>
void prefill_impl(const uint16_t* qp, const uint16_t* kp, const uint16_t* vp, uint16_t* op, Strides qs, Strides ks,
                  Strides vs, Strides os, const int64_t* st, const int64_t* len, const int64_t* kst,
                  const int64_t* klen, int64_t prompts, int64_t group, int64_t kv_heads, int64_t window,
                  float fscale) {
  constexpr int64_t dim = DIM;
  // Pack every key and value tile once: [prompt key tiles..][kv_heads][kTile * dim / 2] words.
  std::vector<int64_t> first_tile(prompts + 1, 0);
  for (int64_t i = 0; i < prompts; ++i) first_tile[i + 1] = first_tile[i] + (klen[i] + kTile - 1) / kTile;
  const int64_t tile_words = kTile * dim / 2, total_tiles = first_tile[prompts];
  std::vector<uint32_t> kpack(total_tiles * kv_heads * tile_words), vpack(kpack.size());
  std::vector<Task> packs, tasks;
  for (int64_t i = 0; i < prompts; ++i) {
    const int64_t offset = klen[i] - len[i];  // cached positions before the chunk
    for (int64_t h = 0; h < kv_heads; ++h) {
      for (int64_t t = 0; t < first_tile[i + 1] - first_tile[i]; ++t) packs.push_back({i, h, t, 0});
      for (int64_t t = 0; t * kTile < len[i]; ++t) tasks.push_back({i, h, t, (offset + t * kTile) / kTile});
    }
  }
  const int64_t num_packs = static_cast<int64_t>(packs.size()), num_tasks = static_cast<int64_t>(tasks.size());
  const int threads = at::get_num_threads();
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t n = 0; n < num_packs; ++n) {
    const Task& task = packs[n];
    const int64_t row0 = kst[task.prompt] + task.tile * kTile;
    const int64_t rows = std::min(kTile, klen[task.prompt] - task.tile * kTile);
    const int64_t slot = ((first_tile[task.prompt] + task.tile) * kv_heads + task.head) * tile_words;
    pack_keys(kp + row0 * ks.row + task.head * ks.head, ks, rows, dim, kpack.data() + slot);
    pack_values(vp + row0 * vs.row + task.head * vs.head, vs, rows, dim, vpack.data() + slot);
  }

  // Query tiles, longest work first so the dynamic schedule ends evenly.
  std::sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.work > b.work; });
#pragma omp parallel num_threads(threads)
  {
    const int64_t rows_max = group * kTile;
    std::vector<float> scores(rows_max * kTile), acc(rows_max * DIM), m(rows_max), l(rows_max), alpha(rows_max);
    std::vector<uint32_t> pairs(rows_max * kTile / 2);
#pragma omp for schedule(dynamic, 1)
    for (int64_t n = 0; n < num_tasks; ++n) {
      const Task& task = tasks[n];
      const int64_t plen = len[task.prompt], q0 = task.tile * kTile;
      const int64_t qn = std::min(kTile, plen - q0);
      const int64_t base = st[task.prompt];
      const int64_t keys = klen[task.prompt], offset = keys - plen;  // query i sits at offset + i
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(m.begin(), m.end(), -INFINITY);
      std::fill(l.begin(), l.end(), 0.0f);
      const int64_t p0 = offset + q0, p_last = p0 + qn - 1;  // positions of the tile's queries
      const int64_t key_first = window > 0 ? std::max<int64_t>(0, p0 - window + 1) / kTile : 0;
      for (int64_t kt = key_first; kt <= p_last / kTile; ++kt) {
        const int64_t slot = ((first_tile[task.prompt] + kt) * kv_heads + task.head) * tile_words;
        const uint32_t* kt_pack = kpack.data() + slot;
        const uint32_t* vt_pack = vpack.data() + slot;
        const int64_t k0 = kt * kTile;
        const bool needs_mask = k0 + kTile - 1 > p0 || window > 0 || k0 + kTile > keys;
        for (int64_t g = 0; g < group; ++g) {
          const uint16_t* qg = qp + (base + q0) * qs.row + (task.head * group + g) * qs.head;
          // Scores of 4 query rows at once: 8 independent accumulation chains, each key pair
          // vector loaded once for the 4 rows. Rows past qn repeat the last one (harmless).
          for (int64_t i0 = 0; i0 < qn; i0 += 4) {
            const uint32_t* qrow[4];
            for (int u = 0; u < 4; ++u) {
              qrow[u] = reinterpret_cast<const uint32_t*>(qg + std::min(i0 + u, qn - 1) * qs.row);
            }
            __m512 s[8];
            for (int u = 0; u < 8; ++u) s[u] = _mm512_setzero_ps();
            for (int64_t p = 0; p < DIM / 2; ++p) {
              const __m512bh k_lo = (__m512bh)_mm512_loadu_si512(kt_pack + p * kTile);
              const __m512bh k_hi = (__m512bh)_mm512_loadu_si512(kt_pack + p * kTile + 16);
              for (int u = 0; u < 4; ++u) {
                const __m512bh b = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(qrow[u][p]));
                s[2 * u] = _mm512_dpbf16_ps(s[2 * u], k_lo, b);
                s[2 * u + 1] = _mm512_dpbf16_ps(s[2 * u + 1], k_hi, b);
              }
            }
            for (int u = 0; u < 4 && i0 + u < qn; ++u) {
              float* srow = scores.data() + (g * kTile + i0 + u) * kTile;
              _mm512_storeu_ps(srow, _mm512_mul_ps(s[2 * u], _mm512_set1_ps(fscale)));
              _mm512_storeu_ps(srow + 16, _mm512_mul_ps(s[2 * u + 1], _mm512_set1_ps(fscale)));
            }
          }
          // Mask, then the online softmax: rescale what was accumulated if the running max grew.
          for (int64_t i = 0; i < qn; ++i) {
            const int64_t r = g * kTile + i, qi = p0 + i;
            float* srow = scores.data() + r * kTile;
            if (needs_mask) {
              for (int64_t j = 0; j < kTile; ++j) {
                const int64_t key = k0 + j;
                if (key > qi || key >= keys || (window > 0 && key <= qi - window)) srow[j] = -INFINITY;
              }
            }
            const float tile_max = std::max(_mm512_reduce_max_ps(_mm512_loadu_ps(srow)),
                                            _mm512_reduce_max_ps(_mm512_loadu_ps(srow + 16)));
            const float m_new = std::max(m[r], tile_max);
            if (m_new == -INFINITY) {  // no visible key yet (sliding window): nothing to add
              alpha[r] = 1.0f;
              std::memset(pairs.data() + r * (kTile / 2), 0, kTile / 2 * sizeof(uint32_t));
              continue;
            }
            alpha[r] = falconet::exp_nonpositive(m[r] - m_new);
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < kTile; ++j) {
              srow[j] = falconet::exp_nonpositive(srow[j] - m_new);
              sum += srow[j];
            }
            l[r] = l[r] * alpha[r] + sum;
            m[r] = m_new;
            const __m512bh pb = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(srow + 16), _mm512_loadu_ps(srow));
            _mm512_storeu_si512(pairs.data() + r * (kTile / 2), (__m512i)pb);
          }
          // acc = alpha * acc + P V for 2 rows at once: 2 * DIM / 16 independent chains.
          for (int64_t i0 = 0; i0 < qn; i0 += 2) {
            const int64_t rr[2] = {g * kTile + i0, g * kTile + std::min(i0 + 1, qn - 1)};
            __m512 a[2][DIM / 16];
            for (int u = 0; u < 2; ++u) {
              const __m512 va = _mm512_set1_ps(alpha[rr[u]]);
              for (int64_t c = 0; c < DIM / 16; ++c) {
                a[u][c] = _mm512_mul_ps(_mm512_loadu_ps(acc.data() + rr[u] * DIM + c * 16), va);
              }
            }
            for (int64_t jp = 0; jp < kTile / 2; ++jp) {
              __m512bh v[DIM / 16];
              for (int64_t c = 0; c < DIM / 16; ++c) {
                v[c] = (__m512bh)_mm512_loadu_si512(vt_pack + jp * DIM + c * 16);
              }
              for (int u = 0; u < 2; ++u) {
                const __m512bh b =
                    (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(pairs[rr[u] * (kTile / 2) + jp]));
                for (int64_t c = 0; c < DIM / 16; ++c) a[u][c] = _mm512_dpbf16_ps(a[u][c], v[c], b);
              }
            }
            for (int u = 0; u < 2 && i0 + u < qn; ++u) {
              for (int64_t c = 0; c < DIM / 16; ++c) _mm512_storeu_ps(acc.data() + rr[u] * DIM + c * 16, a[u][c]);
            }
          }
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        for (int64_t i = 0; i < qn; ++i) {
          const int64_t r = g * kTile + i;
          const __m512 inv = _mm512_set1_ps(1.0f / l[r]);
          uint16_t* orow = op + (base + q0 + i) * os.row + (task.head * group + g) * os.head;
          for (int64_t d0 = 0; d0 < dim; d0 += 16) {
            const __m256bh o = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(acc.data() + r * DIM + d0), inv));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(orow + d0), (__m256i)o);
          }
        }
      }
    }
  }
}

}  // namespace
#endif

// q [T, heads, dim], k/v [S, kv_heads, dim] (bf16, last dim contiguous), out like q (written in
// place for the prompts' rows); starts/lengths int64 [prompts]; key_starts/key_lengths the rows
// of k, v each prompt attends to (default: its own query rows). head_dim 64 or 128.
void prefill_attention_bf16(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor out,
                            torch::Tensor starts, torch::Tensor lengths, int64_t window, double scale,
                            std::optional<torch::Tensor> key_starts, std::optional<torch::Tensor> key_lengths) {
#ifndef FALCONET_HAS_BF16_ATTENTION
  TORCH_CHECK(false, "prefill_attention_bf16 needs a CPU with AVX512-BF16");
#else
  for (const auto& t : {q, k, v, out}) {
    TORCH_CHECK(t.dim() == 3 && t.scalar_type() == torch::kBFloat16 && t.stride(2) == 1,
                "q, k, v, out: bf16 [T, heads, dim] with a contiguous last dim");
  }
  TORCH_CHECK(starts.scalar_type() == torch::kLong && lengths.scalar_type() == torch::kLong &&
                  starts.is_contiguous() && lengths.is_contiguous() && starts.numel() == lengths.numel(),
              "starts and lengths: int64 of one size");
  const int64_t heads = q.size(1), kv_heads = k.size(1), dim = q.size(2);
  TORCH_CHECK(heads % kv_heads == 0 && k.size(2) == dim && v.size(2) == dim && out.sizes() == q.sizes(),
              "shape mismatch");
    const int64_t group = heads / kv_heads, prompts = starts.numel();
  const int64_t* st = starts.data_ptr<int64_t>();
  const int64_t* len = lengths.data_ptr<int64_t>();
  TORCH_CHECK(key_starts.has_value() == key_lengths.has_value(), "give both key_starts and key_lengths, or neither");
  if (key_starts) {
    for (const auto& t : {*key_starts, *key_lengths}) {
      TORCH_CHECK(t.scalar_type() == torch::kLong && t.is_contiguous() && t.numel() == prompts,
                  "key_starts and key_lengths: int64, one per prompt");
    }
  }
  const int64_t* kst = key_starts ? key_starts->data_ptr<int64_t>() : st;
  const int64_t* klen = key_lengths ? key_lengths->data_ptr<int64_t>() : len;
  TORCH_CHECK(k.size(0) == v.size(0), "k and v must have the same rows");
  for (int64_t i = 0; i < prompts; ++i) {
    TORCH_CHECK(len[i] >= 1 && st[i] >= 0 && st[i] + len[i] <= q.size(0), "prompt rows out of range");
    TORCH_CHECK(klen[i] >= len[i] && kst[i] >= 0 && kst[i] + klen[i] <= k.size(0), "key rows out of range");
  }
  const auto* qp = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  const auto* kp = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
  const auto* vp = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const Strides qs{q.stride(0), q.stride(1)}, ks{k.stride(0), k.stride(1)}, vs{v.stride(0), v.stride(1)};
  const Strides os{out.stride(0), out.stride(1)};

  const float fscale = static_cast<float>(scale);
  if (dim == 64) {
    prefill_impl<64>(qp, kp, vp, op, qs, ks, vs, os, st, len, kst, klen, prompts, group, kv_heads, window, fscale);
  } else if (dim == 128) {
    prefill_impl<128>(qp, kp, vp, op, qs, ks, vs, os, st, len, kst, klen, prompts, group, kv_heads, window, fscale);
  } else {
    TORCH_CHECK(false, "prefill_attention_bf16: head_dim must be 64 or 128");
  }
#endif
}
