"""What PRISM knows about a benchmark sits in its class (``evals/benchmarks/<name>.py``) and everything
else looks it up through the registry: hub datasets, the personas of its categories, the settings only it
reads. These tests hold the declarations to the code that uses them."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import prism_persona
from prism_persona.evals.benchmarks import REGISTRY, CategoryPersona, category_persona, hub_dataset
from prism_persona.evals.settings import G_DATA, EvalConfig
from prism_persona.evals.systems import PersonaBook, match_domains, persona_field

PACKAGE = Path(prism_persona.__file__).resolve().parent
FIELDS = {f.name: f for f in dataclasses.fields(EvalConfig)}
SHARED_DATA = {"benchmarks", "data", "limit"}
"""The data settings every benchmark shares (the rest of the data group belongs to one benchmark each)."""
SETTINGS_NAMES = {"cfg", "settings", "s"}


def settings_reads(path: Path) -> set[str]:
    """Attribute names read off an eval settings object in one module (``cfg.x``, ``runner.s.x``, ``self.s.x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute):
            obj = node.value
            name = obj.id if isinstance(obj, ast.Name) else obj.attr if isinstance(obj, ast.Attribute) else None
            if name in SETTINGS_NAMES:
                found.add(node.attr)
    return found


def test_every_option_a_benchmark_claims_is_a_setting_and_every_data_setting_has_an_owner():
    claimed = {o for b in REGISTRY.values() for o in b.options}
    assert claimed <= set(FIELDS)
    data = {n for n, f in FIELDS.items() if f.metadata.get("group") == G_DATA}
    assert data - SHARED_DATA <= claimed, "a data flag no benchmark claims"


def test_only_its_own_module_reads_a_benchmarks_options():
    """``mmlu_limit`` is read in mmlu.py and nowhere else; settings.py defines them, nothing else touches them."""
    owners: dict = {}
    for bench in REGISTRY.values():
        for option in bench.options:
            owners.setdefault(option, set()).add(type(bench).__module__)
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(("prism_persona", *path.relative_to(PACKAGE).with_suffix("").parts))
        if module == "prism_persona.evals.settings":
            continue
        for name in settings_reads(path) & set(owners):
            if module not in owners[name]:
                bad.append(f"{module} reads {name} (owned by {', '.join(sorted(owners[name]))})")
    assert not bad, bad


def test_every_member_has_its_data_on_the_hub_or_runs_only_when_named():
    for bench in REGISTRY.values():
        for member in bench.members:
            ds = hub_dataset(member) or hub_dataset(bench.name)
            assert ds is not None or not bench.default, member


@pytest.mark.parametrize("source", sorted(s for b in REGISTRY.values() for s in b.hub))
def test_a_hub_datasets_flag_is_its_owners_setting_and_names_the_dataset(source):
    """``--mmlu`` replaces cais/mmlu: the flag is a setting the benchmark owns and its help names the repo."""
    ds = hub_dataset(source)
    owner = next(b for b in REGISTRY.values() if source in b.hub)
    field = ds.flag.removeprefix("--").replace("-", "_")
    assert ds.flag.startswith("--") and field in owner.options and field in FIELDS
    assert ds.repo in FIELDS[field].metadata["help"]


def test_the_benchmarks_help_names_every_registered_benchmark():
    """``--benchmarks``' help lists every built-in (each set of a default family too) and which run only
    when named."""
    import re

    text = FIELDS["benchmarks"].metadata["help"]
    for bench in REGISTRY.values():
        for name in (bench.name, *(bench.members if bench.default else ())):
            assert re.search(rf"\b{name}\b", text), name
    named_only = re.search(r"all but (.*?), which run when named", text).group(1)
    assert set(re.split(r",\s*|\s+and\s+", named_only)) == {b.name for b in REGISTRY.values() if not b.default}


def test_each_category_has_one_persona_and_the_lookups_read_it():
    seen: dict = {}
    for bench in REGISTRY.values():
        for category, persona in bench.personas.items():
            assert isinstance(persona, CategoryPersona) and persona.domains and persona.field
            assert category not in seen, f"{category}: declared by {seen[category]} and {bench.name}"
            seen[category] = bench.name
            assert category_persona(category) == persona
            assert match_domains(category) == persona.domains and persona_field(category) == persona.field
    assert match_domains("Unknown Thing") == ("unknown thing",) and persona_field("Unknown Thing") == "Unknown Thing"


def test_builtin_categories_are_declared_by_their_benchmark():
    from prism_persona.evals.benchmarks.mmlu import GROUPS

    assert set(REGISTRY["mmlu"].personas) == set(GROUPS)
    for name in ("safety", "xstest", "refusal_set"):
        assert set(REGISTRY[name].personas) == set(REGISTRY[name].members)
    assert {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"} == set(
        REGISTRY["mtbench"].personas
    )


def test_the_persona_book_matches_by_the_declared_domains():
    short = {"short": "x"}
    book = PersonaBook({"Science": short, "Ethics": short})
    assert book.domain_for("STEM") == "Science"  # MMLU declares stem, science, ... for STEM
    assert book.domain_for("pku") == "Ethics"  # safety declares safety, ethics for pku
    assert book.domain_for("writing") is None
    text, label = PersonaBook({}).text(None, "min", "Humanities")
    assert text == "You are an expert in history, philosophy and law." and label == "generic:Humanities"
