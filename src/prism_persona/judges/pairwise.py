"""Pairwise judges: which of two answers to a query is better (the bootstrap's verdicts, ``--judge``).

A :class:`Judge` compares :class:`PairItem` s (query, answer shown as A, answer shown as B) and
returns one :class:`Verdict` per item: ``"A"``, ``"B"``, ``"tie"`` or ``"unparseable"``.
:func:`judge_swapped` asks for both orders, so that an answer wins only if it wins as A *and* as B
(a judge that always picks one position then produces no wins at all).

Judges available:

* :class:`ModelJudge` -- an engine judges. In ``logprob`` mode the verdict is read from
  log P("A") vs log P("B") of the judge's next token (a tie when they differ by at most
  ``tie_margin``); in ``text`` mode a short reply is generated greedily and parsed.
* :class:`CallableJudge` -- a user's function ``fn(query, answer_a, answer_b)`` returning
  ``"A"``/``"B"``/``"tie"`` (or a dict with ``"winner"``), named on the command line as
  ``module:function`` or ``path/to/file.py:function``. A function that also accepts ``domain``
  and/or ``persona`` (keyword parameters, or ``**kwargs``) receives the item's domain and the
  persona text, so one judge can reward a behaviour on some domains and penalise it on others.
  Naming a judge runs its code: only name judges you trust.

Nothing heavy is imported here.
"""

from __future__ import annotations

import abc
import importlib
import importlib.util
import logging
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..config import RunConfig
from ..engines.base import Engine, SamplingParams
from ..errors import PrismError

log = logging.getLogger(__name__)

WINNERS = ("A", "B", "tie", "unparseable")

JUDGE_PROMPT = """Compare two responses to the same user query.

[Query]
{query}

[Response A]
{answer_a}

[Response B]
{answer_b}

Which response answers the query better: more helpful, correct, specific and clear? \
{instruction}"""

LOGPROB_INSTRUCTION = "Reply with a single letter: A or B."
TEXT_INSTRUCTION = 'Reply with only "A", "B" or "tie".'


@dataclass(frozen=True)
class PairItem:
    """One comparison: the query and the two answers in the order they are shown, plus what the
    bootstrap knows about the item (its domain and the persona text; empty when unknown)."""

    query: str
    answer_a: str
    answer_b: str
    domain: str = ""
    persona: str = ""


@dataclass
class Verdict:
    """``winner`` is ``"A"``, ``"B"``, ``"tie"`` or ``"unparseable"``; ``detail`` holds evidence
    (the raw reply, or the two log-probabilities)."""

    winner: str
    detail: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"winner": self.winner, "detail": self.detail}


@dataclass
class PairResult:
    """Both orders of one comparison between ``x`` and ``y``.

    ``first`` shows x as A (y as B), ``second`` shows y as A (x as B). ``outcomes`` says per order who
    won: ``"x"``, ``"y"``, ``"tie"`` or ``"unparseable"``. ``winner`` is ``"x"``/``"y"``/``"tie"`` when
    both orders agree, ``"unparseable"`` when either order could not be read, else ``"mixed"``.
    """

    first: Verdict
    second: Verdict

    @property
    def outcomes(self) -> tuple[str, str]:
        return (_outcome(self.first.winner, x_is="A"), _outcome(self.second.winner, x_is="B"))

    @property
    def winner(self) -> str:
        a, b = self.outcomes
        if "unparseable" in (a, b):
            return "unparseable"
        return a if a == b else "mixed"

    @property
    def x_wins(self) -> bool:
        """x won in both orders (the only way a pair becomes a positive label)."""
        return self.winner == "x"


def _outcome(winner: str, x_is: str) -> str:
    if winner in ("tie", "unparseable"):
        return winner
    return "x" if winner == x_is else "y"


class Judge(abc.ABC):
    """Implement :meth:`compare`. ``mode`` names how verdicts are read (for the records)."""

    name: str = "judge"
    mode: str = "text"

    @abc.abstractmethod
    def compare(self, items: Sequence[PairItem]) -> list[Verdict]:
        """One verdict per item, in order. Never raises for an unreadable verdict."""

    @property
    def engines(self) -> list:
        """Engines this judge owns (for token accounting); the bootstrapped engine is not listed."""
        return []

    def close(self) -> None:
        for eng in self.engines:
            eng.close()


