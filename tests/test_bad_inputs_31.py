"""Issue 31: nothing lost (a failed command leaves the run byte-identical), nothing outside (a run never
writes through a link that leaves it), no silent non-finite model, every input bounded where it enters."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from prism_persona import cli
from prism_persona.testing import one_error_line, small_run_overrides

DOMAINS = ["writing", "coding"]


@pytest.fixture(autouse=True)
def _log_to_this_tests_stderr():
    cli.setup_logging(quiet=True)  # an earlier test's cli.main bound logging to its own (closed) stderr


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    """A whole finished run (bootstrap, gate, distill, artifact) of the scripted engine; copy before use."""
    import prism_persona.engines as E
    from prism_persona import config as C
    from prism_persona.testing import BootstrapEngine
    from prism_persona.train.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("finished31") / "run"
    real = E.make_engine
    E.make_engine = lambda cfg, model=None, tokenizer=None: BootstrapEngine()
    try:
        run_pipeline(C.resolve("tiny", overrides=small_run_overrides(tiny_model_dir, out, DOMAINS)))
    finally:
        E.make_engine = real
    assert (out / "prism" / "prism_config.json").is_file()
    return out


def copy_run(finished_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out, symlinks=True)
    saved = json.loads((out / "config.json").read_text())
    saved["out"] = str(out)
    (out / "config.json").write_text(json.dumps(saved, indent=2))
    return out


def tree_hash(root: Path) -> dict[str, str]:
    """Every file, directory and link under ``root`` with a hash of its bytes (or its link target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def error_line(capsys) -> str:
    """The one error line of a command that may also log warnings (the tiny run's gate warns); no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if ": error: " in x]
    assert len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------------------------------
# 1. a command validates everything before it deletes anything; a failed --redo is rolled back


def garble_verdicts(run: Path) -> None:
    lines = (run / "verdicts.jsonl").read_text().splitlines(keepends=True)
    (run / "verdicts.jsonl").write_text(lines[0] + "{not json\n" + "".join(lines[1:]))


REDO_CASES = {
    "run_redo_verdicts_unknown_judge": (None, ["run", "--out", "{R}", "--redo", "verdicts", "--judge", "nosuch:judge"]),
    "run_redo_answers_unknown_judge": (None, ["run", "--out", "{R}", "--redo", "answers", "--judge", "nosuch:judge"]),
    "bootstrap_redo_verdicts_unknown_judge": (
        None,
        ["bootstrap", "--out", "{R}", "--redo", "verdicts", "--judge", "nosuch_mod_31:judge"],
    ),
    "gate_redo_garbled_verdicts": (garble_verdicts, ["gate", "--run", "{R}", "--redo"]),
    "distill_redo_garbled_verdicts": (garble_verdicts, ["distill", "--run", "{R}", "--redo"]),
    "run_redo_gate_garbled_verdicts": (garble_verdicts, ["run", "--out", "{R}", "--redo", "gate"]),
    "distill_redo_no_such_module": (
        None,
        ["distill", "--run", "{R}", "--redo", "--set", 'distill.target_modules=["nonexistent"]'],
    ),
    "run_redo_distill_no_such_module": (
        None,
        ["run", "--out", "{R}", "--redo", "distill", "--set", 'distill.target_modules=["nonexistent"]'],
    ),
    "run_redo_gate_no_such_module": (
        None,
        ["run", "--out", "{R}", "--redo", "gate", "--set", 'distill.target_modules=["nonexistent"]'],
    ),
}


def empty_verdicts(run: Path) -> None:
    (run / "verdicts.jsonl").write_text("")


def blank_verdicts(run: Path) -> None:
    (run / "verdicts.jsonl").write_text("\n\n")


for _name, _prep in (("empty", empty_verdicts), ("blank", blank_verdicts)):
    REDO_CASES[f"gate_redo_{_name}_verdicts"] = (_prep, ["gate", "--run", "{R}", "--redo"])
    REDO_CASES[f"distill_redo_{_name}_verdicts"] = (_prep, ["distill", "--run", "{R}", "--redo"])
    REDO_CASES[f"run_redo_gate_{_name}_verdicts"] = (_prep, ["run", "--out", "{R}", "--redo", "gate"])


@pytest.mark.parametrize("case", sorted(REDO_CASES))
def test_1_a_failed_redo_leaves_the_run_byte_identical(case, finished_run, tmp_path, scripted, capsys):
    prepare, argv = REDO_CASES[case]
    run = copy_run(finished_run, tmp_path)
    if prepare:
        prepare(run)
    before = tree_hash(run)
    rc = cli.main([a.format(R=run) for a in argv] + ["-q"])
    line = one_error_line(capsys)
    assert rc == 2, line
    after = tree_hash(run)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert changed == [], changed


def test_1_a_redo_that_fails_half_way_is_rolled_back(finished_run, tmp_path, scripted, monkeypatch, capsys):
    """The judge passes every check, then fails on the 3rd pair: the new verdicts, the removed gate,
    adapter and artifact, config.json - all as they were."""
    import prism_persona.testing as T
    from prism_persona.errors import PrismError

    run = copy_run(finished_run, tmp_path)
    before = tree_hash(run)
    calls = {"n": 0}
    real = T.BootstrapEngine.generate

    def fails_later(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 2:
            raise PrismError("the judge server went away")
        return real(self, *a, **k)

    monkeypatch.setattr(T.BootstrapEngine, "generate", fails_later)
    rc = cli.main(["run", "--out", str(run), "--redo", "answers", "-q"])
    assert rc == 2 and "went away" in one_error_line(capsys)
    assert calls["n"] > 2  # it got past the checks and did work
    assert tree_hash(run) == before


def test_1_an_interrupted_redo_is_carried_on_by_the_next_command(finished_run, tmp_path, scripted, monkeypatch):
    import prism_persona.train.gate as G
    from prism_persona.store import SWAP_DIR

    run = copy_run(finished_run, tmp_path)
    old_gate = (run / "gate" / "gate.safetensors").read_bytes()
    real = G.run_gate

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(G, "run_gate", interrupted)
    assert cli.main(["gate", "--run", str(run), "--redo", "--set", "gate.epochs=3", "-q"]) == 130
    assert (run / SWAP_DIR / "gate" / "gate.safetensors").read_bytes() == old_gate  # kept aside
    assert not (run / "gate").exists() and not (run / "prism").exists()
    monkeypatch.setattr(G, "run_gate", real)
    assert cli.main(["gate", "--run", str(run), "--set", "gate.epochs=3", "-q"]) == 0
    assert not (run / SWAP_DIR).exists()
    assert json.loads((run / "gate.meta.json").read_text())["settings"]["gate"]["epochs"] == 3
    assert (run / "prism" / "gate_config.json").is_file()


# --------------------------------------------------------------------------------------------------
# 2. no silent broken model: training stops at the first non-finite loss or weight, bounds refuse the
#    settings that can only overflow, the artifact reader checks every tensor and every scale

RUN_ARGS = ["run", "--domains", "writing,coding", "--preset", "tiny", "--out", "{T}/r"]
OVERFLOW_SETTINGS = [
    ("distill.kl_temperature=1e-300", "distill.kl_temperature"),
    ("distill.kl_temperature=0", "distill.kl_temperature"),
    ("distill.kl_temperature=1e300", "distill.kl_temperature"),
    ("distill.lr=1e30", "distill.lr"),
    ("distill.lr=2", "distill.lr"),
    ("gate.lr=1e30", "gate.lr"),
]


@pytest.mark.parametrize("setting, name", OVERFLOW_SETTINGS)
def test_2_settings_that_can_only_overflow_are_one_line(setting, name, tmp_path, no_model_load, capsys):
    rc = cli.main([a.format(T=tmp_path) for a in RUN_ARGS] + ["--set", setting, "-q"])
    line = one_error_line(capsys)
    assert rc == 2 and name in line, line
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def nan_loss(real):
    return lambda *a, **k: real(*a, **k) * float("nan")


def inf_loss(real):
    return lambda *a, **k: real(*a, **k) * float("inf")


def nan_grads(_real):
    def clip(params, max_norm, *a, **k):
        for p in params:
            p.grad.fill_(float("nan"))

    return clip


DIVERGING = {  # (module attribute to break, how, the stage command, what the line names)
    "distill_nan_loss": ("prism_persona.train.distill", "distill_loss", nan_loss, "distill", "distill.lr"),
    "distill_inf_loss": ("prism_persona.train.distill", "distill_loss", inf_loss, "distill", "distill.kl_temperature"),
    "distill_nan_weights": ("torch.nn.utils", "clip_grad_norm_", nan_grads, "distill", "LoRA weights"),
    "gate_nan_loss": ("prism_persona.train.gate", "_weighted_bce", nan_loss, "gate", "gate.lr"),
    "gate_inf_loss": ("prism_persona.train.gate", "_weighted_bce", inf_loss, "gate", "gate.lr"),
}


@pytest.mark.parametrize("case", sorted(DIVERGING))
def test_2_training_stops_at_the_first_non_finite_loss_or_weight(
    case, finished_run, tmp_path, scripted, monkeypatch, capsys
):
    import importlib

    module, attr, breaker, stage, needle = DIVERGING[case]
    mod = importlib.import_module(module)
    monkeypatch.setattr(mod, attr, breaker(getattr(mod, attr)))
    run = copy_run(finished_run, tmp_path)
    saved = json.loads((run / "config.json").read_text())
    saved["distill"]["max_length"] = 512  # room for the answers: distillation takes steps
    (run / "config.json").write_text(json.dumps(saved, indent=2))
    before = tree_hash(run)
    rc = cli.main([stage, "--run", str(run), "--redo", "-q"])
    line = error_line(capsys)
    assert rc == 2 and "diverged" in line and needle in line, line
    assert tree_hash(run) == before  # the trained stage and artifact are back, nothing non-finite saved


def test_2_a_run_whose_redone_gate_diverges_is_rolled_back_whole(finished_run, tmp_path, scripted, monkeypatch, capsys):
    """`prism run --redo gate` rewrites the bootstrap summary on the way; a divergence later restores it too."""
    import prism_persona.train.gate as G

    monkeypatch.setattr(G, "_weighted_bce", nan_loss(G._weighted_bce))
    run = copy_run(finished_run, tmp_path)
    before = tree_hash(run)
    rc = cli.main(["run", "--out", str(run), "--redo", "gate", "--set", "gate.epochs=3", "-q"])
    line = error_line(capsys)
    assert rc == 2 and "gate.lr" in line, line
    assert tree_hash(run) == before


@pytest.fixture(scope="module")
def artifact(tiny_model_dir, tmp_path_factory):
    from prism_persona.testing import make_tiny_artifact

    return make_tiny_artifact(tiny_model_dir, tmp_path_factory.mktemp("art31") / "prism")


def poke_tensor(path: Path, value: float, which: int = 0) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    name = sorted(k for k, v in state.items() if v.is_floating_point())[which]
    state[name] = state[name].clone()
    state[name].view(-1)[0] = value
    save_file(state, str(path))


def reshape_lora(path: Path, which: str, shape) -> None:
    """Replace the first ``lora_A`` / ``lora_B`` tensor by one of ``shape(old_shape)``."""
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    name = sorted(k for k in state if f".{which}." in k)[0]
    state[name] = torch.zeros(shape(list(state[name].shape)))
    save_file(state, str(path))


def edit_adapter_config(art: Path, text_edit) -> None:
    p = art / "adapter" / "adapter_config.json"
    p.write_text(text_edit(p.read_text()))


def set_key(key: str, literal: str):
    def edit(text: str) -> str:
        data = json.loads(text)
        data.pop(key, None)
        body = json.dumps(data)
        return body[:-1] + f', "{key}": {literal}}}'

    return edit


BROKEN_ARTIFACTS = {
    "gate_weight_nan": (lambda a: poke_tensor(a / "gate.safetensors", float("nan")), "gate.safetensors"),
    "gate_weight_inf": (lambda a: poke_tensor(a / "gate.safetensors", float("-inf"), -1), "gate.safetensors"),
    "gate_weight_huge": (lambda a: poke_tensor(a / "gate.safetensors", 1e30), "magnitude"),
    "adapter_weight_nan": (
        lambda a: poke_tensor(a / "adapter" / "adapter_model.safetensors", float("nan")),
        "adapter_model.safetensors",
    ),
    "adapter_weight_huge": (lambda a: poke_tensor(a / "adapter" / "adapter_model.safetensors", 1e30), "magnitude"),
    "adapter_weight_big": (lambda a: poke_tensor(a / "adapter" / "adapter_model.safetensors", -5e4, -1), "magnitude"),
    "adapter_lora_A_wrong_rank": (
        lambda a: reshape_lora(a / "adapter" / "adapter_model.safetensors", "lora_A", lambda s: [s[0] + 1, s[1]]),
        "rank-",
    ),
    "adapter_lora_B_wrong_rank": (
        lambda a: reshape_lora(a / "adapter" / "adapter_model.safetensors", "lora_B", lambda s: [s[0], s[1] * 2]),
        "rank-",
    ),
    "adapter_lora_B_1d": (
        lambda a: reshape_lora(a / "adapter" / "adapter_model.safetensors", "lora_B", lambda s: [s[0] * s[1]]),
        "rank-",
    ),
    "alpha_pattern_1e999": (
        lambda a: edit_adapter_config(a, set_key("alpha_pattern", '{"q_proj": 1e999}')),
        "q_proj",
    ),
    "alpha_pattern_negative": (
        lambda a: edit_adapter_config(a, set_key("alpha_pattern", '{"v_proj": -3}')),
        "v_proj",
    ),
    "alpha_pattern_list": (lambda a: edit_adapter_config(a, set_key("alpha_pattern", "[1, 2]")), "alpha_pattern"),
    "rank_pattern_zero": (lambda a: edit_adapter_config(a, set_key("rank_pattern", '{"q_proj": 0}')), "q_proj"),
    "lora_alpha_1e999": (lambda a: edit_adapter_config(a, set_key("lora_alpha", "1e999")), "lora_alpha"),
    "lora_alpha_huge": (lambda a: edit_adapter_config(a, set_key("lora_alpha", "1e12")), "lora_alpha"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_ARTIFACTS))
def test_2_the_artifact_reader_checks_every_tensor_and_scale(case, artifact, tmp_path, no_model_load, capsys):
    art = tmp_path / "prism"
    shutil.copytree(artifact, art)
    breaker, needle = BROKEN_ARTIFACTS[case]
    breaker(art)
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "hello"}) + "\n")
    argv = ["generate", "--prism", str(art), "--input", str(tmp_path / "p.jsonl"), "--output", str(tmp_path / "o")]
    rc = cli.main(argv + ["-q"])
    line = one_error_line(capsys)
    assert rc == 2 and needle in line, line


@pytest.mark.parametrize("flag", ["--out", "--run"])
@pytest.mark.parametrize("value", ["", "   "])
def test_2_an_empty_run_directory_is_refused(flag, value, tmp_path, monkeypatch, no_model_load, capsys):
    monkeypatch.chdir(tmp_path)
    if flag == "--out":
        argv = ["run", "--domains", "writing", "--preset", "tiny", "--out", value]
    else:
        argv = ["gate", "--run", value]
    rc = cli.main(argv + ["-q"])
    line = one_error_line(capsys)
    assert rc == 2 and ("empty" in line or "config.json" in line), line
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# 3. a run directory stays inside itself: nothing is written or deleted through a link that leaves it


def link_out(run: Path, name: str, outside: Path) -> Path:
    """Move ``RUN/name`` outside and leave a link to it in its place (what a received tarball keeps)."""
    src = run / name
    dst = outside / name.replace("/", "_")
    shutil.move(str(src), str(dst))
    os.symlink(dst, src)
    return dst


def heldout(tmp_path: Path) -> Path:
    p = tmp_path / "heldout.jsonl"
    p.write_text("".join(json.dumps({"domain": d, "query": f"a held-out {d} question?"}) + "\n" for d in DOMAINS))
    return p


LINK_CASES = {  # name linked out of the run, the command
    "verdicts_bootstrap": ("verdicts.jsonl", ["bootstrap", "--out", "{R}"]),
    "verdicts_redo": ("verdicts.jsonl", ["bootstrap", "--out", "{R}", "--redo", "verdicts"]),
    "answers_run": ("answers.jsonl", ["run", "--out", "{R}"]),
    "config_run": ("config.json", ["run", "--out", "{R}", "--redo", "gate"]),
    "lock_file": (".prism.lock", ["run", "--out", "{R}"]),
    "gate_dir": ("gate", ["gate", "--run", "{R}", "--redo"]),
    "gate_weights": ("gate/gate.safetensors", ["gate", "--run", "{R}", "--redo"]),
    "distill_dir": ("distill", ["distill", "--run", "{R}", "--redo"]),
    "distill_loss_curve": ("distill/loss.jsonl", ["distill", "--run", "{R}", "--redo"]),
    "prism_dir": ("prism", ["run", "--out", "{R}", "--redo", "gate"]),
    "prism_config": ("prism/prism_config.json", ["run", "--out", "{R}", "--redo", "distill"]),
    "check_dir_run": ("check", ["run", "--out", "{R}", "--heldout", "{H}"]),
    "check_answers_run": ("check/answers.jsonl", ["run", "--out", "{R}", "--heldout", "{H}"]),
    "check_answers_check": (
        "check/answers.jsonl",
        ["check", "--prism", "{R}/prism", "--queries", "{H}", "--judge", "self"],
    ),
    "check_dir_check": ("check", ["check", "--prism", "{R}/prism", "--queries", "{H}", "--judge", "self"]),
}


@pytest.fixture(scope="module")
def checked_run(finished_run, tmp_path_factory, tiny_model_dir):
    """The finished run with its held-out check done (RUN/check/answers.jsonl exists)."""
    import prism_persona.engines as E
    from prism_persona import config as C
    from prism_persona.testing import BootstrapEngine
    from prism_persona.train.pipeline import run_pipeline

    base = tmp_path_factory.mktemp("checked31")
    out = base / "run"
    shutil.copytree(finished_run, out)
    over = small_run_overrides(tiny_model_dir, out, DOMAINS)
    over["check"] = {"queries": str(heldout(base)), "max_new_tokens": 4}
    real = E.make_engine
    E.make_engine = lambda cfg, model=None, tokenizer=None: BootstrapEngine()
    try:
        run_pipeline(C.resolve("tiny", overrides=over))
    finally:
        E.make_engine = real
    assert (out / "check" / "answers.jsonl").is_file()
    return out


@pytest.mark.parametrize("case", sorted(LINK_CASES))
def test_3_nothing_is_written_through_a_link_that_leaves_the_run(case, checked_run, tmp_path, scripted, capsys):
    name, argv = LINK_CASES[case]
    run = copy_run(checked_run, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    target = link_out(run, name, outside)
    before, before_out = tree_hash(run), tree_hash(outside)
    h = heldout(tmp_path)
    rc = cli.main([a.format(R=run, H=h) for a in argv] + ["-q"])
    line = error_line(capsys)
    assert rc == 2 and str(run / name) in line and "link" in line, line
    assert tree_hash(outside) == before_out, f"{target} was written through the link"
    assert tree_hash(run) == before


def test_3_a_link_that_stays_inside_the_run_is_fine(finished_run, tmp_path, scripted, capsys):
    run = copy_run(finished_run, tmp_path)
    os.symlink(run / "summary.md", run / "summary-link.md")
    (run / "prism" / "readme-link").symlink_to("../summary.md")
    os.symlink(tmp_path, run / "my-data")  # a folder of yours linked in: PRISM writes no such name
    assert cli.main(["run", "--out", str(run), "-q"]) == 0


# --------------------------------------------------------------------------------------------------
# 4. every input bounded where it enters: one length rule (config.MAX_TEXT_CHARS) for every text that
#    reaches a model, a size check on model configs before weights load, eval judgments capped

BIG = 2_000_000


def _prompt_rows(kind: str) -> list[dict]:
    from prism_persona.config import MAX_TEXT_CHARS

    just_over = "w" * (MAX_TEXT_CHARS + 1)
    return {
        "prompt_2mb": [{"prompt": "hi"}, {"prompt": "x" * BIG}],
        "prompt_just_over": [{"prompt": just_over}],
        "message_2mb": [{"messages": [{"role": "user", "content": "y" * BIG}]}],
        "messages_sum_over": [
            {"messages": [{"role": "system", "content": "s" * 30_000}, {"role": "user", "content": "u" * 30_000}]}
        ],
    }[kind]


@pytest.mark.parametrize("kind", ["prompt_2mb", "prompt_just_over", "message_2mb", "messages_sum_over"])
def test_4_a_generate_prompt_is_bounded_before_any_model_loads(kind, artifact, tmp_path, no_model_load, capsys):
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in _prompt_rows(kind)))
    rc = cli.main(["generate", "--prism", str(artifact), "--input", str(p), "--output", str(tmp_path / "o"), "-q"])
    line = one_error_line(capsys)
    assert rc == 2 and "characters" in line and str(p) in line, line


def test_4_a_generate_prompt_at_the_limit_is_read(tmp_path):
    from prism_persona.config import MAX_TEXT_CHARS
    from prism_persona.serve.offline import read_prompts

    p = tmp_path / "prompts.jsonl"
    p.write_text(json.dumps({"prompt": "z" * MAX_TEXT_CHARS}) + "\n")
    assert len(read_prompts(str(p))[0][1][0]["content"]) == MAX_TEXT_CHARS


@pytest.mark.parametrize("size", [1_000_000, 40_001])
def test_4_a_chat_line_is_bounded(size, artifact, monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n" + "q" * size + "\nbye\n"))
    calls = []

    import prism_persona.commands.chat as chat

    def reply(messages, force):
        calls.append(messages[-1]["content"])
        from prism_persona.engines.base import Completion

        return Completion(text="ok", meta={})

    with pytest.raises(Exception) as info:
        chat.converse("", None, reply)
    assert "characters" in str(info.value) and "\n" not in str(info.value)
    assert calls == ["hello"]  # the long line never reached the model


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "json_strings"])
def test_4_an_eval_set_item_is_bounded_when_read(fmt, tmp_path):
    from prism_persona.errors import PrismError
    from prism_persona.evals.sources import read_records

    long = "harm " * (20_000 if fmt == "csv" else 40_000)  # 100,000 (the csv module's own limit is 131,072) / 200,000
    rows = [{"prompt": "a short one?"}, {"prompt": long}]
    if fmt == "jsonl":
        p = tmp_path / "set.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        p = tmp_path / "set.json"
        p.write_text(json.dumps(rows))
    elif fmt == "json_strings":
        p = tmp_path / "set.json"
        p.write_text(json.dumps([r["prompt"] for r in rows]))
    else:
        p = tmp_path / "set.csv"
        p.write_text("prompt\n" + "\n".join(r["prompt"] for r in rows) + "\n")
    with pytest.raises(PrismError, match="characters") as info:
        read_records(p, "refusal set")
    assert str(p) in str(info.value) and "\n" not in str(info.value)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    from transformers import AutoModelForSequenceClassification, BertConfig

    from prism_persona.testing import make_tokenizer

    path = tmp_path_factory.mktemp("clf31")
    tok = make_tokenizer()
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=64,
        id2label={0: "NORMAL", 1: "REJECTION"},
        label2id={"NORMAL": 0, "REJECTION": 1},
    )
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "key, value",
    [
        ("num_hidden_layers", 1_000_000),
        ("num_hidden_layers", 2_000),
        ("num_hidden_layers", "12"),
        ("hidden_size", -8),
        ("vocab_size", 10**10),
        ("intermediate_size", 10**8),
        ("id2label", [0, 1]),
    ],
)
def test_4_a_model_config_is_size_checked_before_weights_load(key, value, classifier_dir, tmp_path):
    from prism_persona.errors import PrismError
    from prism_persona.judges.hf_classifier import HFClassifierRefusal

    clf = tmp_path / "clf"
    shutil.copytree(classifier_dir, clf)
    conf = json.loads((clf / "config.json").read_text())
    conf[key] = value
    (clf / "config.json").write_text(json.dumps(conf))
    with pytest.raises(PrismError) as info:
        HFClassifierRefusal(str(clf), device="cpu")
    assert key in str(info.value) and "\n" not in str(info.value)


def test_4_eval_judgments_are_capped(tmp_path):
    from types import SimpleNamespace

    from prism_persona.evals.runner import MAX_JUDGMENT_CHARS, EvalRunner
    from prism_persona.store import JsonlStore

    fake = SimpleNamespace(judgments=JsonlStore(tmp_path / "judgments.jsonl"), count=SimpleNamespace(judged=0))
    huge = "Rating: [[7]] " + "blah " * 2_000_000  # a 10 MB answer from a judge served over HTTP
    jobs = [(f"k{i}", i, {"bench": "mtbench"}) for i in range(4)]
    out = EvalRunner.judged(fake, "single", jobs, lambda chunk: [{"score": 7.0, "text": huge} for _ in chunk])
    assert all(r["score"] == 7.0 and len(r["text"]) <= MAX_JUDGMENT_CHARS + 10 for r in out.values())
    assert (tmp_path / "judgments.jsonl").stat().st_size < 4 * (MAX_JUDGMENT_CHARS + 200)


# --------------------------------------------------------------------------------------------------
# 5. one line, never a traceback

GEN = ["generate", "--prism", "{ART}", "--input", "{P}", "--output", "{T}/o.jsonl"]
CHECK = ["check", "--prism", "{ART}", "--queries", "{P}", "--judge", "self"]
ONE_LINE_31 = [
    (RUN_ARGS + ["--set", "gate.hidden_sizes=[10000000000]"], "gate.hidden_sizes"),
    (RUN_ARGS + ["--set", "gate.hidden_sizes=[64, 1000000]"], "gate.hidden_sizes"),
    (RUN_ARGS + ["--answer-tokens", "1000000000000"], "--answer-tokens"),
    (RUN_ARGS + ["--set", "persona.max_new_tokens=10000000"], "persona.max_new_tokens"),
    (RUN_ARGS + ["--set", "judge.max_new_tokens=10000000"], "judge.max_new_tokens"),
    (RUN_ARGS + ["--set", "queries.max_new_tokens=10000000"], "queries.max_new_tokens"),
    (GEN + ["--max-new-tokens", "1000000000000"], "--max-new-tokens"),
    (GEN + ["--seed", str(2**70)], "--seed"),
    (CHECK + ["--max-new-tokens", "100000000"], "--max-new-tokens"),
]


@pytest.mark.parametrize("argv, name", ONE_LINE_31, ids=[" ".join(a[-2:])[:50] for a, _ in ONE_LINE_31])
def test_5_huge_numbers_are_one_line_before_any_model_loads(argv, name, artifact, tmp_path, no_model_load, capsys):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "hello", "domain": "writing", "query": "a question?"}) + "\n")
    rc = cli.main([a.format(T=tmp_path, ART=artifact, P=p) for a in argv] + ["-q"])
    line = one_error_line(capsys)
    assert rc == 2 and name in line, line


@pytest.mark.parametrize("kind", ["nested", "one_megabyte", "one_megabyte_length"])
def test_5_a_persona_json_is_one_line(kind, tmp_path):
    from prism_persona.errors import PrismError
    from prism_persona.evals.systems import load_persona_file

    p = tmp_path / "personas.json"
    if kind == "nested":
        p.write_text('{"writing": ' + "[" * 100_000 + "]" * 100_000 + "}")
    elif kind == "one_megabyte":
        p.write_text(json.dumps({"writing": "You are a writer. " * 60_000}))
    else:
        p.write_text(json.dumps({"writing": {"short": "ok", "long": "x" * 1_000_000}}))
    with pytest.raises(PrismError) as info:
        load_persona_file(p)
    assert str(p) in str(info.value) and "\n" not in str(info.value)


def test_5_a_classifier_config_with_more_labels_than_its_weights_is_one_line(classifier_dir, tmp_path):
    from prism_persona.errors import PrismError
    from prism_persona.judges.hf_classifier import HFClassifierRefusal

    clf = tmp_path / "clf"
    shutil.copytree(classifier_dir, clf)
    conf = json.loads((clf / "config.json").read_text())
    conf["id2label"] = {"0": "NORMAL", "1": "REJECTION", "2": "OTHER"}
    conf["label2id"] = {"NORMAL": 0, "REJECTION": 1, "OTHER": 2}
    (clf / "config.json").write_text(json.dumps(conf))
    with pytest.raises(PrismError) as info:
        HFClassifierRefusal(str(clf), device="cpu")
    assert "cannot load the classifier" in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------------
# 6. `prism gate` / `prism distill` continue a run made with files outside it (the flags they are told to pass exist)


@pytest.mark.parametrize("stage", ["gate", "distill"])
@pytest.mark.parametrize("key, flag", [("queries.queries_file", "--queries-file"), ("check.queries", "--heldout")])
def test_6_a_stage_command_takes_the_files_a_run_was_made_with(
    stage, key, flag, finished_run, tmp_path, scripted, capsys
):
    run = copy_run(finished_run, tmp_path)
    outside = heldout(tmp_path)  # a file of this machine, outside the run
    saved = json.loads((run / "config.json").read_text())
    section, leaf = key.split(".")
    saved[section][leaf] = str(outside)
    (run / "config.json").write_text(json.dumps(saved, indent=2))
    rc = cli.main([stage, "--run", str(run), "-q"])
    line = one_error_line(capsys)
    assert rc == 2 and flag in line, line
    before = tree_hash(run)
    assert cli.main([stage, "--run", str(run), flag, str(outside), "-q"]) == 0  # resumes: the stage is done
    after = tree_hash(run)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert changed == ["training_report.json", "training_report.md"], changed  # the report is rewritten each time


@pytest.mark.parametrize("key, value", [("num_hidden_layers", 1_000_000), ("hidden_size", 10**9), ("vocab_size", -1)])
def test_4_a_causal_lm_config_is_size_checked_before_weights_load(key, value, tiny_model_dir, tmp_path, monkeypatch):
    import transformers

    from prism_persona.errors import PrismError
    from prism_persona.models import load_model

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    conf = json.loads((model / "config.json").read_text())
    conf[key] = value
    (model / "config.json").write_text(json.dumps(conf))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(PrismError) as info:
        load_model(str(model), device="cpu")
    assert key in str(info.value) and "\n" not in str(info.value)


def test_4_the_size_check_passes_the_embedded_and_tiny_models(tiny_model_dir):
    from prism_persona.models import check_config_size, resolve_model

    check_config_size(str(tiny_model_dir), "tiny")
    check_config_size(resolve_model(None).path_or_id, "embedded")


def test_1_a_second_redo_over_an_interrupted_one_starts_clean_and_a_failure_restores_the_first_state(
    finished_run, tmp_path, scripted, monkeypatch, capsys
):
    import prism_persona.train.gate as G
    from prism_persona.store import SWAP_DIR

    run = copy_run(finished_run, tmp_path)
    before = tree_hash(run)
    real = G.run_gate

    def interrupted_after_writing(run_dir, cfg, *a, **k):
        run_dir.check_settings("gate", G.gate_settings(cfg))  # what a real stage writes first
        (run / "gate").mkdir(exist_ok=True)
        (run / "gate" / "partial").write_text("half a gate")
        raise KeyboardInterrupt

    monkeypatch.setattr(G, "run_gate", interrupted_after_writing)
    assert cli.main(["gate", "--run", str(run), "--redo", "--set", "gate.epochs=3", "-q"]) == 130
    assert (run / "gate" / "partial").exists() and (run / SWAP_DIR).is_dir()
    # a second redo with other settings: the half-written attempt goes, the first settings are not in the way
    monkeypatch.setattr(G, "run_gate", lambda *a, **k: (_ for _ in ()).throw(ValueError("boom")))
    capsys.readouterr()
    from prism_persona.train.pipeline import run_config, train_stages

    with pytest.raises(ValueError):
        train_stages(run_config(run, {"gate": {"epochs": 4}}), stages=("gate",), redo_stage="gate")
    assert tree_hash(run) == before  # failed: back to the run before the FIRST redo
    monkeypatch.setattr(G, "run_gate", interrupted_after_writing)
    assert cli.main(["gate", "--run", str(run), "--redo", "--set", "gate.epochs=3", "-q"]) == 130
    monkeypatch.setattr(G, "run_gate", real)
    assert cli.main(["gate", "--run", str(run), "--redo", "--set", "gate.epochs=5", "-q"]) == 0
    assert not (run / "gate" / "partial").exists() and not (run / SWAP_DIR).exists()
    assert json.loads((run / "gate.meta.json").read_text())["settings"]["gate"]["epochs"] == 5


@pytest.mark.parametrize("value", ["abc", "0", "-3", "1e9", "1.5"])
def test_5_a_prism_lm_eval_batch_size_is_one_line_before_any_model_loads(value, artifact, no_model_load):
    pytest.importorskip("lm_eval")
    from prism_persona.errors import PrismError
    from prism_persona.evals.lmeval import PrismLM

    with pytest.raises(PrismError, match="batch_size") as info:
        PrismLM(artifact=str(artifact), system="prism", device="cpu", batch_size=value)
    assert "\n" not in str(info.value)


def test_4_a_chat_system_message_is_bounded_before_any_model_loads(artifact, no_model_load, capsys):
    rc = cli.main(["chat", "--prism", str(artifact), "--system", "s" * 50_000, "-q"])
    line = one_error_line(capsys)
    assert rc == 2 and "--system" in line and "characters" in line, line
