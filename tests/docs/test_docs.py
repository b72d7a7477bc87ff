"""The docs cannot drift from the code: every command shown in the README and in docs/
(their ``sh`` blocks) is run here in its quick form, or names the test that runs it, and
every config example there loads.

A command no entry of ``COVERED`` matches fails ``test_every_command_shown_is_exercised``:
a new command in the docs needs a test before it lands.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from kvgate.config import from_mapping
from kvgate.sim.ports import free_port, free_ports, wait_port
from kvgate.sim.run import stop

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BIN = Path(sys.executable).parent
ENV = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}

# (page, pattern of a command shown there) -> what exercises it: a test of this module
# (run by pytest with it), "path::name" of a test elsewhere, or why it cannot run here
COVERED: list[tuple[str, str, str]] = [
    ("README.md", r"^scripts/demo( |$)(?!--real)", "test_demo_quick"),
    ("README.md", r"^scripts/test( |$)", "it is the suite itself (.ci/run runs it)"),
    ("README.md", r"^scripts/setup ", "test_simulated_quick_start"),
    ("*", r"^(\.venv/bin/)?kvgate-sim cluster --engines 3 --base-port 8001 "
          r"--controller-port 9000( |$)", "test_simulated_quick_start"),
    ("*", r"^mitmdump --listen-host 127\.0\.0\.1 --mode reverse:http://127\.0\.0\.1:8001 "
          r"-s addon/kvcache\.py --set kvcache_config=configs/kvgate\.yaml",
     "test_simulated_quick_start"),
    ("README.md", r"^curl -s http://127\.0\.0\.1:8080/v1/completions",
     "test_simulated_quick_start"),
    ("*", r"^scripts/vllm-cluster( |$)", "tests/vllm/conftest.py::cluster"),
    ("README.md", r"^mitmdump --listen-host 127\.0\.0\.1 --mode reverse:http://127\.0\.0\.1:8101",
     "tests/vllm/vllm_harness.py::start_gateway"),
    ("*", r"^scripts/demo --real", "test_demo_real_quick"),
    ("real-vllm.md", r"^\.venv/bin/python -m pytest .* tests/vllm", "the vllm tier itself"),
    ("real-vllm.md", r"^PYTHONHASHSEED=0 ", "needs a GPU fleet: the CPU stack of the same "
                                            "versions runs in tests/vllm"),
    ("real-vllm.md", r"^mitmdump --mode reverse:http://10\.", "needs a GPU fleet"),
    ("debugging.md", r".",
     "tests/integration/test_debugging_doc.py::test_the_debugging_page_runs_as_written"),
    ("*", r"^kvgate-sim cluster .*--real-controller", "test_sim_real_controller_command"),
    ("*", r"^kvgate-sim (engine|controller) ", "test_sim_commands"),
    ("*", r"^scripts/bench --real", "tests/vllm/test_real_commands.py::test_bench_real_quick"),
    ("*", r"^scripts/bench --quick", "test_bench_quick"),
    ("*", r"^scripts/bench( |$)(?!--quick)", "test_bench_quick"),
    ("*", r"^scripts/bench_overhead", "test_benchmark_scripts_quick"),
    ("*", r"^scripts/bench_instructions", "test_benchmark_scripts_quick"),
    ("hardening.md", r"^\.venv/bin/python scripts/bench_(long_prompts|memory|framing|engine_kill)",
     "test_benchmark_scripts_quick"),
    ("*", r"^\.venv/bin/python scripts/mitmweb_screenshot\.py",
     "tests/integration/test_mitmweb_llm_view.py::test_the_screenshot_command_of_the_docs"),
]


def _blocks(page: Path, langs: tuple[str, ...]) -> Iterator[str]:
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", page.read_text(), re.S | re.M):
        if m.group(1) in langs:
            yield m.group(2)


def shown_commands() -> list[tuple[str, str]]:
    """(page, command) for every command line of every sh block; continuation lines are
    joined, comments and here-document bodies dropped."""
    out = []
    for page in PAGES:
        for block in _blocks(page, ("sh", "bash", "shell")):
            lines = iter(block.splitlines())
            cmd = ""
            for line in lines:
                if not cmd and (not line.strip() or line.lstrip().startswith("#")):
                    continue
                cmd += line.rstrip().rstrip("\\").rstrip() + " "
                heredoc = re.search(r"<<-?'?(\w+)'?", line)
                if heredoc:  # its body is data, not commands
                    for body in lines:
                        if body.strip() == heredoc.group(1):
                            break
                if not line.rstrip().endswith("\\"):
                    out.append((page.name, re.sub(r"\s+", " ", cmd.split(" #")[0]).strip()))
                    cmd = ""
    return out


def _covering(page: str, cmd: str) -> str | None:
    for where, pattern, by in COVERED:
        if where in ("*", page) and re.search(pattern, cmd):
            return by
    return None


def test_every_command_shown_is_exercised() -> None:
    commands = shown_commands()
    assert len(commands) > 15  # the parser found the docs' commands
    missing = [(p, c) for p, c in commands if _covering(p, c) is None]
    assert missing == [], "commands shown in the docs that no test exercises"
    for _, _, by in COVERED:  # every named test exists
        if by.startswith("test_"):
            assert by in globals(), by
        elif "::" in by:
            path, name = by.split("::")
            assert re.search(rf"\bdef {name}\b", (ROOT / path).read_text()), by


def test_every_config_example_loads(tmp_path: Path) -> None:
    """Every yaml block is valid YAML; the kvgate-shaped ones load as configs (a fragment
    under ``kvcache:`` with the README's cluster beside it). A tokenizer folder an example
    names (a GPU host's /models/...) is the one thing moved: to a folder that exists."""
    loaded = 0
    for page in PAGES:
        for block in _blocks(page, ("yaml", "yml")):
            doc = yaml.safe_load(block)
            if not isinstance(doc, dict):
                continue
            kv = doc.get("kvcache")
            if isinstance(kv, dict) and isinstance(kv.get("tokenizers"), dict):
                kv["tokenizers"] = {m: str(tmp_path) for m in kv["tokenizers"]}
            if "clusters" not in doc and "kvcache" in doc:
                doc["clusters"] = [{"name": "c", "endpoints": [
                    {"id": "e", "socket_address": {"address": "127.0.0.1", "port": 1}}]}]
            if "kvcache" in doc or "http_filters" in doc or "static_resources" in doc:
                from_mapping(doc, str(ROOT / "configs" / "x.yaml"))
                loaded += 1
    for name in ("kvgate.yaml", "ai_kvcache_config.yaml"):
        from_mapping(yaml.safe_load((ROOT / "configs" / name).read_text()))
    assert loaded >= 1


# ---------------------------------------------------------------- run here, quick forms


def _run(cmd: list[str] | str, timeout: float, **kw: object) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout, shell=isinstance(cmd, str), **kw)  # type: ignore


def _stop(proc: subprocess.Popen) -> None:
    stop(proc, 15)


def test_simulated_quick_start(tmp_path: Path) -> None:
    """The README's first quick start, on free ports: the simulated cluster, mitmdump with
    configs/kvgate.yaml (which names that cluster: its ports are rewritten) and the curl."""
    assert _run("scripts/setup", 600).returncode == 0
    cfg = (ROOT / "configs" / "kvgate.yaml").read_text()
    assert all(f"port: {p}" in cfg for p in (8001, 8002, 8003)) and ":9000" in cfg
    base, ctl, port = free_port(), free_port(), free_port()
    while any(p in range(base, base + 3) for p in (ctl, port)) or base + 2 > 65535:
        base = free_port()
    sim_out = tmp_path / "sim.yaml"
    with open(sim_out, "w") as out:
        sim = subprocess.Popen([str(BIN / "kvgate-sim"), "cluster", "--engines", "3",
                                "--base-port", str(base), "--controller-port", str(ctl)],
                               cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    gw = None
    try:
        for p in (base, base + 1, base + 2, ctl):
            wait_port(p, 30)
        for old, new in ((8001, base), (8002, base + 1), (8003, base + 2), (9000, ctl)):
            cfg = cfg.replace(str(old), str(new))
        (tmp_path / "kvgate.yaml").write_text(cfg)
        gw = subprocess.Popen([str(BIN / "mitmdump"), "--listen-host", "127.0.0.1", "-p",
                               str(port), "--mode", f"reverse:http://127.0.0.1:{base}", "-s",
                               "addon/kvcache.py", "--set",
                               f"kvcache_config={tmp_path / 'kvgate.yaml'}"],
                              cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
        wait_port(port, 30)
        time.sleep(1.0)
        got = _run(f"curl -s http://127.0.0.1:{port}/v1/completions -H "
                   "'content-type: application/json' -d '{\"model\": \"sim-8b\", \"prompt\": "
                   "\"Hello\", \"max_tokens\": 8}'", 30)
        answer = json.loads(got.stdout)
        assert answer["choices"][0]["text"] and answer["usage"]["prompt_tokens"] > 0
        assert "kvcache:" in sim_out.read_text()  # it printed its config
    finally:
        if gw is not None:
            _stop(gw)
        _stop(sim)


def test_sim_commands(tmp_path: Path) -> None:
    """docs/simulator.md: a controller and an engine on their own, on free ports."""
    ctl, eng = free_ports(2)
    procs = [subprocess.Popen([str(BIN / "kvgate-sim"), "controller", "--port", str(ctl)],
                              cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)]
    try:
        wait_port(ctl, 30)
        procs.append(subprocess.Popen(
            [str(BIN / "kvgate-sim"), "engine", "--id", "vllm-1", "--port", str(eng),
             "--controller-url", f"http://127.0.0.1:{ctl}"], cwd=ROOT, env=ENV,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(eng, 30)
        r = requests.post(f"http://127.0.0.1:{eng}/v1/completions",
                          json={"model": "sim-8b", "prompt": "w1 " * 300, "max_tokens": 2},
                          timeout=10)
        assert r.status_code == 200
        toks = requests.post(f"http://127.0.0.1:{eng}/tokenize", json={"prompt": "w1 " * 300},
                             timeout=10).json()["tokens"]
        for _ in range(50):
            layout = requests.post(f"http://127.0.0.1:{ctl}/lookup", json={"tokens": toks},
                                   timeout=10).json()["layout_info"]
            if layout:
                break
            time.sleep(0.1)
        assert layout["vllm-1"][1] >= 256
    finally:
        for p in procs:
            _stop(p)


@pytest.mark.lmcache
def test_sim_real_controller_command() -> None:
    """docs/simulator.md's --real-controller cluster starts, registered with lmcache."""
    if not (ROOT / ".venv-lmcache" / ".kvgate-lmcache-0.5.6").exists() and not os.environ.get(
            "CI"):
        pytest.skip("scripts/lmcache-controller --install-only first")
    base, ctl = free_port(), free_port()
    proc = subprocess.Popen([str(BIN / "kvgate-sim"), "cluster", "--engines", "1",
                             "--base-port", str(base), "--controller-port", str(ctl),
                             "--real-controller"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_port(ctl, 120)
        wait_port(base, 120)
        end = time.monotonic() + 60
        infos: list = []
        while time.monotonic() < end and not infos:
            with contextlib.suppress(requests.RequestException, ValueError):
                infos = requests.post(f"http://127.0.0.1:{ctl}/query_worker_info",
                                      json={"instance_id": "all"}, timeout=5).json().get(
                    "worker_infos", [])
            time.sleep(0.5)
        assert [w["instance_id"] for w in infos] == ["vllm-1"]
    finally:
        _stop(proc)


def test_demo_quick(tmp_path: Path) -> None:
    got = _run(["scripts/demo", "--conversations", "8", "--turns", "3", "--out",
                str(tmp_path)], 300)
    assert got.returncode == 0, got.stdout[-2000:] + got.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["kvgate"]["prefix_hit_ratio"] > summary["round_robin"]["prefix_hit_ratio"]
    assert (tmp_path / "summary.png").exists()


@pytest.mark.vllm
def test_demo_real_quick(tmp_path: Path) -> None:
    """scripts/demo --real on its own two engines (before the vllm tier starts its own):
    it runs, every request succeeds and kvgate's hit ratio leads. TTFT in a run this short
    on a shared machine is the demo's to report, not this test's to assert."""
    if not (ROOT / ".venv-vllm" / ".kvgate-vllm").exists() and not os.environ.get("CI"):
        pytest.skip("scripts/vllm-cluster --install-only first")
    got = _run(["scripts/demo", "--real", "--conversations", "4", "--turns", "3", "--out",
                str(tmp_path)], 600)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["kvgate"]["failed"] == 0 and summary["round_robin"]["failed"] == 0, got.stdout
    assert summary["kvgate"]["prefix_hit_ratio"] > summary["round_robin"]["prefix_hit_ratio"]
    assert summary["kvgate"]["ran_on"].startswith("vLLM ")  # the line saying where it ran


def test_bench_quick(tmp_path: Path) -> None:
    """scripts/bench's smoke test, quicker still: one workload, kvgate and round robin."""
    got = _run(["scripts/bench", "--quick", "--workloads", "rag", "--routers",
                "round_robin,kvgate", "--seconds", "2", "--capacity-seconds", "1", "--out",
                str(tmp_path), "--dump-requests"], 600)
    assert got.returncode == 0, got.stdout[-2000:] + got.stderr[-2000:]
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert {r["router"] for r in runs} == {"round_robin", "kvgate"}
    assert all(r["failed"] == 0 and r["requests"] > 0 for r in runs)
    assert (tmp_path / "ttft_p99_vs_load.png").exists()
    # the request dumps, and the hindsight replay over them (docs/bench/README.md)
    dumps = sorted(p.name for p in (tmp_path / "requests").iterdir())
    assert dumps == ["rag-80-kvgate-0.jsonl", "rag-80-round_robin-0.jsonl"]
    requests = sum(r["requests"] for r in runs if r["router"] == "kvgate")
    assert len((tmp_path / "requests" / dumps[0]).read_text().splitlines()) == requests + 1
    got = _run([".venv/bin/python", "scripts/bench_hindsight.py", str(tmp_path / "requests"),
                "--copies", "1"], 120)
    assert got.returncode == 0, got.stdout[-2000:] + got.stderr[-2000:]
    assert "### rag 80%, repeat 0" in got.stdout and "| kvgate |" in got.stdout
    assert re.search(r"^\| 1 \| 0\.\d{4} \|", got.stdout, re.M), got.stdout  # one copy


QUICK_BENCHES = [
    ["scripts/bench_overhead", "--seconds", "0.3", "--repeats", "1", "--connections", "1"],
    [".venv/bin/python", "scripts/bench_long_prompts.py", "--repeats", "1", "--sizes", "1k"],
    [".venv/bin/python", "scripts/bench_memory.py", "distinct", "--prompts", "200"],
    [".venv/bin/python", "scripts/bench_memory.py", "distinct", "--prompts", "100", "--bare"],
    [".venv/bin/python", "scripts/bench_memory.py", "flood", "--prompts", "2", "--mib", "1"],
    [".venv/bin/python", "scripts/bench_framing.py", "--calls", "50,150"],
    [".venv/bin/python", "scripts/bench_engine_kill.py", "--runs", "1", "--seconds", "2"],
    ["scripts/bench_instructions", "--requests", "10", "--cases", "reused",
     "--idle-seconds", "1"],
    [".venv/bin/python", "scripts/bench_hooks.py", "--instructions", "--requests", "20"],
]


@pytest.mark.parametrize("argv", QUICK_BENCHES,
                         ids=[" ".join(a[1:3] if a[0].endswith("python") else a[:1])
                              for a in QUICK_BENCHES])
def test_benchmark_scripts_quick(argv: list[str]) -> None:
    """The benchmarks the docs show, in their quick forms: they run and print a result."""
    callgrind = (argv[0] == "scripts/bench_instructions" or "scripts/bench_framing.py" in argv
                 or "--instructions" in argv)
    if callgrind and not _run("command -v valgrind", 10).stdout:
        pytest.skip("valgrind is not installed")
    got = _run(argv, 900)
    assert got.returncode == 0, got.stdout[-2000:] + got.stderr[-2000:]
    assert re.search(r"\d", got.stdout)
