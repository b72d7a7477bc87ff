"""Simulator review fixes: report order, the KV usage gauge, reporter shutdown, heartbeats."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

from kvgate.sim.cache import BLOCK, CHUNK
from kvgate.sim.cli import start_on_free_ports
from kvgate.sim.engine import EngineParams, SimEngine
from kvgate.sim.twin import TwinReporter

ROOT = Path(__file__).resolve().parents[2]
LMCACHE_PY = ROOT / ".venv-lmcache" / "bin" / "python"


def _metric(text: str, name: str) -> float:
    return float(re.search(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", text, re.M).group(1))


class ReplayReporter:
    """Applies reports in arrival order, as a controller does; notes any sent unlocked."""

    def __init__(self) -> None:
        self.engine: SimEngine | None = None
        self.held: set[int] = set()
        self.unlocked = 0

    def report(self, admitted: list[int], evicted: list[int]) -> None:
        assert self.engine is not None
        if not self.engine.cache_lock.locked():
            self.unlocked += 1
        time.sleep(0)  # let other request threads run, as a real reporter's put may
        self.held.update(admitted)
        self.held.difference_update(evicted)


def test_reports_keep_the_cache_order_under_concurrency() -> None:
    reporter = ReplayReporter()
    engine = SimEngine("e", EngineParams(time_scale=0.0, gpu_tokens=BLOCK,
                                         cpu_tokens=3 * CHUNK), reporter)
    reporter.engine = engine
    port = engine.start()
    url = f"http://127.0.0.1:{port}/v1/completions"
    errors: list[BaseException] = []

    def client(k: int) -> None:
        try:
            with requests.Session() as s:
                s.trust_env = False
                for i in range(15):  # a few shared prefixes, so keys come and go again
                    prompt = " ".join(f"c{(k + i) % 5}w{j}" for j in range(CHUNK + 40))
                    s.post(url, json={"prompt": prompt}, timeout=10).raise_for_status()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        assert reporter.unlocked == 0
        with engine.cache_lock:
            assert reporter.held == set(engine.cache.cpu)  # the controller's view is right
        engine.action({"op": "clear"})
        assert reporter.unlocked == 0 and reporter.held == set()
    finally:
        engine.stop()


def test_kv_cache_usage_counts_running_requests_not_the_warm_cache() -> None:
    gpu = 10_000
    engine = SimEngine("e", EngineParams(gpu_tokens=gpu, prefill_ms=2.0, decode_ms=0.0,
                                         max_output=4, time_scale=1.0))
    port = engine.start()
    url = f"http://127.0.0.1:{port}"
    prompt = " ".join(f"u{i}" for i in range(300))  # 300 + 4 tokens: 19 blocks
    try:
        with engine.cache_lock:
            engine.cache.serve(list(range(2000)))
        text = requests.get(url + "/metrics", timeout=5).text
        assert engine.cache.gpu_used > 0.15 * gpu  # the prefix cache is warm...
        assert _metric(text, "vllm:kv_cache_usage_perc") == 0  # ...but nothing runs
        done = threading.Thread(target=requests.post, args=(url + "/v1/completions",),
                                kwargs={"json": {"prompt": prompt}, "timeout": 30})
        done.start()
        end = time.monotonic() + 5
        while time.monotonic() < end:
            text = requests.get(url + "/metrics", timeout=5).text
            if _metric(text, "vllm:num_requests_running") == 1:
                break
            time.sleep(0.01)
        assert _metric(text, "vllm:kv_cache_usage_perc") == pytest.approx(19 * BLOCK / gpu)
        assert _metric(text, "vllm:gpu_cache_usage_perc") == pytest.approx(19 * BLOCK / gpu)
        done.join(30)
        text = requests.get(url + "/metrics", timeout=5).text
        assert _metric(text, "vllm:kv_cache_usage_perc") == 0
    finally:
        engine.stop()


def _twin_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("twin-")]


def test_cluster_stop_ends_reporter_threads() -> None:
    before = len(_twin_threads())
    cluster = start_on_free_ports(2, EngineParams(time_scale=0.0))
    assert len(_twin_threads()) == before + 2
    cluster.stop()
    assert len(_twin_threads()) == before


def test_reporter_stop_sends_what_was_queued_first() -> None:
    reporter = TwinReporter("http://127.0.0.1:9", "r", "http://127.0.0.1:9")  # nothing there
    reporter.report([1], [])
    reporter.stop(timeout=10)
    assert not reporter._thread.is_alive()
    reporter.report([2], [])  # after stop: dropped, never blocks a flush
    assert reporter._q.unfinished_tasks == 0


# A controller that answers the first heartbeat with a FullSyncCommand (what lmcache 0.5.6
# sends after a restart) and the second with an ErrorMsg: each must make the worker
# register again and resend what it holds (as a full sync), then heartbeats go quiet.
FAKE_CONTROLLER = r"""
import json, sys, time
import msgspec, zmq
from lmcache.v1.cache_controller import message as m
from lmcache.v1.cache_controller.commands import FullSyncCommand
from kvgate.sim.lmcache_worker import LMCacheWorker
from kvgate.sim.ports import free_ports

