"""What an OpenAI-style exchange says, as lines for a viewer (the ``LLM`` content view of
``kvgate.contentview``): the model, the settings and the conversation of a request; the
answer of a response, streamed or not, assembled into text; and where kvgate sent it.

Pure: bodies, timestamps and the flow's ``kvcache`` metadata in, ``(style, text)`` lines
out; None for a body it does not understand, so that mitmproxy's own views show it.
Also the recorder that keeps a streamed answer's bytes for it (``StreamTap``).
"""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

Line = list[tuple[str, str]]
Rendered = tuple[str, list[Line]]
BLANK: Line = [("text", " ")]  # an empty line would take no height in mitmweb

PATHS = ("/v1/chat/completions", "/v1/completions", "/tokenize")

TEXT_MAX = 4000
"""Characters of one turn (or answer) shown; the JSON and Raw views have all of it."""
IDS_SHOWN = 8
"""The first token ids shown of a token-id prompt."""
KEY = 12  # width of the key column
WRAP = 100
"""Text lines are wrapped at this width: mitmweb does not wrap, a system prompt is one line."""

# the sampling settings shown, in this order (others are in the JSON view)
SETTINGS = ("stream", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
            "min_p", "n", "best_of", "stop", "seed", "presence_penalty", "frequency_penalty",
            "repetition_penalty", "logprobs", "top_logprobs", "echo", "ignore_eos",
            "skip_special_tokens", "add_generation_prompt", "add_special_tokens")


def llm_path(path: str) -> bool:
    """Whether a request path is one the view is for (query string and prefixes allowed)."""
    return path.split("?", 1)[0].rstrip("/").endswith(PATHS)


# ------------------------------------------------------------------ decoding


def _json(body: bytes) -> Any:
    try:  # orjson first (fast); json for what it refuses (NaN, lone surrogates)
        return orjson.loads(body)
    except (ValueError, RecursionError):
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None


@dataclass
class Events:
    """The ``data:`` events of a server-sent-events body."""

    payloads: list[Any] = field(default_factory=list)
    done: bool = False  # saw ``data: [DONE]``
    broken: int = 0  # data lines that were not JSON (a cut-off last event, say)


def sse_events(body: bytes) -> Events | None:
    """The events of an SSE body; None when it is not one (no ``data:`` line)."""
    stripped = body.lstrip()
    if not stripped.startswith((b"data:", b"event:", b"id:", b":")):
        return None
    out = Events()
    seen = False
    for raw in body.splitlines():
        if not raw.startswith(b"data:"):
            continue
        seen = True
        data = raw[5:].strip()
        if data == b"[DONE]":
            out.done = True
            continue
        payload = _json(data)
        if payload is None:
            out.broken += 1
        else:
            out.payloads.append(payload)
    return out if seen else None


# ------------------------------------------------------------------ line helpers


def _key(key: str) -> str:
    return f"{key:<{KEY - 1}} "


def _pair(key: str, value: str, style: str = "text") -> Line:
    return [("header", _key(key)), (style, value)]


def _block(key: str, text: str, style: str = "text", key_style: str = "header") -> list[Line]:
    """A key, then the text's lines indented under the value column."""
    lines = [piece for line in _clip(text).splitlines()
             for piece in (textwrap.wrap(line, WRAP, break_on_hyphens=False) or [""])] or [""]
    out = [[(key_style, _key(key)), (style, lines[0])]]
    out += [[("text", " " * KEY), (style, rest)] for rest in lines[1:]]
    return out


def _clip(text: str, limit: int = TEXT_MAX) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… (+{len(text) - limit} chars)"


def _short(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024 / 1024:.1f} MiB"


def _ids(value: list[Any]) -> str:
    head = ", ".join(str(v) for v in value[:IDS_SHOWN])
    more = ", …" if len(value) > IDS_SHOWN else ""
    return f"{len(value)} token ids: [{head}{more}]"


def _is_ids(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value))


# ------------------------------------------------------------------ requests


