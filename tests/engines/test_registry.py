"""The engine registry: every caller asks it for names and capabilities, and one module adds an engine."""

from __future__ import annotations

import sys
import textwrap

import pytest

from prism_persona import config as C
from prism_persona import engines as E
from prism_persona.engines.base import SamplingParams
from prism_persona.errors import PrismError
from prism_persona.options import from_dict, option


def test_the_registered_engines_and_what_they_can_do():
    assert E.engine_names() == ["hf", "vllm", "openai"] == C.ENGINES
    hf, vllm, openai = (E.engine_spec(n) for n in ("hf", "vllm", "openai"))
    assert hf.in_process and not hf.server and not hf.needs_base_url
    assert vllm.server and vllm.adapter_server and vllm.serves_adapters and not vllm.needs_base_url
    assert openai.server and openai.needs_base_url and openai.served_model_name and not openai.serves_adapters
    assert not hf.serves_adapters and hf.adapter_server is None and openai.adapter_server is None
    assert hf.shares_model and hf.gated_model  # the pipeline shares its model; an artifact is the GatedModel
    assert not any(s.shares_model or s.gated_model for s in (vllm, openai))


def test_no_caller_outside_the_engines_asks_in_process():
    """Callers ask the capability they need (``shares_model``, ``gated_model``, ``server``), not whether
    the engine is the in-process one (which meant 'hf')."""
    import re
    from pathlib import Path

    import prism_persona

    root = Path(prism_persona.__file__).parent
    found = [
        f"{p.relative_to(root)}:{n}"
        for p in sorted(root.rglob("*.py"))
        if p.parent.name != "engines"
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"\.in_process\b", line)
    ]
    assert found == []
    with pytest.raises(PrismError, match="unknown engine 'nope'; choose one of: hf, vllm, openai"):
        E.engine_spec("nope")


@pytest.mark.parametrize(
    "engine, message",
    [
        ({"engine": "nope"}, r"engine.engine \(--engine\) must be one of hf, vllm, openai, got 'nope'"),
        ({"engine": "openai"}, "--engine openai needs --base-url"),
        ({"engine": "vllm", "base_url": "ftp://x"}, r"--base-url must be an http\(s\) URL"),
    ],
)
def test_a_config_file_gets_the_same_engine_rules(engine, message):
    with pytest.raises(PrismError, match=message):
        C.resolve(overrides={"persona": {"domains": ["a"]}, "engine": engine})


def test_flags_for_another_engine_are_refused_only_on_a_command_line():
    cfg = C.EngineConfig(engine="hf", base_url="http://127.0.0.1:9/v1", vllm_python="py")
    cfg.validate()  # a config file may carry every engine's settings
    with pytest.raises(PrismError, match="--base-url needs --engine vllm or --engine openai"):
        cfg.check_flags()
    with pytest.raises(PrismError, match="--vllm-python/--vllm-args need --engine vllm"):
        C.EngineConfig(engine="vllm", base_url="http://127.0.0.1:9/v1", vllm_args=["--x"]).check_flags()


def test_each_engine_owns_its_options_and_the_engine_block_keeps_its_keys():
    """vLLM's settings live in engines/vllm.py, hf's in engines/hf.py; they join the shared [engine] block
    under the same keys, in registration order."""
    import dataclasses

    from prism_persona.engines import hf, vllm

    own = [f.name for f in dataclasses.fields(vllm.VLLMOptions)]
    shared = ["engine", "base_url", "api_key_env", "concurrency", "timeout_s", "max_retries"]
    assert [f.name for f in dataclasses.fields(hf.HFOptions)] == ["hf_batch_tokens", "hf_quantize"]
    assert [f.name for f in dataclasses.fields(C.EngineConfig)] == shared + ["hf_batch_tokens", "hf_quantize"] + own
    assert own == [
        "vllm_python",
        "vllm_args",
        "vllm_eager",
        "vllm_max_num_seqs",
        "vllm_max_model_len",
        "vllm_cpu_cores",
        "vllm_kv_cache_gib",
        "vllm_startup_timeout_s",
    ]
    assert "vllm" not in C.EngineConfig.__module__ and C.EngineConfig().vllm_kv_cache_gib == 4
    assert ("engine.vllm_eager", "auto") in [(k, v) for k, v, _ in C.describe()]
    with pytest.raises(PrismError, match="engine.vllm_eager must be auto, true or false, got 'maybe'"):
        C.resolve(overrides={"persona": {"domains": ["a"]}, "engine": {"vllm_eager": "maybe"}})  # even with hf


