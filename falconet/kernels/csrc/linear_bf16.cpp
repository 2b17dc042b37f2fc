// bf16 linear layers (y = x W^T + b) on CPUs with AVX512-BF16, for the batch sizes of decoding.
//
// torch's bf16 matmul reads the weights at about half this machine's memory bandwidth when x has
// a few to a few dozen rows, and a decode step is mostly that. Here the weights are repacked
// once (pack_linear_weight_bf16) into tiles of 16 output features whose K dimension runs in
// pairs: [tiles, K/2, 16, 2]. One 64-byte load is then 16 features x 2 inputs, exactly the
// operand of vdpbf16ps, and broadcasting a pair of x's values to all lanes gives 16 outputs'
// partial sums per instruction with no horizontal reductions. Each thread owns a contiguous run
// of tiles (its own slice of the weights, streamed once per call with software prefetch) and
// sweeps every row of x over it in 4-row x 4-tile register blocks.
//
// Every output is accumulated in float32 over K in one fixed order, whatever the number of rows
// or threads, so a row's result does not depend on what else is in the batch.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>

namespace {

constexpr int kTile = 16;      // output features per tile: one zmm of float32 sums
constexpr int kPrefetch = 8;   // K pairs ahead (8 x 64 bytes per tile)

inline __m512bh broadcast_pair(const uint16_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return (__m512bh)_mm512_set1_epi32(v);
}

// MR rows of x times NR weight tiles; w points at the first tile, tiles are tile_stride apart.
// prefetch: the weights of this block are still in memory: fetch them a few pairs ahead.
// ahead (or null): the next tile group, to be brought into L2 while this block computes from cache;
// this pass fetches its pairs p with p % passes == pass, so the group's passes share the work.
template <int MR, int NR>
void block(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t tile_stride, int64_t pairs,
           const float* bias, uint16_t* y, int64_t ldy, int last_cols, bool prefetch,
           const uint16_t* ahead, int ahead_tiles, int pass, int passes) {
  __m512 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NR; ++t) acc[r][t] = _mm512_setzero_ps();
  int64_t next_ahead = pass;
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh wv[NR];
    for (int t = 0; t < NR; ++t) {
      const uint16_t* wt = w + t * tile_stride + p * 2 * kTile;
      wv[t] = (__m512bh)_mm512_loadu_si512(wt);
      if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(wt + kPrefetch * 2 * kTile), _MM_HINT_T0);
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
    // The last tile of the layer may hang over the end of the output row.
    const __mmask16 mask = (t == NR - 1 && last_cols < kTile) ? (__mmask16)((1u << last_cols) - 1) : (__mmask16)0xffff;
    for (int r = 0; r < MR; ++r) {
      const __m256i out = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[r][t], b));
      _mm256_mask_storeu_epi16(y + r * ldy + t * kTile, mask, out);
    }
  }
}

using BlockFn = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, const float*, uint16_t*,
                         int64_t, int, bool, const uint16_t*, int, int, int);

template <int MR>
constexpr BlockFn pick(int nr) {
  return nr == 1 ? block<MR, 1> : nr == 2 ? block<MR, 2> : nr == 3 ? block<MR, 3> : block<MR, 4>;
}

BlockFn block_fn(int mr, int nr) {
  switch (mr) {
    case 1: return pick<1>(nr);
    case 2: return pick<2>(nr);
    case 3: return pick<3>(nr);
    default: return pick<4>(nr);
  }
}

}  // namespace

bool has_bf16_linear() { return true; }

// x [M, K] bf16 (rows contiguous), packed [tiles, K/2, 16, 2] bf16, bias [N] float32 or empty.
torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor packed, int64_t out_features, torch::Tensor bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.stride(1) == 1,
              "linear_bf16: x must be bf16 [M, K] with contiguous rows");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == torch::kBFloat16 && packed.is_contiguous() &&
                  packed.size(2) == kTile && packed.size(3) == 2,
              "linear_bf16: weights must come from pack_linear_weight_bf16");
  const int64_t m = x.size(0), k = x.size(1), tiles = packed.size(0), pairs = packed.size(1);
  TORCH_CHECK(k == 2 * pairs, "linear_bf16: x has ", k, " features, the weights expect ", 2 * pairs);
  TORCH_CHECK(out_features > (tiles - 1) * kTile && out_features <= tiles * kTile, "linear_bf16: bad out_features");
  const bool has_bias = bias.defined() && bias.numel() > 0;
  if (has_bias)
    TORCH_CHECK(bias.scalar_type() == torch::kFloat && bias.is_contiguous() && bias.numel() == tiles * kTile,
                "linear_bf16: bias must be float32, padded to whole tiles");
  auto y = torch::empty({m, out_features}, x.options().memory_format(torch::MemoryFormat::Contiguous));
  if (m == 0) return y;
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  const int64_t ldx = x.stride(0), tile_stride = pairs * 2 * kTile;
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
        // With one pass over the group (up to 4 rows), it streams its weights in from memory itself.
        // With several, the later passes compute from cache: memory would sit idle, so all passes
        // instead prefetch the next group between them and computing overlaps the stream.
        const int passes = static_cast<int>((c1 - c0 + 3) / 4);
        const int64_t next_nr = std::min<int64_t>(4, end - last);
        const uint16_t* ahead = passes > 1 && next_nr > 0 ? wp + last * tile_stride : nullptr;
        for (int64_t r0 = c0; r0 < c1; r0 += 4) {
          const int mr = static_cast<int>(std::min<int64_t>(4, c1 - r0));
          const int pass = static_cast<int>((r0 - c0) / 4);
          block_fn(mr, nr)(xp + r0 * ldx, ldx, wp + t0 * tile_stride, tile_stride, pairs,
                           bp ? bp + t0 * kTile : nullptr, yp + r0 * out_features + t0 * kTile, out_features,
                           last_cols, r0 == c0, ahead,
                           static_cast<int>(next_nr), pass, passes);
        }
      }
    }
  });
  return y;
}

#else

bool has_bf16_linear() { return false; }

torch::Tensor linear_bf16(torch::Tensor, torch::Tensor, int64_t, torch::Tensor) {
  TORCH_CHECK(false, "linear_bf16 needs a CPU with AVX512-BF16");
}

#endif
