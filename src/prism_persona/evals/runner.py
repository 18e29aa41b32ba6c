"""The shared machinery of every benchmark: engines, judge, refusal classifier, personas and the cache.

Each benchmark (``evals/benchmarks/``: ``mmlu.py``, ``mtbench.py``, ``safety.py``) runs as an
:class:`~prism_persona.evals.base.Evaluator` that uses the two loops here: :meth:`EvalRunner.responses_for`
(cached generation) and :meth:`EvalRunner.judged` (cached judging).

Responses live in ``OUT/responses.jsonl``, keyed by what produced them (the weights, the exact persona
text and placement, the generation settings, the benchmark item), not by the system's name: adding a
system, re-judging, or a study that reuses a condition never regenerates what exists. Judgments live in
``OUT/judgments.jsonl``, keyed by the judge too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from ..engines.base import SamplingParams
from ..judges import EvalJudge, RefusalClassifier, make_refusal_classifier
from ..models import with_persona
from ..stats import bootstrap_ci
from ..store import RunDir, content_key
from .gates import RECORD_KEYS, persona, personas
from .settings import EvalConfig
from .systems import EngineProvider, PersonaBook, SystemSpec

log = logging.getLogger(__name__)

CHUNK = 32
"""Items generated between cache flushes."""


MAX_JUDGMENT_CHARS = 4_000
"""Each text a judge returns is kept in ``judgments.jsonl`` to this many characters (a run's verdicts keep
300 of a user judge's result, :data:`prism_persona.judges.MAX_RESULT_CHARS`; an eval judge's explanation
is kept longer, it is exported as the FastChat ``judgment``); the grade is read before the cut."""


def capped(result: dict) -> dict:
    """``result`` with every string value cut to :data:`MAX_JUDGMENT_CHARS` (a judge served over HTTP
    that answers 10 MB per item would otherwise make a judgments file of tens of MB for four items)."""
    return {
        k: (v[:MAX_JUDGMENT_CHARS] + "...[cut]" if isinstance(v, str) and len(v) > MAX_JUDGMENT_CHARS else v)
        for k, v in result.items()
    }


@dataclass(frozen=True)
class Job:
    """One item a system must answer: its cache key, what the benchmark needs to answer it, its persona domain."""

    item_id: str
    key: str
    payload: Any
    domain: Optional[str] = None


@dataclass
class Counters:
    generated: int = 0
    scored: int = 0
    judged: int = 0
    cached: int = 0


class EvalRunner:
    """One output directory, one engine provider, one judge, one persona book."""

    def __init__(
        self,
        out: str,
        provider: EngineProvider,
        judge: Optional[EvalJudge] = None,
        personas: Optional[PersonaBook] = None,
        settings: Optional[EvalConfig] = None,
        judge_factory=None,
        refusal: Optional[RefusalClassifier] = None,
        refusal_spec: str = "judge",
    ):
        self.run = out if isinstance(out, RunDir) else RunDir(out)
        self.provider = provider
        self._judge = judge
        self._judge_factory = judge_factory
        self._refusal = refusal
        self._refusal_spec = refusal_spec
        self.external_answers: dict = {}  # model id -> {question_id: [answer per turn]} (FastChat files)
        # a K-way artifact's persona names, in its order (prism eval sets them): the routing text's rows
        self.gate_personas: list[str] = []
        self.book = personas or PersonaBook()
        self.s = settings or EvalConfig()  # the eval settings block itself (tokens, seed, resamples)
        self.responses = self.run.store("responses", {"schema": 1})
        self.judgments = self.run.store("judgments", {"schema": 1})
        self.count = Counters()

    @property
    def judge(self) -> EvalJudge:
        if self._judge is None:
            if self._judge_factory is None:
                raise RuntimeError("no judge configured")
            self._judge = self._judge_factory()
        return self._judge

    @property
    def refusal(self) -> RefusalClassifier:
        """The refusal classifier (``--refusal-classifier``; default: the judge)."""
        if self._refusal is None:
            self._refusal = make_refusal_classifier(self._refusal_spec, lambda: self.judge)
        return self._refusal

    # ------------------------------------------------------------------------------------------ helpers

    def chat_for(
        self, spec: SystemSpec, category: str, item_id: str, messages: list
    ) -> tuple[list, Optional[str], Optional[str]]:
        """(chat with the system's persona, persona text or None, persona domain or None)."""
        persona, domain = self.book.for_item(spec, category, item_id)
        if persona:
            return with_persona(messages, persona, spec.placement), persona, domain
        return [dict(m) for m in messages], None, None

    def key(self, spec: SystemSpec, bench: str, item_id: str, persona: Optional[str], extra: Any = None) -> str:
        """Cache key of a response: the weights, the exact persona and placement, the settings, the item."""
        placement = spec.placement if persona else None
        return content_key("resp", self.provider.identity(spec.kind), bench, item_id, persona, placement, extra)

    @staticmethod
    def meta(c) -> dict:
        """Routing meta of a completion when the engine reports it: ``routed``, ``gate_prob``, and where
        the gate has them ``abstained``, ``outside``, ``persona``, ``persona_prob`` (:mod:`.gates`)."""
        meta = getattr(c, "meta", None) or {}
        return {k: meta[k] for k in RECORD_KEYS if k in meta}

    # ------------------------------------------------------------------------------------------ the two loops

    def responses_for(
        self, spec: SystemSpec, bench: str, jobs: Sequence[Job], run_chunk: Callable[[Any, list], list]
    ) -> dict[str, dict]:
        """item_id -> response record. Cached jobs are read; the others go to ``run_chunk(engine, jobs)``
        (-> one record dict per job) ``CHUNK`` at a time, each chunk appended to the cache as it finishes."""
        todo = []
        for job in jobs:
            if job.key in self.responses:
                self.count.cached += 1
            else:
                todo.append(job)
        if todo:
            engine = self.provider.get(spec.kind)
            for start in range(0, len(todo), CHUNK):
                chunk = todo[start : start + CHUNK]
                recs = run_chunk(engine, chunk)
                self.responses.extend(
                    [
                        {
                            "key": j.key,
                            "bench": bench,
                            "item_id": j.item_id,
                            "system": spec.name,
                            "domain": j.domain,
                            **r,
                        }
                        for j, r in zip(chunk, recs)
                    ]
                )
        return {job.item_id: self.responses.get(job.key) for job in jobs}

    def judged(
        self,
        kind: str,
        jobs: Sequence[tuple[str, Any, dict]],
        judge_chunk: Callable[[list], list],
        calls_per_job: int = 1,
    ) -> dict[str, dict]:
        """key -> judgment record for ``(key, payload, fields)`` jobs; missing keys (each once) are judged by
        ``judge_chunk(payloads)`` ``CHUNK`` at a time and appended as ``{key, kind, **fields, **result}``."""
        todo, seen = [], set()
        for key, payload, fields in jobs:
            if key not in self.judgments and key not in seen:
                seen.add(key)
                todo.append((key, payload, fields))
        for start in range(0, len(todo), CHUNK):
            chunk = todo[start : start + CHUNK]
            res = judge_chunk([payload for _, payload, _ in chunk])
            self.count.judged += calls_per_job * len(chunk)
            self.judgments.extend(
                [{"key": k, "kind": kind, **fields, **capped(r)} for (k, _, fields), r in zip(chunk, res)]
            )
        return {key: self.judgments.get(key) for key, _, _ in jobs}

    # ------------------------------------------------------------------------------------------ summaries

    def gen(self, tokens: int) -> SamplingParams:
        """Greedy sampling of at most ``tokens`` new tokens (every benchmark answers greedily)."""
        return SamplingParams(max_new_tokens=tokens, temperature=0.0, seed=self.s.seed)

    def ci(self, values: Sequence[float]) -> dict:
        return bootstrap_ci(values, n_resamples=self.s.resamples, seed=self.s.seed)

    def routing(self, pairs: Sequence[tuple[str, list]]) -> dict:
        """{category: CI of the routed share} from (category, [meta...]) pairs that carry ``routed``."""
        return self._shares(pairs, lambda m: bool(m["routed"]))

    def persona_routing(self, pairs: Sequence[tuple[str, list]]) -> dict:
        """``{persona: {category: CI of the share routed to that persona}}`` from the same pairs as
        :meth:`routing`, for a K-way artifact: each of :attr:`gate_personas` (the artifact's, in its order)
        and any other persona the metas name, when that makes at least two; ``{}`` otherwise (a binary
        artifact: :meth:`routing` says it all)."""
        metas = [m for _, ms in pairs for m in ms if m and "routed" in m]
        return {
            name: self._shares(pairs, lambda m, name=name: persona(m) == name)
            for name in personas(metas, self.gate_personas)
        }

    def _shares(self, pairs: Sequence[tuple[str, list]], hit) -> dict:
        """{category (and "all"): CI of the share of metas carrying ``routed`` for which ``hit(meta)``}."""
        by: dict[str, list] = {}
        for cat, metas in pairs:
            for m in metas:
                if m and "routed" in m:
                    value = 1.0 if hit(m) else 0.0
                    by.setdefault(cat, []).append(value)
                    by.setdefault("all", []).append(value)
        return {k: self.ci(v) for k, v in sorted(by.items())}
