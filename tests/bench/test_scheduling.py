"""The scheduling benchmarks run and count what they claim (timings are not asserted)."""

from __future__ import annotations

from falconet.bench.scheduling import measure_packing, measure_stall
from falconet.models.loader import load_model


def test_stall_benchmark_records_gaps_and_ttft(tiny_llama_dir):
    loaded = load_model(tiny_llama_dir, with_tokenizer=False)
    for chunked in (False, True):
        r = measure_stall(loaded, chunked, 16, num_decodes=3, decode_prompt=5, long_prompt=60)
        assert 0 < r.tbt_p50_ms <= r.tbt_p99_ms <= r.tbt_max_ms
        assert r.long_ttft_s > 0


def test_packing_benchmark_counts_padding(tiny_llama_dir):
    loaded = load_model(tiny_llama_dir, with_tokenizer=False)
    packed, padded = measure_packing(loaded, [5, 30, 12], repeats=1)
    assert packed.tokens_computed == 47
    assert padded.tokens_computed == 90
