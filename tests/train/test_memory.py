"""Memory: one copy of the weights, the free heap released before the check, and the peak RSS per stage
in the training report."""

import json
import sys

import pytest

from prism_persona.store import RunDir
from prism_persona.train.pipeline import peak_rss_mb
from prism_persona.train.report import write_report


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_peak_memory_per_stage_in_the_report_and_kept_across_invocations(tmp_path):
    run = RunDir(tmp_path / "run")
    run.root.mkdir(parents=True, exist_ok=True)
    write_report(run, [], {"bootstrap": 1.0}, {"load_model": 600.0, "bootstrap": 1500.5})
    rep = write_report(run, [], {"gate": 2.0}, {"gate": 1200.0, "distill": None})
    assert rep["stage_peak_rss_mb"] == {"load_model": 600.0, "bootstrap": 1500.5, "gate": 1200.0}
    assert json.loads((run.root / "training_report.json").read_text())["stage_peak_rss_mb"]["bootstrap"] == 1500.5
    md = (run.root / "training_report.md").read_text()
    assert "| bootstrap | 1500 |" in md and "| gate | 1200 |" in md


def test_peak_rss_is_this_process_in_megabytes():
    assert 10 < peak_rss_mb() < 1 << 20


def test_the_checks_gated_model_shares_the_pipelines_weights(tiny_model_dir, tmp_path, monkeypatch):
    """The held-out check (``run_heldout_check``) on the pipeline's loaded model: no model is loaded, the
    gated model, its engine and the judge's engine hold the very tensors of the base model (one copy of
    the weights), and the only new parameters are the LoRA's."""
    import prism_persona.gated.model as gated_model
    from prism_persona.models import load_model
    from prism_persona.testing import make_tiny_artifact

    art = make_tiny_artifact(tiny_model_dir, tmp_path / "prism")
    model, tok = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    base = {p.untyped_storage().data_ptr(): n for n, p in model.named_parameters()}

    def no_load(*a, **k):
        raise AssertionError("a second copy of the model was loaded")

    monkeypatch.setattr(gated_model, "load_model", no_load)
    gm = gated_model.GatedModel.from_pretrained(art, base=(model, tok))
    assert gm.model is model and gm.engine.model is model and gm.as_engine(force=False).gated is gm
    new = [n for n, p in model.named_parameters() if p.untyped_storage().data_ptr() not in base]
    assert new and all(".lora_A." in n or ".lora_B." in n for n in new)
    kept = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert set(base) <= kept


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_release_free_heap_gives_freed_heap_memory_back():
    """Freed heap chunks (held resident by glibc under a live allocation made after them, as after
    distillation) leave the RSS once the pipeline releases the free heap; live tensors keep their values."""
    import torch

    from prism_persona.train.pipeline import release_free_heap

    chunks = [torch.ones(16 * 1024) for _ in range(3000)]  # 64 kB each: from the heap, ~190 MB
    pin = torch.full((16 * 1024,), 7.0)  # allocated above them: the heap's top stays in use
    del chunks
    before = _rss_mb()
    assert release_free_heap() is True
    assert _rss_mb() < before - 100
    assert bool((pin == 7.0).all())
