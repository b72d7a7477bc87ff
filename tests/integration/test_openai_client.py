"""End to end with the official openai SDK (in its own venv: the h11 conflict)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from kvgate.sim.cli import Cluster
from kvgate.sim.engine import EngineParams

from harness import free_port, start_mitmdump

ROOT = Path(__file__).resolve().parents[2]
PY = ROOT / ".venv-openai" / "bin" / "python"


def test_openai_sdk_chat_and_completions_through_the_gateway(tmp_path: Path) -> None:
    if not PY.exists():
        pytest.fail("scripts/setup makes .venv-openai; run it first")
    cluster = Cluster(3, free_port(), free_port(), EngineParams(time_scale=0.01, max_output=4))
    cluster.ports = {f"vllm-{i}": free_port() for i in (1, 2, 3)}
    cluster.start()
    gw = start_mitmdump(tmp_path, cluster.config(),
                        mode=f"reverse:{cluster.config()['kvcache']['vllm_endpoint']}")
    try:
        run = subprocess.run([str(PY), str(ROOT / "tests/clients/openai_roundtrip.py"), gw.url],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        out = json.loads(run.stdout)
    finally:
        gw.stop()
        cluster.stop()
    assert out["chat"]["content"] == "t0 t1 t2 t3"
    assert out["chat"]["route"] in ("cache", "balancer")
    assert out["chat"]["prompt_tokens"] > 400
    assert out["chat_stream"]["content"] == "t0 t1 t2 t3"
    # the second turn went where the first left its KV: most of it was cached
    assert out["chat_stream"]["cached_tokens"] >= 400
    assert out["completion"]["text"] == "t0 t1 t2"
    assert out["completion_stream"]["text"] == "t0 t1 t2"
