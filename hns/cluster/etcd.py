"""The etcd client: etcd3gw's JSON-gateway client behind a small typed surface.

Theory of operation: :class:`Etcd` holds one :class:`etcd3gw.client.Etcd3Client` per
endpoint and sends each request to the endpoint that answered last; one that refuses,
times out or answers 5xx is passed over for the next, so one member down changes
nothing.  When no endpoint answers the call raises :class:`ClusterError` (exit 1), one
line naming etcd and each endpoint's failure.  Keys and values are text here and base64
on the wire (the gateway's encoding).  The watch is read here rather than by etcd3gw's
``Watcher``, which drops the compaction and cancel notices and does not say when its
stream ends: :meth:`Etcd.watch` yields :class:`Event` values and raises
:class:`WatchLost` (with the compacted revision when that was the cause), after which
the caller lists again.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import Etcd3Exception

from hns.cluster.config import parse_endpoints
from hns.errors import ClusterError

__all__ = ["ClusterError", "Etcd", "Event", "KeyValue", "WatchLost", "parse_endpoints",
           "prefix_end"]

T = TypeVar("T")
DEFAULT_TIMEOUT = 3.0      # s for one request to one endpoint


class WatchLost(Exception):
    """The watch stream ended; ``compacted``: the revision etcd compacted to, if that
    was why (the caller lists again either way)."""

    def __init__(self, why: str, compacted: int = 0) -> None:
        super().__init__(why)
        self.compacted = compacted


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: str
    mod_revision: int
    create_revision: int
    lease: int


@dataclass(frozen=True)
class Event:
    """One change: a put (``kv`` is the new value) or a delete (``kv.value`` empty)."""

    deleted: bool
    kv: KeyValue


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _text(data: str | None) -> str:
    return base64.b64decode(data).decode() if data else ""


def prefix_end(prefix: str) -> str:
    """The range end that covers every key starting with ``prefix``."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _kv(raw: dict[str, Any]) -> KeyValue:
    return KeyValue(_text(raw.get("key")), _text(raw.get("value")),
                    int(raw.get("mod_revision", 0)), int(raw.get("create_revision", 0)),
                    int(raw.get("lease", 0)))


