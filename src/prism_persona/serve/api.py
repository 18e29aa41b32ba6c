"""The OpenAI chat-completions wire format, as ``prism serve`` speaks it.

Pure functions and small dataclasses, no I/O: parsing and validating a request body into a
:class:`ChatRequest` (raising :class:`ApiError` with an OpenAI-style error), and building response
bodies, stream chunks and error bodies. The HTTP server (:mod:`prism_persona.serve.http` over :mod:`prism_persona.serve.app`) glues these to
sockets; keeping them apart makes every rule here testable without a network.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from ..command_settings import ServeLimits

ROLES = ("system", "developer", "user", "assistant")
"""Accepted message roles; ``developer`` (OpenAI's newer name for system) is treated as ``system``."""

MAX_TOP_LOGPROBS = 20
MAX_STOP = 4


class ApiError(Exception):
    """An error answered to the client as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: Optional[str] = None,
        code: Optional[str] = None,
        type: Optional[str] = None,
        headers: Optional[dict] = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _default_type(status)
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def _default_type(status: int) -> str:
    return {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        502: "upstream_error",
        503: "server_error",
        504: "timeout_error",
    }.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(
    message: str, type: str = "invalid_request_error", param: Optional[str] = None, code: Optional[str] = None
) -> dict:
    """OpenAI's error envelope."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


Limits = ServeLimits  # server-side limits applied to every request (command_settings.ServeLimits)


@dataclass
class ChatRequest:
    """A validated ``/v1/chat/completions`` request."""

    messages: list
    """``[{"role", "content"}]`` with string contents; ``developer`` mapped to ``system``."""
    model: str = ""
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: tuple = ()
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    force: Optional[bool | str] = None
    """From the request's ``prism: {"force": true|false|null|"PERSONA"}``: override the gate (a persona's
    name: that persona's adapter)."""
    clamped: bool = False
    """``max_tokens`` was above the server limit and was lowered to it."""
    raw: dict = field(default_factory=dict, repr=False)

    def sampling_params(self):
        from ..engines.base import SamplingParams

        greedy = self.temperature <= 0 or self.top_p <= 0  # top_p 0 keeps only the top token
        return SamplingParams(
            max_new_tokens=self.max_tokens,
            temperature=0.0 if greedy else self.temperature,
            top_p=1.0 if greedy else self.top_p,
            seed=self.seed,
            stop=self.stop,
        )


def parse_json_body(raw: bytes) -> dict:
    """Decode a request body; 400 for anything that is not a JSON object."""
    try:
        data = json.loads(raw.decode("utf-8")) if raw else None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    return data


def _content_text(content: Any, i: int) -> str:
    param = f"messages[{i}].content"
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{param}: only text content parts are supported", param=param, code="invalid_type")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"{param} must be a string or a list of text parts", param=param, code="invalid_type")


def parse_messages(messages: Any) -> list:
    """Validate ``messages`` and normalise it to ``[{"role", "content": str}]``."""
    if messages is None:
        raise ApiError(
            400, "missing required parameter: 'messages'", param="messages", code="missing_required_parameter"
        )
    if not isinstance(messages, list):
        raise ApiError(
            400, "'messages' must be a list of {role, content} objects", param="messages", code="invalid_type"
        )
    if not messages:
        raise ApiError(400, "'messages' must not be empty", param="messages", code="empty_array")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", param=f"messages[{i}]", code="invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(
                400,
                f"messages[{i}].role {role!r} is not supported; use one of {', '.join(ROLES)}",
                param=f"messages[{i}].role",
                code="invalid_value",
            )
        if "content" not in m or m["content"] is None:
            raise ApiError(
                400, f"messages[{i}] has no content", param=f"messages[{i}].content", code="missing_required_parameter"
            )
        out.append({"role": "system" if role == "developer" else role, "content": _content_text(m["content"], i)})
    if not any(m["role"] == "user" for m in out):
        raise ApiError(400, "'messages' needs at least one user message", param="messages", code="invalid_value")
    return out


def _number(data: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"'{key}' must be a number", param=key, code="invalid_type")
    if not lo <= value <= hi:
        raise ApiError(400, f"'{key}' must be between {lo} and {hi}, got {value}", param=key, code="invalid_value")
    return float(value)


def _integer(data: dict, key: str) -> Optional[int]:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{key}' must be an integer", param=key, code="invalid_type")
    return value


SEED_MAX = 2**63 - 1


def _seed(data: dict) -> Optional[int]:
    """A seed the samplers accept: 0 .. 2**63-1 (a larger or negative one was a 500)."""
    seed = _integer(data, "seed")
    if seed is not None and not 0 <= seed <= SEED_MAX:
        raise ApiError(400, f"'seed' must be between 0 and {SEED_MAX}", param="seed", code="invalid_value")
    return seed


def _boolean(data: dict, key: str, default: bool = False) -> bool:
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"'{key}' must be true or false", param=key, code="invalid_type")
    return value