def _part(part: Any) -> str:
    """One content part of a message: its text, or a one-line summary of what it is."""
    if isinstance(part, str):
        return part
    if not isinstance(part, dict):
        return f"[{type(part).__name__}]"
    kind = part.get("type", "text")
    if kind == "text" and isinstance(part.get("text"), str):
        return part["text"]
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if isinstance(url, str) and url.startswith("data:"):
            head, _, data = url.partition(",")
            return f"[image: {head}, {_size(len(data) * 3 // 4)}]"
        return f"[image: {_short(url)}]"
    if kind == "input_audio":
        audio = part.get("input_audio")
        if isinstance(audio, dict):
            data = audio.get("data")
            size = _size(len(data) * 3 // 4) if isinstance(data, str) else "?"
            return f"[audio: {audio.get('format', '?')}, {size}]"
        return "[audio]"
    return f"[{_short(kind, 30)}]"


def _content(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, list):
        return "\n".join(_part(p) for p in content)
    return _part(content)


def _calls(calls: Any) -> list[str]:
    """Tool calls, one line each: ``name(arguments)``."""
    out = []
    for call in calls if isinstance(calls, list) else []:
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            out.append(f"→ {fn.get('name', '?')}({_short(fn.get('arguments', ''), 200)})")
    return out


def _turns(messages: list[Any]) -> list[Line]:
    out: list[Line] = []
    for msg in messages:
        if not isinstance(msg, dict):
            out.append(_pair("?", _short(msg)))
            continue
        role = str(msg.get("role", "?"))
        if isinstance(msg.get("name"), str):
            role += f" ({msg['name']})"
        if isinstance(msg.get("tool_call_id"), str):
            role += f" [{_short(msg['tool_call_id'], 24)}]"
        text = _content(msg.get("content"))
        calls = _calls(msg.get("tool_calls"))
        text = "\n".join(t for t in (text, *calls) if t)
        out += _block(role, text, key_style="Token_Name_Tag")  # roles in colour
    return out


def _prompt(prompt: Any) -> list[Line]:
    if isinstance(prompt, str):
        return _block("prompt", prompt)
    if _is_ids(prompt):
        return [_pair("prompt", _ids(prompt))]
    if isinstance(prompt, list):
        out: list[Line] = []
        for i, item in enumerate(prompt):
            key = f"prompt[{i}]"
            if _is_ids(item):
                out.append(_pair(key, _ids(item)))
            else:
                out += _block(key, item if isinstance(item, str) else _short(item))
        return out
    return [_pair("prompt", _short(prompt))]


def _settings(doc: Mapping[str, Any]) -> str:
    parts = [f"{k}={_short(doc[k], 40)}" for k in SETTINGS if k in doc]
    opts = doc.get("stream_options")
    if isinstance(opts, dict) and opts.get("include_usage"):
        parts.append("include_usage")
    fmt = doc.get("response_format")
    if isinstance(fmt, dict) and "type" in fmt:
        parts.append(f"response_format={_short(fmt['type'], 30)}")
    return " · ".join(parts)


def _tools(doc: Mapping[str, Any]) -> str:
    tools = doc.get("tools")
    if not isinstance(tools, list) or not tools:
        return ""
    names = []
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) else None
        names.append(str(fn.get("name", "?")) if isinstance(fn, dict) else "?")
    choice = doc.get("tool_choice")
    return ", ".join(names) + (f" (tool_choice {_short(choice, 40)})" if choice else "")


def render_request(body: bytes) -> Rendered | None:
    """A chat, completion or tokenize request; None when the body is not one."""
    doc = _json(body)
    if not isinstance(doc, dict):
        return None
    messages, prompt = doc.get("messages"), doc.get("prompt")
    if isinstance(messages, list):
        kind, convo = "chat", _turns(messages)
        size = f"{len(messages)} turn{'s' if len(messages) != 1 else ''}"
    elif "prompt" in doc:
        kind, convo = "completion", _prompt(prompt)
        size = f"{len(prompt)} token ids" if _is_ids(prompt) else "text prompt"
    else:
        return None
    model = doc.get("model")
    lines = [_pair("model", _short(model) if model is not None else "(none: the default)")]
    settings = _settings(doc)
    if settings:
        lines.append(_pair("settings", settings))
    tools = _tools(doc)
    if tools:
        lines.append(_pair("tools", tools))
    lines.append(BLANK)
    lines += convo
    stream = ", stream" if doc.get("stream") is True else ""
    return f"LLM {kind} request: {_short(model, 40)}, {size}{stream}", lines


# ------------------------------------------------------------------ responses


@dataclass
class Timing:
    """When things happened (epoch seconds; None: not known)."""

    request_end: float | None = None
    headers: float | None = None
    first_chunk: float | None = None
    end: float | None = None


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    calls: dict[int, dict[str, str]] = field(default_factory=dict)
    finish: str | None = None


