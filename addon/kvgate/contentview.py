"""The mitmproxy glue for the ``LLM`` content view: what mitmweb, mitmproxy's console and
mitmdump's flow detail show for chat, completion and tokenize bodies. The rendering is
``observability.llm_view`` (pure); this reads the flow it belongs to."""

from __future__ import annotations

from typing import Any

from mitmproxy import contentviews, flow, http
from mitmproxy.contentviews.base import TViewResult

from .observability import llm_view

NAME = "LLM"
STREAM_META = "kvcache_stream"
"""``flow.metadata`` key of what ``StreamTap`` saw of a streamed answer."""
PRIORITY = 3.0
"""Above mitmproxy's JSON view (1) and GraphQL's (2): chosen by "auto" when it can render."""


def _llm_flow(f: flow.Flow | None) -> http.HTTPFlow | None:
    if isinstance(f, http.HTTPFlow) and llm_view.llm_path(f.request.path):
        return f
    return None


def _timing(f: http.HTTPFlow) -> llm_view.Timing:
    resp = f.response
    facts = f.metadata.get(STREAM_META)
    first = facts.get("first_chunk") if isinstance(facts, dict) else None
    return llm_view.Timing(
        request_end=f.request.timestamp_end,
        headers=resp.timestamp_start if resp is not None else None,
        first_chunk=first if isinstance(first, float) else None,
        end=resp.timestamp_end if resp is not None else None,
    )


class LLMView(contentviews.View):
    """OpenAI-style requests and answers as a conversation, plus kvgate's routing."""

    name = NAME

    def __init__(self) -> None:
        # ``auto`` asks every view for its priority, then calls the chosen one with the
        # same bytes: the render made for the priority is kept for that call
        self._last: tuple[bytes, str, bool, llm_view.Rendered | None] | None = None

    def _render(self, data: bytes, f: http.HTTPFlow,
                message: http.Message | None) -> llm_view.Rendered | None:
        is_request = message is f.request if message is not None else f.response is None
        last = self._last
        if last is not None and last[0] is data and last[1:3] == (f.id, is_request):
            rendered = last[3]
        else:
            if is_request:
                rendered = llm_view.render_request(data)
            else:
                facts = f.metadata.get(STREAM_META)
                rendered = llm_view.render_response(
                    data, _timing(f), facts if isinstance(facts, dict) else None)
            self._last = (data, f.id, is_request, rendered)
        if rendered is None:
            return None
        return llm_view.with_routing(rendered, f.metadata.get("kvcache"))

    def __call__(self, data: bytes, *, content_type: str | None = None,
                 flow: flow.Flow | None = None, http_message: http.Message | None = None,
                 **unknown_metadata: Any) -> TViewResult | None:
        f = _llm_flow(flow)
        rendered = self._render(data, f, http_message) if f is not None and data else None
        if rendered is None:
            # mitmproxy 11's "cannot render": it shows the body with its Raw view instead
            return None
        desc, lines = rendered
        return desc, iter(lines)

    def render_priority(self, data: bytes, *, content_type: str | None = None,
                        flow: flow.Flow | None = None,
                        http_message: http.Message | None = None,
                        **unknown_metadata: Any) -> float:
        f = _llm_flow(flow)
        if f is None or not data or f.websocket is not None:
            return 0
        # a malformed body scores 0: "auto" then picks mitmproxy's own view for it
        return PRIORITY if self._render(data, f, http_message) is not None else 0


def register() -> LLMView:
    """Add the view (replacing one of the same name: a reloaded script's)."""
    old = contentviews.get(NAME)
    if old is not None:
        contentviews.remove(old)
    view = LLMView()
    contentviews.add(view)
    return view


def unregister(view: LLMView | None) -> None:
    if view is not None and view in contentviews.views:
        contentviews.remove(view)
