"""Shared fixtures: isolated run state, tiny random causal LMs, the embedded model (slow tests)."""

from __future__ import annotations

import os

import pytest

# Set before anything imports huggingface_hub (it reads these once, at import), which session-scoped
# fixtures may do before the per-test fixture below runs: the tests never touch the network.
for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
}.items():
    os.environ.setdefault(_name, _value)

# Under pytest-xdist (``-n 2``, the project's default: pyproject.toml addopts) each worker computes on
# one core: two processes that each use both cores thrash (OpenMP spin-waits), one thread each do not.
# Set before anything imports torch (the fixtures import it lazily); a run without xdist keeps the
# machine's default.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_name] = "1"


def pytest_collection_modifyitems(items):
    """A test that uses the stand-in vLLM server (``fake_python``, directly or through another fixture)
    starts a process: it is marked ``subprocess`` like the tests that start ``prism`` themselves.

    Then the files that hold the longest tests (``slow``: the embedded model's end-to-end runs, minutes
    each; then ``integration``: real vLLM servers) are put first, each file's tests kept together and in
    order. pytest-xdist (``--dist loadfile --no-loadscope-reorder``, pyproject's addopts) hands files to
    the workers in this order, so the minutes-long files start at once and the short ones fill in
    around them, instead of one worker finishing alone on a long file at the end."""
    for item in items:
        if "fake_python" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.subprocess)
    rank: dict[str, int] = {}
    for item in items:
        path = str(getattr(item, "path", item.nodeid.split("::")[0]))
        here = 0 if item.get_closest_marker("slow") else 1 if item.get_closest_marker("integration") else 2
        rank[path] = min(rank.get(path, 2), here)
    items.sort(key=lambda item: rank[str(getattr(item, "path", item.nodeid.split("::")[0]))])


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    """No network, no progress bars, and a private cache/run area per test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("PRISM_QUIET", "1")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 3-layer Llama (hidden 64) with a byte-level ChatML tokenizer, saved as an HF directory."""
    from prism_persona.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", num_layers=3, hidden_size=64)


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    from prism_persona.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2", num_layers=3, hidden_size=64, arch="qwen2")


@pytest.fixture(scope="session")
def tiny_no_system_dir(tmp_path_factory):
    """A tiny model whose chat template raises on a system message (like Gemma's)."""
    from prism_persona.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "nosys", system_role=False)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """(model, tokenizer) of the tiny Llama, float32 on CPU. Do not mutate: it is shared."""
    from prism_persona.models import load_model

    return load_model(str(tiny_model_dir), dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def embedded_model():
    """(model, tokenizer) of the real embedded SmolLM2-135M-Instruct (loaded once per session)."""
    from prism_persona.models import load_model

    return load_model(None, dtype="float32", device="cpu")


@pytest.fixture
def shared_benchmarks():
    """The shared benchmark folder beside the repo (../shared/benchmarks), skipped if absent."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(os.path.dirname(here), "shared", "benchmarks")
    if not os.path.isdir(path):
        pytest.skip("../shared/benchmarks is not present")
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    tiny models gain nothing from more, and the CPU is shared."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def fake_python(tmp_path):
    """An executable that runs this Python with the stand-in vllm package of tests/fixtures/fake_vllm
    importable (a fast stand-in for the vLLM server; tests/integration runs the real one)."""
    import sys

    fake = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "fake_vllm")
    exe = tmp_path / "fake-python"
    exe.write_text(f'#!/bin/sh\nPYTHONPATH="{fake}" exec "{sys.executable}" "$@"\n')
    exe.chmod(0o755)
    return str(exe)


@pytest.fixture
def fake_engine(fake_python, tmp_path, monkeypatch, tiny_model_dir):
    """A VLLMEngine owning a stand-in vLLM server (base 'tiny', LoRA 'prism'); requests are logged to
    ``tmp_path/requests.jsonl``. Closing the engine must stop the server it owns."""
    from prism_persona.engines.vllm import VLLMEngine, VLLMServer
    from prism_persona.models import load_tokenizer

    monkeypatch.setenv("FAKE_VLLM_REQUESTS", str(tmp_path / "requests.jsonl"))
    srv = VLLMServer(
        str(tiny_model_dir), "tiny", fake_python, tmp_path / "vllm.log", loras={"prism": "/a"}, quiet=True
    ).start()
    engine = VLLMEngine(srv.base_url, "tiny", load_tokenizer(str(tiny_model_dir)), server=srv, concurrency=4)
    yield engine
    engine.close()
    assert srv.proc is None


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: for checks that must come before the (slow) load."""
    import prism_persona.gated.model as GM  # imported first: it binds models.load_model at import
    import prism_persona.models as M
    import prism_persona.train.pipeline  # noqa: F401

    for module in (M, GM):
        monkeypatch.setattr(module, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))


@pytest.fixture
def scripted(monkeypatch):
    """Every engine the pipeline builds is the scripted bootstrap engine (no generation model)."""
    import prism_persona.engines as E
    from prism_persona.testing import BootstrapEngine

    monkeypatch.setattr(E, "make_engine", lambda cfg, model=None, tokenizer=None: BootstrapEngine())


HOLD_LOCK = """
import sys, time
sys.path.insert(0, {src!r})
from prism_persona.store import RunLock
with RunLock({out!r}):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def lock_holder():
    """``hold(run_dir)``: another process holding the run's lock (killed at the end of the test)."""
    import subprocess
    import sys

    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    procs = []

    def hold(out) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK.format(src=src, out=str(out))], stdout=subprocess.PIPE, text=True
        )
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()
