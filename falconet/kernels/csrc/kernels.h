// The kernels' entry points, shared by the pybind11 bindings (bindings.cpp) and the operator
// registrations (ops.cpp); each is defined, with its contract, in one of the .cpp files here.
#pragma once

#include <torch/extension.h>

#include <optional>

torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                              torch::Tensor tables, torch::Tensor lengths, int64_t block_size,
                              int64_t window, double scale, bool tiled);
bool has_tiled_kv(int64_t dim, int64_t block_size, int64_t group);
bool has_bf16_prefill_attention();
void prefill_attention_bf16(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor out,
                            torch::Tensor starts, torch::Tensor lengths, int64_t window, double scale,
                            std::optional<torch::Tensor> key_starts, std::optional<torch::Tensor> key_lengths);
bool has_bf16_linear();
torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor packed, int64_t out_features, torch::Tensor bias);
torch::Tensor linear_int8(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, int64_t out_features,
                          torch::Tensor bias);
torch::Tensor linear_q4(torch::Tensor x, torch::Tensor packed, torch::Tensor d, torch::Tensor mins,
                        int64_t out_features, torch::Tensor bias, int64_t group);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps, std::optional<torch::Tensor> residual);
void rope_(torch::Tensor q, torch::Tensor k, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin);
torch::Tensor silu_mul(torch::Tensor gate_up);
void store_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots,
              bool tiled);
// ops.cpp: RoPE, cache stores and paged attention of a decode-only step in one call.
torch::Tensor decode_attention(torch::Tensor qkv, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin,
                               torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots,
                               torch::Tensor extra_rows, torch::Tensor extra_slots, torch::Tensor tables,
                               torch::Tensor lengths, int64_t heads, int64_t kv_heads, int64_t block_size,
                               int64_t window, double scale, bool tiled);
// top_k.cpp: each row's k largest entries, largest first.
torch::Tensor top_k_rows(torch::Tensor x, int64_t k);
