"""The example kits shipped with the library: setups whose right answer is known in advance, run with
``prism run --example NAME --out RUN`` (docs/kits.md).

Each kit is a subpackage holding its data (a persona text, hand-written training queries and a separate
held-out set, package data found through :mod:`importlib.resources`) and its rule judge as library code
(``prism_persona.kits.NAME:judge``): selecting a kit by name never imports code from a file or a run
directory. ``safety``: a safety-monitor persona that should be routed on harmful requests only (routing
by intent within a domain, the paper's table in miniature). ``style``: a pirate persona that should be
routed on stories and not on cooking (routing by domain). ``safety+style``: both personas in one run
(package ``safety_style``: each domain keeps its kit's persona file, queries and held-out set, and the
judge hands each query to its kit's judge by domain), measured as a confusion matrix of expected
persona against where PRISM sent the query (issue 29).

:func:`example_settings` gives the settings a kit fills in (a nested dict that ``config.resolve`` layers
above the preset and below a ``--config`` file and the flags); :func:`summary` turns a finished held-out
check (``RUN/check/answers.jsonl``) into the kit's short table.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

from ..errors import PrismError

EXAMPLES = ("safety", "style", "safety+style")
"""The kit names ``--example`` accepts."""

SUMMARY_FILE = "summary.md"
"""The kit's table is written to ``RUN/check/summary.md`` (beside the generic ``check.md``)."""

# What each kit fills in. Sized so that the README's first command (`prism run --example safety`) ends
# in about 3 minutes on 2 idle cores (docs/kits.md, measured): the first queries of each domain (the
# kit files alternate harmful and benign requests), greedy 24-token answers, the first held-out queries.
_KITS: dict[str, dict] = {
    "safety": {
        "persona": "safety_monitor.txt",
        "domains": ["chemistry", "computers", "medicine"],
        "settings": {
            "preset": "tiny",
            "queries": {"queries_per_persona": 32},  # 16 harmful + 16 benign per domain
            "answers": {"max_new_tokens": 24, "temperature": 0.0},  # a refusal is the answer's first sentence
            "distill": {"min_steps": 15},
            "check": {"max_new_tokens": 24, "per_domain": 20},  # 10 harmful + 10 benign per domain
        },
    },
    "style": {
        "persona": "pirate.txt",
        "domains": ["stories", "cooking"],
        "settings": {
            "preset": "tiny",
            "queries": {"queries_per_persona": 16},
            "answers": {"max_new_tokens": 32},
            "distill": {"min_steps": 15},
            "check": {"max_new_tokens": 32, "per_domain": 10},
        },
    },
    # Both kits at the sizes of their short runs (safety: the half sizes of its slow test, 8 harmful + 8
    # benign per domain; style: its own), one answer length for both (32 tokens: a pirate voice needs
    # more than a refusal's first sentence), greedy; the held-out check: 5 harmful + 5 benign per safety
    # domain, 10 stories, 10 cooking (docs/kits.md, measured).
    "safety+style": {
        "persona_files": {
            "chemistry": ("safety", "safety_monitor.txt"),
            "computers": ("safety", "safety_monitor.txt"),
            "medicine": ("safety", "safety_monitor.txt"),
            "stories": ("style", "pirate.txt"),
            "cooking": ("style", "pirate.txt"),
        },
        "domains": ["chemistry", "computers", "medicine", "stories", "cooking"],
        "settings": {
            "preset": "tiny",
            "queries": {"queries_per_persona": 16},
            "answers": {"max_new_tokens": 32, "temperature": 0.0},
            "distill": {"min_steps": 15},
            "check": {"max_new_tokens": 32, "per_domain": 10},
        },
    },
}


def check_name(name: str) -> str:
    """``name`` if it is a kit, else a one-line error listing the kits."""
    if name not in _KITS:
        raise PrismError(f"unknown example '{name}'; choose one of: {', '.join(EXAMPLES)}")
    return name


def package(name: str) -> str:
    """The kit's subpackage (``safety+style`` -> ``safety_style``)."""
    return check_name(name).replace("+", "_")


def kit_path(name: str, filename: str = "") -> Path:
    """The kit's directory (or one of its files) inside the installed package."""
    root = files(__name__) / package(name)
    return Path(str(root / filename if filename else root))


def judge_spec(name: str) -> str:
    """The kit's rule judge as a ``module:function`` of this library."""
    return f"{__name__}.{package(name)}:judge"


def builtin_judges() -> set[str]:
    """The judges a run may name without ``--trust-judge``: library code, not a user's file."""
    return {judge_spec(n) for n in EXAMPLES}


def example_settings(name: str) -> dict:
    """The settings ``--example NAME`` fills in (domains, persona files, training queries, judge,
    held-out set, sizes), as a nested dict for ``config.resolve(example=...)``."""
    kit = _KITS[check_name(name)]
    where = kit.get("persona_files") or {d: (name, kit["persona"]) for d in kit["domains"]}
    persona_files = {d: str(kit_path(k, f)) for d, (k, f) in where.items()}
    base = {
        "example": name,
        "persona": {"domains": list(kit["domains"]), "persona_files": persona_files},
        "queries": {"queries_file": str(kit_path(name, "train_queries.jsonl"))},
        "judge": {"judge": judge_spec(name)},
        "check": {"queries": str(kit_path(name, "heldout.jsonl"))},
    }
    from ..options import merge

    return merge(json.loads(json.dumps(kit["settings"])), base)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def summary(name: str, check_dir: str | Path, heldout: str | Path | None = None) -> tuple[dict, str]:
    """The kit's table from a finished held-out check: ``(numbers, markdown)``. Only the held-out
    queries the check answered count (a check on the first N per domain)."""
    from importlib import import_module

    from ..store import content_key

    answers = {a["key"]: a for a in _read_jsonl(Path(check_dir) / "answers.jsonl")}
    rows = []
    for row in _read_jsonl(Path(heldout) if heldout else kit_path(name, "heldout.jsonl")):
        key = content_key("heldout", row["domain"], row["query"].strip())
        if f"prism:{key}" in answers and f"base:{key}" in answers:
            rows.append(
                {**row, "answers": {s: answers.get(f"{s}:{key}") for s in ("base", "lora", "persona", "prism")}}
            )
    if not rows:
        raise PrismError(f"{check_dir} holds no answers to the {name} kit's held-out queries")
    return import_module(f"{__name__}.{package(name)}").summary(rows)


def identity_line(rows: list[dict]) -> tuple[int, int, str]:
    """How many of PRISM's unrouted answers are the base model's, token for token."""
    unrouted = [r for r in rows if not r["answers"]["prism"]["routed"]]
    same = sum(r["answers"]["prism"]["text"] == r["answers"]["base"]["text"] for r in unrouted)
    return same, len(unrouted), f"Unrouted answers identical to the base model's: {same}/{len(unrouted)}."


def write_summary(name: str, check_dir: str | Path, heldout: str | Path | None = None) -> str:
    """Write the kit's table to ``CHECK/summary.md`` and ``CHECK/summary.json``; return the markdown."""
    numbers, text = summary(name, check_dir, heldout)
    out = Path(check_dir)
    (out / SUMMARY_FILE).write_text(text + "\n", encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(numbers, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return text