reply, pull, rep = free_ports(3)
ctx = zmq.Context.instance()
router = ctx.socket(zmq.ROUTER); router.bind(f"tcp://127.0.0.1:{reply}")
sink = ctx.socket(zmq.PULL); sink.bind(f"tcp://127.0.0.1:{pull}")
worker = LMCacheWorker("w", "127.0.0.1", reply, pull, rep, lambda req: {},
                       lambda: [11, 22, 33], heartbeat=0.05)
worker.start()
seen, synced, beats = [], [], 0
poller = zmq.Poller(); poller.register(router, zmq.POLLIN); poller.register(sink, zmq.POLLIN)
end = time.monotonic() + 20
while time.monotonic() < end and beats < 6:
    for sock, _ in poller.poll(100):
        if sock is sink:
            msg = msgspec.msgpack.decode(sink.recv(), type=m.Msg)
            seen.append(type(msg).__name__)
            if isinstance(msg, m.FullSyncBatchMsg):
                synced.append(sorted(msg.keys))
            continue
        ident, _, raw = router.recv_multipart()
        msg = msgspec.msgpack.decode(raw, type=m.Msg)
        seen.append(type(msg).__name__)
        if isinstance(msg, m.RegisterMsg):
            ret = m.RegisterRetMsg()
        elif isinstance(msg, m.FullSyncStartMsg):
            ret = m.FullSyncStartRetMsg(sync_id=msg.sync_id, accepted=True)
        else:
            beats += 1
            ret = (m.HeartbeatRetMsg(commands=[FullSyncCommand(reason="controller_restart")])
                   if beats == 1 else m.ErrorMsg(error="who are you") if beats == 2
                   else m.HeartbeatRetMsg())
        router.send_multipart([ident, b"", msgspec.msgpack.encode(ret)])
worker.stop()
alive = [t.name for t in worker._threads if t.is_alive()]
router.close(); sink.close()
print(json.dumps({"seen": seen, "synced": synced, "alive": alive}))
"""


@pytest.mark.skipif(not LMCACHE_PY.exists(), reason="needs .venv-lmcache (real lmcache)")
def test_lmcache_worker_registers_again_when_the_heartbeat_reply_says_so() -> None:
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(ROOT / "addon")}
    out = subprocess.run([str(LMCACHE_PY), "-c", FAKE_CONTROLLER], env=env, timeout=90,
                         capture_output=True, text=True, check=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    seen = [n for n in res["seen"] if n != "BatchedKVOperationMsg"]
    assert seen.count("RegisterMsg") == 3  # first, after the command, after the error
    assert res["synced"] == [[11, 22, 33]] * 3  # each registration resent what is held
    assert seen.count("FullSyncEndMsg") == 3
    assert seen[-3:] == ["HeartbeatMsg"] * 3  # then plain heartbeats: nothing to redo
    assert res["alive"] == []  # stop() joined both loops
