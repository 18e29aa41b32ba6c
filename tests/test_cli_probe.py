"""The issue-14 probe in the suite: bad command-line input is exit 2 and one line, before any model
loads; `prism generate` writes atomically and resumes."""

from __future__ import annotations

import io
import json
import sys

import pytest

from prism_persona import cli
from prism_persona.testing import make_tiny_artifact


@pytest.fixture(scope="module")
def artifact(tiny_model_dir, tmp_path_factory):
    return make_tiny_artifact(tiny_model_dir, tmp_path_factory.mktemp("probe") / "prism")


@pytest.fixture
def files(tmp_path, artifact):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(5)))
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(json.dumps({"prompt": "caf\u00e9"}).encode("latin-1").replace(b"\\u00e9", b"\xe9") + b"\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    return {"P": str(prompts), "L": str(latin1), "B": str(blocker), "ART": str(artifact), "T": str(tmp_path)}


RUN = ["run", "--domains", "writing,coding", "--preset", "tiny", "--out", "{T}/run"]
GEN = ["generate", "--prism", "{ART}", "--input", "{P}", "--output", "{T}/out.jsonl"]
CASES = [
    (RUN + ["--device", "banana"], "--device must be auto, cpu, cuda, cuda:N or mps, got 'banana'"),
    (RUN + ["--engine", "openai", "--base-url", "notaurl"], "--base-url must be an http(s) URL"),
    (RUN + ["--base-url", "http://:99999/v1"], "--base-url must be an http(s) URL"),
    (RUN + ["--answer-tokens", "0"], "answers.max_new_tokens (--answer-tokens) must be at least 1, got 0"),
    (RUN + ["--answer-tokens", "-3"], "answers.max_new_tokens (--answer-tokens) must be at least 1, got -3"),
    (RUN + ["--set", "distill.r=0"], "distill.r must be at least 1"),
    (RUN + ["--set", "distill.r=-2"], "distill.r must be at least 1"),
    (RUN + ["--set", "gate.epochs=0"], "gate.epochs must be at least 1"),
    (RUN + ["--set", "gate.val_fraction=0"], "gate.val_fraction must be greater than 0"),
    (RUN + ["--set", "gate.val_fraction=1.5"], "gate.val_fraction must be less than 1"),
    (RUN + ["--set", "queries.max_rounds=0"], "queries.max_rounds must be at least 1"),
    (RUN + ["--set", "answers.temperature=-1"], "answers.temperature must be at least 0"),
    (RUN + ["--set", "queries.temperature=-0.5"], "queries.temperature must be at least 0"),
    (RUN + ["--set", "persona.top_p=0"], "persona.top_p must be greater than 0"),
    (RUN + ["--set", "answers.top_p=1.5"], "answers.top_p must be at most 1"),
    (RUN + ["--set", "model.dtype=float8"], "model.dtype (--dtype) must be one of"),
    (RUN + ["--queries-per-persona", "0"], "queries.queries_per_persona (--queries-per-persona) must be at least 1"),
    (RUN + ["--out", "{B}/sub"], "cannot write to output directory"),
    (RUN + ["--config", "{L}"], "is not UTF-8 text"),
    (RUN + ["--queries-file", "{L}"], "is not UTF-8 text"),
    (RUN + ["--persona-file", "writing={L}"], "cannot read persona file"),
    (["bootstrap", "--domains", "a", "--out", "{T}/b", "--device", "cuda:x"], "--device must be"),
    (GEN + ["--device", "banana"], "--device must be auto, cpu, cuda, cuda:N or mps, got 'banana'"),
    (GEN + ["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (GEN + ["--temperature", "-1"], "--temperature must be at least 0"),
    (GEN + ["--top-p", "0"], "--top-p must be greater than 0"),
    (GEN + ["--batch-size", "0"], "--batch-size must be at least 1"),
    (["generate", "--prism", "{ART}", "--input", "{L}", "--output", "{T}/o.jsonl"], "is not UTF-8 text"),
    (["generate", "--prism", "{ART}", "--input", "{P}", "--output", "{P}"], "--output is the --input file"),
    (["generate", "--prism", "{ART}", "--input", "{P}", "--output", "{B}/sub/o.jsonl"], "cannot write --output"),
    (["generate", "--prism", "{T}", "--input", "{P}", "--output", "{T}/o.jsonl"], "is not a PRISM artifact"),
    (["chat", "--prism", "{ART}", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["export", "--prism", "{ART}", "{B}"], "is an existing file"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(c[0][:1] + c[0][-2:]) for c in CASES])
def test_bad_cli_input_is_exit_2_and_one_line_before_any_model_loads(argv, message, files, no_model_load, capsys):
    rc = cli.main([a.format(**files) for a in argv])
    err = [x for x in capsys.readouterr().err.strip().splitlines() if x.strip()]
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert err[0].startswith(f"prism {argv[0]}: error: ")


def test_binary_stdin_to_chat_is_one_line(artifact, monkeypatch, capsys):
    stdin = io.TextIOWrapper(io.BytesIO(b"\xff\xfe\x00hello\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    rc = cli.main(["chat", "--prism", str(artifact), "--max-new-tokens", "2", "-q"])
    err = [x for x in capsys.readouterr().err.strip().splitlines() if x.strip()]
    assert rc == 2 and len(err) == 1 and "stdin is not UTF-8 text" in err[0]


# --------------------------------------------------------------------------------------------------
# prism generate: atomic output, resumed after a kill


def read_jsonl(path):
    return [json.loads(x) for x in open(path, encoding="utf-8") if x.strip()]


def test_generate_output_is_atomic_and_resumes(artifact, tmp_path, monkeypatch, capsys):
    import prism_persona.gated.model as GM

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}", "id": i}) + "\n" for i in range(40)))
    out = tmp_path / "out.jsonl"
    argv = [
        "generate",
        "--prism",
        str(artifact),
        "--input",
        str(prompts),
        "--output",
        str(out),
        "--max-new-tokens",
        "2",
        "--batch-size",
        "2",
        "-q",
    ]
    calls = {"n": 0, "rows": 0}
    real = GM.GatedModel.generate

    def dying_generate(self, chats, *a, **k):
        calls["n"] += 1
        calls["rows"] += len(chats)
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(self, chats, *a, **k)

    monkeypatch.setattr(GM.GatedModel, "generate", dying_generate)
    assert cli.main(argv) == 130  # interrupted after two chunks of 16 rows
    assert not out.exists(), "the output appears only when it is complete"
    partial = tmp_path / "out.jsonl.partial"
    assert len(read_jsonl(partial)) == 32
    with open(partial, "a", encoding="utf-8") as fh:  # a torn last line, as a kill -9 leaves it
        fh.write('{"prompt": "question 32", "respo')
    calls.update(n=-100, rows=0)
    assert cli.main(argv) == 0
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == list(range(40)), "every prompt exactly once, in order"
    assert calls["rows"] == 8, "only the rows not yet answered were generated"
    assert not partial.exists() and not (tmp_path / "out.jsonl.partial.json").exists()
    # other settings: the partial output of another run is not mixed in
    partial.write_text(json.dumps(dict(rows[0], response="stale")) + "\n")
    calls.update(rows=0)
    assert cli.main(argv[:-1] + ["--force", "off", "-q"]) == 0
    assert calls["rows"] == 40 and all(r["response"] != "stale" for r in read_jsonl(out))


def test_corrupt_model_weights_are_one_line(tiny_model_dir, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    rc = cli.main(["run", "--model", str(model), "--domains", "a", "--out", str(tmp_path / "r"), "-q"])
    err = [x for x in capsys.readouterr().err.strip().splitlines() if x.strip()]
    assert rc == 2 and len(err) == 1 and str(model) in err[0], err
