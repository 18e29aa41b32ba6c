"""`prism run / gate / distill / generate / chat` end to end on a tiny model (bootstrap faked)."""

from __future__ import annotations

import io
import json

import pytest

from prism_persona import cli
from prism_persona import config as C

DOMAINS = ["writing", "coding"]


def fake_records(n=16):
    recs = []
    for i in range(n):
        dom = DOMAINS[i % 2]
        recs.append(
            {
                "key": f"k{i}",
                "domain": dom,
                "query": f"Please help me with {dom} task number {i}.",
                "persona": f"You are a world-class expert in {dom}.",
                "placement": "system",
                "base_answer": "Sure.",
                "persona_answer": f"As an expert in {dom}: step {i}, done.",
                "label": int(i % 4 in (0, 1)),
            }
        )
    return recs


@pytest.fixture
def fake_bootstrap(monkeypatch):
    """run_bootstrap writes config/summary and marks itself done; load_labelled returns fixed data."""
    import prism_persona.train.pipeline as P
    from prism_persona.store import RunDir

    calls = []

    def run_bootstrap(cfg, engine=None, judge=None):
        calls.append(engine)
        run = RunDir(cfg.out)
        run.write_json("config.json", json.loads(C.dump(cfg)))
        if not run.done("bootstrap"):
            run.write_json("summary.json", {"wall_seconds": 1.5})
            run.mark_done("bootstrap", {})
        return {}

    monkeypatch.setattr(P, "run_bootstrap", run_bootstrap)
    monkeypatch.setattr(P, "load_labelled", lambda run, *a, **k: fake_records())
    return calls


def _run_args(model_dir, out):
    return [
        "run",
        "--model",
        str(model_dir),
        "--domains",
        ",".join(DOMAINS),
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--set",
        "gate.epochs=30",
        "--set",
        "distill.epochs=1",
        "--set",
        "distill.r=4",
        "-q",
    ]


