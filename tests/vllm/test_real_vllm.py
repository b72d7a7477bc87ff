"""The real-vLLM tier: kvgate (real mitmdump + the addon) in front of two real vLLM CPU
engines with LMCache inside, reporting to the real LMCache controller.

One cluster per module (``scripts/vllm-cluster``, about a minute to start). Only kvgate's
public surface is used: its YAML config, the reverse-proxy port, the debug headers, the
admin port's Prometheus text and the flows it writes with ``-w``; the one internal import is
the engine-metrics parser, for the monitor test.

Needs ``.venv-vllm`` (``scripts/vllm-cluster --install-only``); without it the tier is
skipped, or fails when ``CI`` is set. Run it alone with
``.venv/bin/python -m pytest -p no:cacheprovider tests/vllm -q``.
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from kvgate.sim.ports import free_port, wait_port

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "vllm-cluster"
INSTALLED = ROOT / ".venv-vllm" / ".kvgate-vllm"
ADDON = ROOT / "addon" / "kvcache.py"
MITMDUMP = Path(sys.executable).parent / "mitmdump"
OPENAI_PY = ROOT / ".venv-openai" / "bin" / "python"
READY = "[vllm-cluster] ready "
START_TIMEOUT = 600.0
LMCACHE_CHUNK = 256
VLLM_BLOCK = 128

_TEXT = ("the cache engine routes a prompt to the model and the answer comes back from "
         "the server while a user asks a question about the policy in this document")


def text(tag: str, n_words: int = 800) -> str:
    """About 1.3 tokens a word with the tiny model's tokenizer; ``tag`` first, so prompts
    of different tags share no LMCache chunk."""
    rng, words = random.Random(tag), _TEXT.split()
    return tag + " " + " ".join(rng.choice(words) for _ in range(n_words))


# ------------------------------------------------------------------ the cluster

@dataclass
class RealCluster:
    info: dict[str, Any]
    config: dict[str, Any]
    proc: subprocess.Popen[str]
    state: Path
    lines: list[str] = field(default_factory=list)

    @property
    def model(self) -> str:
        return self.info["model"]

    @property
    def ids(self) -> list[str]:
        return [e["id"] for e in self.info["engines"]]

    def url(self, eid: str) -> str:
        return next(e["url"] for e in self.info["engines"] if e["id"] == eid)

    @property
    def ctl(self) -> str:
        return self.info["controller"]["url"]

    def stderr(self) -> str:
        return (self.state / "cluster.stderr").read_text(errors="replace")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def require_vllm_venv() -> None:
    if not INSTALLED.exists():
        if os.environ.get("CI"):
            pytest.fail("the vLLM venv is missing: run scripts/vllm-cluster --install-only")
        pytest.skip("run scripts/vllm-cluster --install-only first")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealCluster]:
    require_vllm_venv()
    state = tmp_path_factory.mktemp("vllm-cluster")
    cfg_path = state / "kvgate.yaml"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    with open(state / "cluster.stderr", "w") as err:
        proc = subprocess.Popen(
            [str(SCRIPT), "--engines", "2", "--state-dir", str(state / "state"),
             "--config-out", str(cfg_path)],
            stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=ROOT)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    rc = RealCluster({}, {}, proc, state)
    end = time.monotonic() + START_TIMEOUT
    try:
        while True:
            try:
                line = lines.get(timeout=max(0.1, end - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no ready line in {START_TIMEOUT:.0f} s:\n"
                                     + rc.stderr()[-3000:]) from None
            if line is None:
                raise AssertionError(f"vllm-cluster exited ({proc.wait()}):\n"
                                     + rc.stderr()[-3000:])
            rc.lines.append(line)
            if line.startswith(READY):
                rc.info = json.loads(line[len(READY):])
                break
        rc.config = yaml.safe_load(cfg_path.read_text())
        yield rc
    finally:
        leaders = [e["pid"] for e in rc.info.get("engines", [])]
        leaders += [rc.info["controller"]["pid"]] if rc.info.get("controller") else []
        ports = [e["port"] for e in rc.info.get("engines", [])]
        ports += [rc.info["controller"]["port"]] if rc.info.get("controller") else []
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        assert code == 0, rc.stderr()[-3000:]
        left = [pid for pid in leaders if _group_alive(pid)]
        assert not left, f"process groups still alive after SIGTERM: {left}"
        assert not [p for p in ports if _listening(p)], "ports still open after SIGTERM"


# ------------------------------------------------------------------ kvgate in mitmdump

@dataclass
class Gateway:
    proc: subprocess.Popen[str]
    port: int
    admin: int
    dir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def flows(self) -> Path:
        return self.dir / "flows.mitm"

    def post(self, path: str, body: Any) -> requests.Response:
        # Connection: close, or requests leaves the connection open and mitmproxy, still
        # holding it at SIGINT, logs a CancelledError traceback on the way out
        return requests.post(self.url + path, json=body, timeout=120,
                             headers={"Connection": "close"})

    def log(self) -> str:
        return (self.dir / "mitmdump.log").read_text(errors="replace")

    def admin_metrics(self) -> str:
        return requests.get(f"http://127.0.0.1:{self.admin}/metrics", timeout=5).text

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        assert "Traceback" not in self.log(), self.log()[-3000:]


def start_gateway(where: Path, config: dict[str, Any]) -> Gateway:
    """mitmdump with the addon, reverse proxy on a free loopback port (like
    tests/integration/harness.py), its admin port on another."""
    where.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(json.dumps(config))
    cfg["kvcache"]["metrics_port"] = admin = free_port()
    (where / "kvgate.yaml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    args = [str(MITMDUMP), "--listen-host", "127.0.0.1", "-p", str(port),
            "--mode", f"reverse:{cfg['kvcache']['vllm_endpoint']}",
            "-s", str(ADDON), "--set", f"kvcache_config={where / 'kvgate.yaml'}",
            "--set", f"confdir={where / 'mitmproxy'}", "--set", "termlog_verbosity=info",
            "-w", str(where / "flows.mitm")]
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    with open(where / "mitmdump.log", "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, text=True,
                                env=env, cwd=where)
    gw = Gateway(proc, port, admin, where)
    wait_port(port)
    end = time.monotonic() + 15
    while "[kvcache] config" not in gw.log() and time.monotonic() < end:
        assert proc.poll() is None, gw.log()
        time.sleep(0.05)
    return gw


def gateway_config(cluster: RealCluster, **kv: Any) -> dict[str, Any]:
    """The config vllm-cluster printed, with a request-path budget that a busy 2-core
    machine meets (tokenize on a miss + /lookup)."""
    cfg = json.loads(json.dumps(cluster.config))
    cfg["kvcache"]["lookup_routing_timeout"] = "5s"
    cfg["kvcache"].update(kv)
    return cfg


@pytest.fixture(scope="module")
def gateway(cluster: RealCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path_factory.mktemp("gateway"), gateway_config(cluster))
    yield gw
    gw.stop()


# ------------------------------------------------------------------ engines and controller

def post(url: str, body: Any, timeout: float = 120) -> requests.Response:
    return requests.post(url, json=body, timeout=timeout)


def tokens_of(cluster: RealCluster, body: dict[str, Any]) -> list[int]:
    r = post(cluster.url(cluster.ids[0]) + "/tokenize", {"model": cluster.model, **body})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def lookup(cluster: RealCluster, tokens: list[int]) -> dict[str, Any]:
    r = post(cluster.ctl + "/lookup", {"tokens": tokens}, 10)
    assert r.status_code == 200, r.text
    return r.json()["layout_info"]


def wait_holder(cluster: RealCluster, tokens: list[int], eid: str, timeout: float = 30) -> int:
    """Wait until the controller says ``eid`` holds a prefix of ``tokens``; its length."""
    end = time.monotonic() + timeout
    layout: dict[str, Any] = {}
    while time.monotonic() < end:
        layout = lookup(cluster, tokens)
        if eid in layout and layout[eid][1] > 0:
            return layout[eid][1]
        time.sleep(0.2)
    raise AssertionError(f"controller never reported {eid} holding the tokens: {layout}")


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})? (\S+)$", re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def samples(metrics_text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [(dict(_LABEL.findall(labels or "")), float(value))
            for n, labels, value in _SAMPLE.findall(metrics_text) if n == name]


def engine_metrics(cluster: RealCluster, eid: str) -> str:
    r = requests.get(cluster.url(eid) + "/metrics", timeout=10)
    assert r.status_code == 200
    return r.text


def counter(cluster: RealCluster, eid: str, name: str, **labels: str) -> float:
    found = [v for lab, v in samples(engine_metrics(cluster, eid), name)
             if all(lab.get(k) == want for k, want in labels.items())]
    assert found, f"{name}{labels} not in {eid}'s /metrics"
    return sum(found)


def wait_counter(cluster: RealCluster, eid: str, name: str, above: float, timeout: float = 10,
                 **labels: str) -> float:
    """vLLM's frontend updates its counters just after the answer: poll a little."""
    end = time.monotonic() + timeout
    value = counter(cluster, eid, name, **labels)
    while value <= above and time.monotonic() < end:
        time.sleep(0.1)
        value = counter(cluster, eid, name, **labels)
    return value