class Etcd:
    """A client of one etcd cluster, given its client URLs."""

    def __init__(self, endpoints: Sequence[str], timeout: float = DEFAULT_TIMEOUT,
                 runner: Callable[[Callable[[], Any]], Any] | None = None) -> None:
        """``runner`` runs each request (on a thread in the host namespace, so that its
        sockets are made there); None: in the calling thread."""
        self.endpoints = tuple(endpoints)
        self.timeout = timeout
        self._runner = runner
        self._clients = [self._client(url) for url in self.endpoints]
        self._current = 0

    def _client(self, url: str) -> Etcd3Client:
        parts = urlsplit(url)
        return Etcd3Client(host=parts.hostname or "", port=parts.port or 2379,
                           timeout=self.timeout, api_path="/v3/")

    @property
    def endpoint(self) -> str:
        """The endpoint that answered last (the next request goes there first)."""
        return self.endpoints[self._current]

    def close(self) -> None:
        for client in self._clients:
            client.session.close()

    def _call(self, fn: Callable[[Etcd3Client], T]) -> T:
        if self._runner is not None:
            result: T = self._runner(lambda: self._failover(fn))
            return result
        return self._failover(fn)

    def _failover(self, fn: Callable[[Etcd3Client], T]) -> T:
        failures = []
        for step in range(len(self._clients)):
            index = (self._current + step) % len(self._clients)
            try:
                result = fn(self._clients[index])
            except (Etcd3Exception, requests.RequestException, ValueError) as exc:
                failures.append(f"{self.endpoints[index]}: {_why(exc)}")
                continue
            self._current = index
            return result
        raise ClusterError(f"etcd: no endpoint answered ({'; '.join(failures)})")

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call(lambda c: dict(c.post(c.get_url(path), json=body)))

    # key-value

    def get(self, key: str) -> KeyValue | None:
        kvs = self.post("/kv/range", {"key": _b64(key)}).get("kvs", [])
        return _kv(kvs[0]) if kvs else None

    def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix`` and the revision they were read at."""
        found = self.post("/kv/range", {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))})
        return [_kv(kv) for kv in found.get("kvs", [])], int(found["header"]["revision"])

    def put(self, key: str, value: str, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = lease
        return int(self.post("/kv/put", body)["header"]["revision"])

    def delete(self, key: str) -> bool:
        return int(self.post("/kv/deleterange", {"key": _b64(key)}).get("deleted", 0)) > 0

    def txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]],
            failure: list[dict[str, Any]] | None = None) -> tuple[bool, dict[str, Any]]:
        """One transaction; (succeeded, etcd's answer)."""
        answer = self.post("/kv/txn", {"compare": compare, "success": success,
                                       "failure": failure or []})
        return bool(answer.get("succeeded", False)), answer

    # transaction parts (etcd's JSON)

    @staticmethod
    def absent(key: str) -> dict[str, Any]:
        return {"key": _b64(key), "target": "CREATE", "result": "EQUAL",
                "create_revision": "0"}

    @staticmethod
    def present(key: str) -> dict[str, Any]:
        return {"key": _b64(key), "target": "CREATE", "result": "GREATER",
                "create_revision": "0"}

    @staticmethod
    def unchanged(key: str, mod_revision: int) -> dict[str, Any]:
        return {"key": _b64(key), "target": "MOD", "result": "EQUAL",
                "mod_revision": str(mod_revision)}

    @staticmethod
    def put_op(key: str, value: str, lease: int = 0) -> dict[str, Any]:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return {"request_put": body}

    @staticmethod
    def delete_op(key: str) -> dict[str, Any]:
        return {"request_delete_range": {"key": _b64(key)}}

    # leases

    def grant(self, ttl: int) -> int:
        return int(self.post("/lease/grant", {"TTL": ttl, "ID": 0})["ID"])

    def keepalive(self, lease: int) -> int:
        """The lease's TTL after the renewal; -1 when etcd no longer has it."""
        answer = self.post("/lease/keepalive", {"ID": lease})
        return int(answer.get("result", {}).get("TTL", -1))

    def time_to_live(self, lease: int) -> int:
        """Seconds left of the lease; -1 when etcd no longer has it."""
        return int(self.post("/kv/lease/timetolive", {"ID": lease}).get("TTL", -1))

    def revoke(self, lease: int) -> None:
        self.post("/kv/lease/revoke", {"ID": lease})

    # health

    def health(self) -> dict[str, str | None]:
        """Each endpoint: None when it answered as a member with a leader, else why not."""
        if self._runner is not None:
            answer: dict[str, str | None] = self._runner(self._health)
            return answer
        return self._health()

    def _health(self) -> dict[str, str | None]:
        found: dict[str, str | None] = {}
        for url, client in zip(self.endpoints, self._clients, strict=True):
            try:
                status = client.post(client.get_url("/maintenance/status"), json={})
                found[url] = None if int(status.get("leader", 0)) else "no leader"
            except (Etcd3Exception, requests.RequestException, ValueError) as exc:
                found[url] = _why(exc)
        return found

    # watch

    def watch(self, prefix: str, start_revision: int,
              on_open: Callable[[Callable[[], None]], None] | None = None) -> Iterator[Event]:
        """Events under ``prefix`` from ``start_revision`` on, until the stream ends
        (:class:`WatchLost`).  ``on_open`` is given a function that ends the stream from
        another thread."""
        body = {"create_request": {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix)),
                                   "start_revision": str(start_revision)}}

        def open_stream(c: Etcd3Client) -> requests.Response:
            resp = c.session.post(c.get_url("/watch"), json=body, stream=True,
                                  timeout=(self.timeout, None))
            if resp.status_code != 200:
                resp.close()
                raise Etcd3Exception(resp.text, resp.reason)
            return resp
        try:
            resp = self._call(open_stream)
        except ClusterError as exc:
            raise WatchLost(str(exc)) from None
        if on_open is not None:
            on_open(lambda: _shutdown(resp))     # self.endpoint: the stream's
        try:
            yield from _events(resp)
        except (requests.RequestException, ValueError, OSError, AttributeError) as exc:
            raise WatchLost(f"etcd watch: {_why(exc)}") from None
        finally:
            resp.close()
        raise WatchLost("etcd watch: the stream ended")


def _shutdown(resp: requests.Response) -> None:
    """End a stream another thread is reading: a shutdown wakes its blocked read."""
    with contextlib.suppress(Exception):
        sock = socket.fromfd(resp.raw.fileno(), socket.AF_INET, socket.SOCK_STREAM)
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
    with contextlib.suppress(Exception):
        resp.close()


def _events(resp: requests.Response) -> Iterator[Event]:
    for line in resp.iter_lines():
        if not line.strip():
            continue
        result = json.loads(line).get("result", {})
        compacted = int(result.get("compact_revision", 0))
        if compacted or result.get("canceled"):
            raise WatchLost(f"etcd watch cancelled: {result.get('cancel_reason', '')}".strip(),
                            compacted)
        for raw in result.get("events", []):
            yield Event(raw.get("type") == "DELETE", _kv(raw["kv"]))


def _why(exc: BaseException) -> str:
    if isinstance(exc, requests.Timeout) or "timed out" in str(exc).lower() or \
            "timeout" in type(exc).__name__.lower():
        return "timed out"
    if isinstance(exc, requests.ConnectionError) or "Connection refused" in str(exc) or \
            type(exc).__name__ == "ConnectionFailedError":
        return "unreachable"
    text = " ".join(str(exc).split())
    return text[:160] or type(exc).__name__
