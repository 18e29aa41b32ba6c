"""An engine that generates through any OpenAI-compatible ``/chat/completions`` server.

Works with ``prism serve``, vLLM, llama.cpp's server, TGI, or the OpenAI API itself. Standard library
only (``urllib``): no extra dependency. Requests run in a thread pool of ``concurrency`` workers; a
request failing with 429, a 5xx, a timeout or a connection error is retried with exponential backoff
and jitter (honouring ``Retry-After``); one still failing after ``max_retries`` retries raises
:class:`OpenAIEngineError` — nothing is dropped silently, and the pipeline's stores keep what was
already completed, so rerunning the command resumes.

``score_choices`` asks for the first token's ``top_logprobs`` (``max_tokens: 1``); the first time a
server answers without log-probabilities, the engine remembers it and returns ``None`` from then on
(judges then parse text verdicts).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Optional
from urllib.parse import urlsplit

from ..errors import PrismError
from . import EngineSpec
from .base import Completion, Engine, SamplingParams

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
TOP_LOGPROBS = 20
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class OpenAIEngineError(PrismError):
    """A request to the OpenAI-compatible server failed for good (after retries, or not retryable)."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


class _HTTPFailure(Exception):
    def __init__(self, status: Optional[int], message: str, retry_after: Optional[float] = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.status is None or self.status in RETRY_STATUS or self.status >= 500


class OpenAIEngine(Engine):
    """Generation (and, where the server has log-probabilities, scoring) over HTTP."""

    default_concurrency = 8
    """Requests in flight when ``concurrency`` is 0 (``--concurrency``'s default)."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: Optional[str] = None,
        concurrency: int = 0,
        timeout_s: float = 120.0,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ):
        if not base_url:
            raise PrismError("the openai engine needs a base URL, e.g. http://127.0.0.1:8000/v1")
        self.base_url = base_url.rstrip("/")
        self.model_name = model
        self.api_key = api_key
        self.concurrency = int(concurrency) or self.default_concurrency  # 0 = the engine's default
        self.timeout_s = float(timeout_s)
        self.max_retries = max(0, int(max_retries))
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.tokens_generated = 0
        self.requests_sent = 0
        self.retries = 0
        self._logprobs_ok: Optional[bool] = None
        self._lock = threading.Lock()
        self._pool: Optional[ThreadPoolExecutor] = None
        host = urlsplit(self.base_url).hostname or ""
        handlers = [urllib.request.ProxyHandler({})] if host in LOOPBACK else []
        self._opener = urllib.request.build_opener(*handlers)

    @classmethod
    def from_config(cls, cfg) -> OpenAIEngine:
        """From a :class:`~prism_persona.config.RunConfig`: ``cfg.engine`` and ``cfg.model.model`` (the
        model name the server serves)."""
        e = cfg.engine
        key = os.environ.get(e.api_key_env) if e.api_key_env else None
        return cls(
            e.base_url,
            cfg.model.model,
            api_key=key,
            concurrency=e.concurrency,
            timeout_s=e.timeout_s,
            max_retries=e.max_retries,
        )

    # -- Engine API -------------------------------------------------------------------------------

    def generate(self, chats: Sequence[list], params: SamplingParams, desc: str = "generate") -> list[Completion]:
        """One completion per chat, in order; raises :class:`OpenAIEngineError` if any request fails."""
        bodies = [self._generate_body(chat, params) for chat in chats]
        return self._map(lambda body: self._completion(self.post(body), params), bodies)

    def score_choices(self, chats: Sequence[list], choices: Sequence[str]) -> Optional[list[dict]]:
        """log P(first token of each choice) from the server's ``top_logprobs`` of the first token.

        Tokens matching a choice (exactly, or as its first piece, ignoring surrounding spaces) are
        pooled; a choice not among the top 20 gets 1 nat less than the least likely of them (it is
        below all of them), and when no choice is listed every choice gets ``-inf`` (no verdict).
        ``None`` when the server has no log-probabilities.
        """
        if self._logprobs_ok is False:
            return None
        chats = list(chats)
        if not chats:
            return []
        if self._logprobs_ok is None:  # probe once with the first chat
            first = self._score_one(chats[0], choices)
            if first is None:
                return None
            return [first] + self._map(lambda c: self._score_one(c, choices, strict=True), chats[1:])
        return self._map(lambda c: self._score_one(c, choices, strict=True), chats)

    @property
    def can_score(self) -> bool:
        return self._logprobs_ok is not False

    @property
    def preferred_call_size(self) -> int:
        """As many chats per call as requests go out at once (``concurrency``)."""
        return self.concurrency

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    # -- request bodies and parsing ---------------------------------------------------------------

    def _generate_body(self, chat: list, params: SamplingParams) -> dict:
        body = {
            "model": self.model_name,
            "messages": list(chat),
            "max_tokens": int(params.max_new_tokens),
            "temperature": float(params.temperature or 0.0),
            "n": 1,
        }
        if params.temperature and params.top_p < 1.0:
            body["top_p"] = float(params.top_p)
        if params.seed is not None:
            body["seed"] = int(params.seed)
        stops = [s for s in params.stop if s][:4]
        if stops:
            body["stop"] = stops
        if chat and chat[-1].get("role") == "assistant":  # prefill: continue the assistant's message
            body.update(continue_final_message=True, add_generation_prompt=False)  # vLLM's chat extras
        return body

    def _completion(self, data: dict, params: SamplingParams) -> Completion:
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise OpenAIEngineError(f"{self.base_url}: unexpected response shape: {str(data)[:300]}") from None
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        for s in params.stop:  # servers differ in how they apply stop strings; cut here as well
            cut = text.find(s) if s else -1
            if cut >= 0:
                text, finish = text[:cut], "stop"
        n = int((data.get("usage") or {}).get("completion_tokens") or len(text.split()))
        with self._lock:
            self.tokens_generated += n
        meta = dict(data["prism"]) if isinstance(data.get("prism"), dict) else {}
        return Completion(text=text.strip(), num_tokens=n, finish_reason=finish, meta=meta)

    def _score_one(self, chat: list, choices: Sequence[str], strict: bool = False) -> Optional[dict]:
        body = {
            "model": self.model_name,
            "messages": list(chat),
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": True,
            "top_logprobs": TOP_LOGPROBS,
            "n": 1,
        }
        try:
            data = self.post(body)
        except OpenAIEngineError as exc:
            if strict or exc.status not in (400, 422):
                raise
            log.info("openai engine: the server refused log-probabilities (%s); judging by text", exc)
            self._logprobs_ok = False
            return None
        top = _first_top_logprobs(data)
        if top is None:
            if strict:
                raise OpenAIEngineError(f"{self.base_url}: a response had no log-probabilities")
            log.info("openai engine: the server returns no log-probabilities; judging by text")
            self._logprobs_ok = False
            return None
        self._logprobs_ok = True
        scores = {c: _choice_logprob(c, top) for c in choices}
        if all(v is None for v in scores.values()):  # no choice among the top tokens: no verdict
            return {c: float("-inf") for c in choices}
        floor = min(lp for _, lp in top) - 1.0
        return {c: floor if v is None else v for c, v in scores.items()}

    # -- HTTP with retries ------------------------------------------------------------------------

    def post(self, body: dict, path: str = "/chat/completions") -> dict:
        """POST ``body`` and return the JSON answer, retrying transient failures."""
        attempt = 0
        while True:
            try:
                return self._post_once(body, path)
            except _HTTPFailure as exc:
                if not exc.retryable or attempt >= self.max_retries:
                    tries = f" after {attempt + 1} attempts" if attempt else ""
                    raise OpenAIEngineError(
                        f"request to {self.base_url}{path} failed{tries}: {exc}"
                        "; completed work is kept, rerun to resume",
                        exc.status,
                    ) from None
                delay = self._backoff(attempt, exc.retry_after)
                log.debug("openai engine: %s; retry %d in %.2f s", exc, attempt + 1, delay)
                with self._lock:
                    self.retries += 1
                time.sleep(delay)
                attempt += 1

    def _backoff(self, attempt: int, retry_after: Optional[float]) -> float:
        base = min(self.max_backoff_s, self.backoff_s * (2**attempt))
        delay = base * (0.5 + random.random() / 2)  # jitter: 50-100 % of the exponential step
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_backoff_s))
        return delay

    def _post_once(self, body: dict, path: str) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(
            self.base_url + path, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST"
        )
        with self._lock:
            self.requests_sent += 1
        try:
            with self._opener.open(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode("utf-8", "replace")
            raise _HTTPFailure(
                exc.code,
                f"HTTP {exc.code}: {_error_message(detail)}",
                _retry_after(exc.headers.get("Retry-After") if exc.headers else None),
            ) from None
        except (urllib.error.URLError, OSError) as exc:  # refused, reset, DNS, timeout
            reason = getattr(exc, "reason", None) or exc
            raise _HTTPFailure(None, f"connection error: {reason}") from None
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _HTTPFailure(502, f"response is not JSON: {raw[:200]!r}") from None
        if not isinstance(data, dict):
            raise _HTTPFailure(502, f"response is not a JSON object: {raw[:200]!r}")
        return data

    def _map(self, fn, items: list) -> list:
        """``[fn(x) for x in items]`` with ``concurrency`` in flight; the first failure cancels what
        has not started and is raised once the running ones end."""
        if len(items) <= 1 or self.concurrency == 1:
            return [fn(x) for x in items]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="prism-openai")
        futures = [self._pool.submit(fn, x) for x in items]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in done if f.exception() is not None]
        if failed:
            for f in pending:
                f.cancel()
            wait(pending)
            raise failed[0].exception()
        return [f.result() for f in futures]


def _retry_after(value: Optional[str]) -> Optional[float]:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def _error_message(detail: str) -> str:
    try:
        err = json.loads(detail).get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    except (ValueError, AttributeError):
        pass
    return detail.strip()[:300]


def _first_top_logprobs(data: dict) -> Optional[list]:
    """``[(token, logprob)]`` of the first generated token, or ``None`` if the answer has none."""
    try:
        content = data["choices"][0]["logprobs"]["content"]
        entry = content[0]
    except (KeyError, IndexError, TypeError):
        return None
    top = entry.get("top_logprobs") or []
    pairs = [(t.get("token", ""), float(t["logprob"])) for t in top if isinstance(t, dict) and "logprob" in t]
    if not pairs and "logprob" in entry:
        pairs = [(entry.get("token", ""), float(entry["logprob"]))]
    return pairs or None


def _choice_logprob(choice: str, top: list) -> Optional[float]:
    """Pooled log-prob of the listed tokens spelling ``choice`` (or its first piece); None if none."""
    exact = [lp for tok, lp in top if tok.strip() == choice]
    pieces = exact or [lp for tok, lp in top if tok.strip() and choice.startswith(tok.strip())]
    if not pieces:
        return None
    m = max(pieces)
    return m + math.log(sum(math.exp(v - m) for v in pieces))


def build(cfg, model=None, tokenizer=None) -> OpenAIEngine:
    return OpenAIEngine.from_config(cfg)


ENGINE = EngineSpec("openai", build, needs_base_url=True, served_model_name=True)
