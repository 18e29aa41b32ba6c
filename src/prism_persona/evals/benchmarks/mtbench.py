"""MT-Bench, all of it: answering both turns, single-answer grades, swapped pairwise verdicts vs base,
the oracle, answers read from FastChat files, and the summary (scores per turn and category, win rates,
routing), loading the questions and the report section. The FastChat file formats are in
``evals/fastchat.py``.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ...errors import PrismError
from ...models import with_persona
from ...store import content_key
from .. import sources as S
from ..base import Benchmark, CategoryPersona, Evaluator, keep_gates, oracle_wanted, register
from ..data import take_stratified
from ..format import fig_md, fmt_ci, grouped_bars, md_table, present, routing_table
from ..runner import Job

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MTBenchItem:
    item_id: str
    category: str
    turns: tuple
    reference: tuple = ()


def _mtbench_row(row, where: str) -> MTBenchItem:
    """FastChat's ``question.jsonl`` layout; HuggingFaceH4/mt_bench_prompts' ``prompt``/``prompt_id`` too."""
    if not isinstance(row, dict):
        raise PrismError(f"{where}: expected an object with question_id, category, turns")
    row = dict(row)
    if "turns" not in row and "prompt" in row:
        row["turns"] = row["prompt"]
    if "question_id" not in row and "prompt_id" in row:
        row["question_id"] = row["prompt_id"]
    missing = [k for k in ("question_id", "category", "turns") if k not in row]
    if missing:
        raise PrismError(f"{where}: missing field(s) {', '.join(missing)}")
    turns = row["turns"]
    if hasattr(turns, "tolist"):
        turns = turns.tolist()
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise PrismError(f"{where}: 'turns' must be a non-empty list of strings")
    ref = row.get("reference") or []
    ref = ref.tolist() if hasattr(ref, "tolist") else ref
    return MTBenchItem(
        str(row["question_id"]),
        str(row["category"]),
        tuple(turns),
        tuple(str(r) for r in ref) if isinstance(ref, list) else (),
    )


def load_mtbench(
    path: str | Path | None = None, categories: Optional[Iterable[str]] = None, limit: Optional[int] = None
) -> list[MTBenchItem]:
    """MT-Bench questions (``question_id``, ``category``, ``turns`` [, ``reference``]): the hub copy of
    FastChat's ``question.jsonl`` by default, or a local .jsonl/.json/.parquet file."""
    rows = S.rows_from("mtbench", path, "MT-Bench")
    items = [_mtbench_row(row, where) for where, row in rows]
    if not items:
        raise PrismError(f"MT-Bench file has no questions: {path}")
    if categories:
        wanted = {c.strip() for c in categories if c.strip()}
        items = [it for it in items if it.category in wanted]
    return take_stratified(items, lambda it: it.category, limit)


GRADE_PROMPT = (
    "[Instruction]\nAct as an impartial judge and rate the quality of the AI assistant's answer to the "
    "user's question below. Consider helpfulness, relevance, accuracy, depth and level of detail.{ref_note} "
    'Reply with the rating first, on a scale of 1 to 10, strictly in the format "[[rating]]" '
    '(for example "[[5]]"), then one short sentence of explanation.\n\n'
    "{body}"
)


def grade_prompt(turns: Sequence[str], answers: Sequence[str], turn: int, reference: Sequence[str] = ()) -> str:
    """The judge prompt for MT-Bench turn ``turn`` (0-based): the conversation up to that turn."""
    ref_note = " Compare the answer with the reference answer given; correctness matters most." if reference else ""
    if turn == 0:
        body = f"[Question]\n{turns[0]}\n\n"
        if reference:
            body += f"[The Start of Reference Answer]\n{reference[0]}\n[The End of Reference Answer]\n\n"
        body += f"[The Start of Assistant's Answer]\n{answers[0]}\n[The End of Assistant's Answer]"
    else:
        body = "<|The Start of the Conversation|>\n"
        for k in range(turn + 1):
            body += f"### User:\n{turns[k]}\n\n### Assistant:\n{answers[k]}\n\n"
        body += "<|The End of the Conversation|>\n\n"
        if reference and len(reference) > turn:
            body += f"[Reference answer to the last question]\n{reference[turn]}\n\n"
        body += "Rate only the assistant's answer to the LAST user question."
    return GRADE_PROMPT.format(ref_note=ref_note, body=body)


