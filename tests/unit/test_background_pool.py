"""BoundedPool: fixed threads and a fixed queue; work beyond capacity is dropped, counted."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from kvgate.cache_management.pool import BoundedPool

from unit_support import wait_for


class Tracker:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.running = 0
        self.max_running = 0
        self.started: list[int] = []
        self.finished: list[int] = []

    def task(self, i: int) -> Callable[[], None]:
        def run() -> None:
            with self.lock:
                self.running += 1
                self.max_running = max(self.max_running, self.running)
                self.started.append(i)
            self.release.wait(5)
            with self.lock:
                self.running -= 1
                self.finished.append(i)

        return run


@pytest.fixture
def tracker() -> Tracker:
    t = Tracker()
    yield t
    t.release.set()


def test_drops_and_counts_when_full(tracker: Tracker) -> None:
    pool = BoundedPool("t", workers=2, queue=1)
    try:
        accepted = [pool.submit(tracker.task(i)) for i in range(6)]
        assert accepted == [True, True, True, False, False, False]
        assert pool.dropped == 3
        assert pool.submitted == 3
        assert pool.capacity == 3
        assert wait_for(lambda: len(tracker.started) == 2)
        assert not wait_for(lambda: len(tracker.started) > 2, timeout=0.1)  # 1 queued, waiting
        assert pool.snapshot()["pending"] == 3

        tracker.release.set()
        assert wait_for(lambda: pool.pending == 0)
        assert sorted(tracker.finished) == [0, 1, 2]  # the dropped ones never ran
        assert tracker.max_running == 2
    finally:
        pool.shutdown()


def test_capacity_comes_back_after_work_finishes(tracker: Tracker) -> None:
    pool = BoundedPool("t", workers=1, queue=0)
    try:
        assert pool.submit(tracker.task(0))
        assert not pool.submit(tracker.task(1))
        tracker.release.set()
        assert wait_for(lambda: pool.pending == 0)
        done = threading.Event()
        assert pool.submit(done.set)
        assert done.wait(2)
        assert pool.dropped == 1
        assert pool.submitted == 2
    finally:
        pool.shutdown()


def test_failing_task_is_counted_and_frees_its_slot() -> None:
    pool = BoundedPool("t", workers=1, queue=0)
    try:
        def boom() -> None:
            raise RuntimeError("task failed")

        assert pool.submit(boom)
        assert wait_for(lambda: pool.pending == 0)
        assert pool.failed == 1
        done = threading.Event()
        assert pool.submit(done.set)
        assert done.wait(2)
    finally:
        pool.shutdown()


def test_submit_after_shutdown_is_refused_without_leaking_a_slot() -> None:
    pool = BoundedPool("t", workers=1, queue=0)
    pool.shutdown()
    assert pool.submit(lambda: None) is False
    assert pool.pending == 0
    assert pool.submit(lambda: None) is False  # the slot was given back, still refused


def test_many_submitters_never_exceed_capacity(tracker: Tracker) -> None:
    pool = BoundedPool("t", workers=3, queue=2)
    results: list[bool] = []
    lock = threading.Lock()

    def submitter(base: int) -> None:
        for i in range(10):
            ok = pool.submit(tracker.task(base + i))
            with lock:
                results.append(ok)

    try:
        threads = [threading.Thread(target=submitter, args=(k * 100,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results.count(True) == pool.capacity == 5
        assert pool.dropped == 35
        assert wait_for(lambda: len(tracker.started) == 3)
        tracker.release.set()
        assert wait_for(lambda: pool.pending == 0)
        assert len(tracker.finished) == 5
        assert tracker.max_running <= 3
    finally:
        pool.shutdown()
