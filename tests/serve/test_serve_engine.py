"""`prism serve`'s engine block: the flags of EngineConfig, the engines it can serve an artifact with."""

from __future__ import annotations

import pytest

from prism_persona.cli import main


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--engine", "openai"], "--engine openai needs --base-url"),
        (["--engine", "openai", "--base-url", "http://127.0.0.1:9/v1"], "prism serve runs the artifact here"),
        (["--engine", "vllm", "--base-url", "http://127.0.0.1:9/v1"], "use --route-only --upstream URL"),
        (["--vllm-args=--enforce-eager"], "--vllm-python/--vllm-args need --engine vllm"),
        (["--engine", "vllm", "--route-only"], "--route-only needs --upstream"),
    ],
)
def test_engine_mistakes_are_one_line(tmp_path, capsys, flags, message):
    assert main(["serve", "--prism", str(tmp_path / "art"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_vllm_engine_starts_vllm_with_the_engine_blocks_settings(tmp_path, monkeypatch):
    """--vllm-python and a shell-quoted --vllm-args reach the vLLM that serve starts (through the engine's
    adapter_server hook), as a list, with the exported adapter."""
    import types

    from prism_persona.commands import serve
    from prism_persona.engines import vllm
    from prism_persona.gated import remote

    seen = {}

    class FakeServer:
        def __init__(self, model, served_name, python, log_path, **kw):
            seen.update(model=model, python=python, log=log_path, extra_args=kw["extra_args"], loras=kw["loras"])

        def start(self):
            raise SystemExit(7)  # stop before anything is served

    src = types.SimpleNamespace(path_or_id="/m/base", display="base")
    adapter = tmp_path / "work" / "vllm-export" / "adapter"
    monkeypatch.setattr(remote, "export_for_server", lambda art, quiet=False: (src, adapter, 16))
    monkeypatch.setattr(vllm, "find_vllm_python", lambda python: python)
    monkeypatch.setattr(vllm, "VLLMServer", FakeServer)
    argv = ["serve", "--prism", str(tmp_path / "art"), "--engine", "vllm", "--vllm-python", "/x/python"]
    args = _parse([*argv, "--vllm-args", "--max-num-seqs 4 --served-model-name 'a b'"])
    with pytest.raises(SystemExit):
        serve.run(args)
    assert seen == {
        "model": "/m/base",
        "python": "/x/python",
        "log": tmp_path / "work" / "vllm.log",
        "extra_args": ["--max-num-seqs", "4", "--served-model-name", "a b"],
        "loras": {vllm.LORA_NAME: str(adapter)},
    }


def _parse(argv):
    from prism_persona.cli import build_parser

    return build_parser().parse_args(argv)
