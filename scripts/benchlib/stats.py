"""One run's figures from its records: percentiles with a bootstrap confidence interval,
goodput against the workload's TTFT objective, hit ratio, imbalance."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

from .client import Record


def pct(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not sorted_values:
        return math.nan
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def bootstrap_ci(values: Sequence[float], q: float, rounds: int = 1000,
                 seed: int = 0) -> tuple[float, float]:
    """95% interval of the q-th percentile by resampling the run's own requests: how sure
    one run can make us of its p99 (run-to-run noise of the machine comes on top)."""
    if len(values) < 2:
        return (math.nan, math.nan)
    rng = random.Random(seed)
    n = len(values)
    est = sorted(pct(sorted(rng.choices(values, k=n)), q) for _ in range(rounds))
    return (est[int(0.025 * rounds)], est[int(0.975 * rounds) - 1])


def bootstrap_sum_ci(values: Sequence[float], per: Sequence[float] | float,
                     rounds: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% interval of sum(values) / sum(per) (``per`` a number: / per), resampling the
    run's requests: the hit ratio (cached / prompt tokens) and goodput (requests within
    the objective / seconds) of one run, as sure as its requests make them. Requests
    queue behind each other, so they are not independent: the machine's noise and that
    comes on top, and repeats (``--repeats``) measure it."""
    import numpy as np

    n = len(values)
    if n < 2:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(rounds, n))
    num = np.asarray(values, dtype=float)[idx].sum(axis=1)
    if isinstance(per, (int, float)):
        est = num / per
    else:
        den = np.asarray(per, dtype=float)[idx].sum(axis=1)
        est = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    lo, hi = np.quantile(est, [0.025, 0.975])
    return (float(lo), float(hi))


def summarise(records: list[Record], window: float, slo_ms: float,
              busy: dict[str, float]) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    ttft = sorted(r.ttft_ms for r in ok)
    engine = sorted(r.engine_ttft_ms for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    met = sum(1 for r in ok if r.ttft_ms <= slo_ms)
    mean_busy = sum(busy.values()) / len(busy) if busy else 0.0
    lo, hi = bootstrap_ci(ttft, 99)
    hit_lo, hit_hi = bootstrap_sum_ci([r.cached_tokens for r in ok],
                                      [r.prompt_tokens for r in ok])
    good_lo, good_hi = bootstrap_sum_ci(
        [1.0 if r.ok and r.ttft_ms <= slo_ms else 0.0 for r in records], window or 1.0)
    return {
        "requests": len(records),
        "failed": len(records) - len(ok),
        "errors": sorted({r.error for r in records if r.error}),
        "hit_ratio": round(cached / prompt, 4) if prompt else 0.0,
        "hit_ratio_ci95": [round(hit_lo, 4), round(hit_hi, 4)],
        "client_ttft_ms": {"p50": round(pct(ttft, 50), 1), "p90": round(pct(ttft, 90), 1),
                           "p99": round(pct(ttft, 99), 1),
                           "p99_ci95": [round(lo, 1), round(hi, 1)]},
        "engine_ttft_ms": {"p50": round(pct(engine, 50), 1), "p99": round(pct(engine, 99), 1)},
        "goodput_rps": round(met / window, 2),
        "goodput_ci95": [round(good_lo, 2), round(good_hi, 2)],
        "slo_met": round(met / len(records), 4) if records else 0.0,
        "imbalance": round(max(busy.values()) / mean_busy, 3) if mean_busy else 1.0,
        "window_s": round(window, 2),
    }
