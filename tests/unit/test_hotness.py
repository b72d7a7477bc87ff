"""HotTracker: the pinning signal, with a fake clock."""

from __future__ import annotations

import pytest

from kvgate.cache_management.hotness import MIN_SWEEP_INTERVAL, HotTracker, sweep_interval

from unit_support import FakeClock


@pytest.mark.parametrize(("window", "interval"), [(10, 5), (300, 150), (40, 30), (60, 30),
                                                  (61, 30.5), (30, 15), (0, 0), (-5, 0)])
def test_sweep_interval_rule(window: float, interval: float) -> None:
    assert sweep_interval(window) == interval


def test_sweep_interval_never_below_floor_for_long_windows() -> None:
    for window in (31, 45, 59.9, 100, 3600):
        got = sweep_interval(window)
        assert got >= MIN_SWEEP_INTERVAL
        assert got == max(window / 2, MIN_SWEEP_INTERVAL)


def test_counts_within_the_window(clock: FakeClock) -> None:
    hot = HotTracker(window=10, max_records=100, max_keys=0, clock=clock)
    for _ in range(3):
        hot.record("k")
        clock.advance(1)  # sightings at t0, t0+1, t0+2; now t0+3
    assert hot.count("k") == 3
    assert hot.count("other") == 0
    clock.advance(8.5)  # now t0+11.5: t0 and t0+1 are older than the 10 s window
    assert hot.count("k") == 1
    clock.advance(1)  # t0+12.5: the last sighting (t0+2) has left the window too
    assert hot.count("k") == 0
    assert len(hot) == 0  # an emptied key is dropped


def test_is_hot_threshold(clock: FakeClock) -> None:
    hot = HotTracker(window=60, max_records=100, max_keys=0, clock=clock)
    hot.record("k")
    assert not hot.is_hot("k", 2)
    hot.record("k")
    assert hot.is_hot("k", 2)
    assert not hot.is_hot("k", 0)  # 0 means pinning by hotness is off


def test_max_records_caps_each_key(clock: FakeClock) -> None:
    hot = HotTracker(window=60, max_records=3, max_keys=0, clock=clock)
    for _ in range(7):
        hot.record("k")
        clock.advance(0.1)
    assert hot.count("k") == 3
    assert hot.is_hot("k", 3)
    assert not hot.is_hot("k", 4)


def test_max_keys_evicts_least_recently_seen(clock: FakeClock) -> None:
    hot = HotTracker(window=60, max_records=10, max_keys=2, clock=clock)
    hot.record("a")
    clock.advance(1)
    hot.record("b")
    clock.advance(1)
    hot.record("a")  # a is now more recent than b
    clock.advance(1)
    hot.record("c")  # three keys > 2: b, the least recently seen, goes
    assert len(hot) == 2
    assert hot.count("b") == 0
    assert hot.count("a") == 2
    assert hot.count("c") == 1


def test_max_keys_drops_expired_keys_before_live_ones(clock: FakeClock) -> None:
    hot = HotTracker(window=10, max_records=10, max_keys=3, clock=clock)
    hot.record("old1")
    hot.record("old2")
    clock.advance(5)
    hot.record("live")
    clock.advance(6)  # old1 and old2 (11 s old) have expired; live (6 s) has not
    hot.record("new")
    # every expired key is dropped, not just as many as the cap needs; live ones stay
    assert len(hot) == 2
    assert hot.count("live") == 1
    assert hot.count("new") == 1
    assert hot.count("old1") == hot.count("old2") == 0


def test_periodic_sweep_drops_expired_keys(clock: FakeClock) -> None:
    hot = HotTracker(window=10, max_records=10, max_keys=0, clock=clock)
    for i in range(5):
        hot.record(f"k{i}")
    assert len(hot) == 5 and hot.sweeps == 0
    clock.advance(4.9)  # below the 5 s sweep interval: no sweep
    hot.record("fresh")
    assert hot.sweeps == 0
    clock.advance(6)  # 10.9 s since the first keys: expired; 10.9 >= 5: sweep on record
    hot.record("fresh")
    assert hot.sweeps == 1
    assert len(hot) == 1
    assert hot.count("fresh") == 2


def test_zero_window_records_nothing(clock: FakeClock) -> None:
    hot = HotTracker(window=0, max_records=10, max_keys=0, clock=clock)
    hot.record("k")
    assert hot.count("k") == 0
    assert len(hot) == 0
