"""The HTTP transport of ``prism serve``: sockets, threads, SSE writing and graceful shutdown around the
socket-free :class:`~prism_persona.serve.app.PrismApp`."""

from __future__ import annotations

import json
import logging
import signal
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from .api import ApiError
from .app import PrismApp, Reply, ServeOptions
from .upstream import LOOPBACK, Forwarder

log = logging.getLogger(__name__)



class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "prism-serve"

    def setup(self) -> None:
        self.timeout = self.server.app.options.idle_timeout_s
        super().setup()

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            raise ApiError(411, "chunked request bodies are not supported; send Content-Length", code="length_required")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise ApiError(400, "invalid Content-Length", code="invalid_request") from None
        if length > self.server.app.options.max_body_bytes:
            self.close_connection = True
            raise ApiError(413, f"request body over {self.server.app.options.max_body_bytes} bytes",
                           code="request_too_large")
        return self.rfile.read(length) if length > 0 else b""

    def _handle(self, method: str) -> None:
        app: PrismApp = self.server.app
        with app.tracking():
            try:
                body = self._read_body() if method in ("POST", "PUT", "PATCH") else b""
                reply = app.dispatch(method, self.path, self.headers, body)
            except ApiError as exc:
                reply = Reply.error(exc)
            except Exception as exc:  # noqa: BLE001 - never let a bug take the server down
                log.exception("unhandled error in %s %s", method, self.path)
                reply = Reply.error(ApiError(500, f"internal error: {type(exc).__name__}", code="internal_error"))
            if app.closing:
                self.close_connection = True
            try:
                self._send(reply)
            except (BrokenPipeError, ConnectionResetError, socket.timeout):
                self.close_connection = True

    def _send(self, reply: Reply) -> None:
        self.send_response(reply.status)
        for key, value in reply.headers.items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        if reply.stream is None:
            data = json.dumps(reply.body if reply.body is not None else {}).encode("utf-8")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        stream = reply.stream
        try:
            for piece in stream:
                if piece:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def server_bind(self) -> None:
        # Skip HTTPServer's reverse-DNS lookup of the bound address (slow or hanging offline).
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), port


class PrismServer:
    """The HTTP server plus its model worker. ``start()`` then ``shutdown()``, or use ``with``.

    >>> with PrismServer(backend, ServeOptions(port=0)) as srv:   # doctest: +SKIP
    ...     print(srv.url)                                         # http://127.0.0.1:PORT/v1
    """

    def __init__(self, backend, options: Optional[ServeOptions] = None, forwarder: Optional[Forwarder] = None):
        self.options = options or ServeOptions()
        self.app = PrismApp(backend, self.options, forwarder)
        self.httpd: Optional[_HTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._stopped = False

    @property
    def port(self) -> int:
        return self.httpd.server_address[1] if self.httpd else self.options.port

    @property
    def url(self) -> str:
        host = self.options.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/v1"

    def start(self) -> "PrismServer":
        """Bind, start the model worker and the accept loop (in a background thread)."""
        family = socket.AF_INET6 if ":" in self.options.host else socket.AF_INET
        _HTTPServer.address_family = family
        try:
            self.httpd = _HTTPServer((self.options.host, self.options.port), _Handler)
        except OSError as exc:
            from ..errors import PrismError

            raise PrismError(f"cannot listen on {self.options.host}:{self.options.port}: {exc.strerror or exc}") from None
        self.httpd.app = self.app
        self.app.batcher.start()
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="prism-http", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, grace_s: Optional[float] = None) -> bool:
        """Stop accepting, let in-flight requests finish (up to ``grace_s``), stop the worker, close.

        Returns whether every in-flight request finished within the grace period.
        """
        if self._stopped or self.httpd is None:
            return True
        self._stopped = True
        grace = self.options.shutdown_grace_s if grace_s is None else grace_s
        self.app.closing = True
        self.httpd.shutdown()  # the accept loop ends; handler threads keep running
        finished = self.app.wait_idle(grace)
        self.app.batcher.stop(timeout=1.0)
        self.httpd.server_close()
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
                log.warning("some requests were still running after %.0f s and were cut off",
                            self.options.shutdown_grace_s)

    def __enter__(self) -> "PrismServer":
        return self if self.httpd is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown(grace_s=5.0)


def warn_if_exposed(options: ServeOptions) -> None:
    if options.host not in LOOPBACK and not options.api_key:
        log.warning("listening on %s without an API key: anyone who can reach this port can use the model "
                    "(set --api-key or PRISM_API_KEY)", options.host)