# --------------------------------------------------------------------------------------------------
# reading a text verdict

_BRACKET = re.compile(r"\[\[\s*(A|B|C|TIE)\s*\]\]", re.I)
_LEAD_TIE = re.compile(r"^[\s\"'*(\[]*(?:it'?s\s+|it\s+is\s+|this\s+is\s+)?(?:a\s+)?(?:tie|draw)\b", re.I)
_LEAD_LETTER = re.compile(
    r"^[\s\"'*(\[#:]*(?:(?:final\s+)?(?:answer|verdict|choice|winner)\s*[:=]?\s*)?"
    r"[\"'*(\[]*(A|B)(?![A-Za-z0-9])(.*)$",
    re.I | re.S,
)
_NAMED = r"(?:response|answer|assistant|option|output|candidate)\s*\(?\s*(A|B)\s*\)?"
_BETTER = re.compile(
    _NAMED + r"\W*\s*(?:is|was|seems|appears)?\s*(?:clearly\s+|slightly\s+|much\s+)?"
    r"(?:better|superior|preferred|stronger|wins|more\s+\w+)",
    re.I,
)
_PREFER = re.compile(
    r"(?:prefer|choose|pick|select|winner\s+is|better\s+(?:response|answer)\s+is)\s*:?\s*"
    r"[\"'*(]*(?:" + _NAMED + r"|(A|B))(?![A-Za-z0-9])",
    re.I,
)
_BARE_BETTER = re.compile(
    r"(?<![\w'])([AB])\s+(?:is|was)\s+(?:clearly\s+|slightly\s+|much\s+|definitely\s+)?"
    r"(?:the\s+)?(?:better|superior|preferred|stronger|winner)"
)  # case-sensitive letter
_IS_LETTER = re.compile(
    r"(?i:answer|response|verdict|choice|winner|option)\s+is\s*:?\s*[\"'*(\[]*([AB])"
    r"(?![A-Za-z0-9])"
)  # "The answer is "A"" (capital letter only: not "is a ...")
_TIE = re.compile(
    r"\b(?:tie|draw|equally\s+(?:good|bad|helpful)|both\s+(?:are\s+)?(?:equally|equal|the\s+same)|"
    r"neither\s+is\s+better|no\s+clear\s+winner)\b",
    re.I,
)
_MENTION = re.compile(r"\b" + _NAMED, re.I)


def parse_verdict(text: str) -> str:
    """Read ``"A"``, ``"B"``, ``"tie"`` or ``"unparseable"`` from a judge's reply.

    Understands a bare letter ("A", "B.", "(A)", "**B**"), "[[A]]" / "[[C]]" (tie), "Answer: B",
    "Response A is better", "I prefer B", and ties ("tie", "both are equally good"). A reply that
    names both responses without saying which is better is unparseable.
    """
    t = (text or "").strip()
    if not t:
        return "unparseable"
    m = _BRACKET.search(t)
    if m:
        g = m.group(1).upper()
        return g if g in ("A", "B") else "tie"
    if _LEAD_TIE.match(t):
        return "tie"
    m = _LEAD_LETTER.match(t)
    if m:
        rest = m.group(2)
        # "A" followed by punctuation/end, or "A is better": a verdict; "A good answer..." is not.
        if (
            not rest.strip()
            or re.match(r"^\s*[.,:;)\]*!'\"\n-]", rest)
            or re.match(r"^\s+(?:is|wins|was)\b", rest, re.I)
        ):
            return m.group(1).upper()
    for pat in (_BETTER, _PREFER, _BARE_BETTER, _IS_LETTER):
        m = pat.search(t)
        if m:
            letter = next(g for g in m.groups() if g)
            return letter.upper()
    if _TIE.search(t):
        return "tie"
    named = {m.group(1).upper() for m in _MENTION.finditer(t)}
    if len(named) == 1:
        return named.pop()
    return "unparseable"


