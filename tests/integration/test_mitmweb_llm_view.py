"""The LLM view in a real mitmweb: the addon in front of the simulated cluster (reverse
mode), streamed chats through it, and what mitmweb's own HTTP API then serves: the view
of each flow's request and response, the fallback marks and the filter that finds them;
then the page itself in headless Chromium (skipped without Chromium)."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import kvgate_tracebacks
from mitmproxy import io as mitmio

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import mitmweb_screenshot as shot  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One mitmweb with three kinds of flows: a two-turn streamed chat, a malformed chat
    body, and a completion routed while LMCache's controller fails (a fallback)."""
    tmp = tmp_path_factory.mktemp("mitmweb")
    with shot.simulated(tmp) as (cluster, web):
        history = shot.conversation(web.proxy)
        bad = requests.post(f"{web.proxy}/v1/chat/completions", timeout=10,
                            data=b'{"model": "sim-8b", "messages": [{"role": ',
                            headers={"content-type": "application/json"})
        assert cluster.twin is not None
        cluster.twin.status = 503  # the controller fails every lookup from now on
        fell_back = requests.post(f"{web.proxy}/v1/completions", timeout=10, json={
            "model": "sim-8b", "prompt": list(range(1000, 1300)), "max_tokens": 4})
        flows = web.flows()
        yield {"web": web, "history": history, "flows": flows, "bad": bad,
               "fell_back": fell_back, "tmp": tmp}
    log = web.log()
    assert not kvgate_tracebacks(log), log[-3000:]
    assert "content viewer failed" not in log, log[-3000:]


def test_the_llm_view_of_a_streamed_chat_in_mitmweb(session: dict[str, Any]) -> None:
    web, history, flows = session["web"], session["history"], session["flows"]
    assert [f["request"]["path"] for f in flows] == [
        "/v1/chat/completions", "/v1/chat/completions", "/v1/chat/completions",
        "/v1/completions"]
    second = flows[1]
    assert re.fullmatch(r"kvcache: cache -> vllm-\d \(\d+ cached tokens\)", second["comment"])
    endpoint = second["comment"].split("-> ")[1].split(" ")[0]

    desc, request = web.view(second["id"], "request")
    assert desc == "LLM chat request: sim-8b, 4 turns, stream"
    assert "settings    stream=true · max_tokens=12 · temperature=0.2 · include_usage" in request
    assert "system      You are the support assistant of a home-router maker." in request
    assert "user        My router's WAN light blinks orange. Why?" in request
    assert f"assistant   {history[2]['content']}" in request
    assert "user        And how do I reset it to factory settings?" in request
    assert f"kvgate      {endpoint} (cluster vllm)" in request

    desc, response = web.view(second["id"], "response")
    answer = " ".join(f"t{i}" for i in range(12))
    assert desc.startswith("LLM streamed answer: 14 events, finish length, first after ")
    assert f"answer      {answer}\n" in response
    assert "finish      length" in response
    assert re.search(r"usage       prompt \d+ \(cached [1-9]\d*\) · completion 12", response)
    assert re.search(r"stream      14 events \+ \[DONE\] · first after \d+ ms", response)
    assert re.search(r"route       cache · \d+ tokens cached there", response)
    assert re.search(r"why         predicted ttft \d+ ms", response)

    # "auto" (what mitmweb shows unless told otherwise) picks the LLM view by itself
    assert web.view(second["id"], "response", "Auto")[1] == response
    assert web.view(second["id"], "request", "Auto")[1] == request
    # the body mitmproxy itself keeps is the streamed one, whole
    raw = requests.get(f"{web.web}/flows/{second['id']}/response/content.data", timeout=10)
    assert raw.content.count(b"data: ") == 15 and raw.content.endswith(b"data: [DONE]\n\n")


def test_a_malformed_body_falls_back_to_mitmproxys_views(session: dict[str, Any]) -> None:
    web, flows = session["web"], session["flows"]
    assert session["bad"].status_code == 400  # the engine's answer, passed on
    bad = flows[2]
    desc, text = web.view(bad["id"], "request", "Auto")
    assert not desc.startswith("LLM") and text == '{"model": "sim-8b", "messages": [{"role": '
    desc, text = web.view(bad["id"], "request", "LLM")  # asked for by name: Raw, no error
    assert desc == "Couldn't parse: falling back to Raw"
    # the engine's JSON error is still an LLM API answer
    desc, text = web.view(bad["id"], "response")
    assert desc == "LLM error" and "error       body must be a JSON object" in text


def test_fallbacks_are_marked_and_a_filter_finds_them(session: dict[str, Any]) -> None:
    web, flows = session["web"], session["flows"]
    assert session["fell_back"].headers["x-kvcache-route"] == "fallback"
    marked = [f for f in flows if f["marked"]]
    assert [f["request"]["path"] for f in marked] == ["/v1/completions"]
    assert marked[0]["marked"] == "⚠"
    comment = marked[0]["comment"]
    assert comment.startswith("kvcache: fallback -> vllm-") and len(comment) <= 80, comment
    for expr in ("~marked", '~comment "kvcache: fallback"'):
        dump = requests.get(f"{web.web}/flows/dump", params={"filter": expr}, timeout=10)
        found = list(mitmio.FlowReader(io.BytesIO(dump.content)).stream())
        assert [f.id for f in found] == [marked[0]["id"]], expr
        assert found[0].marked == ":warning:"
    desc, request = web.view(marked[0]["id"], "request")
    assert desc == "LLM completion request: sim-8b, 300 token ids"
    assert "prompt      300 token ids: [1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, …]" \
        in request
    assert "route       fallback" in request
    assert "why         lookup: lmcache /lookup: status 503" in request


def _needs_chromium() -> None:
    if shot.chromium() is None:
        pytest.skip("no Chromium (Debian: apt-get install -y chromium)")


def test_the_page_in_headless_chromium(session: dict[str, Any]) -> None:
    _needs_chromium()
    web, second = session["web"], session["flows"][1]
    out = session["tmp"] / "mitmweb.png"
    page = shot.screenshot(web, second["id"], out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    assert "View: llm" in page
    assert "answer      " + " ".join(f"t{i}" for i in range(12)) in page
    assert re.search(r"kvgate      vllm-\d \(cluster vllm\)", page)


def test_the_search_box_finds_the_fallbacks(session: dict[str, Any]) -> None:
    """mitmweb filters its flow list in the page (its own JavaScript filter code, not
    mitmproxy's Python one): the filters the docs give must work there too."""
    _needs_chromium()
    found = shot.flow_rows(session["web"], {
        "~marked": 1, '~comment "kvcache: fallback"': 1, '~comment "kvcache: cache"': 1})
    for expr in ("~marked", '~comment "kvcache: fallback"'):
        rows = found[expr]
        assert len(rows) == 1 and "/v1/completions" in rows[0] and "⚠" in rows[0], expr
    cached = found['~comment "kvcache: cache"']  # the chat's second turn, not marked
    assert len(cached) == 1 and "/v1/chat/completions" in cached[0] and "⚠" not in cached[0]


def test_the_screenshot_command_of_the_docs(tmp_path: Path) -> None:
    """docs/debugging.md's screenshot is made by this command (its --out aside)."""
    _needs_chromium()
    command = ".venv/bin/python scripts/mitmweb_screenshot.py"
    assert f"`{command}`" in (ROOT / "docs" / "debugging.md").read_text()
    out = tmp_path / "shot.png"
    run = subprocess.run([*command.split(), "--out", str(out)], cwd=ROOT, timeout=180,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size < 200_000
