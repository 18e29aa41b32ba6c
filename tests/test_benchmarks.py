"""Every benchmark script runs at ``--size tiny`` on CPU and its comparisons are correct (no timing asserts)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

TINY = ["--size", "tiny", "--device", "cpu", "--dtype", "float32"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_record(rec: dict, bench: str) -> None:
    assert rec["bench"] == bench
    assert {"cpu", "cores", "gpu"} <= set(rec["machine"])
    assert {"torch", "transformers", "peft"} <= set(rec["versions"])
    assert rec["date"].endswith("Z") and rec["settings"] and rec["rows"]


def test_generation_mixed_batches_match_base_and_lora_rows(tmp_path):
    import bench_generation

    out = tmp_path / "r.jsonl"
    rows = bench_generation.main(
        TINY
        + [
            "--batch-sizes",
            "1,4",
            "--prompt-len",
            "12",
            "--new-tokens",
            "5",
            "--repeats",
            "1",
            "--ragged",
            "--sequential-rows",
            "2",
            "--out",
            str(out),
        ]
    )
    variants = {r["variant"] for r in rows}
    expected = {
        "base",
        "base_fast",
        "lora",
        "lora_fast",
        "lora_merged",
        "peft_mixed",
        "ref_grouped",
        "ref_sequential",
        "gated",
        "gated_fast",
    }
    assert expected <= variants
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["ratio_to_base"] > 0
        if "agree" in r:  # greedy: every mixed/fast/merged row equals its base or LoRA reference row
            assert r["agree"] == 1.0, r
    assert all(r["agree"] == 1.0 for r in rows if r["variant"] in ("peft_mixed", "gated", "ref_grouped"))
    lora4 = next(r for r in rows if r["variant"] == "lora" and r["batch"] == 4)
    assert lora4["differs_from_base"] > 0  # the random adapter changes outputs, so the checks mean something
    seq4 = next(r for r in rows if r["variant"] == "ref_sequential" and r["batch"] == 4)
    assert seq4["rows_measured"] == 2
    check_record(records(out)[0], "generation")


def test_routing_hook_does_not_change_logits_and_routes_like_layer0_pass(tmp_path):
    import bench_routing

    out = tmp_path / "r.jsonl"
    rows = bench_routing.main(
        TINY + ["--batch-sizes", "1,3", "--prompt-len", "16", "--repeats", "1", "--out", str(out)]
    )
    assert [r["batch"] for r in rows] == [1, 3]
    for r in rows:
        assert r["same_logits"] and r["same_route"]
        for key in ("hook_share", "gate_mlp_share", "layer0_share"):
            assert math.isfinite(r[key])
        assert r["gate_mlp_s"] > 0 and r["layer0_pass_s"] > 0
    check_record(records(out)[0], "routing")


def lora_by_hand(hidden, heads, kv, inter, layers, r=16):
    hd = hidden // heads
    per_layer = (hidden + heads * hd) + 2 * (hidden + kv * hd) + (heads * hd + hidden) + 3 * (hidden + inter)
    return r * per_layer * (layers - 1)


def gate_by_hand(hidden):
    return (hidden * 128 + 128) + (128 * 64 + 64) + (64 + 1) + 2 * hidden  # MLP + mean/std buffers


def test_memory_accounting_equals_hand_count(tmp_path):
    import bench_memory

    out = tmp_path / "r.jsonl"
    res = bench_memory.main(TINY + ["--batch-sizes", "2", "--prompt-len", "8", "--new-tokens", "3", "--out", str(out)])
    acc = res["accounting"]
    # tiny: 4 layers, hidden 64, 4 heads, 2 KV heads, intermediate 128
    assert acc["lora_params_peft"] == acc["lora_params_hand"] == lora_by_hand(64, 4, 2, 128, 4) == 49152
    assert acc["gate_params_module"] == acc["gate_params_hand"] == gate_by_hand(64)
    assert acc["extra_params"] == 49152 + gate_by_hand(64)
    assert acc["extra_bytes"] == acc["extra_params"] * 4  # float32
    assert acc["extra_share_of_base"] == pytest.approx(acc["extra_params"] / acc["base_params"])
    for peak in res["peaks"]:
        assert peak["kv_cache_bytes_per_row"] == 2 * 4 * 2 * 16 * (8 + 3) * 4
        assert "rss_delta_bytes_per_row" in peak
    assert res["peaks"][0]["variant"] == "peft_mixed"
    check_record(records(out)[0], "memory")


def test_memory_accounting_for_the_7b_shape_without_weights(tmp_path):
    import bench_memory

    res = bench_memory.main(["--size", "7b", "--device", "cpu", "--out", ""])
    acc = res["accounting"]
    assert acc["base_params"] == 7_615_616_512  # Qwen2.5-7B-Instruct
    assert acc["lora_params_peft"] == acc["lora_params_hand"] == lora_by_hand(3584, 28, 4, 18944, 28) == 38_928_384
    assert acc["gate_params_hand"] == gate_by_hand(3584)
    assert acc["extra_share_of_base"] < 0.01
    assert acc["bytes_per_param"] == 2 and res["peaks"] == []


def test_bootstrap_engine_throughput(tmp_path):
    import bench_bootstrap

    out = tmp_path / "r.jsonl"
    rows = bench_bootstrap.main(TINY + ["--batch-sizes", "1,3", "--rows", "4", "--new-tokens", "4", "--out", str(out)])
    assert [r["batch"] for r in rows] == [1, 3]
    for r in rows:
        assert r["completions"] == 4 and 0 < r["tokens"] <= 4 * 5 and r["tokens_per_s"] > 0
    assert rows[0]["ratio_to_first"] == 1.0
    check_record(records(out)[0], "bootstrap")


TOY_RUN = (
    f'{sys.executable} -c "import json,os,sys,time; d=sys.argv[1]; os.makedirs(d); '
    "open(d+'/answers.meta.json','w').write('{}'); open(d+'/personas.jsonl','w').write('{}\\n'); time.sleep(0.05); "
    "open(d+'/answers.jsonl','w').write('{}\\n{}\\n{}\\n'); open(d+'/answers.done.json','w').write('{}'); "
    "open(d+'/gate.done.json','w').write(json.dumps({'seconds': 1.5})); "
    "open(d+'/training_report.json','w').write(json.dumps({'stage_seconds': {'distill': 2.5, 'load_model': None}}))\" {out}"
)


def test_e2e_runs_a_command_and_summarises_stages(tmp_path):
    import bench_e2e

    out = tmp_path / "r.jsonl"
    res = bench_e2e.main(["--command", TOY_RUN, "--run-dir", str(tmp_path), "--out", str(out)])
    assert res["returncode"] == 0 and res["total_s"] > 0
    stages = {r["stage"]: r for r in res["stages"]}
    assert stages["answers"]["records"] == 3 and stages["answers"]["measured_by"] == "file times"
    assert stages["answers"]["seconds"] >= 0
    assert stages["personas"]["measured_by"] == "file times (last record)" and stages["personas"]["records"] == 1
    assert stages["gate"]["seconds"] == 1.5 and stages["gate"]["measured_by"] == "reported"
    assert stages["distill"]["seconds"] == 2.5
    check_record(records(out)[0], "e2e")
    again = bench_e2e.main(["--summarise", str(tmp_path / "run"), "--out", ""])
    assert {r["stage"] for r in again["stages"]} == set(stages)


def test_e2e_default_command_is_prism_run():
    import bench_e2e

    cmd = bench_e2e.prism_command("RUN", "writing,coding,safety", "tiny", None, "--quiet")
    assert cmd[3:] == ["run", "--preset", "tiny", "--domains", "writing,coding,safety", "--out", "RUN", "--quiet"]


def test_report_renders_tables_from_results(tmp_path):
    import bench_e2e
    import report

    res = tmp_path / "r.jsonl"
    bench_e2e.main(["--command", TOY_RUN, "--run-dir", str(tmp_path), "--out", str(res)])
    with open(res, "a") as fh:
        fh.write("{torn line\n")
    md = tmp_path / "RESULTS.md"
    text = report.main(["--results", str(res), "--out", str(md)])
    assert md.read_text().strip() == text.strip()
    assert "## 5. CPU end to end" in text and "| stage | seconds |" in text and "| gate | 1.50 |" in text
    assert "## 1." not in text  # no generation records: no empty section


def test_bench_vllm_answers_part_runs_both_engines(tmp_path, tiny_model_dir, fake_python):
    """bench_vllm's answers part end to end, with the stand-in vllm module (tests/fixtures/fake_vllm)
    as the server: both engines generate the same rows in the answers stage's calls (HF: its streamed
    call of several batches; vLLM: that call size, then its requests in flight) and the record carries the ratios."""
    import json

    import bench_vllm

    out = tmp_path / "results.jsonl"
    res = bench_vllm.main(
        [
            "--parts",
            "answers",
            "--model",
            str(tiny_model_dir),
            "--rows",
            "10",
            "--answer-tokens",
            "3",
            "--batch-size",
            "4",
            "--concurrency",
            "8",
            "--vllm-python",
            fake_python,
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ]
    )
    rows = res["answers"]["rows"]
    assert [r["engine"] for r in rows] == [
        "hf",
        "vllm (calls of the HF batch)",
        "vllm (calls of its requests in flight)",
    ]
    from prism_persona.bootstrap.answers import STREAM_BATCHES

    hf_call = STREAM_BATCHES * 4  # the HF engine streams several batches per call (refills finished rows)
    assert [r["chats_per_call"] for r in rows] == [hf_call, hf_call, 8] and all(r["rows"] == 10 for r in rows)
    assert res["answers"]["ratio_vllm_over_hf"] > 0 and res["answers"]["ratio_in_hf_batch_calls"] > 0
    assert json.loads(out.read_text())["results"]["answers"]["rows"][1]["startup_s"] is not None


def test_cpu_engine_raw_loop_matches_the_engine_and_bounds_are_positive(tmp_path):
    import bench_cpu_engine

    out = tmp_path / "r.jsonl"
    argv = ["--size", "tiny", "--rows", "6", "--batch-sizes", "3", "--new-tokens", "4", "--threads", "1"]
    res = bench_cpu_engine.main(argv + ["--step-lengths", "8", "--out", str(out)])
    first = res["results"][0]
    assert first["greedy_agreement"] == 1.0  # the engine's greedy tokens = the raw decode loop's
    assert 0 <= first["padding_share_one_call"] and first["padding_share"] <= first["padding_share_one_call"]
    bounds = first["bounds"]
    assert bounds["square_gflops"] > 0 and bounds["decode_bound_tokens_per_s"] > 0
    assert {"dynamic_ms", "preallocated_ms"} <= set(res["results"][-1]["step_costs"][0])
    check_record(records(out)[-1], "cpu_engine")


def test_growth_exponent_fit_and_render(tmp_path):
    import bench_growth

    assert bench_growth.fit_exponent([1, 2, 4], [3, 12, 48]) == pytest.approx(2.0)
    assert bench_growth.fit_exponent([5], [1]) is None
    rows = [
        {"x": str(x), "seconds": {"answers": 2.0 * x}, "cpu_seconds": {"answers": float(x)}, "wall_s": 3.0 * x}
        | {"peak_rss_mb": {"answers": 400.0 + x}, "load_before": 1.0, "load_after": 1.0}
        for x in (12, 50, 200)
    ]
    rec = {"bench": "growth", "date": "2026-12-03T00:00:00Z", "settings": {"axis": "queries"}, "rows": rows}
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    text = bench_growth.render(path, tmp_path / "g.png")
    assert "| answers | 12.00 s / 412 MB | 50.00 s / 450 MB | 200.00 s / 600 MB | 1.00 |" in text
    assert "distill work" not in text  # records written before the step count have none
    assert (tmp_path / "g.png").stat().st_size > 0
    run = tmp_path / "run"
    run.mkdir()
    assert bench_growth.distill_work(run) == {}
    (run / "distill.done.json").write_text(json.dumps({"steps": 15, "examples": 20, "seconds": 9.0}))
    assert bench_growth.distill_work(run) == {"distill_steps": 15, "distill_examples": 20}
    for r, steps in zip(rows, (3, 15, 60)):
        r.update(distill_steps=steps, distill_examples=4 * steps)
    path.write_text(json.dumps(rec) + "\n")
    assert "| distill work | 3 steps, 12 examples | 15 steps, 60 examples | 60 steps, 240 examples |" in (
        bench_growth.render(path)
    )


def test_multi_adapter_rows_match_peft_and_unrouted_batch_equals_base(tmp_path):
    import bench_multi_adapter

    out = tmp_path / "r.jsonl"
    rows = bench_multi_adapter.main(
        TINY + ["--batch-sizes", "6", "--prompt-len", "8", "--repeats", "1", "--out", str(out)]
    )
    (row,) = rows
    assert row["none_equal_base"] is True and row["routed_rows"] == 4
    assert all(row[f"max_diff_K{k}"] < 1e-4 for k in bench_multi_adapter.KS)
    assert bench_multi_adapter.row_plan(8, 0.75, 4) == [0, 1, 2, 3, 0, 1, -1, -1]
    check_record(records(out)[0], "multi_adapter")
