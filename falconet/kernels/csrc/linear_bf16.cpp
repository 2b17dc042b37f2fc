// bf16 linear layers (y = x W^T + b) on CPUs with AVX512-BF16, for the batch sizes of decoding.
//
// torch's bf16 matmul reads the weights at about half this machine's memory bandwidth when x has
// a few to a few dozen rows, and a decode step is mostly that. Here the weights are repacked
// once (pack_linear_weight_bf16) into tiles of 16 output features whose K dimension runs in
// pairs: [tiles, K/2, 16, 2]. One 64-byte load is then 16 features x 2 inputs, exactly the
// operand of vdpbf16ps, and broadcasting a pair of x's values to all lanes gives 16 outputs'
// partial sums per instruction with no horizontal reductions. Each thread owns a contiguous run
// of tiles (its own slice of the weights, streamed once per call with software prefetch) and
// sweeps every row of x over it in register blocks of 4 tiles and 4 rows (up to 6 for 5 to 12
// rows, see run_linear).
//
// Every output is accumulated in float32 over K in one fixed order, whatever the number of rows
// or threads, so a row's result does not depend on what else is in the batch.
//
// linear_int8 is the same kernel over weight-only int8 weights (one float32 scale per output
// feature): the packed tile holds int8 in the same [K/2][16][2] order, half the bytes to stream;
// each 32-byte load is widened to the bf16 pairs vdpbf16ps takes (int8 values are exact in bf16)
// and the scale is applied to the float32 sums at the end. linear_q4 takes 4-bit blocks (see
// block_q4 below) without dequantizing them.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>

namespace {

constexpr int kTile = 16;      // output features per tile: one zmm of float32 sums
constexpr int kPrefetch = 8;   // K pairs ahead (8 x 64 bytes per tile)

// 16 output features x one pair of K as the bf16 operand of vdpbf16ps, from either weight type.
inline __m512bh load_weights(const uint16_t* w) { return (__m512bh)_mm512_loadu_si512(w); }

inline __m512bh load_weights(const int8_t* w) {
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
  const __m512 hi =
      _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16))));
  return _mm512_cvtne2ps_pbh(hi, lo);  // lo's 16 values first: the tile's order is kept
}

inline __m512bh broadcast_pair(const uint16_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return (__m512bh)_mm512_set1_epi32(v);
}

// MR rows of x times NR weight tiles; w points at the first tile, tiles are tile_stride apart.
// prefetch: the weights of this block are still in memory: fetch them a few pairs ahead.
// ahead (or null): the next tile group, to be brought into L2 while this block computes from cache;
// this pass fetches its pairs p with p % passes == pass, so the group's passes share the work.
// scale (or null): per output feature, multiplies the sums before the bias (int8 weights).
template <typename W, int MR, int NR>
void block(const uint16_t* x, int64_t ldx, const W* w, int64_t tile_stride, int64_t pairs,
           const float* scale, const float* bias, uint16_t* y, int64_t ldy, int last_cols, bool prefetch,
           const W* ahead, int ahead_tiles, int pass, int passes) {
  __m512 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NR; ++t) acc[r][t] = _mm512_setzero_ps();
  int64_t next_ahead = pass;
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh wv[NR];
    for (int t = 0; t < NR; ++t) {
      const W* wt = w + t * tile_stride + p * 2 * kTile;
      wv[t] = load_weights(wt);
      // as many bytes ahead for either type: int8 pairs are half as long
      constexpr int64_t ahead_elems = kPrefetch * 2 * kTile * (2 / sizeof(W));
      if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(wt + ahead_elems), _MM_HINT_T0);
    }
    if (ahead && p == next_ahead) {  // (a counter, not p % passes: no division per pair)
      for (int t = 0; t < ahead_tiles; ++t)
        _mm_prefetch(reinterpret_cast<const char*>(ahead + t * tile_stride + p * 2 * kTile), _MM_HINT_T1);
      next_ahead += passes;
    }
    for (int r = 0; r < MR; ++r) {
      const __m512bh xv = broadcast_pair(x + r * ldx + 2 * p);
      for (int t = 0; t < NR; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], xv, wv[t]);
    }
  }
  for (int t = 0; t < NR; ++t) {
    const __m512 b = bias ? _mm512_loadu_ps(bias + t * kTile) : _mm512_setzero_ps();
    if (scale)
      for (int r = 0; r < MR; ++r) acc[r][t] = _mm512_mul_ps(acc[r][t], _mm512_loadu_ps(scale + t * kTile));
    // The last tile of the layer may hang over the end of the output row.
    const __mmask16 mask = (t == NR - 1 && last_cols < kTile) ? (__mmask16)((1u << last_cols) - 1) : (__mmask16)0xffff;
    for (int r = 0; r < MR; ++r) {
      const __m256i out = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[r][t], b));
      _mm256_mask_storeu_epi16(y + r * ldy + t * kTile, mask, out);
    }
  }
}

