// Python bindings of the CPU kernels (one extension module, several sources).

#include <torch/extension.h>

torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                              torch::Tensor tables, torch::Tensor lengths, int64_t block_size,
                              int64_t window, double scale);
bool has_bf16_prefill_attention();
void prefill_attention_bf16(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor out,
                            torch::Tensor starts, torch::Tensor lengths, int64_t window, double scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention, "attention of query rows over paged K/V");
  m.def("has_bf16_prefill_attention", &has_bf16_prefill_attention,
        "whether prefill_attention_bf16 was built (the CPU has AVX512-BF16)");
  m.def("prefill_attention_bf16", &prefill_attention_bf16, "causal attention of packed prompts, bf16");
}