def test_an_engine_option_must_carry_the_engine_name():
    import dataclasses

    @dataclasses.dataclass
    class Loose:
        depth: int = option(1, "no prefix")

    with pytest.raises(PrismError, match="engine bad: option names must start with 'bad_' \\(got depth\\)"):
        C.register_engine("bad", E.EngineSpec("bad", lambda cfg, model=None, tokenizer=None: None, options=Loose))
    C.unregister_engine("bad")
    assert "bad" not in C.ENGINES and "depth" not in {f.name for f in dataclasses.fields(C.EngineConfig)}


def test_a_shell_quoted_vllm_args_flag_becomes_a_list():
    cfg = from_dict(C.EngineConfig, {"engine": "vllm", "vllm_args": "--tensor-parallel-size 4 --x 'a b'"})
    assert cfg.vllm_args == ["--tensor-parallel-size", "4", "--x", "a b"]


ECHO = """
from prism_persona.engines import EngineSpec
from prism_persona.engines.base import Completion, Engine


class EchoEngine(Engine):
    name = "echo"

    def generate(self, chats, params):
        return [Completion(text=chat[-1]["content"][::-1]) for chat in chats]


ENGINE = EngineSpec("echo", lambda cfg, model=None, tokenizer=None: EchoEngine(), needs_base_url=True)
"""


@pytest.fixture
def echo_engine(tmp_path, monkeypatch):
    """An engine in one module outside the package, added by its one registration line."""
    (tmp_path / "echo_pkg").mkdir()
    (tmp_path / "echo_pkg" / "__init__.py").write_text("")
    (tmp_path / "echo_pkg" / "echo.py").write_text(textwrap.dedent(ECHO))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(E, "ENGINE_MODULES", (*E.ENGINE_MODULES, "echo_pkg.echo"))
    E._REGISTRY.clear()
    try:
        yield
    finally:
        E._REGISTRY.clear()
        if "echo" in C.ENGINES:
            C.ENGINES.remove("echo")
        C._ENGINE_SPECS.pop("echo", None)
        for name in ("echo_pkg.echo", "echo_pkg"):
            sys.modules.pop(name, None)


def test_one_module_adds_an_engine(echo_engine, capsys):
    from prism_persona.cli import main

    assert E.engine_names() == ["hf", "vllm", "openai", "echo"]
    with pytest.raises(PrismError, match="--engine echo needs --base-url"):  # its capability, not its name
        C.resolve(overrides={"persona": {"domains": ["a"]}, "engine": {"engine": "echo"}})
    cfg = C.resolve(
        overrides={"persona": {"domains": ["a"]}, "engine": {"engine": "echo", "base_url": "http://127.0.0.1:9/v1"}}
    )
    E.check_engine(cfg)
    engine = E.make_engine(cfg)
    assert [c.text for c in engine.generate([[{"role": "user", "content": "abc"}]], SamplingParams())] == ["cba"]
    assert main(["generate", "--help"]) == 0  # cli.main returns argparse's exit code (issue 20: usage errors)
    assert "{hf,vllm,openai,echo}" in capsys.readouterr().out


def test_no_module_outside_an_engine_imports_it():
    """Callers reach the server engines through the registry and their spec's hooks: no module outside
    engines/ imports engines.vllm or engines.openai (hf is the in-process model GatedModel extends)."""
    import ast
    from pathlib import Path

    import prism_persona

    package = Path(prism_persona.__file__).resolve().parent
    found = []
    for path in sorted(package.rglob("*.py")):
        if path.parent.name == "engines":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
            module = node.module or "" if isinstance(node, ast.ImportFrom) else ""
            targets = [f"{module}.{n}" for n in names] + ([module] if module else [])
            if any(t.split(".")[-1] in ("vllm", "openai") and "engines" in t for t in targets):
                found.append(f"{path.relative_to(package)}:{node.lineno}")
    assert not found, found
