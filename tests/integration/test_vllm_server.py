"""PRISM against a real vLLM server (the CPU build from scripts/setup_vllm.sh), on a tiny random Llama.

A module-scoped vLLM server serves the tiny model for the engine tests; ``prism serve --prism ART
--engine vllm`` starts a second one with the exported adapter behind the gate router. The tests cover
the vLLM engine's parity with the in-process HF engine (text, choice log-probs), the one-command
serving path (parity with the in-process GatedModel on routed and unrouted rows, streaming, a
malformed request; upstream down -> 502 for the route-only router) and a bootstrap whose upstream is
killed mid-run and restarted: the rerun finishes with nothing lost or redone.

Outside CI the module is skipped when the vLLM virtualenv is absent (run scripts/setup_vllm.sh);
in CI (``CI`` or ``PRISM_REQUIRE_VLLM`` set) a missing vLLM is a failure, not a skip. Agreement
rates are printed (pytest -s) and written to $PRISM_PARITY_REPORT when that is set.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import prism_persona
from prism_persona.engines.base import SamplingParams
from prism_persona.testing import vllm_server_pids

SRC = Path(prism_persona.__file__).resolve().parents[1]
GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0)
CHATS = [
    [{"role": "user", "content": q}]
    for q in (
        "hi",
        "write a poem",
        "fix my code",
        "as an expert, explain tides",
        "what is 2+2?",
        "summarise the news",
        "plan a trip to Rome",
        "explain recursion to a child",
    )
]

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.integration]


def report(name: str, value) -> None:
    print(f"[vllm parity] {name}: {value}")
    path = os.environ.get("PRISM_PARITY_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"check": name, "value": value}) + "\n")


@pytest.fixture(scope="module")
def vllm_python():
    from prism_persona.engines.vllm import VLLMError, find_vllm_python

    try:
        return find_vllm_python()
    except VLLMError as exc:
        if os.environ.get("CI") or os.environ.get("PRISM_REQUIRE_VLLM"):
            pytest.fail(f"vLLM is required here: {exc}")
        pytest.skip(f"vLLM is not installed ({exc})")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama whose heads are 64 wide (vLLM's CPU attention wants a supported head size), its
    PRISM artifact and the artifact's vLLM export."""
    from prism_persona.gated.export import export
    from prism_persona.testing import make_tiny_artifact, make_tiny_model

    root = tmp_path_factory.mktemp("vllm-tiny")
    model = make_tiny_model(root / "llama", num_layers=3, hidden_size=256)
    art = make_tiny_artifact(model, root / "prism", r=8, cache=False)
    exported = export(art, root / "export")
    return {"model": model, "artifact": art, "adapter": exported / "adapter", "root": root}


def start_server(vllm_python, tiny, log: Path, lora: bool, port: int = 0):
    from prism_persona.engines.vllm import VLLMServer

    loras = {"prism": str(tiny["adapter"])} if lora else None
    return VLLMServer(
        str(tiny["model"]),
        "tiny",
        vllm_python,
        log,
        loras=loras,
        dtype="float32",
        max_lora_rank=8,
        max_model_len=1024,
        max_num_seqs=16,
        kv_cache_gib=1,
        port=port,
        quiet=True,
    ).start()


@pytest.fixture(scope="module")
def server(vllm_python, tiny):
    """The base model only, as the bootstrap starts it; the LoRA server is the one
    `prism serve --engine vllm` starts."""
    srv = start_server(vllm_python, tiny, tiny["root"] / "vllm.log", lora=False)
    report("server start-up seconds (tiny model)", srv.startup_seconds)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from prism_persona.models import load_tokenizer

    return load_tokenizer(str(tiny["model"]))


def agreement(a: list[str], b: list[str]) -> float:
    """Share of equal texts. The tiny model's tokens are single bytes: where the token budget cuts a
    multi-byte character, HF decodes the stray bytes to U+FFFD and vLLM's incremental detokeniser
    holds them back, so trailing U+FFFD are not a disagreement."""
    norm = lambda t: t.strip().rstrip("\ufffd")  # noqa: E731
    return sum(norm(x) == norm(y) for x, y in zip(a, b)) / len(a)


