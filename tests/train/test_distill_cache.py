"""Distillation speed and memory (issue 30): the teacher's top-k cache, micro-batches, one copy of the weights."""

from __future__ import annotations

import json

import pytest
import torch

import prism_persona.train.distill as D
from prism_persona.models import load_model
from prism_persona.store import RunDir

from .test_distill import _cfg, records


@pytest.fixture
def fresh(tiny_model_dir):
    return load_model(str(tiny_model_dir), dtype="float32", device="cpu")


def _lora(model, tok, tmp_path, **distill):
    cfg = _cfg(tmp_path, **distill)
    torch.manual_seed(0)
    pm = D.attach_lora(model, cfg.distill)
    for n, p in pm.named_parameters():  # a LoRA that changes the student, so the KL is not the step-0 one
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    pm.eval()
    return pm, cfg, D.build_examples(tok, records(9), 256)


def test_cached_teacher_gives_the_loss_of_the_teacher_run_now(fresh, tmp_path):
    """The KL from the stored top-k (read back from disk) equals the KL from the teacher's full logits."""
    model, tok = fresh
    pm, cfg, ex = _lora(model, tok, tmp_path)
    pad = tok.pad_token_id
    cache = D.TeacherCache(tmp_path / "cache", cfg.distill.top_k)
    assert cache.fill(pm, ex, pad, 0) == len(ex)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == len(ex)
    with torch.no_grad():
        with D._adapter_off(pm):
            t_logits = D.response_logits(pm, D.collate(ex, "teacher", pad, "cpu"))
        s_logits = D.response_logits(pm, D.collate(ex, "student", pad, "cpu"))
        reference = D.topk_kl(t_logits, s_logits, cfg.distill.top_k)
        cached = D.distill_loss(pm, ex, cfg.distill, pad, cache.lookup(pm, ex, pad))
        recomputed = D.distill_loss(pm, ex, cfg.distill, pad)
    assert float(reference) > 1e-3
    assert float(cached) == pytest.approx(float(reference), rel=1e-5)
    assert float(recomputed) == pytest.approx(float(reference), rel=1e-5)
    assert cache.computed == len(ex)  # lookup read the files, computed nothing


@pytest.mark.parametrize("loss", ["kl", "kl+ce"])
def test_micro_batches_add_up_to_the_batch_gradient(fresh, tmp_path, loss):
    model, tok = fresh
    pm, cfg, ex = _lora(model, tok, tmp_path, loss=loss, dropout=0.0)
    pad = tok.pad_token_id
    params = [p for p in pm.parameters() if p.requires_grad]

    def grads(micro_tokens):
        for p in params:
            p.grad = None
        total = 0.0
        parts = D.micro_batches(ex, micro_tokens)
        for micro in parts:
            loss_ = D.distill_loss(pm, micro, cfg.distill, pad, None, D.token_counts(ex))
            loss_.backward()
            total += float(loss_.detach())
        return total, [p.grad.clone() for p in params], len(parts)

    whole, g_whole, n_whole = grads(0)
    split, g_split, n_split = grads(1)  # one example per pass
    assert (n_whole, n_split) == (1, len(ex))
    assert split == pytest.approx(whole, rel=1e-5)
    for a, b in zip(g_whole, g_split):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_micro_batches_respect_the_token_budget():
    ex = [D.Example(str(i), [0] * t, [0] * s, 1, 1, 1) for i, (t, s) in enumerate([(10, 5), (12, 6), (30, 8), (9, 4)])]
    assert [len(m) for m in D.micro_batches(ex, 12)] == [2, 1, 1]  # student widths 5+6 fit 12; 3 x 8 does not
    assert [len(m) for m in D.micro_batches(ex, 12, "teacher")] == [1, 1, 1, 1]
    assert [len(m) for m in D.micro_batches(ex, 0)] == [4]
    assert [len(m) for m in D.micro_batches(ex, 1)] == [1, 1, 1, 1]  # one example at least


def test_teacher_and_student_share_one_copy_of_the_weights(fresh, tmp_path):
    """The teacher is the same module with the adapter off: no parameter is copied, and with the
    adapter off the model gives the base model's own logits."""
    model, tok = fresh
    ex = D.build_examples(tok, records(9), 256)
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    batch = D.collate(ex, "teacher", tok.pad_token_id, "cpu")
    with torch.no_grad():
        base = D.response_logits(model, batch)
    pm, cfg, _ = _lora(model, tok, tmp_path)
    frozen = {p.data_ptr() for p in pm.parameters() if not p.requires_grad}
    assert set(before.values()) == frozen  # every base weight, once, shared (the LoRA adds only its own)
    vals, idx = D.teacher_topk(pm, ex[:1], cfg.distill.top_k, tok.pad_token_id)[0]
    ref_vals, ref_idx = base[: ex[0].n].topk(cfg.distill.top_k, dim=-1)
    torch.testing.assert_close(vals, ref_vals)
    assert torch.equal(idx.long(), ref_idx)


