"""The one registry of stages (prism_persona.stages) and what is read from it."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
from pathlib import Path

import pytest

from prism_persona import config as C
from prism_persona import stages as S
from prism_persona.bootstrap.common import stage_settings
from prism_persona.errors import PrismError
from prism_persona.train.pipeline import redo_stages


def test_the_stages_in_order_with_their_dependencies():
    assert S.stage_names() == ["personas", "queries", "answers", "verdicts", "gate", "distill"]
    for i, stage in enumerate(S.STAGES):  # a stage depends only on earlier ones
        assert set(stage.depends_on) <= set(S.stage_names()[:i])
    assert S.training_stages() == ("gate", "distill")
    assert S.markers() == ("bootstrap", "gate", "distill")


def test_redo_takes_a_stage_and_everything_after_it_that_reads_it():
    assert redo_stages("queries") == ["queries", "answers", "verdicts", "gate", "distill"]
    assert redo_stages("verdicts") == ["verdicts", "gate", "distill"]
    assert redo_stages("gate") == ["gate"] and redo_stages("distill") == ["distill"]
    with pytest.raises(PrismError, match="--redo takes one of: personas, queries, answers, verdicts, gate, distill"):
        redo_stages("bootstrap")


def test_a_store_is_named_by_its_stage():
    assert S.store_stage("query_rounds") == "queries" and S.store_stage("verdicts") == "verdicts"


def test_every_stage_module_and_function_exists():
    for stage in S.STAGES:
        module = importlib.import_module(stage.module, "prism_persona")
        assert stage.section and hasattr(C.RunConfig(), stage.section)  # every built-in stage owns a block
        for which in ("settings", "step", "check", "prepare"):
            name = getattr(stage, which)
            assert (not name and which in ("check", "prepare")) or callable(getattr(module, name)), (stage, which)
        assert stage.function("step") is module.step


# --- the settings dicts old runs were saved with ---------------------------------------------------

SNAPSHOT = Path(__file__).parent / "fixtures" / "stage_settings_e846ee5.json"
"""Every stage's settings dict on three configs, as main e846ee5 computed them (before the pipeline
looped the registry): a run made then must resume, so these must not change by a byte."""


def snapshot_configs(tmp: Path) -> dict:
    (tmp / "w.txt").write_text("You are a careful writing editor.\n", encoding="utf-8")
    (tmp / "q.jsonl").write_text(
        '{"domain": "writing", "query": "How do I tighten this paragraph?"}\n', encoding="utf-8"
    )
    return {
        "default": C.resolve(overrides={"out": str(tmp / "r"), "persona": {"domains": ["writing", "coding"]}}),
        "tiny_options": C.resolve(
            "tiny",
            overrides={
                "out": str(tmp / "r"),
                "seed": 7,
                "persona": {
                    "domains": ["writing", "coding"],
                    "persona_files": {"writing": str(tmp / "w.txt")},
                    "prefill": "You are",
                    "use_length": "long",
                    "placement": "user",
                },
                "queries": {"format": "shots", "topic_check": True, "max_rounds": 3},
                "answers": {"temperature": 0.3, "samples": 2},
                "judge": {"rule": "margin", "null_pairs": 0, "abstain_margin": 0.25, "mode": "logprob"},
                "gate": {"epochs": 5, "base_queries": "off"},
                "distill": {"r": 4, "epochs": 1},
            },
        ),
        "queries_file": C.resolve(
            "tiny",
            overrides={
                "out": str(tmp / "r"),
                "persona": {"domains": ["writing"]},
                "queries": {"queries_file": str(tmp / "q.jsonl")},
            },
        ),
    }


def test_stage_settings_are_byte_identical_to_the_ones_old_runs_saved(tmp_path):
    expected = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    for name, cfg in snapshot_configs(tmp_path).items():
        for stage in S.BUILTIN:
            got = json.dumps(stage_settings(cfg, stage.name), default=str)
            assert got == json.dumps(expected[name][stage.name]), (name, stage.name)


def test_the_redo_flag_offers_the_registry(capsys):
    from prism_persona.cli import main

    assert main(["run", "--redo", "nonsense"]) == 2  # argparse's usage error, as one line (issue 20)
    err = capsys.readouterr().err.replace("'", "")
    assert "choose from personas, queries, answers, verdicts, gate, distill" in err and len(err.splitlines()) == 1


# --- no function outside a stage's module reads that stage's settings ------------------------------

CFG_NAMES = {"cfg", "config", "run_cfg", "rc", "c"}
"""The names a ``RunConfig`` goes by in src/ (``cfg.gate`` or ``self.cfg.gate`` is a read of the block)."""

ALLOWED = {
    ("prism_persona.config", "validate", "persona"): "config validation: one-line errors for every block",
    ("prism_persona.config", "validate", "queries"): "config validation",
    ("prism_persona.config", "validate", "gate"): "config validation",
    ("prism_persona.evals.build", "build_judge", "judge"): (
        "not a RunConfig: `cfg` there is an EvalConfig, whose `judge` is the grader's model"
    ),
    ("prism_persona.judges.pairwise", "make_judge", "judge"): (
        "the judge factory builds a judge from its block; the verdicts stage (bootstrap.verify.build_judge) "
        "and `prism check` both build their judge with it"
    ),
    ("prism_persona.train.pipeline", "run_heldout_check", "judge"): (
        "hands the run's judge block to `prism check` (train/check.py): the held-out check judges with the run's judge"
    ),
    ("prism_persona.gated.artifact", "assemble", "persona"): (
        "the artifact's manifest records the domains and persona it was trained with"
    ),
    ("prism_persona.gated.artifact", "assemble", "distill"): (
        "the artifact's manifest records the LoRA it holds; gated/ sits below train/, so it cannot ask train.distill"
    ),
}
"""(module, function, block) -> why it may read another stage's block. Keep it short."""


