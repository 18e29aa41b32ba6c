"""lm-eval backend: real lm-eval runs (local task YAMLs on fixture data) on a tiny PRISM artifact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

from prism_persona.errors import PrismError  # noqa: E402

FIX = Path(__file__).resolve().parents[1] / "fixtures"


def _local_mmlu_yaml(folder: Path) -> Path:
    """The shipped prism_mmlu task, pointed at the fixture file instead of the hub."""
    from prism_persona.evals.lmeval_tasks import TASKS_DIR

    text = (TASKS_DIR / "prism_mmlu.yaml").read_text()
    text = text.replace("task: prism_mmlu\n", "task: prism_mmlu_fixture\n")
    text = text.replace(
        "dataset_path: cais/mmlu\ndataset_name: all\n",
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {FIX / 'mmlu_hf.jsonl'}\n",
    )
    out = folder / "prism_mmlu_fixture.yaml"
    out.write_text(text)
    return out


def _other_tasks(folder: Path) -> None:
    docs = folder / "texts.jsonl"
    docs.write_text(
        "\n".join(
            json.dumps({"text": t, "question": q, "answer": a})
            for t, q, a in [
                ("The rain in Spain stays mainly in the plain.", "What is 2+2?", "4"),
                ("def add(a, b):\n    return a + b\n", "Name a colour.", "red"),
            ]
        )
        + "\n"
    )
    (folder / "rolling.yaml").write_text(
        f"task: tiny_rolling\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {docs}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\nmetadata:\n  version: 1.0\n"
    )
    (folder / "gen.yaml").write_text(
        f"task: tiny_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {docs}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n\\n']\n  max_gen_toks: 4\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\nmetadata:\n  version: 1.0\n"
    )


def _evaluate(lm, folder: Path, tasks, chat: bool = True):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(folder), include_defaults=False),
        apply_chat_template=chat,
        log_samples=True,
        bootstrap_iters=0,
        batch_size=4,
    )


def test_lmeval_mmlu_agrees_with_prism_eval(tmp_path, tiny_model_dir):
    """The same 6 questions, the same prompt: lm-eval's argmax == prism eval's prediction, same routing."""
    from prism_persona.evals.benchmarks.mmlu import LETTERS, MMLUEvaluator, load_mmlu, mmlu_prompt
    from prism_persona.evals.lmeval import PrismLM
    from prism_persona.evals.runner import EvalRunner
    from prism_persona.evals.systems import SystemSpec, fixed_provider
    from prism_persona.gated.model import GatedModel
    from prism_persona.testing import make_tiny_artifact

    art = make_tiny_artifact(tiny_model_dir, tmp_path / "run" / "prism")
    _local_mmlu_yaml(tmp_path)
    items = load_mmlu(FIX / "mmlu_hf.jsonl")
    gm = GatedModel.from_pretrained(art, device="cpu", dtype="float32")
    # a threshold that routes half of these six prompts, so both routes are compared
    probs = sorted(p for p, _ in gm.route([[{"role": "user", "content": mmlu_prompt(it)}] for it in items]))
    gm.threshold = (probs[2] + probs[3]) / 2
    lm = PrismLM(
        artifact=str(art),
        system="prism",
        device="cpu",
        dtype="float32",
        batch_size=4,
        threshold=gm.threshold,
        routing_file=str(tmp_path / "routing.json"),
    )
    res = _evaluate(lm, tmp_path, ["prism_mmlu_fixture"])
    samples = sorted(res["samples"]["prism_mmlu_fixture"], key=lambda s: s["doc_id"])
    lm_preds = [max(range(4), key=lambda k: s["resps"][k][0][0]) for s in samples]

    runner = EvalRunner(str(tmp_path / "ev"), fixed_provider({"prism": gm.as_engine()}))
    recs = MMLUEvaluator().responses(runner, SystemSpec("prism"), items)
    prism_preds = [LETTERS.index(recs[it.item_id]["pred"]) for it in items]
    assert lm_preds == prism_preds
    acc = sum(p == it.answer for p, it in zip(prism_preds, items)) / len(items)
    assert res["results"]["prism_mmlu_fixture"]["acc,none"] == pytest.approx(acc)
    # routing: per question the same decision as prism eval's (4 choices share their context's decision)
    routed_docs = sum(bool(recs[it.item_id]["meta"]["routed"]) for it in items)
    report = json.loads((tmp_path / "routing.json").read_text())
    ll = report["tasks"]["prism_mmlu_fixture"]["loglikelihood"]
    assert ll == {"routed": 4 * routed_docs, "n": 24, "rate": routed_docs / 6}
    assert routed_docs == 3


def test_lmeval_rolling_and_generation_route_per_request(tmp_path, tiny_model_dir):
    from prism_persona.evals.lmeval import PrismLM
    from prism_persona.testing import make_tiny_artifact

    art = make_tiny_artifact(tiny_model_dir, tmp_path / "run" / "prism")
    _other_tasks(tmp_path)
    runs = {}
    for system in ("base", "lora", "prism"):
        lm = PrismLM(artifact=str(art), system=system, device="cpu", dtype="float32", batch_size=2)
        res = _evaluate(lm, tmp_path, ["tiny_rolling", "tiny_gen"], chat=False)
        runs[system] = (res, lm.routing_report())
    for _system, (res, report) in runs.items():
        assert res["results"]["tiny_rolling"]["word_perplexity,none"] > 1.0
        assert report["tasks"]["tiny_rolling"]["loglikelihood_rolling"]["n"] == 2
        assert report["tasks"]["tiny_gen"]["generate_until"]["n"] == 2
    assert runs["base"][1]["overall"]["routed"] == 0 and runs["lora"][1]["overall"]["rate"] == 1.0
    # the adapter changes the numbers: lora's perplexity differs from base's
    ppl = {s: r[0]["results"]["tiny_rolling"]["word_perplexity,none"] for s, r in runs.items()}
    assert ppl["lora"] != pytest.approx(ppl["base"])
    # prism equals base or lora per document, depending on its routing
    r = runs["prism"][1]["tasks"]["tiny_rolling"]["loglikelihood_rolling"]["routed"]
    if r == 0:
        assert ppl["prism"] == pytest.approx(ppl["base"])
    elif r == 2:
        assert ppl["prism"] == pytest.approx(ppl["lora"])


def test_lmeval_bad_model_args(tmp_path, tiny_model_dir):
    from prism_persona.evals.lmeval import PrismLM

    with pytest.raises(PrismError, match="oracle needs a judge"):
        PrismLM(artifact="x", system="oracle")
    with pytest.raises(PrismError, match="needs artifact=RUN/prism"):
        PrismLM(system="prism")
    with pytest.raises(PrismError, match="unknown system"):
        PrismLM(artifact="x", system="gpt4")
    lm = PrismLM(pretrained=str(tiny_model_dir), system="base", device="cpu", dtype="float32")
    assert lm.routing_report()["overall"]["n"] == 0


def test_prism_is_registered_with_lm_eval():
    from lm_eval.api.registry import get_model

    import prism_persona.evals.lmeval as backend

    assert get_model("prism") is backend.PrismLM


def test_lmeval_persona_system_needs_chat_template_and_changes_scores(tmp_path, tiny_model_dir):
    from prism_persona.evals.lmeval import PrismLM
    from prism_persona.testing import make_tiny_artifact

    art = make_tiny_artifact(tiny_model_dir, tmp_path / "run" / "prism")
    _local_mmlu_yaml(tmp_path)
    personas = tmp_path / "personas.json"
    personas.write_text(json.dumps({"chemistry": "You are a meticulous chemistry professor."}))
    with pytest.raises(PrismError, match="persona_file=JSON and domain=NAME"):
        PrismLM(artifact=str(art), system="persona", device="cpu", dtype="float32")
    lm = PrismLM(
        artifact=str(art),
        system="persona",
        persona_file=str(personas),
        domain="chemistry",
        device="cpu",
        dtype="float32",
        batch_size=4,
    )
    with pytest.raises(PrismError, match="--apply_chat_template"):
        _evaluate(lm, tmp_path, ["prism_mmlu_fixture"], chat=False)
    res = _evaluate(lm, tmp_path, ["prism_mmlu_fixture"])
    sample = min(res["samples"]["prism_mmlu_fixture"], key=lambda s: s["doc_id"])
    assert "You are a meticulous chemistry professor." in sample["arguments"][0][0]
    base = PrismLM(artifact=str(art), system="base", device="cpu", dtype="float32", batch_size=4)
    bsample = min(
        _evaluate(base, tmp_path, ["prism_mmlu_fixture"])["samples"]["prism_mmlu_fixture"], key=lambda s: s["doc_id"]
    )
    assert sample["resps"][0][0][0] != pytest.approx(bsample["resps"][0][0][0])
    assert lm.routing_report()["overall"]["routed"] == 0  # the persona system never routes


def test_lmeval_routes_a_kway_artifact_to_each_contexts_persona(tmp_path, tiny_model_dir):
    """One adapter per persona: each request runs with the adapter of the persona its context picks (the
    same answers as prism eval's in-process model), and the routing report counts each persona."""
    from collections import Counter

    import torch

    from prism_persona.evals.benchmarks.mmlu import LETTERS, MMLUEvaluator, load_mmlu, mmlu_prompt
    from prism_persona.evals.lmeval import PrismLM
    from prism_persona.evals.runner import EvalRunner
    from prism_persona.evals.systems import SystemSpec, fixed_provider
    from prism_persona.gated.model import GatedModel
    from prism_persona.testing import make_tiny_artifact

    art = make_tiny_artifact(tiny_model_dir, tmp_path / "run" / "prism", personas=("story", "monitor"))
    _local_mmlu_yaml(tmp_path)
    items = load_mmlu(FIX / "mmlu_hf.jsonl")
    gm = GatedModel.from_pretrained(art, device="cpu", dtype="float32")
    chats = [[{"role": "user", "content": mmlu_prompt(it)}] for it in items]
    want = Counter(d["persona_name"] for d in gm.decisions(chats) if d["routed"])
    lm = PrismLM(artifact=str(art), system="prism", device="cpu", dtype="float32", batch_size=4, threshold=gm.threshold)
    res = _evaluate(lm, tmp_path, ["prism_mmlu_fixture"])
    samples = sorted(res["samples"]["prism_mmlu_fixture"], key=lambda s: s["doc_id"])
    runner = EvalRunner(str(tmp_path / "ev"), fixed_provider({"prism": gm.as_engine()}))
    recs = MMLUEvaluator().responses(runner, SystemSpec("prism"), items)
    assert [max(range(4), key=lambda k: s["resps"][k][0][0]) for s in samples] == [
        LETTERS.index(recs[it.item_id]["pred"]) for it in items
    ]
    report = lm.routing_report()
    # a request's score is its context's persona's adapter's (not the persona of context + continuation)
    text = lm.apply_chat_template([{"role": "user", "content": mmlu_prompt(items[0])}])
    ctx, cont = lm.tok_encode(text), lm.tok_encode(" B")
    _, (persona,) = lm.route([lm._context_tokens(text)])
    ((got, _),) = lm._loglikelihood_tokens([((text, " B"), ctx, cont)])
    for name, same in ((persona, True), ({"story": "monitor", "monitor": "story"}.get(persona, "story"), False)):
        logp = lm._logits([ctx + cont[:-1]], [name])[0, len(ctx) - 1 :]
        want_lp = float(logp.gather(-1, torch.tensor(cont).unsqueeze(-1)).sum())
        assert (got == pytest.approx(want_lp, abs=1e-5)) is same
    assert set(want) == {"story", "monitor"}  # both personas are exercised
    assert report["overall"]["personas"] == {name: 4 * n for name, n in want.items()}  # 4 choices per question


def test_lmeval_routing_report_counts_the_requests_the_gate_abstained_on(tmp_path, tiny_model_dir):
    """A gate with an abstain region: at threshold 0 every context's probability says route, so the routed
    requests are those inside the region and the report counts the others as abstained (as decide does;
    before, the report said nothing of them)."""
    from prism_persona.evals.benchmarks.mmlu import load_mmlu, mmlu_prompt
    from prism_persona.evals.lmeval import PrismLM
    from prism_persona.gated.model import GatedModel
    from prism_persona.testing import make_tiny_artifact

    _local_mmlu_yaml(tmp_path)
    items = load_mmlu(FIX / "mmlu_hf.jsonl")
    prompts = [mmlu_prompt(it) for it in items]
    # the region: everyday requests; the knowledge questions lie outside it (the gate's own decide says so)
    others = [json.loads(line)["query"] for line in (FIX / "refusal_set_small.jsonl").read_text().splitlines()]
    art = make_tiny_artifact(tiny_model_dir, tmp_path / "run" / "prism", queries=others, ood=True, cache=False)
    gm = GatedModel.from_pretrained(art, device="cpu", dtype="float32")
    decided = gm.decisions([[{"role": "user", "content": p}] for p in prompts], threshold=0.0)
    outside = sum(d["abstained"] for d in decided)
    assert outside == len(items)
    lm = PrismLM(artifact=str(art), system="prism", device="cpu", dtype="float32", batch_size=4, threshold=0.0)
    _evaluate(lm, tmp_path, ["prism_mmlu_fixture"])
    overall = lm.routing_report()["overall"]
    assert overall["n"] == 4 * len(items)  # 4 choices per question, one decision per context
    assert overall["abstained"] == 4 * outside and overall["routed"] == 4 * (len(items) - outside)
