"""The HTTP transport of ``prism serve``: uvicorn (the ASGI server vLLM's OpenAI server runs on) with a
Starlette app around the socket-free :class:`~prism_persona.serve.app.PrismApp`.

Per request, in this order: the API key is checked from the headers (401 before any body byte is
read), the declared ``Content-Length`` against ``max_body_bytes`` (413), then the body is read with a
deadline (``body_timeout_s``: a stalled or trickled body gets 408 and the connection is closed; a connection
whose request headers are not complete within the same time is closed). The
app core then runs in a worker thread (it blocks on the batching queue). uvicorn caps open connections
(``max_connections``: the next one is answered 503 at once, in the OpenAI error shape, as is a malformed
request) and closes keep-alive connections idle for ``idle_timeout_s``.
A client that disconnects is one log line. SIGTERM / Ctrl-C: stop accepting, let in-flight requests
finish (``shutdown_grace_s``), stop the model worker. uvicorn and Starlette are imported in
:meth:`PrismServer.start`, never at import.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import threading
import time
from typing import Optional

from .api import ApiError
from .app import PrismApp, Reply, ServeOptions
from .upstream import LOOPBACK, Forwarder

log = logging.getLogger(__name__)

BODY_METHODS = ("POST", "PUT", "PATCH")


class ClientGone(Exception):
    """The client closed the connection before its request was complete."""


async def read_body(receive, limit: int, timeout_s: float) -> bytes:
    """The request body from ASGI ``receive``: at most ``limit`` bytes (413), within ``timeout_s`` (408)."""
    chunks: list = []
    size = 0
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise asyncio.TimeoutError
            message = await asyncio.wait_for(receive(), remaining)
        except asyncio.TimeoutError:
            raise ApiError(
                408,
                f"the request body did not arrive within {timeout_s:g} s",
                code="request_timeout",
                headers={"Connection": "close"},
            ) from None
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ApiError(
                413, f"request body over {limit} bytes", code="request_too_large", headers={"Connection": "close"}
            )
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def declared_length(headers, limit: int) -> None:
    """Refuse from ``Content-Length`` alone: malformed (400) or over ``limit`` (413)."""
    raw = headers.get("content-length")
    if raw is None:
        return
    try:
        length = int(raw)
    except ValueError:
        raise ApiError(400, "invalid Content-Length", code="invalid_request", headers={"Connection": "close"}) from None
    if length < 0:
        raise ApiError(400, "invalid Content-Length", code="invalid_request", headers={"Connection": "close"})
    if length > limit:
        raise ApiError(
            413, f"request body over {limit} bytes", code="request_too_large", headers={"Connection": "close"}
        )


def build_asgi(app: PrismApp):
    """The Starlette application: one catch-all endpoint in front of :meth:`PrismApp.dispatch`."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    def to_response(reply: Reply) -> Response:
        body = reply.body if reply.body is not None else {}
        if reply.stream is None:
            return JSONResponse(body, status_code=reply.status, headers=reply.headers)
        return StreamingResponse(
            _closing(reply.stream),
            status_code=reply.status,
            headers=reply.headers,
            media_type="text/event-stream; charset=utf-8",
        )

    async def endpoint(request):
        method, target = request.method, request.url.path + (f"?{request.url.query}" if request.url.query else "")
        with app.tracking():
            try:
                app.precheck(target, request.headers)
                body = b""
                if method in BODY_METHODS:
                    declared_length(request.headers, app.options.max_body_bytes)
                    body = await read_body(request.receive, app.options.max_body_bytes, app.options.body_timeout_s)
                reply = await run_in_threadpool(app.dispatch, method, target, request.headers, body)
            except ApiError as exc:
                reply = Reply.error(exc)
            except ClientGone:
                log.info(
                    "client %s disconnected before sending its whole request (%s %s)",
                    _peer(request),
                    method,
                    request.url.path,
                )
                return Response(status_code=499)
            except Exception as exc:  # noqa: BLE001 - never let a bug take the server down
                log.exception("unhandled error in %s %s", method, request.url.path)
                reply = Reply.error(ApiError(500, f"internal error: {type(exc).__name__}", code="internal_error"))
            if app.closing:
                reply.headers = {**reply.headers, "Connection": "close"}
            return to_response(reply)

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", endpoint, methods=methods)])


