"""The real-vLLM tier: kvgate (real mitmdump + the addon) in front of two real vLLM CPU
engines with LMCache inside, reporting to the real LMCache controller.

One cluster for the whole tier (conftest.py; ``scripts/vllm-cluster``, about a minute to
start). Only kvgate's public surface is used: its YAML config, the reverse-proxy port, the
debug headers, the admin port's Prometheus text and the flows it writes with ``-w``; the
one internal import is the engine-metrics parser, for the monitor test.

Needs ``.venv-vllm`` (``scripts/vllm-cluster --install-only``); without it the tier is
skipped, or fails when ``CI`` is set. Run it alone with
``.venv/bin/python -m pytest -p no:cacheprovider tests/vllm -q``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from vllm_harness import (
    LMCACHE_CHUNK,
    OPENAI_PY,
    ROOT,
    VLLM_BLOCK,
    ControllerTap,
    Gateway,
    RealCluster,
    actions,
    chat,
    completion,
    counter,
    engine_metrics,
    gateway_config,
    post,
    prompt_totals,
    require_vllm_venv,
    reset_prefix_cache,
    samples,
    served_by,
    start_gateway,
    text,
    tokens_of,
    wait_counter,
    wait_holder,
)

pytestmark = pytest.mark.vllm


# ------------------------------------------------------------------ the tests

def run_check(script: str, tmp_path: Path) -> None:
    """Run one of tests/vllm's check scripts in .venv-vllm; it prints OK or raises."""
    require_vllm_venv()
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update({"PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path),
                "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "HF_HUB_OFFLINE": "1",
                "LMCACHE_TRACK_USAGE": "false", "DO_NOT_TRACK": "1"})
    run = subprocess.run([str(ROOT / ".venv-vllm" / "bin" / "python"),
                          str(Path(__file__).parent / script)],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stderr[-3000:]


def test_lmcache_cpu_connector_matches_vllm_cpu_kv_layout(tmp_path: Path) -> None:
    """Our LMCache connector reads and writes K and V per token where vLLM's CPU kernel
    puts them (tests/vllm/connector_layout_check.py, run in .venv-vllm)."""
    run_check("connector_layout_check.py", tmp_path)


def test_a_late_heartbeat_answer_keeps_its_full_sync_command(tmp_path: Path) -> None:
    """A controller slow to start answers a worker's heartbeat after the worker's receive
    timeout, with the worker's one full-sync request; the worker still gets and runs it
    (tests/vllm/heartbeat_race_check.py, run in .venv-vllm). Stock lmcache 0.5.6 drops it
    with the socket it recreates, and the controller never learns what the worker holds:
    the cause of a failed CI run of the controller-restart test."""
    run_check("heartbeat_race_check.py", tmp_path)


def test_second_turn_of_a_chat_goes_to_the_engine_that_served_the_first(
        cluster: RealCluster, gateway: Gateway) -> None:
    history = [{"role": "system", "content": text("turns-a", 800)},
               {"role": "user", "content": "what does the policy say about caching"}]
    before = prompt_totals(cluster)
    r1 = gateway.post("/v1/chat/completions", chat(cluster, history))
    assert r1.status_code == 200, r1.text
    first = r1.headers["x-kvcache-endpoint"]
    assert served_by(cluster, before, r1.json()["usage"]["prompt_tokens"]) == first
    first_tokens = tokens_of(cluster, {"messages": history})
    assert len(first_tokens) == r1.json()["usage"]["prompt_tokens"]
    assert 600 <= len(first_tokens) <= 1500
    wait_holder(cluster, first_tokens, first)

    history += [{"role": "assistant", "content": r1.json()["choices"][0]["message"]["content"]},
                {"role": "user", "content": "and what does it say about routing"}]
    before = prompt_totals(cluster)
    r2 = gateway.post("/v1/chat/completions", chat(cluster, history))
    assert r2.status_code == 200, r2.text
    assert r2.headers["x-kvcache-route"] == "cache"
    assert r2.headers["x-kvcache-endpoint"] == first
    assert int(r2.headers["x-kvcache-matched-tokens"]) >= LMCACHE_CHUNK
    usage = r2.json()["usage"]
    assert served_by(cluster, before, usage["prompt_tokens"]) == first
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0 and cached % VLLM_BLOCK == 0
    assert cached >= len(first_tokens) // LMCACHE_CHUNK * LMCACHE_CHUNK - VLLM_BLOCK


def test_after_a_prefix_cache_reset_the_repeat_is_served_from_lmcache(
        cluster: RealCluster, gateway: Gateway) -> None:
    body = completion(cluster, text("reset-b", 800))
    r1 = gateway.post("/v1/completions", body)
    assert r1.status_code == 200, r1.text
    holder = r1.headers["x-kvcache-endpoint"]
    tokens = tokens_of(cluster, {"prompt": body["prompt"]})
    held = wait_holder(cluster, tokens, holder)
    assert held >= len(tokens) // LMCACHE_CHUNK * LMCACHE_CHUNK

    external = {"source": "external_kv_transfer"}
    name = "vllm:prompt_tokens_by_source_total"
    ext_before = counter(cluster, holder, name, **external)
    reset_prefix_cache(cluster, holder)
    r2 = gateway.post("/v1/completions", body)
    assert r2.status_code == 200, r2.text
    assert r2.headers["x-kvcache-route"] == "cache"
    assert r2.headers["x-kvcache-endpoint"] == holder
    cached = r2.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= LMCACHE_CHUNK
    ext_after = wait_counter(cluster, holder, name, ext_before, **external)
    # the engine's own prefix cache was empty: every cached token came from LMCache
    assert ext_after - ext_before == cached
    # greedy output restored from LMCache equals the fresh computation
    assert r2.json()["choices"][0]["text"] == r1.json()["choices"][0]["text"]


def _flow_meta(flows: Path) -> list[tuple[str, dict[str, Any], Any]]:
    from mitmproxy.io import FlowReader

    out = []
    with open(flows, "rb") as fh:
        for f in FlowReader(fh).stream():
            req = getattr(f, "request", None)
            if req is not None and req.path.startswith("/v1/"):
                out.append((req.path, f.metadata.get("kvcache", {}), json.loads(req.content)))
    return out


@pytest.mark.parametrize("tokenizer", ["engine", "in-process"])
def test_first_sight_tokens_equal_the_engines(cluster: RealCluster, tmp_path: Path,
                                              tokenizer: str) -> None:
    """kvgate's tokens for a never-seen prompt and chat (from the engine's /tokenize, or
    in-process from the model folder's tokenizer.json + chat template) count what the
    engine counts, and a never-seen chat whose system prompt an engine holds goes there."""
    tag = f"first-{tokenizer}"
    cfg = gateway_config(cluster)
    if tokenizer == "engine":
        cfg["kvcache"].pop("tokenizers", None)
    else:
        assert cfg["kvcache"]["tokenizers"] == {cluster.model: cluster.info["model_dir"]}
    system = {"role": "system", "content": text(f"{tag}-sys", 700)}
    # engine-2 serves the conversation's first turn directly: it holds the system prompt
    opening = chat(cluster, [system, {"role": "user", "content": "what is a cache"}])
    assert post(cluster.url("engine-2") + "/v1/chat/completions", opening).status_code == 200
    wait_holder(cluster, tokens_of(cluster, {"messages": opening["messages"]}), "engine-2")

    gw = start_gateway(tmp_path / "gw", cfg)
    try:
        bodies = [
            completion(cluster, text(f"{tag}-prompt", 600)),
            chat(cluster, [{"role": "user", "content": text(f"{tag}-chat", 600)}]),
            chat(cluster, [system, {"role": "user", "content": "and what is a prefix"}]),
        ]
        answers = []
        for body in bodies:
            path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
            r = gw.post(path, body)
            assert r.status_code == 200, r.text
            answers.append(r)
        # the never-seen question after the held system prompt: routed by cache to engine-2
        last = answers[-1]
        assert last.headers["x-kvcache-route"] == "cache"
        assert last.headers["x-kvcache-endpoint"] == "engine-2"
        assert int(last.headers["x-kvcache-matched-tokens"]) >= 2 * LMCACHE_CHUNK
        assert last.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 2 * LMCACHE_CHUNK
        admin = gw.admin_metrics()
    finally:
        gw.stop()
    local = sum(v for lab, v in samples(admin, "kvgate_helper_calls_total")
                if lab.get("helper") == "tokenize" and lab.get("result") == "local")
    if tokenizer == "in-process":
        assert local >= len(bodies)
    else:
        assert local == 0

    metas = _flow_meta(gw.flows)
    assert len(metas) == len(bodies)
    for (path, meta, sent), body, answer in zip(metas, bodies, answers, strict=True):
        assert sent == body, path
        form = {"prompt": body["prompt"]} if "prompt" in body else {"messages": body["messages"]}
        engine_count = len(tokens_of(cluster, form))
        assert 600 <= engine_count <= 1500
        assert meta.get("prompt_tokens") == engine_count, (path, meta)
        assert answer.json()["usage"]["prompt_tokens"] == engine_count


def test_engine_monitor_reads_the_real_metrics(cluster: RealCluster, gateway: Gateway) -> None:
    try:  # the one kvgate internal this tier imports (moved by the package refactor)
        from kvgate.fleet.engine_metrics import parse_metrics
    except ImportError:
        from kvgate.health import parse_metrics  # type: ignore[no-redef]

    def own(metrics_text: str) -> dict[str, float]:
        """The engine's own figures, and the labels it writes them with."""
        out = {}
        for key, name in (("running", "vllm:num_requests_running"),
                          ("waiting", "vllm:num_requests_waiting"),
                          ("kv_usage", "vllm:kv_cache_usage_perc")):
            found = samples(metrics_text, name)
            assert len(found) == 1, (name, found)
            labels, value = found[0]
            assert labels == {"engine": "0", "model_name": cluster.model}, labels
            out[key] = value
        return out

    def view(metrics_text: str) -> dict[str, float]:
        st = parse_metrics(metrics_text.encode())
        return {"running": st.running, "waiting": st.waiting, "kv_usage": st.kv_usage}

    # a quiet moment: nothing running anywhere
    for eid in cluster.ids:
        quiet = engine_metrics(cluster, eid)
        assert own(quiet)["running"] == own(quiet)["waiting"] == 0
        assert view(quiet) == own(quiet)

    # a busy moment: a long generation streams on engine-2 while its /metrics is read
    body = completion(cluster, text("busy-d", 300), max_tokens=3000, stream=True,
                      ignore_eos=True)
    with requests.post(cluster.url("engine-2") + "/v1/completions", json=body, stream=True,
                       timeout=120) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        next(lines)  # generation has started
        end = time.monotonic() + 20
        busy = engine_metrics(cluster, "engine-2")
        while own(busy)["running"] < 1 and time.monotonic() < end:
            time.sleep(0.05)
            busy = engine_metrics(cluster, "engine-2")
        assert own(busy)["running"] == 1
        assert own(busy)["kv_usage"] > 0
        assert view(busy) == own(busy)
    # closing the stream aborts the request: quiet again
    end = time.monotonic() + 20
    while own(engine_metrics(cluster, "engine-2"))["running"] and time.monotonic() < end:
        time.sleep(0.2)
    assert own(engine_metrics(cluster, "engine-2"))["running"] == 0

    # the gateway's monitor has both real engines in rotation (GET /health)
    healthy = {lab["endpoint"]: v for lab, v in samples(gateway.admin_metrics(),
                                                          "kvgate_endpoint_healthy")}
    assert healthy == {eid: 1.0 for eid in cluster.ids}


def test_openai_sdk_streams_chat_and_completions_with_usage(
        cluster: RealCluster, gateway: Gateway, tmp_path: Path) -> None:
    if not OPENAI_PY.exists():
        pytest.fail("scripts/setup makes .venv-openai; run it first")
    prompt = text("sdk-e-prompt", 700)
    ids = tokens_of(cluster, {"prompt": text("sdk-e-ids", 700)})
    spec = {"model": cluster.model, "system": text("sdk-e-sys", 700),
            "question": "what is in the document", "prompt": prompt, "token_ids": ids,
            "max_tokens": 6}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    run = subprocess.run([str(OPENAI_PY), str(Path(__file__).parent / "openai_client.py"),
                          gateway.url, str(tmp_path / "spec.json")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)

    chat_tokens = len(tokens_of(cluster, {"messages": [
        {"role": "system", "content": spec["system"]},
        {"role": "user", "content": spec["question"]}]}))
    for key in ("chat_1", "chat_2", "completion_stream", "token_ids_stream"):
        got = out[key]
        assert got["usage"] is not None, key  # stream_options.include_usage honoured
        assert got["usage"]["completion_tokens"] == spec["max_tokens"], key
        # streamed: text chunk(s) (a chat's role chunk first), then the usage chunk; a busy
        # engine may deliver all of a short completion's text in one chunk
        assert got["chunks"] >= (3 if key.startswith("chat") else 2), key
        assert got["text"], key
        assert got["x-kvcache-route"], key
    assert out["chat_1"]["usage"]["prompt_tokens"] == chat_tokens
    # the second turn streamed from the engine that holds the first
    assert out["chat_2"]["x-kvcache-route"] == "cache"
    assert out["chat_2"]["x-kvcache-endpoint"] == out["chat_1"]["x-kvcache-endpoint"]
    assert out["chat_2"]["usage"]["cached_tokens"] >= LMCACHE_CHUNK
    assert out["completion_stream"]["usage"]["prompt_tokens"] == len(
        tokens_of(cluster, {"prompt": prompt}))
    # token-id prompts: counted as sent, and the streamed repeat goes where they are held
    assert out["token_ids"]["usage"]["prompt_tokens"] == len(ids)
    assert out["token_ids_stream"]["usage"]["prompt_tokens"] == len(ids)
    assert out["token_ids_stream"]["x-kvcache-route"] == "cache"
    assert out["token_ids_stream"]["x-kvcache-endpoint"] == out["token_ids"]["x-kvcache-endpoint"]
    assert out["token_ids_stream"]["text"] == out["token_ids"]["text"]


def test_pin_and_compress_from_the_gateway_against_the_real_workers(
        cluster: RealCluster, tmp_path: Path) -> None:
    """kvgate pins hot content and compresses (``signals: process``: on the gateway's own
    load, as the seed did) through the real controller, which asks the real LMCache worker
    inside the engine that holds it. The pin reaches the worker: the controller answers
    with the worker's count of pinned tokens. The compress (kvgate's default method, zstd)
    is refused by LMCache 0.5.6, which knows only ``cachegen``: the worker logs it and
    answers 0 tokens, which kvgate counts as ``result="noop"`` (answered, nothing touched),
    not as a success. Routing is unaffected throughout.

    Not tried here: ``compress_method: cachegen``. It does compress on the CPU (the worker
    answers the full count), but the next LMCache load of that content hands vLLM a
    compressed object and the engine core dies (LMCache's own GPU connector asserts the
    same way), so it would take the cluster down."""
    body = completion(cluster, text("pin-g", 800))
    tokens = tokens_of(cluster, {"prompt": body["prompt"]})
    assert post(cluster.url("engine-2") + "/v1/completions", body).status_code == 200
    held = wait_holder(cluster, tokens, "engine-2")
    assert held == len(tokens) // LMCACHE_CHUNK * LMCACHE_CHUNK

    tap = ControllerTap(cluster.ctl)
    cfg = gateway_config(cluster, lmcache_endpoint=tap.url, signals="process",
                         cache_strategy={"enable_pinning": True, "hot_content_threshold": 2,
                                         "pin_location": "LocalCPUBackend",
                                         "enable_compression": True,
                                         "load_threshold": 0.000001,
                                         "compress_location": "LocalCPUBackend"})
    worker_log = Path(next(e["log"] for e in cluster.info["engines"] if e["id"] == "engine-2"))
    refusals_before = worker_log.read_text(errors="replace").count(
        "Unsupported compression method: zstd")
    gw = start_gateway(tmp_path / "gw", cfg)
    try:
        answers = []
        end = time.monotonic() + 30
        while True:
            r = gw.post("/v1/completions", body)
            assert r.status_code == 200, r.text
            answers.append(r)
            done = actions(gw)
            if (done.get(("pin", "ok"), 0) >= 1 and sum(
                    v for (a, _), v in done.items() if a == "compress") >= 1):
                break
            assert time.monotonic() < end, f"no pin and compress in 30 s: {done}"
            time.sleep(0.3)
        r = gw.post("/v1/completions", body)  # after the actions: still routed by cache
        assert r.status_code == 200, r.text
        answers.append(r)
        end = time.monotonic() + 15  # its own background actions settle
        while True:
            done = actions(gw)
            counted = (sum(v for (a, _), v in done.items() if a == "pin"),
                       sum(v for (a, _), v in done.items() if a == "compress"))
            sent = (len(tap.calls("/pin")), len(tap.calls("/compress")))
            if counted == sent:  # every action sent so far is counted (more may follow)
                break
            assert time.monotonic() < end, (done, tap.seen)
            time.sleep(0.2)
    finally:
        gw.stop()
        tap.close()

    # routing unaffected: every repeat went by cache to the holder, served from cache
    for a in answers:
        assert a.headers["x-kvcache-route"] == "cache"
        assert a.headers["x-kvcache-endpoint"] == "engine-2"
        # the controller's chunks, or what the gateway itself sent there since
        assert int(a.headers["x-kvcache-matched-tokens"]) >= held
        assert a.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= held

    # the pin reached the worker: the controller relays the worker's count of pinned tokens
    pins = tap.calls("/pin")[:sent[0]]  # the ones ``done`` has counted
    assert pins, tap.seen
    for req, status, answer in pins:
        assert req["instance_id"] == "engine-2" and req["location"] == "LocalCPUBackend"
        assert req["tokens"] == tokens
        assert status == 200 and answer["num_tokens"] == held, answer
    assert {k: v for k, v in done.items() if k[0] == "pin"} == {("pin", "ok"): len(pins)}

    # the compress: LMCache's refusal is a 200 with 0 tokens and a warning in the worker's log
    compresses = tap.calls("/compress")[:sent[1]]
    assert compresses, tap.seen
    for req, status, answer in compresses:
        assert req["instance_id"] == "engine-2" and req["method"] == "zstd"
        assert status == 200 and answer["num_tokens"] == 0, answer
    refusals = worker_log.read_text(errors="replace").count(
        "Unsupported compression method: zstd") - refusals_before
    assert refusals == len(tap.calls("/compress"))
    assert {k: v for k, v in done.items() if k[0] == "compress"} == {
        ("compress", "noop"): len(compresses)}
