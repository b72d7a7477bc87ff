"""CircuitBreaker state machine with a fake clock."""

from __future__ import annotations

import pytest

from kvgate.clients.breaker import CircuitBreaker, State

from unit_support import FakeClock


def _breaker(clock: FakeClock, threshold: int = 3, recovery: float = 10.0,
             half_open: int = 2) -> CircuitBreaker:
    return CircuitBreaker("t", threshold, recovery, half_open, clock=clock)


def test_opens_after_threshold_consecutive_failures(clock: FakeClock) -> None:
    cb = _breaker(clock, threshold=3)
    for _ in range(2):
        assert cb.allow()
        cb.failure()
    assert cb.state is State.CLOSED
    assert cb.allow()
    cb.failure()
    assert cb.state is State.OPEN
    assert cb.times_opened == 1
    assert not cb.allow()
    assert not cb.allow()
    assert cb.rejected == 2


def test_success_resets_the_failure_count(clock: FakeClock) -> None:
    cb = _breaker(clock, threshold=3)
    cb.failure()
    cb.failure()
    cb.success()
    cb.failure()
    cb.failure()
    assert cb.state is State.CLOSED
    assert cb.snapshot()["consecutive_failures"] == 2


def test_half_open_after_recovery_timeout_limits_calls(clock: FakeClock) -> None:
    cb = _breaker(clock, threshold=1, recovery=10.0, half_open=2)
    cb.failure()
    clock.advance(9.9)
    assert cb.state is State.OPEN
    assert not cb.allow()
    clock.advance(0.1)
    assert cb.state is State.HALF_OPEN
    assert cb.allow()
    assert cb.allow()
    assert not cb.allow()  # at most half_open_max_calls trial calls
    assert cb.state is State.HALF_OPEN


def test_half_open_success_closes(clock: FakeClock) -> None:
    cb = _breaker(clock, threshold=1, recovery=5.0, half_open=1)
    cb.failure()
    clock.advance(5)
    assert cb.allow()
    cb.success()
    assert cb.state is State.CLOSED
    assert all(cb.allow() for _ in range(5))  # no half-open slot limit any more


def test_half_open_failure_reopens_for_a_full_timeout(clock: FakeClock) -> None:
    cb = _breaker(clock, threshold=3, recovery=5.0, half_open=2)
    for _ in range(3):
        cb.failure()
    clock.advance(5)
    assert cb.allow()
    cb.failure()  # one failure in half-open is enough, whatever the threshold
    assert cb.state is State.OPEN
    assert cb.times_opened == 2
    clock.advance(4.9)
    assert not cb.allow()
    clock.advance(0.1)
    assert cb.state is State.HALF_OPEN


def test_release_gives_back_a_half_open_slot(clock: FakeClock) -> None:
    cb = _breaker(clock, threshold=1, recovery=1.0, half_open=1)
    cb.failure()
    clock.advance(1)
    assert cb.allow()
    assert not cb.allow()
    cb.release()
    assert cb.allow()


@pytest.mark.parametrize(("threshold", "half_open"), [(0, 0), (-3, -1)])
def test_non_positive_knobs_are_clamped_to_one(clock: FakeClock, threshold: int,
                                                half_open: int) -> None:
    cb = _breaker(clock, threshold=threshold, recovery=1.0, half_open=half_open)
    assert cb.allow()
    cb.failure()
    assert cb.state is State.OPEN
    clock.advance(1)
    assert cb.allow()
    assert not cb.allow()


def test_snapshot_reports_state(clock: FakeClock) -> None:
    cb = _breaker(clock, threshold=1)
    cb.failure()
    cb.allow()
    snap = cb.snapshot()
    assert snap == {"state": "open", "consecutive_failures": 1, "times_opened": 1,
                    "rejected": 1}
