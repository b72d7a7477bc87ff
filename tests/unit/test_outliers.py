"""Outlier detection on answers (fleet.outliers): failed answers eject with a growing
back-off that health checks do not cut short; a refused connect ejects until a health
check sees the engine accept again."""

from __future__ import annotations

from kvgate.config import OutlierConfig
from kvgate.fleet.health import HealthBook
from kvgate.fleet.outliers import OutlierDetector

from unit_support import FakeClock


def _detector(clock: FakeClock) -> tuple[OutlierDetector, HealthBook]:
    book = HealthBook(clock=clock)
    cfg = OutlierConfig(consecutive_failures=3, base_ejection_time=10.0,
                        max_ejection_time=300.0)
    return OutlierDetector(cfg, book, clock=clock), book


def test_failed_answers_in_a_row_eject_with_a_growing_back_off() -> None:
    clock = FakeClock()
    outliers, book = _detector(clock)
    assert outliers.failure("e1") is None and outliers.failure("e1") is None
    assert outliers.failure("e1") == 10.0 and not book.is_healthy("e1")
    book.mark_up("e1")  # a passing health check: an engine can answer /health and fail
    assert not book.is_healthy("e1")
    clock.advance(10.1)
    assert book.is_healthy("e1")
    for _ in range(2):
        outliers.failure("e1")
    assert outliers.failure("e1") == 20.0  # ejected a second time: twice as long


def test_a_success_resets_the_count() -> None:
    outliers, book = _detector(FakeClock())
    outliers.failure("e1")
    outliers.failure("e1")
    outliers.success("e1")
    assert outliers.failure("e1") is None and book.is_healthy("e1")


def test_a_refused_connect_ends_when_a_health_check_passes() -> None:
    """A killed engine restarted is back with the next health check, not after a
    back-off meant for engines that answer badly."""
    clock = FakeClock()
    outliers, book = _detector(clock)
    assert outliers.connect_failed("e1") == book.eject_seconds
    assert outliers.connect_failed("e1") is None  # one event, not one per request
    assert not book.is_healthy("e1")
    book.mark_up("e1")
    assert book.is_healthy("e1")
    assert outliers.connect_failed("e1") is not None
    clock.advance(book.eject_seconds + 0.1)  # without health checks: the cool-down ends
    assert book.is_healthy("e1")