def _add_choice(choices: dict[int, _Choice], raw: Any, streamed: bool) -> None:
    if not isinstance(raw, dict):
        return
    index = raw.get("index", 0)
    c = choices.setdefault(index if isinstance(index, int) else 0, _Choice())
    msg = raw.get("delta" if streamed else "message")
    if isinstance(msg, dict):
        if isinstance(msg.get("content"), str):
            c.text.append(msg["content"])
        for key in ("reasoning_content", "reasoning"):
            if isinstance(msg.get(key), str):
                c.reasoning.append(msg[key])
        for n, call in enumerate(msg.get("tool_calls") or []):
            if not isinstance(call, dict):
                continue
            slot = c.calls.setdefault(call.get("index", n) if streamed else n,
                                      {"name": "", "arguments": ""})
            fn = call.get("function")
            if isinstance(fn, dict):
                slot["name"] += fn.get("name") or ""
                slot["arguments"] += fn.get("arguments") or ""
    if isinstance(raw.get("text"), str):  # completions
        c.text.append(raw["text"])
    if raw.get("finish_reason"):
        c.finish = str(raw["finish_reason"])


def _error(doc: Mapping[str, Any]) -> str | None:
    err = doc.get("error")
    if isinstance(err, dict):
        return _short(err.get("message") or err, 300)
    if isinstance(err, str):
        return _short(err, 300)
    if doc.get("object") == "error":
        return _short(doc.get("message", ""), 300)
    return None


def _usage(usage: Any) -> str | None:
    if not isinstance(usage, dict):
        return None
    parts = []
    if "prompt_tokens" in usage:
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        parts.append(f"prompt {usage['prompt_tokens']}"
                     + (f" (cached {cached})" if cached is not None else ""))
    if "completion_tokens" in usage:
        parts.append(f"completion {usage['completion_tokens']}")
    if "total_tokens" in usage:
        parts.append(f"total {usage['total_tokens']}")
    return " · ".join(parts) or None


def _ms(a: float | None, b: float | None) -> str | None:
    return f"{(b - a) * 1000:.0f} ms" if a is not None and b is not None else None


def _answer_lines(choices: dict[int, _Choice]) -> list[Line]:
    lines: list[Line] = []
    for index in sorted(choices):
        c = choices[index]
        tag = f"[{index}]" if len(choices) > 1 else ""
        if c.reasoning:
            lines += _block(f"reasoning{tag}", "".join(c.reasoning))
        calls = [f"→ {call['name'] or '?'}({_short(call['arguments'], 200)})"
                 for _, call in sorted(c.calls.items())]
        text = "\n".join(t for t in ("".join(c.text), *calls) if t)
        lines += _block(f"answer{tag}", text, "highlight")
        if c.finish:
            lines.append(_pair(f"finish{tag}", c.finish))
    return lines


def render_response(body: bytes, timing: Timing | None = None,
                    stream: Mapping[str, Any] | None = None) -> Rendered | None:
    """A chat or completion answer (JSON or SSE), a tokenize answer or an API error; None
    when the body is none of them. ``stream``: what ``StreamTap`` recorded."""
    timing = timing or Timing()
    events = sse_events(body)
    if events is not None:
        return _render_sse(events, timing, stream or {})
    doc = _json(body)
    if not isinstance(doc, dict):
        return None
    err = _error(doc)
    if err is not None:
        return "LLM error", [_pair("error", err, "error")]
    if isinstance(doc.get("tokens"), list) and "count" in doc:  # /tokenize
        lines = [_pair("tokens", _ids(doc["tokens"]))]
        if "max_model_len" in doc:
            lines.append(_pair("max_len", str(doc["max_model_len"])))
        return f"LLM tokenize: {doc['count']} tokens", lines
    raw_choices = doc.get("choices")
    if not isinstance(raw_choices, list):
        return None
    choices: dict[int, _Choice] = {}
    for raw in raw_choices:
        _add_choice(choices, raw, streamed=False)
    lines = _answer_lines(choices)
    usage = _usage(doc.get("usage"))
    if usage:
        lines.append(_pair("usage", usage))
    took = _ms(timing.request_end, timing.headers)
    if took:
        lines.append(_pair("time", f"answer after {took}"))
    finish = ", ".join(sorted({c.finish for c in choices.values() if c.finish}))
    return (f"LLM answer{': finish ' + finish if finish else ''}", lines)


