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
    """--vllm-python and a shell-quoted --vllm-args reach the vLLM that serve starts, as a list."""
    from prism_persona.commands import serve
    from prism_persona.gated import remote

    seen = {}

    def fake_start(artifact, python="", extra_args=(), quiet=False, **_):
        seen.update(artifact=artifact, python=python, extra_args=list(extra_args))
        raise SystemExit(7)  # stop before anything is served

    monkeypatch.setattr(remote, "start_for_artifact", fake_start)
    argv = ["serve", "--prism", str(tmp_path / "art"), "--engine", "vllm", "--vllm-python", "/x/python"]
    args = _parse([*argv, "--vllm-args", "--max-num-seqs 4 --served-model-name 'a b'"])
    with pytest.raises(SystemExit):
        serve.run(args)
    assert seen == {
        "artifact": str(tmp_path / "art"),
        "python": "/x/python",
        "extra_args": ["--max-num-seqs", "4", "--served-model-name", "a b"],
    }


def _parse(argv):
    from prism_persona.cli import build_parser

    return build_parser().parse_args(argv)