def test_vllm_engine_matches_the_hf_engine(server, tiny, tokenizer, tiny_model_dir):
    from prism_persona.engines.hf import HFEngine
    from prism_persona.engines.vllm import VLLMEngine

    engine = VLLMEngine(server.base_url, "tiny", tokenizer, concurrency=8)
    hf = HFEngine.load(str(tiny["model"]), "float32", "cpu", batch_size=8)
    got = [c.text for c in engine.generate(CHATS, GREEDY)]
    want = [c.text for c in hf.generate(CHATS, GREEDY)]
    rate = agreement(got, want)
    report("greedy text agreement, vLLM engine vs HF engine", rate)
    assert rate >= 0.75, list(zip(got, want))
    judge = [[{"role": "user", "content": f"{q['content']} -- answer A or B"}] for q in (c[0] for c in CHATS)]
    vs, hs = engine.score_choices(judge, ["A", "B"]), hf.score_choices(judge, ["A", "B"])
    worst = max(abs(v[c] - h[c]) for v, h in zip(vs, hs) for c in "AB")
    report("max |log P(choice)| difference, vLLM vs HF", worst)
    assert worst < 1e-3
    verdicts = [(v["A"] > v["B"]) == (h["A"] > h["B"]) for v, h in zip(vs, hs)]
    assert all(verdicts)
    engine.close()


def free_port() -> int:
    from prism_persona.engines.vllm import free_port as fp

    return fp()