def _stop(value: Any) -> tuple:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ApiError(400, "'stop' must be a string or a list of strings", param="stop", code="invalid_type")
    if len(value) > MAX_STOP:
        raise ApiError(400, f"'stop' takes at most {MAX_STOP} sequences", param="stop", code="invalid_value")
    return tuple(s for s in value if s)


def _force(value: Any) -> Optional[bool | str]:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ApiError(400, "'prism' must be an object like {\"force\": true}", param="prism", code="invalid_type")
    unknown = sorted(str(k) for k in value if k not in PRISM_KEYS)
    if unknown:
        raise ApiError(
            400,
            f"'prism.{unknown[0]}' is not a PRISM request option (known: {', '.join(PRISM_KEYS)})",
            param=f"prism.{unknown[0]}",
            code="unknown_parameter",
        )
    force = value.get("force")
    if force is not None and not isinstance(force, (bool, str)):
        raise ApiError(
            400, "'prism.force' must be true, false, null or a persona's name", param="prism.force", code="invalid_type"
        )
    if isinstance(force, str) and not 0 < len(force) <= 64:
        raise ApiError(400, "'prism.force' is not a persona's name", param="prism.force", code="invalid_value")
    return force


UNSUPPORTED = {
    # field: (values that mean "not used", what the field asks for)
    "tools": ((None, []), "tool calling"),
    "tool_choice": ((None, "none"), "tool calling"),
    "functions": ((None, []), "function calling"),
    "function_call": ((None, "none"), "function calling"),
    "response_format": ((None, {"type": "text"}), 'structured output (only {"type": "text"})'),
    "logit_bias": ((None, {}), "logit bias"),
    "presence_penalty": ((None, 0, 0.0), "a presence penalty (only 0)"),
    "frequency_penalty": ((None, 0, 0.0), "a frequency penalty (only 0)"),
    "audio": ((None,), "audio output"),
    "modalities": ((None, ["text"]), "output modalities other than text"),
    "prediction": ((None,), "predicted outputs"),
    "web_search_options": ((None,), "web search"),
    "best_of": ((None, 1), "best_of other than 1"),
    "echo": ((None, False), "echo"),
}
"""OpenAI fields a local ``prism serve`` does not implement: a request that sets one to anything but
its "unused" value is 400 ``unsupported_parameter`` naming it, never answered as if it were honoured.
In route-only mode the body goes to the upstream server, which decides."""

IGNORED = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key", "safety_identifier")
"""OpenAI fields accepted and ignored (bookkeeping that does not change an answer); so is any field
OpenAI does not define (clients send their own extras)."""

PRISM_KEYS = ("force",)


def _unsupported(data: dict) -> None:
    for key, (unused, what) in UNSUPPORTED.items():
        value = data.get(key)
        if key.endswith("_penalty") and value is not None:
            _number(data, key, 0.0, -2.0, 2.0)  # OpenAI's type and range first
        if not any(type(value) is type(u) and value == u for u in unused):
            raise ApiError(
                400,
                f"'{key}' is not supported by prism serve ({what}); leave it out",
                param=key,
                code="unsupported_parameter",
            )


