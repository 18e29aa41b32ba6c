"""``prism serve``: an OpenAI-compatible HTTP server for a gated PRISM model.

Routes: ``POST /v1/chat/completions`` (JSON, or ``stream: true`` server-sent events ending with
``data: [DONE]``), ``GET /v1/models``, ``GET /health``. The ``/v1`` prefix is optional.

Every request goes through the gate; the response carries ``prism: {"routed", "gate_prob"}`` (and
``"abstained"`` and ``"outside"`` when the artifact's gate can abstain) and
the headers ``X-Prism-Routed`` / ``X-Prism-Gate-Prob``. A request may set ``prism: {"force": bool}``
(``extra_body`` in the openai client) to switch the LoRA on or off regardless of the gate.

Concurrency: HTTP handler threads (standard library ``ThreadingHTTPServer``) validate requests and
queue them; a single model worker (:class:`~prism_persona.serve.batch.Batcher`) batches what is
queued into one ``generate`` call per group of equal sampling parameters, with per-row ``force``.
The queue is bounded: when it is full the request is answered 429 at once.

Two modes:

* local (default): ``backend`` is a :class:`~prism_persona.serve.backend.GatedBackend` around a
  ``GatedModel`` (or anything with its interface, e.g. a test double) and generates here;
* route-only: only the gate runs here (``backend.decisions``); each request is forwarded to an upstream
  OpenAI-compatible server (e.g. vLLM with the exported adapter) under the base model's name or the
  LoRA's name, and the upstream response (streams too) is passed through with the routing fields added.

This module is the socket-free core (:class:`PrismApp`: request in, :class:`Reply` out). The transport
is :mod:`.http` (:class:`~prism_persona.serve.http.PrismServer`), the upstream proxy :mod:`.upstream`,
the wire format :mod:`.api`, the batching worker :mod:`.batch`, model loading :mod:`.backend`. Nothing
is bound, loaded or started at import; :class:`~prism_persona.serve.http.PrismServer` does it in ``start``.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import urlsplit

from ..command_settings import ServeSettings as ServeOptions  # the one settings system (command_settings.py)
from .api import (
    ApiError,
    ChatRequest,
    completion_body,
    logprobs_content,
    models_body,
    parse_chat_request,
    parse_json_body,
    prism_field,
    prism_headers,
    sse,
    stream_chunks,
)
from .batch import Batcher, Job, QueueFull, Stopped
from .upstream import Forwarder, relay_stream

log = logging.getLogger(__name__)


@dataclass
class Reply:
    """An HTTP answer: a JSON ``body``, or a ``stream`` of already-encoded SSE bytes."""

    status: int = 200
    body: Optional[dict] = None
    headers: dict = field(default_factory=dict)
    stream: Optional[Iterable[bytes]] = None

    @classmethod
    def error(cls, err: ApiError) -> Reply:
        return cls(err.status, err.body(), dict(err.headers))


# --------------------------------------------------------------------------------------------------
# the application: routing, validation, batching — no sockets


class PrismApp:
    """Answers requests; owns the batcher. ``backend`` has the :class:`GatedBackend` interface."""

    def __init__(self, backend, options: ServeOptions, forwarder: Optional[Forwarder] = None):
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

    def precheck(self, path: str, headers) -> None:
        """What can be decided from the request line and headers alone, before any body byte is read:
        the API key (an unauthenticated client never makes the server buffer a body)."""
        path = urlsplit(path).path.rstrip("/") or "/"
        if path not in ("/health", "/v1/health"):
            self._check_auth(headers)

    def dispatch(self, method: str, path: str, headers, body: bytes) -> Reply:
        path = urlsplit(path).path.rstrip("/") or "/"
        if path in ("/health", "/v1/health"):
            self._allow(method, ("GET",))
            return Reply(
                200,
                {
                    "status": "shutting_down" if self.closing else "ok",
                    "model": self.options.model_name,
                    "mode": "route-only" if self.forwarder else "local",
                    "queued": self.batcher.pending,
                },
            )
        self._check_auth(headers)
        route = path[3:] if path.startswith("/v1/") else path
        if route == "/models":
            self._allow(method, ("GET",))
            return Reply(200, models_body([self.options.model_name]))
        if route.startswith("/models/"):
            self._allow(method, ("GET",))
            name = route[len("/models/") :]
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
            raise ApiError(
                405,
                f"method {method} not allowed here; use {', '.join(allowed)}",
                code="method_not_allowed",
                headers={"Allow": ", ".join(allowed)},
            )

    def _check_auth(self, headers) -> None:
        key = self.options.api_key
        if not key:
            return
        given = headers.get("Authorization", "") if headers is not None else ""
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(
                401,
                "invalid or missing API key; send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    # -- chat completions -------------------------------------------------------------------------

    def chat(self, body: bytes) -> Reply:
        if self.closing:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        req = parse_chat_request(parse_json_body(body), self.options.limits, forwarded=self.forwarder is not None)
        if isinstance(req.force, str):  # a persona the model does not have: 400 before any work
            try:
                self.backend.check_force(req.force)
            except ValueError as exc:
                raise ApiError(400, f"'prism.force': {exc}", param="prism.force", code="invalid_value") from None
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
        return Reply(
            200, completion_body(req, model, comp.text, finish, meta, prompt_tokens, comp.num_tokens, logprobs), headers
        )

    @staticmethod
    def _clamp_header(req: ChatRequest) -> dict:
        return {"X-Prism-Max-Tokens-Clamped": str(req.max_tokens)} if req.clamped else {}

    def _run(self, job: Job) -> Job:
        """Queue ``job`` for the model worker and wait for it; errors become OpenAI-style replies."""
        try:
            self.batcher.submit(job)
        except QueueFull:
            raise ApiError(
                429,
                "the server is busy (request queue full); retry shortly",
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from None
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
            if self.backend.surely_over(job.payload.messages, limit):
                job.error = ApiError(
                    400,
                    f"the prompt has more than {limit} tokens; this server allows at most {limit}",
                    param="messages",
                    code="context_length_exceeded",
                )
                continue
            try:
                n = self.backend.count_tokens(job.payload.messages)
            except Exception as exc:  # a chat template that rejects this conversation
                job.error = ApiError(
                    400,
                    f"cannot format these messages with the model's chat template: {exc}",
                    param="messages",
                    code="invalid_value",
                )
                continue
            job.info["prompt_tokens"] = n or 0
            if n is not None and n > limit:
                job.error = ApiError(
                    400,
                    f"the prompt has {n} tokens; this server allows at most {limit}",
                    param="messages",
                    code="context_length_exceeded",
                )
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
            # score under the routing each generation used (its meta), so LoRA on/off and the persona match
            routed = [
                ((c.meta or {}).get("persona") or True if (c.meta or {}).get("routed") else False)
                if "routed" in (c.meta or {})
                else j.payload.force
                for j, c in zip(jobs, comps)
            ]
            rows = self.backend.first_token_logprobs(
                [j.payload.messages for j in jobs],
                routed,
                [c.text for c in comps],
                max(j.payload.top_logprobs for j in jobs),
            )
        except Exception:
            log.exception("log-probabilities failed; answering without them")
            return
        for job, (first, top) in zip(jobs, rows):
            job.info["logprobs"] = (first, top[: job.payload.top_logprobs])

    def _process_route(self, jobs: list) -> None:
        ready = self._admit(jobs)
        if not ready:
            return
        for job, decision in zip(ready, self.backend.decisions([j.payload.messages for j in ready])):
            job.result = decision

    # -- route-only -------------------------------------------------------------------------------

    def upstream_model(self, meta: dict) -> str:
        """The upstream model a routed request goes to: a K-way artifact's persona by its own name (each
        adapter is served by its persona's name: ``--lora-modules NAME=adapter/NAME``), else ``--lora-name``."""
        persona = meta.get("persona")
        if persona and getattr(self.backend, "kway", False):
            return str(persona)
        return self.options.lora_name

    def _chat_route_only(self, req: ChatRequest) -> Reply:
        # gate_prob, routed (, persona, abstained, outside)
        meta = dict(self._run(Job(payload=req, key="route")).result)
        if req.force is not None:
            forced = getattr(self.backend, "forced", None)
            meta = forced(meta, req.force) if forced else {**meta, "routed": bool(req.force)}
        routed = meta["routed"]
        body = {k: v for k, v in req.raw.items() if k != "prism"}
        body["model"] = self.upstream_model(meta) if routed else self.options.base_name
        body["max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"] = (
            req.max_tokens
        )
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