def wait_health(url: str, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "router exited"
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError("router did not come up")


def start_router(art: Path, log: Path, upstream: str = ""):
    """`prism serve --prism ART --engine vllm` (vLLM with base + adapter, the router in front), or
    with ``upstream`` the plain route-only router."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(SRC),
        "OMP_NUM_THREADS": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "PRISM_CACHE": str(log.parent / "cache"),
    }
    cmd = [
        sys.executable,
        "-m",
        "prism_persona.cli",
        "serve",
        "--prism",
        str(art),
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "-q",
    ]
    if upstream:
        cmd += ["--route-only", "--upstream", upstream, "--base-name", "tiny", "--lora-name", "prism"]
    else:
        cmd += ["--engine", "vllm", "--vllm-args", "--max-model-len 1024 --max-num-seqs 16"]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    try:
        wait_health(url, proc, timeout_s=900)
    except BaseException:
        proc.kill()
        raise
    return proc, url, time.time() - t0


@pytest.fixture(scope="module")
def router(vllm_python, tiny):
    proc, url, seconds = start_router(tiny["artifact"], tiny["root"] / "serve.log")
    report("prism serve --engine vllm start-up seconds (tiny model, LoRA on)", round(seconds, 1))
    yield url
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    log = (tiny["root"] / "serve.log").read_text()
    vllm_log = next((tiny["root"] / "cache" / "serve").glob("*/vllm.log"))
    assert "prism starts vLLM" in vllm_log.read_text(), log
    assert not vllm_server_pids(str(tiny["model"])), "vLLM outlived prism serve"


def test_prism_serve_engine_vllm_matches_the_in_process_gated_model(router, tiny):
    from openai import OpenAI

    from prism_persona.gated.model import GatedModel

    gm = GatedModel.from_pretrained(tiny["artifact"], device="cpu", dtype="float32", batch_size=8)
    local = gm.generate(CHATS, GREEDY)
    client = OpenAI(base_url=router + "/v1", api_key="x", max_retries=0, timeout=120)
    remote = [client.chat.completions.create(model="prism", messages=c, max_tokens=24, temperature=0) for c in CHATS]
    routed = [r.model_extra["prism"]["routed"] for r in remote]
    assert routed == [c.meta["routed"] for c in local]  # the same gate decision on each row
    assert any(routed) and not all(routed)  # both paths exercised
    texts = [r.choices[0].message.content.strip() for r in remote]
    by_route = {
        flag: agreement(
            [t for t, f in zip(texts, routed) if f == flag], [c.text for c, f in zip(local, routed) if f == flag]
        )
        for flag in (True, False)
    }
    report("router+vLLM vs in-process GatedModel greedy agreement (routed rows)", by_route[True])
    report("router+vLLM vs in-process GatedModel greedy agreement (unrouted rows)", by_route[False])
    assert min(by_route.values()) >= 0.75, list(zip(texts, [c.text for c in local]))
    gm.close()


def test_router_streams_and_rejects_malformed_requests(router):
    from openai import OpenAI

    client = OpenAI(base_url=router + "/v1", api_key="x", max_retries=0, timeout=120)
    chat = CHATS[3]
    whole = client.chat.completions.create(model="prism", messages=chat, max_tokens=16, temperature=0)
    pieces = [
        ev.choices[0].delta.content or ""
        for ev in client.chat.completions.create(
            model="prism", messages=chat, max_tokens=16, temperature=0, stream=True
        )
        if ev.choices
    ]
    assert "".join(pieces).strip() == whole.choices[0].message.content.strip()
    req = urllib.request.Request(
        router + "/v1/chat/completions",
        data=b'{"messages": "not a list"}',
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert 400 <= err.value.code < 500
    assert "message" in json.loads(err.value.read())["error"]


def test_router_answers_502_when_the_upstream_is_down(tiny):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    proc, url, _ = start_router(tiny["artifact"], tiny["root"] / "router-dead.log", upstream=dead)
    try:
        req = urllib.request.Request(
            url + "/v1/chat/completions",
            method="POST",
            data=json.dumps({"messages": CHATS[0], "max_tokens": 4}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=60)
        assert err.value.code == 502 and "error" in json.loads(err.value.read())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_bootstrap_through_vllm_resumes_after_the_server_dies(server, vllm_python, tiny, tmp_path):
    """The upstream vLLM server is killed after the first answers chunk; the run stops with a one-line
    error, and the same command, once the server is back, finishes with nothing lost or redone."""
    from prism_persona import config as C
    from prism_persona.engines import make_engine
    from prism_persona.errors import PrismError
    from prism_persona.store import JsonlStore
    from prism_persona.train.pipeline import run_bootstrap

    personas = {}
    for d in ("poetry", "code"):
        personas[d] = tmp_path / f"{d}.txt"
        personas[d].write_text(f"You are an expert in {d}. Answer precisely.")
    queries = tmp_path / "queries.jsonl"
    queries.write_text(
        "".join(
            json.dumps({"domain": d, "query": f"{d} question {i}?"}) + "\n"
            for d in ("poetry", "code")
            for i in range(4)
        )
    )
    cfg = C.resolve(
        overrides={
            "out": str(tmp_path / "run"),
            "quiet": True,
            "model": {"model": str(tiny["model"]), "batch_size": 2},
            "persona": {"domains": ["poetry", "code"], "persona_files": {k: str(v) for k, v in personas.items()}},
            "queries": {"queries_file": str(queries), "queries_per_persona": 4},
            "answers": {"max_new_tokens": 12},
            "judge": {"mode": "logprob"},
            "engine": {"engine": "vllm", "base_url": server.base_url, "max_retries": 1, "concurrency": 4},
        }
    )  # answers in calls of 4 chats (2 queries): several chunks
    engine = make_engine(cfg)
    original, calls = engine.generate, []

    def generate_then_kill(chats, params, **kw):
        out = original(chats, params, **kw)
        calls.append(len(chats))
        if len(calls) == 1:  # the first answers chunk is stored: the server goes away
            server.stop(grace_s=0)
        return out

    engine.generate = generate_then_kill
    with pytest.raises(PrismError, match="rerun to resume"):
        run_bootstrap(cfg, engine=engine)
    engine.close()
    store = Path(cfg.out) / "answers.jsonl"
    first = {r["key"]: r for r in JsonlStore(store)}
    assert 0 < len(first) < 8

    server.start()  # the same port again
    summary = run_bootstrap(cfg)
    after = list(JsonlStore(store))
    keys = [r["key"] for r in after]
    assert len(keys) == len(set(keys)) == 8  # nothing lost, nothing duplicated
    assert all(r == first[r["key"]] for r in after if r["key"] in first)  # nothing redone
    verdicts = list(JsonlStore(Path(cfg.out) / "verdicts.jsonl"))
    assert len(verdicts) == 8 and {v["mode"] for v in verdicts} == {"logprob"}
    assert summary["total"]


def test_prism_eval_engine_vllm_agrees_with_the_hf_engine(vllm_python, tiny, tmp_path, monkeypatch):
    """`prism eval --prism ART --engine vllm` (a managed server with the exported adapter, the gate
    routing here) against `--engine hf` on the same items: the same routing, MMLU letter scores and
    predictions, and greedy safety responses."""
    from prism_persona.cli import main

    fixtures = Path(__file__).resolve().parents[1] / "fixtures"
    monkeypatch.setenv("PRISM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    common = [
        "eval",
        "--prism",
        str(tiny["artifact"]),
        "--systems",
        "base,lora,prism",
        "--benchmarks",
        "mmlu,pku",
        "--mmlu",
        str(fixtures / "mmlu_hf.jsonl"),
        "--pku",
        str(fixtures / "pku_small.json"),
        "--refusal-classifier",
        "string",
        "--limit",
        "4",
        "--safety-tokens",
        "16",
        "--resamples",
        "20",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "-q",
    ]
    assert main(common + ["--out", str(tmp_path / "hf")]) == 0
    assert (
        main(
            common
            + [
                "--engine",
                "vllm",
                "--vllm-python",
                vllm_python,
                "--out",
                str(tmp_path / "vllm"),
                "--vllm-args",
                "--max-model-len 1024 --max-num-seqs 16",
            ]
        )
        == 0
    )
    assert "prism starts vLLM" in (tmp_path / "vllm" / "logs" / "vllm.log").read_text()
    assert not vllm_server_pids(str(tmp_path / "cache")), "vLLM outlived prism eval"  # its adapter is in this cache

    def records(name):
        rows = [json.loads(line) for line in (tmp_path / name / "responses.jsonl").read_text().splitlines()]
        return {(r["system"], r["bench"], r["item_id"]): r for r in rows}

    hf, vl = records("hf"), records("vllm")
    assert hf.keys() == vl.keys()
    routed = [(hf[k]["meta"]["routed"], vl[k]["meta"]["routed"]) for k in hf if k[0] == "prism"]
    assert all(a == b for a, b in routed) and len(routed) == 7  # 4 MMLU + 3 PKU items
    report("prism eval: rows the gate routed to the adapter (of 7)", sum(a for a, _ in routed))
    assert 0 < sum(a for a, _ in routed) < 7  # both paths of the prism system exercised (measured: 6 routed)
    mmlu = [k for k in hf if k[1] == "mmlu"]
    worst = max(abs(hf[k]["scores"][c] - vl[k]["scores"][c]) for k in mmlu for c in "ABCD")
    report("prism eval: max |MMLU letter log P| difference, vLLM vs HF (base, lora, prism)", worst)
    assert worst < 1e-3 and all(hf[k]["pred"] == vl[k]["pred"] for k in mmlu)
    pku = sorted(k for k in hf if k[1] == "pku")
    rate = agreement([vl[k]["response"] for k in pku], [hf[k]["response"] for k in pku])
    report("prism eval: greedy PKU response agreement, vLLM vs HF (base, lora, prism)", rate)
    assert rate >= 0.75, [(vl[k]["response"], hf[k]["response"]) for k in pku]


def _load_script(name: str):
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bootstrap_parity_hf_vs_vllm_at_temperature_0(server, tiny, tmp_path):
    """scripts/bootstrap_parity.py on the tiny model (float32, CPU), attached to the module's server:
    the answers stage on identical inputs and the judge on identical answers agree with the HF engine.
    Thresholds from the measurement (docs/serving.md): answers 8/8 equal up to a trailing cut byte,
    verdicts on the HF answers 8/8; the tiny model's personas are all the template fallback."""
    parity = _load_script("bootstrap_parity")
    queries = tmp_path / "queries.jsonl"
    queries.write_text(
        "".join(
            json.dumps({"domain": d, "query": f"{q} ({d})?"}) + "\n"
            for d in ("poetry", "code")
            for q in ("write something", "explain this", "fix my code", "what is 2+2")
        )
    )
    record = parity.main(
        [
            "--model",
            str(tiny["model"]),
            "--base-url",
            server.base_url,
            "--work",
            str(tmp_path / "w"),
            "--domains",
            "poetry,code",
            "--queries",
            "4",
            "--queries-file",
            str(queries),
            "--answer-tokens",
            "16",
            "--persona-tokens",
            "16",
            "-q",
        ]
    )
    given_queries = record["results"]["vllm-answers (hf personas+queries)"]
    judge_only = record["results"]["vllm-verdicts (hf answers)"]
    for field in ("base_answer", "persona_answer"):
        report(f"bootstrap parity: {field} agreement on identical inputs", given_queries["answers"][field]["rate"])
        assert given_queries["answers"][field]["n"] == 8 and given_queries["answers"][field]["rate"] >= 0.75
    report("bootstrap parity: verdict agreement on identical answers", judge_only["verdicts"]["winner"]["rate"])
    assert judge_only["verdicts"]["winner"] == {"equal": 8, "n": 8, "rate": 1.0}
    assert judge_only["verdicts"]["label"]["rate"] == 1.0


def test_prism_generate_engine_vllm_base_model_matches_the_hf_engine(server, tiny, tmp_path):
    """`prism generate --engine vllm --base-url URL --model M` (a base model, no artifact) against the
    HF engine's greedy answers."""
    from prism_persona.cli import main
    from prism_persona.engines.hf import HFEngine

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": c[0]["content"]}) + "\n" for c in CHATS))
    out = tmp_path / "out.jsonl"
    assert (
        main(
            [
                "generate",
                "--engine",
                "vllm",
                "--base-url",
                server.base_url,
                "--model",
                str(tiny["model"]),
                "--input",
                str(prompts),
                "--output",
                str(out),
                "--max-new-tokens",
                "24",
                "-q",
            ]
        )
        == 0
    )
    got = [json.loads(line)["response"] for line in out.read_text().splitlines()]
    want = [c.text for c in HFEngine.load(str(tiny["model"]), "float32", "cpu", batch_size=8).generate(CHATS, GREEDY)]
    rate = agreement(got, want)
    report("prism generate --engine vllm (base model) vs HF engine greedy agreement", rate)
    assert rate >= 0.75, list(zip(got, want))


def test_vllm_serves_each_persona_and_the_router_picks_it(vllm_python, tmp_path_factory):
    """A K-way artifact (two personas, one adapter each) on a real vLLM: both adapters served by name,
    the layer-0 router sends each row to its persona's adapter, and the greedy answers agree with the
    in-process GatedModel's per row (each row on its own adapter)."""
    from prism_persona.engines.vllm import VLLMEngine, VLLMServer
    from prism_persona.gated.export import export
    from prism_persona.gated.model import GatedModel
    from prism_persona.gated.routed import RoutedEngine
    from prism_persona.gated.router import load_router
    from prism_persona.models import load_tokenizer
    from prism_persona.testing import SPLIT_QUERIES, make_tiny_artifact, make_tiny_model

    root = tmp_path_factory.mktemp("vllm-kway")
    model = make_tiny_model(root / "llama", num_layers=3, hidden_size=256)
    art = make_tiny_artifact(model, root / "prism", r=8, cache=False, personas=("story", "monitor"))
    exported = export(art, root / "export")
    loras = {"story": str(exported / "adapter"), "monitor": str(exported / "adapter" / "monitor")}
    srv = VLLMServer(
        str(model),
        "tiny",
        vllm_python,
        root / "vllm.log",
        loras=loras,
        dtype="float32",
        max_lora_rank=8,
        max_model_len=1024,
        max_num_seqs=16,
        kv_cache_gib=1,
        quiet=True,
    ).start()
    chats = [[{"role": "user", "content": q}] for q in SPLIT_QUERIES]
    try:
        assert "--max-loras 2" in " ".join(srv.command())
        router = load_router(str(art), device="cpu", dtype="float32")
        engine = RoutedEngine(VLLMEngine(srv.base_url, "tiny", load_tokenizer(str(model)), concurrency=4), router)
        remote = engine.generate(chats, GREEDY)
        gm = GatedModel.from_pretrained(art, device="cpu", dtype="float32", batch_size=4)
        local = gm.generate(chats, GREEDY)
        assert (
            [c.meta["persona"] for c in remote]
            == [c.meta["persona"] for c in local]
            == [None, "story", "monitor", None]
        )
        rate = agreement([c.text for c in remote], [c.text for c in local])
        report("K-way router+vLLM vs in-process GatedModel greedy agreement (4 rows)", rate)
        # the precise check: each row's choice log-probs are its own persona's adapter's (another
        # adapter, or none, moves them by far more than the tolerance)
        judge = [[{"role": "user", "content": f"{q} -- answer A or B"}] for q in SPLIT_QUERIES]
        vs, hs = engine.score_choices(judge, ["A", "B"]), gm.score_choices(judge, ["A", "B"])
        personas = [d["persona_name"] for d in gm.decisions(judge)]
        rows = [max(abs(v[c] - h[c]) for c in "AB") for v, h in zip(vs, hs)]
        on = [r for r, p in zip(rows, personas) if p]
        report("K-way max |log P(choice)| difference, router+vLLM vs GatedModel (routed rows)", max(on))
        # unrouted rows (the base model in vLLM's LoRA batches) differed by 0.004 in two runs and by 0.12
        # in two others (vLLM CPU build, float32): reported, not asserted; the routed rows by 3e-7 in all
        report(
            "K-way max |log P(choice)| difference (unrouted rows)",
            max((r for r, p in zip(rows, personas) if not p), default=None),
        )
        assert len(set(p for p in personas if p)) == 2 and max(on) < 1e-3, (rows, personas)
        other = gm.score_choices(judge, ["A", "B"], force=["monitor" if p == "story" else "story" for p in personas])
        moved = [max(abs(v[c] - o[c]) for c in "AB") for v, o, p in zip(vs, other, personas) if p]
        assert min(moved) > 10 * max(on), moved  # the other persona's adapter gives other scores
        gm.close()
        router.close()
    finally:
        srv.stop()