def conversation(parts: Sequence[str], label: str = "Answer") -> str:
    """One text for a whole conversation's answers (or questions), as the pairwise judge sees it."""
    if len(parts) == 1:
        return parts[0]
    return "\n\n".join(f"[{label} to turn {i + 1}]\n{p}" for i, p in enumerate(parts))


def _mean_or(scores, default):
    ok = [s for s in scores if s is not None]
    return sum(ok) / len(ok) if ok else default


def win_rates(runner, items, pairs: dict, cats) -> dict:
    value = {"win": 1.0, "tie": 0.5, "loss": 0.0}

    def summary(its):
        outcomes = [pairs[it.item_id]["outcome"] for it in its]
        c = collections.Counter(outcomes)
        return {**runner.ci([value[o] for o in outcomes]), "wins": c["win"], "ties": c["tie"], "losses": c["loss"]}

    res = summary(items)
    res["categories"] = {c: summary([it for it in items if it.category == c]) for c in cats}
    res["unparseable"] = sum(1 for it in items if pairs[it.item_id].get("unparseable"))
    return res


def oracle_results(items, grades, pairs, resp):
    """Per item, lora's answers when the judge graded them higher than base's, else base's."""
    g, p, r = {}, {}, {}
    for it in items:
        b, lo = grades["base"][it.item_id], grades["lora"][it.item_id]
        use_lora = _mean_or(lo, -1) > _mean_or(b, -1)
        g[it.item_id] = lo if use_lora else b
        r[it.item_id] = resp["lora" if use_lora else "base"][it.item_id]
        if use_lora and "lora" in pairs:
            p[it.item_id] = pairs["lora"][it.item_id]
        else:
            p[it.item_id] = {"outcome": "tie", "identical": True}
    return g, p, r