def prompt_totals(cluster: RealCluster) -> dict[str, float]:
    return {eid: counter(cluster, eid, "vllm:prompt_tokens_total") for eid in cluster.ids}


def served_by(cluster: RealCluster, before: dict[str, float], prompt_tokens: int) -> str:
    """Which engine's own prompt-token counter grew by this request's prompt: the engine
    that really served it (not just the one kvgate's header names)."""
    end = time.monotonic() + 10
    while True:
        now = prompt_totals(cluster)
        grew = [eid for eid in cluster.ids if now[eid] - before[eid] == prompt_tokens]
        if len(grew) == 1 or time.monotonic() > end:
            assert len(grew) == 1, (before, now, prompt_tokens)
            return grew[0]
        time.sleep(0.1)


def reset_prefix_cache(cluster: RealCluster, eid: str) -> None:
    r = requests.post(cluster.url(eid) + "/reset_prefix_cache", timeout=30)
    assert r.status_code == 200, f"reset_prefix_cache: {r.status_code} (VLLM_SERVER_DEV_MODE?)"


def chat(cluster: RealCluster, messages: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    return {"model": cluster.model, "messages": messages, "max_tokens": 8, "temperature": 0,
            **kw}


def completion(cluster: RealCluster, prompt: Any, **kw: Any) -> dict[str, Any]:
    return {"model": cluster.model, "prompt": prompt, "max_tokens": 4, "temperature": 0, **kw}


# ------------------------------------------------------------------ the tests

def test_lmcache_cpu_connector_matches_vllm_cpu_kv_layout(tmp_path: Path) -> None:
    """Our LMCache connector reads and writes K and V per token where vLLM's CPU kernel
    puts them (tests/vllm/connector_layout_check.py, run in .venv-vllm)."""
    require_vllm_venv()
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update({"PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path),
                "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "HF_HUB_OFFLINE": "1",
                "LMCACHE_TRACK_USAGE": "false", "DO_NOT_TRACK": "1"})
    run = subprocess.run([str(ROOT / ".venv-vllm" / "bin" / "python"),
                          str(Path(__file__).parent / "connector_layout_check.py")],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stderr[-3000:]


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
        assert got["chunks"] >= 3, key  # streamed: role/text chunks, then the usage chunk
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
