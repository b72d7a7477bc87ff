"""Checks vllmcpu's patient heartbeat against lmcache 0.5.6's worker code.

Runs in .venv-vllm (lmcache). A stand-in controller (a ZMQ ROUTER on loopback) reads a
heartbeat but answers it only after the worker's receive timeout, with a full-sync command,
as a controller slow to start does. Stock 0.5.6 opens a new socket on the timeout and the
command is lost; the patched worker must get it with its next heartbeat, keep one socket,
and get no command twice. Prints OK or raises.
"""

import asyncio

import msgspec
import zmq
import zmq.asyncio
from lmcache.v1.cache_controller import worker as worker_mod
from lmcache.v1.cache_controller.commands.full_sync import FullSyncCommand
from lmcache.v1.cache_controller.message import HeartbeatMsg, HeartbeatRetMsg, Msg

from vllmcpu import lmcache_cpu_connector

RECV_MS = 300


class Worker:
    """The part of ``LMCacheWorker`` the heartbeat uses."""

    def __init__(self, ctx: zmq.asyncio.Context, url: str) -> None:
        self.ctx, self.url, self.sockets = ctx, url, 0
        self.heartbeat_socket = None
        self._create_heartbeat_socket()

    def _create_heartbeat_socket(self) -> None:
        self.sockets += 1
        self.heartbeat_socket = worker_mod.get_zmq_socket_with_timeout(
            self.ctx, self.url, "tcp", zmq.DEALER, "connect", RECV_MS, 1000)

    def _recreate_heartbeat_socket(self) -> None:
        self.heartbeat_socket.close(linger=0)
        self._create_heartbeat_socket()


def beat() -> HeartbeatMsg:
    return HeartbeatMsg(instance_id="engine-1", worker_id=0, ip="127.0.0.1", port=1,
                        peer_init_url=None)


async def main() -> None:
    lmcache_cpu_connector.install()
    send = worker_mod.LMCacheWorker._send_heartbeat_msg
    ctx = zmq.asyncio.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    w = Worker(ctx, f"127.0.0.1:{port}")
    await asyncio.sleep(0.2)  # connected

    first = await send(w, beat())  # the controller reads it but answers too late
    assert isinstance(first, HeartbeatRetMsg) and not first.commands, first
    ident, _, body = await asyncio.wait_for(router.recv_multipart(), 5)
    assert isinstance(msgspec.msgpack.decode(body, type=Msg), HeartbeatMsg)
    late = HeartbeatRetMsg(commands=[FullSyncCommand(reason="worker_re_registered")])
    await router.send_multipart([ident, b"", msgspec.msgpack.encode(late)])

    async def answer_next() -> None:
        ident, _, _ = await router.recv_multipart()
        await router.send_multipart([ident, b"", msgspec.msgpack.encode(HeartbeatRetMsg())])

    task = asyncio.create_task(answer_next())
    second = await send(w, beat())  # reads the late answer (and its own, if already there)
    await task
    got = [c for c in second.commands if isinstance(c, FullSyncCommand)]
    assert len(got) == 1, second
    third = await send(w, beat())  # its own answer may still be queued: nothing repeated
    assert not any(isinstance(c, FullSyncCommand) for c in third.commands), third
    assert w.sockets == 1, f"the heartbeat socket was recreated ({w.sockets} sockets)"
    print("OK")


if __name__ == "__main__":
    asyncio.run(main())