class MTBenchEvaluator(Evaluator):
    """Two-turn MT-Bench: greedy answers, judge grades 1-10 per turn, swapped pairwise win rate vs base."""

    name = "mtbench"

    def __init__(self, pairwise: bool = True):
        self.pairwise = pairwise

    # ---------------------------------------------------------------------------------------- answers

    def responses(self, runner, spec, items: Sequence[MTBenchItem]) -> dict[str, dict]:
        """item_id -> record with ``answers`` (one per turn) and ``meta`` (one per turn)."""
        if spec.kind == "answers":
            return self._file_answers(runner, spec, items)
        jobs = []
        for it in items:
            _, persona, domain = runner.chat_for(
                spec, it.category, it.item_id, [{"role": "user", "content": it.turns[0]}]
            )
            key = runner.key(spec, "mtbench", it.item_id, persona, {"tokens": runner.s.answer_tokens})
            jobs.append(Job(it.item_id, key, (it, persona), domain))
        params = runner.gen(runner.s.answer_tokens)

        def run_chunk(engine, chunk):
            histories = [[] for _ in chunk]
            answers = [[] for _ in chunk]
            metas = [[] for _ in chunk]
            for t in range(max(len(j.payload[0].turns) for j in chunk)):
                rows = [i for i, j in enumerate(chunk) if t < len(j.payload[0].turns)]
                chats = []
                for i in rows:
                    it, persona = chunk[i].payload
                    histories[i].append({"role": "user", "content": it.turns[t]})
                    msgs = with_persona(histories[i], persona, spec.placement) if persona else histories[i]
                    chats.append([dict(m) for m in msgs])
                outs = engine.generate(chats, params)
                runner.count.generated += len(rows)
                for i, o in zip(rows, outs):
                    histories[i].append({"role": "assistant", "content": o.text})
                    answers[i].append(o.text)
                    metas[i].append(runner.meta(o))
            return [{"answers": a, "meta": m} for a, m in zip(answers, metas)]

        return runner.responses_for(spec, "mtbench", jobs, run_chunk)

    @staticmethod
    def _file_answers(runner, spec, items) -> dict[str, dict]:
        """Records of a system whose answers were read from a FastChat file (nothing generated)."""
        have = runner.external_answers.get(spec.domain, {})
        missing = [it.item_id for it in items if it.item_id not in have]
        if missing:
            raise PrismError(
                f"FastChat answers of '{spec.domain}' lack question(s) {', '.join(missing[:5])}"
                f"{' ...' if len(missing) > 5 else ''} (have {len(have)})"
            )
        out = {}
        for it in items:
            answers = list(have[it.item_id])[: len(it.turns)]
            if len(answers) < len(it.turns):
                raise PrismError(
                    f"FastChat answers of '{spec.domain}' to question {it.item_id}: "
                    f"{len(answers)} turn(s), the question has {len(it.turns)}"
                )
            out[it.item_id] = {
                "bench": "mtbench",
                "item_id": it.item_id,
                "system": spec.name,
                "domain": None,
                "answers": answers,
                "meta": [{} for _ in answers],
                "source": "fastchat",
            }
        return out

    # ---------------------------------------------------------------------------------------- judging

    @staticmethod
    def grade_records(runner, items: Sequence[MTBenchItem], resp: dict) -> dict[str, list]:
        """item_id -> per-turn judgment records (``score`` (None = unparseable), ``text``, ``method``)."""
        jid = runner.judge.identity
        jobs, keys = [], {}
        for it in items:
            answers = resp[it.item_id]["answers"]
            keys[it.item_id] = []
            for t in range(len(answers)):
                prompt = grade_prompt(it.turns, answers, t, it.reference)
                k = content_key("grade", jid, prompt)
                keys[it.item_id].append(k)
                jobs.append((k, prompt, {"judge": jid, "item_id": it.item_id, "turn": t}))

        def judge_chunk(prompts):
            return [
                {"score": r["score"], "text": r["text"], "method": r.get("method", "text")}
                for r in runner.judge.grade(prompts)
            ]

        done = runner.judged("grade", jobs, judge_chunk)
        return {iid: [done[k] for k in ks] for iid, ks in keys.items()}

    @classmethod
    def grades(cls, runner, items, resp) -> dict[str, list]:
        """item_id -> per-turn score (None = unparseable)."""
        return {iid: [r["score"] for r in recs] for iid, recs in cls.grade_records(runner, items, resp).items()}

    @staticmethod
    def pairs(runner, items: Sequence[MTBenchItem], resp: dict, base: dict) -> dict[str, dict]:
        """item_id -> swapped pairwise outcome of the system's conversation vs base's (cached per judge)."""
        jid = runner.judge.identity
        jobs, keys = [], {}
        for it in items:
            x, y = conversation(resp[it.item_id]["answers"]), conversation(base[it.item_id]["answers"])
            q = conversation(list(it.turns), label="Question")
            k = content_key("pair", jid, q, x, y)
            keys[it.item_id] = k
            if x == y:  # identical conversations: a tie without asking
                if k not in runner.judgments:
                    runner.judgments.append(
                        {
                            "key": k,
                            "kind": "pair",
                            "judge": jid,
                            "item_id": it.item_id,
                            "outcome": "tie",
                            "identical": True,
                        }
                    )
                continue
            jobs.append((k, (q, x, y), {"judge": jid, "item_id": it.item_id}))

        def judge_chunk(triples):
            return runner.judge.compare_swapped(
                [t[0] for t in triples], [t[1] for t in triples], [t[2] for t in triples]
            )

        runner.judged("pair", jobs, judge_chunk, calls_per_job=2)
        return {iid: runner.judgments.get(k) for iid, k in keys.items()}

    # ---------------------------------------------------------------------------------------- summary

    def evaluate(self, runner, run_specs, specs, items):
        gates: dict = {}
        resp = {spec.name: self.responses(runner, spec, items) for spec in run_specs}
        for spec in run_specs:
            keep_gates(gates, spec, "mtbench", {it.item_id: resp[spec.name][it.item_id].get("meta") for it in items})
        grades = {name: self.grades(runner, items, r) for name, r in resp.items()}
        pairs = {}
        if self.pairwise:
            for spec in run_specs:
                if spec.name != "base":
                    pairs[spec.name] = self.pairs(runner, items, resp[spec.name], resp["base"])
        if oracle_wanted(specs):
            grades["oracle"], oracle_pairs, resp["oracle"] = oracle_results(items, grades, pairs, resp)
            if self.pairwise:
                pairs["oracle"] = oracle_pairs
        out, per = {}, {}
        cats = sorted({it.category for it in items})
        for spec in specs:
            name = spec.name
            g = grades[name]
            turn_scores = collections.defaultdict(list)
            cat_scores = collections.defaultdict(list)
            item_mean = {}
            unparseable = 0
            for it in items:
                ok = [s for s in g[it.item_id] if s is not None]
                unparseable += sum(1 for s in g[it.item_id] if s is None)
                for t, s in enumerate(g[it.item_id]):
                    if s is not None:
                        turn_scores[str(t + 1)].append(s)
                        cat_scores[it.category].append(s)
                if ok:
                    item_mean[it.item_id] = sum(ok) / len(ok)
            all_scores = [s for v in turn_scores.values() for s in v]
            res = {
                "score": runner.ci(all_scores),
                "turns": {t: runner.ci(v) for t, v in sorted(turn_scores.items())},
                "categories": {c: runner.ci(cat_scores.get(c, [])) for c in cats},
                "unparseable": unparseable,
                "n_grades": sum(len(g[it.item_id]) for it in items),
            }
            if name in pairs:
                res["win_rate"] = win_rates(runner, items, pairs[name], cats)
            if spec.kind == "prism":
                # each question once, by its first turn's decision (Table 1's rule; the second turn keeps it)
                first = [(it.category, (resp[name][it.item_id].get("meta") or [])[:1]) for it in items]
                routing = runner.routing(first)
                if routing:
                    res["routing"] = routing
                    to_persona = runner.persona_routing(first)
                    if to_persona:  # a K-way artifact: the share routed to each persona
                        res["routing_personas"] = to_persona
            out[name] = res
            per[name] = item_mean
        if any(v["unparseable"] for v in out.values()):
            log.warning(
                "MT-Bench: %s judge grades were unparseable and are excluded from the means (small judges "
                "often ignore the [[rating]] format: try --judge-mode logprob or a stronger --judge)",
                ", ".join(f"{k}: {v['unparseable']}/{v['n_grades']}" for k, v in out.items() if v["unparseable"]),
            )
        return out, per, gates


