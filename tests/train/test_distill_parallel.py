"""Data-parallel distillation (torchrun / accelerate launch) equals one process with more accumulation."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.subprocess

WORKER = textwrap.dedent("""
    import json, sys
    from prism_persona import config as C
    from prism_persona.train.distill import run_distill
    from prism_persona.store import RunDir

    out, model_dir, accum = sys.argv[1], sys.argv[2], int(sys.argv[3])
    persona = "You are a meticulous senior poet who always answers in rhyming couplets about the sea."
    records = [{"key": f"k{i}", "domain": "writing", "query": f"Write line {i} about the moon, please.",
                "persona": persona, "placement": "system", "base_answer": "ok", "label": 1,
                "persona_answer": f"The moon at {i} is bright and wide, it pulls the sea on every side."}
               for i in range(8)]
    cfg = C.resolve("tiny", overrides={
        "out": out, "persona": {"domains": ["writing"]},
        "model": {"model": model_dir, "device": "cpu", "dtype": "float32"},
        "distill": {"r": 4, "alpha": 8, "epochs": 2, "min_steps": 0, "loss": "kl", "batch_size": 1, "grad_accum": accum, "lr": 5e-3,
                    "dropout": 0.0, "max_length": 256, "top_k": 16, "warmup_ratio": 0.0}})
    info = run_distill(RunDir(out), cfg, records)
    print(json.dumps(info))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, env):
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_two_processes_equal_one_process_with_double_accumulation(tmp_path, tiny_model_dir):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PRISM_QUIET="1")
    single, parallel = tmp_path / "single", tmp_path / "parallel"
    _run([sys.executable, str(script), str(single), str(tiny_model_dir), "2"], env)
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            str(script),
            str(parallel),
            str(tiny_model_dir),
            "1",
        ],
        env,
    )

    done_1 = json.loads((single / "distill.done.json").read_text())
    done_2 = json.loads((parallel / "distill.done.json").read_text())
    assert done_1["steps"] == done_2["steps"] == 8  # 8 examples / (1 per batch x 2) x 2 epochs
    assert done_2["processes"] == 2 and "processes" not in done_1
    loss_1 = [json.loads(x)["loss"] for x in (single / "distill" / "loss.jsonl").read_text().splitlines()]
    loss_2 = [json.loads(x)["loss"] for x in (parallel / "distill" / "loss.jsonl").read_text().splitlines()]
    assert len(loss_2) == 8 and torch.allclose(torch.tensor(loss_1), torch.tensor(loss_2), atol=1e-5)
    w1 = load_file(str(single / "distill" / "adapter" / "adapter_model.safetensors"))
    w2 = load_file(str(parallel / "distill" / "adapter" / "adapter_model.safetensors"))
    assert w1.keys() == w2.keys()
    trained = [k for k in w1 if "lora_B" in k]
    assert any(w1[k].abs().max() > 0 for k in trained)  # training really moved the adapter
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5), k
