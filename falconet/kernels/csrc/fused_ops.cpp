// The element-wise parts of a decoder layer, one call each instead of five to twenty PyTorch ops.
//
// At decode batch sizes these ops move a few KB each, so what they cost is dispatch: about 40
// small PyTorch calls per layer were a quarter of a 16-sequence decode step. Each function here
// rounds exactly where the PyTorch reference in models/ rounds (every bf16 product and sum is
// rounded to bf16 before the next op uses it), so the fused and unfused paths agree bit for bit
// in bf16, up to the order of one float32 reduction in rms_norm.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec_math.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// Element access in float32. bf16 is converted with plain bit operations (rounding to nearest
// even, NaN kept NaN, as c10::BFloat16 does) that the compiler vectorises; c10's own conversion
// functions it does not, which made these loops ten times slower.
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  using Raw = float;
  static inline float load(Raw v) { return v; }
  static inline Raw store(float v) { return v; }
};

template <>
struct Elem<at::BFloat16> {
  using Raw = uint16_t;
  static inline float load(Raw v) {
    const uint32_t bits = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  }
  static inline Raw store(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof(bits));
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    return static_cast<Raw>(f != f ? 0x7fc0u : rounded);
  }
};

// Round a float32 to the model dtype and back: bf16 rounds to nearest even, float32 is exact.
template <typename T>
inline float rnd(float v) {
  return Elem<T>::load(Elem<T>::store(v));
}

template <typename T>
inline typename Elem<T>::Raw* raw(T* p) {
  return reinterpret_cast<typename Elem<T>::Raw*>(p);
}
template <typename T>
inline const typename Elem<T>::Raw* raw(const T* p) {
  return reinterpret_cast<const typename Elem<T>::Raw*>(p);
}

// out = weight * to_dtype(h * rsqrt(mean(h^2) + eps)), h = x (+ residual, written back).
template <typename T>
void rms_norm_rows(const T* x, int64_t ldx, T* residual, int64_t ldr, const T* weight, T* out, int64_t ldo,
                   int64_t rows, int64_t dim, double eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    using E = Elem<T>;
    std::vector<float> h(dim), w(dim);
    for (int64_t d = 0; d < dim; ++d) w[d] = E::load(raw(weight)[d]);
    for (int64_t i = begin; i < end; ++i) {
      const auto* xi = raw(x) + i * ldx;
      if (residual != nullptr) {
        auto* ri = raw(residual) + i * ldr;
        for (int64_t d = 0; d < dim; ++d) {
          const auto sum = E::store(E::load(xi[d]) + E::load(ri[d]));
          ri[d] = sum;
          h[d] = E::load(sum);
        }
      } else {
        for (int64_t d = 0; d < dim; ++d) h[d] = E::load(xi[d]);
      }
      // 16 running sums (a fixed order, and one the compiler can vectorise).
      float part[16] = {};
      int64_t d = 0;
      for (; d + 16 <= dim; d += 16)
        for (int j = 0; j < 16; ++j) part[j] += h[d + j] * h[d + j];
      for (; d < dim; ++d) part[0] += h[d] * h[d];
      float ss = 0.0f;
      for (int j = 0; j < 16; ++j) ss += part[j];
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(dim) + static_cast<float>(eps));
      auto* oi = raw(out) + i * ldo;
      for (d = 0; d < dim; ++d) oi[d] = E::store(w[d] * rnd<T>(h[d] * inv));
    }
  });
}

// Rotate-half RoPE in place on [tokens, heads, dim] rows (any token and head strides).
template <typename T>
void rope_rows(T* x, int64_t tokens, int64_t heads, int64_t dim, int64_t st, int64_t sh, const int64_t* pos,
               const float* cos, const float* sin) {
  const int64_t half = dim / 2;
  at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> c(dim), s(dim), v(dim);
    for (int64_t t = begin; t < end; ++t) {
      const float* ct = cos + pos[t] * dim;
      const float* stn = sin + pos[t] * dim;
      // The reference casts the float32 tables to the model dtype before multiplying.
      for (int64_t d = 0; d < dim; ++d) {
        c[d] = rnd<T>(ct[d]);
        s[d] = rnd<T>(stn[d]);
      }
      for (int64_t h = 0; h < heads; ++h) {
        auto* row = raw(x) + t * st + h * sh;
        for (int64_t d = 0; d < dim; ++d) v[d] = Elem<T>::load(row[d]);
        for (int64_t d = 0; d < half; ++d) {
          row[d] = Elem<T>::store(rnd<T>(v[d] * c[d]) + rnd<T>(-v[d + half] * s[d]));
          row[d + half] = Elem<T>::store(rnd<T>(v[d + half] * c[d + half]) + rnd<T>(v[d] * s[d + half]));
        }
      }
    }
  });
}

