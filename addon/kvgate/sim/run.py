"""Start mitmdump with the kvgate addon for a config: shared by the demo and the benchmark."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .ports import free_port, wait_port

ROOT = Path(__file__).resolve().parents[3]


@contextmanager
def gateway(cfg: dict[str, Any], upstream: str) -> Iterator[int]:
    """mitmdump (reverse proxy to ``upstream``, quiet) with the addon; yields its port."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kvgate.json"
        path.write_text(json.dumps(cfg))  # JSON is YAML
        port = free_port()
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mitmdump"), "-q", "--listen-host", "127.0.0.1",
             "-p", str(port), "--mode", f"reverse:{upstream}",
             "-s", str(ROOT / "addon" / "kvcache.py"), "--set", f"kvcache_config={path}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            wait_port(port)
            time.sleep(1.0)  # the script loads just after the listener opens
            yield port
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
