"""A simulated engine's LMCache worker: the real controller's ZMQ protocol (lmcache 0.5.6).

Runs inside the venv that has lmcache (``.venv-lmcache``, made by
``scripts/lmcache-controller``), with ``PYTHONHASHSEED=0`` so chunk keys equal the ones
the controller computes for ``/lookup``. It registers (DEALER -> ROUTER, reply port),
pushes ADMIT/EVICT batches (PUSH -> PULL, pull port), answers the controller's
pin/compress/decompress/clear/move/health requests on its REP socket by acting on the
engine's cache model, and re-registers and re-sends what it holds when the controller
comes back after a restart.

What it holds goes out as a full sync (FullSyncStart, batches, FullSyncEnd), as the real
worker answers a FullSyncCommand: a controller asks every worker for one after it starts
and keeps asking, in each heartbeat reply, until the worker's sync is complete.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import zmq
from lmcache.v1.cache_controller import message as m
from lmcache.v1.token_database import ChunkedTokenDatabase

log = logging.getLogger("kvgate.sim")
LOCATION = "LocalCPUBackend"
SYNC_BATCH = 2000  # keys per FullSyncBatchMsg (lmcache's full_sync_batch_size default)

_db = ChunkedTokenDatabase()


def lmcache_chunk_keys(tokens: Sequence[int]) -> list[tuple[int, int, int]]:
    """LMCache's own chunk hashing, as the controller applies it to /lookup tokens."""
    return [(s, e, int(k)) for s, e, k in _db.process_tokens(list(tokens), make_key=False)]


