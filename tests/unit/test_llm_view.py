"""The LLM view: what it makes of requests, answers (JSON and SSE) and kvgate's routing
facts; the tap that keeps streamed answers; and the view inside mitmproxy's own
content-view machinery (real flows, real ``contentviews``), falling back when it must."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from mitmproxy import contentviews, exceptions
from mitmproxy.test import taddons, tflow

from kvgate import contentview
from kvgate.addon import KVCacheAddon
from kvgate.observability import llm_view
from kvgate.observability.llm_view import StreamTap, Timing, flatten


def _request(doc: Any) -> str:
    rendered = llm_view.render_request(json.dumps(doc).encode())
    assert rendered is not None
    return rendered[0] + "\n" + flatten(rendered[1])


def _sse(*events: Any, done: bool = True) -> bytes:
    out = b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode())
                   + b"\n\n" for e in events)
    return out + (b"data: [DONE]\n\n" if done else b"")


def _chunk(content: str | None = None, finish: str | None = None, index: int = 0,
           **delta: Any) -> dict[str, Any]:
    d = dict(delta)
    if content is not None:
        d["content"] = content
    return {"object": "chat.completion.chunk",
            "choices": [{"index": index, "delta": d, "finish_reason": finish}]}


# ------------------------------------------------------------------ requests


def test_chat_request_shows_model_settings_and_turns() -> None:
    text = _request({
        "model": "llama-3-8b", "stream": True, "temperature": 0.2, "top_p": 0.9,
        "max_tokens": 64, "stop": ["\n\n"], "stream_options": {"include_usage": True},
        "user": "not a setting we show",
        "messages": [
            {"role": "system", "content": "You are terse.\nAnswer in French."},
            {"role": "user", "name": "alice", "content": "Bonjour ?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C, clear"},
        ]})
    assert text.startswith("LLM chat request: llama-3-8b, 4 turns, stream")
    assert "stream=true · max_tokens=64 · temperature=0.2 · top_p=0.9" in text
    assert 'stop=["\\n\\n"]' in text and "include_usage" in text
    assert "not a setting" not in text
    lines = text.splitlines()
    system = lines.index("system      You are terse.")
    assert lines[system + 1] == "            Answer in French."  # under the value column
    assert "user (alice) Bonjour ?" in text
    assert 'assistant   → weather({"city": "Paris"})' in text
    assert "tool [call_1] 18 C, clear" in text


def test_content_parts_and_images_are_summarised() -> None:
    image = "data:image/png;base64," + "A" * 4000
    text = _request({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": image}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
        {"type": "input_audio", "input_audio": {"data": "B" * 400, "format": "wav"}},
        {"type": "video_url"},
    ]}]})
    assert "What is in this picture?" in text
    assert "[image: data:image/png;base64, 2.9 KiB]" in text
    assert "AAAA" not in text  # never the base64 itself
    assert "[image: https://example.com/cat.jpg]" in text
    assert "[audio: wav, 300 B]" in text
    assert "[video_url]" in text


def test_token_id_prompts_are_a_count_and_the_first_ids() -> None:
    text = _request({"model": "m", "prompt": list(range(100, 1100)), "max_tokens": 3})
    assert text.startswith("LLM completion request: m, 1000 token ids")
    assert "prompt      1000 token ids: [100, 101, 102, 103, 104, 105, 106, 107, …]" in text
    batch = _request({"model": "m", "prompt": [[1, 2], "two words"]})
    assert "prompt[0]   2 token ids: [1, 2]" in batch
    assert "prompt[1]   two words" in batch


def test_tokenize_requests_and_long_turns() -> None:
    text = _request({"model": "m", "prompt": "word " * 2000})
    assert "… (+6000 chars)" in text  # a turn is clipped, the JSON view has all of it
    assert max(len(line) for line in text.splitlines()) <= llm_view.KEY + llm_view.WRAP
    assert "user        hi" in _request({"model": "m", "messages": [
        {"role": "user", "content": "hi"}], "add_generation_prompt": True})


@pytest.mark.parametrize("body", [
    b"", b"{", b"[1, 2]", b'"text"', b'{"model": "m"}', b"\xff\xfe", b"data: nope",
    b'{"messages": 12, "model": "m"}',
])
def test_what_is_not_a_request_is_not_rendered(body: bytes) -> None:
    assert llm_view.render_request(body) is None


# ------------------------------------------------------------------ answers


def test_streamed_chat_answer_is_assembled_with_usage_and_timing() -> None:
    body = _sse(_chunk("", role="assistant"), _chunk("Bon"), _chunk("jour"),
                _chunk("!", finish="stop"),
                {"object": "chat.completion.chunk", "choices": [],
                 "usage": {"prompt_tokens": 420, "completion_tokens": 3, "total_tokens": 423,
                           "prompt_tokens_details": {"cached_tokens": 400}}})
    desc, lines = llm_view.render_response(
        body, Timing(request_end=100.0, headers=100.010, first_chunk=100.035, end=100.5),
        {"chunks": 3, "bytes": len(body), "kept": len(body)})
    text = flatten(lines)
    assert desc == "LLM streamed answer: 5 events, finish stop, first after 35 ms"
    assert "answer      Bonjour!" in text
    assert "finish      stop" in text
    assert "usage       prompt 420 (cached 400) · completion 3 · total 423" in text
    assert "stream      5 events + [DONE] · first after 35 ms · last after 500 ms" in text
    assert "cut" not in text


def test_streamed_answers_with_choices_tools_reasoning_and_a_cut() -> None:
    body = _sse(
        _chunk(reasoning_content="Think. "), _chunk("A", index=0), _chunk("B", index=1),
        _chunk(tool_calls=[{"index": 0, "id": "c1", "type": "function",
                            "function": {"name": "look", "arguments": "{\"q\":"}}]),
        _chunk(tool_calls=[{"index": 0, "function": {"arguments": " 1}"}}],
               finish="tool_calls"),
        b'{"choices": [{"index": 1, "delta": {"content": "C', done=False)
    desc, lines = llm_view.render_response(body, None, {"bytes": 9999, "kept": len(body)})
    text = flatten(lines)
    assert "reasoning[0] Think." in text
    assert 'answer[0]   A\n            → look({"q": 1})' in text
    assert "answer[1]   B" in text
    assert "finish[0]   tool_calls" in text
    assert "6 events (no [DONE]) · 1 not JSON" in text
    assert "the answer above is cut" in text


def test_streamed_completion_and_an_error_event() -> None:
    body = _sse({"object": "text_completion", "choices": [{"index": 0, "text": "t0 "}]},
                {"object": "text_completion",
                 "choices": [{"index": 0, "text": "t1", "finish_reason": "length"}]},
                {"error": {"message": "engine overloaded", "code": 503}})
    text = flatten(llm_view.render_response(body)[1])
    assert "answer      t0 t1" in text and "finish      length" in text
    assert "error       engine overloaded" in text


def test_json_answers_tokenize_and_errors() -> None:
    chat = {"object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hi there"},
         "finish_reason": "stop"}], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}
    desc, lines = llm_view.render_response(json.dumps(chat).encode(),
                                           Timing(request_end=1.0, headers=1.25))
    text = flatten(lines)
    assert desc == "LLM answer: finish stop"
    assert "answer      Hi there" in text and "usage       prompt 5 · completion 2" in text
    assert "time        answer after 250 ms" in text
    tok = llm_view.render_response(b'{"count": 3, "max_model_len": 4096, "tokens": [7, 8, 9]}')
    assert tok is not None and tok[0] == "LLM tokenize: 3 tokens"
    assert "3 token ids: [7, 8, 9]" in flatten(tok[1])
    for err in (b'{"object": "error", "message": "bad model", "code": 404}',
                b'{"error": {"message": "bad model", "type": "invalid_request_error"}}'):
        rendered = llm_view.render_response(err)
        assert rendered is not None and "error       bad model" in flatten(rendered[1])


@pytest.mark.parametrize("body", [b"", b"<html>502</html>", b"{", b'{"choices": 3}',
                                  b'{"id": "x"}', b"[]"])
def test_what_is_not_an_answer_is_not_rendered(body: bytes) -> None:
    assert llm_view.render_response(body) is None


# ------------------------------------------------------------------ kvgate's part


def test_routing_facts_say_where_and_why() -> None:
    text = flatten(llm_view.render_routing({
        "cluster": "vllm", "endpoint": "vllm-2", "route": "cache", "matched_tokens": 512,
        "prompt_tokens": 530, "detail": "predicted ttft 12 ms",
        "runner_up": "vllm-1 (predicted ttft 40 ms)", "prompt_hash": "ab" * 8}))
    assert "kvgate      vllm-2 (cluster vllm)" in text
    assert "route       cache · 512 of 530 tokens cached there" in text
    assert "why         predicted ttft 12 ms; runner-up vllm-1 (predicted ttft 40 ms)" in text
    assert "prompt hash abababababababab" in text
    fallback = flatten(llm_view.render_routing({"endpoint": "vllm-1", "route": "fallback",
                                                "matched_tokens": 0, "detail": "lookup: x"}))
    assert "route       fallback" in fallback and "why         lookup: x" in fallback
    assert flatten(llm_view.render_routing(None)) == "kvgate      not routed"


def test_paths() -> None:
    for p in ("/v1/chat/completions", "/v1/completions?x=1", "/tokenize",
              "/openai/v1/chat/completions/"):
        assert llm_view.llm_path(p), p
    for p in ("/v1/models", "/metrics", "/v1/completions/render", "/detokenize"):
        assert not llm_view.llm_path(p), p


# ------------------------------------------------------------------ the tap


def test_the_tap_passes_chunks_on_and_keeps_a_bounded_copy() -> None:
    data = SimpleNamespace(content=None)
    facts: dict[str, Any] = {}
    tap = StreamTap(data, facts, limit=10)
    chunks = [b"data: 1\n\n", b"data: 22\n\n", b"data: 333\n\n"]
    assert [tap(c) for c in chunks] == chunks  # the very same objects, unchanged
    assert isinstance(facts["first_chunk"], float)
    assert data.content is None  # not before the end
    assert tap(b"") == b""
    assert data.content == b"data: 1\n\nd"
    assert facts["chunks"] == 3 and facts["bytes"] == 30 and facts["kept"] == 10
    tap.finish()  # idempotent: the error hook may call it after the end
    assert data.content == b"data: 1\n\nd"


def test_a_cut_stream_keeps_what_came() -> None:
    data = SimpleNamespace(content=None)
    facts: dict[str, Any] = {}
    tap = StreamTap(data, facts, limit=1 << 20)
    tap(b"data: {\"choices\": []}\n\n")
    tap.finish()
    assert data.content == b"data: {\"choices\": []}\n\n" and facts["kept"] == facts["bytes"]


# ------------------------------------------------------------------ inside mitmproxy


@pytest.fixture
def view() -> Any:
    v = contentview.register()
    yield v
    contentview.unregister(v)
    assert contentviews.get("LLM") is None


def _flow(path: str, request: bytes, response: bytes, ctype: str) -> Any:
    f = tflow.tflow(resp=True)
    f.request.path = path
    f.request.content = request
    f.request.headers["content-type"] = "application/json"
    f.response.content = response
    f.response.headers["content-type"] = ctype
    return f


def test_auto_picks_the_llm_view_for_llm_bodies(view: Any) -> None:
    f = _flow("/v1/chat/completions",
              json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
              .encode(), _sse(_chunk("yo", finish="stop")), "text/event-stream")
    f.metadata["kvcache"] = {"cluster": "vllm", "endpoint": "vllm-3", "route": "cache",
                             "matched_tokens": 16}
    f.metadata[contentview.STREAM_META] = {"first_chunk": f.request.timestamp_end + 0.042}
    desc, lines, err = contentviews.get_message_content_view("Auto", f.request, f)
    text = flatten(lines)
    assert err is None and desc.startswith("LLM chat request")
    assert "user        hi" in text and "kvgate      vllm-3 (cluster vllm)" in text
    desc, lines, err = contentviews.get_message_content_view("Auto", f.response, f)
    text = flatten(lines)
    assert err is None and desc.startswith("LLM streamed answer: 1 event")
    assert "answer      yo" in text and "first after 42 ms" in text
    assert "route       cache · 16 tokens cached there" in text


def test_malformed_bodies_fall_back_to_mitmproxys_views(view: Any) -> None:
    f = _flow("/v1/chat/completions", b'{"model": "m", "messages": [',
              b'{"detail": "Not Found"}', "application/json")
    assert view.render_priority(f.request.content, flow=f, http_message=f.request) == 0
    desc, lines, err = contentviews.get_message_content_view("Auto", f.request, f)
    assert err is None and not desc.startswith("LLM")
    desc, lines, err = contentviews.get_message_content_view("Auto", f.response, f)
    assert err is None and desc == "JSON"  # mitmproxy's JSON view, not ours
    # asked for by name, it says it cannot render and mitmproxy shows Raw: no error
    desc, lines, err = contentviews.get_message_content_view("LLM", f.request, f)
    assert err is None and desc == "Couldn't parse: falling back to Raw"
    assert flatten(lines) == '{"model": "m", "messages": ['


def test_other_paths_are_left_to_mitmproxy(view: Any) -> None:
    f = _flow("/v1/models", b"", b'{"choices": []}', "application/json")
    assert view.render_priority(f.response.content, flow=f, http_message=f.response) == 0
    assert contentviews.get_message_content_view("Auto", f.response, f)[0] == "JSON"


def test_register_replaces_a_stale_view_of_the_same_name(view: Any) -> None:
    again = contentview.register()  # a reloaded script registers again: no ValueError
    assert contentviews.get("LLM") is again and view not in contentviews.views
    contentview.unregister(view)  # the old one's done(): leaves the new one alone
    assert contentviews.get("LLM") is again
    contentview.unregister(again)


# ------------------------------------------------------------------ the addon's part


def _sse_flow(live: bool = True) -> Any:
    f = tflow.tflow(resp=True, live=live)
    f.request.path = "/v1/chat/completions"
    f.response.headers["content-type"] = "text/event-stream; charset=utf-8"
    f.response.content = None
    return f


def test_the_addon_taps_live_sse_answers_within_its_option() -> None:
    addon = KVCacheAddon()
    with taddons.context(addon) as tctx:
        assert contentviews.get("LLM") is addon._view  # registered by load
        f = _sse_flow()
        addon.responseheaders(f)
        assert isinstance(f.response.stream, StreamTap)
        assert f.response.stream(b"data: [DONE]\n\n") == b"data: [DONE]\n\n"
        f.response.stream(b"")  # mitmproxy's end-of-stream call
        assert f.response.raw_content == b"data: [DONE]\n\n"
        assert f.metadata[contentview.STREAM_META]["kept"] == 14

        loaded = _sse_flow(live=False)  # read from a file: it has its body already
        addon.responseheaders(loaded)
        assert loaded.response.stream is True
        assert contentview.STREAM_META not in loaded.metadata

        tctx.configure(addon, kvcache_keep_streamed="0")  # keep none: plain streaming
        f = _sse_flow()
        addon.responseheaders(f)
        assert f.response.stream is True
        tctx.configure(addon, kvcache_keep_streamed="256k")
        assert addon._keep_streamed == 256 * 1024
        for bad in ("lots", "-1", "1x"):
            with pytest.raises(exceptions.OptionsError, match="kvcache_keep_streamed"):
                tctx.configure(addon, kvcache_keep_streamed=bad)
        addon.done()
    assert contentviews.get("LLM") is None  # unregistered by done
