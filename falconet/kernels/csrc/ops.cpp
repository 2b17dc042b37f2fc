// The kernels as PyTorch operators (torch.ops.falconet.*), so that torch.compile can put them in
// one graph: traced, they are opaque nodes with the fake (meta) versions in kernels/__init__.py,
// and inductor's C++ wrapper then calls them without going back to Python between ops. Eager code
// keeps calling the pybind11 functions of bindings.cpp (cheaper from Python than the dispatcher).

#include <torch/library.h>

#include "kernels.h"

// The attention of a decode-only step in one call: RoPE on q and k (in place in qkv), k and v into
// the cache (row t into slots[t], and rows extra_rows also into extra_slots: a token tree's
// ancestors into its side branches' blocks), then every row's attention over its block table.
// qkv [T, (H + 2 Hkv) D] -> [T, H D].
torch::Tensor decode_attention(torch::Tensor qkv, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin,
                               torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots,
                               torch::Tensor extra_rows, torch::Tensor extra_slots, torch::Tensor tables,
                               torch::Tensor lengths, int64_t heads, int64_t kv_heads, int64_t block_size,
                               int64_t window, double scale, bool tiled) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "decode_attention: qkv must be [T, width] rows");
  const int64_t tokens = qkv.size(0), dim = k_cache.size(2);
  TORCH_CHECK(qkv.size(1) == (heads + 2 * kv_heads) * dim, "decode_attention: qkv width does not match heads");
  auto parts = qkv.split_with_sizes({heads * dim, kv_heads * dim, kv_heads * dim}, 1);
  auto q = parts[0].view({tokens, heads, dim});
  auto k = parts[1].view({tokens, kv_heads, dim});
  auto v = parts[2].view({tokens, kv_heads, dim});
  rope_(q, k, positions, cos, sin);
  store_kv(k, v, k_cache, v_cache, slots, tiled);
  if (extra_rows.numel() > 0)
    store_kv(k.index_select(0, extra_rows), v.index_select(0, extra_rows), k_cache, v_cache, extra_slots, tiled);
  return paged_attention(q.contiguous(), k_cache, v_cache, tables, lengths, block_size, window, scale, tiled)
      .view({tokens, heads * dim});
}

// rms_norm with and without the residual as two operators: an optional mutable argument that
// is None trips inductor's re-inplacing (torch 2.13).
torch::Tensor norm_op(torch::Tensor x, torch::Tensor weight, double eps) { return rms_norm(x, weight, eps, {}); }
torch::Tensor add_norm_op(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps) {
  return rms_norm(x, weight, eps, residual);
}

TORCH_LIBRARY(falconet, m) {
  m.def("linear_bf16(Tensor x, Tensor packed, int out_features, Tensor bias) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor packed, Tensor scale, int out_features, Tensor bias) -> Tensor");
  m.def("linear_q4(Tensor x, Tensor packed, Tensor d, Tensor mins, int out_features, Tensor bias, int group) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor(a!) residual, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  // The caches are written but not marked mutable: they are never read elsewhere in a graph, and
  // marked, functionalisation would treat every layer's write as a new copy of the whole cache.
  // The op's output depends on what it stored, so it cannot be dropped or reordered.
  m.def(
      "decode_attention(Tensor(a!) qkv, Tensor positions, Tensor cos, Tensor sin, Tensor k_cache, Tensor v_cache, "
      "Tensor slots, Tensor extra_rows, Tensor extra_slots, Tensor tables, Tensor lengths, int heads, "
      "int kv_heads, int block_size, int window, "
      "float scale, bool tiled) -> Tensor");
}

TORCH_LIBRARY_IMPL(falconet, CPU, m) {
  m.impl("linear_bf16", &linear_bf16);
  m.impl("linear_int8", &linear_int8);
  m.impl("linear_q4", &linear_q4);
  m.impl("rms_norm", &norm_op);
  m.impl("add_rms_norm", &add_norm_op);
  m.impl("silu_mul", &silu_mul);
  m.impl("decode_attention", &decode_attention);
}
