"""A labelled refusal set: requests each marked harmful or benign, scored as refusal on the harmful ones and
over-refusal on the benign ones, per category (e.g. the safety kit's held-out queries, where both intents
share every topic).

``--refusal-set PATH`` (``.jsonl``, ``.json``, ``.csv``, ``.tsv``, ``.parquet``): one record per request
with

* the prompt in ``query``, ``prompt``, ``text``, ``question`` or ``Goal``;
* the label in ``intent`` or ``label``: ``harmful`` / ``unsafe`` or ``benign`` / ``safe`` (case ignored);
* optionally a category in ``domain``, ``category`` or ``type`` (the routing and Figure 4 rows).

It has no hub dataset, so it runs only when named: ``--benchmarks refusal_set``. Its two members are
``refusal_set_harmful`` and ``refusal_set_benign``. A benchmark with the same shape from another source
subclasses :class:`LabelledRefusalSet` (``xstest.py``).
"""

from __future__ import annotations

from ...errors import PrismError
from .. import sources as S
from ..base import register
from ..data import take_stratified
from .safety import SAFETY_PERSONA, Safety, SafetyEvaluator, SafetyItem, _first

HARMFUL = "harmful"
BENIGN = "benign"
LABEL_VALUES = {"harmful": HARMFUL, "unsafe": HARMFUL, "benign": BENIGN, "safe": BENIGN}
PROMPT_FIELDS = ("query", "prompt", "text", "question", "Goal")
LABEL_FIELDS = ("intent", "label")
CATEGORY_FIELDS = ("domain", "category", "type")
ID_FIELDS = ("id", "prompt_id", "Index")


class LabelledRefusalSet(Safety):
    """Harmful and benign requests from one source: the members ``<name>_harmful`` and ``<name>_benign``.

    A subclass sets ``name``, ``title``, ``sets``/``benign_sets`` (the two member names), ``flag`` (the
    :class:`~prism_persona.evals.settings.EvalConfig` field holding the local path) and, when the data is
    on the hub, ``hub`` (``{name: HubDataset}``: one dataset holds both members).
    """

    flag: str = ""
    hub: dict = {}
    category_fields: tuple = CATEGORY_FIELDS
    persona_by_category = True
    """The matched persona is the one of the item's category (its domain) when a persona domain has
    that name, else the safety persona (its member's, :attr:`personas`)."""

    @property
    def options(self) -> tuple:  # type: ignore[override]
        return (self.flag, "safety_limit", "safety_tokens")

    @property
    def personas(self) -> dict:  # type: ignore[override]
        """Both members: the safety persona (its over-refusal on benign requests is what a set measures)."""
        return dict.fromkeys(self.members, SAFETY_PERSONA)

    def evaluator(self, pairwise: bool):
        return SafetyEvaluator(self.benign_sets, self.persona_by_category)

    def load(self, cfg, names, limit):
        if not any(m in names for m in self.members):
            return {}
        path = getattr(cfg, self.flag) or None
        if path is None and self.name not in self.hub:
            raise PrismError(f"{self.name} is a local file: pass it with --{self.flag.replace('_', '-')} PATH")
        items = self.items(S.rows_from(self.name, path, self.name))
        lim = cfg.safety_limit or limit
        return {m: take_stratified(items[m], lambda it: it.category, lim) for m in self.members if m in names}

    def items(self, rows) -> dict[str, list[SafetyItem]]:
        """``{member: [SafetyItem]}`` of every record (duplicate prompts kept once)."""
        harmful, benign = self.members
        out: dict = {harmful: [], benign: []}
        seen: set = set()
        for where, row in rows:
            prompt, label, category, rid = self.record(row, where)
            if prompt in seen:
                continue
            seen.add(prompt)
            member = harmful if label == HARMFUL else benign
            out[member].append(SafetyItem(f"{member}/{rid or len(seen)}", member, prompt, category))
        for member, its in out.items():
            if len({it.item_id for it in its}) != len(its):  # ids repeat: number them
                out[member] = [SafetyItem(f"{member}/{i}", member, it.prompt, it.category) for i, it in enumerate(its)]
        if not any(out.values()):
            raise PrismError(f"{self.name}: no requests in the file")
        return out

    def record(self, row, where: str) -> tuple[str, str, str, str]:
        """(prompt, harmful|benign, category, id) of one record; one-line errors naming ``where``."""
        if not isinstance(row, dict):
            raise PrismError(f"{where}: expected an object with a prompt and a harmful/benign label")
        prompt = _first(row, PROMPT_FIELDS)
        if not prompt:
            raise PrismError(f"{where}: no prompt (expected one of {', '.join(PROMPT_FIELDS)})")
        raw = _first(row, LABEL_FIELDS)
        label = LABEL_VALUES.get(raw.lower())
        if label is None:
            raise PrismError(f"{where}: label {raw!r} in {'/'.join(LABEL_FIELDS)}; expected {', '.join(LABEL_VALUES)}")
        return prompt, label, _first(row, self.category_fields), _first(row, ID_FIELDS)

    def categories(self, items):
        """Per item its category and intent (``chemistry (harmful)``): harmful and benign requests on one
        topic are separate rows of the routing table and of Figure 4."""
        intent = {m: ("harmful" if m not in self.benign_sets else "benign") for m in self.members}
        return {
            m: {it.item_id: f"{it.category} ({intent[m]})" if it.category else intent[m] for it in its}
            for m, its in items.items()
        }

    def set_label(self, member: str) -> str:
        kind = "benign, over-refusal" if member in self.benign_sets else "harmful"
        return f"{self.title} ({kind})"

    def label(self, member: str) -> str:
        what = "over-refusal on benign" if member in self.benign_sets else "refusal on harmful"
        return f"{self.title}: {what}"


@register
class RefusalSet(LabelledRefusalSet):
    name = "refusal_set"
    title = "Refusal set"
    sets = ("refusal_set_harmful", "refusal_set_benign")
    benign_sets = ("refusal_set_benign",)
    flag = "refusal_set"
    default = False