def _stream_options(data: dict, stream: bool) -> bool:
    """``include_usage`` of ``stream_options`` (an object, only with ``stream: true``, as OpenAI rules)."""
    options = data.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options", code="invalid_type")
    if not stream:
        raise ApiError(
            400, "'stream_options' is only allowed with 'stream': true", param="stream_options", code="invalid_value"
        )
    include = options.get("include_usage")
    if include is not None and not isinstance(include, bool):
        raise ApiError(
            400,
            "'stream_options.include_usage' must be true or false",
            param="stream_options.include_usage",
            code="invalid_type",
        )
    return bool(include)


def _max_tokens(data: dict) -> tuple[Optional[int], str]:
    """The requested completion budget and the field it came from; both fields are checked, and when both
    are given they must agree (one would otherwise be silently ignored)."""
    given = {k: _integer(data, k) for k in ("max_completion_tokens", "max_tokens")}
    both = [k for k, v in given.items() if v is not None]
    if len(both) == 2 and given["max_completion_tokens"] != given["max_tokens"]:
        raise ApiError(
            400,
            "'max_tokens' and 'max_completion_tokens' differ; send one of them",
            param="max_tokens",
            code="invalid_value",
        )
    param = both[0] if both else "max_tokens"
    return given[param], param


def parse_chat_request(data: dict, limits: Limits, forwarded: bool = False) -> ChatRequest:
    """Validate a chat-completions body against OpenAI's rules and the server's :class:`Limits`.

    ``n`` other than 1 and (unless ``forwarded`` to an upstream server, route-only mode) the fields of
    :data:`UNSUPPORTED` are refused; fields OpenAI does not define, and those of :data:`IGNORED`, are
    ignored (clients send many optional ones).
    """
    messages = parse_messages(data.get("messages"))
    if not forwarded:
        _unsupported(data)
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", param="model", code="invalid_type")
    n = _integer(data, "n")
    if n not in (None, 1):
        raise ApiError(400, "only n=1 is supported", param="n", code="invalid_value")
    max_tokens, param = _max_tokens(data)
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"'{param}' must be at least 1", param=param, code="invalid_value")
    clamped = max_tokens is not None and max_tokens > limits.max_new_tokens
    max_tokens = min(max_tokens or limits.max_new_tokens, limits.max_new_tokens)
    top_logprobs = _integer(data, "top_logprobs") or 0
    if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise ApiError(
            400, f"'top_logprobs' must be between 0 and {MAX_TOP_LOGPROBS}", param="top_logprobs", code="invalid_value"
        )
    logprobs = _boolean(data, "logprobs")
    if top_logprobs and not logprobs:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")
    stream = _boolean(data, "stream")
    include_usage = _stream_options(data, stream)
    return ChatRequest(
        messages=messages,
        model=model or "",
        max_tokens=max_tokens,
        temperature=_number(data, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(data, "top_p", 1.0, 0.0, 1.0),
        seed=_seed(data),
        stop=_stop(data.get("stop")),
        stream=stream,
        include_usage=include_usage,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        force=_force(data.get("prism")),
        clamped=clamped,
        raw=data,
    )


# --------------------------------------------------------------------------------------------------
# responses


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def prism_field(meta: dict) -> dict:
    """The routing extras PRISM adds to every response: ``{"routed": bool, "gate_prob": float}``;
    ``"persona"`` (the routed persona's name, null on the base model and for an artifact whose one adapter
    has no name) and ``"persona_prob"`` (the gate's calibrated probability of that persona, null on the
    base model) when the model reports them; and ``"abstained": bool`` and ``"outside": bool`` when the
    artifact's gate can abstain (an abstain region, ``gate.ood``, or a K-way gate's ``min_confidence``):
    ``abstained`` is true when the gate said route but the query went to the base model for that reason,
    ``outside`` when the query lies outside the gate's region whatever its probability (it goes to the base
    model at every threshold)."""
    out = {"routed": bool(meta.get("routed", False)), "gate_prob": round(float(meta.get("gate_prob", 0.0)), 6)}
    if "persona" in meta:
        pp = meta.get("persona_prob")
        persona = meta["persona"]
        out["persona"] = None if persona is None else str(persona)
        out["persona_prob"] = None if pp is None else round(float(pp), 6)
    for key in ("abstained", "outside"):
        if key in meta:
            out[key] = bool(meta[key])
    return out


HEADER_SAFE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
"""A persona name that may go into a header as is (an artifact's adapter names always do)."""


def prism_headers(meta: dict) -> dict:
    """``X-Prism-Routed``, ``X-Prism-Gate-Prob``; ``X-Prism-Persona`` / ``X-Prism-Persona-Prob`` where a
    named persona answered; ``X-Prism-Abstained`` and ``X-Prism-Outside`` when the gate can abstain."""
    p = prism_field(meta)
    out = {"X-Prism-Routed": "true" if p["routed"] else "false", "X-Prism-Gate-Prob": f"{p['gate_prob']:.6f}"}
    if p.get("persona") is not None and HEADER_SAFE.match(p["persona"]):
        out["X-Prism-Persona"] = p["persona"]
    if p.get("persona_prob") is not None:
        out["X-Prism-Persona-Prob"] = f"{p['persona_prob']:.6f}"
    if "abstained" in p:
        out["X-Prism-Abstained"] = "true" if p["abstained"] else "false"
    if "outside" in p:
        out["X-Prism-Outside"] = "true" if p["outside"] else "false"
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    req: ChatRequest,
    model: str,
    text: str,
    finish_reason: str,
    meta: dict,
    prompt_tokens: int,
    completion_tokens: int,
    logprobs: Optional[dict] = None,
    rid: Optional[str] = None,
) -> dict:
    """A ``chat.completion`` object with PRISM's routing fields under ``prism``."""
    return {
        "id": rid or new_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
        "system_fingerprint": None,
        "prism": prism_field(meta),
    }