template <typename W>
using BlockFn = void (*)(const uint16_t*, int64_t, const W*, int64_t, int64_t, const float*, const float*,
                         uint16_t*, int64_t, int, bool, const W*, int, int, int);

template <typename W, int MR>
constexpr BlockFn<W> pick(int nr) {
  return nr == 1 ? block<W, MR, 1> : nr == 2 ? block<W, MR, 2> : nr == 3 ? block<W, MR, 3> : block<W, MR, 4>;
}

template <typename W>
BlockFn<W> block_fn(int mr, int nr) {
  switch (mr) {
    case 1: return pick<W, 1>(nr);
    case 2: return pick<W, 2>(nr);
    case 3: return pick<W, 3>(nr);
    case 4: return pick<W, 4>(nr);
    case 5: return pick<W, 5>(nr);
    default: return pick<W, 6>(nr);
  }
}

// y [M, N] = x [M, K] W^T (* scale) + bias, W packed as [tiles, K/2, 16, 2] of W.
template <typename W>
void run_linear(const uint16_t* xp, int64_t m, int64_t k, int64_t ldx, const W* wp, int64_t tiles, int64_t pairs,
                int64_t out_features, const float* sp, const float* bp, uint16_t* yp) {
  const int64_t tile_stride = pairs * 2 * kTile;
  // Weights are the big stream at decode batch sizes: split them, not the rows, across threads.
  // Prefill-sized x is swept in chunks of rows that stay in L2 (about 384 KB) while the thread's
  // weights pass by, so neither operand is re-read from memory once per block of the other.
  const int64_t chunk = std::max<int64_t>(4, (384 * 1024 / (2 * k)) / 4 * 4);
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c0 = 0; c0 < m; c0 += chunk) {
      const int64_t c1 = std::min(m, c0 + chunk);
      for (int64_t t0 = begin; t0 < end; t0 += 4) {
        const int nr = static_cast<int>(std::min<int64_t>(4, end - t0));
        const int64_t last = t0 + nr;  // one past this group's last tile
        const int last_cols = static_cast<int>(std::min<int64_t>(kTile, out_features - (last - 1) * kTile));
        // Rows per pass: 4, or for 5 to 12 rows (a token tree's verification, a small batch) the
        // fewest passes of at most 6, evenly sized: each pass after the first re-reads the group's
        // weights from L2 (12 rows: 2 passes, not 3; 11-row steps ran ~5% faster).
        // With one pass over the group, it streams its weights in from memory itself. With
        // several, the later passes compute from cache: memory would sit idle, so all passes
        // instead prefetch the next group between them and computing overlaps the stream.
        const int64_t rows = c1 - c0;
        const int64_t rstep = rows > 4 && rows <= 12 ? (rows + (rows + 5) / 6 - 1) / ((rows + 5) / 6) : 4;
        const int passes = static_cast<int>((rows + rstep - 1) / rstep);
        const int64_t next_nr = std::min<int64_t>(4, end - last);
        const W* ahead = passes > 1 && next_nr > 0 ? wp + last * tile_stride : nullptr;
        if constexpr (std::is_same_v<W, int8_t>) {
          if (passes > 2) {
            // Many rows: widen the group's int8 tiles to bf16 once (into L2), not once per pass;
            // the same values the registers would hold, so the results are bitwise the same.
            thread_local std::vector<uint16_t> widened;
            widened.resize(nr * tile_stride);
            for (int t = 0; t < nr; ++t)
              for (int64_t p = 0; p < pairs; ++p)
                _mm512_storeu_si512(widened.data() + t * tile_stride + p * 2 * kTile,
                                    (__m512i)load_weights(wp + (t0 + t) * tile_stride + p * 2 * kTile));
            for (int64_t r0 = c0; r0 < c1; r0 += 4) {
              const int mr = static_cast<int>(std::min<int64_t>(4, c1 - r0));
              block_fn<uint16_t>(mr, nr)(xp + r0 * ldx, ldx, widened.data(), tile_stride, pairs,
                                         sp ? sp + t0 * kTile : nullptr, bp ? bp + t0 * kTile : nullptr,
                                         yp + r0 * out_features + t0 * kTile, out_features, last_cols, false,
                                         nullptr, 0, 0, 1);
            }
            continue;
          }
        }
        for (int64_t r0 = c0; r0 < c1; r0 += rstep) {
          const int mr = static_cast<int>(std::min<int64_t>(rstep, c1 - r0));
          const int pass = static_cast<int>((r0 - c0) / rstep);
          block_fn<W>(mr, nr)(xp + r0 * ldx, ldx, wp + t0 * tile_stride, tile_stride, pairs,
                              sp ? sp + t0 * kTile : nullptr, bp ? bp + t0 * kTile : nullptr,
                              yp + r0 * out_features + t0 * kTile, out_features, last_cols, r0 == c0, ahead,
                              static_cast<int>(next_nr), pass, passes);
        }
      }
    }
  });
}

