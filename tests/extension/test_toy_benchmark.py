"""Adding a benchmark from another package is one module plus one registration line.

A temporary package on ``sys.path`` holds ONE module (the toy benchmark: its data, its prompt, its
grading, the persona of its category) and ONE line of package metadata (the ``prism_persona.benchmarks``
entry point naming the module). ``prism eval`` (the CLI, in process) then runs it by name, with its data
from ``--data NAME=PATH``, and writes its rows into ``results.json``, ``per_item.json``, ``report.md``
and the paper's Table 1 (``table1.json``): once with a scripted engine (so the persona's effect is known),
once on a tiny random model (the grades are the toy's grading of what the model really wrote).
"""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

TOY_MODULE = '''
"""A toy benchmark: capitals, right when the answer names the capital."""

from dataclasses import dataclass

from prism_persona.evals.base import AnsweredBenchmark, CategoryPersona, register


@dataclass(frozen=True)
class Question:
    item_id: str
    country: str
    capital: str
    category: str = "geography"


BUILT_IN = (("France", "Paris"), ("Japan", "Tokyo"))


@register
class Capitals(AnsweredBenchmark):
    name = "capitals"
    title = "Capitals"
    default = False  # runs when named
    max_tokens = 6
    personas = {"geography": CategoryPersona("world geography", ("geography", "travel"))}

    def load(self, cfg, names, limit):
        if self.name not in names:
            return []
        path = self.data_path(cfg, self.name)  # --data capitals=PATH: lines "country,capital"
        rows = [ln.split(",") for ln in open(path, encoding="utf-8").read().split("\\n") if ln.strip()] if path else BUILT_IN
        return [Question(f"capitals/{i}", c.strip(), k.strip()) for i, (c, k) in enumerate(rows)][:limit]

    def prompt(self, item):
        return f"What is the capital of {item.country}? Answer with the city only."

    def grade(self, item, answer):
        return float(item.capital.lower() in answer.lower())
'''

ENTRY_POINT = "capitals = toy_capitals"
"""The one registration line (the package's ``prism_persona.benchmarks`` entry point)."""

CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Peru": "Lima", "Kenya": "Nairobi"}


@pytest.fixture
def toy_package(tmp_path, monkeypatch):
    """The temporary package: its one module on ``sys.path``; ``register()`` writes its one metadata line.
    Afterwards the toy is taken out of the registry again (the other tests see the built-ins only)."""
    from prism_persona.evals.base import REGISTRY

    root = tmp_path / "site"
    root.mkdir()
    (root / "toy_capitals.py").write_text(textwrap.dedent(TOY_MODULE), encoding="utf-8")
    monkeypatch.syspath_prepend(str(root))

    def register_line() -> None:
        meta = root / "toy_capitals-0.1.dist-info"
        meta.mkdir()
        (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-capitals\nVersion: 0.1\n", encoding="utf-8")
        (meta / "entry_points.txt").write_text(f"[prism_persona.benchmarks]\n{ENTRY_POINT}\n", encoding="utf-8")

    try:
        yield root, register_line
    finally:
        REGISTRY.pop("capitals", None)
        sys.modules.pop("toy_capitals", None)


def _data(tmp_path):
    path = tmp_path / "capitals.csv"
    path.write_text("".join(f"{c},{k}\n" for c, k in CAPITALS.items()), encoding="utf-8")
    return path


def _eval(tmp_path, model, *extra) -> tuple[int, object]:
    from prism_persona.cli import main

    out = tmp_path / "eval"
    argv = ["eval", "--model", str(model), "--benchmarks", "capitals", "--data", f"capitals={_data(tmp_path)}"]
    return main(argv + ["--out", str(out), "--resamples", "50", "--quiet", *extra]), out


def _answer(chat) -> str:
    """The scripted model: right only with an expert persona of the toy's category in its system prompt."""
    system = " ".join(m["content"] for m in chat if m["role"] == "system")
    country = next(c for c in CAPITALS if c in chat[-1]["content"])
    return CAPITALS[country] if "world geography" in system else "I am not sure."


def test_one_module_and_one_line_make_a_benchmark_prism_eval_runs(
    toy_package, tmp_path, tiny_model_dir, monkeypatch, capsys
):
    from prism_persona.engines.hf import HFEngine
    from prism_persona.testing import ScriptedEngine

    root, register_line = toy_package
    assert [p.name for p in root.glob("*.py")] == ["toy_capitals.py"]
    monkeypatch.setattr(HFEngine, "load", staticmethod(lambda *a, **k: ScriptedEngine(responder=_answer)))

    code, _ = _eval(tmp_path, tiny_model_dir, "--systems", "base,persona")
    assert code == 2 and "--data capitals: no such benchmark" in capsys.readouterr().err  # the module alone: unknown

    register_line()
    code, out = _eval(tmp_path, tiny_model_dir, "--systems", "base,persona")
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["counts"] == {"capitals": 4}
    assert results["capitals"]["base"]["capitals"]["value"]["mean"] == 0.0
    assert results["capitals"]["persona"]["capitals"]["value"]["mean"] == 1.0  # the toy's persona map chose it
    per = json.loads((out / "per_item.json").read_text())["capitals"]
    assert per["persona"] == {f"capitals/{i}": 1.0 for i in range(4)}
    table = json.loads((out / "table1.json").read_text())
    assert [c["key"] for c in table["columns"]] == ["capitals"]
    assert table["rows"]["base"]["capitals"]["mean"] == 0.0 and table["rows"]["persona"]["capitals"]["n"] == 4
    report = (out / "report.md").read_text()
    assert "## Capitals" in report and "## The paper's Table 1" in report and "100.0%" in report


def test_the_toy_grades_what_a_tiny_random_model_wrote(toy_package, tmp_path, tiny_model_dir):
    """No scripted answers: the tiny random model answers, and every stored grade is the toy's grading of
    the stored response."""
    _, register_line = toy_package
    register_line()
    code, out = _eval(tmp_path, tiny_model_dir, "--systems", "base", "--device", "cpu", "--dtype", "float32")
    assert code == 0
    responses = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    answers = {r["item_id"]: r["response"] for r in responses if r.get("system") == "base" and "response" in r}
    assert len(answers) == 4
    per = json.loads((out / "per_item.json").read_text())["capitals"]["base"]
    truth = dict(zip((f"capitals/{i}" for i in range(4)), CAPITALS.values()))
    assert per == {i: float(truth[i].lower() in answers[i].lower()) for i in truth}
    results = json.loads((out / "results.json").read_text())
    assert results["capitals"]["base"]["capitals"]["value"]["n"] == 4
    assert results["work"]["generated"] == 4
