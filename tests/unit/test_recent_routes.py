"""The gateway's memory of where it just sent each prompt prefix (placement.recent_routes),
and an engine's batch slots learnt from being seen full (fleet.engine_metrics)."""

from __future__ import annotations

import json
import time

import pytest

from kvgate.config import Endpoint
from kvgate.fleet.engine_metrics import EngineMonitor
from kvgate.fleet.health import HealthBook
from kvgate.observability.counters import Counters
from kvgate.placement import recent_routes
from kvgate.placement.layout import Placement
from kvgate.placement.lookup_cache import LookupCache
from kvgate.placement.recent_routes import CHUNK, MAX_CHUNKS, RecentRoutes, merge
from kvgate.placement.sent import SentRoutes
from kvgate.policies import base as routing

from unit_support import FakeClock, calls


def test_whole_chunks_sent_recently_count_as_held() -> None:
    clock = FakeClock()
    recent = RecentRoutes(window=5.0, clock=clock)
    doc = list(range(1000, 1000 + 2 * CHUNK + 100))
    recent.note(doc, "e1")
    question = doc[: 2 * CHUNK] + [7, 8, 9]
    assert recent.held(question) == {"e1": 2 * CHUNK}
    assert recent.held(list(range(5000, 5600))) == {}
    assert recent.held(doc[:CHUNK - 1]) == {}  # no whole chunk
    clock.advance(5.1)
    assert recent.held(question) == {}  # past the window LMCache knows best


def test_a_longer_prefix_sent_elsewhere_holds_the_shorter_one_too() -> None:
    recent = RecentRoutes(window=5.0, clock=FakeClock())
    system = list(range(3 * CHUNK))
    recent.note(system[:CHUNK], "e1")
    recent.note(system, "e2")  # e2 prefilled all three chunks
    assert recent.held(system) == {"e2": 3 * CHUNK}
    recent.note(system[:CHUNK], "e1")  # sent again to e1 since: e1 holds chunk one
    assert recent.held(system) == {"e1": CHUNK, "e2": 3 * CHUNK}


def test_bounded_per_prompt_and_in_entries_and_off_at_zero() -> None:
    recent = RecentRoutes(window=5.0, capacity=10, clock=FakeClock())
    long = list(range((MAX_CHUNKS + 5) * CHUNK))
    recent.note(long, "e1")
    assert len(recent) == 10
    recent = RecentRoutes(window=5.0, clock=FakeClock())
    recent.note(long, "e1")
    assert recent.held(long) == {"e1": MAX_CHUNKS * CHUNK}
    off = RecentRoutes(window=0.0)
    off.note(long, "e1")
    assert off.held(long) == {} and len(off) == 0
    assert RecentRoutes(window=5.0).held([2**40] * CHUNK) == {}  # no 32-bit token ids


def test_merge_raises_lmcache_answers_and_adds_engines_it_does_not_know_yet() -> None:
    answer = [Placement("e1", "LocalCPUBackend", 256), Placement("e2", "LocalCPUBackend", 1024)]
    got = merge(answer, {"e1": 768, "e2": 512, "e3": 256})
    assert got == [Placement("e1", "LocalCPUBackend", 768),
                   Placement("e2", "LocalCPUBackend", 1024), Placement("e3", "", 256)]


def _body(ids: list[int]) -> bytes:
    return json.dumps({"model": "m", "prompt": ids}).encode()


def test_a_question_right_behind_another_on_the_same_document_follows_it(
        make_gateway, controller) -> None:
    doc = list(range(100, 100 + 3 * CHUNK))
    gw = make_gateway({"recent_routes_window": "5s"})
    first = gw.route("vllm", _body(doc + [1, 2, 3]))
    assert first.decision.reason == routing.BALANCER  # LMCache knows nothing yet
    second = gw.route("vllm", _body(doc + [4, 5, 6]))  # a new prompt, the same document
    assert len(calls(controller, "/lookup")) == 2
    assert (second.decision.reason, second.decision.endpoint.id) == (
        routing.CACHE, first.decision.endpoint.id)
    assert second.decision.matched_tokens == 3 * CHUNK
    assert gw.counters.get("lookup.recent_routes") == 1

    off = make_gateway({"recent_routes_window": 0})
    off.route("vllm", _body(doc + [1, 2, 3]))
    assert off.route("vllm", _body(doc + [4, 5, 6])).decision.reason == routing.BALANCER