// 4-bit weights: per tile, K runs in pairs of pairs: 32 bytes hold two pairs' 32 values each
// (values in the bf16 tile order), byte j = value j of the first pair | value j of the second
// pair << 4. weight = q * d + m with d, m fp16 per output feature and block of `group` K. No
// weight is dequantized: a nibble q in a 16-bit lane OR-ed with 0x4300 is exactly the bf16
// number 128 + q, so one vdpbf16ps per pair gives sum x (128 + q) over a block, and per block
// and output
//   sum x w = d * sum x (128 + q) + (m - 128 d) * sum x,
// with sum x (the block's input sum) computed once per row. Each output still sums in one fixed
// order whatever the batch, so rows stay independent of it.
constexpr int kTernaryAndOr = 0xEA;  // vpternlog: (a & b) | c

// MR rows x NR tiles. q: first tile's bytes (tiles q_stride bytes apart); d, m: per tile and
// block, 16 fp16 (tiles dm_stride apart); xs: per row, per block sums of x (ldxs apart).
template <int MR, int NR>
void block_q4(const uint16_t* x, int64_t ldx, const uint8_t* q, int64_t q_stride, const uint16_t* d,
              const uint16_t* m, int64_t dm_stride, const float* xs, int64_t ldxs, int64_t pairs,
              int64_t group_pairs, const float* bias, uint16_t* y, int64_t ldy, int last_cols, bool prefetch) {
  const __m512i low4 = _mm512_set1_epi16(0x0f), one28 = _mm512_set1_epi16(0x4300);
  __m512 total[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NR; ++t) total[r][t] = _mm512_setzero_ps();
  for (int64_t p0 = 0, g = 0; p0 < pairs; p0 += group_pairs, ++g) {
    __m512 acc[MR][NR];
    for (int r = 0; r < MR; ++r)
      for (int t = 0; t < NR; ++t) acc[r][t] = _mm512_setzero_ps();
    for (int64_t p = p0; p < p0 + group_pairs; p += 2) {
      __m512bh w0[NR], w1[NR];
      for (int t = 0; t < NR; ++t) {
        const uint8_t* qt = q + t * q_stride + p * kTile;  // 16 bytes per pair
        if (prefetch && (p & 2) == 0) _mm_prefetch(reinterpret_cast<const char*>(qt + 1024), _MM_HINT_T0);
        const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qt)));
        w0[t] = (__m512bh)_mm512_ternarylogic_epi32(b, low4, one28, kTernaryAndOr);
        w1[t] = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(b, 4), low4, one28, kTernaryAndOr);
      }
      for (int r = 0; r < MR; ++r) {
        const __m512bh x0 = broadcast_pair(x + r * ldx + 2 * p), x1 = broadcast_pair(x + r * ldx + 2 * p + 2);
        for (int t = 0; t < NR; ++t) {
          acc[r][t] = _mm512_dpbf16_ps(acc[r][t], x0, w0[t]);
          acc[r][t] = _mm512_dpbf16_ps(acc[r][t], x1, w1[t]);
        }
      }
    }
    for (int t = 0; t < NR; ++t) {
      const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + t * dm_stride + g * kTile)));
      const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + t * dm_stride + g * kTile)));
      const __m512 cv = _mm512_fnmadd_ps(dv, _mm512_set1_ps(128.0f), mv);  // m - 128 d
      for (int r = 0; r < MR; ++r) {
        total[r][t] = _mm512_fmadd_ps(acc[r][t], dv, total[r][t]);
        total[r][t] = _mm512_fmadd_ps(_mm512_set1_ps(xs[r * ldxs + g]), cv, total[r][t]);
      }
    }
  }
  for (int t = 0; t < NR; ++t) {
    const __m512 b = bias ? _mm512_loadu_ps(bias + t * kTile) : _mm512_setzero_ps();
    const __mmask16 mask = (t == NR - 1 && last_cols < kTile) ? (__mmask16)((1u << last_cols) - 1) : (__mmask16)0xffff;
    for (int r = 0; r < MR; ++r) {
      const __m256i out = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(total[r][t], b));
      _mm256_mask_storeu_epi16(y + r * ldy + t * kTile, mask, out);
    }
  }
}

