"""The screenshot of mitmweb's LLM view in the docs (docs/mitmweb-llm-view.png).

Starts a simulated cluster (3 engines, the twin controller) and mitmweb with the addon in
front of it (reverse mode), plays a short streamed chat (two turns: the second is routed
to the engine holding the first), then opens mitmweb in headless Chromium, selects the
second turn's answer, picks the LLM view and saves a screenshot. Stops all it started.

  .venv/bin/python scripts/mitmweb_screenshot.py [--out docs/mitmweb-llm-view.png]

Needs Chromium (Debian: apt-get install -y chromium). The integration test
tests/integration/test_mitmweb_llm_view.py uses the same helpers.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "addon"))
from kvgate.sim.cli import Cluster, start_on_free_ports  # noqa: E402
from kvgate.sim.engine import EngineParams  # noqa: E402
from kvgate.sim.ports import free_port, wait_port  # noqa: E402
from kvgate.sim.run import stop  # noqa: E402

ADDON = ROOT / "addon" / "kvcache.py"
MITMWEB = Path(sys.executable).parent / "mitmweb"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                  "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0"]
# the flow list with kvgate's comment column (one --set per item of a list option)
COLUMNS = [a for c in ("path", "status", "time", "comment")
           for a in ("--set", f"web_columns={c}")]
SYSTEM = ("You are the support assistant of a home-router maker. Answer in two sentences, "
          "cite the manual's section, never ask for the admin password. ") * 12


# ------------------------------------------------------------------ mitmweb


@dataclass
class MitmWeb:
    proc: subprocess.Popen[bytes]
    port: int
    web_port: int
    log_path: Path

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def web(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def api(self, path: str) -> Any:
        r = requests.get(self.web + path, timeout=10)
        r.raise_for_status()
        return r.json()

    def flows(self) -> list[dict[str, Any]]:
        return self.api("/flows")

    def view(self, flow_id: str, message: str, view: str = "LLM") -> tuple[str, str]:
        """A content view of a flow's request or response: (description, text)."""
        d = self.api(f"/flows/{flow_id}/{message}/content/{view}.json")
        return d["description"], "\n".join("".join(t for _, t in line) for line in d["lines"])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop(self.proc)


def start_mitmweb(workdir: Path, config: dict[str, Any], mode: str | None,
                  *extra: str) -> MitmWeb:
    """mitmweb with the addon, its UI on a free loopback port (no browser opened)."""
    cfg = workdir / f"kvgate-{time.monotonic_ns()}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    port, web_port = free_port(), free_port()
    log_path = workdir / f"mitmweb-{port}.log"
    args = [str(MITMWEB), "--listen-host", "127.0.0.1", "-p", str(port),
            "--web-host", "127.0.0.1", "--web-port", str(web_port),
            "--set", "web_open_browser=false", "-s", str(ADDON),
            "--set", f"kvcache_config={cfg}", *extra]
    if mode:
        args += ["--mode", mode]
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=workdir)
    web = MitmWeb(proc, port, web_port, log_path)
    try:
        wait_port(web_port, 30)
        end = time.monotonic() + 15
        while "[kvcache] config" not in web.log() and time.monotonic() < end:
            if proc.poll() is not None:
                raise RuntimeError(f"mitmweb exited:\n{web.log()[-2000:]}")
            time.sleep(0.05)
    except BaseException:
        web.stop()
        raise
    return web


def streamed_chat(base: str, messages: list[dict[str, str]], max_tokens: int = 8) -> str:
    """One streamed chat through the gateway; the answer's text."""
    body = {"model": "sim-8b", "messages": messages, "max_tokens": max_tokens,
            "temperature": 0.2, "stream": True, "stream_options": {"include_usage": True}}
    parts = []
    with requests.post(f"{base}/v1/chat/completions", json=body, stream=True,
                       timeout=30) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    parts.append(choice["delta"].get("content") or "")
    return "".join(parts)


def conversation(base: str) -> list[dict[str, str]]:
    """Two turns of a support chat; returns the second turn's messages."""
    history = [{"role": "system", "content": SYSTEM.strip()},
               {"role": "user", "content": "My router's WAN light blinks orange. Why?"}]
    answer = streamed_chat(base, history)
    history += [{"role": "assistant", "content": answer},
                {"role": "user", "content": "And how do I reset it to factory settings?"}]
    streamed_chat(base, history, max_tokens=12)
    return history


@contextmanager
def simulated(workdir: Path, *extra: str) -> Iterator[tuple[Cluster, MitmWeb]]:
    """A simulated cluster and mitmweb in reverse mode in front of it; both stopped after."""
    cluster = start_on_free_ports(3, EngineParams(time_scale=0.05, max_output=16))
    try:
        cfg = cluster.config()
        web = start_mitmweb(workdir, cfg, f"reverse:{cfg['kvcache']['vllm_endpoint']}",
                            *extra)
        try:
            yield cluster, web
        finally:
            web.stop()
    finally:
        cluster.stop()


