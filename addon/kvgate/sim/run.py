"""Start mitmdump with the kvgate addon for a config: shared by the demo and the benchmark."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .ports import free_port

ROOT = Path(__file__).resolve().parents[3]


READY_LINE = "[kvcache] config"  # the addon logs it once its config is loaded


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_ready(proc: subprocess.Popen[bytes], log_path: Path, port: int,
               timeout: float = 15.0) -> None:
    """Poll (bounded) until mitmdump listens *and* the addon has loaded its config.

    The listener opens before the script loads, and requests in that gap would bypass
    kvgate; a fixed sleep is either too short on a loaded machine or wasted time.
    """
    end = time.monotonic() + timeout
    while True:
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        if READY_LINE in text and _accepts(port):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"mitmdump exited ({proc.returncode}): {text[-2000:]}")
        if time.monotonic() >= end:
            raise TimeoutError(f"kvgate not loaded after {timeout:.0f} s: {text[-2000:]}")
        time.sleep(0.05)


@contextmanager
def gateway(cfg: dict[str, Any], upstream: str) -> Iterator[int]:
    """mitmdump (reverse proxy to ``upstream``, quiet) with the addon; yields its port."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kvgate.json"
        path.write_text(json.dumps(cfg))  # JSON is YAML
        log_path = Path(tmp) / "mitmdump.log"
        port = free_port()
        with open(log_path, "wb") as log:  # info level for the ready line, no flow lines
            proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "mitmdump"), "--listen-host", "127.0.0.1",
                 "-p", str(port), "--mode", f"reverse:{upstream}",
                 "--set", "flow_detail=0", "--set", "termlog_verbosity=info",
                 "-s", str(ROOT / "addon" / "kvcache.py"), "--set", f"kvcache_config={path}"],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_ready(proc, log_path, port)
            yield port
        finally:
            stop(proc)


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGINT (mitmproxy and the simulator shut down cleanly on it), then a kill."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
