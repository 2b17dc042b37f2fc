"""A client that goes away mid-request has its request aborted and its KV blocks freed, streaming
or not, long before the request could have finished by itself."""

from __future__ import annotations

import httpx
import pytest
from live import MODEL, metric, slow_engine_class, start_server, wait_until

STEP_S = 0.02  # 200 tokens take at least 4 s: the request cannot just finish in the meantime
LONG = {"model": MODEL, "prompt": "w5 w6 w7", "max_tokens": 200, "ignore_eos": True}


@pytest.fixture(scope="module")
def slow_server(tiny_chat_dir):
    s = start_server(tiny_chat_dir, engine_cls=slow_engine_class(STEP_S))
    yield s
    s.stop()


def blocks_in_use(server) -> int:
    bm = server.engine.engine.block_manager
    return bm.num_blocks - bm.num_free_blocks


def aborted(server) -> float:
    return metric(server, 'falconet_requests_finished_total{finish_reason="abort"}')


def all_freed(server) -> bool:
    return not server.engine.engine.has_unfinished() and blocks_in_use(server) == 0


@pytest.mark.parametrize("n", [1, 3])
def test_stream_disconnect_frees_blocks(slow_server, n):
    before = aborted(slow_server)
    with httpx.Client(timeout=30) as http:
        body = {**LONG, "n": n, "stream": True}
        with http.stream("POST", slow_server.url + "/v1/completions", json=body) as res:
            lines = res.iter_lines()  # kept: a dropped iterator would close the connection already
            chunks = 0
            for line in lines:
                chunks += line.startswith("data: ")
                if chunks == 3 * n:
                    break
            assert blocks_in_use(slow_server) > 0
            assert metric(slow_server, "falconet_kv_cache_usage_ratio") > 0
        # leaving the block closes the connection mid-stream
    assert wait_until(lambda: all_freed(slow_server), timeout=3)
    assert aborted(slow_server) == before + n
    assert metric(slow_server, "falconet_kv_cache_usage_ratio") == 0


def test_non_streaming_disconnect_frees_blocks(slow_server):
    before = aborted(slow_server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow_server.url + "/v1/completions", json=LONG, timeout=0.5)  # gives up, hangs up
    assert blocks_in_use(slow_server) > 0  # still generating
    assert wait_until(lambda: all_freed(slow_server), timeout=3)
    assert aborted(slow_server) == before + 1


def test_server_still_serves_after_disconnects(slow_server):
    res = httpx.post(slow_server.url + "/v1/completions", json={**LONG, "max_tokens": 3}, timeout=30)
    assert res.status_code == 200 and res.json()["usage"]["completion_tokens"] == 3
