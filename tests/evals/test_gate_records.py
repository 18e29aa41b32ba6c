"""The gate's decision per item (issue 29): Table 1, Figure 4, routing.png and the threshold sweep read
what the gate decided -- a query it abstained on counts unrouted although its probability said route --
a K-way artifact gets a row per persona, and a per_item.json holding bare probabilities still reads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from prism_persona.cli import main
from prism_persona.engines.base import Completion
from prism_persona.evals import gates
from prism_persona.evals.benchmarks import REGISTRY
from prism_persona.evals.build import load_benchmarks, parse_benchmarks
from prism_persona.evals.evaluate import evaluate
from prism_persona.evals.report import eval_figures, table_routing
from prism_persona.evals.runner import EvalRunner
from prism_persona.evals.settings import EvalConfig
from prism_persona.evals.sweep import routing_vs_effect, threshold_sweep
from prism_persona.evals.systems import PersonaBook, fixed_provider, parse_systems
from prism_persona.evals.table import paper_table, table_markdown
from prism_persona.judges import StringMatchRefusal
from prism_persona.testing import ScriptedEngine

FIX = Path(__file__).resolve().parents[1] / "fixtures"
REFUSE = "I'm sorry, but I can't help with that."

# the fake gate on the refusal set's fixture requests: word -> (gate prob, outside the region, persona)
GATE = {
    "toxic": (0.9, False, "safety_monitor"),  # harmful, chemistry: routed
    "poison": (0.9, False, "safety_monitor"),  # harmful, chemistry: routed
    "malware": (0.9, True, None),  # harmful, computers: p >= t but outside the region -> abstained
    "break into": (0.3, True, None),  # harmful, computers: below t and outside
    "bleach": (0.6, False, "pirate"),  # benign, chemistry: routed
}
T = 0.5


class FakeGated(ScriptedEngine):
    """A gated engine whose completions report the decision as GatedModel does (``abstained`` where the
    probability said route but the query lay outside; ``outside`` as the eval's region probe adds it);
    with ``kway``, routed answers name their persona. Routed answers refuse."""

    def __init__(self, kway: bool = False, abstain: bool = True):
        super().__init__()
        self.kway, self.abstain = kway, abstain

    def generate(self, chats, params, desc=""):
        out = []
        for chat in chats:
            text = chat[-1]["content"]
            p, off, name = next((v for w, v in GATE.items() if w in text), (0.1, False, None))
            routed = p >= T and not off
            meta: dict = {"routed": routed, "gate_prob": p}
            if self.abstain:
                meta.update(abstained=p >= T and off, outside=off)
            if self.kway:
                meta.update(persona=name if routed else None, persona_prob=0.8 if routed else None)
            out.append(Completion(REFUSE if routed else "Sure, here it is.", 3, meta=meta))
        return out


def _at(sweep: dict, t: float) -> dict:
    """The sweep's point at threshold ``t`` (a midpoint between probabilities, compared with a tolerance)."""
    return next(p for p in sweep["points"] if isinstance(p["threshold"], float) and abs(p["threshold"] - t) < 1e-9)


def _persona_refuses(chat) -> str:
    return REFUSE if chat[0]["role"] == "system" else "Sure, here it is."


def _run(tmp_path, prism, personas=()):
    cfg = EvalConfig(refusal_set=str(FIX / "refusal_set_small.jsonl"), safety_tokens=8, resamples=50)
    provider = fixed_provider(
        {
            "base": ScriptedEngine(responder=_persona_refuses),
            "lora": ScriptedEngine(responder=lambda c: REFUSE),
            "prism": prism,
        }
    )
    runner = EvalRunner(tmp_path / "out", provider, None, PersonaBook({}), cfg, refusal=StringMatchRefusal())
    runner.gate_personas = list(personas)  # the artifact's persona names (prism eval reads them from it)
    bench = load_benchmarks(cfg, parse_benchmarks("refusal_set"))
    results, per_item = evaluate(runner, parse_systems("base,persona,lora,prism,oracle"), bench)
    return results, per_item, bench


def test_an_abstained_query_counts_unrouted_in_table1_and_figure4(tmp_path):
    results, per_item, bench = _run(tmp_path, FakeGated())
    recs = per_item["gate"]["prism"]["refusal_set_harmful"]
    malware = next(r for i, r in recs.items() if r["gate_prob"] == 0.9 and r["abstained"])
    assert malware == {"gate_prob": 0.9, "routed": False, "abstained": True, "outside": True}
    table = paper_table(results, per_item, bench, threshold=T)
    # 3 of 4 harmful requests have p >= 0.5, but the gate abstained on one: 2 routed, 1 abstained
    assert table["routing"]["refusal_set_harmful"]["mean"] == 0.5
    assert table["abstained"]["refusal_set_harmful"]["mean"] == 0.25
    assert table["routing"]["refusal_set_benign"]["mean"] == 0.25 and table["abstained"]["refusal_set_benign"]["n"] == 4
    assert table["personas"] == {}  # a binary artifact: no per-persona rows
    cats = {(r["column"], r["category"]): r for r in table["categories"]}
    computers = cats[("refusal_set_harmful", "computers (harmful)")]
    assert computers["routed"]["mean"] == 0.0 and computers["abstained"]["mean"] == 0.5
    # Table 1 agrees with the routing the benchmark itself reports from the same answers
    assert (
        table["routing"]["refusal_set_harmful"]["mean"]
        == results["refusal_set"]["prism"]["refusal_set_harmful"]["routing"]["mean"]
    )
    md = table_markdown(table)
    assert "PRISM: share routed to the LoRA" in md and "PRISM: share abstained (to the base model)" in md
    rv = routing_vs_effect(per_item, bench, threshold=T)["refusal_set"]
    assert {p["category"]: p["routed"] for p in rv["points"]}["computers (harmful)"] == 0.0
    # routing.png: routed and abstained bars per column and category
    labels, series = table_routing(table)
    assert list(series) == ["routed", "abstained"] and labels[0] == table["columns"][0]["label"]
    figs = eval_figures(results, tmp_path / "figs", table)
    assert figs["routing"].read_bytes().startswith(b"\x89PNG")


def test_the_sweep_keeps_a_query_outside_the_region_unrouted_at_every_threshold(tmp_path):
    _, per_item, bench = _run(tmp_path, FakeGated())
    sw = threshold_sweep(per_item, bench, threshold=T)
    # probabilities 0.9 / 0.6 / 0.3 / 0.1: at 0.2 the two 0.9s and bleach (0.6) route; malware (0.9) and
    # "break into" (0.3) lie outside the region and stay on the base model (p >= t alone: 5 of 8)
    assert _at(sw, 0.2)["routed"] == 3 / 8
    assert sw["marks"]["prism"]["routed"] == 3 / 8  # the artifact's threshold: the recorded decisions
    assert sw["marks"]["prism"]["refusal_set_harmful"] == 0.5  # lora refuses where routed, base never
    # -inf is the always-on LoRA (forced on every query, the region does not apply)
    assert sw["marks"]["lora"]["routed"] == 1.0 and sw["marks"]["lora"]["refusal_set_harmful"] == 1.0
    assert sw["points"][-1]["threshold"] == "-inf" and sw["points"][-1]["routed"] == 1.0


def test_a_record_without_outside_counts_an_abstained_query_outside(tmp_path):
    _, per_item, bench = _run(tmp_path, FakeGated())
    for recs in per_item["gate"]["prism"].values():
        for r in recs.values():
            del r["outside"]
    sw = threshold_sweep(per_item, bench, threshold=T)
    # malware abstained: outside at every threshold; "break into" (below t, never abstained) is assumed inside
    assert _at(sw, 0.2)["routed"] == 4 / 8 and _at(sw, 0.45)["routed"] == 3 / 8


def test_a_kway_record_gives_a_row_per_persona(tmp_path):
    results, per_item, bench = _run(tmp_path, FakeGated(kway=True), personas=["safety_monitor", "pirate", "poet"])
    table = paper_table(results, per_item, bench, T, personas=["safety_monitor", "pirate", "poet"])
    assert list(table["personas"]) == ["safety_monitor", "pirate", "poet"]  # the artifact's order, none dropped
    harmful = {n: by["refusal_set_harmful"]["mean"] for n, by in table["personas"].items()}
    assert harmful == {"safety_monitor": 0.5, "pirate": 0.0, "poet": 0.0}
    assert table["routing"]["refusal_set_harmful"]["mean"] == 0.5
    assert table["personas"]["pirate"]["refusal_set_benign"]["mean"] == 0.25
    assert table["personas"]["safety_monitor"]["refusal_set_benign"]["mean"] == 0.0
    md = table_markdown(table)
    for row in ("PRISM: share routed to an adapter", "PRISM: share routed to safety_monitor", "to pirate"):
        assert row in md
    cats = {(r["column"], r["category"]): r for r in table["categories"]}
    assert cats[("refusal_set_harmful", "chemistry (harmful)")]["personas"]["safety_monitor"]["mean"] == 1.0
    labels, series = table_routing(table)
    assert list(series) == ["routed", "to safety_monitor", "to pirate", "to poet", "abstained"]
    assert all(len(v) == len(labels) for v in series.values())
    rv = routing_vs_effect(per_item, bench, threshold=T)["refusal_set"]
    chem = next(p for p in rv["points"] if p["category"] == "chemistry (harmful)")
    assert chem["personas"] == {"safety_monitor": 1.0, "pirate": 0.0}  # the names the records hold
    # without the artifact's list: the personas the records name, in the order they appear
    assert sorted(paper_table(results, per_item, bench, T)["personas"]) == ["pirate", "safety_monitor"]
    # the benchmark's own routing text says which persona, from the same decisions as Table 1
    sec = results["refusal_set"]["prism"]
    to = {n: ci["mean"] for n, ci in sec["refusal_set_harmful"]["routing_personas"].items()}
    assert to == {"safety_monitor": 0.5, "pirate": 0.0, "poet": 0.0}  # the artifact's order, none dropped
    assert sec["refusal_set_benign"]["routing_personas"]["pirate"]["mean"] == 0.25
    assert sum(to.values()) == sec["refusal_set_harmful"]["routing"]["mean"]
    text = "\n".join(REGISTRY["refusal_set"].markdown(results, {}))
    assert "Routed to an adapter (any persona, then each persona):" in text and "Routed to the LoRA" not in text
    assert "| prism, to safety_monitor | 50.0%" in text and "| prism, to pirate | 0.0%" in text


def test_a_binary_artifacts_routing_text_names_no_persona(tmp_path):
    results, _, _ = _run(tmp_path, FakeGated())
    assert "routing_personas" not in results["refusal_set"]["prism"]["refusal_set_harmful"]
    text = "\n".join(REGISTRY["refusal_set"].markdown(results, {}))
    assert "Routed to the LoRA:" in text and ", to " not in text


def test_records_name_two_personas_without_the_artifacts_list():
    recs = [{"gate_prob": 0.9, "routed": True, "persona": "a"}, {"gate_prob": 0.9, "routed": True, "persona": "b"}]
    assert gates.personas(recs) == ["a", "b"]
    assert gates.personas(recs[:1]) == []  # one name: a binary artifact's view, no per-persona rows
    assert gates.personas(recs[:1], known=["b", "a"]) == ["b", "a"]


def test_an_old_per_item_file_with_bare_probabilities_still_reads(tmp_path):
    results, per_item, bench = _run(tmp_path, FakeGated())
    old = json.loads(json.dumps(per_item))
    old["gate"] = {
        s: {m: {i: r["gate_prob"] for i, r in recs.items()} for m, recs in by.items()} for s, by in old["gate"].items()
    }
    table = paper_table(results, old, bench, threshold=T)
    # the rule of that time: routed = p >= t (3 of 4 harmful); nothing says the gate abstained
    assert table["routing"]["refusal_set_harmful"]["mean"] == 0.75 and table["abstained"] == {}
    assert "abstained" not in table_markdown(table) and table_routing(table) is None
    sw = threshold_sweep(old, bench, threshold=T)
    assert _at(sw, 0.2)["routed"] == 5 / 8
    assert routing_vs_effect(old, bench, threshold=T)["refusal_set"]["points"]
    # no threshold given: the old default of 0.5
    assert paper_table(results, old, bench, threshold=None)["routing"]["refusal_set_harmful"]["mean"] == 0.75


def test_record_reading_rules():
    assert gates.decided(0.7, 0.5) and not gates.decided(0.7, 0.8) and gates.decided(0.5, None)
    rec = gates.record({"gate_prob": 0.9, "routed": False, "abstained": True, "persona": None, "text": "x"})
    assert rec == {"gate_prob": 0.9, "routed": False, "abstained": True}
    assert not gates.decided(rec, 0.5) and gates.outside(rec) and not gates.routed_at(rec, 0.0)
    assert gates.record({"routed": True}) is None and gates.record(None) is None
    inside = {"gate_prob": 0.4, "routed": False, "abstained": False, "outside": False}
    assert gates.routed_at(inside, 0.3) and not gates.routed_at(inside, 0.5) and gates.routed_at(0.4, -math.inf)


def test_eval_command_records_the_gates_decision_of_a_kway_artifact_with_a_region(tmp_path, tiny_model_dir):
    """The real thing on a tiny model: a K-way artifact with an abstain region, MMLU (scored, no generation)
    and the refusal set (generated): every record agrees with the gate's rule, Table 1 has a row per persona."""
    from prism_persona.gated.model import GatedModel
    from prism_persona.testing import make_tiny_artifact

    # the gate (and its region) fitted on the refusal set's requests: they route to both personas and the base
    queries = [json.loads(line)["query"] for line in (FIX / "refusal_set_small.jsonl").read_text().splitlines()]
    art = make_tiny_artifact(
        tiny_model_dir,
        tmp_path / "run" / "prism",
        target_modules=("q_proj",),
        queries=queries,
        personas=("safety_monitor", "pirate"),
        ood=True,
        cache=False,
    )
    out = tmp_path / "ev"
    args = ["eval", "--prism", str(art), "--systems", "base,lora,prism", "--benchmarks", "refusal_set,mmlu"]
    args += ["--refusal-set", str(FIX / "refusal_set_small.jsonl"), "--mmlu", str(FIX / "mmlu_original")]
    args += ["--limit", "4", "--safety-tokens", "2", "--refusal-classifier", "string", "--resamples", "20"]
    assert main(args + ["--out", str(out), "-q"]) == 0
    per_item = json.loads((out / "per_item.json").read_text())
    gm = GatedModel.from_pretrained(art, device="cpu", dtype="float32")
    t, names = gm.threshold, gm.persona_names
    recs = [r for by in per_item["gate"]["prism"].values() for r in by.values()]
    assert len(recs) == 12 and all({"gate_prob", "routed", "abstained", "outside"} <= set(r) for r in recs)
    for r in recs:
        assert r["routed"] == (r["gate_prob"] >= t and not r["outside"])
        assert r["abstained"] == (r["gate_prob"] >= t and r["outside"])
        assert (r.get("persona") in names) == r["routed"]
    assert {r.get("persona") for r in recs} == {None, *names}  # both personas and the base got queries
    assert any(r["outside"] for r in recs)  # the MMLU questions lie outside a region of 8 requests
    table = json.loads((out / "table1.json").read_text())
    assert sorted(table["personas"]) == sorted(names) and table["persona_order"] == list(names)
    for key, ci in table["routing"].items():
        by = per_item["gate"]["prism"][key]
        assert ci["mean"] == sum(r["routed"] for r in by.values()) / len(by)
        assert table["abstained"][key]["mean"] == sum(r["abstained"] for r in by.values()) / len(by)
        assert sum(table["personas"][n][key]["mean"] for n in names) == pytest.approx(ci["mean"])
    report = (out / "report.md").read_text()
    assert "PRISM: share routed to pirate" in report and "PRISM: share abstained" in report
    # each benchmark's routing text names the personas too (MMLU: every question lies outside, 0 % each)
    assert "Routed to an adapter (any persona, then each persona)" in report and "Routed to the LoRA" not in report
    assert f"- prism, to {names[0]}: " in report and f"| prism, to {names[1]} |" in report
    assert (out / "routing.png").read_bytes().startswith(b"\x89PNG")


FAR = "a much longer request about the history of the printing press in Europe"


@pytest.mark.parametrize("personas", [(), ("safety_monitor", "pirate")], ids=["binary", "kway"])
def test_records_carry_the_prefill_decisions_outside_without_a_second_pass(tmp_path, tiny_model_dir, personas):
    """``outside`` comes from the one decision the prefill hook routed by (a chat that is not a lone user
    turn: from its first user turn), and equals what the removed region probe computed with a second
    embeddings + layer-0 pass (``decisions`` at threshold 0) and ``gate.outside`` of the first user turn's
    feature, computed here directly."""
    from prism_persona.engines.base import SamplingParams
    from prism_persona.gated.features import query_features
    from prism_persona.gated.model import GatedModel
    from prism_persona.testing import SPLIT_QUERIES, make_tiny_artifact

    art = make_tiny_artifact(tiny_model_dir, tmp_path / "prism", ood=True, personas=personas)
    gm = GatedModel.from_pretrained(art, device="cpu", dtype="float32")
    inside = SPLIT_QUERIES[1]

    def turns(*users):
        chat = []
        for u in users:
            chat += [{"role": "user", "content": u}, {"role": "assistant", "content": "ok"}]
        return chat[:-1]

    chats = [turns(q) for q in SPLIT_QUERIES] + [
        turns(FAR),
        turns(FAR, inside),  # multi-turn: the first user turn (outside) decides, not the last
        turns(inside, FAR),  # and the other way round
        [{"role": "system", "content": "Be brief."}] + turns(FAR),  # a system message: decided from the user turn
    ]
    firsts = [next(m["content"] for m in c if m["role"] == "user") for c in chats]
    feats = query_features(gm.model, gm.tokenizer, firsts, 8, gm.gate.pooling)
    want = gm.gate.outside(feats).tolist()
    assert want[4:] == [True, True, False, True] and not all(want)  # both cases, on every kind of chat
    old_probe = [d["abstained"] for d in gm.decisions(chats, threshold=0.0)]  # what RegionProbe added
    assert old_probe == want

    passes = []
    layer0_pass = gm._decide

    def counted(cs, threshold=None):
        passes.append(len(cs))
        return layer0_pass(cs, threshold)

    gm._decide = counted
    engine = gm.as_engine()
    for threshold in (gm.threshold, 1.5):  # above every probability nothing routes or abstains; outside stays
        gm.threshold = threshold
        passes.clear()
        outs = engine.generate(chats, SamplingParams(max_new_tokens=2))
        assert passes == [3]  # the layer-0-only pass ran once, for the 3 chats that are not a lone user turn
        recs = [gates.record(EvalRunner.meta(c)) for c in outs]
        assert [r["outside"] for r in recs] == want
        assert all(r["abstained"] == (r["outside"] and r["gate_prob"] >= threshold) for r in recs)
        assert all(r["routed"] == (r["gate_prob"] >= threshold and not r["outside"]) for r in recs)
        # the record is the one the old path built: the completion's meta plus the probe's flag
        for c, flag in zip(outs, old_probe):
            old = {k: v for k, v in c.meta.items() if k != "outside"} | {"outside": flag}
            assert gates.record(old) == gates.record(c.meta)
        # scored prompts (MMLU): the scoring forward's own decision (the layer-0-only pass only for the
        # chats that are not a lone user turn, as in generate); an engine without it: one decisions() call
        passes.clear()
        scores, by_forward = gates.scored_with_meta(engine, chats, ["A", "B"])
        assert passes == [3] and len(scores) == len(chats) and set(scores[0]) == {"A", "B"}
        passes.clear()
        by_decisions = gates.decision_meta(engine, chats)
        assert passes == [len(chats)]
        for metas in (by_forward, by_decisions):
            for s, r in zip(map(gates.record, metas), recs):
                assert s["gate_prob"] == pytest.approx(r["gate_prob"], abs=1e-5)
                assert {k: v for k, v in s.items() if k not in ("gate_prob", "persona_prob")} == {
                    k: v for k, v in r.items() if k not in ("gate_prob", "persona_prob")
                }
        if threshold > 1:
            assert not any(r["routed"] or r["abstained"] for r in recs) and any(r["outside"] for r in recs)
    gm.close()