# --------------------------------------------------------------------------------------------------
# the benchmark


@register
class MTBench(Benchmark):
    name = "mtbench"
    answers_from_files = True
    percent = False
    # FastChat's question.jsonl (question_id 81-160, category, turns, reference) as a hub dataset
    hub = {"mtbench": S.HubDataset("lighteval/mt-bench", None, "train", "--mtbench")}
    options = ("mtbench", "categories", "mtbench_limit", "answer_tokens")
    personas = {  # its eight question categories
        "writing": CategoryPersona("creative and professional writing", ("writing", "creative writing", "writer")),
        "roleplay": CategoryPersona(
            "acting and character role-play", ("roleplay", "role-play", "acting", "creative writing", "writing")
        ),
        "reasoning": CategoryPersona("logic and analytical reasoning", ("reasoning", "logic", "math", "mathematics")),
        "math": CategoryPersona("mathematics", ("math", "mathematics", "reasoning")),
        "coding": CategoryPersona(
            "software engineering and programming", ("coding", "programming", "code", "software")
        ),
        "extraction": CategoryPersona(
            "information extraction and data analysis", ("extraction", "data", "analysis", "writing")
        ),
        "stem": CategoryPersona(
            "science and engineering", ("stem", "science", "physics", "chemistry", "biology", "math")
        ),
        "humanities": CategoryPersona(
            "the humanities and social sciences", ("humanities", "history", "philosophy", "social science", "writing")
        ),
    }

    def load(self, cfg, names, limit):
        if "mtbench" not in names:
            return []
        cats = [s for s in (cfg.categories or "").split(",") if s.strip()] or None
        items = load_mtbench(self.data_path(cfg, "mtbench"), categories=cats, limit=cfg.mtbench_limit or limit)
        if not items:
            raise PrismError(f"no MT-Bench questions in categories {cats}")
        return items

    def evaluator(self, pairwise: bool) -> Evaluator:
        return MTBenchEvaluator(pairwise)

    def categories(self, items):
        return {"mtbench": {it.item_id: it.category for it in items}}

    def label(self, member: str) -> str:
        return "MT-Bench score"

    def study_items(self, items):
        return {"mtbench": None}  # every item the judge graded

    def markdown(self, results, figures):
        mt = results["mtbench"]
        systems = present(mt, results["systems"])
        parts = ["## MT-Bench (judge score 1-10; win rate vs base, both orders)", ""]
        rows = [[s] + self._score_cells(mt[s]) for s in systems]
        parts += [md_table(["system", "score", "turn 1", "turn 2", "unparseable", "win rate vs base"], rows), ""]
        cats = sorted(next(iter(mt.values()))["categories"])
        rows = [[c] + [fmt_ci(mt[s]["categories"].get(c)) for s in systems] for c in cats]
        parts += ["Score by category:", "", md_table(["category"] + systems, rows), ""]
        if any(mt[s].get("win_rate") for s in systems):
            rows = [
                [c]
                + [
                    fmt_ci(mt[s]["win_rate"]["categories"].get(c), pct=True) if mt[s].get("win_rate") else "-"
                    for s in systems
                ]
                for c in cats
            ]
            parts += ["Win rate vs base by category:", "", md_table(["category"] + systems, rows), ""]
        parts += routing_table(mt, systems, "MT-Bench", "each question once, by its first turn's decision, as Table 1")
        return parts + fig_md(figures, "mtbench") + fig_md(figures, "mtbench_winrate")

    @staticmethod
    def _score_cells(r: dict) -> list[str]:
        wr = r.get("win_rate")
        return [
            fmt_ci(r["score"]),
            fmt_ci(r["turns"].get("1")),
            fmt_ci(r["turns"].get("2")),
            f"{r['unparseable']}/{r['n_grades']}",
            (fmt_ci(wr, pct=True) + f" W/T/L {wr['wins']}/{wr['ties']}/{wr['losses']}") if wr else "-",
        ]

    def figures(self, results, out):
        mt = results["mtbench"]
        systems = present(mt, results["systems"])
        cats = sorted(next(iter(mt.values()))["categories"])
        series = {s: [mt[s]["score"]] + [mt[s]["categories"].get(c) for c in cats] for s in systems}
        figs = {
            "mtbench": grouped_bars(
                out / "mtbench.png",
                "MT-Bench judge score (95% CI)",
                ["all"] + cats,
                series,
                "score (1-10)",
                ylim=(0, 10.5),
            )
        }
        wr = {
            s: [mt[s]["win_rate"]] + [mt[s]["win_rate"]["categories"].get(c) for c in cats]
            for s in systems
            if mt[s].get("win_rate")
        }
        if wr:
            figs["mtbench_winrate"] = grouped_bars(
                out / "mtbench_winrate.png",
                "MT-Bench win rate vs base (ties = 1/2)",
                ["all"] + cats,
                wr,
                "win rate (%)",
                scale=100,
                ylim=(0, 100),
                hline=50,
            )
        return figs

    def routing_rows(self, section):
        return [(c, v) for c, v in (section.get("routing") or {}).items() if c != "all"]
