"""benchmarks/bench_distill.py at --size tiny: the variants train the same steps to the same losses (no timing asserts)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_distill_bench_cache_and_micro_batches_match_recompute(tmp_path):
    import bench_distill

    out = tmp_path / "r.jsonl"
    argv = ["--size", "tiny", "--examples", "6", "--epochs", "2", "--max-length", "1024", "--bound-n", "256"]
    argv += ["--out", str(out)]
    rec = bench_distill.main(argv + ["--micro-tokens", "1"])
    rows = {r["variant"]: r for r in rec["rows"]}
    assert set(rows) == {"recompute", "cached", "cached_whole_batch"}
    assert {r["steps"] for r in rows.values()} == {4}  # 6 examples, batch 4 -> 2 steps x 2 epochs
    assert rows["recompute"]["teacher_fill_cpu_s"] == 0 and rows["cached"]["teacher_fill_cpu_s"] > 0
    for name in ("cached", "cached_whole_batch"):  # the same training, step by step
        assert rows[name]["max_loss_rel_diff"] < 1e-3
    assert all(0 < r["of_bound"] for r in rows.values()) and rec["bound_gflops"] > 0
    assert rec["profile"]["teacher_forward_topk"] > 0 and 0 < rec["profile"]["teacher_share"] < 1
    assert 0 <= rec["precision"]["float16"] < 1e-2
    assert json.loads(out.read_text().splitlines()[-1])["bench"] == "distill"
