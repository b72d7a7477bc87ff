"""What a placement with hindsight reaches on a run's own stream (``benchlib/hindsight.py``),
beside what each router measured and the issue's two targets for that run.

Reads the request dumps of ``scripts/bench --dump-requests`` (every router of a cell plays
the same stream), and for each (workload, load, repeat) prints:
* each router's measured hit ratio and client TTFT p99, and the same stream replayed
  through the model with that router's own choices (how far the model is from the run);
* the targets: hit ratio >= best peer's - 0.005, p99 <= 0.8 x best peer's;
* the hindsight frontier: for 0, 1, 2, ... copies, the best p99 found and its hit ratio,
  marked where both targets hold;
* the curve of an online rule (copy when a holder's queue exceeds the shortest by a gap)
  with a perfect view of the queues, for a range of gaps, * where both targets hold.

  scripts/bench --workloads hot_prefix --loads 0.8 --repeats 2 --dump-requests --out DIR
  .venv/bin/python scripts/bench_hindsight.py DIR/requests [--copies 6]

Workloads with a fault (engine_lost) are skipped: the model has no engine that dies.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import dump  # noqa: E402
from benchlib.hindsight import Engine, Request, Stream, frontier, online  # noqa: E402
from benchlib.routers import find_router  # noqa: E402
from benchlib.stats import pct  # noqa: E402

HIT_SLACK, P99_SHARE = 0.005, 0.8  # the targets
GAPS = (0, 100, 200, 300, 400, 600, 1000, 1e9)  # the online rule's, in ms (1e9: never copy)


def measured(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """(hit ratio, client TTFT p99) as the bench's table has them: succeeded requests."""
    ok = [r for r in rows if r["ok"]]
    hit = sum(r["cached_tokens"] for r in ok) / max(1, sum(r["prompt_tokens"] for r in ok))
    return hit, pct(sorted(r["ttft_ms"] for r in ok), 99)


def cell_report(runs: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]],
                copies: int) -> list[str]:
    """The lines for one (workload, load, repeat): ``runs`` maps router -> its dump."""
    meta = next(iter(runs.values()))[0]
    engines = [Engine(e["slots"], e["prefill_ms"], e["hold_ms"]) for e in meta["engines"]]
    index = {f"vllm-{i + 1}": i for i in range(len(engines))}
    # the stream as kvgate's run sent it (or the first router's): succeeded requests
    base = runs.get("kvgate") or next(iter(runs.values()))
    stream = Stream([Request(r["start"], tuple(r["tokens"])) for r in base[1] if r["ok"]],
                    engines)
    out = [f"### {meta['workload']} {meta['load']:.0%}, repeat {meta['repeat']} "
           f"({len(stream.requests)} requests)", "",
           "| router | hit ratio | p99 ms | replayed in the model: hit / p99 |",
           "|---|---:|---:|---|"]
    peers_hit, peers_p99 = [], []
    for router, (_, rows) in sorted(runs.items()):
        hit, p99 = measured(rows)
        ok = sorted((r for r in rows if r["ok"]), key=lambda r: r["start"])
        replay = "-"
        if len(ok) == len(stream.requests) and all(r["engine"] in index for r in ok):
            own = Stream([Request(r["start"], tuple(r["tokens"])) for r in ok], engines)
            rh, _, rp = own.play([], routes=[index[r["engine"]] for r in ok])
            replay = f"{rh:.4f} / {rp:.0f}"
        out.append(f"| {router} | {hit:.4f} | {p99:.0f} | {replay} |")
        if _is_peer(router):
            peers_hit.append(hit)
            peers_p99.append(p99)
    # without a peer in the cell there are no targets: the frontier alone
    want_hit = max(peers_hit) - HIT_SLACK if peers_hit else math.inf
    want_p99 = P99_SHARE * min(peers_p99) if peers_p99 else -math.inf
    out += ["", f"targets: hit ratio >= {want_hit:.4f}, p99 <= {want_p99:.0f} ms"
            if peers_hit else "(no peer in this cell: no targets)", "",
            "| copies | hit ratio | p50 ms | p99 ms | both targets | holders (engines per "
            "prompt group, most requested first) |", "|---:|---:|---:|---:|---|---|"]
    for p in frontier(stream, copies):
        both = "yes" if p.hit_ratio >= want_hit and p.p99_ms <= want_p99 else "no"
        holders = _holders(p.holders, len(engines))
        out.append(f"| {p.copies} | {p.hit_ratio:.4f} | {p.p50_ms:.0f} | {p.p99_ms:.0f} | "
                   f"{both if peers_hit else '-'} | {holders} |")
    out += ["", "online rule with a perfect view of the queues (copy when a holder's queue is "
            "over the shortest by more than the gap):", "",
            "| gap ms | " + " | ".join("never" if g >= 1e9 else f"{g:.0f}" for g in GAPS)
            + " |", "|---|" + "---:|" * len(GAPS)]
    curve = online(stream, GAPS)
    out.append("| hit / p99 | " + " | ".join(
        f"{h:.4f} / {p:.0f}" + (" *" if h >= want_hit and p <= want_p99 else "")
        for _, h, p in curve) + " |")
    return out


def _holders(holders: tuple[tuple[int, ...], ...], engines: int, most: int = 8) -> str:
    """``14 2 3``: engines 1 and 4 hold the first group... (``+`` between engines past 9);
    the most requested groups only."""
    sep = "+" if engines > 9 else ""
    text = " ".join(sep.join(str(e + 1) for e in h) for h in holders[:most])
    return text + (f" (+{len(holders) - most} more)" if len(holders) > most else "")


def _is_peer(router: str) -> bool:
    try:
        return find_router(router).peer
    except KeyError:
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dumps", type=Path, nargs="+", help="request dumps, or directories of them")
    ap.add_argument("--copies", type=int, default=6, help="most copies the search adds")
    args = ap.parse_args()
    files = [f for p in args.dumps for f in (sorted(p.glob("*.jsonl")) if p.is_dir() else [p])]
    if not files:
        ap.error("no request dumps found (scripts/bench --dump-requests writes them)")
    cells: dict[tuple[str, float, int], dict[str, Any]] = {}
    for f in files:
        meta, rows = dump.read(f)
        key = (meta["workload"], meta["load"], meta["repeat"])
        cells.setdefault(key, {})[meta["router"]] = (meta, rows)
    for key in sorted(cells):
        meta = next(iter(cells[key].values()))[0]
        if meta.get("fault"):
            print(f"### {key[0]}: skipped (a fault: {meta['fault']})\n")
            continue
        print("\n".join(cell_report(cells[key], args.copies)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