def normalise_callable_result(result: Any) -> str:
    """A user judge may return "A"/"B"/"tie" (any case, or any text :func:`parse_verdict` reads),
    or a dict with a "winner" entry."""
    if isinstance(result, dict):
        result = result.get("winner")
    if not isinstance(result, str):
        return "unparseable"
    r = result.strip()
    if r.lower() in ("tie", "draw", "c"):
        return "tie"
    if r.upper() in ("A", "B"):
        return r.upper()
    return parse_verdict(r)


# --------------------------------------------------------------------------------------------------
# judges


def judge_chat(item: PairItem, mode: str) -> list:
    """The judge's prompt as a plain user chat (no persona: the judge is the bare model)."""
    instruction = LOGPROB_INSTRUCTION if mode == "logprob" else TEXT_INSTRUCTION
    content = JUDGE_PROMPT.format(
        query=item.query, answer_a=item.answer_a, answer_b=item.answer_b, instruction=instruction
    )
    return [{"role": "user", "content": content}]


class ModelJudge(Judge):
    """An engine judges. ``mode``: ``auto`` (logprob when the engine can score, else text),
    ``logprob`` or ``text``."""

    def __init__(
        self,
        engine: Engine,
        mode: str = "auto",
        max_new_tokens: int = 24,
        tie_margin: float = 0.0,
        name: str = "self",
        owns_engine: bool = False,
    ):
        if mode not in ("auto", "logprob", "text"):
            raise PrismError(f"judge mode must be auto, logprob or text, got '{mode}'")
        if mode == "logprob" and not engine.can_score:
            raise PrismError(
                f"judge mode 'logprob' needs log-probabilities, which engine "
                f"'{engine.name}' does not provide; use --judge-mode text or auto"
            )
        self.engine = engine
        self.mode = "logprob" if mode == "auto" and engine.can_score else ("text" if mode == "auto" else mode)
        self.max_new_tokens = max_new_tokens
        self.tie_margin = float(tie_margin)
        self.name = name
        self._owns = owns_engine

    @property
    def engines(self) -> list:
        return [self.engine] if self._owns else []

    def compare(self, items: Sequence[PairItem]) -> list[Verdict]:
        if not items:
            return []
        if self.mode == "logprob":
            chats = [judge_chat(it, "logprob") for it in items]
            scores = self.engine.score_choices(chats, ["A", "B"])
            if scores is not None:
                return [self._from_scores(s) for s in scores]
            log.warning(
                "judge: engine '%s' returned no log-probabilities; reading text verdicts instead", self.engine.name
            )
            self.mode = "text"
        chats = [judge_chat(it, "text") for it in items]
        params = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0)
        outs = self.engine.generate(chats, params)
        return [Verdict(parse_verdict(o.text), {"text": o.text}) for o in outs]

    def _from_scores(self, s: dict) -> Verdict:
        a, b = float(s.get("A", float("-inf"))), float(s.get("B", float("-inf")))
        detail = {"logp_A": round(a, 4), "logp_B": round(b, 4)}
        if a != a or b != b or (a == float("-inf") and b == float("-inf")):  # NaN or no mass at all
            return Verdict("unparseable", detail)
        if abs(a - b) <= self.tie_margin:
            return Verdict("tie", detail)
        return Verdict("A" if a > b else "B", detail)


