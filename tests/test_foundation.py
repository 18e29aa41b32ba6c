"""Config, model resolution, chat formatting, the run store and the HF engine."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from prism_persona import config as C
from prism_persona.errors import ConfigMismatchError, PrismError
from prism_persona.models import render_chat, resolve_model, with_persona
from prism_persona.options import from_dict
from prism_persona.store import JsonlStore, RunDir, content_key


def test_presets_resolve_and_overrides_win(tmp_path):
    cfg = C.resolve("tiny", overrides={"persona": {"domains": ["a", "b"]}, "distill": {"r": 2}})
    assert cfg.preset == "tiny" and cfg.queries.queries_per_persona == 12
    assert cfg.distill.r == 2 and cfg.distill.alpha == 16
    f = tmp_path / "c.toml"
    f.write_text('preset = "tiny"\n[queries]\nqueries_per_persona = 3\n[persona]\ndomains = ["x"]\n')
    cfg = C.resolve(file=f, overrides={"queries": {"queries_per_persona": 5}})
    assert cfg.queries.queries_per_persona == 5 and cfg.persona.domains == ["x"]


def test_config_forward_compatible_and_typed(tmp_path, caplog):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"future_key": 1, "gate": {"epochs": "7", "new_thing": True}}))
    cfg = C.resolve(file=f)
    assert cfg.gate.epochs == 7
    assert "future_key" in caplog.text and "gate.new_thing" in caplog.text
    f.write_text(json.dumps({"gate": {"epochs": "many"}}))
    with pytest.raises(PrismError, match="gate.epochs"):
        C.resolve(file=f)
    f.write_text("{not json")
    with pytest.raises(PrismError, match="malformed config"):
        C.resolve(file=f)


def test_config_round_trip_is_sorted_and_versioned():
    cfg = C.resolve(overrides={"persona": {"domains": ["a"]}})
    text = C.dump(cfg)
    data = json.loads(text)
    assert data["prism_version"] and list(data) == sorted(data)
    data.pop("prism_version")
    assert from_dict(C.RunConfig, data) == cfg


@pytest.mark.parametrize("domains, msg", [(["a", "a"], "duplicate"), (["a", " "], "empty")])
def test_bad_domains(domains, msg):
    with pytest.raises(PrismError, match=msg):
        C.resolve(overrides={"persona": {"domains": domains}})


def test_resolve_model_errors(tmp_path):
    with pytest.raises(PrismError, match="not found"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(PrismError, match="not found"):
        resolve_model("./no/such/dir")
    (tmp_path / "d").mkdir()
    with pytest.raises(PrismError, match="config.json"):
        resolve_model(str(tmp_path / "d"))
    src = resolve_model(None)
    assert src.kind == "embedded" and src.gguf_file.endswith(".gguf")
    assert resolve_model("org/name").kind == "hub"


def test_unknown_hub_model_is_one_line_error():
    from prism_persona.models import load_model

    with pytest.raises(PrismError, match="cannot load model 'no-such-org/no-such-model'"):
        load_model("no-such-org/no-such-model")


def test_persona_placement(tiny_model, tiny_no_system_dir):
    from prism_persona.models import load_tokenizer

    _, tok = tiny_model
    chat = [{"role": "user", "content": "What is 2+2?"}]
    sys_text = render_chat(tok, with_persona(chat, "You are a math tutor.", "system"))
    assert "<|im_start|>system\nYou are a math tutor.<|im_end|>" in sys_text
    assert "helpful assistant" not in sys_text  # the persona replaces the template's default system
    user_text = render_chat(tok, with_persona(chat, "You are a math tutor.", "user"))
    assert "<|im_start|>user\nYou are a math tutor.\n\nWhat is 2+2?" in user_text
    assert chat == [{"role": "user", "content": "What is 2+2?"}]  # input not mutated
    tok2 = load_tokenizer(str(tiny_no_system_dir))
    folded = render_chat(tok2, with_persona(chat, "You are a math tutor.", "system"))
    assert "system" not in folded and "You are a math tutor.\n\nWhat is 2+2?" in folded


def test_a_trailing_assistant_message_is_a_prefill_the_model_continues(tiny_model, tiny_no_system_dir):
    from prism_persona.engines.base import SamplingParams
    from prism_persona.engines.hf import HFEngine
    from prism_persona.models import load_tokenizer

    model, tok = tiny_model
    chat = [{"role": "user", "content": "Describe an expert."}, {"role": "assistant", "content": "You are"}]
    text = render_chat(tok, chat)
    assert text.endswith("<|im_start|>assistant\nYou are")  # no end-of-turn after the prefill
    assert render_chat(tok, chat[:1]).endswith("<|im_start|>assistant\n")
    tok2 = load_tokenizer(str(tiny_no_system_dir))
    assert render_chat(tok2, chat).endswith("You are")
    assert HFEngine.supports_prefill
    eng = HFEngine(model, tok, quiet=True)
    prefilled, plain = eng.generate(
        [chat, chat[:1] + [{"role": "assistant", "content": "You are a"}]], SamplingParams(max_new_tokens=4)
    )
    assert prefilled.num_tokens > 0 and plain.num_tokens > 0


def test_store_resume_after_torn_write(tmp_path):
    s = JsonlStore(tmp_path / "x.jsonl")
    s.extend([{"key": "a", "v": 1}, {"key": "b", "v": 2}, {"key": "a", "v": 3}])
    assert [r["v"] for r in s] == [1, 2]
    with open(tmp_path / "x.jsonl", "a") as fh:
        fh.write('{"key": "c", "v"')  # killed mid-write
    s2 = JsonlStore(tmp_path / "x.jsonl")
    assert len(s2) == 2 and "c" not in s2
    s2.append({"key": "c", "v": 4})
    lines = (tmp_path / "x.jsonl").read_text().splitlines()
    assert [json.loads(x)["key"] for x in lines] == ["a", "b", "c"]


def test_store_corrupt_middle_line_is_clear_error(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"key": "a"}\ngarbage\n{"key": "b"}\n')
    with pytest.raises(PrismError, match="line 2"):
        JsonlStore(p)


def test_run_dir_refuses_changed_settings(tmp_path):
    run = RunDir(tmp_path / "run")
    run.store("answers", {"temperature": 0.7}).append({"key": content_key("q"), "x": 1})
    assert len(run.store("answers", {"temperature": 0.7})) == 1
    with pytest.raises(ConfigMismatchError, match="temperature: 0.7 -> 0.2"):
        run.store("answers", {"temperature": 0.2})


def test_run_dir_unwritable(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(PrismError, match="cannot write"):
        RunDir(f / "sub")


def test_hf_engine_batches_match_single_rows(tiny_model):
    from prism_persona.engines import SamplingParams
    from prism_persona.engines.hf import HFEngine

    model, tok = tiny_model
    chats = [[{"role": "user", "content": q}] for q in ("hi", "a longer question here", "mid one")]
    greedy = SamplingParams(max_new_tokens=8)
    batched = HFEngine(model, tok, batch_size=3).generate(chats, greedy)
    single = [HFEngine(model, tok, batch_size=1).generate([c], greedy)[0] for c in chats]
    assert [c.text for c in batched] == [c.text for c in single]
    assert all(c.num_tokens <= 8 for c in batched)
    scores = HFEngine(model, tok).score_choices(chats, ["A", "B"])
    assert len(scores) == 3 and all(set(s) == {"A", "B"} and s["A"] < 0 for s in scores)


def test_seeded_sampling_is_reproducible(tiny_model):
    from prism_persona.engines import SamplingParams
    from prism_persona.engines.hf import HFEngine

    model, tok = tiny_model
    chats = [[{"role": "user", "content": "tell me"}]] * 2
    p = SamplingParams(max_new_tokens=6, temperature=1.0, seed=3)
    e = HFEngine(model, tok, batch_size=2)
    assert [c.text for c in e.generate(chats, p)] == [c.text for c in e.generate(chats, p)]


@pytest.mark.subprocess
def test_cli_help_is_fast_and_light():
    code = "import sys, prism_persona.cli as c; c.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.subprocess
def test_cli_user_errors_are_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "prism_persona.cli", "config", "--show", "--config", str(tmp_path / "nope.json")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "config file not found" in out.stderr
    assert "Traceback" not in out.stderr