# ------------------------------------------------------------------ Chromium


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class _DevTools:
    """Just enough of the Chrome DevTools protocol: call a method, wait for its answer."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.n = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.n += 1
        await self.ws.write_message(json.dumps({"id": self.n, "method": method,
                                                "params": params}))
        while True:
            msg = await self.ws.read_message()
            if msg is None:
                raise RuntimeError("Chromium closed the DevTools connection")
            data = json.loads(msg)
            if data.get("id") == self.n:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return data.get("result", {})

    async def js(self, expression: str) -> Any:
        out = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return out.get("result", {}).get("value")

    async def until(self, expression: str, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if await self.js(f"Boolean({expression})"):
                return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"page never satisfied: {expression}")


# in mitmweb 11.0.2's page: the content view's "View: auto" dropdown, then its menu item
_CONTENT = "document.querySelector('.contentview')"
_OPEN_VIEWS = """(() => {
  const b = [...document.querySelectorAll('.contentview a, .contentview button')]
    .find(e => e.textContent.includes('View:'));
  if (!b) return false; b.click(); return true; })()"""
_PICK = """(() => {
  const a = [...document.querySelectorAll('.dropdown-menu a, a')]
    .find(e => e.textContent.trim().toLowerCase() === '%s');
  if (!a) return false; a.click(); return true; })()"""


async def _session(ws_url: str, size: tuple[int, int]) -> tuple[Any, _DevTools]:
    from tornado.websocket import websocket_connect

    ws = await websocket_connect(ws_url, max_message_size=64 << 20)
    cdp = _DevTools(ws)
    await cdp.call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1],
                   deviceScaleFactor=1, mobile=False)
    return ws, cdp


async def _shoot(ws_url: str, page: str, view: str, out: Path, size: tuple[int, int]) -> str:
    ws, cdp = await _session(ws_url, size)
    try:
        await cdp.call("Page.navigate", url=page)
        await cdp.until(_CONTENT)
        await cdp.until(_OPEN_VIEWS)
        await cdp.until(_PICK % view.lower())
        await cdp.until(f"{_CONTENT}.innerText.includes('View: {view.lower()}')")
        await cdp.until(f"{_CONTENT}.innerText.includes('kvgate')")
        await asyncio.sleep(0.3)  # the last paint
        shot = await cdp.call("Page.captureScreenshot", format="png")
        out.write_bytes(base64.b64decode(shot["data"]))
        return await cdp.js("document.body.innerText")
    finally:
        ws.close()


async def _rows(ws_url: str, pages: list[tuple[str, int]]) -> list[list[str]]:
    ws, cdp = await _session(ws_url, (1280, 760))
    out = []
    try:
        for page, expect in pages:
            # the page reads its URL once, when it loads: a new hash alone would not do
            await cdp.call("Page.navigate", url="about:blank")
            await cdp.call("Page.navigate", url=page)
            rows = "document.querySelectorAll('.flow-table tbody tr[class]')"
            await cdp.until(f"{rows}.length === {expect}")
            await asyncio.sleep(0.3)  # no more rows coming
            out.append(await cdp.js(f"[...{rows}].map(r => r.innerText)"))
        return out
    finally:
        ws.close()


@contextmanager
def _chromium(browser: str | None = None) -> Iterator[str]:
    """Headless Chromium with its DevTools server: the page's websocket URL."""
    browser = browser or chromium()
    if browser is None:
        raise FileNotFoundError("no Chromium (Debian: apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="kvgate-chromium-") as profile:
        port_file = Path(profile) / "DevToolsActivePort"
        with open(Path(profile) / "chromium.log", "wb") as log:
            proc = subprocess.Popen([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                     "about:blank"], stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            end = time.monotonic() + 30
            while not (port_file.exists() and port_file.read_text().strip()):
                if proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError("Chromium did not start its DevTools server")
                time.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                targets = json.load(r)
            yield next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        finally:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the renderers too
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def screenshot(web: MitmWeb, flow_id: str, out: Path, tab: str = "response",
               view: str = "LLM", size: tuple[int, int] = (1280, 760),
               browser: str | None = None) -> str:
    """mitmweb showing a flow's ``tab`` in ``view``, saved as PNG; the page's text."""
    with _chromium(browser) as ws_url:
        page = f"{web.web}/#/flows/{flow_id}/{tab}"
        return asyncio.run(_shoot(ws_url, page, view, out, size))


def flow_rows(web: MitmWeb, searches: dict[str, int],
              browser: str | None = None) -> dict[str, list[str]]:
    """The flow list's rows with each search typed in mitmweb's Search box (the page's
    own filter code), once there are as many rows as expected."""
    pages = [(f"{web.web}/#/flows?s={urllib.parse.quote(s)}", n) for s, n in searches.items()]
    with _chromium(browser) as ws_url:
        return dict(zip(searches, asyncio.run(_rows(ws_url, pages)), strict=True))


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "mitmweb-llm-view.png")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kvgate-shot-") as tmp, \
            simulated(Path(tmp), *COLUMNS) as (cluster, web):
        conversation(web.proxy)
        assert cluster.twin is not None
        cluster.twin.status = 503  # LMCache's controller fails: routes fall back (⚠)
        requests.post(f"{web.proxy}/v1/completions", timeout=30, json={
            "model": "sim-8b", "prompt": list(range(1000, 1300)), "max_tokens": 4})
        flows = web.flows()
        screenshot(web, flows[1]["id"], args.out)  # the second turn: routed to its cache
    print(f"{args.out}: {args.out.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