async def send_json(send, status: int, body: dict) -> None:
    """A whole JSON response on a raw ASGI ``send``, closing the connection."""
    data = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(data)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def capped(asgi, open_connections, max_connections: int):
    """``asgi`` behind the ``--max-connections`` cap: a request arriving while more connections are
    open (its own included) gets 503 at once, in the OpenAI error shape (uvicorn's own cap answers
    plain text)."""

    async def app(scope, receive, send):
        if scope["type"] == "http" and open_connections() > max_connections:
            err = ApiError(503, f"the server is at its limit of {max_connections} connections", code="overloaded")
            await send_json(send, 503, err.body())
            return
        await asgi(scope, receive, send)

    return app


def _json_errors_protocol():
    """uvicorn's h11 protocol answering a malformed request (a bad Content-Length, broken headers) with
    400 in the OpenAI error shape instead of plain text."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class JsonErrorsH11Protocol(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            data = json.dumps(ApiError(400, msg, code="invalid_request").body()).encode()
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            for event in (
                h11.Response(status_code=400, headers=headers + [(b"content-length", str(len(data)).encode())]),
                h11.Data(data=data),
                h11.EndOfMessage(),
            ):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return JsonErrorsH11Protocol


def _closing(stream):
    """Iterate ``stream`` and close it however the iteration ends (a client gone mid-stream included)."""
    try:
        yield from stream
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def _peer(request) -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client else "?"


class _QuietDisconnects(logging.Filter):
    """uvicorn logs a client that went away mid-response with a traceback; keep it to one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        gone = (ConnectionError, BrokenPipeError)
        try:
            from starlette.requests import ClientDisconnect

            gone = gone + (ClientDisconnect,)
        except ImportError:  # pragma: no cover
            pass
        if exc is not None and isinstance(exc, gone):
            log.info("client disconnected: %s", type(exc).__name__)
            return False
        return True


