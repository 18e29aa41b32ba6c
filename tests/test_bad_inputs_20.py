"""Issue 20, items 7, 8, 12 and 13: bad input is one line and exit 2, before any slow work; NaN and
infinities fail every bound; a user judge's sys.exit or huge results are one line / bounded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from prism_persona import cli
from prism_persona.testing import make_tiny_artifact

DOMAINS = ["writing", "coding"]


@pytest.fixture(autouse=True)
def _log_to_this_tests_stderr():
    cli.setup_logging(quiet=True)


@pytest.fixture(scope="module")
def artifact(tiny_model_dir, tmp_path_factory):
    return make_tiny_artifact(tiny_model_dir, tmp_path_factory.mktemp("bad20") / "prism")


def nested(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


@pytest.fixture
def files(tmp_path, artifact):
    f = {"ART": str(artifact), "T": str(tmp_path)}

    def put(name: str, text: str) -> None:
        (tmp_path / name).write_text(text)
        f[name.split(".")[0].upper()] = str(tmp_path / name)

    put("nested.jsonl", nested() + "\n")
    put("nestedq.jsonl", json.dumps({"domain": "writing", "query": "a fine question?"}) + "\n" + nested() + "\n")
    put("bigfield.csv", "domain,query\nwriting," + "x" * 200_000 + "\n")
    put("longquery.jsonl", json.dumps({"domain": "writing", "query": "why " * 25_000}) + "\n")
    put("bigpersona.txt", "You are an expert. " + "word " * 20_000)
    put("persona_a.txt", "You are a writing expert A.")
    put("persona_b.txt", "You are a writing expert B.")
    put(
        "twice.jsonl",
        "".join(
            json.dumps({"domain": "writing", "query": "the same question?", "route": r}) + "\n" for r in (True, False)
        ),
    )
    put("prompts.jsonl", json.dumps({"prompt": "hello"}) + "\n")
    return f


RUN = ["run", "--domains", "writing,coding", "--preset", "tiny", "--out", "{T}/run"]
GEN = ["generate", "--prism", "{ART}", "--input", "{PROMPTS}", "--output", "{T}/out.jsonl"]
CHECK = [
    "check",
    "--prism",
    "{ART}",
    "--queries",
    "{TWICE}",
    "--judge",
    "self",
    "--persona-file",
    "writing={PERSONA_A}",
]

# item 7: NaN and infinities fail every bound (json.loads reads NaN / Infinity; argparse's float too)
NAN_CASES = [
    (RUN + ["--set", "gate.threshold=NaN"], "gate.threshold"),
    (RUN + ["--set", "distill.lr=Infinity"], "distill.lr"),
    (RUN + ["--set", "gate.lr=-Infinity"], "gate.lr"),
    (RUN + ["--set", "answers.temperature=NaN"], "answers.temperature"),
    (RUN + ["--set", "gate.val_fraction=NaN"], "gate.val_fraction"),
    (RUN + ["--set", "distill.dropout=NaN"], "distill.dropout"),
    (RUN + ["--set", "gate.hidden_sizes=[0]"], "gate.hidden_sizes"),
    (RUN + ["--set", "gate.threshold_bounds=[NaN, 0.9]"], "gate.threshold_bounds"),
    (GEN + ["--temperature", "nan"], "--temperature"),
    (GEN + ["--top-p", "inf"], "--top-p"),
]

# item 12: bad input that was a traceback
ONE_LINE_CASES = [
    (RUN + ["--queries-file", "{NESTED}"], "{NESTED}"),
    (RUN + ["--queries-file", "{NESTEDQ}"], "{NESTEDQ}"),
    (RUN + ["--queries-file", "{BIGFIELD}"], "{BIGFIELD}"),
    (RUN + ["--queries-file", "{LONGQUERY}"], "characters"),
    (RUN + ["--persona-file", "writing={BIGPERSONA}"], "{BIGPERSONA}"),
    (RUN + ["--set", "persona.prefill=" + "You are " * 6_250], "persona.prefill"),
    (RUN + ["--heldout", "{NESTED}"], "{NESTED}"),
    (RUN + ["--seed", "1e20"], "--seed"),
    (RUN + ["--seed", "100000000000000000000"], "--seed"),
    (RUN + ["--set", "distill.target_modules=[null]"], "distill.target_modules"),
    (RUN + ["--set", "persona.domains=[[1, 2]]"], "persona.domains"),
    (RUN + ["--set", 'gate.hidden_sizes=["a"]'], "gate.hidden_sizes"),
    (RUN + ["--set", "persona.persona_files=[1]"], "persona.persona_files"),
    (GEN[:-2] + ["--input", "{NESTED}", "--output", "{T}/o.jsonl"], "{NESTED}"),
    (GEN + ["--engine", "vllm", "--vllm-args", "--max-model-len '512"], "--vllm-args"),
    (CHECK[:3] + ["--queries", "{NESTED}"] + CHECK[5:], "{NESTED}"),
    (CHECK + ["--device", "banana"], "--device"),
    (CHECK + ["--batch-size", "-1"], "--batch-size"),
    (CHECK + ["--batch-size", "0"], "--batch-size"),
    (CHECK + ["--max-new-tokens", "0"], "--max-new-tokens"),
    # item 13: checked up front, not after the slow part
    (RUN + ["--persona-file", "writing={PERSONA_A}", "--persona-file", "writing={PERSONA_B}"], "writing"),
    (RUN + ["--judge", "{T}/no_such_judge.py:judge"], "no_such_judge.py"),
    (RUN + ["--judge", "no_such_module_20:judge"], "no_such_module_20"),
    (RUN + ["--set", "gate.calibrate=banana"], "gate.calibrate"),
    (CHECK, "the same question?"),
    (["serve", "--prism", "{ART}", "--host", "999.1.1.1", "--port", "0"], "999.1.1.1"),
]


def run_cli(argv, files, capsys) -> tuple[int, list[str]]:
    rc = cli.main([a.format(**files) for a in argv])
    err = [x for x in capsys.readouterr().err.strip().splitlines() if x.strip()]
    return rc, err


def case_id(case) -> str:
    argv = case[0]
    return " ".join(argv[:1] + [a[:40] for a in argv[-2:]])


@pytest.mark.parametrize("argv, name", NAN_CASES, ids=[case_id(c) for c in NAN_CASES])
def test_item7_nan_and_infinity_fail_every_bound(argv, name, files, no_model_load, capsys):
    rc, err = run_cli(argv, files, capsys)
    assert rc == 2 and len(err) == 1 and name in err[0], err


@pytest.mark.parametrize("argv, needle", ONE_LINE_CASES, ids=[case_id(c) for c in ONE_LINE_CASES])
def test_item12_13_bad_input_is_one_line_before_any_model_loads(argv, needle, files, no_model_load, capsys):
    rc, err = run_cli(argv, files, capsys)
    assert rc == 2 and len(err) == 1 and needle.format(**files) in err[0], err
    assert err[0].startswith(f"prism {argv[0]}: error: "), err


@pytest.mark.subprocess
def test_item12_binary_bytes_piped_into_chat_are_one_line(artifact, tmp_path):
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "prism_persona.cli", "chat", "--prism", str(artifact), "--max-new-tokens", "2", "-q"],
        input=b"\x00\xff\xfe\x80binary\x00\n" * 50,
        capture_output=True,
        timeout=120,
    )
    err = [x for x in proc.stderr.decode("utf-8", "replace").splitlines() if x.strip()]
    assert proc.returncode == 2 and len(err) == 1 and "stdin" in err[0], err


# --------------------------------------------------------------------------------------------------
# item 12: corrupt values in an artifact someone sends you


def artifact_copy(artifact, tmp_path):
    import shutil

    dst = tmp_path / "art"
    shutil.copytree(artifact, dst)
    return dst


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


ARTIFACT_EDITS = {
    "batch_size_text": lambda a: edit_json(a / "prism_config.json", batch_size="lots"),
    "batch_size_negative": lambda a: edit_json(a / "prism_config.json", batch_size=-4),
    "adapter_r_zero": lambda a: edit_json(a / "adapter" / "adapter_config.json", r=0),
    "adapter_r_text": lambda a: edit_json(a / "adapter" / "adapter_config.json", r="eight"),
    "pooling_unknown": lambda a: edit_json(a / "gate_config.json", pooling="banana"),
    "adapter_config_list": lambda a: (a / "adapter" / "adapter_config.json").write_text("[1, 2]"),
    "gate_config_list": lambda a: (a / "gate_config.json").write_text("[]"),
    "adapter_outside": lambda a: edit_json(a / "prism_config.json", adapter="../../elsewhere"),
    "adapter_absolute": lambda a: edit_json(a / "prism_config.json", adapter="/etc"),
    "threshold_nan": lambda a: (a / "prism_config.json").write_text(
        (a / "prism_config.json").read_text().replace('"threshold": ', '"threshold": NaN, "x_threshold": ')
    ),
}


def pickle_adapter(a):
    (a / "adapter" / "adapter_model.safetensors").unlink()
    (a / "adapter" / "adapter_model.bin").write_bytes(b"\x80\x04\x95 pickle that would run code")


ARTIFACT_EDITS["pickle_adapter_bin"] = pickle_adapter


@pytest.mark.parametrize("edit", sorted(ARTIFACT_EDITS))
def test_item12_corrupt_artifact_values_are_one_line(edit, artifact, tmp_path, capsys):
    art = artifact_copy(artifact, tmp_path)
    ARTIFACT_EDITS[edit](art)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello"}) + "\n")
    rc = cli.main(
        ["generate", "--prism", str(art), "--input", str(prompts), "--output", str(tmp_path / "o.jsonl"), "-q"]
    )
    err = [x for x in capsys.readouterr().err.strip().splitlines() if x.strip()]
    assert rc == 2 and len(err) == 1 and str(art) in err[0], err


# --------------------------------------------------------------------------------------------------
# items 8 and 13: a user judge that exits, returns huge text or returns something else


def bootstrap_argv(tiny_model_dir, out, judge) -> list[str]:
    return [
        "bootstrap",
        "--model",
        str(tiny_model_dir),
        "--domains",
        ",".join(DOMAINS),
        "--preset",
        "tiny",
        "--queries-per-persona",
        "3",
        "--set",
        "queries.per_request=3",
        "--judge",
        judge,
        "--out",
        str(out),
        "-q",
    ]


def write_judge(tmp_path, body: str) -> str:
    mod = tmp_path / "user_judge.py"
    mod.write_text(body)
    return f"{mod}:judge"


@pytest.mark.parametrize(
    "body",
    [
        "import sys\ndef judge(q, a, b):\n    sys.exit(3)\n",
        "import sys\nsys.exit(5)\ndef judge(q, a, b):\n    return 'A'\n",
        "def judge(q, a, b):\n    raise SystemExit('bye')\n",
    ],
    ids=["exit_in_call", "exit_at_import", "systemexit_text"],
)
def test_item8_judge_calling_sys_exit_is_one_line_naming_the_judge(body, tiny_model_dir, tmp_path, scripted, capsys):
    spec = write_judge(tmp_path, body)
    rc = cli.main(bootstrap_argv(tiny_model_dir, tmp_path / "run", spec))
    err = [x for x in capsys.readouterr().err.strip().splitlines() if x.strip() and "error" in x]
    assert rc == 2 and len(err) == 1 and "user_judge.py" in err[0] and "exit" in err[0], err


def test_item8_a_judge_returning_megabytes_stores_a_bounded_record(tiny_model_dir, tmp_path, scripted, capsys):
    spec = write_judge(tmp_path, "def judge(q, a, b):\n    return 'A' + 'x' * 300_000\n")
    out = tmp_path / "run"
    cli.main(bootstrap_argv(tiny_model_dir, out, spec))
    size = (out / "verdicts.jsonl").stat().st_size if (out / "verdicts.jsonl").exists() else 0
    assert size < 200_000, f"verdicts.jsonl is {size} bytes for a handful of queries"
    err = capsys.readouterr().err
    assert "user_judge.py" in err and "A, B or tie" in err, err


@pytest.mark.parametrize("result", ["42", "None", "['A']"])
def test_item8_13_a_judge_returning_no_verdict_is_named(result, tiny_model_dir, tmp_path, scripted, capsys):
    """Counted as unparseable (judges fail soft), and named with the judge and what it returned."""
    spec = write_judge(tmp_path, f"def judge(q, a, b):\n    return {result}\n")
    rc = cli.main(bootstrap_argv(tiny_model_dir, tmp_path / "run", spec))
    err = capsys.readouterr().err
    assert rc == 0 and f"user_judge.py:judge returned {result}, not A, B or tie" in err, err


# --------------------------------------------------------------------------------------------------
# item 13: settings that only the later stages used are checked before the bootstrap


@pytest.mark.parametrize(
    "setting, needle",
    [('distill.target_modules=["no_such_proj"]', "no_such_proj"), ("gate.calibrate=rate:abc", "gate.calibrate")],
)
def test_item13_later_stage_settings_are_checked_before_the_bootstrap(
    setting, needle, tiny_model_dir, tmp_path, scripted, capsys
):
    out = tmp_path / "run"
    argv = ["run", "--model", str(tiny_model_dir), "--domains", "writing", "--preset", "tiny", "--out", str(out)]
    rc = cli.main(argv + ["--set", setting, "-q"])
    err = [x for x in capsys.readouterr().err.strip().splitlines() if x.strip()]
    assert not (out / "personas.jsonl").exists(), "the bootstrap ran before the setting was checked"
    assert rc == 2 and len(err) == 1 and needle in err[0], err


def test_item13_model_in_a_config_file_is_relative_to_the_file(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import shutil

    cfg_dir = tmp_path / "kit"
    shutil.copytree(tiny_model_dir, cfg_dir / "llama")
    (cfg_dir / "prism.json").write_text(json.dumps({"model": {"model": "llama"}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli.main(["config", "--config", str(cfg_dir / "prism.json"), "--show"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["model"]["model"] == str(cfg_dir / "llama")


def test_item12_lm_eval_model_args_are_one_line(artifact):
    pytest.importorskip("lm_eval")
    from prism_persona.errors import PrismError
    from prism_persona.evals import lmeval

    for bad, needle in [("device=banana", "device"), ("threshold=abc", "threshold"), ("max_length=abc", "max_length")]:
        with pytest.raises(PrismError, match=needle):
            lmeval.PrismLM.create_from_arg_string(f"artifact={artifact},{bad}")


@pytest.mark.parametrize("flag", ["--grader", "--judge"])
def test_item12_eval_with_a_pairwise_judge_is_one_line(flag, artifact, tmp_path, capsys):
    """prism eval grades one answer (``grader(prompt)``); a pairwise ``judge(q, a, b)`` given to it is one
    line (``--judge``, the pairwise flag of run/check, is not an eval flag since the renovation)."""
    spec = write_judge(tmp_path, "def judge(q, a, b):\n    return 'A'\n")
    mtbench = Path(__file__).parent / "fixtures" / "mtbench_small.jsonl"
    argv = ["eval", "--prism", str(artifact), "--systems", "base,prism", flag, spec, "--benchmarks", "mtbench"]
    rc = cli.main(argv + ["--mtbench", str(mtbench), "--limit", "1", "--out", str(tmp_path / "e"), "-q"])
    err = [x for x in capsys.readouterr().err.strip().splitlines() if x.strip()]
    assert rc == 2 and len(err) == 1 and ("judge" in err[0] or "grader" in err[0]), err
