"""The benchmark's hindsight model (benchlib/hindsight.py) on streams worked by hand, and
the request dumps it reads (benchlib/dump.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from benchlib import dump  # noqa: E402
from benchlib.client import Record  # noqa: E402
from benchlib.hindsight import CHUNK, Engine, Request, Stream, frontier, online  # noqa: E402

ONE_SLOT = Engine(slots=1, prefill_ms=1.0, hold_ms=100.0)
SYSTEM = tuple(range(1000, 1000 + CHUNK + 64))  # one group: its first chunk


def ask(start: float, question: int) -> Request:
    """A request of the one group: the shared system prompt and a 16-token question."""
    return Request(start, SYSTEM + tuple(range(question * 100, question * 100 + 16)))


def test_one_holder_queues_and_caches_by_hand() -> None:
    # two requests 10 ms apart on one one-slot engine: the first prefills everything
    # (336 ms) and holds the slot 100 ms more; the second waits for it, then prefills
    # only its question (the shared 320 tokens are whole blocks: cached)
    s = Stream([ask(0.0, 1), ask(0.010, 2)], [ONE_SLOT, ONE_SLOT])
    hit, p50, p99 = s.play([[0]])
    first = 336.0
    second = (0.436 - 0.010) * 1000 + 16
    assert p99 == pytest.approx(second)
    assert p50 == pytest.approx(first)
    assert hit == pytest.approx(320 / 672)


def test_a_copy_is_a_miss_that_shortens_the_queue() -> None:
    reqs = [ask(0.2 * i, i) for i in range(10)]  # one every 200 ms; each holds 116+ ms
    reqs += [ask(0.2 * i + 0.05, 50 + i) for i in range(10)]  # and 50 ms later, another
    s = Stream(reqs, [ONE_SLOT, ONE_SLOT])
    alone = s.play([[0]])
    both = s.play([[0, 1]])
    assert both[0] < alone[0]  # the second engine's first request prefilled it all again
    assert both[0] == pytest.approx(alone[0] - 320 / s.total_tokens)  # and only that one
    assert both[2] < alone[2]  # but nobody waits behind a neighbour any more
    points = frontier(s, max_copies=1)
    assert [p.copies for p in points] == [0, 1]
    assert points[0].holders in (((0,),), ((1,),))
    assert points[1].holders == ((0, 1),)
    assert points[1].p99_ms == pytest.approx(both[2], abs=0.1)


def test_prompts_seen_once_go_where_a_slot_frees_first() -> None:
    unique = [Request(0.0, tuple(range(400))), Request(0.001, tuple(range(500, 900)))]
    s = Stream(unique, [ONE_SLOT, ONE_SLOT])
    assert s.sizes == []  # no group recurs
    hit, _, p99 = s.play([])
    assert hit == 0.0
    assert p99 == pytest.approx(400.0)  # each on an idle engine: no wait


def test_replaying_a_routers_choices() -> None:
    s = Stream([ask(0.0, 1), ask(0.010, 2)], [ONE_SLOT, ONE_SLOT])
    hit, _, p99 = s.play([], routes=[0, 1])  # the second sent elsewhere: a second miss
    assert hit == 0.0
    assert p99 == pytest.approx(336.0)


def test_online_rule_copies_only_past_its_gap() -> None:
    s = Stream([ask(0.0, 1), ask(0.010, 2)], [ONE_SLOT, ONE_SLOT])
    # the holder frees 426 ms after the second arrives, the other engine at once
    (g0, hit0, p0), (g1, hit1, p1) = online(s, [400, 500])
    assert (g0, hit0) == (400, 0.0)  # 426 > 400: copied, missed
    assert p0 == pytest.approx(336.0)
    assert hit1 == pytest.approx(320 / 672, abs=1e-4)  # 426 <= 500: waited at the holder
    assert p1 == pytest.approx(442.0)


def test_dump_round_trip(tmp_path: Path) -> None:
    rec = Record(session=3, step=0, start=0.5, ok=True, ttft_ms=12.5, engine="vllm-2",
                 prompt_tokens=4, cached_tokens=0, body={"prompt": "w1 w2 w3 w4"})
    path = tmp_path / dump.name("hot_prefix", 0.8, "kvgate@replicate=2", 1)
    assert path.name == "hot_prefix-80-kvgate+replicate2-1.jsonl"
    dump.write(path, {"workload": "hot_prefix"}, [rec], lambda body: [1, 2, 3, 4])
    meta, rows = dump.read(path)
    assert meta == {"workload": "hot_prefix"}
    assert rows[0]["tokens"] == [1, 2, 3, 4]
    assert (rows[0]["engine"], rows[0]["ttft_ms"], rows[0]["session"]) == ("vllm-2", 12.5, 3)
    (tmp_path / "bad.jsonl").write_text('{"start": 0}\n')
    with pytest.raises(ValueError, match="not a request dump"):
        dump.read(tmp_path / "bad.jsonl")
