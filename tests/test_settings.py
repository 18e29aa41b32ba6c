"""The one settings system: typed dataclasses -> command-line flags, bounds checked for flags and files."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Optional

import pytest

from prism_persona import command_settings as CS
from prism_persona import config as C
from prism_persona.errors import PrismError
from prism_persona.options import add_flags, check_settings, describe_flags, option, settings_from_args


@dataclass
class Inner:
    max_prompt_tokens: int = option(4096, "prompt cap", at_least=1)


@dataclass
class Example:
    prism: str = option("", "artifact", required=True, metavar="ART")
    batch: int = option(8, "rows per batch", flag="--max-batch", at_least=1, group="limits")
    top_p: float = option(1.0, "nucleus 100%", above=0, at_most=1)
    seed: Optional[int] = option(None, "sampling seed")
    force: str = option("", "on or off", choices=("on", "off"))
    pairwise: bool = option(True, "pairwise", flag="--no-pairwise")
    route_only: bool = option(False, "route only")
    names: list = option(["a", "b"], "names")
    hidden: str = option("x", "config-file only", cli=False)
    inner: Inner = field(default_factory=Inner)


def parse(argv, prefix=""):
    p = argparse.ArgumentParser()
    add_flags(p, Example, prefix=prefix)
    return p, p.parse_args(argv)


def test_flags_derived_from_the_dataclass_and_defaults_live_only_there():
    p, args = parse(["--prism", "ART"])
    assert all(v is None for k, v in vars(args).items() if k != "prism")  # argparse holds no defaults
    s = settings_from_args(Example, args)
    assert s == Example(prism="ART")
    help_text = p.format_help()
    assert "--max-batch" in help_text and "(default: 8)" in help_text and "--hidden" not in help_text
    assert "nucleus 100%" in help_text and "limits:" in help_text and "--max-prompt-tokens" in help_text


def test_flags_typed_and_coerced():
    _, args = parse(
        [
            "--prism",
            "A",
            "--max-batch",
            "3",
            "--seed",
            "5",
            "--force",
            "on",
            "--no-pairwise",
            "--route-only",
            "--names",
            "x,y",
            "--max-prompt-tokens",
            "7",
            "--top-p",
            "0.5",
        ]
    )
    s = settings_from_args(Example, args)
    assert (s.batch, s.seed, s.force, s.pairwise, s.route_only, s.names, s.inner.max_prompt_tokens, s.top_p) == (
        3,
        5,
        "on",
        False,
        True,
        ["x", "y"],
        7,
        0.5,
    )


def test_flags_over_a_base_and_prefix():
    _, args = parse(["--ex-prism", "A", "--ex-seed", "2"], prefix="ex-")
    s = settings_from_args(Example, args, prefix="ex-", base=Example(batch=4, seed=1))
    assert (s.prism, s.batch, s.seed) == ("A", 4, 2)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-batch", "0"], "--max-batch must be at least 1, got 0"),
        (["--top-p", "0"], "--top-p must be greater than 0, got 0.0"),
        (["--top-p", "1.5"], "--top-p must be at most 1, got 1.5"),
        (["--max-prompt-tokens", "-3"], "--max-prompt-tokens must be at least 1, got -3"),
    ],
)
def test_bounds_name_the_flag(argv, message):
    _, args = parse(["--prism", "A", *argv])
    with pytest.raises(PrismError) as err:
        settings_from_args(Example, args)
    assert str(err.value) == message


def test_required_flag_and_choices_from_the_field():
    p = argparse.ArgumentParser()
    add_flags(p, Example)
    with pytest.raises(SystemExit):
        p.parse_args([])
    with pytest.raises(SystemExit):
        p.parse_args(["--prism", "A", "--force", "maybe"])


@pytest.mark.parametrize(
    "override, message",
    [
        ({"answers": {"max_new_tokens": 0}}, "answers.max_new_tokens (--answer-tokens) must be at least 1, got 0"),
        ({"answers": {"max_new_tokens": -3}}, "answers.max_new_tokens (--answer-tokens) must be at least 1, got -3"),
        ({"distill": {"r": 0}}, "distill.r must be at least 1, got 0"),
        ({"gate": {"epochs": 0}}, "gate.epochs must be at least 1, got 0"),
        ({"gate": {"val_fraction": 0}}, "gate.val_fraction must be greater than 0, got 0.0"),
        ({"gate": {"val_fraction": 1}}, "gate.val_fraction must be less than 1, got 1.0"),
        ({"queries": {"max_rounds": 0}}, "queries.max_rounds must be at least 1, got 0"),
        ({"answers": {"temperature": -0.1}}, "answers.temperature must be at least 0, got -0.1"),
        ({"queries": {"top_p": 0}}, "queries.top_p must be greater than 0, got 0.0"),
        ({"persona": {"top_p": 1.01}}, "persona.top_p must be at most 1, got 1.01"),
        ({"model": {"device": "banana"}}, "--device must be auto, cpu, cuda, cuda:N or mps, got 'banana'"),
        ({"engine": {"engine": "openai", "base_url": "notaurl"}}, "--base-url must be an http(s) URL"),
        ({"model": {"dtype": "float8"}}, "model.dtype (--dtype) must be one of auto"),
    ],
)
def test_run_config_bounds_for_flags_and_files(override, message):
    with pytest.raises(PrismError) as err:
        C.resolve(overrides={"persona": {"domains": ["a"]}, **override})
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_every_run_setting_default_is_within_its_bounds():
    for preset in C.PRESETS:
        C.resolve(preset, overrides={"persona": {"domains": ["a"]}})


def test_prism_config_lists_every_settings_class(capsys):
    from prism_persona import cli

    assert cli.main(["config"]) == 0
    out = capsys.readouterr().out
    for needle in (
        "gate.epochs",
        "prism generate (flags)",
        "prism chat (flags)",
        "prism serve (flags)",
        "prism eval / study (flags)",
        "--max-connections",
        "--body-timeout-s",
        "--trust-remote-code",
        "--max-tokens",
    ):
        assert needle in out, needle


@pytest.mark.parametrize("cls", list(CS.COMMAND_SETTINGS.values()))
def test_command_settings_defaults_pass_their_own_checks(cls):
    obj = cls()
    check_settings(obj, flags=True)
    flags = [flag for flag, _, _ in describe_flags(cls)]
    assert len(flags) == len(set(flags)), "two settings derive the same flag"


def test_serve_flags_stay_compatible():
    p = argparse.ArgumentParser()
    add_flags(p, CS.ServeSettings)
    args = p.parse_args(
        [
            "--prism",
            "A",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--api-key",
            "k",
            "--model-name",
            "m",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--max-batch",
            "2",
            "--batch-wait-ms",
            "5",
            "--queue-size",
            "3",
            "--max-prompt-tokens",
            "100",
            "--max-tokens",
            "9",
            "--request-timeout",
            "7",
            "--route-only",
            "--upstream",
            "http://127.0.0.1:1/v1",
            "--base-name",
            "b",
            "--lora-name",
            "l",
            "--upstream-api-key-env",
            "E",
        ]
    )
    s = settings_from_args(CS.ServeSettings, args)
    assert (
        s.load.prism,
        s.port,
        s.limits.max_new_tokens,
        s.limits.max_prompt_tokens,
        s.request_timeout_s,
        s.route_only,
        s.upstream_api_key_env,
    ) == ("A", 0, 9, 100, 7.0, True, "E")
    with pytest.raises(PrismError, match="--port must be at most 65535"):
        settings_from_args(CS.ServeSettings, p.parse_args(["--prism", "A", "--port", "70000"]))
    with pytest.raises(PrismError, match="--route-only needs"):
        settings_from_args(CS.ServeSettings, p.parse_args(["--prism", "A", "--route-only"]))


def test_run_and_bootstrap_flags_are_derived_and_unchanged():
    from prism_persona import cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    expected = {
        "--model",
        "--dtype",
        "--device",
        "--batch-size",
        "--config",
        "--preset",
        "--example",
        "--out",
        "--seed",
        "--redo",
        "--domains",
        "--persona-file",
        "--placement",
        "--persona-length",
        "--queries-per-persona",
        "--queries-file",
        "--answer-tokens",
        "--judge",
        "--judge-mode",
        "--trust-judge",
        "--trust-remote-code",
        "--engine",
        "--base-url",
        "--concurrency",
        "--vllm-python",
        "--set",
        "-q",
        "--quiet",
        "-v",
        "--verbose",
        "-h",
        "--help",
    }
    for name in ("run", "bootstrap"):
        p = sub.choices[name]
        flags = {s for a in p._actions for s in a.option_strings}
        want = expected | ({"--heldout"} if name == "run" else set())  # bootstrap trains nothing to check
        assert flags == want, flags ^ want
        defaults = {a.dest: a.default for a in p._actions if a.option_strings and a.dest not in ("help",)}
        assert all(v in (None, False, []) for v in defaults.values()), "argparse keeps no defaults of its own"
        args = p.parse_args(["--answer-tokens", "7", "--judge-mode", "text", "--persona-length", "long"])
        from prism_persona.commands.common import overrides_from_args

        assert overrides_from_args(args) == {
            "answers": {"max_new_tokens": 7},
            "judge": {"mode": "text"},
            "persona": {"use_length": "long"},
        }


def test_set_coerces_a_number_to_a_string_field_and_still_rejects_a_bool():
    """--set parses JSON, so engine.vllm_cpu_cores=0 arrives as the number 0 for a string setting."""
    import argparse as ap

    from prism_persona.commands.common import add_common, add_pipeline_options, overrides_from_args

    p = ap.ArgumentParser()
    add_pipeline_options(p)
    add_common(p)
    args = p.parse_args(["--set", "engine.vllm_cpu_cores=0", "--set", "engine.vllm_python=3.5"])
    cfg = C.resolve(overrides={**overrides_from_args(args), "persona": {"domains": ["a"]}})
    assert cfg.engine.vllm_cpu_cores == "0" and cfg.engine.vllm_python == "3.5"
    with pytest.raises(PrismError, match="engine.vllm_cpu_cores' must be a string"):
        C.resolve(overrides={"persona": {"domains": ["a"]}, "engine": {"vllm_cpu_cores": True}})
