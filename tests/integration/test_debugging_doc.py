"""docs/debugging.md, run: every ``bash`` block of the page, in order, on free ports
(the page's 8001-8003, 9000, 8080 and 8081 and its /tmp files replaced), and what the page
says one sees, checked: the SDK's output, the flows' comments in mitmweb, the LLM view
through mitmweb's API, each filter of its table, and the saved flows read back by
mitmdump. (The screenshot command is run by test_mitmweb_llm_view.py.)"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import kvgate_tracebacks
from mitmproxy import io as mitmio

from harness import free_port, wait_port

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "debugging.md"

pytestmark = pytest.mark.integration


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```$", text, flags=re.S | re.M)


def _three_free_ports() -> int:
    """A base port with it and the next two free (the simulated cluster's engines)."""
    for _ in range(200):
        base = free_port()
        if base > 65000:
            continue
        socks = []
        try:
            for p in range(base, base + 3):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no three consecutive free ports")


class Shell:
    """The page's commands as a reader runs them: long-running ones in the background."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.background: list[subprocess.Popen[bytes]] = []
        # clients must reach the proxy we name, not one from this machine's environment
        self.env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}

    def start(self, command: str, name: str) -> Path:
        log = self.tmp / f"{name}.log"
        with open(log, "wb") as out:
            self.background.append(subprocess.Popen(
                ["bash", "-c", command], cwd=ROOT, env=self.env, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True))
        return log

    def run(self, command: str, timeout: float = 60) -> str:
        done = subprocess.run(["bash", "-c", command], cwd=ROOT, env=self.env, timeout=timeout,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        """Ctrl-C to the command's process group, as in its terminal."""
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)

    def close(self) -> None:
        for proc in self.background:
            self.stop(proc)


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[Shell]:
    sh = Shell(tmp_path)
    yield sh
    sh.close()


def _wait_for(path: Path, text: str, timeout: float = 30) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content:
            return content
        time.sleep(0.1)
    raise TimeoutError(f"{text!r} never appeared in {path}")


def test_the_debugging_page_runs_as_written(shell: Shell, tmp_path: Path) -> None:
    doc = DOC.read_text()
    base = _three_free_ports()
    ports = {"8001": base, "8002": base + 1, "8003": base + 2, "9000": free_port(),
             "8080": free_port(), "8081": free_port()}
    files = {"/tmp/kvgate-sim.yaml": tmp_path / "sim.yaml",
             "/tmp/kvgate-flows.mitm": tmp_path / "flows.mitm"}

    def local(command: str) -> str:
        for old, new in files.items():
            command = command.replace(old, str(new))
        return re.sub(r"(?<!\d)(8001|8002|8003|9000|8080|8081)(?!\d)",
                      lambda m: str(ports[m.group(1)]), command)

    sim, web, sdk, curl, read = bash_blocks(doc)
    assert "kvgate-sim cluster" in sim and "mitmweb" in web and "openai" in sdk
    assert curl.startswith("curl") and read.startswith(".venv/bin/mitmdump -n -r")

    shell.start(local(sim), "sim")
    _wait_for(files["/tmp/kvgate-sim.yaml"], "socket_address")
    web_log = shell.start(local(web), "mitmweb")
    mitmweb = shell.background[-1]
    wait_port(ports["8081"], 30)
    _wait_for(web_log, "[kvcache] config")

    out = shell.run(local(sdk))
    for line in ("Why does the WAN light blink? -> t0 t1 t2 t3 t4 t5 t6 t7",
                 "How do I reset it? -> t0 t1 t2 t3 t4 t5 t6 t7"):
        assert line in out and line.split(" -> ")[1] in doc
    assert json.loads(shell.run(local(curl)))["choices"][0]["text"] == "t0 t1 t2 t3"

    api = f"http://127.0.0.1:{ports['8081']}"
    flows = requests.get(f"{api}/flows", timeout=10).json()
    comments = [f["comment"] for f in flows]
    assert len(flows) == 3 and "three flows" in doc
    for seen, claim in zip(comments, ("kvcache: balancer -> vllm-1 (no cached prefix)",
                                      "kvcache: cache -> vllm-1 (256 cached tokens)"),
                           strict=False):
        assert seen == claim and f"`{claim}`" in doc
    assert comments[2].startswith("kvcache: ")  # the curl call: routed too
    view = requests.get(f"{api}/flows/{flows[1]['id']}/response/content/Auto.json",
                        timeout=10).json()
    text = "\n".join("".join(t for _, t in line) for line in view["lines"])
    for claim in ("t0 t1 t2 t3 t4 t5 t6 t7", "prompt 323 (cached 304)"):
        assert claim in text and f"`{claim}`" in doc
    assert "first after" in text and "route       cache" in text

    # the page's filter table, each filter run by mitmweb on these flows
    to = {f["id"]: f["comment"].split("-> ")[1].split(" ")[0] for f in flows}
    ids = [f["id"] for f in flows]
    expected = {
        "~marked": [],  # nothing fell back here
        '~comment "kvcache: fallback"': [],
        "~comment kvcache": ids,
        "!~comment kvcache": [],
        '~comment "-> vllm-2"': [i for i in ids if to[i] == "vllm-2"],
        '~comment "kvcache: cache"': [ids[1]],
        "~u /v1/chat/completions": ids[:2],
    }
    table = re.findall(r"^\| `([^`]+)` \|", doc, flags=re.M)
    assert table and set(table) <= set(expected), table
    for expr, want in expected.items():
        assert expr in doc, expr
        dump = requests.get(f"{api}/flows/dump", params={"filter": expr}, timeout=10)
        assert dump.status_code == 200, expr
        assert [f.id for f in mitmio.FlowReader(io.BytesIO(dump.content)).stream()] == want, expr

    shell.stop(mitmweb)  # the page: stop mitmweb first, so that the file is complete
    log = web_log.read_text(errors="replace")
    assert not kvgate_tracebacks(log) and "content viewer failed" not in log, log[-3000:]
    read_out = shell.run(local(read))
    assert "answer      t0 t1 t2 t3 t4 t5 t6 t7" in read_out
    assert "user        How do I reset it?" in read_out
    assert "kvgate      vllm-1 (cluster vllm)" in read_out
