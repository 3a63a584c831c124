"""What stands between the network and the app: limits, the API key, and errors that stay contained.

- :class:`Limits`: body size (413), prompt characters (checked before tokenizing), the time a client
  may take to send one whole request (a half-sent request is closed), the keep-alive idle timeout,
  and how many connections may be open at once (more are closed as they arrive).
- ``--api-key`` (or ``ADAPTKIT_API_KEY``): every ``/v1/*`` route needs ``Authorization: Bearer KEY``,
  compared in constant time; 401 in OpenAI's error shape otherwise. ``/health`` and ``/metrics`` stay open.
- An exception nothing else handled becomes a 500 in OpenAI's shape on a connection that stays
  usable (Starlette's last-resort handler would close it).

The ASGI middlewares wrap the FastAPI app (:func:`guard`); the read deadline and the connection cap
live in uvicorn's HTTP/1.1 protocol with two additions (:func:`guarded_protocol`), handed to uvicorn
through its ``http=`` option (:func:`uvicorn_options`).
"""

from __future__ import annotations

import hmac
import json
import logging
import resource
from dataclasses import dataclass

log = logging.getLogger("adaptkit.serve")
API_KEY_ENV = "ADAPTKIT_API_KEY"


@dataclass(frozen=True)
class Limits:
    """The server's limits; every one has a flag of the same name (``--max-body-bytes`` ...)."""

    max_body_bytes: int = 4 * 2**20
    max_prompt_chars: int = 400_000
    read_timeout: float = 15.0  # seconds from a request's first byte to its last
    keep_alive_timeout: float = 5.0
    max_connections: int = 1024

    def connections_allowed(self) -> int:
        """``max_connections``, kept below the process's open-file limit (raised to its hard limit first)."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
                soft = hard
            except (ValueError, OSError):
                pass
        if soft == resource.RLIM_INFINITY:
            return self.max_connections
        return max(1, min(self.max_connections, soft - 64))  # files for weights, logs and adapters


def error_json(message: str, kind: str, code: str | None, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


async def _send_json(send, status: int, body: bytes, headers=()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class ContainErrors:
    """An exception that reaches here is answered with a 500 in OpenAI's shape, and the connection lives on."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            log.exception("request to %s failed", scope.get("path"))
            if started:
                raise  # the status line is out; uvicorn closes the connection, which is all that is left
            await _send_json(send, 500, error_json(f"internal error: {type(exc).__name__}: {exc}", "server_error",
                                                   "internal_error"))


class BodyLimit:
    """413 for a body over ``max_bytes``, by its Content-Length or as it is received."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send, int(declared))
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    from adaptkit.errors import RequestError

                    raise RequestError(self._message(received), status=413, code="request_too_large")
            return message

        await self.app(scope, counting_receive, send)

    def _message(self, size: int) -> str:
        return (f"the request body has {size} bytes or more, over this server's limit of {self.max_bytes} "
                "(--max-body-bytes)")

    async def _refuse(self, send, size: int) -> None:
        await _send_json(send, 413, error_json(self._message(size), "invalid_request_error", "request_too_large"))


class ApiKey:
    """``Authorization: Bearer <key>`` on every ``/v1/`` route; 401 in OpenAI's shape otherwise."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                body = error_json("missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                                  "invalid_request_error", "invalid_api_key")
                return await _send_json(send, 401, body, [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)


def guard(app, limits: Limits, api_key: str | None = None):
    """``app`` behind the body limit, the API key (if any) and the last-resort error handler."""
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    if api_key:
        app.add_middleware(ApiKey, key=api_key)
    app.add_middleware(ContainErrors)
    return app


def guarded_protocol(read_timeout: float, max_connections: int) -> type:
    """uvicorn's HTTP/1.1 protocol plus a deadline for receiving each whole request and a connection cap.

    A client gets ``read_timeout`` seconds from the first byte of a request (or from connecting) to
    its last byte; then the connection is closed (a request still arriving cannot be answered). Past
    ``max_connections`` open connections, the oldest one that is waiting for a request is closed to
    make room (so idle sockets cannot lock honest clients out), or, when every one is busy, the new
    one. (Imported here: uvicorn is the ``[serve]`` extra.)
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    opened: dict = {}  # open connections, oldest first (dicts keep insertion order)

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            self._deadline = None
            opened[self] = None
            super().connection_made(transport)
            if len(self.connections) > max_connections and not self._close_oldest_waiting():
                transport.close()
                return
            self._arm()

        def _waiting(self) -> bool:
            """No request of this connection is being received or answered."""
            return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

        def _close_oldest_waiting(self) -> bool:
            for other in opened:  # the oldest idle one is usually first: no scan of every connection
                if other is not self and other._waiting() and not other.transport.is_closing():
                    other.transport.close()
                    return True
            return False

        def data_received(self, data: bytes) -> None:
            if self._deadline is None and self.conn.their_state is h11.IDLE:
                self._arm()  # a new request begins on a kept-alive connection
            super().data_received(data)
            if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            opened.pop(self, None)
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._deadline = self.loop.call_later(read_timeout, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if not self.transport.is_closing() and self.conn.their_state is not h11.DONE:
                self.transport.close()

    return GuardedH11Protocol


def uvicorn_options(limits: Limits) -> dict:
    """uvicorn settings that enforce ``limits`` (its ``http=`` protocol, keep-alive, header size)."""
    protocol = guarded_protocol(limits.read_timeout, limits.connections_allowed())
    return {"http": protocol, "timeout_keep_alive": limits.keep_alive_timeout,
            "h11_max_incomplete_event_size": 64 * 1024}
