"""Turning `prism eval` / `prism study` flags into loaded benchmarks, engines, a judge and a runner."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from ..errors import PrismError
from . import data as D
from .evaluate import Benchmarks
from ..judges import is_callable_spec, load_callable
from .judging import REFUSAL_CLASSIFIERS, CallableEngine, EvalJudge, make_refusal_classifier
from .runner import EvalRunner, EvalSettings
from .systems import EngineProvider, PersonaBook, load_persona_file, load_run_personas, parse_match

log = logging.getLogger(__name__)

ALL_BENCHMARKS = ("mmlu", "mtbench") + D.SAFETY_BENCHMARKS


def parse_benchmarks(text: Optional[str], have_mmlu: bool = True) -> list[str]:
    """``"mmlu,mtbench,safety"`` -> names; ``safety`` means the harmful sets and the benign
    (over-refusal) set. Default: every benchmark (each from its hub dataset unless a flag gives a path)."""
    if not text:
        return ["mmlu", "mtbench", *D.SAFETY_BENCHMARKS]
    out: list[str] = []
    for name in (t.strip().lower() for t in text.split(",") if t.strip()):
        names = list(D.SAFETY_BENCHMARKS) if name == "safety" else [name]
        for n in names:
            if n not in ALL_BENCHMARKS:
                raise PrismError(f"unknown benchmark '{n}'; choose from {', '.join(ALL_BENCHMARKS)} or safety")
            if n not in out:
                out.append(n)
    return out


def load_benchmarks(args, names: list[str], limit: Optional[int] = None) -> Benchmarks:
    """Load the chosen benchmarks (``--limit`` items each, spread over categories)."""
    b = Benchmarks()
    lim = limit if limit is not None else getattr(args, "limit", None)
    if "mmlu" in names:
        subjects = [s for s in (args.subjects or "").split(",") if s.strip()] or None
        b.mmlu = D.load_mmlu(args.mmlu or None, subjects=subjects, limit=getattr(args, "mmlu_limit", None) or lim)
    if "mtbench" in names:
        cats = [s for s in (getattr(args, "categories", None) or "").split(",") if s.strip()] or None
        b.mtbench = D.load_mtbench(args.mtbench or None, categories=cats,
                                   limit=getattr(args, "mtbench_limit", None) or lim)
        if not b.mtbench:
            raise PrismError(f"no MT-Bench questions in categories {cats}")
    for s in D.SAFETY_BENCHMARKS:
        if s in names:
            b.safety[s] = D.load_safety(s, getattr(args, s, None) or None,
                                        limit=getattr(args, "safety_limit", None) or lim)
    return b


def _model_display(spec: Optional[str]) -> str:
    from ..models import resolve_model

    return resolve_model(spec).display


def build_provider(args) -> EngineProvider:
    """Engines for base/persona (``--model``) and lora/prism (``--prism``), loaded on first use.

    With ``--prism`` and no ``--model``, base is the gated model with the adapter forced off
    (the same weights, loaded once).
    """
    factories: dict = {}
    identities: dict = {}
    holder: dict = {}
    art = Path(args.prism).expanduser().resolve() if getattr(args, "prism", None) else None
    if art is not None:
        from ..gated.artifact import Artifact

        base_model = Artifact.read(art).base_model

        def gated():
            if "gm" not in holder:
                from ..gated.model import GatedModel

                holder["gm"] = GatedModel.from_pretrained(art, device=args.device or "auto", dtype=args.dtype or "auto",
                                                          batch_size=args.batch_size)
            return holder["gm"]

        factories["lora"] = lambda: gated().as_engine(force=True)
        factories["prism"] = lambda: gated().as_engine(force=None)
        identities["lora"] = f"lora:{art}"
        identities["prism"] = f"prism:{art}"
        if not args.model:
            factories["base"] = lambda: gated().as_engine(force=False)
            identities["base"] = f"base:{_model_display(base_model)}"
    if "base" not in factories:
        spec = args.model

        def base():
            from ..engines.hf import HFEngine

            return HFEngine.load(spec, args.dtype or "auto", args.device or "auto", args.batch_size or 8, args.quiet)

        factories["base"] = base
        identities["base"] = f"base:{_model_display(spec)}"
    return EngineProvider(factories, identities)


def build_judge(args, provider: EngineProvider) -> EvalJudge:
    """``self`` (the base engine), another model id/path, or ``module:function`` (prompt -> reply text)."""
    spec = (getattr(args, "judge", None) or "self").strip()
    mode = getattr(args, "judge_mode", None) or "auto"
    tokens = getattr(args, "judge_tokens", None) or 48
    if spec == "self":
        return EvalJudge(provider.get("base"), f"self:{provider.identity('base')}", mode, tokens)
    if is_callable_spec(spec) and not Path(spec).exists():
        fn = load_callable(spec)
        return EvalJudge(CallableEngine(fn, spec), f"callable:{spec}", "text", tokens)
    from ..engines.hf import HFEngine

    engine = HFEngine.load(spec, args.dtype or "auto", args.device or "auto", args.batch_size or 8, args.quiet)
    return EvalJudge(engine, f"model:{engine.model_name}", mode, tokens)


def build_personas(args) -> PersonaBook:
    """Personas from ``--persona-file``, else ``--personas RUN``, else the run beside ``--prism``."""
    personas: dict = {}
    if getattr(args, "persona_file", None):
        personas = load_persona_file(args.persona_file)
    elif getattr(args, "personas", None):
        personas = load_run_personas(args.personas)
    elif getattr(args, "prism", None):
        run = Path(args.prism).expanduser().resolve().parent
        if (run / "personas.jsonl").is_file():
            personas = load_run_personas(run)
    if not personas:
        log.info("no personas given: using built-in generic expert personas per category")
    return PersonaBook(personas, parse_match(getattr(args, "persona_map", None)), seed=args.seed or 0)


def build_runner(args, out: Optional[str] = None) -> EvalRunner:
    provider = build_provider(args)
    settings = EvalSettings(answer_tokens=args.answer_tokens, safety_tokens=args.safety_tokens,
                            seed=args.seed or 0, n_resamples=args.resamples)
    spec = getattr(args, "refusal_classifier", None) or "judge"
    refusal = None
    if spec not in REFUSAL_CLASSIFIERS:  # a user function: import it now (one-line error before any model loads)
        refusal = make_refusal_classifier(spec, lambda: None)
    return EvalRunner(out or args.out, provider, personas=build_personas(args), settings=settings,
                      judge_factory=lambda: build_judge(args, provider), refusal=refusal, refusal_spec=spec)


def add_eval_options(p) -> None:
    """Flags shared by `prism eval` and `prism study` (standard library only)."""
    g = p.add_argument_group("models")
    g.add_argument("--model", help="model for base/persona systems (default: the embedded SmolLM2-135M-Instruct, "
                                   "or the base model of --prism)")
    g.add_argument("--prism", metavar="ART", help="PRISM artifact dir (RUN/prism) for the lora, prism and oracle systems")
    g.add_argument("--dtype", help="auto | float32 | bfloat16 | float16")
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--batch-size", type=int, default=8, help="rows per generation batch (default 8)")
    g = p.add_argument_group("data (default: each benchmark's Hugging Face dataset; a PATH = a local copy)")
    g.add_argument("--benchmarks", help="comma list of mmlu, mtbench, harmbench, jailbreak, pku, benign, safety "
                                        "(safety = harmbench,jailbreak,pku,benign; default: all)")
    g.add_argument("--mmlu", metavar="PATH", help="local MMLU instead of cais/mmlu: a cais/mmlu export "
                                                   "(.jsonl/.json/.csv/.parquet, or a folder) or a folder of "
                                                   "original <subject>_test.csv files")
    g.add_argument("--subjects", help="comma list of MMLU subjects to keep")
    g.add_argument("--categories", help="comma list of MT-Bench categories to keep")
    g.add_argument("--mtbench", metavar="PATH", help="local MT-Bench questions instead of lighteval/mt-bench "
                                                      "(FastChat's question.jsonl)")
    g.add_argument("--harmbench", metavar="PATH", help="local HarmBench behaviours instead of walledai/HarmBench "
                                                        "(harmbench_behaviors_text_all.csv)")
    g.add_argument("--jailbreak", metavar="PATH", help="local harmful requests instead of JailbreakBench/JBB-Behaviors "
                                                        "harmful (CSV with Goal, or a JSON list of prompts)")
    g.add_argument("--pku", metavar="PATH", help="local PKU-SafeRLHF prompts instead of PKU-Alignment/PKU-SafeRLHF test")
    g.add_argument("--benign", metavar="PATH", help="local benign requests (over-refusal) instead of "
                                                     "JailbreakBench/JBB-Behaviors benign")
    g.add_argument("--limit", type=int, help="at most N items per benchmark (spread over categories/subjects)")
    g.add_argument("--mmlu-limit", type=int, help="override --limit for MMLU")
    g.add_argument("--mtbench-limit", type=int, help="override --limit for MT-Bench")
    g.add_argument("--safety-limit", type=int, help="override --limit for each safety set")
    g = p.add_argument_group("personas")
    g.add_argument("--personas", metavar="RUN", help="run directory whose bootstrapped personas to use")
    g.add_argument("--persona-file", metavar="JSON", help='personas as JSON {domain: {min|short|long: text}} or {domain: text}')
    g.add_argument("--persona-map", help="category -> domain overrides, CAT=DOMAIN,... or a JSON file "
                                         "(default: by name, e.g. writing->writing, coding->coding, safety sets->safety)")
    g.add_argument("--persona-length", choices=["min", "short", "long"], default="short", help="persona variant (default short)")
    g.add_argument("--placement", choices=["system", "user"], default="system", help="persona as system message or before the user message")
    g = p.add_argument_group("judge and generation")
    g.add_argument("--judge", help="self (default: the base model), a model id/path, or module:function "
                                   "(called with the judge prompt, returns the reply text)")
    g.add_argument("--refusal-classifier", default="judge",
                   help="who decides whether a safety/benign response refuses: judge (default: the --judge model), "
                        "string (the refusal-phrase baseline) or module:function / file.py:function "
                        "(request, response) -> bool; written into results.json")
    g.add_argument("--judge-mode", choices=["auto", "logprob", "text"], help="log-prob verdicts when the engine can score (auto)")
    g.add_argument("--judge-tokens", type=int, default=48, help="token budget of a judge reply (default 48)")
    g.add_argument("--answer-tokens", type=int, default=512, help="max new tokens per MT-Bench turn (default 512)")
    g.add_argument("--safety-tokens", type=int, default=256, help="max new tokens per safety response (default 256)")
    g.add_argument("--no-pairwise", action="store_true", help="skip MT-Bench pairwise win rates vs base")
    g.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for 95%% CIs (default 1000)")
    g.add_argument("--seed", type=int, default=0, help="seed for bootstrap and random personas (default 0)")
