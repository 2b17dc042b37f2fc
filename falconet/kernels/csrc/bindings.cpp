// Python bindings of the CPU kernels (one extension module, several sources).

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Every kernel lets go of the GIL: a server's event loop keeps running while a step computes.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("paged_attention", &paged_attention, "attention of query rows over paged K/V", nogil, py::arg("q"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("tables"), py::arg("lengths"), py::arg("block_size"),
        py::arg("window"), py::arg("scale"), py::arg("tiled") = false);
  m.def("has_tiled_kv", &has_tiled_kv, "whether the tiled bf16 cache layout is supported for this shape");
  m.def("has_bf16_prefill_attention", &has_bf16_prefill_attention,
        "whether prefill_attention_bf16 was built (the CPU has AVX512-BF16)");
  m.def("prefill_attention_bf16", &prefill_attention_bf16, "causal attention of packed prompts, bf16", nogil,
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("starts"), py::arg("lengths"),
        py::arg("window"), py::arg("scale"), py::arg("key_starts") = py::none(), py::arg("key_lengths") = py::none());
  m.def("has_bf16_linear", &has_bf16_linear, "whether linear_bf16 was built (the CPU has AVX512-BF16)");
  m.def("linear_bf16", &linear_bf16, "x W^T + b with W packed by pack_linear_weight_bf16", nogil);
  m.def("linear_int8", &linear_int8, "x (W * scale)^T + b with int8 W packed like linear_bf16's", nogil);
  m.def("linear_q4", &linear_q4, "x W^T + b with 4-bit W (q * d + m per block) packed by pack_int4", nogil);
  m.def("rms_norm", &rms_norm, "RMSNorm of rows, optionally after residual += x", nogil,
        py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("residual") = py::none());
  m.def("rope_", &rope_, "rotate-half RoPE of q and k in place", nogil);
  m.def("silu_mul", &silu_mul, "silu(gate) * up of [gate | up] rows", nogil);
  m.def("store_kv", &store_kv, "write k, v rows into the cache slots", nogil, py::arg("k"), py::arg("v"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("slots"), py::arg("tiled") = false);
  m.def("top_k_rows", &top_k_rows, "indices of each row's k largest entries, largest first", nogil);
  m.def("decode_attention", &decode_attention, "RoPE, cache store and paged attention of decode rows", nogil);
}
