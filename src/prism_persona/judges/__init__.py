"""Every kind of judge in one place, each with one callable contract.

Three kinds, three jobs:

* **Pairwise verdicts** (:mod:`.pairwise`): which of two answers to a query is better -- the
  bootstrap's self-verification and ``prism check`` (``--judge``). Contract: a :class:`Judge` subclass
  implements ``compare(items: list[PairItem]) -> list[Verdict]`` (``"A"``/``"B"``/``"tie"``/
  ``"unparseable"``, never raising for an unreadable verdict); a plug-in is a function
  ``judge(query, answer_a, answer_b[, domain=, persona=]) -> "A" | "B" | "tie"`` named
  ``module:function`` (:class:`CallableJudge`). Both orders are asked by :func:`judge_swapped`.
* **Grades** (:mod:`.grading`): the evaluation's judge -- MT-Bench 1-10 grades, pairwise win rates
  and refusal questions on an engine (:class:`EvalJudge`, ``--judge MODEL``); a plug-in is a function
  ``grader(prompt) -> reply text`` (``--grader module:function``, :class:`CallableEngine`).
* **Refusal decisions** (:mod:`.refusal`): does a response refuse? Contract:
  :class:`RefusalClassifier` ``classify(requests, responses) -> [{"refused": bool, ...}]``; built in:
  the judge model, the refusal-phrase rule, ``hf:MODEL`` (:mod:`.hf_classifier`); a plug-in is a
  function ``fn(request, response) -> bool`` (``--refusal-classifier module:function``).

The contract tests in ``tests/contracts/`` run every built-in judge of each kind. Naming a
``module:function`` runs its code: only name judges you trust. Nothing heavy is imported here.
"""

from .grading import (
    GRADE_SYSTEM,
    REFUSAL_PROMPT,
    CallableEngine,
    EvalJudge,
    default_pair_judge,
    load_grader,
    parse_rating,
    parse_yes_no,
)
from .pairwise import (
    CONTEXT_FIELDS,
    JUDGE_PROMPT,
    LOGPROB_INSTRUCTION,
    MAX_RESULT_CHARS,
    TEXT_INSTRUCTION,
    WINNERS,
    CallableJudge,
    Judge,
    ModelJudge,
    PairItem,
    PairResult,
    Verdict,
    check_judge_spec,
    context_parameters,
    is_callable_spec,
    judge_chat,
    judge_from_spec,
    judge_swapped,
    judge_swapped_batch,
    load_callable,
    make_judge,
    normalise_callable_result,
    parse_verdict,
)
from .refusal import (
    REFUSAL_CLASSIFIERS,
    REFUSAL_PATTERNS,
    CallableRefusal,
    JudgeRefusal,
    RefusalClassifier,
    StringMatchRefusal,
    keyword_refusal,
    make_refusal_classifier,
)

__all__ = [
    "CONTEXT_FIELDS",
    "CallableEngine",
    "CallableJudge",
    "CallableRefusal",
    "EvalJudge",
    "GRADE_SYSTEM",
    "JUDGE_PROMPT",
    "Judge",
    "JudgeRefusal",
    "LOGPROB_INSTRUCTION",
    "MAX_RESULT_CHARS",
    "ModelJudge",
    "PairItem",
    "PairResult",
    "REFUSAL_CLASSIFIERS",
    "REFUSAL_PATTERNS",
    "REFUSAL_PROMPT",
    "RefusalClassifier",
    "StringMatchRefusal",
    "TEXT_INSTRUCTION",
    "Verdict",
    "WINNERS",
    "check_judge_spec",
    "context_parameters",
    "default_pair_judge",
    "is_callable_spec",
    "judge_chat",
    "judge_from_spec",
    "judge_swapped",
    "judge_swapped_batch",
    "keyword_refusal",
    "load_callable",
    "load_grader",
    "make_judge",
    "make_refusal_classifier",
    "normalise_callable_result",
    "parse_rating",
    "parse_verdict",
    "parse_yes_no",
]
