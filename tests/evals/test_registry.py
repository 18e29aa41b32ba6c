"""The benchmark registry: a benchmark is one registered module; everything else picks it up by name."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from prism_persona.errors import PrismError
from prism_persona.evals.base import REGISTRY, Benchmark, Evaluator, register
from prism_persona.evals.build import load_benchmarks, parse_benchmarks
from prism_persona.evals.evaluate import Benchmarks, evaluate
from prism_persona.evals.format import fmt_ci, md_table
from prism_persona.evals.report import eval_markdown
from prism_persona.evals.runner import EvalRunner, Job
from prism_persona.evals.settings import EvalConfig
from prism_persona.evals.study import _benchmark_values
from prism_persona.evals.systems import PersonaBook, fixed_provider, parse_systems
from prism_persona.judges import EvalJudge
from prism_persona.testing import ScriptedEngine


@dataclass(frozen=True)
class EchoItem:
    item_id: str
    word: str


class EchoEvaluator(Evaluator):
    """1.0 when the answer repeats the word asked for."""

    name = "echo"

    def evaluate(self, runner, run_specs, specs, items):
        per = {}
        for spec in run_specs:
            jobs = [
                Job(it.item_id, runner.key(spec, "echo", it.item_id, None), [{"role": "user", "content": it.word}])
                for it in items
            ]

            def run_chunk(engine, chunk):
                return [{"text": o.text} for o in engine.generate([j.payload for j in chunk], runner.gen(4))]

            recs = runner.responses_for(spec, "echo", jobs, run_chunk)
            per[spec.name] = {it.item_id: float(it.word in recs[it.item_id]["text"]) for it in items}
        return {s.name: {"echo": runner.ci(list(per[s.name].values()))} for s in specs}, per, {}


class Echo(Benchmark):
    name = "echo"

    def load(self, cfg, names, limit):
        return [EchoItem(f"echo/{i}", w) for i, w in enumerate(("apple", "pear", "plum"))] if "echo" in names else []

    def evaluator(self, pairwise):
        return EchoEvaluator()

    def categories(self, items):
        return {"echo": {it.item_id: "fruit" for it in items}}

    def label(self, member):
        return "Echo rate"

    def markdown(self, results, figures):
        rows = [[s, fmt_ci(results["echo"][s]["echo"], pct=True)] for s in results["systems"]]
        return ["## Echo", "", md_table(["system", "echo rate"], rows), ""]

    def figures(self, results, out):
        return {}


@pytest.fixture
def echo_registered():
    register(Echo)
    try:
        yield REGISTRY["echo"]
    finally:
        del REGISTRY["echo"]


def test_a_registered_benchmark_runs_everywhere_by_name(tmp_path, echo_registered):
    names = parse_benchmarks("echo")
    assert names == ["echo"] and "echo" in parse_benchmarks(None)
    bench = load_benchmarks(EvalConfig(), names)
    assert bench.counts() == {"echo": 3} and bench.mmlu is None
    runner = EvalRunner(
        tmp_path / "out",
        fixed_provider({"base": ScriptedEngine(responder=lambda c: "apple pie")}),
        EvalJudge(ScriptedEngine(responder=lambda c: "[[5]]"), "fake"),
        PersonaBook({}),
        EvalConfig(resamples=20),
    )
    res, per = evaluate(runner, parse_systems("base"), bench)
    assert per["echo"]["base"] == {"echo/0": 1.0, "echo/1": 0.0, "echo/2": 0.0}
    assert res["echo"]["base"]["echo"]["n"] == 3 and res["counts"] == {"echo": 3}
    assert "## Echo" in eval_markdown(res, {}) and "33.3%" in eval_markdown(res, {})
    study_rows = _benchmark_values(per, bench, {"n_resamples": 20, "seed": 0})
    assert list(study_rows) == ["Echo rate"] and study_rows["Echo rate"]["value"]("base")["mean"] == pytest.approx(
        1 / 3
    )


def test_registry_names_and_wrong_names(echo_registered):
    with pytest.raises(ValueError, match="registered twice"):
        register(Echo)
    with pytest.raises(ValueError, match="unknown benchmark"):
        Benchmarks(nosuch=[1])
    with pytest.raises(PrismError, match="unknown benchmark 'nosuch'; choose from mmlu, mtbench, harmbench"):
        parse_benchmarks("nosuch")
    assert parse_benchmarks("safety,mmlu") == ["harmbench", "jailbreak", "pku", "benign", "mmlu"]


class EchoFromFile(Echo):
    """The toy benchmark reading its words from the local copy the user gave with ``--data echo=PATH``."""

    def load(self, cfg, names, limit):
        path = self.data_path(cfg, "echo")
        words = open(path, encoding="utf-8").read().split() if path else ["apple"]
        return [EchoItem(f"echo/{i}", w) for i, w in enumerate(words)] if "echo" in names else []


def test_a_new_benchmark_gets_its_data_flag_from_the_registry(tmp_path):
    """No settings field is needed for a new benchmark's data: --data NAME=PATH reaches its loader."""
    import argparse

    from prism_persona.evals.build import add_eval_options, eval_config

    register(EchoFromFile)
    try:
        words = tmp_path / "words.txt"
        words.write_text("kiwi fig lime lemon")
        p = argparse.ArgumentParser()
        add_eval_options(p)
        cfg = eval_config(p.parse_args(["--benchmarks", "echo", "--data", f"echo={words}"]))
        assert cfg.data == {"echo": str(words)}
        assert load_benchmarks(cfg, ["echo"]).counts() == {"echo": 4}
        assert load_benchmarks(EvalConfig(), ["echo"]).counts() == {"echo": 1}  # no --data: its own default
        builtin = eval_config(p.parse_args(["--data", "pku=x.json"]))
        assert Benchmark.data_path(builtin, "pku") == "x.json"  # the same as --pku x.json
        for bad, why in (("echo", "wants NAME=PATH"), ("nosuch=x", "no such benchmark")):
            with pytest.raises(PrismError, match=why):
                eval_config(p.parse_args(["--data", bad]))
    finally:
        del REGISTRY["echo"]