def chunk(
    rid: str,
    model: str,
    created: int,
    delta: dict,
    finish_reason: Optional[str],
    meta: dict,
    logprobs: Optional[dict] = None,
) -> dict:
    """One ``chat.completion.chunk`` of a stream."""
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
        "prism": prism_field(meta),
    }


def stream_chunks(
    req: ChatRequest,
    model: str,
    text: str,
    finish_reason: str,
    meta: dict,
    prompt_tokens: int,
    completion_tokens: int,
    logprobs: Optional[dict] = None,
    piece_chars: int = 16,
) -> list[dict]:
    """The chunks of a finished completion, as OpenAI streams them: role, content pieces, finish,
    then (``stream_options.include_usage``) a usage chunk with empty choices."""
    rid, created = new_id(), int(time.time())
    out = [chunk(rid, model, created, {"role": "assistant", "content": ""}, None, meta)]
    pieces = [text[i : i + piece_chars] for i in range(0, len(text), piece_chars)] or []
    for j, piece in enumerate(pieces):
        out.append(chunk(rid, model, created, {"content": piece}, None, meta, logprobs if j == 0 else None))
    if not pieces and logprobs:
        out[0]["choices"][0]["logprobs"] = logprobs
    out.append(chunk(rid, model, created, {}, finish_reason, meta))
    if req.include_usage:
        out.append(
            {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage(prompt_tokens, completion_tokens),
                "prism": prism_field(meta),
            }
        )
    return out


def sse(data: Any) -> bytes:
    """One server-sent event carrying ``data`` (JSON unless it is the ``[DONE]`` marker)."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def models_body(names: list[str], owner: str = "prism") -> dict:
    return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": owner} for n in names]}


def token_logprob(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": float(logprob), "bytes": list(token.encode("utf-8"))}


def logprobs_content(first: Optional[tuple], top: list[tuple]) -> dict:
    """``choices[].logprobs`` for the first generated token: ``first`` = (token, logprob) of the token
    the model produced, ``top`` = [(token, logprob)] of the most likely ones, best first."""
    entry = token_logprob(*(first or (top[0] if top else ("", 0.0))))
    entry["top_logprobs"] = [token_logprob(t, lp) for t, lp in top]
    return {"content": [entry], "refusal": None}
