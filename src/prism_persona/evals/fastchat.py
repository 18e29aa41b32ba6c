"""MT-Bench results in FastChat's llm_judge file formats, and FastChat answer files as systems.

Written by ``prism eval`` under ``OUT/fastchat/`` in FastChat's ``data/mt_bench`` layout, so its tools
(``show_result.py --input-file``, ``compute_agreement.py``, the browser) open them:

* ``model_answer/<system>.jsonl`` -- one line per question: ``question_id``, ``answer_id``, ``model_id``,
  ``choices: [{"index": 0, "turns": [answer per turn]}]``, ``tstamp``;
* ``model_judgment/<judge>_single.jsonl`` -- one line per question, system and turn: ``question_id``,
  ``model``, ``judge: [judge, prompt name]``, ``user_prompt``, ``judgment``, ``score`` (-1 when
  unparseable, as FastChat writes it), ``turn`` (1-based), ``tstamp``;
* ``model_judgment/<judge>_pair.jsonl`` -- one line per question and system compared with ``base``:
  ``question_id``, ``model_1`` (the system), ``model_2`` (base), ``g1_winner`` (verdict with model_1
  shown first) and ``g2_winner`` (model_2 shown first), each ``model_1`` / ``model_2`` / ``tie`` /
  ``error``, ``judge``, ``turn``, ``tstamp``. PRISM judges the whole conversation once per order, so
  ``turn`` is the number of turns and the prompt name says ``multi-turn``.

The prompt names start with ``prism-``: the judge prompts are PRISM's (``judges/grading.py``), not
FastChat's GPT-4 prompts, so grades are comparable between systems judged here, not with FastChat's
published GPT-4 scores.

:func:`read_answers` reads FastChat ``model_answer`` files (a file, or a folder of them: model = file
stem, as FastChat's ``load_model_answers``); ``prism eval --fastchat-answers PATH`` adds each model as
a system whose MT-Bench answers come from the file (graded and compared with base like the others).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path

from ..errors import PrismError
from . import sources as S

WINNER = {"x": "model_1", "y": "model_2", "tie": "tie", "unparseable": "error"}


def _qid(item_id: str):
    return int(item_id) if str(item_id).isdigit() else item_id


def _file_name(name: str) -> str:
    """A file-name-safe model or judge name; a local path keeps only its last part."""
    name = re.sub(r":/[^:]*/", ":", name)
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "model"


def answer_record(model_id: str, item_id: str, answers: Sequence[str], tstamp: float) -> dict:
    digest = hashlib.sha1(json.dumps([model_id, item_id, list(answers)]).encode()).hexdigest()[:22]
    return {
        "question_id": _qid(item_id),
        "answer_id": digest,
        "model_id": model_id,
        "choices": [{"index": 0, "turns": list(answers)}],
        "tstamp": tstamp,
    }


def single_records(model: str, judge: str, items, answers: dict, grades: dict, tstamp: float) -> list[dict]:
    """FastChat single-grade lines: one per question and turn (``grades[item_id]`` = judgment records)."""
    from .benchmarks.mtbench import grade_prompt

    out = []
    for it in items:
        turns = answers[it.item_id]
        for t, rec in enumerate(grades[it.item_id]):
            name = "prism-single-v1" + ("-multi-turn" if t else "")
            score = rec.get("score")
            out.append(
                {
                    "question_id": _qid(it.item_id),
                    "model": model,
                    "judge": [judge, name],
                    "user_prompt": grade_prompt(it.turns, turns, t, it.reference),
                    "judgment": rec.get("text", ""),
                    "score": -1 if score is None else score,
                    "turn": t + 1,
                    "tstamp": tstamp,
                }
            )
    return out


def pair_records(model_1: str, model_2: str, judge: str, items, pairs: dict, tstamp: float) -> list[dict]:
    """FastChat pairwise lines (both orders) from the swapped verdicts ``pairs[item_id]``."""
    out = []
    for it in items:
        p = pairs[it.item_id]
        if p.get("identical"):
            g1 = g2 = "tie"
        else:
            g1, g2 = WINNER.get(p.get("xy"), "error"), WINNER.get(p.get("yx"), "error")
        out.append(
            {
                "question_id": _qid(it.item_id),
                "model_1": model_1,
                "model_2": model_2,
                "g1_winner": g1,
                "g2_winner": g2,
                "judge": [judge, "prism-pair-v1-multi-turn"],
                "g1_user_prompt": "",
                "g1_judgment": "",
                "g2_user_prompt": "",
                "g2_judgment": "",
                "turn": len(it.turns),
                "tstamp": tstamp,
            }
        )
    return out


def _write_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return path


def write_fastchat(out: Path, runner, specs, items, pairwise: bool = True) -> dict:
    """Write ``out/model_answer`` and ``out/model_judgment`` from the runner's cache (no new generation;
    judgments are looked up, and only made when missing). Returns ``{"answers": [...], "single", "pair"}``."""
    out = Path(out)
    tstamp = time.time()
    judge = str(runner.judge.identity.get("judge", "judge"))
    written: dict = {"answers": [], "single": None, "pair": None}
    single: list = []
    pair: list = []
    from .benchmarks.mtbench import MTBenchEvaluator

    mt = MTBenchEvaluator(pairwise)
    resp = {s.name: mt.responses(runner, s, items) for s in specs if s.kind != "oracle"}
    for name, recs in resp.items():
        answers = {it.item_id: recs[it.item_id]["answers"] for it in items}
        rows = [answer_record(name, it.item_id, answers[it.item_id], tstamp) for it in items]
        written["answers"].append(_write_jsonl(out / "model_answer" / f"{_file_name(name)}.jsonl", rows))
        single += single_records(name, judge, items, answers, mt.grade_records(runner, items, recs), tstamp)
        if pairwise and name != "base" and "base" in resp:
            pair += pair_records(name, "base", judge, items, mt.pairs(runner, items, recs, resp["base"]), tstamp)
    written["single"] = _write_jsonl(out / "model_judgment" / f"{_file_name(judge)}_single.jsonl", single)
    if pair:
        written["pair"] = _write_jsonl(out / "model_judgment" / f"{_file_name(judge)}_pair.jsonl", pair)
    return written


# --------------------------------------------------------------------------------------------------
# reading FastChat answers


def read_answers(path: str | Path) -> dict[str, dict[str, list]]:
    """``{model_id: {question_id (str): [answer per turn]}}`` from a FastChat ``model_answer`` file or folder."""
    p = S.need_path(path, "FastChat answers")
    files = sorted(p.glob("*.jsonl")) if p.is_dir() else [p]
    if not files:
        raise PrismError(f"{p}: no FastChat model_answer .jsonl files in it")
    out: dict = {}
    for f in files:
        for where, row in S.jsonl_records(f, S.read_text(f, "FastChat answers")):
            model, qid, turns = _answer_row(f, where, row)
            out.setdefault(model, {})[qid] = turns
    return out


def _answer_row(f: Path, where: str, row) -> tuple[str, str, list]:
    if not isinstance(row, dict) or "question_id" not in row or "choices" not in row:
        raise PrismError(f"{where}: expected a FastChat answer with question_id and choices")
    choices = row["choices"]
    turns = choices[0].get("turns") if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
    if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
        raise PrismError(f"{where}: 'choices[0].turns' must be a list of answer strings")
    # FastChat names the model after the file (load_model_answers); model_id is the fallback for one file
    model = f.stem if f.suffix == ".jsonl" else str(row.get("model_id") or f.stem)
    return model, str(row["question_id"]), turns