// out[:, j] = to_dtype(silu(gate[:, j])) * up[:, j] with gate_up = [gate | up].
template <typename T>
void silu_mul_rows(const T* gu, int64_t ldg, T* out, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const auto* g = raw(gu) + i * ldg;
      const auto* u = g + inter;
      auto* o = raw(out) + i * inter;
      for (int64_t j = 0; j < inter; ++j) {
        const float gv = Elem<T>::load(g[j]);
        const float act = rnd<T>(gv / (1.0f + falconet::exp_clamped(-gv)));
        o[j] = Elem<T>::store(act * Elem<T>::load(u[j]));
      }
    }
  });
}

#if defined(__AVX512F__)
inline void stream_copy(char* dst, const char* src, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 64)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i), _mm512_loadu_si512(src + i));
}
inline void store_fence() { _mm_sfence(); }
#else
inline void stream_copy(char* dst, const char* src, int64_t bytes) { std::memcpy(dst, src, bytes); }
inline void store_fence() {}
#endif

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be 2-D with contiguous rows");
}

}  // namespace

// Normalised x; with a residual, first residual += x (in place) and normalise the sum.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps, std::optional<torch::Tensor> residual) {
  check_rows(x, "x");
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.size(0) == x.size(1) &&
                  weight.scalar_type() == x.scalar_type(),
              "rms_norm: weight must be [dim] in x's dtype");
  auto out = torch::empty(x.sizes(), x.options());
  const int64_t rows = x.size(0), dim = x.size(1);
  if (residual) {
    check_rows(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "rms_norm: residual must match x");
  }
  AT_DISPATCH_SWITCH(x.scalar_type(), "rms_norm",
                     AT_DISPATCH_CASE(at::kFloat, [&] {
                       rms_norm_rows<float>(x.data_ptr<float>(), x.stride(0),
                                            residual ? residual->data_ptr<float>() : nullptr,
                                            residual ? residual->stride(0) : 0, weight.data_ptr<float>(),
                                            out.data_ptr<float>(), dim, rows, dim, eps);
                     }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
                       using T = at::BFloat16;
                       rms_norm_rows<T>(x.data_ptr<T>(), x.stride(0), residual ? residual->data_ptr<T>() : nullptr,
                                        residual ? residual->stride(0) : 0, weight.data_ptr<T>(), out.data_ptr<T>(),
                                        dim, rows, dim, eps);
                     }));
  return out;
}

// Rotate q [T, H, D] and k [T, Hkv, D] in place by the cos/sin tables [positions, D] (float32).
void rope_(torch::Tensor q, torch::Tensor k, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.stride(2) == 1 && k.stride(2) == 1 &&
                  q.scalar_type() == k.scalar_type() && q.size(0) == k.size(0) && q.size(2) == k.size(2),
              "rope_: q, k must be [T, heads, dim] of one dtype with a contiguous last dim");
  TORCH_CHECK(positions.scalar_type() == torch::kLong && positions.is_contiguous() &&
                  positions.numel() == q.size(0),
              "rope_: one int64 position per token");
  TORCH_CHECK(cos.scalar_type() == torch::kFloat && sin.scalar_type() == torch::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.dim() == 2 && cos.size(1) == q.size(2) && sin.sizes() == cos.sizes(),
              "rope_: cos/sin must be float32 [positions, dim]");
  const int64_t tokens = q.size(0), dim = q.size(2), limit = cos.size(0);
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < limit, "rope_: position ", pos[t], " outside the table");
  AT_DISPATCH_SWITCH(q.scalar_type(), "rope_", AT_DISPATCH_CASE(at::kFloat, [&] {
                       rope_rows<float>(q.data_ptr<float>(), tokens, q.size(1), dim, q.stride(0), q.stride(1), pos,
                                        cos.data_ptr<float>(), sin.data_ptr<float>());
                       rope_rows<float>(k.data_ptr<float>(), tokens, k.size(1), dim, k.stride(0), k.stride(1), pos,
                                        cos.data_ptr<float>(), sin.data_ptr<float>());
                     }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
                       using T = at::BFloat16;
                       rope_rows<T>(q.data_ptr<T>(), tokens, q.size(1), dim, q.stride(0), q.stride(1), pos,
                                    cos.data_ptr<float>(), sin.data_ptr<float>());
                       rope_rows<T>(k.data_ptr<T>(), tokens, k.size(1), dim, k.stride(0), k.stride(1), pos,
                                    cos.data_ptr<float>(), sin.data_ptr<float>());
                     }));
}

