"""vLLM as PRISM's engine: a managed OpenAI-compatible vLLM server, and an engine that talks to it.

:class:`VLLMServer` starts ``python -m vllm.entrypoints.openai.api_server`` as a subprocess on a free
loopback port, from the Python the user names (``--vllm-python``) or the virtualenv that
``scripts/setup_vllm.sh`` creates, waits for ``/health`` while showing progress, logs to a file in
the run directory, and shuts the server down on success, on an error, on Ctrl-C, on SIGTERM/SIGHUP and
when the PRISM process is killed outright (the child asks the kernel for ``PR_SET_PDEATHSIG``; it runs
in its own process group, which is killed as a whole). No orphan server outlives PRISM.

:class:`VLLMEngine` is the :class:`~prism_persona.engines.openai.OpenAIEngine` (threads, retries,
one-line errors) pointed at that server, with two differences that make it agree with the in-process
HF engine: prompts are rendered and tokenised here with :func:`~prism_persona.models.render_chat`
(the same text and token ids the HF engine feeds the model, including the system-role folding for
templates without one) and sent to ``/v1/completions`` as token ids; and :meth:`VLLMEngine.score_choices`
reads the exact ``log P(choice's first token)`` from vLLM (one-token requests restricted to each
candidate token with ``allowed_token_ids``; vLLM reports raw log-probabilities; each spelling with and
without a leading space, pooled by log-sum-exp) -- the HF engine's verdict semantics, not a top-20
approximation.

Attach to a server that is already running with ``--base-url`` (then nothing is started or stopped).
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from ..config import G_ENGINE
from ..errors import PrismError
from ..options import option
from . import EngineSpec
from .base import Completion, SamplingParams, choice_token_ids
from .openai import OpenAIEngine, OpenAIEngineError

log = logging.getLogger(__name__)

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
DEFAULT_VENV = "~/.cache/prism/vllm-venv"
LORA_NAME = "prism"
PR_SET_PDEATHSIG = 1


class VLLMError(PrismError):
    """vLLM could not be found, did not start, or went away."""


# --------------------------------------------------------------------------------------------------
# finding vLLM


def default_venv() -> Path:
    return Path(os.environ.get("PRISM_VLLM_VENV") or DEFAULT_VENV).expanduser()


def find_vllm_python(explicit: str = "") -> str:
    """The Python that runs the vLLM server: ``explicit`` (``--vllm-python``), ``$PRISM_VLLM_PYTHON``,
    the venv of ``scripts/setup_vllm.sh``, or this Python if it can import vllm; else a one-line error."""
    named = explicit or os.environ.get("PRISM_VLLM_PYTHON", "")
    if named:
        path = Path(named).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise VLLMError(f"--vllm-python {named}: not an executable file")
        return str(path)
    venv_python = default_venv() / "bin" / "python"
    if venv_python.is_file():
        return str(venv_python)
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise VLLMError(
        f"vLLM is not installed: run scripts/setup_vllm.sh (creates {default_venv()}), or pass "
        "--vllm-python PATH, or attach to a running server with --base-url"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# the server process

_LIVE: set[VLLMServer] = set()
_LIVE_LOCK = threading.Lock()
_HOOKS_INSTALLED = False


def _stop_all() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        server.stop()


def _raise_exit(signum, frame):  # SIGTERM / SIGHUP: unwind (finally blocks and atexit stop the server)
    raise SystemExit(128 + signum)


def _install_hooks() -> None:
    """atexit, and SIGTERM/SIGHUP turned into SystemExit where nobody else handles them."""
    global _HOOKS_INSTALLED
    if _HOOKS_INSTALLED:
        return
    _HOOKS_INSTALLED = True
    atexit.register(_stop_all)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _raise_exit)


def _child_setup(parent_pid: int):
    """Runs in the child before exec: die with the parent (SIGTERM when it goes away)."""

    def setup():
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):  # not Linux: atexit and signals still stop the server
            pass
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return setup


class VLLMServer:
    """One ``vllm.entrypoints.openai.api_server`` subprocess; use as a context manager or call
    :meth:`start` / :meth:`stop`.

    ``loras`` maps served LoRA names to PEFT adapter directories. ``cpu_cores`` (vLLM's
    ``VLLM_CPU_OMP_THREADS_BIND``, e.g. ``"0"`` or ``"0-3"``) and ``kv_cache_gib``
    (``VLLM_CPU_KVCACHE_SPACE``) matter for the CPU build only. ``PR_SET_PDEATHSIG`` is tied to the
    thread that starts the server: start it from the main thread (or one that lives as long).
    """

    def __init__(
        self,
        model: str,
        served_name: str,
        python: str,
        log_path: str | os.PathLike,
        loras: Optional[dict] = None,
        dtype: str = "auto",
        max_lora_rank: int = 16,
        eager: bool = True,
        max_num_seqs: int = 0,
        max_model_len: int = 0,
        cpu_cores: str = "",
        kv_cache_gib: int = 0,
        extra_args: Sequence[str] = (),
        startup_timeout_s: float = 900.0,
        quiet: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        self.model = str(model)
        self.served_name = served_name
        self.python = python
        self.log_path = Path(log_path)
        self.loras = dict(loras or {})
        self.dtype = dtype
        self.max_lora_rank = int(max_lora_rank)
        self.eager = eager
        self.max_num_seqs = int(max_num_seqs)
        self.max_model_len = int(max_model_len)
        self.cpu_cores = cpu_cores
        self.kv_cache_gib = int(kv_cache_gib)
        self.extra_args = list(extra_args)
        self.startup_timeout_s = float(startup_timeout_s)
        self.quiet = quiet
        self.host = host
        self.port = int(port)
        self.proc: Optional[subprocess.Popen] = None
        self.startup_seconds: Optional[float] = None
        self._log_handle = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def command(self) -> list[str]:
        cmd = [
            self.python,
            "-m",
            SERVER_MODULE,
            "--model",
            self.model,
            "--served-model-name",
            self.served_name,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--dtype",
            self.dtype,
            "--disable-uvicorn-access-log",
        ]
        if self.loras:
            cmd += [
                "--enable-lora",
                "--max-lora-rank",
                str(self.max_lora_rank),
                "--lora-modules",
                *[f"{name}={path}" for name, path in self.loras.items()],
            ]
            if len(self.loras) > 1 and not any(a.startswith("--max-loras") for a in self.extra_args):
                cmd += ["--max-loras", str(len(self.loras))]  # one batch may mix every persona's adapter
        if self.eager:
            cmd.append("--enforce-eager")
        if self.max_num_seqs > 0:
            cmd += ["--max-num-seqs", str(self.max_num_seqs)]
        if self.max_model_len > 0:
            cmd += ["--max-model-len", str(self.max_model_len)]
        return cmd + self.extra_args

    def environment(self) -> dict:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # the venv's own packages (its transformers), not PRISM's
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
        if self.cpu_cores:
            env["VLLM_CPU_OMP_THREADS_BIND"] = self.cpu_cores
            env["OMP_NUM_THREADS"] = str(_count_cores(self.cpu_cores))
        if self.kv_cache_gib > 0 and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.kv_cache_gib)
        return env

    def start(self) -> VLLMServer:
        """Spawn the server and wait until ``/health`` answers (or raise :class:`VLLMError`)."""
        if self.proc is not None:
            return self
        if not self.port:
            self.port = free_port(self.host)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_handle = open(self.log_path, "ab")
        header = f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} prism starts vLLM: {' '.join(self.command())}\n"
        self._log_handle.write(header.encode())
        self._log_handle.flush()
        _install_hooks()
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            env=self.environment(),
            start_new_session=True,
            preexec_fn=_child_setup(os.getpid()),
        )
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            self._wait_healthy(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = round(time.perf_counter() - t0, 2)
        log.info("vLLM is up at %s after %.1f s (log: %s)", self.base_url, self.startup_seconds, self.log_path)
        return self

    def _wait_healthy(self, t0: float) -> None:
        say = (lambda msg: None) if self.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
        say(f"starting vLLM on {self.url} (model {self.served_name}; log {self.log_path})")
        next_note = t0 + 15.0
        while True:
            code = self.proc.poll()
            if code is not None:
                raise VLLMError(
                    f"the vLLM server exited with code {code} while starting: "
                    f"{self.last_log_line() or 'no output'} (full log: {self.log_path})"
                )
            if _healthy(self.url):
                say(f"vLLM is up after {time.perf_counter() - t0:.0f} s")
                return
            now = time.perf_counter()
            if now - t0 > self.startup_timeout_s:
                raise VLLMError(
                    f"the vLLM server did not become healthy within {self.startup_timeout_s:.0f} s "
                    f"(log: {self.log_path})"
                )
            if now >= next_note:
                say(f"  vLLM starting ({now - t0:.0f} s): {self.last_log_line()[:120]}")
                next_note = now + 15.0
            time.sleep(0.5)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def last_log_line(self) -> str:
        """The last meaningful line of the log (start-up progress, or why it failed)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 8192))
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return ""
        for line in reversed(lines):
            text = line.strip()
            if text and "GET /health" not in text and not text.startswith(("warnings.warn", "^")):
                return text
        return ""

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM to the server's process group (vLLM shuts its engine processes down), SIGKILL to
        the group if it is still there after ``grace_s``. Idempotent."""
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(grace_s)
                except subprocess.TimeoutExpired:
                    log.warning("vLLM did not stop within %.0f s; killing it", grace_s)
            _signal_group(proc.pid, signal.SIGKILL)  # any engine-core process left in the group
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
            self.proc = None
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _count_cores(spec: str) -> int:
    n = 0
    for part in spec.replace("|", ",").split(","):
        lo, _, hi = part.strip().partition("-")
        if lo.isdigit():
            n += (int(hi) - int(lo) + 1) if hi.isdigit() else 1
    return max(1, n)


def _healthy(url: str, timeout_s: float = 2.0) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url + "/health", timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def server_from_config(
    cfg, model: str, served_name: str, loras: Optional[dict] = None, log_path: Optional[str | os.PathLike] = None
) -> VLLMServer:
    """A (not yet started) :class:`VLLMServer` with the settings of ``cfg.engine`` / ``cfg.model``."""
    e = cfg.engine
    return VLLMServer(
        model,
        served_name,
        find_vllm_python(e.vllm_python),
        log_path or Path(cfg.out) / "logs" / "vllm.log",
        loras=loras,
        dtype=server_dtype(cfg.model.dtype),
        **server_options(e),
        quiet=cfg.quiet,
    )


def server_dtype(dtype: str) -> str:
    """PRISM's dtype names for vLLM: ``auto`` is float32 without a GPU (as in-process), else vLLM's auto."""
    if dtype in ("", "auto"):
        return "auto" if _have_cuda() else "float32"
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype)


def _eager(setting: str) -> bool:
    if setting == "auto":
        return not _have_cuda()  # on CPU torch.compile costs ~50 s of start-up and measured no speed
    return setting in ("true", "1", "yes", True)


def _have_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


# --------------------------------------------------------------------------------------------------
# the engine


class VLLMEngine(OpenAIEngine):
    """Generation and exact first-token scoring through a vLLM server (managed or attached)."""

    name = "vllm"
    supports_prefill = True  # the chat extras continue_final_message / add_generation_prompt

    def __init__(
        self,
        base_url: str,
        model: str,
        tokenizer,
        server: Optional[VLLMServer] = None,
        eos_ids: Sequence[int] = (),
        quiet: bool = False,
        **kwargs,
    ):
        super().__init__(base_url, model, **kwargs)
        self.quiet = quiet
        self.generate_seconds = 0.0
        self.tokenizer = tokenizer
        self.server = server
        self._eos = sorted(set(eos_ids) | set(_eos_ids(tokenizer)))

    @classmethod
    def from_config(cls, cfg, loras: Optional[dict] = None, max_lora_rank: int = 0) -> VLLMEngine:
        """Attach to ``cfg.engine.base_url`` if set, else start a server on ``cfg.model.model``.

        ``loras`` ({served name: PEFT adapter dir}) are served too (``max_lora_rank`` at least); an
        attached server must already serve each of them by that name."""
        from ..models import load_tokenizer, prepare_model, resolve_model

        e = cfg.engine
        src = prepare_model(resolve_model(cfg.model.model), quiet=cfg.quiet)
        tokenizer = load_tokenizer(src, cfg.model.trust_remote_code)
        key = os.environ.get(e.api_key_env) if e.api_key_env else None
        common = dict(
            api_key=key,
            concurrency=engine_concurrency(cfg),
            timeout_s=e.timeout_s,
            max_retries=e.max_retries,
            eos_ids=generation_eos_ids(src),
            quiet=cfg.quiet,
        )
        if e.base_url:
            base_url = e.base_url.rstrip("/")
            served = served_models(base_url, key)
            missing = [name for name in (loras or {}) if name not in [m.get("id") for m in served]]
            if missing:
                raise VLLMError(
                    f"{base_url} does not serve the adapter '{missing[0]}' (it serves "
                    f"{', '.join(str(m.get('id')) for m in served) or 'nothing'}); start vLLM with "
                    f"--enable-lora --lora-modules {missing[0]}=DIR (`prism export --format vllm`)"
                )
            return cls(base_url, pick_base_model(served, base_url, src.display), tokenizer, **common)
        server = server_from_config(cfg, src.path_or_id, src.display, loras=loras)
        # the served adapters' rank (the caller knows it); VLLMServer's own floor is vLLM's default, 16
        server.max_lora_rank = max(server.max_lora_rank, int(max_lora_rank))
        server.start()
        try:
            return cls(server.base_url, server.served_name, tokenizer, server=server, **common)
        except BaseException:
            server.stop()
            raise

    # -- generation -------------------------------------------------------------------------------

    def prompt_ids(self, chat: list) -> list[int]:
        from ..models import render_chat

        return self.tokenizer(render_chat(self.tokenizer, chat), add_special_tokens=False)["input_ids"]

    def generate(
        self,
        chats: Sequence[list],
        params: SamplingParams,
        desc: str = "generate",
        model: Optional[str] | Sequence[Optional[str]] = None,
    ) -> list[Completion]:
        """One completion per chat, in order. ``model``: a served LoRA name instead of the base, or one
        name (``None`` = the base) per chat; rows of both kinds go to vLLM together (one batch)."""
        from ..progress import progress

        models = _per_row(model, len(chats))
        bodies = [self._completion_body(self.prompt_ids(chat), params, m) for chat, m in zip(chats, models)]
        bar = progress(total=len(bodies), desc=desc, disable=self.quiet, unit="seq")

        def one(body: dict) -> Completion:
            done = self._text_completion(self._post(body, "/completions"), params)
            bar.update(1)
            return done

        t0 = time.perf_counter()
        try:
            return self._map(one, bodies)
        finally:
            bar.close()
            self.generate_seconds += time.perf_counter() - t0

    def _completion_body(self, ids: list[int], params: SamplingParams, model: Optional[str]) -> dict:
        body = {
            "model": model or self.model_name,
            "prompt": ids,
            "max_tokens": int(params.max_new_tokens),
            "temperature": float(params.temperature or 0.0),
            "n": 1,
            "stop_token_ids": self._eos,
            "skip_special_tokens": True,
        }
        if params.temperature and params.top_p < 1.0:
            body["top_p"] = float(params.top_p)
        if params.temperature:
            body["top_k"] = -1
        if params.seed is not None:
            body["seed"] = int(params.seed)
        stops = [s for s in params.stop if s]
        if stops:
            body["stop"] = stops
        return body

    def _text_completion(self, data: dict, params: SamplingParams) -> Completion:
        try:
            choice = data["choices"][0]
            text = choice.get("text") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise OpenAIEngineError(f"{self.base_url}: unexpected response shape: {str(data)[:300]}") from None
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        for s in params.stop:
            cut = text.find(s) if s else -1
            if cut >= 0:
                text, finish = text[:cut], "stop"
        n = int((data.get("usage") or {}).get("completion_tokens") or 0)
        with self._lock:
            self.tokens_generated += n
        return Completion(text=text.strip(), num_tokens=n, finish_reason=finish)

    # -- scoring ----------------------------------------------------------------------------------

    def choice_token_ids(self, choice: str) -> list[int]:
        return choice_token_ids(self.tokenizer, choice)

    def score_choices(
        self, chats: Sequence[list], choices: Sequence[str], model: Optional[str] | Sequence[Optional[str]] = None
    ) -> list[dict]:
        """log P(first token of each choice | chat + generation prompt), spellings pooled by
        log-sum-exp: the HF engine's numbers.

        One one-token request per (chat, candidate token) with ``allowed_token_ids=[token]``: the
        token is then the one sampled, and vLLM returns its log-probability from the raw logits
        (its default ``logprobs_mode``), i.e. under the full distribution. The requests of a chat
        share their prompt (vLLM's prefix cache) and batch like any generation. ``model`` as in
        :meth:`generate` (a served LoRA per chat).
        """
        chats = list(chats)
        models = _per_row(model, len(chats))
        choice_ids = {c: self.choice_token_ids(c) for c in choices}
        candidates = sorted({t for ids in choice_ids.values() for t in ids})
        prompts = [self.prompt_ids(chat) for chat in chats]
        jobs = [(i, t) for i in range(len(prompts)) for t in candidates]
        values = self._map(lambda job: self._token_logprob(prompts[job[0]], job[1], models[job[0]]), jobs)
        per_chat: list[dict] = [{} for _ in chats]
        for (i, t), lp in zip(jobs, values):
            per_chat[i][t] = lp
        return [{c: _logsumexp([lp[t] for t in ids]) for c, ids in choice_ids.items()} for lp in per_chat]

    def _token_logprob(self, ids: list[int], token: int, model: Optional[str] = None) -> float:
        body = {
            "model": model or self.model_name,
            "prompt": ids,
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": 0,
            "allowed_token_ids": [token],
            "n": 1,
        }
        data = self._post(body, "/completions")
        try:
            return float(data["choices"][0]["logprobs"]["token_logprobs"][0])
        except (KeyError, IndexError, TypeError, ValueError):
            raise OpenAIEngineError(
                f"{self.base_url}: no log-probability for token {token} in the answer "
                f"(is this a vLLM server?): {str(data)[:200]}"
            ) from None

    @property
    def can_score(self) -> bool:
        return True

    # -- failures ---------------------------------------------------------------------------------

    def _post(self, body: dict, path: str) -> dict:
        try:
            return self.post(body, path)
        except OpenAIEngineError as exc:
            if self.server is not None and not self.server.alive():
                raise VLLMError(
                    f"the vLLM server went away ({self.server.last_log_line()[:160] or 'no log'}; "
                    f"log: {self.server.log_path}); completed work is kept, rerun to resume"
                ) from None
            raise exc from None

    def close(self) -> None:
        super().close()
        if self.server is not None:
            self.server.stop()
            self.server = None


def _per_row(model, n: int) -> list:
    """One served model name (``None`` = the base) per row from a name, ``None`` or a list."""
    if model is None or isinstance(model, str):
        return [model] * n
    models = list(model)
    if len(models) != n:
        raise ValueError(f"{len(models)} model names for {n} chats")
    return models


def engine_concurrency(cfg) -> int:
    """Requests in flight: the setting, or 0 = 64 for vLLM (continuous batching wants many)."""
    return int(cfg.engine.concurrency) if cfg.engine.concurrency > 0 else 64


def served_base_model(base_url: str, api_key: Optional[str], expected: str) -> str:
    """The base model's name on a running server (``GET /v1/models``): the one named like
    ``expected`` if served, else the only model without a parent (LoRAs have one)."""
    return pick_base_model(served_models(base_url, api_key), base_url, expected)


def served_models(base_url: str, api_key: Optional[str]) -> list[dict]:
    """The ``data`` of ``GET /v1/models`` (a one-line :class:`VLLMError` when the server is unreachable)."""
    host = urlsplit(base_url).hostname or ""
    handlers = [urllib.request.ProxyHandler({})] if host in ("127.0.0.1", "localhost", "::1") else []
    req = urllib.request.Request(
        base_url + "/models", headers={"Authorization": f"Bearer {api_key}"} if api_key else {}
    )
    try:
        with urllib.request.build_opener(*handlers).open(req, timeout=10) as resp:
            models = json.loads(resp.read().decode("utf-8")).get("data") or []
    except (urllib.error.URLError, OSError, ValueError, AttributeError) as exc:
        raise VLLMError(f"cannot reach the vLLM server at {base_url} ({getattr(exc, 'reason', exc)})") from None
    return [m for m in models if isinstance(m, dict)] if isinstance(models, list) else []


def pick_base_model(models: list[dict], base_url: str, expected: str) -> str:
    """The served name of the base model among ``models``: ``expected`` if listed, else the only one
    without a parent."""
    names = [m.get("id") for m in models if isinstance(m, dict)]
    if expected in names:
        return expected
    bases = [m.get("id") for m in models if isinstance(m, dict) and not m.get("parent")]
    if len(bases) == 1:
        return bases[0]
    raise VLLMError(f"{base_url} serves {names or 'no models'}; cannot tell which one is {expected}")


def _eos_ids(tokenizer) -> list[int]:
    x = tokenizer.eos_token_id
    return [x] if isinstance(x, int) else []


def generation_eos_ids(src) -> list[int]:
    """End-of-sequence ids of the model's generation config (what the HF engine stops at, too)."""
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(src.path_or_id).eos_token_id
    except (OSError, ValueError):
        return []
    if isinstance(eos, int):
        return [eos]
    return [int(i) for i in eos] if isinstance(eos, (list, tuple)) else []


def _logsumexp(values: list[float]) -> float:
    m = max(values)
    if m == float("-inf"):
        return m
    return m + math.log(sum(math.exp(v - m) for v in values))


def build(cfg, model=None, tokenizer=None) -> VLLMEngine:
    return VLLMEngine.from_config(cfg)


def check(cfg) -> None:
    """The model resolves, and a vLLM to start is installed (nothing to find when attaching)."""
    from ..models import resolve_model

    resolve_model(cfg.model.model)
    if not cfg.engine.base_url:
        find_vllm_python(cfg.engine.vllm_python)


@dataclass
class VLLMOptions:
    """vLLM's own settings: ``engine.vllm_*`` keys of a run config (flags where a field names one)."""

    vllm_python: str = option(
        "",
        "Python that runs the vLLM server (engine=vllm); empty: $PRISM_VLLM_PYTHON, the venv of scripts/setup_vllm.sh (~/.cache/prism/vllm-venv), or this Python if it has vllm.",
        flag="--vllm-python",
        group=G_ENGINE,
    )
    vllm_args: list[str] = option(
        [],
        "Extra vLLM server arguments, e.g. ['--tensor-parallel-size', '4'] (a flag takes one shell-quoted string: --vllm-args \"--tensor-parallel-size 4\").",
        flag="--vllm-args",
        group=G_ENGINE,
        shell_words=True,
    )
    vllm_eager: str = option(
        "auto",
        "Pass --enforce-eager: auto (yes on CPU, where torch.compile adds ~50 s of start-up for no measured speed; no on GPU, for CUDA graphs), true or false.",
    )
    vllm_max_num_seqs: int = option(0, "vLLM --max-num-seqs, sequences batched at once (0 = vLLM's default).")
    vllm_max_model_len: int = option(0, "vLLM --max-model-len, tokens per sequence (0 = the model's own limit).")
    vllm_cpu_cores: str = option(
        "",
        "CPU build only: cores vLLM binds its threads to (VLLM_CPU_OMP_THREADS_BIND, e.g. '0' or '0-3'); empty = vLLM's choice (all but one).",
    )
    vllm_kv_cache_gib: int = option(
        4,
        "CPU build only: GiB of RAM for the KV cache (VLLM_CPU_KVCACHE_SPACE; that variable, if set, wins). 0 = vLLM's default, which claims 92% of RAM and refuses to start when other processes hold memory",
    )
    vllm_startup_timeout_s: float = option(900.0, "Seconds to wait for a started vLLM server to answer /health.")


def rules(e) -> None:
    """``vllm_eager`` is auto, true or false (any case; stored lower-case)."""
    if str(e.vllm_eager).lower() not in ("auto", "true", "false"):
        raise PrismError(f"engine.vllm_eager must be auto, true or false, got '{e.vllm_eager}'")
    e.vllm_eager = str(e.vllm_eager).lower()


def flag_rules(e, chosen: bool) -> None:
    """``--vllm-python``/``--vllm-args`` start a server: with another engine, or attaching, they are mistakes."""
    if (e.vllm_python or e.vllm_args) and not (chosen and not e.base_url):
        raise PrismError(
            "--vllm-python/--vllm-args need --engine vllm: they start a server (drop them to attach with --base-url)"
        )


def uses(e, name: str) -> bool:
    """The server's address and key always; how to start one only when not attaching."""
    if name in ("vllm_python", "vllm_args"):
        return not e.base_url
    return True


def served_loras(adapter) -> dict:
    """``{served name: dir}``: one adapter (a path) is served as :data:`LORA_NAME`; a K-way artifact's
    ``{persona: dir}`` each under its persona's name."""
    if isinstance(adapter, dict):
        return {str(name): str(path) for name, path in adapter.items()}
    return {LORA_NAME: str(adapter)}


def adapter_engine(cfg, export, names=None) -> tuple[VLLMEngine, str]:
    """The base model and a PRISM adapter (served as :data:`LORA_NAME`; a K-way artifact's adapters each
    under its persona's name, ``names``) on one vLLM: attached with ``base_url`` (it must already serve
    each adapter by that name), else started with ``export()``'s adapter(s)."""
    served = list(names) if names else [LORA_NAME]
    if cfg.engine.base_url:
        return VLLMEngine.from_config(cfg, loras=dict.fromkeys(served, "")), served[0]
    adapter, rank = export()
    loras = served_loras(adapter)
    return VLLMEngine.from_config(cfg, loras=loras, max_lora_rank=rank), next(iter(loras))


def adapter_server(e, src, adapter, rank: int, log_dir, quiet: bool = False) -> tuple[VLLMServer, str]:
    """A started vLLM with the model ``src`` (served under its display name) and the adapter (as
    :data:`LORA_NAME`), with the ``[engine]`` block's vLLM settings (`prism serve --engine vllm`); it logs
    to ``log_dir/vllm.log``."""
    server = VLLMServer(
        src.path_or_id,
        src.display,
        find_vllm_python(e.vllm_python),
        Path(log_dir) / "vllm.log",
        loras=served_loras(adapter),
        dtype=server_dtype("auto"),
        max_lora_rank=rank,
        **server_options(e),
        quiet=quiet,
    )
    return server.start(), next(iter(server.loras))


def server_options(e) -> dict:
    """The server arguments the engine block's vLLM options give (``VLLMServer`` keywords): one reading
    for the engine's own server and an artifact's."""
    return {
        "eager": _eager(e.vllm_eager),
        "max_num_seqs": e.vllm_max_num_seqs,
        "max_model_len": e.vllm_max_model_len,
        "cpu_cores": e.vllm_cpu_cores,
        "kv_cache_gib": e.vllm_kv_cache_gib,
        "extra_args": list(e.vllm_args),
        "startup_timeout_s": e.vllm_startup_timeout_s,
    }


ENGINE = EngineSpec(
    "vllm",
    build,
    options=VLLMOptions,
    how_to_run=("vllm_python", "vllm_args"),
    check=check,
    rules=rules,
    flag_rules=flag_rules,
    uses=uses,
    adapter_engine=adapter_engine,
    adapter_server=adapter_server,
)
