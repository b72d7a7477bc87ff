"""The routing benchmark's workloads: request streams that tell routers apart.

A workload is a list of sessions. A session is a list of steps played in order (a chat's
turns); each step builds its request body from the session's state, so a chat's history
grows with the answers actually received. Sessions start by the arrival process; a
session's next step starts when its previous answer has arrived (no think time).

Each workload also says what cluster it runs on (engines, their capacities, one that
differs, a fault) and its TTFT objective for goodput. Prompts are words ``w<n>``: the
simulated engines' tokenizer makes one token of each, so sizes below are in tokens.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Step = Callable[[dict], dict]

# the cluster every workload runs on unless it says otherwise: GPU and CPU-tier caches
# below the working sets, so where a prompt goes decides what is cached. The engines'
# model is the simulator's 8B-on-an-H100, played three times slower (about a 70B model's
# speed): the Python simulator and client on this 2-core machine then keep up, and wall
# times stay close to model times x 3. Routers pay their own cost in full at that speed.
BASE_ENGINE = {"gpu_tokens": 12_000, "cpu_tokens": 16_000, "batch_slots": 3,
               "max_output": 8, "time_scale": 3.0}


@dataclass
class Workload:
    name: str
    note: str
    sessions: list[list[Step]]
    slo_ms: float
    """Client-side TTFT objective: goodput counts the requests that meet it."""
    engines: int = 4
    params: dict[str, Any] = field(default_factory=lambda: dict(BASE_ENGINE))
    per_engine: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Engine index -> parameters that differ (heterogeneous fleets)."""
    fault: str = ""
    """``lose_engine``: engine 2 is killed a third of the way in and restarted, empty,
    at two thirds."""

    @property
    def requests(self) -> int:
        return sum(len(s) for s in self.sessions)

    @property
    def steps_per_session(self) -> float:
        return self.requests / max(len(self.sessions), 1)

    @property
    def slots(self) -> int:
        return sum(self.per_engine.get(i, {}).get("batch_slots", self.params["batch_slots"])
                   for i in range(self.engines))


SIZE = 1.0
"""Prompt sizes, as a share of the above: ``scripts/bench --real`` halves them (the tiny
model's tokenizer makes about four tokens of a word, its engines hold 4,096)."""


def _words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(50_000)}" for _ in range(max(1, round(n * SIZE))))


def _chat(rng: random.Random, turns: int, system_tokens: int) -> list[Step]:
    system = _words(rng, system_tokens)
    questions = [_words(rng, 60) for _ in range(turns)]

    def turn(t: int) -> Step:
        def step(state: dict) -> dict:
            hist = state.setdefault("messages", [{"role": "system", "content": system}])
            hist.append({"role": "user", "content": questions[t]})
            return {"messages": list(hist)}
        return step

    return [turn(t) for t in range(turns)]


def _one(build: Callable[[], dict]) -> list[Step]:
    """A one-request session; its body is built when sent (long prompts stay unjoined)."""
    return [lambda state: build()]


def _zipf(rng: random.Random, items: list, s: float = 1.2) -> Any:
    return rng.choices(items, [1 / (i + 1) ** s for i in range(len(items))])[0]


def multi_turn_chat(rng: random.Random, n: int) -> Workload:
    turns = 4
    sessions = [_chat(rng, turns, 800) for _ in range(max(1, n // turns))]
    return Workload("multi_turn_chat", f"conversations of {turns} turns, a private 800-token "
                    "system prompt each, 60-token questions", sessions, slo_ms=300)


def _hot(rng: random.Random, systems: list[str]) -> list[Step]:
    system, question = _zipf(rng, systems), _words(rng, 30)
    return _one(lambda: {"messages": [{"role": "system", "content": system},
                                      {"role": "user", "content": question}]})


def hot_prefix(rng: random.Random, n: int) -> Workload:
    systems = [_words(rng, 1000) for _ in range(6)]
    sessions = [_hot(rng, systems) for _ in range(n)]
    return Workload("hot_prefix", "short questions under 6 Zipf-popular 1000-token system "
                    "prompts", sessions, slo_ms=250)


def _qa(doc: str, question: str) -> list[Step]:
    return _one(lambda: {"prompt": f"Context: {doc}\nQuestion: {question}\nAnswer:"})


def rag(rng: random.Random, n: int) -> Workload:
    docs = [_words(rng, 1500) for _ in range(40)]
    sessions = [_qa(docs[min(int(rng.expovariate(1 / 10)), 39)], _words(rng, 40))
                for _ in range(n)]
    return Workload("rag", "questions over 40 documents of 1500 tokens (popularity falls "
                    "off exponentially)", sessions, slo_ms=300)


def _prompt(text: str) -> list[Step]:
    return _one(lambda: {"prompt": text})


def unique(rng: random.Random, n: int) -> Workload:
    sessions = [_prompt(_words(rng, 600)) for _ in range(n)]
    return Workload("unique", "600-token prompts, no reuse: nothing to gain, only to lose",
                    sessions, slo_ms=200)


def _mixed_sessions(rng: random.Random, n: int) -> list[list[Step]]:
    systems = [_words(rng, 1000) for _ in range(6)]
    sessions: list[list[Step]] = []
    made = 0
    while made < n:
        kind = rng.random()
        if kind < 0.4:
            s = _chat(rng, 3, 800)
        elif kind < 0.8:
            s = _hot(rng, systems)
        else:
            s = _prompt(_words(rng, 600))
        sessions.append(s)
        made += len(s)
    return sessions


def mixed(rng: random.Random, n: int) -> Workload:
    return Workload("mixed", "interleaved: 3-turn chats, hot system prompts, unique prompts",
                    _mixed_sessions(rng, n), slo_ms=300)


def long_context(rng: random.Random, n: int) -> Workload:
    docs = [_words(rng, rng.randrange(16_000, 32_001)) for _ in range(8)]
    sessions = [_qa(_zipf(rng, docs, 1.0), _words(rng, 40)) for _ in range(n)]
    # played at the model's own speed: a miss already costs over a second of prefill
    return Workload("long_context", "questions over 8 documents of 16-32k tokens: a miss "
                    "costs over a second of prefill", sessions, slo_ms=1000,
                    params={**BASE_ENGINE, "gpu_tokens": 70_000, "cpu_tokens": 100_000,
                            "time_scale": 1.0})


def heterogeneous(rng: random.Random, n: int) -> Workload:
    half = {"batch_slots": 1, "gpu_tokens": 6_000, "cpu_tokens": 8_000}
    return Workload("heterogeneous", "the mixed stream; engine 4 has a third of the batch "
                    "slots and half the cache", _mixed_sessions(rng, n), slo_ms=300,
                    per_engine={3: half})


def engine_lost(rng: random.Random, n: int) -> Workload:
    return Workload("engine_lost", "the mixed stream; engine 2 is killed a third of the way "
                    "in and comes back empty at two thirds", _mixed_sessions(rng, n),
                    slo_ms=300, fault="lose_engine")


def sixteen_engines(rng: random.Random, n: int) -> Workload:
    return Workload("sixteen_engines", "the mixed stream on 16 engines of one batch slot "
                    "each: the cache is spread thin", _mixed_sessions(rng, n), slo_ms=300,
                    engines=16, params={**BASE_ENGINE, "batch_slots": 1})


WORKLOADS: dict[str, Callable[[random.Random, int], Workload]] = {
    f.__name__: f for f in (multi_turn_chat, hot_prefix, rag, unique, mixed, long_context,
                            heterogeneous, engine_lost, sixteen_engines)}