def _render_sse(events: Events, timing: Timing, stream: Mapping[str, Any]) -> Rendered:
    choices: dict[int, _Choice] = {}
    usage: Any = None
    errors = []
    for payload in events.payloads:
        if not isinstance(payload, dict):
            continue
        err = _error(payload)
        if err is not None:
            errors.append(err)
        for raw in payload.get("choices") or []:
            _add_choice(choices, raw, streamed=True)
        if payload.get("usage"):
            usage = payload["usage"]
    lines = _answer_lines(choices)
    lines += [_pair("error", e, "error") for e in errors]
    summary = _usage(usage)
    if summary:
        lines.append(_pair("usage", summary))
    count = len(events.payloads) + events.broken
    facts = [f"{count} event{'s' if count != 1 else ''}"
             + (" + [DONE]" if events.done else " (no [DONE])")]
    if events.broken:
        facts.append(f"{events.broken} not JSON")
    first = _ms(timing.request_end, timing.first_chunk)
    if first:
        facts.append(f"first after {first}")
    last = _ms(timing.request_end, timing.end)
    if last:
        facts.append(f"last after {last}")
    lines.append(_pair("stream", " · ".join(facts)))
    kept, total = stream.get("kept"), stream.get("bytes")
    if isinstance(kept, int) and isinstance(total, int) and kept < total:
        lines.append(_pair("kept", f"the first {_size(kept)} of {_size(total)}: "
                                   "the answer above is cut", "error"))
    finish = ", ".join(sorted({c.finish for c in choices.values() if c.finish}))
    desc = f"LLM streamed answer: {count} events" + (f", finish {finish}" if finish else "")
    if first:
        desc += f", first after {first}"
    return desc, lines


# ------------------------------------------------------------------ kvgate's part


def render_routing(meta: Mapping[str, Any] | None) -> list[Line]:
    """Where kvgate sent the flow and why (its ``flow.metadata["kvcache"]``)."""
    if not meta:
        return [_pair("kvgate", "not routed")]
    lines = [_pair("kvgate", f"{meta.get('endpoint', '?')} (cluster {meta.get('cluster', '?')})",
                   "highlight")]
    route = str(meta.get("route", "?"))
    matched, prompt = meta.get("matched_tokens"), meta.get("prompt_tokens")
    if matched:
        route += f" · {matched}" + (f" of {prompt}" if prompt else "") + " tokens cached there"
    elif prompt:
        route += f" · {prompt} prompt tokens"
    lines.append(_pair("route", route))
    why = [str(meta["detail"])] if meta.get("detail") else []
    if meta.get("runner_up"):  # the policy's second choice, when it names one
        why.append(f"runner-up {meta['runner_up']}")
    if why:
        lines.append(_pair("why", "; ".join(why)))
    if meta.get("prompt_hash"):
        lines.append(_pair("prompt hash", str(meta["prompt_hash"])))
    if meta.get("timed_out"):
        lines.append(_pair("engine", "no response headers in time (504 from kvgate)", "error"))
    return lines


def with_routing(rendered: Rendered, meta: Mapping[str, Any] | None) -> Rendered:
    desc, lines = rendered
    return desc, [*lines, BLANK, *render_routing(meta)]


def flatten(lines: Iterable[Line]) -> str:
    """The lines as plain text (tests, logs at DEBUG)."""
    return "\n".join("".join(text for _, text in line) for line in lines)


# ------------------------------------------------------------------ keeping streamed bodies


class StreamTap:
    """``Response.stream`` for an SSE answer: passes every chunk on unchanged, keeps a copy
    of the first ``limit`` bytes, and when the stream ends puts that copy on the response
    (mitmproxy keeps no body of a streamed response) and what it saw in ``facts``.

    It holds the response's data record, not the response: the response holds the tap,
    and a cycle would leave a finished flow's bytes to the cyclic garbage collector.
    """

    __slots__ = ("_buf", "_limit", "_data", "_facts", "_chunks", "_size")

    def __init__(self, data: Any, facts: dict[str, Any], limit: int) -> None:
        self._buf = bytearray()
        self._limit = limit
        self._data: Any = data
        self._facts = facts
        self._chunks = 0
        self._size = 0

    def __call__(self, chunk: bytes) -> bytes:
        if not chunk:  # mitmproxy's end-of-stream call, before the response hooks
            self.finish()
            return chunk
        if not self._chunks:
            self._facts["first_chunk"] = time.time()
        self._chunks += 1
        self._size += len(chunk)
        room = self._limit - len(self._buf)
        if room > 0:
            self._buf += chunk if len(chunk) <= room else chunk[:room]
        return chunk

    def finish(self) -> None:
        """The stream ended or broke: the kept bytes become the response's body."""
        if self._data is None:
            return
        self._data.content = bytes(self._buf)
        self._facts.update(chunks=self._chunks, bytes=self._size, kept=len(self._buf))
        self._data = None
        self._buf = bytearray()