class PrismServer:
    """The HTTP server plus its model worker. ``start()`` then ``shutdown()``, or use ``with``.

    >>> with PrismServer(backend, ServeOptions(port=0)) as srv:   # doctest: +SKIP
    ...     print(srv.url)                                         # http://127.0.0.1:PORT/v1
    """

    def __init__(self, backend, options: Optional[ServeOptions] = None, forwarder: Optional[Forwarder] = None):
        self.options = options or ServeOptions()
        self.app = PrismApp(backend, self.options, forwarder)
        self.server = None  # uvicorn.Server
        self._sock: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None
        self._stopped = False

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1] if self._sock is not None else self.options.port

    @property
    def url(self) -> str:
        host = self.options.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/v1"

    def _bind(self) -> socket.socket:
        return bind_socket(self.options.host, self.options.port)

    def start(self) -> PrismServer:
        """Bind, start the model worker and uvicorn (in a background thread with its own event loop)."""
        import uvicorn

        self._sock = self._bind()
        opts = self.options
        config = uvicorn.Config(
            capped(build_asgi(self.app), lambda: len(self.server.server_state.connections), opts.max_connections),
            lifespan="off",
            log_level="warning",
            access_log=False,
            http=_json_errors_protocol(),
            timeout_keep_alive=int(max(1, opts.idle_timeout_s)),
            timeout_graceful_shutdown=opts.shutdown_grace_s,
            h11_max_incomplete_event_size=64 * 1024,
            server_header=False,
            date_header=True,
        )
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # older uvicorn; newer ones skip it off the main thread
        for name in ("uvicorn.error", "uvicorn"):
            logging.getLogger(name).addFilter(_QuietDisconnects())
        self.app.batcher.start()
        self._thread = threading.Thread(target=self._serve, name="prism-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.server.started:
            raise RuntimeError("the HTTP server did not start")
        return self

    def _serve(self) -> None:
        import anyio.to_thread

        async def main():
            # every request waiting on the model holds a worker thread: allow one per connection
            anyio.to_thread.current_default_thread_limiter().total_tokens = max(40, self.options.max_connections)
            watchdog = asyncio.ensure_future(self._close_slow_headers())
            try:
                await self.server.serve(sockets=[self._sock])
            finally:
                watchdog.cancel()

        asyncio.run(main())

    async def _close_slow_headers(self) -> None:
        """uvicorn has no timeout for request *headers*: a connection that never completes them would
        hold a ``--max-connections`` slot forever. Close any connection that has been waiting for
        (the rest of) a request's headers - no request in progress, no keep-alive timer running - for
        longer than ``body_timeout_s``. Reads uvicorn's protocol objects; if their shape changes, this
        check switches itself off with a log line rather than failing the server."""
        waiting_since: dict = {}
        limit = self.options.body_timeout_s
        while True:
            await asyncio.sleep(min(1.0, limit / 4))
            now = time.monotonic()
            try:
                alive = set()
                for proto in list(self.server.server_state.connections):
                    cycle = proto.cycle
                    idle = (cycle is None or cycle.response_complete) and proto.timeout_keep_alive_task is None
                    if not idle:
                        continue
                    alive.add(id(proto))
                    first = waiting_since.setdefault(id(proto), now)
                    if now - first > limit:
                        log.info("closing a connection that sent no complete request headers within %g s", limit)
                        proto.transport.close()
                waiting_since = {k: v for k, v in waiting_since.items() if k in alive}
            except AttributeError as exc:  # a uvicorn version with other internals
                log.warning("header timeout unavailable with this uvicorn (%s)", exc)
                return

    def shutdown(self, grace_s: Optional[float] = None) -> bool:
        """Stop accepting, let in-flight requests finish (up to ``grace_s``), stop the worker, close.

        Returns whether every in-flight request finished within the grace period.
        """
        if self._stopped or self.server is None:
            return True
        self._stopped = True
        grace = self.options.shutdown_grace_s if grace_s is None else grace_s
        self.app.closing = True
        # uvicorn's own graceful shutdown: close the listener, close idle connections, wait for requests
        self.server.config.timeout_graceful_shutdown = grace
        self.server.should_exit = True
        finished = self.app.wait_idle(grace)
        self._thread.join(timeout=grace + 5)
        self.app.batcher.stop(timeout=1.0)
        self._sock.close()
        return finished

    def serve_until_signal(self) -> None:
        """Block until SIGTERM or SIGINT (main thread only), then shut down gracefully."""
        stop = threading.Event()

        def _on_signal(signum, frame):  # noqa: ARG001
            log.info("received %s: finishing in-flight requests", signal.Signals(signum).name)
            stop.set()

        previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while not stop.wait(0.5):
                pass
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            finished = self.shutdown()
            if not finished:
                log.warning(
                    "some requests were still running after %.0f s and were cut off", self.options.shutdown_grace_s
                )

    def __enter__(self) -> PrismServer:
        return self if self.server is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown(grace_s=5.0)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening, non-blocking socket on ``host:port``; an address that cannot be bound is one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        from ..errors import PrismError

        raise PrismError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def check_address(options: ServeOptions) -> None:
    """Fail on an address that cannot be bound before the model loads (minutes, for a large one)."""
    bind_socket(options.host, options.port).close()


def warn_if_exposed(options: ServeOptions) -> None:
    if options.host not in LOOPBACK and not options.api_key:
        log.warning(
            "listening on %s without an API key: anyone who can reach this port can use the model "
            "(set --api-key or PRISM_API_KEY)",
            options.host,
        )
