"""LoRA self-distillation: alignment, a persona-conditioned teacher, PEFT compatibility, resuming."""

from __future__ import annotations

import json

import pytest
import torch

from prism_persona import config as C
from prism_persona.models import load_model
from prism_persona.store import RunDir
from prism_persona.train.distill import (
    build_example,
    build_examples,
    collate,
    distill_loss,
    lr_at,
    response_logits,
    run_distill,
    topk_kl,
)

PERSONA = "You are a meticulous senior poet who always answers in rhyming couplets about the sea."


def records(n=6):
    out = []
    for i in range(n):
        out.append(
            {
                "key": f"k{i}",
                "domain": "writing",
                "query": f"Write line {i} about the moon, please.",
                "persona": PERSONA,
                "placement": "system",
                "base_answer": "ok",
                "persona_answer": f"The moon at {i} is bright and wide, it pulls the sea on every side.",
                "label": 1 if i % 3 else 0,
            }
        )
    return out


def _cfg(tmp_path, **distill):
    d = {
        "r": 4,
        "alpha": 8,
        "epochs": 2,
        "batch_size": 2,
        "lr": 5e-3,
        "max_length": 256,
        "top_k": 16,
        "warmup_ratio": 0.0,
        "loss": "kl",
        "min_steps": 0,
    }
    d.update(distill)
    return C.resolve(
        "tiny", overrides={"out": str(tmp_path / "run"), "persona": {"domains": ["writing"]}, "distill": d}
    )