class LMCacheWorker:
    def __init__(self, instance_id: str, host: str, reply_port: int, pull_port: int,
                 rep_port: int, act: Callable[[dict[str, Any]], dict[str, Any]],
                 held_keys: Callable[[], list[int]], heartbeat: float = 2.0) -> None:
        self.instance_id = instance_id
        self.host = host
        self.reply_url = f"tcp://{host}:{reply_port}"
        self.pull_url = f"tcp://{host}:{pull_port}"
        self.rep_port = rep_port
        self.act = act
        self.held_keys = held_keys
        self.heartbeat = heartbeat
        self.ctx = zmq.Context.instance()
        self._ops: queue.Queue[tuple[list[int], list[int]]] = queue.Queue()
        self._seq = 0
        self.registered = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------ engine side

    def report(self, admitted: list[int], evicted: list[int]) -> None:
        self._ops.put((admitted, evicted))

    def start(self) -> None:
        self._threads = [
            threading.Thread(target=self._control_loop, daemon=True, name="lmc-rep"),
            threading.Thread(target=self._push_loop, daemon=True, name="lmc-push"),
        ]
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop both loops and wait for them, so their sockets are closed on return."""
        self._stop.set()
        end = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))

    # ------------------------------------------------------------ registration + ops

    def _dealer(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 1000)
        sock.setsockopt(zmq.SNDTIMEO, 1000)
        sock.connect(self.reply_url)
        return sock

    def _ask(self, sock: zmq.Socket, msg: Any) -> Any:
        sock.send_multipart([b"", msgspec.msgpack.encode(msg)])
        frames = sock.recv_multipart()
        return msgspec.msgpack.decode(frames[-1], type=m.Msg)

    def _register(self, sock: zmq.Socket) -> bool:
        try:
            ret = self._ask(sock, m.RegisterMsg(instance_id=self.instance_id, worker_id=0,
                                                ip=self.host, port=self.rep_port,
                                                peer_init_url=None))
        except zmq.ZMQError:
            return False
        return isinstance(ret, m.RegisterRetMsg)

    @staticmethod
    def heartbeat_ok(ret: Any) -> bool:
        """A plain HeartbeatRetMsg: the controller knows us and holds what we sent.

        Anything else (an ErrorMsg, or commands such as FullSyncCommand after the
        controller restarted and re-registered us with nothing held) means register
        again and resend what we hold.
        """
        return isinstance(ret, m.HeartbeatRetMsg) and not ret.commands

    def _sync(self, dealer: zmq.Socket, push: zmq.Socket) -> None:
        """Send everything held as a full sync; a plain ADMIT batch if it is refused."""
        keys = self.held_keys()
        sync_id = uuid.uuid4().hex
        batches = [keys[i:i + SYNC_BATCH] for i in range(0, len(keys), SYNC_BATCH)]
        try:
            ret = self._ask(dealer, m.FullSyncStartMsg(
                instance_id=self.instance_id, worker_id=0, location=LOCATION, sync_id=sync_id,
                total_keys=len(keys), batch_count=len(batches)))
        except zmq.ZMQError:
            ret = None
        if not (isinstance(ret, m.FullSyncStartRetMsg) and ret.accepted):
            self._push(push, keys, [])
            return
        for batch_id, batch in enumerate(batches):
            push.send(msgspec.msgpack.encode(m.FullSyncBatchMsg(
                instance_id=self.instance_id, worker_id=0, location=LOCATION,
                sync_id=sync_id, batch_id=batch_id, keys=batch)))
        push.send(msgspec.msgpack.encode(m.FullSyncEndMsg(
            instance_id=self.instance_id, worker_id=0, location=LOCATION, sync_id=sync_id,
            actual_total_keys=len(keys))))

    def _push(self, push: zmq.Socket, admitted: list[int], evicted: list[int]) -> None:
        ops = []
        for key in admitted:
            ops.append(m.KVOpEvent(op_type=m.OpType.ADMIT, key=key, seq_num=self._seq))
            self._seq += 1
        for key in evicted:
            ops.append(m.KVOpEvent(op_type=m.OpType.EVICT, key=key, seq_num=self._seq))
            self._seq += 1
        if ops:
            push.send_multipart([msgspec.msgpack.encode(m.BatchedKVOperationMsg(
                instance_id=self.instance_id, worker_id=0, location=LOCATION, operations=ops))])

    def _push_loop(self) -> None:
        push = self.ctx.socket(zmq.PUSH)
        dealer: zmq.Socket | None = None
        try:
            push.setsockopt(zmq.LINGER, 0)
            push.connect(self.pull_url)
            dealer = self._dealer()
            next_beat = 0.0
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_beat:
                    next_beat = now + self.heartbeat
                    if not self.registered.is_set():
                        if self._register(dealer):
                            self.registered.set()
                            self._sync(dealer, push)  # (re)send what we hold
                        else:
                            dealer.close()
                            dealer = self._dealer()
                    else:
                        try:
                            ret = self._ask(dealer, m.HeartbeatMsg(
                                instance_id=self.instance_id, worker_id=0, ip=self.host,
                                port=self.rep_port, peer_init_url=None))
                        except zmq.ZMQError:
                            # the controller went away: register again when it is back
                            self.registered.clear()
                            dealer.close()
                            dealer = self._dealer()
                            next_beat = now + 0.5
                        else:
                            if not self.heartbeat_ok(ret):
                                log.info("[kvgate-sim] heartbeat answered %r: registering "
                                         "again", ret)
                                self.registered.clear()
                                next_beat = now  # at once, on the same (working) socket
                try:
                    admitted, evicted = self._ops.get(timeout=0.05)
                except queue.Empty:
                    continue
                if self.registered.is_set():
                    self._push(push, admitted, evicted)
        finally:
            push.close(linger=0)
            if dealer is not None:
                dealer.close(linger=0)

    # ------------------------------------------------------------ control requests

    def _control_loop(self) -> None:
        rep = self.ctx.socket(zmq.REP)
        try:
            rep.setsockopt(zmq.LINGER, 0)
            rep.bind(f"tcp://{self.host}:{self.rep_port}")
            poller = zmq.Poller()
            poller.register(rep, zmq.POLLIN)
            while not self._stop.is_set():
                if not poller.poll(200):
                    continue
                raw = rep.recv()
                try:
                    req = msgspec.msgpack.decode(raw, type=m.Msg)
                    ret = self._answer(req)
                except Exception as exc:  # answer something: a REP socket must reply
                    log.warning("[kvgate-sim] control request failed: %r", exc)
                    ret = m.HealthWorkerRetMsg(error_code=1)
                rep.send(msgspec.msgpack.encode(ret))
        finally:
            rep.close(linger=0)

    def _answer(self, req: Any) -> Any:
        tokens = list(getattr(req, "tokens", None) or [])
        if isinstance(req, m.PinWorkerMsg):
            return m.PinWorkerRetMsg(num_tokens=self.act({"op": "pin", "tokens": tokens})
                                     ["num_tokens"])
        if isinstance(req, m.CompressWorkerMsg):
            return m.CompressWorkerRetMsg(
                num_tokens=self.act({"op": "compress", "tokens": tokens})["num_tokens"])
        if isinstance(req, m.DecompressWorkerMsg):
            return m.DecompressWorkerRetMsg(
                num_tokens=self.act({"op": "decompress", "tokens": tokens})["num_tokens"])
        if isinstance(req, m.ClearWorkerMsg):
            return m.ClearWorkerRetMsg(num_tokens=self.act({"op": "clear"})["num_tokens"])
        if isinstance(req, m.MoveWorkerMsg):
            return m.MoveWorkerRetMsg(num_tokens=self.act(
                {"op": "move", "tokens": tokens, "copy": bool(req.copy)})["num_tokens"])
        if isinstance(req, m.HealthWorkerMsg):
            return m.HealthWorkerRetMsg(error_code=0)
        if isinstance(req, m.CheckFinishWorkerMsg):
            return m.CheckFinishWorkerRetMsg(status="finished")
        raise TypeError(f"unexpected control message {type(req).__name__}")
