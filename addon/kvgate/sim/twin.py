"""The twin controller: the LMCache controller's HTTP API, fed by simulated engines.

Same paths and answer shapes as lmcache 0.5.6 (REFERENCE.md section 2): ``layout_info``
as ``{id: [location, tokens]}``, no ``/evict`` (404), errors 500 ``{"detail": ...}``.
Engines register (``/_twin/register``) and report admitted/evicted chunk keys
(``/_twin/ops``); pin/compress/move/clear are forwarded to the engine that holds the
tokens. It starts in milliseconds, for the demo and the fast tests.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.request
from typing import Any

from .cache import ChunkKey, chunk_keys
from .stub import StubApp, _Handler

LOCATION = "LocalCPUBackend"


class TwinController(StubApp):
    def __init__(self) -> None:
        super().__init__()
        self.record = False
        self.engines: dict[str, str] = {}  # instance id -> base URL
        self.held: dict[str, set[ChunkKey]] = {}
        self.registered_at: dict[str, float] = {}

    def lookup(self, tokens: list[int]) -> dict[str, list[Any]]:
        """As lmcache 0.5.6 answers: chunk by chunk, the first registered instance that
        holds the chunk is credited up to its end; the walk stops at the first chunk nobody
        holds. So when two engines hold the same prefix only the earlier registered one is
        named (an instance is named with the end of the last chunk credited to it)."""
        out: dict[str, list[Any]] = {}
        with self.lock:
            for _, end, key in chunk_keys(tokens):
                holder = next((iid for iid, held in self.held.items() if key in held), None)
                if holder is None:
                    break
                out[holder] = [LOCATION, end]
        return out

    def _forward(self, instance_id: str, action: dict[str, Any]) -> dict[str, Any]:
        url = self.engines.get(instance_id)
        if url is None:
            raise LookupError(f"instance {instance_id!r} is not registered")
        req = urllib.request.Request(url + "/_sim/action", data=json.dumps(action).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 (loopback)
            return json.loads(resp.read())

    def serve(self, h: _Handler, method: str, path: str, body: Any, raw: bytes) -> None:
        if method != "POST":
            h._send(405, {"detail": "Method Not Allowed"})
            return
        if not isinstance(body, dict):
            h._send(422, {"detail": "body must be a JSON object"})
            return
        event = {"event_id": f"evt-{time.monotonic_ns()}"}
        try:
            answer = self.answer(path, body)
        except (LookupError, KeyError, TypeError, ValueError, OSError) as exc:
            h._send(500, {"detail": str(exc)})
            return
        if answer is None:
            h._send(404, {"detail": "Not Found"})
            return
        h._send(200, {**event, **answer} if not path.startswith("/_twin/") else answer)

    def answer(self, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        tokens = body.get("tokens") or []
        if path == "/_twin/register":
            with self.lock:  # an engine registers as it starts, holding nothing yet
                self.engines[body["instance_id"]] = body["url"]
                self.held[body["instance_id"]] = set()
                self.registered_at[body["instance_id"]] = time.time()
            return {"ok": True}
        if path == "/_twin/reset":  # every engine was reset: nobody holds anything
            with self.lock:
                self.held = {iid: set() for iid in self.held}
            return {"ok": True}
        if path == "/_twin/ops":
            with self.lock:
                held = self.held.setdefault(body["instance_id"], set())
                held.update(body.get("admitted", []))
                held.difference_update(body.get("evicted", []))
            return {"ok": True}
        if path == "/lookup":
            return {"layout_info": self.lookup(tokens)}
        if path == "/pin":
            ret = self._forward(body["instance_id"], {"op": "pin", "tokens": tokens})
            return {"num_tokens": ret["num_tokens"]}
        if path in ("/compress", "/decompress"):
            ret = self._forward(body["instance_id"], {"op": path[1:], "tokens": tokens,
                                                      "method": body.get("method")})
            return {"num_tokens": ret["num_tokens"]}
        if path == "/move":
            # As lmcache 0.5.6 answers when workers have no peer_init_url (P2P off).
            old, new = body["old_position"], body["new_position"]
            raise LookupError(
                f"Src worker 0 not registered for instance {old[0]} or dst worker 0 not "
                f"registered for instance {new[0]} or P2P is not enabled.")
        if path == "/clear":
            ret = self._forward(body["instance_id"], {"op": "clear"})
            return {"num_tokens": ret["num_tokens"]}
        if path == "/health":
            ret = self._forward(body["instance_id"], {"op": "health"})
            return {"error_codes": {"0": ret.get("error_code", 1)}}
        if path == "/check_finish":
            return {"status": "finished"}
        if path == "/query_worker_info":
            infos = [
                {"instance_id": iid, "worker_id": 0, "ip": url.split("//")[1].split(":")[0],
                 "port": int(url.rsplit(":", 1)[1]), "peer_init_url": None,
                 "registration_time": self.registered_at.get(iid, 0.0),
                 "last_heartbeat_time": self.registered_at.get(iid, 0.0)}
                for iid, url in self.engines.items()
                if body.get("instance_id") in (iid, "all")
            ]
            return {"worker_infos": infos}
        return None


class TwinReporter:
    """An engine's side: register with the twin and send chunk admits/evicts off-thread."""

    def __init__(self, controller_url: str, instance_id: str, engine_url: str) -> None:
        self.url = controller_url.rstrip("/")
        self.instance_id = instance_id
        self.engine_url = engine_url
        # None is the stop sentinel: it is sent after every report already queued
        self._q: queue.Queue[tuple[list[ChunkKey], list[ChunkKey]] | None] = queue.Queue()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"twin-{instance_id}")
        self._thread.start()

    def _post(self, path: str, payload: dict[str, Any]) -> None:
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 (loopback)
            resp.read()

    def register(self) -> None:
        self._post("/_twin/register", {"instance_id": self.instance_id, "url": self.engine_url})

    def report(self, admitted: list[ChunkKey], evicted: list[ChunkKey]) -> None:
        """Enqueue only (the engine calls this under its cache lock); dropped once stopped."""
        if not self._stopped:
            self._q.put((admitted, evicted))

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until every report so far has reached the controller (tests, demo)."""
        end = time.monotonic() + timeout
        while self._q.unfinished_tasks and time.monotonic() < end:
            time.sleep(0.002)

    def stop(self, timeout: float = 5.0) -> None:
        """End the sender thread once what is queued has been sent, so that a stopped
        cluster (or a failed start retried on other ports) leaves no thread behind."""
        if not self._stopped:
            self._stopped = True
            self._q.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is None:
                    return
                admitted, evicted = item
                self._post("/_twin/ops", {"instance_id": self.instance_id, "location": LOCATION,
                                          "admitted": admitted, "evicted": evicted})
            except OSError:
                pass  # the controller is down: the engine keeps serving
            finally:
                self._q.task_done()