using BlockQ4 = void (*)(const uint16_t*, int64_t, const uint8_t*, int64_t, const uint16_t*, const uint16_t*,
                         int64_t, const float*, int64_t, int64_t, int64_t, const float*, uint16_t*, int64_t, int, bool);

template <int MR>
constexpr BlockQ4 pick_q4(int nr) {
  return nr == 1 ? block_q4<MR, 1> : nr == 2 ? block_q4<MR, 2> : nr == 3 ? block_q4<MR, 3> : block_q4<MR, 4>;
}

BlockQ4 block_q4_fn(int mr, int nr) {
  switch (mr) {
    case 1: return pick_q4<1>(nr);
    case 2: return pick_q4<2>(nr);
    case 3: return pick_q4<3>(nr);
    default: return pick_q4<4>(nr);
  }
}

void run_q4(const uint16_t* xp, int64_t m, int64_t k, int64_t ldx, const uint8_t* qp, const uint16_t* dp,
            const uint16_t* mp, int64_t tiles, int64_t pairs, int64_t group_pairs, int64_t out_features,
            const float* bp, uint16_t* yp) {
  const int64_t groups = pairs / group_pairs, q_stride = pairs * kTile, dm_stride = groups * kTile;
  // per row and block: the sum of x, in float32 (the same for every output, every batch)
  std::vector<float> xs(m * groups);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      float sum = 0.0f;
      for (int64_t i = 0; i < 2 * group_pairs; ++i) {
        uint32_t bits = static_cast<uint32_t>(xp[r * ldx + g * 2 * group_pairs + i]) << 16;
        float v;
        std::memcpy(&v, &bits, sizeof(v));
        sum += v;
      }
      xs[r * groups + g] = sum;
    }
  const int64_t chunk = std::max<int64_t>(4, (384 * 1024 / (2 * k)) / 4 * 4);
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c0 = 0; c0 < m; c0 += chunk) {
      const int64_t c1 = std::min(m, c0 + chunk);
      // Few rows: 4 tiles at once (more weight streams in flight); more: 2, so the block's
      // sums fit in registers (twice as many as bf16's: per block and in all).
      const int64_t step = c1 - c0 <= 2 ? 4 : 2;
      for (int64_t t0 = begin; t0 < end; t0 += step) {
        const int nr = static_cast<int>(std::min<int64_t>(step, end - t0));
        const int last_cols = static_cast<int>(std::min<int64_t>(kTile, out_features - (t0 + nr - 1) * kTile));
        for (int64_t r0 = c0; r0 < c1; r0 += 4) {
          const int mr = static_cast<int>(std::min<int64_t>(4, c1 - r0));
          block_q4_fn(mr, nr)(xp + r0 * ldx, ldx, qp + t0 * q_stride, q_stride, dp + t0 * dm_stride,
                              mp + t0 * dm_stride, dm_stride, xs.data() + r0 * groups, groups, pairs, group_pairs,
                              bp ? bp + t0 * kTile : nullptr, yp + r0 * out_features + t0 * kTile, out_features,
                              last_cols, r0 == c0);
        }
      }
    }
  });
}

// Shared checks of x, the packed weights, and a float32 vector padded to whole tiles (bias, scale).
void check_linear(const char* name, const torch::Tensor& x, const torch::Tensor& packed, int64_t out_features,
                  const torch::Tensor& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.stride(1) == 1, name,
              ": x must be bf16 [M, K] with contiguous rows");
  TORCH_CHECK(packed.dim() == 4 && packed.is_contiguous() && packed.size(2) == kTile && packed.size(3) == 2, name,
              ": weights must come from the matching pack function");
  const int64_t k = x.size(1), tiles = packed.size(0), pairs = packed.size(1);
  TORCH_CHECK(k == 2 * pairs, name, ": x has ", k, " features, the weights expect ", 2 * pairs);
  TORCH_CHECK(out_features > (tiles - 1) * kTile && out_features <= tiles * kTile, name, ": bad out_features");
  if (bias.defined() && bias.numel() > 0)
    TORCH_CHECK(bias.scalar_type() == torch::kFloat && bias.is_contiguous() && bias.numel() == tiles * kTile,
                name, ": bias must be float32, padded to whole tiles");
}

}  // namespace

bool has_bf16_linear() { return true; }