def test_damaged_cache_file_is_recomputed(fresh, tmp_path):
    model, tok = fresh
    pm, cfg, ex = _lora(model, tok, tmp_path)
    cache = D.TeacherCache(tmp_path / "cache", cfg.distill.top_k)
    cache.fill(pm, ex, tok.pad_token_id, 0)
    good = cache.get(ex[0])
    (tmp_path / "cache" / f"{cache.key(ex[0])}.safetensors").write_bytes(b"not a tensor file")
    assert cache.get(ex[0]) is None
    again = cache.lookup(pm, ex[:1], tok.pad_token_id)[0]
    assert torch.equal(again[0], good[0]) and torch.equal(again[1], good[1])


def _count_teacher(monkeypatch, fail_after=None):
    """Count the examples the teacher runs on; raise KeyboardInterrupt (a kill) once ``fail_after`` are stored."""
    seen: list[str] = []
    real_topk, real_put = D.teacher_topk, D.TeacherCache.put

    def topk(model, examples, k, pad_id):
        seen.extend(e.key for e in examples)
        return real_topk(model, examples, k, pad_id)

    def put(self, e, t):
        if fail_after is not None and self.computed >= fail_after:
            raise KeyboardInterrupt
        real_put(self, e, t)

    monkeypatch.setattr(D, "teacher_topk", topk)
    monkeypatch.setattr(D.TeacherCache, "put", put)
    return seen


def test_interrupted_run_resumes_without_recomputing_or_skipping_teachers(tiny_model_dir, tmp_path, monkeypatch):
    """Killed while filling the cache (after 2 examples' files), then resumed: every example's teacher
    runs exactly once over both runs (one micro-batch of an example per pass here), none after the
    fill (later epochs read the cache), and the adapter equals an uninterrupted run's."""
    from safetensors.torch import load_file

    def adapter(cfg):
        return load_file(str(RunDir(cfg.out).path("distill") / "adapter" / "adapter_model.safetensors"))

    cfg_a = _cfg(tmp_path / "a", epochs=3, dropout=0.3, micro_tokens=1)
    seen_a = _count_teacher(monkeypatch)
    m, t = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    info = D.run_distill(RunDir(cfg_a.out), cfg_a, records(9), m, t)
    assert info["steps"] == 9 and info["teacher_cache"] == 6
    assert sorted(seen_a) == sorted(f"k{i}" for i in range(9) if i % 3)  # once each over 3 epochs
    straight = adapter(cfg_a)

    cfg_b = _cfg(tmp_path / "b", epochs=3, dropout=0.3, micro_tokens=1)
    monkeypatch.undo()
    seen_b = _count_teacher(monkeypatch, fail_after=2)
    m, t = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    with pytest.raises(KeyboardInterrupt):
        D.run_distill(RunDir(cfg_b.out), cfg_b, records(9), m, t)
    cache_dir = RunDir(cfg_b.out).path("distill") / D.TEACHER_DIR
    assert len(list(cache_dir.glob("*.safetensors"))) == 2 and not list(cache_dir.glob("*.tmp"))
    monkeypatch.undo()
    seen_resumed = _count_teacher(monkeypatch)
    m, t = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    info = D.run_distill(RunDir(cfg_b.out), cfg_b, records(9), m, t)
    assert info["teacher_cache"] == 4
    done_first = seen_b[:2]  # stored before the kill; the third was computed but never stored
    assert sorted(done_first + seen_resumed) == sorted(seen_a)  # none twice, none skipped
    resumed = adapter(cfg_b)
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def test_micro_tokens_is_not_a_stage_setting(fresh, tmp_path):
    """micro_tokens changes how a step is computed, not what: a finished (or older) run is not refused
    when it changes, while a setting that changes the result still is."""
    from prism_persona.errors import PrismError

    model, tok = fresh
    run = RunDir(_cfg(tmp_path).out)
    D.run_distill(run, _cfg(tmp_path, micro_tokens=64), records(9), model, tok)
    assert "micro_tokens" not in json.loads((run.root / "distill.meta.json").read_text())["settings"]["distill"]
    run.check_settings("distill", D.distill_settings(_cfg(tmp_path, micro_tokens=0)))  # what a rerun checks
    with pytest.raises(PrismError, match="top_k"):
        run.check_settings("distill", D.distill_settings(_cfg(tmp_path, top_k=8)))


def test_ce_loss_runs_the_teacher_only_for_retain_examples(fresh, tiny_model_dir, tmp_path, monkeypatch):
    model, tok = fresh
    seen = _count_teacher(monkeypatch)
    info = D.run_distill(RunDir(_cfg(tmp_path / "a").out), _cfg(tmp_path / "a", loss="ce"), records(9), model, tok)
    assert info["teacher_cache"] is None and seen == []  # no KL term: no teacher at all
    model, tok = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    cfg = _cfg(tmp_path / "b", loss="ce", retain_weight=0.5)
    info = D.run_distill(RunDir(cfg.out), cfg, records(9), model, tok)
    assert info["teacher_cache"] == info["retain_examples"] == 3
    assert sorted(seen) == ["retain:k0", "retain:k3", "retain:k6"]  # once each, over both epochs
