"""Route-only serving's upstream side: forward a chat-completion body to an OpenAI-compatible server
(vLLM, SGLang, llama.cpp, ...) and pass its answer, streams included, back with the routing fields."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Optional
from urllib.parse import urlsplit

from .api import ApiError, error_body, prism_field, sse

LOOPBACK = ("127.0.0.1", "localhost", "::1")


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
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST"
        )
        try:
            resp = self._opener.open(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                data = json.loads(raw.decode("utf-8"))
            except ValueError:
                data = None
            if not isinstance(data, dict):
                data = error_body(
                    f"upstream answered HTTP {exc.code}: {raw[:300].decode('utf-8', 'replace')}",
                    "upstream_error",
                    None,
                    "upstream_error",
                )
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
