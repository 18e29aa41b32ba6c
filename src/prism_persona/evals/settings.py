"""Every setting of ``prism eval`` and ``prism study``, with its default and help string, in one place.

The command-line flags are derived from :class:`EvalConfig` (``options.add_flags``) and read back with
``options.settings_from_args`` (types coerced, bounds and choices checked, one-line errors naming the
flag), so a default lives only here. Standard library only: ``prism --help`` stays instant.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..command_settings import engine_block
from ..config import (
    DTYPES,
    ENGINES,
    MAX_NEW_TOKENS,
    PERSONA_LENGTHS,
    PLACEMENTS,
    EngineConfig,
    ModelConfig,
)
from ..options import option

G_MODELS = "models"
G_DATA = "data (default: each benchmark's Hugging Face dataset; a PATH = a local copy)"
G_PERSONAS = "personas"
G_JUDGE = "judge and generation"
LOCAL_JUDGE_ENGINE = "hf"
"""The engine of a ``--judge MODEL`` without ``--judge-engine``: loaded in this process (transformers)."""


@dataclass
class EvalConfig:
    # models
    model: Optional[str] = option(
        None,
        "Model for the base/persona systems (default: the embedded SmolLM2-135M-Instruct, "
        "or the base model of --prism).",
        group=G_MODELS,
    )
    prism: Optional[str] = option(
        None, "PRISM artifact dir (RUN/prism) for the lora, prism and oracle systems.", metavar="ART", group=G_MODELS
    )
    dtype: str = option("auto", "Weights dtype: auto, float32, bfloat16 or float16.", choices=DTYPES, group=G_MODELS)
    device: str = option("auto", "Device: auto, cpu, cuda, cuda:N.", group=G_MODELS)
    batch_size: int = option(8, "Rows per generation batch.", at_least=1, group=G_MODELS)
    trust_remote_code: bool = option(
        False,
        "Run the model's own Python modelling code (some hub models need it); "
        "only from this flag, never from an artifact.",
        group=G_MODELS,
    )
    # engine: the block every command that generates embeds (flags: the ones EngineConfig names)
    engine: EngineConfig = engine_block()
    # data
    benchmarks: Optional[str] = option(
        None,
        "Comma list of mmlu, mtbench, harmbench, jailbreak, pku, benign, safety "
        "(safety = harmbench,jailbreak,pku,benign), xstest, refusal_set "
        "(default: all but xstest and refusal_set, which run when named).",
        group=G_DATA,
    )
    mmlu: Optional[str] = option(
        None,
        "Local MMLU instead of cais/mmlu: a cais/mmlu export (.jsonl/.json/.csv/.parquet, "
        "or a folder) or a folder of original <subject>_test.csv files.",
        metavar="PATH",
        group=G_DATA,
    )
    subjects: Optional[str] = option(None, "Comma list of MMLU subjects to keep.", group=G_DATA)
    categories: Optional[str] = option(None, "Comma list of MT-Bench categories to keep.", group=G_DATA)
    mtbench: Optional[str] = option(
        None,
        "Local MT-Bench questions instead of lighteval/mt-bench (FastChat's question.jsonl).",
        metavar="PATH",
        group=G_DATA,
    )
    harmbench: Optional[str] = option(
        None,
        "Local HarmBench behaviours instead of walledai/HarmBench (harmbench_behaviors_text_all.csv).",
        metavar="PATH",
        group=G_DATA,
    )
    jailbreak: Optional[str] = option(
        None,
        "Local harmful requests instead of JailbreakBench/JBB-Behaviors harmful "
        "(CSV with Goal, or a JSON list of prompts).",
        metavar="PATH",
        group=G_DATA,
    )
    pku: Optional[str] = option(
        None, "Local PKU-SafeRLHF prompts instead of PKU-Alignment/PKU-SafeRLHF test.", metavar="PATH", group=G_DATA
    )
    benign: Optional[str] = option(
        None,
        "Local benign requests (over-refusal) instead of JailbreakBench/JBB-Behaviors benign.",
        metavar="PATH",
        group=G_DATA,
    )
    xstest: Optional[str] = option(
        None,
        "Local XSTest instead of walledai/XSTest: xstest_prompts.csv (prompt, type, label = safe/unsafe).",
        metavar="PATH",
        group=G_DATA,
    )
    refusal_set: Optional[str] = option(
        None,
        "Labelled refusal set for --benchmarks refusal_set: a .jsonl/.json/.csv of requests with a prompt "
        "(query/prompt), a label (intent/label: harmful or benign) and optionally a domain/category.",
        metavar="PATH",
        group=G_DATA,
    )
    data: dict = option(
        {},
        "Benchmark or set name -> a local copy of its data, for any registered benchmark (the named "
        "flags above are the same for the built-in ones); on the command line --data NAME=PATH, repeatable.",
        cli=False,
    )
    limit: Optional[int] = option(
        None, "At most N items per benchmark (spread over categories/subjects).", at_least=1, group=G_DATA
    )
    mmlu_limit: Optional[int] = option(None, "Override --limit for MMLU.", at_least=1, group=G_DATA)
    mtbench_limit: Optional[int] = option(None, "Override --limit for MT-Bench.", at_least=1, group=G_DATA)
    safety_limit: Optional[int] = option(None, "Override --limit for each safety set.", at_least=1, group=G_DATA)
    # personas
    personas: Optional[str] = option(
        None, "Run directory whose bootstrapped personas to use.", metavar="RUN", group=G_PERSONAS
    )
    persona_json: Optional[str] = option(
        None,
        "Personas of every domain as one JSON file {domain: {min|short|long: text}} or {domain: text}.",
        metavar="JSON",
        group=G_PERSONAS,
    )
    persona_files: dict = option(
        {},
        "domain -> path of a text file used verbatim as that domain's persona (all lengths); "
        "on the command line --persona-file DOMAIN=PATH, repeatable, as in prism run.",
        cli=False,
    )
    persona_map: Optional[str] = option(
        None,
        "Category -> domain overrides, CAT=DOMAIN,... or a JSON file (default: by "
        "name, e.g. writing->writing, coding->coding, safety sets->safety).",
        group=G_PERSONAS,
    )
    persona_length: str = option("short", "Persona variant.", choices=PERSONA_LENGTHS, group=G_PERSONAS)
    placement: str = option(
        "system", "Persona as system message or before the user message.", choices=PLACEMENTS, group=G_PERSONAS
    )
    # judge and generation
    judge: Optional[str] = option(
        None,
        "The model that judges: self (default: the base model) or a model id/path.",
        metavar="MODEL",
        group=G_JUDGE,
    )
    judge_engine: Optional[str] = option(
        None,
        f"Where the --judge MODEL runs: {LOCAL_JUDGE_ENGINE} (in this process, the default), vllm (a vLLM server PRISM "
        "starts for it, or attaches to with --judge-base-url) or openai (the server at --judge-base-url, "
        "--judge = its served model name). The engine settings other than the URL are --engine's.",
        choices=ENGINES,
        group=G_JUDGE,
    )
    judge_base_url: str = option(
        "",
        "Base URL of the judge's server (--judge-engine openai, or vllm to attach), e.g. http://host:8000/v1.",
        group=G_JUDGE,
    )
    grader: Optional[str] = option(
        None,
        "A Python function module:function or file.py:function that judges instead of a model: "
        "called with each judge prompt, it returns the reply text.",
        metavar="FN",
        group=G_JUDGE,
    )
    refusal_classifier: str = option(
        "judge",
        "Who decides whether a safety/benign response refuses: judge (the --judge "
        "model), string (the refusal-phrase baseline), hf:MODEL (a Hugging Face sequence classifier "
        "reading the response, e.g. hf:ProtectAI/distilroberta-base-rejection-v1) or module:function / "
        "file.py:function (request, response) -> bool; written into results.json.",
        group=G_JUDGE,
    )
    refusal_label: Optional[str] = option(
        None,
        "With --refusal-classifier hf:MODEL: the label (name or index of the model's id2label) that "
        "means refusal (default: the one label whose name says refusal/rejection).",
        group=G_JUDGE,
    )
    judge_mode: str = option(
        "auto",
        "Log-prob verdicts when the engine can score (auto), or text, or logprob.",
        choices=("auto", "logprob", "text"),
        group=G_JUDGE,
    )
    judge_tokens: int = option(48, "Token budget of a judge reply.", at_least=1, at_most=MAX_NEW_TOKENS, group=G_JUDGE)
    answer_tokens: int = option(
        512, "Max new tokens per MT-Bench turn.", at_least=1, at_most=MAX_NEW_TOKENS, group=G_JUDGE
    )
    safety_tokens: int = option(
        256, "Max new tokens per safety response.", at_least=1, at_most=MAX_NEW_TOKENS, group=G_JUDGE
    )
    no_pairwise: bool = option(False, "Skip MT-Bench pairwise win rates vs base.", group=G_JUDGE)
    resamples: int = option(1000, "Bootstrap resamples for 95% CIs.", at_least=0, group=G_JUDGE)
    seed: int = option(0, "Seed for bootstrap and random personas.", group=G_JUDGE)

    def model_block(self) -> ModelConfig:
        """This command's model flags as the one model block every loader takes (the model itself is
        chosen per system: ``--model``, the artifact's base model or ``--judge``)."""
        return ModelConfig(
            dtype=self.dtype, device=self.device, batch_size=self.batch_size, trust_remote_code=self.trust_remote_code
        )

    def validate(self) -> None:
        """What an artifact and a model need of the engine (``EngineConfig.validate`` checks the engine's
        own flags), before anything loads (one-line errors)."""
        from ..engines import engine_spec
        from ..errors import PrismError

        self._validate_judge()
        spec = engine_spec(self.engine.engine)
        if self.prism and not (spec.gated_model or spec.serves_adapters):
            from ..gated.remote import adapter_engines_text

            raise PrismError(
                f"--engine {self.engine.engine} runs base/persona/random only; for --prism use "
                f"{adapter_engines_text()} (with --base-url to attach to a server that serves the adapter as 'prism')"
            )

    def _validate_judge(self) -> None:
        """--judge names a model, --grader a prompt -> text function: each flag keeps its one contract."""
        from ..errors import PrismError
        from ..judges import is_callable_spec

        judge = (self.judge or "").strip()
        if judge and is_callable_spec(judge) and not Path(judge).expanduser().exists():
            raise PrismError(
                f"--judge takes a model (self, a model id or a path), got '{judge}'; "
                "a function judge(prompt) -> reply text goes to --grader module:function"
            )
        if judge and self.grader:
            raise PrismError("--judge and --grader both name the judge: give one")
        self._validate_judge_engine(judge)

    def _validate_judge_engine(self, judge: str) -> None:
        """A judge on a server names its model; a judge URL needs a server judge engine."""
        from ..config import check_base_url, server_engines_text
        from ..engines import engine_spec
        from ..errors import PrismError

        spec = engine_spec(self.judge_engine or LOCAL_JUDGE_ENGINE)
        if self.judge_base_url and not spec.server:
            raise PrismError(f"--judge-base-url needs {server_engines_text('--judge-engine')}")
        if not spec.server:  # the judge model loads in this process
            return
        if not judge or judge == "self" or self.grader:
            raise PrismError(f"--judge-engine {self.judge_engine} runs a judge model: pass --judge MODEL")
        if spec.needs_base_url and not self.judge_base_url:
            raise PrismError(
                f"--judge-engine {self.judge_engine} needs --judge-base-url (e.g. http://127.0.0.1:8000/v1)"
            )
        if self.judge_base_url:
            check_base_url(self.judge_base_url, "--judge-base-url")
