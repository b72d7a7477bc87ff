"""Per-request records of a run as JSON lines (``scripts/bench --dump-requests``): what a
run's table averages away, kept for diagnosis (which request missed, where it went, how long
it waited) and for ``scripts/bench_hindsight.py``.

The first line is ``{"meta": {...}}``: workload, load, router, repeat, fault, the TTFT
objective, and per engine (in the order their ids ``vllm-1``, ``vllm-2``, ... count) its
batch slots, wall-clock prefill ms per uncached token and the ms a request keeps its slot
after its first token. Every other line is one request: ``start`` (s), ``ok``, ``error``,
``ttft_ms`` (client), ``engine_ttft_ms``, ``engine``, ``prompt_tokens``,
``cached_tokens``, ``session``, ``step`` and ``tokens`` (the prompt's token ids, as the
simulated engines tokenize it).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .client import Record

FIELDS = ("start", "ok", "error", "ttft_ms", "engine_ttft_ms", "engine", "prompt_tokens",
          "cached_tokens", "session", "step")


def write(path: Path, meta: dict[str, Any], records: Sequence[Record],
          tokenize: Callable[[dict], list[int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write(json.dumps({"meta": meta}) + "\n")
        for r in sorted(records, key=lambda r: r.start):
            row = {k: getattr(r, k) for k in FIELDS}
            row["tokens"] = tokenize(r.body or {})
            f.write(json.dumps(row, separators=(",", ":")) + "\n")


def read(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(meta, request rows) of one dump."""
    with open(path) as f:
        first = json.loads(f.readline())
        if "meta" not in first:
            raise ValueError(f"{path}: not a request dump (no meta line)")
        return first["meta"], [json.loads(line) for line in f if line.strip()]


def name(workload: str, load: float, router: str, repeat: int) -> str:
    """The dump's file name: ``hot_prefix-80-kvgate-0.jsonl`` (``:``/``@`` made safe)."""
    safe = router.replace(":", "_").replace("@", "+").replace("=", "")
    return f"{workload}-{round(load * 100)}-{safe}-{repeat}.jsonl"