class CallableJudge(Judge):
    """Wraps ``fn(query, answer_a, answer_b) -> "A" | "B" | "tie" | {"winner": ...}``.

    An exception raised by ``fn`` becomes an ``unparseable`` verdict (logged once per kind of error),
    so one bad call never stops a long run.
    """

    mode = "callable"

    def __init__(self, fn: Callable, name: str = "callable"):
        self.fn = fn
        self.name = name
        self.errors = 0
        self.verdicts = 0  # results that were A, B or tie
        self.others = 0  # results that were not (counted as unparseable)
        self._last_other = ""
        self._warned: set = set()
        self.context = context_parameters(fn)

    def compare(self, items: Sequence[PairItem]) -> list[Verdict]:
        out = [self._judge_one(it) for it in items]
        self._check_results(out)
        return out

    def _judge_one(self, it: PairItem) -> Verdict:
        extra = {k: getattr(it, k) for k in self.context}
        try:
            result = self.fn(it.query, it.answer_a, it.answer_b, **extra)
        except SystemExit as exc:  # the user's code must not end PRISM silently
            raise PrismError(f"judge {self.name} called sys.exit({exc.code!r}); a judge returns A, B or tie") from None
        except Exception as exc:  # the user's code: never let it kill the run
            self.errors += 1
            kind = type(exc).__name__
            if kind not in self._warned:
                self._warned.add(kind)
                log.warning("judge %s raised %s: %s (counted as unparseable)", self.name, kind, exc)
            return Verdict("unparseable", {"error": f"{kind}: {exc}"[:MAX_RESULT_CHARS]})
        winner = normalise_callable_result(result)
        shown = result if isinstance(result, (str, int, float)) else repr(result)
        shown = shown[:MAX_RESULT_CHARS] if isinstance(shown, str) else shown
        if winner == "unparseable":
            self.others += 1
            self._last_other = repr(result)[:60]
        else:
            self.verdicts += 1
        return Verdict(winner, {"result": shown})

    def _check_results(self, out: list) -> None:
        """Results other than A, B or tie are counted as unparseable (judges fail soft) and named once,
        with the judge, so an 'all labels are 0' later has its cause on screen."""
        if self.others and "other" not in self._warned:
            self._warned.add("other")
            log.warning(
                "judge %s returned %s, not A, B or tie (counted as unparseable; %d of %d results so far)",
                self.name,
                self._last_other,
                self.others,
                self.others + self.verdicts,
            )


MAX_RESULT_CHARS = 300  # of a user judge's result (or error) kept in the verdict record

CONTEXT_FIELDS = ("domain", "persona")


