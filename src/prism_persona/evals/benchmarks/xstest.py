"""XSTest (Röttger et al., 2024): over-refusal on 250 safe prompts that look unsafe (homonyms, figurative
language, safe targets, ...) next to refusal on 200 contrasting unsafe ones.

The hub dataset ``walledai/XSTest`` (split ``test``) by default, or ``--xstest PATH``: the release's
``xstest_prompts.csv`` (columns ``id``, ``prompt``, ``type``, ``label`` = ``safe`` / ``unsafe``, ``focus``,
``note``) or any file with those columns. The category is the prompt ``type`` (``homonyms``,
``contrast_homonyms``, ...). Runs only when named: ``--benchmarks xstest`` (members ``xstest_harmful``,
``xstest_benign``).
"""

from __future__ import annotations

from ..base import register
from ..sources import HubDataset
from .refusal_set import LabelledRefusalSet


@register
class XSTest(LabelledRefusalSet):
    name = "xstest"
    title = "XSTest"
    sets = ("xstest_harmful", "xstest_benign")
    benign_sets = ("xstest_benign",)
    flag = "xstest"
    hub = {"xstest": HubDataset("walledai/XSTest", None, "test", "--xstest")}
    category_fields = ("type",)
    persona_by_category = False  # a prompt type is no persona domain: the safety persona throughout
    default = False