def test_an_engine_seen_full_has_exactly_the_slots_it_was_running() -> None:
    ep = Endpoint("e1", "127.0.0.1", 1)
    monitor = EngineMonitor([ep], HealthBook(), 0.0, 0.0)
    assert monitor.batch_slots("e1", 4.0) == 4.0  # nothing known: the floor
    monitor.slots["e1"] = 2.0
    assert monitor.batch_slots("e1", 4.0) == 4.0  # seen running 2, maybe more room
    monitor.full_slots["e1"] = 2.0
    assert monitor.batch_slots("e1", 4.0) == 2.0  # seen full at 2: that is the limit


def test_the_monitor_learns_full_slots_from_waiting_requests(monkeypatch) -> None:
    ep = Endpoint("e1", "127.0.0.1", 1)
    monitor = EngineMonitor([ep], HealthBook(), 0.0, 0.5)
    pages = iter([b"vllm:num_requests_running 3\nvllm:num_requests_waiting 0\n",
                  b"vllm:num_requests_running 3\nvllm:num_requests_waiting 2\n",
                  b"vllm:num_requests_running 1\nvllm:num_requests_waiting 1\n"])

    class Answer:
        status = 200

        def __init__(self) -> None:
            self.data = next(pages)

    monkeypatch.setattr(monitor, "_get", lambda *a, **k: Answer())
    monitor.poll_metrics(ep)
    assert "e1" not in monitor.full_slots and monitor.batch_slots("e1", 4.0) == 4.0
    monitor.poll_metrics(ep)
    assert monitor.batch_slots("e1", 4.0) == 3.0
    monitor.poll_metrics(ep)  # a moment with fewer running does not shrink it
    assert monitor.batch_slots("e1", 4.0) == 3.0
    assert time.monotonic() - monitor.stats["e1"].at < 5


def test_where_a_prompt_was_sent_reaches_all_three_readers() -> None:
    """placement.sent: one note feeds the fallback's prefix index, the recent routes a
    fresh answer is merged with, and the overlay on the prompt's own lookup answer."""
    lookups = LookupCache(lambda tokens, timeout: [], 1.0, 0.0, 2, Counters())
    sent = SentRoutes(100, 5.0, lookups)
    doc = list(range(1000, 1000 + 2 * CHUNK + 10))
    text = "system: " + " ".join(f"rule {i}." for i in range(100))
    sent.note("k", text + " user: hi", "e1", doc, doc, [Placement("e2", "L", CHUNK)])
    assert sent.last_holder(text + " user: and again?") == "e1"
    assert sent.last_holder("another prompt " * 40) is None
    placements, added = sent.add_recent(doc[: 2 * CHUNK] + [1], [Placement("e2", "L", CHUNK)])
    assert added and {p.instance_id: p.tokens for p in placements} == {
        "e1": 2 * CHUNK, "e2": CHUNK}
    overlaid = {p.instance_id: p.tokens for p in lookups.recent("k")[0]}
    assert overlaid["e1"] == len(doc)
    assert sent.add_recent(list(range(9000, 9600)), []) == ([], False)


def test_chunks_past_the_window_are_dropped_so_distinct_prompts_do_not_fill_the_map() -> None:
    """A stream of distinct prompts kept every chunk until ``capacity`` (100 000, ~20 MB):
    mitmdump grew by 4 blocks a request in the 1M-prompt memory run. Only the window's
    worth is kept now."""
    clock = FakeClock()
    recent = RecentRoutes(window=5.0, clock=clock)
    for i in range(2000):  # 100 prompts a second for 20 s, one chunk each
        recent.note(list(range(i * CHUNK, (i + 1) * CHUNK)), "e1")
        clock.advance(0.01)
    assert len(recent) <= 501  # the last 5 s
    last = list(range(1999 * CHUNK, 2000 * CHUNK))
    assert recent.held(last) == {"e1": CHUNK}  # what is in the window still counts