// x [M, K] bf16 (rows contiguous), packed [tiles, K/2, 16, 2] bf16, bias [N] float32 or empty.
torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor packed, int64_t out_features, torch::Tensor bias) {
  check_linear("linear_bf16", x, packed, out_features, bias);
  TORCH_CHECK(packed.scalar_type() == torch::kBFloat16, "linear_bf16: weights must be bf16");
  auto y = torch::empty({x.size(0), out_features}, x.options().memory_format(torch::MemoryFormat::Contiguous));
  if (x.size(0) == 0) return y;
  run_linear<uint16_t>(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), x.size(0), x.size(1),
                       x.stride(0), reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>()),
                       packed.size(0), packed.size(1), out_features, nullptr,
                       bias.defined() && bias.numel() > 0 ? bias.data_ptr<float>() : nullptr,
                       reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()));
  return y;
}

// The same with int8 weights [tiles, K/2, 16, 2] and scale [tiles * 16] float32 per output feature.
torch::Tensor linear_int8(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, int64_t out_features,
                          torch::Tensor bias) {
  check_linear("linear_int8", x, packed, out_features, bias);
  TORCH_CHECK(packed.scalar_type() == torch::kChar, "linear_int8: weights must be int8");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.is_contiguous() && scale.numel() == packed.size(0) * kTile,
              "linear_int8: scale must be float32, padded to whole tiles");
  auto y = torch::empty({x.size(0), out_features}, x.options().memory_format(torch::MemoryFormat::Contiguous));
  if (x.size(0) == 0) return y;
  run_linear<int8_t>(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), x.size(0), x.size(1),
                     x.stride(0), packed.data_ptr<int8_t>(), packed.size(0), packed.size(1), out_features,
                     scale.data_ptr<float>(), bias.defined() && bias.numel() > 0 ? bias.data_ptr<float>() : nullptr,
                     reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()));
  return y;
}

// x [M, K] bf16; packed uint8 [tiles, K/4, 32]; d and m fp16 [tiles, K/group, 16].
torch::Tensor linear_q4(torch::Tensor x, torch::Tensor packed, torch::Tensor d, torch::Tensor mins,
                        int64_t out_features, torch::Tensor bias, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.stride(1) == 1,
              "linear_q4: x must be bf16 [M, K] with contiguous rows");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == torch::kByte && packed.is_contiguous() &&
                  packed.size(2) == 2 * kTile,
              "linear_q4: weights must come from pack_int4");
  const int64_t k = x.size(1), tiles = packed.size(0), pairs = 2 * packed.size(1);
  TORCH_CHECK(k == 2 * pairs, "linear_q4: x has ", k, " features, the weights expect ", 2 * pairs);
  TORCH_CHECK(group >= 4 && group % 4 == 0 && k % group == 0, "linear_q4: bad group size ", group);
  TORCH_CHECK(out_features > (tiles - 1) * kTile && out_features <= tiles * kTile, "linear_q4: bad out_features");
  for (const auto* t : {&d, &mins})
    TORCH_CHECK(t->scalar_type() == torch::kHalf && t->is_contiguous() && t->dim() == 3 && t->size(0) == tiles &&
                    t->size(1) == k / group && t->size(2) == kTile,
                "linear_q4: scales and minimums must be fp16 [tiles, K/group, 16]");
  const bool has_bias = bias.defined() && bias.numel() > 0;
  if (has_bias)
    TORCH_CHECK(bias.scalar_type() == torch::kFloat && bias.is_contiguous() && bias.numel() == tiles * kTile,
                "linear_q4: bias must be float32, padded to whole tiles");
  auto y = torch::empty({x.size(0), out_features}, x.options().memory_format(torch::MemoryFormat::Contiguous));
  if (x.size(0) == 0) return y;
  run_q4(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), x.size(0), k, x.stride(0),
         packed.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>()),
         reinterpret_cast<const uint16_t*>(mins.data_ptr<at::Half>()), tiles, pairs, group / 2, out_features,
         has_bias ? bias.data_ptr<float>() : nullptr, reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()));
  return y;
}

#else

bool has_bf16_linear() { return false; }

torch::Tensor linear_q4(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, int64_t, torch::Tensor,
                        int64_t) {
  TORCH_CHECK(false, "linear_q4 needs a CPU with AVX512-BF16");
}

torch::Tensor linear_bf16(torch::Tensor, torch::Tensor, int64_t, torch::Tensor) {
  TORCH_CHECK(false, "linear_bf16 needs a CPU with AVX512-BF16");
}

torch::Tensor linear_int8(torch::Tensor, torch::Tensor, torch::Tensor, int64_t, torch::Tensor) {
  TORCH_CHECK(false, "linear_int8 needs a CPU with AVX512-BF16");
}

#endif