def test_run_builds_artifact_report_and_resumes(tiny_model_dir, tmp_path, fake_bootstrap, capsys, monkeypatch):
    out = tmp_path / "run"
    assert cli.main(_run_args(tiny_model_dir, out)) == 0
    printed = capsys.readouterr().out
    art = out / "prism"
    assert f"prism chat --prism {art}" in printed
    for name in (
        "prism_config.json",
        "gate.safetensors",
        "gate_config.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ):
        assert (art / name).is_file(), name
    assert not (art / "adapter" / "optimizer.pt").exists()
    assert fake_bootstrap[0] is not None, "the loaded model is shared with the bootstrap"
    rep = json.loads((out / "training_report.json").read_text())
    assert rep["data"]["total"] == {"queries": 16, "persona_won": 8}
    assert rep["gate"]["metrics"]["heldout"]["n"] == 4
    assert set(rep["routing_by_domain_heldout"]) <= set(DOMAINS)
    # the tiny preset asks for at least 30 steps: 8 examples, batch 4 -> 2 steps per epoch -> 15 epochs
    assert rep["distill"]["examples"] == 8 and rep["distill"]["steps"] == 30
    assert {"bootstrap", "gate", "distill"} <= set(rep["stage_seconds"])
    md = (out / "training_report.md").read_text()
    assert "balanced accuracy" in md and "![loss curve](distill/loss.png)" in md
    cfg = json.loads((art / "prism_config.json").read_text())
    assert cfg["base_model"] == str(tiny_model_dir) and cfg["domains"] == DOMAINS

    # resume: every stage is done, nothing is retrained and no model is loaded
    import prism_persona.train.distill as D
    import prism_persona.train.gate as G
    import prism_persona.train.pipeline as P

    monkeypatch.setattr(D, "distill_loss", lambda *a, **k: pytest.fail("distill redone"))
    monkeypatch.setattr(G, "fit_gate", lambda *a, **k: pytest.fail("gate redone"))
    monkeypatch.setattr(P, "load_base", lambda cfg: pytest.fail("model loaded"))
    assert cli.main(["run", "--out", str(out), "-q"]) == 0
    assert "prism chat --prism" in capsys.readouterr().out


def test_run_with_heldout_checks_the_artifact_and_reports_it(
    tiny_model_dir, tmp_path, fake_bootstrap, capsys, monkeypatch
):
    persona = tmp_path / "persona.txt"
    persona.write_text("You are a pirate. Say arr.")
    judge = tmp_path / "judge.py"
    judge.write_text("def judge(query, a, b, domain=''):\n    return 'A' if len(a) > len(b) else 'B'\n")
    held = tmp_path / "heldout.jsonl"
    held.write_text(
        "".join(json.dumps({"domain": d, "query": f"{d} question {i}?"}) + "\n" for d in DOMAINS for i in range(3))
    )
    out = tmp_path / "run"
    args = _run_args(tiny_model_dir, out) + [
        "--persona-file",
        f"writing={persona}",
        "--persona-file",
        f"coding={persona}",
        "--judge",
        f"{judge}:judge",
        "--heldout",
        str(held),
        "--set",
        'check.rewarded=["writing"]',
        "--set",
        "check.max_new_tokens=4",
    ]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"domain": "law", "query": "Is this legal?"}) + "\n")
    import prism_persona.train.pipeline as P

    with monkeypatch.context() as m:  # a held-out domain the run lacks: refused before any model loads
        m.setattr(P, "load_base", lambda cfg: pytest.fail("model loaded"))
        assert cli.main(args[:-6] + ["--heldout", str(bad)]) == 2
    assert "domain(s) law are not among the run's domains" in capsys.readouterr().err
    assert cli.main(args[:-6] + ["--heldout", str(held), "--set", 'check.rewarded=["law"]']) == 2
    assert "check.rewarded names domains with no held-out queries: law" in capsys.readouterr().err

    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    chk = json.loads((out / "check" / "check.json").read_text())
    assert {q for q in chk["domains"]} == set(DOMAINS) and chk["domains"]["writing"]["n"] == 3
    assert chk["gate_vs_expected_route"]["n"] == 6  # --set check.rewarded labels the expected routes
    rep = json.loads((out / "training_report.json").read_text())
    assert rep["heldout_check"]["overall"] == chk["overall"] and "check" in rep["stage_seconds"]
    md = (out / "training_report.md").read_text()
    assert "## Held-out check" in md and "## Gate (in-distribution)" in md
    assert "held-out check" in printed

    # resume: answers and verdicts of the check are reused, nothing is generated again
    import prism_persona.train.check as K

    monkeypatch.setattr(K, "write_answers", lambda *a, **k: None)
    before = (out / "check" / "answers.jsonl").read_text()
    resume = ["run", "--out", str(out), "-q"]
    assert cli.main(resume) == 2  # the judge and the held-out file are named on the command line (issue 20)
    assert "--trust-judge" in capsys.readouterr().err
    assert cli.main(resume + ["--trust-judge"]) == 2
    err = capsys.readouterr().err
    assert "--heldout" in err and "--persona-file" in err
    files = ["--heldout", str(held), "--persona-file", f"writing={persona}", "--persona-file", f"coding={persona}"]
    assert cli.main(resume + ["--trust-judge"] + files) == 0
    assert (out / "check" / "answers.jsonl").read_text() == before

    from prism_persona.train.pipeline import redo

    assert "check" in redo(out, "distill")  # a retrained LoRA is checked again
    assert not (out / "check").exists()


@pytest.fixture(scope="module")
def artifact(tiny_model_dir, tmp_path_factory):
    """An artifact made by `prism bootstrap`-free single stages: `prism gate`, then `prism distill`."""
    import prism_persona.train.pipeline as P
    from prism_persona.store import RunDir

    mp = pytest.MonkeyPatch()
    mp.setattr(P, "load_labelled", lambda run, *a, **k: fake_records())
    out = tmp_path_factory.mktemp("stages") / "run"
    cfg = C.resolve(
        "tiny",
        overrides={
            "out": str(out),
            "model": {"model": str(tiny_model_dir)},
            "persona": {"domains": DOMAINS},
            "gate": {"epochs": 30},
            "distill": {"epochs": 1, "r": 4},
        },
    )
    run = RunDir(out)
    run.write_json("config.json", json.loads(C.dump(cfg)))
    try:
        assert cli.main(["gate", "--run", str(out), "-q"]) == 0
        assert run.done("gate") and not (out / "prism").exists()
        assert cli.main(["distill", "--run", str(out), "-q"]) == 0
    finally:
        mp.undo()
    assert (out / "prism" / "prism_config.json").is_file()
    return out / "prism"


