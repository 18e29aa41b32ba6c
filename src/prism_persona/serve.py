"""``prism serve``: an OpenAI-compatible HTTP server for a gated PRISM model.

Routes: ``POST /v1/chat/completions`` (JSON, or ``stream: true`` server-sent events ending with
``data: [DONE]``), ``GET /v1/models``, ``GET /health``. The ``/v1`` prefix is optional.

Every request goes through the gate; the response carries ``prism: {"routed", "gate_prob"}`` and
the headers ``X-Prism-Routed`` / ``X-Prism-Gate-Prob``. A request may set ``prism: {"force": bool}``
(``extra_body`` in the openai client) to switch the LoRA on or off regardless of the gate.

Concurrency: HTTP handler threads (standard library ``ThreadingHTTPServer``) validate requests and
queue them; a single model worker (:class:`~prism_persona.serve_batch.Batcher`) batches what is
queued into one ``generate`` call per group of equal sampling parameters, with per-row ``force``.
The queue is bounded: when it is full the request is answered 429 at once.

Two modes:

* local (default): ``backend`` is a :class:`~prism_persona.serve_backend.GatedBackend` around a
  ``GatedModel`` (or anything with its interface, e.g. a test double) and generates here;
* route-only: only the gate runs here (``backend.route``); each request is forwarded to an upstream
  OpenAI-compatible server (e.g. vLLM with the exported adapter) under the base model's name or the
  LoRA's name, and the upstream response (streams too) is passed through with the routing fields added.

Nothing is bound, loaded or started at import; :class:`PrismServer` does it in :meth:`start`.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import signal
import socket
import socketserver
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterable, Iterator, Optional
from urllib.parse import urlsplit

from .serve_api import (
    ApiError,
    ChatRequest,
    Limits,
    completion_body,
    error_body,
    logprobs_content,
    models_body,
    parse_chat_request,
    parse_json_body,
    prism_field,
    prism_headers,
    sse,
    stream_chunks,
)
from .serve_batch import Batcher, Job, QueueFull, Stopped

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeOptions:
    """Everything ``prism serve`` can be told; the defaults are the safe ones."""

    host: str = "127.0.0.1"
    port: int = 8000
    """0 picks a free port (see :attr:`PrismServer.port`)."""
    api_key: Optional[str] = None
    """When set, every route but ``/health`` needs ``Authorization: Bearer <api_key>``."""
    model_name: str = "prism"
    """The id listed by ``/v1/models`` and echoed in responses (any requested model id is accepted)."""
    max_batch: int = 8
    batch_wait_ms: float = 10.0
    """How long the worker waits for more requests after the first one of a batch."""
    queue_size: int = 64
    limits: Limits = field(default_factory=Limits)
    request_timeout_s: float = 600.0
    """A request still unanswered after this long gets 504 (its generation is not interrupted)."""
    max_body_bytes: int = 8 * 1024 * 1024
    shutdown_grace_s: float = 60.0
    """On SIGTERM/SIGINT, in-flight requests get this long to finish."""
    idle_timeout_s: float = 30.0
    """Idle keep-alive connections are closed after this long."""
    # route-only mode
    upstream: str = ""
    upstream_api_key: Optional[str] = None
    base_name: str = ""
    lora_name: str = ""
    upstream_timeout_s: float = 600.0


@dataclass
class Reply:
    """An HTTP answer: a JSON ``body``, or a ``stream`` of already-encoded SSE bytes."""

    status: int = 200
    body: Optional[dict] = None
    headers: dict = field(default_factory=dict)
    stream: Optional[Iterable[bytes]] = None

    @classmethod
    def error(cls, err: ApiError) -> "Reply":
        return cls(err.status, err.body(), dict(err.headers))


# --------------------------------------------------------------------------------------------------
# the application: routing, validation, batching — no sockets


class PrismApp:
    """Answers requests; owns the batcher. ``backend`` has the :class:`GatedBackend` interface."""

    def __init__(self, backend, options: ServeOptions, forwarder: Optional["Forwarder"] = None):
        self.backend = backend
        self.options = options
        self.forwarder = forwarder
        process = self._process_route if forwarder is not None else self._process_generate
        self.batcher = Batcher(process, options.max_batch, options.batch_wait_ms / 1000.0, options.queue_size)
        self.closing = False
        self._inflight = 0
        self._cond = threading.Condition()

    # -- bookkeeping for graceful shutdown ---------------------------------------------------------

    @contextlib.contextmanager
    def tracking(self):
        with self._cond:
            self._inflight += 1
        try:
            yield
        finally:
            with self._cond:
                self._inflight -= 1
                self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Block until no request is in flight (True) or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._inflight > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    # -- dispatch ---------------------------------------------------------------------------------

    def dispatch(self, method: str, path: str, headers, body: bytes) -> Reply:
        path = urlsplit(path).path.rstrip("/") or "/"
        if path in ("/health", "/v1/health"):
            self._allow(method, ("GET",))
            return Reply(200, {"status": "shutting_down" if self.closing else "ok", "model": self.options.model_name,
                               "mode": "route-only" if self.forwarder else "local", "queued": self.batcher.pending})
        self._check_auth(headers)
        route = path[3:] if path.startswith("/v1/") else path
        if route == "/models":
            self._allow(method, ("GET",))
            return Reply(200, models_body([self.options.model_name]))
        if route.startswith("/models/"):
            self._allow(method, ("GET",))
            name = route[len("/models/"):]
            if name != self.options.model_name:
                raise ApiError(404, f"the model '{name}' does not exist", param="model", code="model_not_found")
            return Reply(200, models_body([name])["data"][0])
        if route == "/chat/completions":
            self._allow(method, ("POST",))
            return self.chat(body)
        raise ApiError(404, f"unknown route: {method} {path}", code="unknown_route")

    @staticmethod
    def _allow(method: str, allowed: tuple) -> None:
        if method not in allowed:
            raise ApiError(405, f"method {method} not allowed here; use {', '.join(allowed)}",
                           code="method_not_allowed", headers={"Allow": ", ".join(allowed)})

    def _check_auth(self, headers) -> None:
        key = self.options.api_key
        if not key:
            return
        given = headers.get("Authorization", "") if headers is not None else ""
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "invalid or missing API key; send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    # -- chat completions -------------------------------------------------------------------------

    def chat(self, body: bytes) -> Reply:
        if self.closing:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        req = parse_chat_request(parse_json_body(body), self.options.limits)
        if self.forwarder is not None:
            return self._chat_route_only(req)
        job = self._run(Job(payload=req, key=req.sampling_params()))
        comp = job.result
        meta = dict(comp.meta or {})
        prompt_tokens = int(job.info.get("prompt_tokens") or 0)
        lp = job.info.get("logprobs")
        logprobs = logprobs_content(*lp) if lp is not None else None
        headers = {**prism_headers(meta), **self._clamp_header(req)}
        finish = comp.finish_reason if comp.finish_reason in ("stop", "length") else "stop"
        model = self.options.model_name
        if req.stream:
            chunks = stream_chunks(req, model, comp.text, finish, meta, prompt_tokens, comp.num_tokens, logprobs)
            return Reply(200, None, headers, [sse(c) for c in chunks] + [sse("[DONE]")])
        return Reply(200, completion_body(req, model, comp.text, finish, meta, prompt_tokens, comp.num_tokens,
                                          logprobs), headers)

    @staticmethod
    def _clamp_header(req: ChatRequest) -> dict:
        return {"X-Prism-Max-Tokens-Clamped": str(req.max_tokens)} if req.clamped else {}

    def _run(self, job: Job) -> Job:
        """Queue ``job`` for the model worker and wait for it; errors become OpenAI-style replies."""
        try:
            self.batcher.submit(job)
        except QueueFull:
            raise ApiError(429, "the server is busy (request queue full); retry shortly", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except Stopped:
            raise ApiError(503, "the server is shutting down", code="shutting_down") from None
        if not job.wait(self.options.request_timeout_s):
            raise ApiError(504, f"no answer within {self.options.request_timeout_s:.0f} s", code="timeout")
        if isinstance(job.error, ApiError):
            raise job.error
        if isinstance(job.error, Stopped):
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        if job.error is not None:
            raise ApiError(500, f"generation failed: {type(job.error).__name__}: {job.error}", code="internal_error")
        return job

    # -- the model worker's side ------------------------------------------------------------------

    def _admit(self, jobs: list) -> list:
        """Count prompt tokens (in the worker thread: the tokenizer is not shared across threads);
        jobs over the limit get a 400 and are left out."""
        ready = []
        limit = self.options.limits.max_prompt_tokens
        for job in jobs:
            try:
                n = self.backend.count_tokens(job.payload.messages)
            except Exception as exc:  # a chat template that rejects this conversation
                job.error = ApiError(400, f"cannot format these messages with the model's chat template: {exc}",
                                     param="messages", code="invalid_value")
                continue
            job.info["prompt_tokens"] = n or 0
            if n is not None and n > limit:
                job.error = ApiError(400, f"the prompt has {n} tokens; this server allows at most {limit}",
                                     param="messages", code="context_length_exceeded")
                continue
            ready.append(job)
        return ready

    def _process_generate(self, jobs: list) -> None:
        ready = self._admit(jobs)
        if not ready:
            return
        params = ready[0].key
        chats = [j.payload.messages for j in ready]
        force = [j.payload.force for j in ready]
        comps = self.backend.generate(chats, params, force)
        if len(comps) != len(ready):
            raise RuntimeError(f"generate returned {len(comps)} completions for {len(ready)} prompts")
        wanted = [i for i, j in enumerate(ready) if j.payload.logprobs]
        if wanted and getattr(self.backend, "can_logprob", False):
            self._attach_logprobs([ready[i] for i in wanted], [comps[i] for i in wanted])
        for job, comp in zip(ready, comps):
            job.result = comp

    def _attach_logprobs(self, jobs: list, comps: list) -> None:
        try:
            # score under the routing each generation used (its meta), so LoRA on/off matches
            routed = [(c.meta or {}).get("routed", j.payload.force) for j, c in zip(jobs, comps)]
            rows = self.backend.first_token_logprobs(
                [j.payload.messages for j in jobs], routed,
                [c.text for c in comps], max(j.payload.top_logprobs for j in jobs))
        except Exception:
            log.exception("log-probabilities failed; answering without them")
            return
        for job, (first, top) in zip(jobs, rows):
            job.info["logprobs"] = (first, top[:job.payload.top_logprobs])

    def _process_route(self, jobs: list) -> None:
        ready = self._admit(jobs)
        if not ready:
            return
        routes = self.backend.route([j.payload.messages for j in ready])
        for job, (prob, routed) in zip(ready, routes):
            job.result = (float(prob), bool(routed))

    # -- route-only -------------------------------------------------------------------------------

    def _chat_route_only(self, req: ChatRequest) -> Reply:
        prob, routed = self._run(Job(payload=req, key="route")).result
        if req.force is not None:
            routed = req.force
        meta = {"routed": routed, "gate_prob": prob}
        body = {k: v for k, v in req.raw.items() if k != "prism"}
        body["model"] = self.options.lora_name if routed else self.options.base_name
        body["max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"] = req.max_tokens
        headers = {**prism_headers(meta), **self._clamp_header(req), "X-Prism-Upstream-Model": body["model"]}
        status, payload, resp = self.forwarder.post(body)
        if resp is None:  # an upstream error: pass status and body through
            return Reply(status, payload, headers)
        if req.stream:
            return Reply(status, None, headers, relay_stream(resp, meta))
        try:
            data = json.loads(resp.read().decode("utf-8"))
        except (ValueError, OSError) as exc:
            raise ApiError(502, f"upstream sent an unreadable response: {exc}", code="bad_upstream_response") from None
        finally:
            resp.close()
        if isinstance(data, dict):
            data["prism"] = prism_field(meta)
        return Reply(status, data, headers)


def relay_stream(resp, meta: dict) -> Iterator[bytes]:
    """Pass an upstream SSE stream through line by line, adding ``prism`` to every JSON event."""
    extra = prism_field(meta)
    try:
        for line in resp:
            if line.startswith(b"data:"):
                payload = line[5:].strip()
                if payload and payload != b"[DONE]":
                    try:
                        obj = json.loads(payload)
                    except ValueError:
                        obj = None
                    if isinstance(obj, dict):
                        obj["prism"] = extra
                        line = sse(obj)[:-1]  # one newline; the upstream's blank line follows
            yield line
    finally:
        resp.close()


class Forwarder:
    """POSTs chat-completion bodies to an upstream OpenAI-compatible server (standard library only)."""

    def __init__(self, upstream: str, api_key: Optional[str] = None, timeout_s: float = 600.0):
        self.url = upstream.rstrip("/") + "/chat/completions"
        self.api_key = api_key
        self.timeout_s = timeout_s
        self._opener = build_opener(self.url)

    def post(self, body: dict):
        """``(status, error_body, None)`` for an upstream HTTP error, else ``(status, None, response)``."""
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode("utf-8"), headers=headers,
                                         method="POST")
        try:
            resp = self._opener.open(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                data = json.loads(raw.decode("utf-8"))
            except ValueError:
                data = None
            if not isinstance(data, dict):
                data = error_body(f"upstream answered HTTP {exc.code}: {raw[:300].decode('utf-8', 'replace')}",
                                  "upstream_error", None, "upstream_error")
            return exc.code, data, None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiError(502, f"upstream {self.url} unreachable: {reason}", code="upstream_unreachable") from None
        return resp.status, None, resp


def build_opener(url: str):
    """A urllib opener; environment proxies are ignored for loopback hosts."""
    host = urlsplit(url).hostname or ""
    if host in LOOPBACK:
        return urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener()


# --------------------------------------------------------------------------------------------------
# HTTP


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
            from .errors import PrismError

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


# --------------------------------------------------------------------------------------------------
# loading


def load_backend(artifact: str, device: str = "auto", dtype: str = "auto", route_only: bool = False,
                 name: str = "prism"):
    """A :class:`GatedBackend` for the artifact directory ``artifact`` (``RUN/prism``); with
    ``route_only`` only embeddings + decoder layer 0 + the gate are loaded."""
    from .serve_backend import GatedBackend, load_router

    if route_only:
        return GatedBackend(load_router(artifact, device, dtype), name=name)
    from .gated import GatedModel

    return GatedBackend(GatedModel.from_pretrained(artifact, device=device, dtype=dtype), name=name)


def warn_if_exposed(options: ServeOptions) -> None:
    if options.host not in LOOPBACK and not options.api_key:
        log.warning("listening on %s without an API key: anyone who can reach this port can use the model "
                    "(set --api-key or PRISM_API_KEY)", options.host)