def context_parameters(fn: Callable) -> tuple[str, ...]:
    """Which of ``domain`` / ``persona`` a user's judge function accepts (by keyword or ``**kwargs``)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: call it with the three answers only
        return ()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return CONTEXT_FIELDS
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return tuple(f for f in CONTEXT_FIELDS if f in names)


def judge_swapped(judge: Judge, query: str, x: str, y: str, domain: str = "", persona: str = "") -> PairResult:
    """Judge x against y in both orders; x wins only if it wins both."""
    return judge_swapped_batch(judge, [(query, x, y, domain, persona)])[0]


def judge_swapped_batch(judge: Judge, items_in: Sequence[tuple]) -> list[PairResult]:
    """:func:`judge_swapped` for many ``(query, x, y)`` or ``(query, x, y, domain, persona)`` at once
    (one ``compare`` call of 2N items)."""
    items = []
    for q, x, y, *context in items_in:
        items.append(PairItem(q, x, y, *context))  # x shown as A
        items.append(PairItem(q, y, x, *context))  # x shown as B
    verdicts = judge.compare(items)
    if len(verdicts) != len(items):
        raise RuntimeError(f"judge {judge.name} returned {len(verdicts)} verdicts for {len(items)} items")
    return [PairResult(verdicts[2 * i], verdicts[2 * i + 1]) for i in range(len(items_in))]


# --------------------------------------------------------------------------------------------------
# building the judge a config asks for

_CALLABLE_SPEC = re.compile(r"^(?P<mod>[^:\s]+):(?P<fn>[A-Za-z_][\w.]*)$")


def is_callable_spec(spec: str) -> bool:
    """``module:function`` or ``file.py:function`` (a model id or path never has this shape)."""
    m = _CALLABLE_SPEC.match(spec.strip())
    if not m:
        return False
    mod = m.group("mod")
    return mod.endswith(".py") or re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", mod) is not None


def load_callable(spec: str) -> Callable:
    """Import ``module:function`` (or ``path/file.py:function``); any failure is a one-line error."""
    m = _CALLABLE_SPEC.match(spec.strip())
    if not m:
        raise PrismError(f"judge '{spec}' is not of the form module:function")
    mod_name, fn_name = m.group("mod"), m.group("fn")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name).expanduser()
            if not path.is_file():
                raise PrismError(f"judge file not found: {path}")
            uniq = "prism_user_judge_" + re.sub(r"\W", "_", str(path.resolve()))
            spec_ = importlib.util.spec_from_file_location(uniq, path)
            module = importlib.util.module_from_spec(spec_)
            sys.modules[uniq] = module
            spec_.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except PrismError:
        raise
    except SystemExit as exc:
        raise PrismError(f"judge module '{mod_name}' called sys.exit({exc.code!r}) while being imported") from None
    except Exception as exc:
        hint = ""
        if isinstance(exc, ModuleNotFoundError) and not mod_name.endswith(".py"):
            hint = f"; for a file, name it by path: --judge path/to/{mod_name.rsplit('.', 1)[-1]}.py:{fn_name}"
        raise PrismError(
            f"cannot import judge module '{mod_name}': {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}{hint}"
        ) from None
    obj: Any = module
    for part in fn_name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise PrismError(f"judge module '{mod_name}' has no attribute '{fn_name}'")
    if not callable(obj):
        raise PrismError(f"judge '{spec}' is not callable")
    return obj


def installed_judge(name: str) -> Optional[Callable]:
    """The judge function an installed package names ``name`` in its ``prism_persona.judges`` entry point
    (``name = "pkg.module:function"``, the contract of ``--judge module:function``); None when no package
    does, or when ``name`` is a path that exists (a model directory). A failing import is one line."""
    from ..plugins import JUDGE_GROUP, find_entry, load_entry

    ep = None if Path(name).expanduser().exists() else find_entry(JUDGE_GROUP, name)
    return None if ep is None else load_entry(ep, JUDGE_GROUP)


def make_judge(cfg: RunConfig, engine: Optional[Engine]) -> Judge:
    """The judge ``cfg.judge.judge`` names: ``self`` (uses ``engine``), ``module:function``, or a model
    id/path loaded as a second in-process engine."""
    jc, m = cfg.judge, cfg.model
    return judge_from_spec(
        jc.judge,
        engine,
        jc.mode,
        jc.max_new_tokens,
        jc.tie_margin,
        load=dict(
            dtype=m.dtype,
            device=m.device,
            batch_size=m.batch_size,
            quiet=cfg.quiet,
            trust_remote_code=m.trust_remote_code,
        ),
    )


def judge_from_spec(
    spec: str,
    self_engine: Optional[Engine],
    mode: str = "auto",
    max_new_tokens: int = 24,
    tie_margin: float = 0.0,
    load: Optional[dict] = None,
) -> Judge:
    """``self`` -> a :class:`ModelJudge` on ``self_engine``; ``module:function`` / ``file.py:function``
    -> a :class:`CallableJudge` (this imports and runs the user's code), as does the name of an installed
    package's ``prism_persona.judges`` entry point (:func:`installed_judge`); anything else is a model id
    or path, loaded in-process (``load`` = keyword arguments of :meth:`HFEngine.load`)."""
    spec = (spec or "self").strip()
    if spec.lower() == "self":
        if self_engine is None:
            raise ValueError("the 'self' judge needs the model's own engine")
        return ModelJudge(self_engine, mode, max_new_tokens, tie_margin, name="self")
    if is_callable_spec(spec) and not Path(spec).exists():
        return CallableJudge(load_callable(spec), name=spec)
    plugin = installed_judge(spec)
    if plugin is not None:
        return CallableJudge(plugin, name=spec)
    from ..engines.hf import HFEngine

    other = HFEngine.load(spec, **(load or {}))
    return ModelJudge(other, mode, max_new_tokens, tie_margin, name=other.model_name, owns_engine=True)


def check_judge_spec(spec: str) -> None:
    """Fail fast (before any generation) on a judge that cannot be loaded: bad callable or model path."""
    spec = (spec or "self").strip()
    if spec.lower() == "self":
        return
    if is_callable_spec(spec) and not Path(spec).exists():
        load_callable(spec)
        return
    if installed_judge(spec) is not None:
        return
    from ..models import resolve_model

    resolve_model(spec)
