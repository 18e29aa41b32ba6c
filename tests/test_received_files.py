"""Issue 20, items 1-6 and 14: a run directory someone sends you is data. Its saved RUN/config.json says
what was run; how to run here (engine, server URL, key variable, executables, server arguments, trust
flags, judge code, files outside the run) comes from this command line, or the resume is refused with
one line naming the flag. Destructive flags lock and validate before they delete."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prism_persona import cli
from prism_persona.testing import one_error_line, small_run_overrides

DOMAINS = ["writing", "coding"]


@pytest.fixture(autouse=True)
def _log_to_this_tests_stderr():
    cli.setup_logging(quiet=True)  # an earlier test's cli.main bound logging to its own (closed) stderr


def small_settings(model_dir, out, **over) -> dict:
    """The settings of a small run as `prism config --preset tiny --show` prints them, with ``over``
    (dotted keys) applied: what a RUN/config.json someone sends you holds."""
    from prism_persona import config as C

    base = small_run_overrides(model_dir, out, DOMAINS)
    saved = json.loads(C.dump(C.resolve("tiny", overrides=base)))
    set_dotted(saved, over)
    return saved


def write_saved_config(out: Path, settings: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(settings, indent=2))


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    """A whole finished run (bootstrap, gate, distill, artifact) of the scripted engine; copy before use."""
    import prism_persona.engines as E
    from prism_persona import config as C
    from prism_persona.testing import BootstrapEngine
    from prism_persona.train.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("finished") / "run"
    real = E.make_engine
    E.make_engine = lambda cfg, model=None, tokenizer=None: BootstrapEngine()
    try:
        cfg = C.resolve(file=None, overrides=small_settings(tiny_model_dir, out))
        run_pipeline(cfg)
    finally:
        E.make_engine = real
    assert (out / "prism" / "prism_config.json").is_file()
    return out


def received_copy(finished_run, tmp_path, **over) -> Path:
    """A copy of the finished run as someone sends it: its config.json edited by ``over`` (dotted keys)."""
    out = tmp_path / "received"
    shutil.copytree(finished_run, out)
    saved = json.loads((out / "config.json").read_text())
    saved["out"] = str(out)
    set_dotted(saved, over)
    (out / "config.json").write_text(json.dumps(saved, indent=2))
    for meta in out.glob("*.meta.json"):  # the stages were made with those settings too
        info = json.loads(meta.read_text())
        set_dotted(info.get("settings", {}), over, only_existing=True)
        meta.write_text(json.dumps(info))
    return out


def set_dotted(d: dict, over: dict, only_existing: bool = False) -> None:
    for key, value in over.items():
        node = d
        *path, last = key.split(".")
        for k in path:
            node = node.get(k) if only_existing else node[k]
            if node is None:
                break
        if node is not None and (last in node or not only_existing):
            node[last] = value


# --------------------------------------------------------------------------------------------------
# item 1: model.trust_remote_code in a received RUN/config.json runs no model code


def model_with_code(tiny_model_dir, tmp_path) -> tuple[Path, Path]:
    """The tiny model plus modelling code in its directory that leaves a marker file when imported."""
    model = tmp_path / "model-with-code"
    shutil.copytree(tiny_model_dir, model)
    marker = tmp_path / "model-code-ran"
    (model / "evil_modeling.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'llama'\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n"
    )
    conf = json.loads((model / "config.json").read_text())
    conf["auto_map"] = {"AutoConfig": "evil_modeling.EvilConfig", "AutoModelForCausalLM": "evil_modeling.EvilModel"}
    (model / "config.json").write_text(json.dumps(conf))
    return model, marker


def test_item1_received_trust_remote_code_runs_no_model_code_on_resume(tiny_model_dir, tmp_path, scripted, capsys):
    model, marker = model_with_code(tiny_model_dir, tmp_path)
    out = tmp_path / "received"
    write_saved_config(out, small_settings(model, out, **{"model.trust_remote_code": True}))
    rc = cli.main(["run", "--out", str(out), "-q"])
    assert not marker.exists(), "the model's own code ran for a flag only the received config set"
    line = one_error_line(capsys)
    assert rc == 2 and "--trust-remote-code" in line, line


def test_item1_received_trust_remote_code_runs_no_model_code_in_prism_gate(
    finished_run, tiny_model_dir, tmp_path, capsys
):
    model, marker = model_with_code(tiny_model_dir, tmp_path)
    out = received_copy(finished_run, tmp_path, **{"model.model": str(model), "model.trust_remote_code": True})
    rc = cli.main(["gate", "--run", str(out), "--redo", "-q"])
    assert not marker.exists(), "the model's own code ran for a flag only the received config set"
    line = one_error_line(capsys)
    assert rc == 2 and "--trust-remote-code" in line, line


# --------------------------------------------------------------------------------------------------
# item 2: engine.vllm_python / engine.vllm_args of a received config are never executed


def evil_script(tmp_path, inside: Path) -> tuple[Path, Path]:
    marker = tmp_path / "script-ran"
    script = inside / "evil.sh"
    script.write_text(f"#!/bin/sh\necho ran > {marker}\nexit 1\n")
    script.chmod(0o755)
    return script, marker


def test_item2_received_vllm_python_is_never_executed(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "received"
    out.mkdir()
    script, marker = evil_script(tmp_path, out)
    settings = small_settings(tiny_model_dir, out, **{"engine.engine": "vllm", "engine.vllm_python": str(script)})
    write_saved_config(out, settings)
    rc = cli.main(["run", "--out", str(out), "-q"])
    assert not marker.exists(), "a received config made PRISM execute a file of the run directory"
    line = one_error_line(capsys)
    assert rc == 2 and "--vllm-python" in line, line


def test_item2_received_vllm_args_are_refused(tiny_model_dir, tmp_path, fake_python, capsys):
    out = tmp_path / "received"
    settings = small_settings(
        tiny_model_dir,
        out,
        **{"engine.engine": "vllm", "engine.vllm_args": ["--host", "0.0.0.0", "--trust-remote-code"]},
    )
    write_saved_config(out, settings)
    # the user names the engine and the Python, but not the server arguments the received config adds
    rc = cli.main(["run", "--out", str(out), "--engine", "vllm", "--vllm-python", fake_python, "-q"])
    line = one_error_line(capsys)
    assert rc == 2 and "vllm_args" in line.replace("-", "_"), line


# --------------------------------------------------------------------------------------------------
# item 3: the judge of a received config is not imported by the held-out check after the bootstrap


def test_item3_received_judge_is_not_imported_by_the_heldout_check(finished_run, tmp_path, scripted, capsys):
    marker = tmp_path / "judge-was-imported"
    judge = tmp_path / "x.py"
    judge.write_text(f"open({str(marker)!r}, 'w').write('ran')\ndef judge(q, a, b):\n    return 'A'\n")
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(
        "".join(
            json.dumps({"domain": d, "query": f"held-out question {i} about {d}?"}) + "\n"
            for d in DOMAINS
            for i in range(3)
        )
    )
    out = received_copy(finished_run, tmp_path, **{"judge.judge": f"{judge}:judge", "check.queries": str(heldout)})
    assert (out / "bootstrap.done.json").is_file()
    rc = cli.main(["run", "--out", str(out), "-q"])
    assert not marker.exists(), "the held-out check imported a judge only the received config names"
    line = one_error_line(capsys)
    assert rc == 2 and ("--judge" in line or "--trust-judge" in line), line


# --------------------------------------------------------------------------------------------------
# item 4: a received engine.base_url / api_key_env / persona_files sends nothing anywhere


def test_item4_received_openai_engine_sends_no_key_and_no_file(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from prism_persona.testing import FakeOpenAIServer

    monkeypatch.setenv("PRISM_TEST_SECRET", "s3cr3t-value")
    private = tmp_path / "private.txt"
    private.write_text("PRIVATE NOTES: the launch code is 0000")
    out = tmp_path / "received"
    with FakeOpenAIServer() as server:
        settings = small_settings(
            tiny_model_dir,
            out,
            **{
                "engine.engine": "openai",
                "engine.base_url": server.url,
                "engine.api_key_env": "PRISM_TEST_SECRET",
                "persona.persona_files": {"writing": str(private)},
            },
        )
        write_saved_config(out, settings)
        rc = cli.main(["run", "--out", str(out), "-q"])
        assert server.bodies == [] and server.headers == [], "a received config sent requests"
        line = one_error_line(capsys)
        assert rc == 2 and ("--engine" in line or "--base-url" in line), line


def test_item4_received_key_variable_needs_the_flag(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from prism_persona.testing import FakeOpenAIServer

    monkeypatch.setenv("PRISM_TEST_SECRET", "s3cr3t-value")
    out = tmp_path / "received"
    with FakeOpenAIServer() as server:
        settings = small_settings(
            tiny_model_dir,
            out,
            **{"engine.engine": "openai", "engine.base_url": server.url, "engine.api_key_env": "PRISM_TEST_SECRET"},
        )
        write_saved_config(out, settings)
        # the user names the engine and the URL; the key variable is still the received config's
        rc = cli.main(["run", "--out", str(out), "--engine", "openai", "--base-url", server.url, "-q"])
        assert not any("s3cr3t-value" in a for a in server.auth), "the received key variable was sent"
        line = one_error_line(capsys)
        assert rc == 2 and "api_key_env" in line.replace("-", "_"), line


def test_item4_received_persona_file_outside_the_run_is_not_read(tiny_model_dir, tmp_path, scripted, capsys):
    private = tmp_path / "private.txt"
    private.write_text("PRIVATE NOTES: the launch code is 0000")
    out = tmp_path / "received"
    write_saved_config(out, small_settings(tiny_model_dir, out, **{"persona.persona_files": {"writing": str(private)}}))
    rc = cli.main(["run", "--out", str(out), "-q"])
    assert not (out / "personas.jsonl").exists() or "launch code" not in (out / "personas.jsonl").read_text()
    line = one_error_line(capsys)
    assert rc == 2 and "--persona-file" in line, line


def test_item4_received_queries_file_outside_the_run_needs_the_flag(tiny_model_dir, tmp_path, scripted, capsys):
    queries = tmp_path / "elsewhere.jsonl"
    queries.write_text(
        "".join(
            json.dumps({"domain": d, "query": f"private question {d} {i}?"}) + "\n" for d in DOMAINS for i in range(4)
        )
    )
    out = tmp_path / "received"
    write_saved_config(out, small_settings(tiny_model_dir, out, **{"queries.queries_file": str(queries)}))
    rc = cli.main(["run", "--out", str(out), "-q"])
    line = one_error_line(capsys)
    assert rc == 2 and "--queries-file" in line, line


def test_item4_received_everyday_queries_file_outside_the_run_needs_the_flag(tiny_model_dir, tmp_path, capsys):
    """gate.ood_contrast = PATH (like gate.base_queries): a received config does not make PRISM read it."""
    everyday = tmp_path / "elsewhere.txt"
    everyday.write_text("What is 2 + 2?\n")
    out = tmp_path / "received"
    write_saved_config(out, small_settings(tiny_model_dir, out, **{"gate.ood_contrast": str(everyday)}))
    rc = cli.main(["run", "--out", str(out), "-q"])
    line = one_error_line(capsys)
    assert rc == 2 and "--set gate.ood_contrast=" in line, line
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]  # refused before any stage ran


def test_item4_typed_flags_resume_the_received_run(finished_run, tmp_path, scripted, capsys):
    """The refusal is not a dead end: the same received run resumes once this command line names how."""
    out = received_copy(finished_run, tmp_path, **{"engine.engine": "openai", "engine.base_url": "http://10.9.9.9/v1"})
    assert cli.main(["run", "--out", str(out), "-q"]) == 2
    assert "--engine" in capsys.readouterr().err
    assert cli.main(["run", "--out", str(out), "--engine", "hf", "-q"]) == 0


# --------------------------------------------------------------------------------------------------
# items 5 and 6: lock, validate everything, then delete; prism check takes the run lock


def tree(path: Path) -> dict:
    """Every file of a run and its size (the lock file, which holds the holder's PID, left out)."""
    return {
        str(p.relative_to(path)): p.stat().st_size
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != ".prism.lock"
    }


@pytest.mark.subprocess
def test_item5_redo_waits_for_the_lock_before_deleting(finished_run, tmp_path, lock_holder, scripted, capsys):
    out = received_copy(finished_run, tmp_path)
    before = tree(out)
    lock_holder(out)
    rc = cli.main(["run", "--out", str(out), "--redo", "gate", "-q"])
    line = one_error_line(capsys)
    assert rc == 2 and "in use by another prism process" in line, line
    assert tree(out) == before, "--redo deleted files of a run another process holds"


def test_item5_redo_validates_every_flag_before_deleting(finished_run, tmp_path, scripted, capsys):
    out = received_copy(finished_run, tmp_path)
    before = tree(out)
    rc = cli.main(["run", "--out", str(out), "--redo", "distill", "--heldout", str(tmp_path / "missing.jsonl"), "-q"])
    line = one_error_line(capsys)
    assert rc == 2 and "missing.jsonl" in line, line
    assert tree(out) == before, "--redo deleted the adapter and the artifact before a flag was refused"


@pytest.mark.subprocess
def test_item5_prism_gate_redo_waits_for_the_lock(finished_run, tmp_path, lock_holder, capsys):
    out = received_copy(finished_run, tmp_path)
    before = tree(out)
    lock_holder(out)
    rc = cli.main(["gate", "--run", str(out), "--redo", "-q"])
    line = one_error_line(capsys)
    assert rc == 2 and "in use by another prism process" in line, line
    assert tree(out) == before


@pytest.mark.subprocess
def test_item6_prism_check_takes_the_run_lock(finished_run, tmp_path, lock_holder, capsys):
    out = received_copy(finished_run, tmp_path)
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(
        "".join(json.dumps({"domain": d, "query": f"question {i} on {d}?"}) + "\n" for d in DOMAINS for i in range(2))
    )
    lock_holder(out)
    rc = cli.main(["check", "--prism", str(out / "prism"), "--queries", str(heldout), "--judge", "self", "-q"])
    line = one_error_line(capsys)
    assert rc == 2 and "in use by another prism process" in line, line
    assert not (out / "check" / "answers.jsonl").exists()


# --------------------------------------------------------------------------------------------------
# item 14: crash leftovers


@pytest.mark.subprocess
def test_item14_assembly_leftovers_of_a_dead_process_are_removed(finished_run, tmp_path, scripted):
    out = received_copy(finished_run, tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name in (f".prism.old-{dead.pid}", f".prism.tmp-{dead.pid}"):
        shutil.copytree(out / "prism", out / name)
    assert cli.main(["run", "--out", str(out), "-q"]) == 0
    left = sorted(p.name for p in out.iterdir() if p.name.startswith(".prism.") and p.name != ".prism.lock")
    assert left == [], f"a dead process's assembly copies stay behind for good: {left}"
    assert (out / "prism" / "prism_config.json").is_file()


def test_item14_a_kill_between_the_two_appends_loses_no_query_rounds(tiny_model_dir, tmp_path, monkeypatch):
    """The queries of a round are appended, then the round's record: killed between the two and resumed,
    every query is still accounted to a recorded round (``new`` of the rounds sums to the queries)."""
    from prism_persona import config as C
    from prism_persona import store
    from prism_persona.testing import BootstrapEngine
    from prism_persona.train.pipeline import run_bootstrap

    out = tmp_path / "run"
    cfg = C.resolve(file=None, overrides=small_settings(tiny_model_dir, out, **{"queries.per_request": 2}))
    real_extend = store.JsonlStore.extend

    def dying_extend(self, records):
        if self.path.name == "query_rounds.jsonl":
            raise KeyboardInterrupt("killed between the queries append and the round append")
        return real_extend(self, records)

    monkeypatch.setattr(store.JsonlStore, "extend", dying_extend)
    with pytest.raises(KeyboardInterrupt):
        run_bootstrap(cfg, engine=BootstrapEngine())
    monkeypatch.setattr(store.JsonlStore, "extend", real_extend)
    run_bootstrap(cfg, engine=BootstrapEngine())
    queries = [json.loads(x) for x in (out / "queries.jsonl").read_text().splitlines() if x.strip()]
    rounds_file = out / "query_rounds.jsonl"
    rounds = [json.loads(x) for x in rounds_file.read_text().splitlines() if x.strip()] if rounds_file.exists() else []
    for domain in DOMAINS:
        mine = [q for q in queries if q["domain"] == domain]
        recorded = {r["round"]: r["new"] for r in rounds if r["domain"] == domain}
        for rnd in {q["round"] for q in mine}:
            assert recorded.get(rnd) == sum(1 for q in mine if q["round"] == rnd), (domain, rnd, recorded)


# --------------------------------------------------------------------------------------------------
# item 12: corrupt files in a run directory are one line


@pytest.fixture(scope="module")
def interrupted_run(finished_run, tmp_path_factory):
    """The finished run with its distillation killed after the first epoch: RUN/distill/checkpoint exists."""
    import prism_persona.engines as E
    import prism_persona.train.distill as D
    from prism_persona import config as C
    from prism_persona.testing import BootstrapEngine
    from prism_persona.train.pipeline import redo, run_pipeline

    out = tmp_path_factory.mktemp("interrupted") / "run"
    shutil.copytree(finished_run, out)
    saved = json.loads((out / "config.json").read_text())
    saved["out"] = str(out)
    saved["distill"]["max_length"] = 512  # room for the answers: distillation takes steps
    (out / "config.json").write_text(json.dumps(saved))
    redo(str(out), "distill")
    real_loss, real_engine, calls = D.distill_loss, E.make_engine, {"n": 0}

    def killed_in_epoch_2(*a, **k):
        calls["n"] += 1
        if (out / "distill" / "checkpoint" / "trainer_state.json").is_file():
            raise KeyboardInterrupt
        return real_loss(*a, **k)

    D.distill_loss = killed_in_epoch_2
    E.make_engine = lambda cfg, model=None, tokenizer=None: BootstrapEngine()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(C.resolve(file=None, overrides=saved))
    finally:
        D.distill_loss, E.make_engine = real_loss, real_engine
    assert (out / "distill" / "checkpoint" / "optimizer.pt").is_file()
    return out


def garble(path: Path, data: bytes = b"\x00garbage\xff" * 10) -> None:
    path.write_bytes(data)


CORRUPT_RUN_FILES = {
    "trainer_state_garbage": lambda r: garble(r / "distill" / "checkpoint" / "trainer_state.json"),
    "trainer_state_list": lambda r: (r / "distill" / "checkpoint" / "trainer_state.json").write_text("[1, 2]"),
    "rng_state_garbage": lambda r: garble(r / "distill" / "checkpoint" / "rng_state.safetensors"),
    "checkpoint_adapter_truncated": lambda r: garble(
        r / "distill" / "checkpoint" / "adapter_model.safetensors",
        (r / "distill" / "checkpoint" / "adapter_model.safetensors").read_bytes()[:300],
    ),
}


@pytest.mark.parametrize("corrupt", sorted(CORRUPT_RUN_FILES))
def test_item12_corrupt_checkpoint_files_are_one_line(corrupt, interrupted_run, tmp_path, scripted, capsys):
    out = received_copy(interrupted_run, tmp_path)
    CORRUPT_RUN_FILES[corrupt](out)
    rc = cli.main(["run", "--out", str(out), "-q"])
    line = one_error_line(capsys)
    assert rc == 2 and "checkpoint" in line, line


def test_item12_a_directory_as_the_lock_file_is_one_line(finished_run, tmp_path, scripted, capsys):
    out = received_copy(finished_run, tmp_path)
    (out / ".prism.lock").unlink(missing_ok=True)
    (out / ".prism.lock").mkdir()
    rc = cli.main(["run", "--out", str(out), "-q"])
    line = one_error_line(capsys)
    assert rc == 2 and ".prism.lock" in line, line


@pytest.mark.parametrize("text", ["[]", "7", '{"settings": [1]}'])
def test_item12_a_stage_meta_that_is_not_an_object_is_one_line(text, finished_run, tmp_path, scripted, capsys):
    out = received_copy(finished_run, tmp_path)
    (out / "gate.meta.json").write_text(text)
    rc = cli.main(["run", "--out", str(out), "-q"])
    line = one_error_line(capsys)
    assert rc == 2 and "gate.meta.json" in line, line
