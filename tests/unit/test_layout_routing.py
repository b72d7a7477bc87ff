"""layout_info in both forms, and the longest-prefix rule (pure functions)."""

from __future__ import annotations

import itertools

import pytest

from kvgate.config import Endpoint
from kvgate.placement.layout import Placement, parse_layout
from kvgate.policies.longest_prefix import longest_prefix

EPS = tuple(Endpoint(f"vllm-{i}", "127.0.0.1", 8000 + i) for i in (1, 2, 3))


def test_real_array_form() -> None:
    answer = {"event_id": "e", "layout_info": {"vllm-1": ["LocalCPUBackend", 700],
                                                "vllm-2": ["LocalDiskBackend", 256]}}
    assert parse_layout(answer) == [Placement("vllm-1", "LocalCPUBackend", 700),
                                    Placement("vllm-2", "LocalDiskBackend", 256)]


def test_seed_object_form() -> None:
    answer = {"event_id": "e", "layout_info": {"node-a": {"0": "x", "1": 2},
                                                "node-b": {"0": "y", "1": 8}}}
    assert parse_layout(answer) == [Placement("node-a", "x", 2), Placement("node-b", "y", 8)]


def test_named_object_form() -> None:
    answer = {"layout_info": {"a": {"location": "L", "tokens": 3},
                              "b": {"location": "M", "token_count": 4}}}
    assert parse_layout(answer) == [Placement("a", "L", 3), Placement("b", "M", 4)]


@pytest.mark.parametrize(
    "bad_entry",
    [["loc"], [], "loc", 5, None, ["loc", "12"], ["loc", True], ["loc", -1], {"0": "x"},
     {"0": "x", "1": None}],
)
def test_malformed_entries_are_skipped(bad_entry: object) -> None:
    answer = {"layout_info": {"bad": bad_entry, "good": ["L", 4]}}
    assert parse_layout(answer) == [Placement("good", "L", 4)]


@pytest.mark.parametrize("answer", [None, [], "x", {}, {"layout_info": None},
                                    {"layout_info": [["a", 1]]}, {"detail": "boom"}])
def test_no_layout_is_empty(answer: object) -> None:
    assert parse_layout(answer) == []


def test_float_counts_become_ints() -> None:
    assert parse_layout({"layout_info": {"a": ["L", 8.0]}}) == [Placement("a", "L", 8)]


def _all_healthy(_: str) -> bool:
    return True


def test_longest_wins() -> None:
    placements = [Placement("vllm-1", "L", 2), Placement("vllm-3", "L", 8),
                  Placement("vllm-2", "L", 5)]
    assert longest_prefix(placements, EPS, _all_healthy, {}) == (EPS[2], 8)


def test_same_instance_twice_counts_its_best() -> None:
    placements = [Placement("vllm-1", "L", 9), Placement("vllm-2", "L", 5),
                  Placement("vllm-1", "D", 3)]
    assert longest_prefix(placements, EPS, _all_healthy, {}) == (EPS[0], 9)


def test_tie_goes_to_fewer_in_flight_whatever_the_order() -> None:
    base = [Placement("vllm-1", "L", 8), Placement("vllm-2", "L", 8),
            Placement("vllm-3", "L", 8)]
    inflight = {"vllm-1": 4, "vllm-2": 1, "vllm-3": 2}
    for perm in itertools.permutations(base):
        assert longest_prefix(list(perm), EPS, _all_healthy, inflight) == (EPS[1], 8)


def test_tie_with_equal_in_flight_goes_to_config_order() -> None:
    base = [Placement("vllm-3", "L", 8), Placement("vllm-2", "L", 8), Placement("vllm-1", "L", 1)]
    for perm in itertools.permutations(base):
        got = longest_prefix(list(perm), EPS, _all_healthy, {"vllm-2": 0, "vllm-3": 0})
        assert got == (EPS[1], 8)
    # config order, not name order: reverse the cluster and vllm-3 wins
    assert longest_prefix(base, EPS[::-1], _all_healthy, {}) == (EPS[2], 8)


def test_unhealthy_and_unknown_instances_are_skipped() -> None:
    placements = [Placement("ghost", "L", 100), Placement("vllm-2", "L", 50),
                  Placement("vllm-1", "L", 10)]
    assert longest_prefix(placements, EPS, lambda ep: ep != "vllm-2", {}) == (EPS[0], 10)
    assert longest_prefix(placements, EPS, lambda ep: False, {}) is None


def test_no_match_is_none() -> None:
    assert longest_prefix([], EPS, _all_healthy, {}) is None
    assert longest_prefix([Placement("vllm-1", "L", 0)], EPS, _all_healthy, {}) is None
