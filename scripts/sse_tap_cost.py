"""What keeping streamed answers for the LLM view costs (``kvcache_keep_streamed``).

1. In-process: the tap's own time per chunk (below its cap: copied; past it: counted).
2. End to end: one simulated engine streaming long answers with no modelled delay (every
   event written and flushed on its own), through mitmdump with the addon in pass-through
   (no kvcache_config: only the streaming path differs), the tap on (1m) and off (0),
   interleaved rounds. Per stream: wall time and time to the first byte.

  .venv/bin/python scripts/sse_tap_cost.py [--streams 20] [--events 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "addon"))
from kvgate.observability.llm_view import StreamTap  # noqa: E402
from kvgate.sim.engine import EngineParams, SimEngine  # noqa: E402
from kvgate.sim.ports import free_port, wait_port  # noqa: E402

MITMDUMP = Path(sys.executable).parent / "mitmdump"


class _Data:
    content: bytes | None = None


def in_process(chunks: int = 200_000, size: int = 120) -> dict[str, float]:
    """ns per call: a plain pass-through function, the tap below its cap, past its cap."""
    chunk = b"x" * size

    def plain(c: bytes) -> bytes:
        return c

    out = {}
    for name, fn in (("pass-through function", plain),
                     ("tap, copying", StreamTap(_Data(), {}, 1 << 40)),
                     ("tap, past its cap", StreamTap(_Data(), {}, 0))):
        t = time.perf_counter()
        for _ in range(chunks):
            fn(chunk)
        out[name] = (time.perf_counter() - t) / chunks * 1e9
    return out


def _mitmdump(engine_port: int, keep: str, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    args = [str(MITMDUMP), "--listen-host", "127.0.0.1", "-p", str(port), "-q",
            "--mode", f"reverse:http://127.0.0.1:{engine_port}", "-s",
            str(ROOT / "addon" / "kvcache.py"), "--set", f"kvcache_keep_streamed={keep}"]
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    proc = subprocess.Popen(args, cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_port(port)
    time.sleep(0.5)  # the script loads after the listener opens
    return proc, port


def _stream(port: int, events: int) -> tuple[float, float, int]:
    body = {"model": "sim-8b", "prompt": "hello", "max_tokens": events, "stream": True}
    t0 = time.perf_counter()
    first = None
    size = 0
    with requests.post(f"http://127.0.0.1:{port}/v1/completions", json=body, stream=True,
                       timeout=60) as r:
        for chunk in r.iter_content(chunk_size=None):
            if first is None:
                first = time.perf_counter() - t0
            size += len(chunk)
    return time.perf_counter() - t0, first or 0.0, size


def end_to_end(streams: int, events: int, rounds: int) -> dict[str, dict[str, float]]:
    engine = SimEngine("vllm-1", EngineParams(time_scale=0.0, max_output=events))
    engine_port = engine.start(0)
    walls: dict[str, list[float]] = {"1m": [], "0": []}
    firsts: dict[str, list[float]] = {"1m": [], "0": []}
    sizes: list[int] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(rounds):
                for keep in ("1m", "0"):
                    proc, port = _mitmdump(engine_port, keep, Path(tmp))
                    try:
                        _stream(port, events)  # warm-up
                        for _ in range(streams):
                            wall, first, size = _stream(port, events)
                            walls[keep].append(wall)
                            firsts[keep].append(first)
                            sizes.append(size)
                    finally:
                        proc.send_signal(signal.SIGINT)
                        proc.wait(10)
    finally:
        engine.stop()
    return {keep: {"streams": len(walls[keep]),
                   "wall_ms_median": statistics.median(walls[keep]) * 1000,
                   "first_byte_ms_median": statistics.median(firsts[keep]) * 1000,
                   "bytes_per_stream": statistics.median(sizes)}
            for keep in walls}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=20)
    ap.add_argument("--events", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    for name, ns in in_process().items():
        print(f"{name:<24} {ns:7.0f} ns a chunk")
    for keep, row in end_to_end(args.streams, args.events, args.rounds).items():
        print(f"kvcache_keep_streamed={keep:<3} {row['streams']} streams of "
              f"{row['bytes_per_stream'] / 1024:.0f} KiB ({args.events} events): "
              f"median {row['wall_ms_median']:.1f} ms, first byte "
              f"{row['first_byte_ms_median']:.1f} ms")


if __name__ == "__main__":
    main()
