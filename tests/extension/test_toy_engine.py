"""Adding an engine is one module plus one registration line (docs/ARCHITECTURE.md, "Adding an engine").

The module below, written into a temporary package, is the whole toy engine: its options (a dataclass of
``option(...)`` fields), its generate/score and its ``ENGINE`` spec. ``engines.register_module`` is the one
line that registers it; from then on the config, the ``--engine`` choices, its flag (with help and bounds)
and `prism generate` work with it, and nothing else in PRISM names it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import pytest

from prism_persona import config as C
from prism_persona import engines as E
from prism_persona.cli import main
from prism_persona.errors import PrismError
from prism_persona.options import to_dict

TOY = """
from dataclasses import dataclass

from prism_persona.config import G_ENGINE
from prism_persona.options import option
from prism_persona.engines import EngineSpec
from prism_persona.engines.base import Completion, Engine


@dataclass
class ToyOptions:
    toy_repeat: int = option(
        1, "Times the toy engine repeats the reversed prompt.", flag="--toy-repeat", group=G_ENGINE, at_least=1
    )
    toy_mark: str = option("", "Text the toy engine puts before every reply (config file / --set only).")


class ToyEngine(Engine):
    name = "toy"

    def __init__(self, repeat, mark, model_name):
        self.repeat, self.mark, self.model_name = repeat, mark, model_name

    def generate(self, chats, params):
        texts = [self.mark + " ".join([chat[-1]["content"][::-1]] * self.repeat) for chat in chats]
        return [Completion(text=t, num_tokens=len(t.split())) for t in texts]

    def score_choices(self, chats, choices):  # prefers the first choice
        return [{c: -float(i) for i, c in enumerate(choices)} for _ in chats]


def build(cfg, model=None, tokenizer=None):
    return ToyEngine(cfg.engine.toy_repeat, cfg.engine.toy_mark, cfg.model.model)


ENGINE = EngineSpec("toy", build, options=ToyOptions)
"""


@pytest.fixture
def toy_engine(tmp_path, monkeypatch):
    """The toy engine's module in a temporary package on sys.path, registered by its one line."""
    before = to_dict(C.RunConfig())
    (tmp_path / "toy_ext").mkdir()
    (tmp_path / "toy_ext" / "__init__.py").write_text("")
    (tmp_path / "toy_ext" / "toy.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path))
    E.register_module("toy_ext.toy")  # the one registration line
    try:
        yield before
    finally:
        E.unregister("toy")
        for name in ("toy_ext.toy", "toy_ext"):
            sys.modules.pop(name, None)
        assert to_dict(C.RunConfig()) == before  # nothing of the toy is left in the run config


def test_the_toy_engine_joins_the_config_with_its_options(toy_engine):
    before = toy_engine
    assert E.engine_names()[-1] == "toy" and C.ENGINES[-1] == "toy"
    cfg = C.resolve(overrides={"persona": {"domains": ["a"]}, "engine": {"engine": "toy", "toy_repeat": 3}})
    assert cfg.engine.toy_repeat == 3 and cfg.engine.toy_mark == ""
    saved = to_dict(cfg)["engine"]
    assert {k: v for k, v in saved.items() if not k.startswith("toy_")} == {**before["engine"], "engine": "toy"}
    assert ("engine.toy_repeat", 1) in [(k, v) for k, v, _ in C.describe()]
    with pytest.raises(PrismError, match=r"engine.toy_repeat \(--toy-repeat\) must be at least 1, got 0"):
        C.resolve(overrides={"persona": {"domains": ["a"]}, "engine": {"engine": "toy", "toy_repeat": 0}})
    E.check_engine(cfg)
    engine = E.make_engine(cfg)
    assert [c.text for c in engine.generate([[{"role": "user", "content": "abc"}]], E.SamplingParams())] == [
        "cba cba cba"
    ]
    assert engine.can_score and engine.score_choices([[]], ["A", "B"]) == [{"A": 0.0, "B": -1.0}]


def test_prism_generate_runs_on_the_toy_engine_with_its_flag(toy_engine, tmp_path, capsys):
    assert main(["generate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "toy}" in out and "--toy-repeat TOY_REPEAT" in out and "Times the toy engine repeats" in out
    assert "--toy-mark" not in out  # an option without a flag: config file / --set only, as in prism run

    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "hello"}\n{"messages": [{"role": "user", "content": "abc"}]}\n')
    argv = ["generate", "--engine", "toy", "--toy-repeat", "2", "--model", "toy-model"]
    assert main([*argv, "--input", str(src), "--output", str(tmp_path / "out.jsonl"), "--quiet"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["response"] for r in rows] == ["olleh olleh", "cba cba"]

    assert main([*argv[:3], "--toy-repeat", "0", "--model", "m", "--input", str(src), "--output", "x"]) == 2
    err = capsys.readouterr().err
    assert "--toy-repeat must be at least 1, got 0" in err and "Traceback" not in err
    assert main(["generate", "--engine", "toy", "--prism", str(tmp_path), "--input", str(src), "--output", "x"]) == 2
    assert "--engine toy runs a base model only" in capsys.readouterr().err  # no adapter hook: no artifact


def test_prism_run_takes_the_toy_options_as_set_keys(toy_engine, capsys):
    """`prism run` shows the flags an option names; the others are ``--set engine.toy_mark=...``."""
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--toy-repeat" in out and "--toy-mark" not in out
    assert "toy_mark" in {f.name for f in dataclasses.fields(C.EngineConfig)}


def test_an_engine_module_without_a_spec_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "not_an_engine.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PrismError, match="engine module not_an_engine declares no ENGINE"):
        E.register_module("not_an_engine")
    sys.modules.pop("not_an_engine", None)


def _contract_module():
    """tests/contracts/test_engine_contract.py (its mixin; the tests folders are not packages)."""
    path = Path(__file__).resolve().parents[1] / "contracts" / "test_engine_contract.py"
    spec = importlib.util.spec_from_file_location("engine_contract_for_extension", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TestToyEngineKeepsTheEngineContract(_contract_module().EngineContract):
    """The toy engine, built by the registry from a run config, keeps every engine's contract."""

    scripted = True  # its text is the prompt reversed: no generation to stop or bound

    @pytest.fixture
    def engine(self, toy_engine):
        cfg = C.resolve(overrides={"persona": {"domains": ["a"]}, "engine": {"engine": "toy", "toy_repeat": 2}})
        engine = E.make_engine(cfg)
        self.engine_class = type(engine)
        return engine
