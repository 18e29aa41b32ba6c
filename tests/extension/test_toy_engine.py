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


TOY_GATED = """
from prism_persona.engines import EngineSpec
from toy_ext.toy import build

# runs in this process and runs a PRISM artifact as PRISM's own GatedModel: the capability the hf engine has
ENGINE = EngineSpec("toyg", build, in_process=True, gated_model=True)
"""


def test_a_toy_engine_declares_that_the_artifact_runs_as_the_gated_model(toy_engine, tmp_path, tiny_model_dir, capsys):
    """`prism generate --prism` asks the spec (``gated_model``), not the engine's name: the toy that declares
    it answers with the artifact's GatedModel, row for row as the hf engine does; the toy without it cannot."""
    from prism_persona.testing import make_tiny_artifact

    (tmp_path / "toy_ext" / "toyg.py").write_text(textwrap.dedent(TOY_GATED))
    E.register_module("toy_ext.toyg")
    try:
        art = make_tiny_artifact(tiny_model_dir, tmp_path / "run" / "prism", cache=False)
        src = tmp_path / "in.jsonl"
        src.write_text('{"prompt": "as an expert, explain tides"}\n{"prompt": "hi"}\n')
        outs = {}
        for name in ("hf", "toyg"):
            out = tmp_path / f"{name}.jsonl"
            argv = ["generate", "--engine", name, "--prism", str(art), "--input", str(src), "--output", str(out)]
            assert main([*argv, "--max-new-tokens", "4", "--device", "cpu", "--quiet"]) == 0
            outs[name] = [json.loads(line) for line in out.read_text().splitlines()]
        assert outs["toyg"] == outs["hf"] and all("gate_prob" in r and r["gate_prob"] is not None for r in outs["hf"])
        assert main(["generate", "--engine", "toyg", "--model", "m", "--input", str(src), "--output", "x"]) == 2
        assert "--model needs" in capsys.readouterr().err  # as the hf engine: the artifact runs here, no base model
        argv = ["generate", "--engine", "toy", "--prism", str(art), "--input", str(src), "--output", "x"]
        assert main(argv) == 2 and "runs a base model only" in capsys.readouterr().err
    finally:
        E.unregister("toyg")
        sys.modules.pop("toy_ext.toyg", None)


def _install(root: Path, group: str, line: str) -> None:
    """The package's one line of metadata: an entry point in ``group`` (a dist-info on ``sys.path``)."""
    meta = root / "toy_ext-0.1.dist-info"
    meta.mkdir(exist_ok=True)
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-ext\nVersion: 0.1\n", encoding="utf-8")
    (meta / "entry_points.txt").write_text(f"[{group}]\n{line}\n", encoding="utf-8")


@pytest.fixture
def toy_package(tmp_path, monkeypatch):
    """The toy engine's module in a temporary package on sys.path, not registered by any code."""
    (tmp_path / "toy_ext").mkdir()
    (tmp_path / "toy_ext" / "__init__.py").write_text("")
    (tmp_path / "toy_ext" / "toy.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        yield tmp_path
    finally:
        E.unregister("toy")
        for name in ("toy_ext.toy", "toy_ext.broken", "toy_ext"):
            sys.modules.pop(name, None)


def test_the_prism_cli_sees_an_installed_packages_engine(toy_package, capsys):
    """An installed package's ``prism_persona.engines`` entry point is the one registration line: the CLI
    imports it when it builds its parser (``--engine toy`` and the toy's flag are there)."""
    assert main(["generate", "--help"]) == 0
    assert "--toy-repeat" not in capsys.readouterr().out  # not installed yet
    _install(toy_package, "prism_persona.engines", "toy = toy_ext.toy")
    assert main(["generate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "toy}" in out and "--toy-repeat TOY_REPEAT" in out and "toy" in E.engine_names()


def test_an_engine_plugin_that_fails_to_import_is_one_line(toy_package, capsys):
    (toy_package / "toy_ext" / "broken.py").write_text("import no_such_module_here\n")
    _install(toy_package, "prism_persona.engines", "broken = toy_ext.broken")
    assert main(["generate", "--help"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "engine entry point 'broken = toy_ext.broken' (package toy-ext) failed to import" in err
    assert "ModuleNotFoundError: No module named 'no_such_module_here'" in err