// gate_up [T, 2I] -> silu(gate) * up [T, I].
torch::Tensor silu_mul(torch::Tensor gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "silu_mul: gate_up must have an even width");
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  auto out = torch::empty({rows, inter}, gate_up.options());
  AT_DISPATCH_SWITCH(gate_up.scalar_type(), "silu_mul", AT_DISPATCH_CASE(at::kFloat, [&] {
                       silu_mul_rows<float>(gate_up.data_ptr<float>(), gate_up.stride(0), out.data_ptr<float>(),
                                            rows, inter);
                     }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
                       using T = at::BFloat16;
                       silu_mul_rows<T>(gate_up.data_ptr<T>(), gate_up.stride(0), out.data_ptr<T>(), rows, inter);
                     }));
  return out;
}

// k_cache[:, slots[t]] = k[t] and the same for v; caches [Hkv, slots, D], k/v [T, Hkv, D].
// Write token t's k, v rows (all kv heads) into cache slot slots[t]. With `tiled` (bf16 only) the
// caches use the tiled layout of kv_cache.py: per 16-token tile, keys [dim/2][16][2] and values
// [8][dim][2], so one token's row is spread over the tile in 4-byte (keys) or 2-byte (values)
// pieces.
void store_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots,
              bool tiled) {
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.sizes() == v.sizes() && k.stride(2) == 1 && v.stride(2) == 1,
              "store_kv: k, v must be [T, Hkv, D] with a contiguous last dim");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes() && k_cache.size(0) == k.size(1) && k_cache.size(2) == k.size(2),
              "store_kv: caches must be contiguous [Hkv, slots, D] matching k");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == v_cache.scalar_type() &&
                  k.scalar_type() == v.scalar_type(),
              "store_kv: dtypes differ");
  TORCH_CHECK(slots.scalar_type() == torch::kLong && slots.is_contiguous() && slots.numel() == k.size(0),
              "store_kv: one int64 slot per token");
  const int64_t tokens = k.size(0), heads = k.size(1), dim = k.size(2), capacity = k_cache.size(1);
  TORCH_CHECK(!tiled || (k.scalar_type() == torch::kBFloat16 && dim % 2 == 0 && capacity % 16 == 0),
              "store_kv: the tiled layout needs bfloat16, an even head_dim and whole tiles");
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(sl[t] >= 0 && sl[t] < capacity, "store_kv: slot ", sl[t], " outside the cache");
  const int64_t bytes = dim * k.element_size();
  auto* kc = static_cast<char*>(k_cache.data_ptr());
  auto* vc = static_cast<char*>(v_cache.data_ptr());
  const auto* kp = static_cast<const char*>(k.data_ptr());
  const auto* vp = static_cast<const char*>(v.data_ptr());
  const int64_t es = k.element_size();
  if (tiled) {
    at::parallel_for(0, tokens, 256, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t h = 0; h < heads; ++h) {
          const int64_t slot = sl[t], j = slot % 16;
          const int64_t tile = (h * capacity + slot - j) * dim;  // in elements
          uint32_t* kt = reinterpret_cast<uint32_t*>(kc) + tile / 2;
          uint16_t* vt = reinterpret_cast<uint16_t*>(vc) + tile + (j / 2) * 2 * dim + j % 2;
          const auto* ks = reinterpret_cast<const uint32_t*>(kp + (t * k.stride(0) + h * k.stride(1)) * es);
          const auto* vs = reinterpret_cast<const uint16_t*>(vp + (t * v.stride(0) + h * v.stride(1)) * es);
          for (int64_t p = 0; p < dim / 2; ++p) kt[p * 16 + j] = ks[p];
          for (int64_t d = 0; d < dim; ++d) vt[d * 2] = vs[d];
        }
    });
    return;
  }
  // The slots are scattered over a cache much larger than the CPU caches: ordinary stores would
  // first read every destination line from memory. Whole aligned lines are written with
  // streaming stores instead, which skip that read.
  const bool stream = bytes % 64 == 0 && reinterpret_cast<uintptr_t>(kc) % 64 == 0 &&
                      reinterpret_cast<uintptr_t>(vc) % 64 == 0;
  at::parallel_for(0, tokens, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t dst = (h * capacity + sl[t]) * bytes;
        const char* ks = kp + (t * k.stride(0) + h * k.stride(1)) * es;
        const char* vs = vp + (t * v.stride(0) + h * v.stride(1)) * es;
        if (stream) {
          stream_copy(kc + dst, ks, bytes);
          stream_copy(vc + dst, vs, bytes);
        } else {
          std::memcpy(kc + dst, ks, bytes);
          std::memcpy(vc + dst, vs, bytes);
        }
      }
    store_fence();
  });
}