def test_generate_writes_routing_and_responses(artifact, tmp_path, capsys):
    inp = tmp_path / "prompts.jsonl"
    inp.write_text(
        json.dumps({"prompt": "Write a haiku.", "id": 1})
        + "\n\n"
        + json.dumps({"messages": [{"role": "user", "content": "Fix my code"}], "id": 2})
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    assert (
        cli.main(
            [
                "generate",
                "--prism",
                str(artifact),
                "--input",
                str(inp),
                "--output",
                str(out),
                "--max-new-tokens",
                "4",
                "-q",
            ]
        )
        == 0
    )
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 2]
    assert all(
        isinstance(r["response"], str) and isinstance(r["routed"], bool) and 0 <= r["gate_prob"] <= 1 for r in rows
    )
    assert (
        cli.main(
            [
                "generate",
                "--prism",
                str(artifact),
                "--input",
                str(inp),
                "--output",
                str(out),
                "--max-new-tokens",
                "2",
                "--force",
                "on",
                "-q",
            ]
        )
        == 0
    )
    assert all(json.loads(x)["routed"] for x in out.read_text().splitlines())


@pytest.mark.parametrize(
    "line, needle",
    [
        ("{not json", "line 2 is not valid JSON"),
        (json.dumps({"text": "x"}), "line 2 has no non-empty 'prompt'"),
        (json.dumps({"messages": [{"role": "bot"}]}), "line 2: 'messages'"),
    ],
)
def test_generate_bad_line_is_a_one_line_error(artifact, tmp_path, capsys, line, needle):
    inp = tmp_path / "bad.jsonl"
    inp.write_text(json.dumps({"prompt": "ok"}) + "\n" + line + "\n")
    rc = cli.main(["generate", "--prism", str(artifact), "--input", str(inp), "--output", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0] and "bad.jsonl" in err[0]


def test_chat_with_piped_stdin_keeps_routing_per_conversation(artifact, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Write a poem\nshorter please\n/reset\nFix my code\n/quit\nnever\n"))
    assert cli.main(["chat", "--prism", str(artifact), "--max-new-tokens", "3", "--force", "off", "-q"]) == 0
    out = capsys.readouterr().out
    assert out.count("[routing: persona LoRA off (forced)]") == 2  # once per conversation
    assert out.count("prism> ") == 3 and "(new conversation)" in out


def test_not_an_artifact_is_a_one_line_error(tmp_path, capsys):
    inp = tmp_path / "p.jsonl"
    inp.write_text(json.dumps({"prompt": "hi"}) + "\n")
    rc = cli.main(["generate", "--prism", str(tmp_path), "--input", str(inp), "--output", str(tmp_path / "o")])
    assert rc == 2 and "not a PRISM artifact" in capsys.readouterr().err


def test_generate_keeps_line_separator_characters_inside_records(artifact, tmp_path, capsys):
    """JSON Lines records end at "\\n" only: U+2028 / U+0085 inside a prompt stay inside its record,
    in the input and in the output (which is written without escaping them)."""
    inp = tmp_path / "odd.jsonl"
    prompts = ["first line\u2028second line", "next\u0085line", "plain"]
    inp.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert (
        cli.main(
            [
                "generate",
                "--prism",
                str(artifact),
                "--input",
                str(inp),
                "--output",
                str(out),
                "--max-new-tokens",
                "2",
                "-q",
            ]
        )
        == 0
    )
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").split("\n") if x]
    assert [r["prompt"] for r in rows] == prompts
    assert "wrote 3 answers" in capsys.readouterr().err