def interrupt_distill_at(monkeypatch, call: int):
    """Make the ``call``-th distillation loss computation raise KeyboardInterrupt (a kill mid-run);
    returns the real loss function, to put back for the resumed run."""
    import prism_persona.train.distill as D

    real, calls = D.distill_loss, {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(D, "distill_loss", interrupted)
    return real


@pytest.fixture
def fresh(tiny_model_dir):
    return load_model(str(tiny_model_dir), dtype="float32", device="cpu")


def test_response_tokens_align_between_teacher_and_student(tiny_model):
    _, tok = tiny_model
    ex = build_example(tok, "Write a poem.", "Waves and foam.", PERSONA, "system", 1024)
    assert ex.t_start > ex.s_start  # the persona makes the teacher prompt longer
    resp = ex.teacher[ex.t_start :]
    assert resp == ex.student[ex.s_start :] and len(resp) == ex.n
    assert tok.decode(resp[:-1]) == "Waves and foam." and resp[-1] == tok.eos_token_id
    assert PERSONA in tok.decode(ex.teacher[: ex.t_start]) and PERSONA not in tok.decode(ex.student)
    exs = [ex, build_example(tok, "Hi there, how are you?", "Fine, thank you kindly.", PERSONA, "user", 1024)]
    for side in ("teacher", "student"):
        b = collate(exs, side, tok.pad_token_id, "cpu")
        # the logit at (row, col) predicts the token at col + 1, which is the response token
        assert torch.equal(b["input_ids"][b["rows"], b["cols"] + 1], b["targets"])
    assert torch.equal(collate(exs, "teacher", 0, "cpu")["targets"], collate(exs, "student", 0, "cpu")["targets"])


def test_answers_cut_at_the_token_budget_get_no_end_of_turn(tiny_model):
    _, tok = tiny_model
    recs = [
        {
            "key": "a",
            "query": "Write a poem.",
            "persona_answer": "Waves and",
            "persona": PERSONA,
            "label": 1,
            "persona_finish": "length",
        },
        {
            "key": "b",
            "query": "Write a poem.",
            "persona_answer": "Waves and foam.",
            "persona": PERSONA,
            "label": 1,
            "persona_finish": "stop",
        },
    ]
    cut, full = build_examples(tok, recs, 1024)
    assert tok.eos_token_id not in cut.student[cut.s_start :]
    assert tok.decode(cut.student[cut.s_start :]) == "Waves and"
    assert full.student[-1] == tok.eos_token_id


def test_truncation_keeps_prompts_and_cuts_the_answer(tiny_model):
    _, tok = tiny_model
    ex = build_example(tok, "q" * 20, "a" * 500, PERSONA, "system", 200)
    assert len(ex.teacher) == 200 and len(ex.student) < 200
    assert ex.teacher[ex.t_start :] == ex.student[ex.s_start :]
    assert build_example(tok, "q" * 300, "a", PERSONA, "system", 100) is None


def test_response_logits_match_full_forward_with_padding(tiny_model):
    model, tok = tiny_model
    exs = build_examples(tok, records(), 256)
    b = collate(exs, "student", tok.pad_token_id, "cpu")
    with torch.no_grad():
        got = response_logits(model, b)
        full = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        alone = response_logits(model, collate(exs[:1], "student", tok.pad_token_id, "cpu"))
    torch.testing.assert_close(got, full[b["rows"], b["cols"]], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[: alone.shape[0]], alone, rtol=1e-4, atol=1e-4)


def test_topk_kl_properties():
    torch.manual_seed(0)
    t = torch.randn(5, 50)
    assert float(topk_kl(t, t.clone(), 8)) == pytest.approx(0.0, abs=1e-6)
    assert float(topk_kl(t, torch.randn(5, 50), 8)) > 0.05
    assert float(topk_kl(t, t + 3.0, 8)) == pytest.approx(0.0, abs=1e-5)  # shift invariant


def test_step0_loss_nonzero_only_with_persona_conditioned_teacher(fresh, tmp_path):
    """The reference bug (teacher without persona) gives KL ~ 0 at step 0; ours does not."""
    from prism_persona.train.distill import attach_lora

    model, tok = fresh
    cfg = _cfg(tmp_path)
    pm = attach_lora(model, cfg.distill)
    pm.eval()
    good = build_examples(tok, records(), 256, teacher_persona=True)
    buggy = build_examples(tok, records(), 256, teacher_persona=False)
    with torch.no_grad():
        kl = float(distill_loss(pm, good, cfg.distill, tok.pad_token_id))
        kl_bug = float(distill_loss(pm, buggy, cfg.distill, tok.pad_token_id))
    assert kl > 0.01, kl  # ~0.02 on this random tiny model; > 0.05 on SmolLM2 (slow test in test_gated.py)
    assert kl_bug < 1e-5, kl_bug
    assert kl > 1000 * max(kl_bug, 1e-9)


def test_lr_schedule():
    assert lr_at(0, 10, 2, 1.0) == pytest.approx(0.5)
    assert lr_at(2, 10, 2, 1.0) == pytest.approx(1.0)
    assert lr_at(9, 10, 0, 1.0) == pytest.approx(0.1)


def test_run_distill_trains_saves_peft_adapter_and_resumes(fresh, tiny_model_dir, tmp_path, monkeypatch):
    from peft import PeftModel

    import prism_persona.train.distill as D

    model, tok = fresh
    cfg = _cfg(tmp_path, epochs=3, micro_tokens=0)  # one loss call per step
    run = RunDir(cfg.out)
    recs = records(9)  # 6 positives -> 3 steps per epoch

    # interrupt during epoch 2: the epoch-1 checkpoint must survive
    real = interrupt_distill_at(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        run_distill(run, cfg, recs, model, tok)
    state = json.loads((run.path("distill") / "checkpoint" / "trainer_state.json").read_text())
    assert (state["epoch"], state["step"]) == (1, 3)
    assert (run.path("distill") / "checkpoint" / "optimizer.pt").is_file()
    monkeypatch.setattr(D, "distill_loss", real)

    model2, tok2 = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    info = run_distill(run, cfg, recs, model2, tok2)
    assert info["steps"] == 9 and info["examples"] == 6
    curve = [json.loads(x) for x in (run.path("distill") / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == list(range(1, 10))  # the torn epoch was dropped and redone
    assert curve[-1]["loss"] < curve[0]["loss"]
    assert (run.path("distill") / "loss.png").stat().st_size > 1000
    assert run.done("distill")

    # a finished stage is not redone
    monkeypatch.setattr(D, "distill_loss", lambda *a, **k: pytest.fail("redone"))
    assert run_distill(run, cfg, recs, None, None)["steps"] == 9

    # a standard PEFT adapter on layers 1..L-1 that changes the model
    base, _ = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    pm = PeftModel.from_pretrained(base, str(run.path("distill") / "adapter"))
    acfg = json.loads((run.path("distill") / "adapter" / "adapter_config.json").read_text())
    assert acfg["layers_to_transform"] == [1, 2] and acfg["r"] == 4
    names = [n for n, _ in pm.named_modules() if n.endswith("lora_A")]
    assert names and not any(".layers.0." in n for n in names)
    assert any(float(p.abs().sum()) > 0 for n, p in pm.named_parameters() if "lora_B" in n)


def test_run_distill_without_positives_saves_untrained_adapter(fresh, tmp_path):
    model, tok = fresh
    cfg = _cfg(tmp_path)
    recs = [dict(r, label=0) for r in records(3)]
    info = run_distill(RunDir(cfg.out), cfg, recs, model, tok)
    assert info["examples"] == 0 and info["steps"] == 0
    assert (RunDir(cfg.out).path("distill") / "adapter" / "adapter_config.json").is_file()


def test_looping_winners_are_left_out_of_the_distillation_set(fresh, tmp_path, caplog):
    model, tok = fresh
    recs = records(6)  # winners: k1 k2 k4 k5
    recs[1]["persona_answer"] = "Aye, aye, aye, aye, aye, aye, the moon!"
    recs[3]["persona_answer"] = "Arr, arr, arr, arr, arr."  # a loser: its label already keeps it out
    cfg = _cfg(tmp_path, epochs=1)
    info = run_distill(RunDir(cfg.out), cfg, recs, model, tok)
    assert info["dropped_loops"] == 1 and info["examples"] == 3
    assert "1 of 4 winning answers loop" in caplog.text
    cfg_all = _cfg(tmp_path / "all", epochs=1, drop_loops=False)
    info = run_distill(RunDir(cfg_all.out), cfg_all, recs, model, tok)
    assert info["dropped_loops"] == 0 and info["examples"] == 4


def test_retain_examples_anchor_the_lora_to_the_base_model(fresh, tmp_path):
    from prism_persona.train.distill import attach_lora, build_retain_examples

    model, tok = fresh
    recs = records(6)  # losers k0 k3
    retain = build_retain_examples(tok, recs, 256, n=5, seed=0)
    assert sorted(e.key for e in retain) == ["retain:k0", "retain:k3"]
    assert all(e.retain and e.teacher == e.student for e in retain)  # the teacher is the base model itself
    cfg = _cfg(tmp_path, loss="kl+ce", retain_weight=0.5)
    pm = attach_lora(model, cfg.distill)
    pm.eval()  # no LoRA dropout: the losses below are compared exactly

    def loss(examples, c):
        with torch.no_grad():
            return float(distill_loss(pm, examples, c.distill, tok.pad_token_id))

    assert loss(retain, cfg) == 0.0  # LoRA B = 0: student == base
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    moved = loss(retain, cfg)
    assert moved > 0
    cfg_w = _cfg(tmp_path, loss="kl+ce", retain_weight=1.0)
    assert abs(loss(retain, cfg_w) - 2 * moved) < 1e-5
    winners = build_examples(tok, recs, 256)
    mixed = loss(winners + retain, cfg)
    alone = loss(winners, cfg)
    assert abs(mixed - (alone + moved)) < 1e-4  # the retain term is added, the persona terms unchanged
    pm.unload()
    info = run_distill(RunDir(cfg.out), cfg, recs, model, tok)
    assert info["examples"] == 4 and info["retain_examples"] == 2


def test_ce_loss_runs(fresh, tmp_path):
    from prism_persona.train.distill import attach_lora

    model, tok = fresh
    cfg = _cfg(tmp_path, loss="ce")
    pm = attach_lora(model, cfg.distill)
    loss = distill_loss(pm, build_examples(tok, records(), 256), cfg.distill, tok.pad_token_id)
    loss.backward()
    assert float(loss.detach()) > 0
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for n, p in pm.named_parameters() if "lora_B" in n)


def test_checkpoint_with_pickled_code_is_refused_not_run(fresh, tiny_model_dir, tmp_path):
    """The optimizer state is read with weights_only=True: a checkpoint that carries a pickled callable
    (a file a user received, or one edited on disk) is refused instead of running it."""
    from prism_persona.errors import PrismError

    model, tok = fresh
    cfg = _cfg(tmp_path, epochs=1)
    run = RunDir(cfg.out)
    run_distill(run, cfg, records(9), model, tok)
    ckpt = run.path("distill") / "checkpoint"
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"state": {}, "param_groups": [], "x": Evil()}, ckpt / "optimizer.pt")
    (run.path("distill.done.json")).unlink()  # make the stage resume from the checkpoint
    model2, tok2 = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    with pytest.raises(PrismError, match="not a plain optimizer state"):
        run_distill(run, cfg, records(9), model2, tok2)
    assert not marker.exists()


def test_resumed_distillation_is_bit_identical(tiny_model_dir, tmp_path, monkeypatch):
    """Killed after epoch 1 and resumed == trained straight through (LoRA dropout draws from torch's
    RNG, whose state the checkpoint restores)."""
    from safetensors.torch import load_file

    import prism_persona.train.distill as D

    cfg_a = _cfg(tmp_path / "a", epochs=2, dropout=0.3, micro_tokens=0)
    m, t = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    run_distill(RunDir(cfg_a.out), cfg_a, records(9), m, t)
    straight = load_file(str(RunDir(cfg_a.out).path("distill") / "adapter" / "adapter_model.safetensors"))

    cfg_b = _cfg(tmp_path / "b", epochs=2, dropout=0.3, micro_tokens=0)
    real = interrupt_distill_at(monkeypatch, 4)  # killed in epoch 2
    m, t = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    with pytest.raises(KeyboardInterrupt):
        run_distill(RunDir(cfg_b.out), cfg_b, records(9), m, t)
    monkeypatch.setattr(D, "distill_loss", real)
    torch.manual_seed(12345)  # a different process state must not matter
    torch.rand(7)
    m, t = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    run_distill(RunDir(cfg_b.out), cfg_b, records(9), m, t)
    resumed = load_file(str(RunDir(cfg_b.out).path("distill") / "adapter" / "adapter_model.safetensors"))
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def test_min_steps_raises_epochs_and_early_stopping_keeps_the_best_epoch(fresh, tmp_path):
    model, tok = fresh
    # 6 positives, batch 2 -> 3 steps per epoch; min_steps 10 -> 4 epochs
    cfg = _cfg(tmp_path, epochs=1, min_steps=10, max_epochs=20)
    info = run_distill(RunDir(cfg.out), cfg, records(9), model, tok)
    assert info["epochs"] == 4 and info["steps"] == 12
    from prism_persona.train.distill import planned_epochs, split_examples, stopped_early

    assert planned_epochs(3, C.DistillConfig(epochs=1, min_steps=100, max_epochs=5)) == 5
    assert planned_epochs(0, C.DistillConfig(epochs=2, min_steps=100)) == 2
    tr, va = split_examples(list(range(10)), 0.2, 0)
    assert len(va) == 2 and sorted(tr + va) == list(range(10))
    assert split_examples([1, 2], 0.5, 0) == ([1, 2], [])
    assert stopped_early({"epoch": 5, "best_epoch": 3}, 2) and not stopped_early({"epoch": 4, "best_epoch": 3}, 2)


def test_heldout_kl_early_stopping_records_the_curve(tiny_model_dir, tmp_path):
    m, t = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    cfg = _cfg(tmp_path, epochs=3, val_fraction=0.34, patience=1, loss="kl+ce")
    recs = [dict(r, label=1) for r in records(6)]  # 6 examples -> 2 held out, 4 trained on
    info = run_distill(RunDir(cfg.out), cfg, recs, m, t)
    assert info["examples"] == 4 and info["heldout_examples"] == 2
    kls = info["heldout_kl"]
    assert kls[0]["epoch"] == 0 and all(k["kl"] >= 0 for k in kls)
    best = min(kls[1:], key=lambda k: k["kl"])
    assert info["best_epoch"] == best["epoch"]
