"""The settings of the commands that use an artifact (`prism generate`, `chat`, `serve`, `check`): one
dataclass per command, its flags derived with :func:`~prism_persona.options.add_flags`. The settings of a run
(`prism run`, `bootstrap`) are in :mod:`prism_persona.config`, which these embed where a command shares them
(the engine block, the held-out check)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .config import (
    DTYPES,
    G_ENGINE,
    MAX_NEW_TOKENS,
    CheckConfig,
    EngineConfig,
    JudgeConfig,
    check_base_url,
    check_device,
)
from .errors import PrismError
from .options import option


@dataclass
class LoadSettings:
    """How `prism generate`, `chat` and `serve` load a PRISM artifact."""

    prism: str = option("", "PRISM artifact directory (RUN/prism)", required=True, metavar="ART")
    device: str = option("auto", "auto | cpu | cuda | cuda:N | mps")
    dtype: str = option("auto", "auto | float32 | bfloat16 | float16", choices=DTYPES, metavar="DTYPE")
    trust_remote_code: bool = option(
        False,
        "run the base model's own Python modelling code (some hub models need "
        "it); never switched on by an artifact, only by this flag",
    )

    def validate(self) -> None:
        check_device(self.device)


@dataclass
class CheckSettings(CheckConfig):
    """`prism check`: the held-out check (:class:`CheckConfig`, what `prism run --heldout` runs at the end
    of a run) of any artifact, with its judge (:class:`JudgeConfig`) and how the artifact is loaded."""

    queries: str = option("", "held-out queries: domain, query [, route]", required=True, metavar="PATH")
    rewarded: list = option(
        [], "domains whose queries should be routed (when the file has no 'route')", metavar="D1,D2"
    )
    prism: str = option("", "the artifact directory (RUN/prism)", required=True, metavar="ART")
    judge: str = option(
        "self", "self (the base model), a model id/path, or module:function / path/file.py:function (runs that code)"
    )
    judge_mode: str = option("auto", "how a model judge's verdict is read", choices=("auto", "logprob", "text"))
    out: str = option("", "output directory (default: RUN/check beside the artifact)")
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    dtype: str = option("auto", "auto | float32 | bfloat16 | float16", choices=DTYPES, metavar="DTYPE")
    batch_size: Optional[int] = option(None, "rows per generation batch (default: the artifact's)", at_least=1)

    def validate(self) -> None:
        check_device(self.device)

    def check_config(self) -> CheckConfig:
        return CheckConfig(queries=self.queries, rewarded=list(self.rewarded), max_new_tokens=self.max_new_tokens)

    def judge_config(self) -> JudgeConfig:
        return JudgeConfig(judge=self.judge, mode=self.judge_mode)


@dataclass
class RoutingSettings:
    force: str = option(
        "",
        "ignore the gate: on (a persona LoRA on every row: the gate's most probable persona), off (the base "
        "model), or a persona's name (its LoRA on every row)",
        metavar="on|off|PERSONA",
    )
    batch_size: Optional[int] = option(None, "rows per batch (default: the artifact's)", at_least=1)


@dataclass
class SamplingSettings:
    max_new_tokens: int = option(256, "token budget per answer", at_least=1, at_most=MAX_NEW_TOKENS)
    temperature: float = option(0.0, "sampling temperature; 0 = greedy", at_least=0)
    top_p: float = option(1.0, "nucleus sampling when temperature > 0", above=0, at_most=1)
    seed: Optional[int] = option(None, "sampling seed", at_least=0, at_most=2**63 - 1)


BASE_MODEL_HELP = (
    "the model without --prism, on a server engine (--engine vllm: default the embedded SmolLM2; "
    "--engine openai: the served model name)"
)


def engine_block() -> Any:
    """The :class:`EngineConfig` a command that generates embeds: its flags are the ones the fields name
    (``--engine``, ``--base-url``, ``--concurrency``, ``--vllm-python``, ``--vllm-args``), as in `prism run`."""
    help = "Where generation runs (the engine settings, as in a run config's [engine] table)."
    return field(default_factory=EngineConfig, metadata={"help": help, "flagged_only": True})


@dataclass
class GenerateSettings:
    """`prism generate`: answer a JSONL file of prompts."""

    input: str = option("", "JSONL file, one object per line with 'prompt' or 'messages'", required=True)
    output: str = option(
        "",
        "JSONL file to write (input objects + response, routed, gate_prob, persona, persona_prob); written "
        "atomically, and an interrupted run resumes from OUTPUT.partial",
        required=True,
    )
    load: LoadSettings = field(default_factory=LoadSettings)
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    model: str = option("", BASE_MODEL_HELP, group=G_ENGINE)
    engine: EngineConfig = engine_block()


@dataclass
class ChatSettings:
    """`prism chat`: an interactive conversation."""

    system: str = option("", "system message for every conversation")
    load: LoadSettings = field(default_factory=LoadSettings)
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    model: str = option("", BASE_MODEL_HELP, group=G_ENGINE)
    engine: EngineConfig = engine_block()


LIMITS = "limits and batching"
ROUTE_ONLY = "route-only (gate here, generation upstream)"


@dataclass
class ServeLimits:
    """Limits applied to every request."""

    max_prompt_tokens: int = option(
        4096,
        "longer prompts (in tokens, after the chat template) get 400",
        at_least=1,
        at_most=MAX_NEW_TOKENS,
        group=LIMITS,
    )
    max_new_tokens: int = option(
        1024,
        "cap on max_tokens; larger requests are clamped to it, absent ones get it",
        flag="--max-tokens",
        at_least=1,
        at_most=MAX_NEW_TOKENS,
        group=LIMITS,
    )


@dataclass
class ServeSettings:
    """Everything `prism serve` can be told; the defaults are the safe ones (loopback, bounded queue,
    bounded connections, bodies and waits)."""

    host: str = option("127.0.0.1", "address to bind (0.0.0.0 exposes it)")
    port: int = option(8000, "port (0 = any free port)", at_least=0, at_most=65535)
    api_key: Optional[str] = option(
        None, "require 'Authorization: Bearer KEY' on every route but /health (default: env PRISM_API_KEY)"
    )
    model_name: str = option("prism", "model id shown by /v1/models and in responses")
    load: LoadSettings = field(default_factory=LoadSettings)
    engine: EngineConfig = engine_block()
    max_batch: int = option(8, "requests per generate call", at_least=1, group=LIMITS)
    batch_wait_ms: float = option(10.0, "wait this long for more requests to batch", at_least=0, group=LIMITS)
    queue_size: int = option(64, "queued requests before answering 429", at_least=1, group=LIMITS)
    limits: ServeLimits = field(default_factory=ServeLimits)
    request_timeout_s: float = option(
        600.0,
        "seconds before a request gets 504 (its generation is not interrupted)",
        flag="--request-timeout",
        above=0,
        group=LIMITS,
    )
    max_connections: int = option(
        128, "open connections at most; more are answered 503 at once", at_least=1, group=LIMITS
    )
    max_body_bytes: int = option(
        8 * 1024 * 1024,
        "larger request bodies get 413 (checked from Content-Length, after the API key, before reading)",
        at_least=1,
        group=LIMITS,
    )
    body_timeout_s: float = option(
        10.0, "a request body not fully received within this many seconds gets 408", above=0, group=LIMITS
    )
    idle_timeout_s: float = option(
        30.0, "idle keep-alive connections are closed after this many seconds", above=0, group=LIMITS
    )
    shutdown_grace_s: float = option(
        60.0, "on SIGTERM / Ctrl-C, in-flight requests get this long to finish", at_least=0, group=LIMITS
    )
    route_only: bool = option(False, "compute the gate locally and forward to --upstream", group=ROUTE_ONLY)
    upstream: str = option("", "upstream OpenAI-compatible base URL, e.g. http://127.0.0.1:8001/v1", group=ROUTE_ONLY)
    base_name: str = option("", "upstream model name for unrouted requests (the base model)", group=ROUTE_ONLY)
    lora_name: str = option("", "upstream model name for routed requests (the LoRA module)", group=ROUTE_ONLY)
    upstream_api_key_env: str = option(
        "UPSTREAM_API_KEY", "environment variable holding the upstream's API key", group=ROUTE_ONLY
    )
    upstream_api_key: Optional[str] = option(None, "the upstream's API key (read from upstream_api_key_env)", cli=False)
    upstream_timeout_s: float = option(600.0, "seconds to wait for the upstream", above=0, group=ROUTE_ONLY)

    def validate(self) -> None:
        if self.route_only and not (self.upstream and self.base_name and self.lora_name):
            raise PrismError("--route-only needs --upstream URL, --base-name NAME and --lora-name NAME")
        if not self.route_only and (self.upstream or self.base_name or self.lora_name):
            raise PrismError("--upstream/--base-name/--lora-name only apply with --route-only")
        if self.upstream:
            check_base_url(self.upstream, "--upstream")


COMMAND_SETTINGS: dict[str, type] = {
    "generate": GenerateSettings,
    "chat": ChatSettings,
    "serve": ServeSettings,
    "check": CheckSettings,
}
"""The settings of each command whose flags come from :func:`add_flags` (``prism config`` lists them all);
a command that moves onto the settings system adds its dataclass here."""