def section_reads(source: str, sections) -> list[tuple[str, str, int]]:
    """``(block, function, line)`` of every ``cfg.<block>`` / ``getattr(cfg, "<block>")`` in ``source``."""
    out: list[tuple[str, str, int]] = []

    def is_cfg(node) -> bool:
        return (isinstance(node, ast.Name) and node.id in CFG_NAMES) or (
            isinstance(node, ast.Attribute) and node.attr in CFG_NAMES
        )

    def visit(node, fn: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name)  # nested functions count as their own (each one is named)
                continue
            if isinstance(child, ast.Attribute) and child.attr in sections and is_cfg(child.value):
                out.append((child.attr, fn, child.lineno))
            if (
                isinstance(child, ast.Call)
                and isinstance(child.func, ast.Name)
                and child.func.id == "getattr"
                and len(child.args) >= 2
                and is_cfg(child.args[0])
                and isinstance(child.args[1], ast.Constant)
                and child.args[1].value in sections
            ):
                out.append((child.args[1].value, fn, child.lineno))
            visit(child, fn)

    visit(ast.parse(source), "<module>")
    return out


def test_the_scan_sees_a_read_of_a_stage_block():
    src = "def f(cfg):\n    x = cfg.gate.epochs\n    def g(self):\n        return getattr(self.cfg, 'distill')\n"
    assert section_reads(src, {"gate", "distill"}) == [("gate", "f", 2), ("distill", "g", 4)]
    assert section_reads("def f(model):\n    return model.gate.pooling\n", {"gate"}) == []


def test_no_function_outside_a_stage_module_reads_its_settings():
    import prism_persona

    package = Path(prism_persona.__file__).resolve().parent
    owners = {s.section: importlib.util.resolve_name(s.module, "prism_persona") for s in S.STAGES if s.section}
    assert set(owners) == {"persona", "queries", "answers", "judge", "gate", "distill"}
    found, used = [], set()
    for path in sorted(package.rglob("*.py")):
        module = ".".join(("prism_persona", *path.relative_to(package).with_suffix("").parts))
        for block, fn, line in section_reads(path.read_text(encoding="utf-8"), set(owners)):
            if module == owners[block]:
                continue
            if (module, fn, block) in ALLOWED:
                used.add((module, fn, block))
                continue
            found.append(f"{path.relative_to(package)}:{line} {fn}() reads cfg.{block} (owned by {owners[block]})")
    assert not found, "read the value through the owning stage module instead:\n" + "\n".join(found)
    assert used == set(ALLOWED), f"stale allow-list entries: {set(ALLOWED) - used}"