def test_a_prefix_sent_to_two_engines_counts_for_both_while_lmcache_names_somebody() -> None:
    # lmcache 0.5.6 names only the first registered holder of a chunk: the second copy is
    # known from what the gateway sent, for SHARED_WINDOW, as deep as LMCache still names
    # anybody for the prefix
    clock = FakeClock()
    recent = RecentRoutes(window=5.0, clock=clock)
    system = list(range(2 * CHUNK))
    recent.note(system + [1, 2], "e1")
    clock.advance(1.0)
    recent.note(system + [3, 4], "e2")
    question = system + [5, 6]
    clock.advance(10.0)  # past the window: only the shared memory speaks
    assert recent.held(question) == {}  # LMCache names nobody: nothing is claimed
    assert recent.held(question, confirmed=2 * CHUNK) == {"e1": 2 * CHUNK, "e2": 2 * CHUNK}
    assert recent.held(question, confirmed=CHUNK) == {"e1": CHUNK, "e2": CHUNK}
    assert recent.shared == 2
    clock.advance(recent_routes.SHARED_WINDOW)
    assert recent.held(question, confirmed=2 * CHUNK) == {}


def test_one_engine_alone_is_not_remembered_past_the_window() -> None:
    clock = FakeClock()
    recent = RecentRoutes(window=5.0, clock=clock)
    doc = list(range(3 * CHUNK))
    recent.note(doc, "e1")
    recent.note(doc, "e1")  # the same engine again: no second copy
    clock.advance(6.0)
    assert recent.held(doc, confirmed=3 * CHUNK) == {} and recent.shared == 0


def test_the_shared_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recent_routes, "SHARED_CAPACITY", 3)
    clock = FakeClock()
    recent = RecentRoutes(window=5.0, clock=clock)
    for i in range(10):
        prompt = list(range(i * CHUNK, (i + 1) * CHUNK))
        recent.note(prompt, "e1")
        recent.note(prompt, "e2")
    assert recent.shared == 3
    clock.advance(recent_routes.SHARED_WINDOW + 1)
    recent.note(list(range(CHUNK)), "e3")  # a note drops what is past the window
    assert recent.shared == 0


def test_a_fresh_answer_gains_the_copy_lmcache_does_not_name() -> None:
    clock = FakeClock()
    sent = SentRoutes(0, 5.0, LookupCache(lambda tokens, timeout: [], 0, 0, 1, Counters()))
    sent.recent = RecentRoutes(window=5.0, clock=clock)
    system = list(range(2 * CHUNK))
    sent.recent.note(system + [1], "e1")
    sent.recent.note(system + [2], "e2")
    clock.advance(30.0)
    answer = [Placement("e1", "LocalCPUBackend", 2 * CHUNK)]  # LMCache names e1 only
    placements, added = sent.add_recent(system + [9], answer)
    assert added and placements == [Placement("e1", "LocalCPUBackend", 2 * CHUNK),
                                    Placement("e2", "", 2 * CHUNK)]


def test_an_engine_that_left_rotation_is_claimed_for_no_more() -> None:
    # it may come back empty (restarted): its copies must not be counted
    clock = FakeClock()
    recent = RecentRoutes(window=5.0, clock=clock)
    system = list(range(2 * CHUNK))
    recent.note(system + [1], "e1")
    recent.note(system + [2], "e2")
    recent.forget("e2")
    assert recent.held(system, confirmed=2 * CHUNK) == {"e1": 2 * CHUNK}
    clock.advance(10.0)
    assert recent.held(system, confirmed=2 * CHUNK) == {"e1": 2 * CHUNK}
    recent.forget("e1")
    assert recent.held(system, confirmed=2 * CHUNK) == {} and recent.shared == 0


def test_the_health_book_tells_when_an_endpoint_leaves_rotation() -> None:
    book = HealthBook(clock=FakeClock())
    gone: list[str] = []
    book.on_down = gone.append
    book.mark_down("e1")
    book.mark_down("e1")  # already out: not a new event
    book.eject("e2", 10.0)
    assert gone == ["e1", "e2"]
