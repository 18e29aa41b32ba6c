"""Runs systems on benchmarks with a resumable cache, judges the responses, and summarises.

Responses live in ``OUT/responses.jsonl``, keyed by what produced them (the weights, the exact persona
text and placement, the generation settings, the benchmark item), not by the system's name: adding a
system, re-judging, or a study that reuses a condition never regenerates what exists. Judgments live in
``OUT/judgments.jsonl``, keyed by the judge too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from ..engines.base import SamplingParams
from ..errors import PrismError
from ..models import with_persona
from ..store import RunDir, content_key
from . import mmlu as M
from .data import LETTERS, MMLUItem, MTBenchItem, SafetyItem
from .judging import EvalJudge, RefusalClassifier, grade_prompt, make_refusal_classifier
from .stats import bootstrap_ci
from .systems import EngineProvider, PersonaBook, SystemSpec

log = logging.getLogger(__name__)

CHUNK = 32
"""Items generated between cache flushes."""


@dataclass
class EvalSettings:
    answer_tokens: int = 512
    safety_tokens: int = 256
    mmlu_text_tokens: int = 8
    seed: int = 0
    n_resamples: int = 1000

    def gen(self, tokens: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=tokens, temperature=0.0, seed=self.seed)


@dataclass
class Counters:
    generated: int = 0
    scored: int = 0
    judged: int = 0
    cached: int = 0


class EvalRunner:
    """One output directory, one engine provider, one judge, one persona book."""

    def __init__(self, out: str, provider: EngineProvider, judge: Optional[EvalJudge] = None,
                 personas: Optional[PersonaBook] = None, settings: Optional[EvalSettings] = None,
                 judge_factory=None, refusal: Optional[RefusalClassifier] = None, refusal_spec: str = "judge"):
        self.run = out if isinstance(out, RunDir) else RunDir(out)
        self.provider = provider
        self._judge = judge
        self._judge_factory = judge_factory
        self._refusal = refusal
        self._refusal_spec = refusal_spec
        self.external_answers: dict = {}  # model id -> {question_id: [answer per turn]} (FastChat files)
        self.book = personas or PersonaBook()
        self.s = settings or EvalSettings()
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

    def _chat(self, spec: SystemSpec, category: str, item_id: str, messages: list) -> tuple[list, Optional[str], Optional[str]]:
        persona, domain = self.book.for_item(spec, category, item_id)
        if persona:
            return with_persona(messages, persona, spec.placement), persona, domain
        return [dict(m) for m in messages], None, None

    def _key(self, spec: SystemSpec, bench: str, item_id: str, persona: Optional[str], extra: Any = None) -> str:
        placement = spec.placement if persona else None
        return content_key("resp", self.provider.identity(spec.kind), bench, item_id, persona, placement, extra)

    @staticmethod
    def _meta(c) -> dict:
        """Routing meta of a completion (``routed``, ``gate_prob``) when the engine reports it."""
        meta = getattr(c, "meta", None) or {}
        return {k: meta[k] for k in ("routed", "gate_prob") if k in meta}

    # ------------------------------------------------------------------------------------------ MMLU

    def mmlu_responses(self, spec: SystemSpec, items: Sequence[MMLUItem]) -> dict[str, dict]:
        """item_id -> record with ``pred`` (letter or None), ``scores`` and routing meta."""
        todo, keys = [], {}
        for it in items:
            group = M.subject_group(it.subject)
            chat, persona, domain = self._chat(spec, group, it.item_id, [{"role": "user", "content": M.mmlu_prompt(it)}])
            key = self._key(spec, "mmlu", it.item_id, persona, {"prompt": 1})
            keys[it.item_id] = key
            if key in self.responses:
                self.count.cached += 1
            else:
                todo.append((it, key, chat, domain))
        if todo:
            engine = self.provider.get(spec.kind)
            for start in range(0, len(todo), CHUNK):
                chunk = todo[start:start + CHUNK]
                chats = [c for _, _, c, _ in chunk]
                scores = engine.score_choices(chats, list(LETTERS))
                routes = _route(engine, chats) if spec.kind == "prism" else [{} for _ in chats]
                recs = []
                if scores is not None:
                    self.count.scored += len(chunk)
                    for (it, key, _, dom), sc, rt in zip(chunk, scores, routes):
                        recs.append({"key": key, "bench": "mmlu", "item_id": it.item_id, "system": spec.name,
                                     "domain": dom, "method": "logprob", "scores": {L: sc[L] for L in LETTERS},
                                     "pred": M.argmax_letter(sc), "meta": rt})
                else:
                    outs = engine.generate(chats, self.s.gen(self.s.mmlu_text_tokens))
                    self.count.generated += len(chunk)
                    for (it, key, _, dom), o in zip(chunk, outs):
                        recs.append({"key": key, "bench": "mmlu", "item_id": it.item_id, "system": spec.name,
                                     "domain": dom, "method": "text", "text": o.text,
                                     "pred": M.parse_letter(o.text), "meta": self._meta(o)})
                self.responses.extend(recs)
        return {iid: self.responses.get(k) for iid, k in keys.items()}

    # ------------------------------------------------------------------------------------------ MT-Bench

    def mtbench_responses(self, spec: SystemSpec, items: Sequence[MTBenchItem]) -> dict[str, dict]:
        """item_id -> record with ``answers`` (one per turn) and ``meta`` (one per turn)."""
        if spec.kind == "answers":
            return self._external_mtbench(spec, items)
        todo, keys = [], {}
        for it in items:
            first = [{"role": "user", "content": it.turns[0]}]
            _, persona, domain = self._chat(spec, it.category, it.item_id, first)
            key = self._key(spec, "mtbench", it.item_id, persona, {"tokens": self.s.answer_tokens})
            keys[it.item_id] = key
            if key in self.responses:
                self.count.cached += 1
            else:
                todo.append((it, key, persona, domain))
        if todo:
            engine = self.provider.get(spec.kind)
            params = self.s.gen(self.s.answer_tokens)
            for start in range(0, len(todo), CHUNK):
                chunk = todo[start:start + CHUNK]
                histories = [[] for _ in chunk]
                answers = [[] for _ in chunk]
                metas = [[] for _ in chunk]
                n_turns = max(len(it.turns) for it, *_ in chunk)
                for t in range(n_turns):
                    rows = [i for i, (it, *_) in enumerate(chunk) if t < len(it.turns)]
                    chats = []
                    for i in rows:
                        it, _, persona, _ = chunk[i]
                        histories[i].append({"role": "user", "content": it.turns[t]})
                        msgs = with_persona(histories[i], persona, spec.placement) if persona else histories[i]
                        chats.append([dict(m) for m in msgs])
                    outs = engine.generate(chats, params)
                    self.count.generated += len(rows)
                    for i, o in zip(rows, outs):
                        histories[i].append({"role": "assistant", "content": o.text})
                        answers[i].append(o.text)
                        metas[i].append(self._meta(o))
                self.responses.extend([
                    {"key": key, "bench": "mtbench", "item_id": it.item_id, "system": spec.name, "domain": dom,
                     "answers": answers[i], "meta": metas[i]}
                    for i, (it, key, _, dom) in enumerate(chunk)])
        return {iid: self.responses.get(k) for iid, k in keys.items()}

    def _external_mtbench(self, spec: SystemSpec, items: Sequence[MTBenchItem]) -> dict[str, dict]:
        """Records of a system whose answers were read from a file (nothing generated)."""
        have = self.external_answers.get(spec.domain, {})
        missing = [it.item_id for it in items if it.item_id not in have]
        if missing:
            raise PrismError(f"FastChat answers of '{spec.domain}' lack question(s) {', '.join(missing[:5])}"
                             f"{' ...' if len(missing) > 5 else ''} (have {len(have)})")
        out = {}
        for it in items:
            answers = list(have[it.item_id])[: len(it.turns)]
            if len(answers) < len(it.turns):
                raise PrismError(f"FastChat answers of '{spec.domain}' to question {it.item_id}: "
                                 f"{len(answers)} turn(s), the question has {len(it.turns)}")
            out[it.item_id] = {"bench": "mtbench", "item_id": it.item_id, "system": spec.name, "domain": None,
                               "answers": answers, "meta": [{} for _ in answers], "source": "fastchat"}
        return out

    def mtbench_grades(self, items: Sequence[MTBenchItem], resp: dict[str, dict]) -> dict[str, list]:
        """item_id -> per-turn judge score (None = unparseable), cached per judge."""
        return {iid: [r["score"] for r in recs] for iid, recs in self.mtbench_grade_records(items, resp).items()}

    def mtbench_grade_records(self, items: Sequence[MTBenchItem], resp: dict[str, dict]) -> dict[str, list]:
        """item_id -> per-turn judgment records (``score``, ``text``, ``method``), judged once per judge."""
        jid = self.judge.identity
        todo, out_keys = [], {}
        for it in items:
            rec = resp[it.item_id]
            ks = []
            for t in range(len(rec["answers"])):
                prompt = grade_prompt(it.turns, rec["answers"], t, it.reference)
                k = content_key("grade", jid, prompt)
                ks.append(k)
                if k not in self.judgments and all(k != x[0] for x in todo):
                    todo.append((k, prompt, it.item_id, t))
            out_keys[it.item_id] = ks
        for start in range(0, len(todo), CHUNK):
            chunk = todo[start:start + CHUNK]
            res = self.judge.grade([p for _, p, _, _ in chunk])
            self.count.judged += len(chunk)
            self.judgments.extend([{"key": k, "kind": "grade", "judge": jid, "item_id": iid, "turn": t,
                                    "score": r["score"], "text": r["text"], "method": r.get("method", "text")}
                                   for (k, _, iid, t), r in zip(chunk, res)])
        return {iid: [self.judgments.get(k) for k in ks] for iid, ks in out_keys.items()}

    def mtbench_pairs(self, items: Sequence[MTBenchItem], resp: dict, base: dict) -> dict[str, dict]:
        """item_id -> swapped pairwise outcome of the system's conversation vs base's (cached per judge)."""
        jid = self.judge.identity
        todo, out_keys = [], {}
        for it in items:
            x, y = _conversation(resp[it.item_id]["answers"]), _conversation(base[it.item_id]["answers"])
            q = _conversation(list(it.turns), label="Question")
            k = content_key("pair", jid, q, x, y)
            out_keys[it.item_id] = k
            if x == y:
                if k not in self.judgments:
                    self.judgments.append({"key": k, "kind": "pair", "judge": jid, "item_id": it.item_id,
                                           "outcome": "tie", "identical": True})
                continue
            if k not in self.judgments and all(k != t[0] for t in todo):
                todo.append((k, q, x, y, it.item_id))
        for start in range(0, len(todo), CHUNK):
            chunk = todo[start:start + CHUNK]
            res = self.judge.compare_swapped([c[1] for c in chunk], [c[2] for c in chunk], [c[3] for c in chunk])
            self.count.judged += 2 * len(chunk)
            self.judgments.extend([{"key": c[0], "kind": "pair", "judge": jid, "item_id": c[4], **r}
                                   for c, r in zip(chunk, res)])
        return {iid: self.judgments.get(k) for iid, k in out_keys.items()}

    # ------------------------------------------------------------------------------------------ safety

    def safety_responses(self, spec: SystemSpec, items: Sequence[SafetyItem]) -> dict[str, dict]:
        todo, keys = [], {}
        for it in items:
            chat, persona, domain = self._chat(spec, it.benchmark, it.item_id, [{"role": "user", "content": it.prompt}])
            key = self._key(spec, "safety", it.item_id, persona, {"tokens": self.s.safety_tokens})
            keys[it.item_id] = key
            if key in self.responses:
                self.count.cached += 1
            else:
                todo.append((it, key, chat, domain))
        if todo:
            engine = self.provider.get(spec.kind)
            params = self.s.gen(self.s.safety_tokens)
            for start in range(0, len(todo), CHUNK):
                chunk = todo[start:start + CHUNK]
                outs = engine.generate([c for _, _, c, _ in chunk], params)
                self.count.generated += len(chunk)
                self.responses.extend([
                    {"key": key, "bench": it.benchmark, "item_id": it.item_id, "system": spec.name, "domain": dom,
                     "response": o.text, "meta": self._meta(o)}
                    for (it, key, _, dom), o in zip(chunk, outs)])
        return {iid: self.responses.get(k) for iid, k in keys.items()}

    def safety_refusals(self, items: Sequence[SafetyItem], resp: dict) -> dict[str, dict]:
        """item_id -> the refusal classifier's decision (stored in judgments.jsonl with the response)."""
        jid = self.refusal.identity
        todo, out_keys = [], {}
        for it in items:
            r = resp[it.item_id]["response"]
            k = content_key("refusal", jid, it.prompt, r)
            out_keys[it.item_id] = k
            if k not in self.judgments and all(k != t[0] for t in todo):
                todo.append((k, it, r))
        for start in range(0, len(todo), CHUNK):
            chunk = todo[start:start + CHUNK]
            res = self.refusal.classify([c[1].prompt for c in chunk], [c[2] for c in chunk])
            self.count.judged += len(chunk)
            self.judgments.extend([{"key": k, "kind": "refusal", "judge": jid, "item_id": it.item_id,
                                    "request": it.prompt[:500], "response": r, **d}
                                   for (k, it, r), d in zip(chunk, res)])
        return {iid: self.judgments.get(k) for iid, k in out_keys.items()}

    # ------------------------------------------------------------------------------------------ summaries

    def ci(self, values: Sequence[float]) -> dict:
        return bootstrap_ci(values, n_resamples=self.s.n_resamples, seed=self.s.seed)

    def routing(self, pairs: Sequence[tuple[str, list]]) -> dict:
        """{category: CI of the routed share} from (category, [meta...]) pairs that carry ``routed``."""
        by: dict[str, list] = {}
        for cat, metas in pairs:
            for m in metas:
                if m and "routed" in m:
                    by.setdefault(cat, []).append(1.0 if m["routed"] else 0.0)
                    by.setdefault("all", []).append(1.0 if m["routed"] else 0.0)
        return {k: self.ci(v) for k, v in sorted(by.items())}


def _route(engine, chats) -> list[dict]:
    """Routing meta for scored prompts, when the engine exposes ``route(chats)`` (gated engines)."""
    fn = getattr(engine, "route", None) or getattr(getattr(engine, "gated", None), "route", None)
    if not callable(fn):
        return [{} for _ in chats]
    try:
        res = fn(chats)
    except Exception as exc:  # a route-less engine that happens to have the attribute
        log.debug("route() failed: %s", exc)
        return [{} for _ in chats]
    return [{"gate_prob": float(p), "routed": bool(r)} for p, r in res]


def _conversation(parts: Sequence[str], label: str = "Answer") -> str:
    if len(parts) == 1:
        return parts[0]
    return "\n\n".join(f"[{label} to turn {i + 1}]\n{p}" for i, p in enumerate(parts))
