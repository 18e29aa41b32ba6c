"""``prism check``: does the method work on queries it was never trained on?

The bootstrap's own held-out split says how well the gate fits the model's *generated* queries; this
check asks what users need to know, on a file of held-out queries (hand-written, labelled by domain,
optionally by the route you expect):

* **routing** -- the share of each domain's queries the gate routes to the LoRA, and how well the gate
  probability separates the queries that should be routed (AUC, balanced accuracy at the artifact's
  threshold) when the file (``route``) or ``--rewarded DOMAINS`` says which should be;
* **behaviour transfer** -- the judge's win rate of the LoRA *without* the persona against the base
  model, divided by the win rate of the persona *prompt* against the base model, on the same queries
  with the same judge (both orders; a win only if it wins both). 1.0 = the LoRA carries all of the
  persona's effect; 0 = none of it;
* **per persona** (a K-way gate) -- the confusion matrix of expected persona (or base) against the
  gate's decision on the queries with an expected route;
* **base identity** -- the share of unrouted queries whose PRISM answer (gate deciding, mixed batches)
  is token-identical to the base model's answer (greedy decoding): PRISM must leave them untouched;
* **repetition loops** -- the share of answers stuck repeating a phrase, per system (distillation
  must not add loops the base model does not make).

Four systems answer every query, greedily: ``base`` (LoRA off), ``lora`` (LoRA forced on, no
persona), ``persona`` (LoRA off, the domain's persona in the prompt), ``prism`` (the gate decides).
Answers and verdicts are stored in ``OUT/answers.jsonl`` / ``OUT/verdicts.jsonl`` as they are made, so
a killed check resumes; the report is ``OUT/check.json``, ``check.md`` and ``check.png``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import PrismError
from ..text import is_loop, md_table

log = logging.getLogger(__name__)

SYSTEMS = ("base", "lora", "persona", "prism")
PAIRS = {"lora_vs_base": ("lora", "base"), "persona_vs_base": ("persona", "base")}
TRUE_WORDS, FALSE_WORDS = {"1", "true", "yes", "y", "on"}, {"0", "false", "no", "n", "off"}


@dataclass(frozen=True)
class HeldoutQuery:
    key: str
    domain: str
    query: str
    route: Optional[bool]  # the route the user expects, when known


# -------------------------------------------------------------------------------------------- input


def load_heldout(
    path: str | Path, rewarded: Sequence[str] = (), rewarded_flag: str = "--rewarded", per_domain: int = 0
) -> list[HeldoutQuery]:
    """Held-out queries from a .jsonl/.json/.csv file with ``domain`` and ``query`` (and optionally
    ``route``: true/false). Without a ``route`` column, queries of the ``rewarded`` domains are the
    ones expected to be routed (when ``rewarded`` is given). ``per_domain`` > 0 keeps the first that
    many queries of each domain (in file order)."""
    from ..bootstrap.query_file import domain_and_query, read_rows
    from ..store import content_key

    items, seen = [], {}
    for where, row in read_rows(path, what="held-out queries file"):
        domain, query = domain_and_query(path, where, row)
        route = _route_value(path, where, row.get("route", row.get("expected_route")))
        if route is None and rewarded:
            route = domain in rewarded
        key = content_key("heldout", domain, query)
        if key in seen:
            if seen[key] != route:  # a duplicate is kept once; one that contradicts itself is a mistake
                raise PrismError(f"{path} {where}: {query!r} ({domain}) is listed again with another route")
            continue
        seen[key] = route
        if per_domain and sum(q.domain == domain for q in items) >= per_domain:
            continue
        items.append(HeldoutQuery(key, domain, query, route))
    unknown = sorted(set(rewarded) - {q.domain for q in items})
    if unknown:
        raise PrismError(f"{rewarded_flag} names domains with no held-out queries: {', '.join(unknown)}")
    return items


def _route_value(path, where: str, value) -> Optional[bool]:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise PrismError(f"{path} {where}: 'route' must be true or false, got {value!r}")


def persona_texts(artifact, domains: Sequence[str], persona_files: Optional[dict] = None) -> dict:
    """``{domain: persona text}`` for the persona-prompt system: ``persona_files`` (domain -> path)
    first, else the personas of the run the artifact was assembled in (``RUN/personas.jsonl``)."""
    from ..bootstrap.common import persona_file_text
    from ..bootstrap.personas import load_personas

    texts = {d: persona_file_text(p, d) for d, p in (persona_files or {}).items()}
    run_personas = load_personas(artifact.path.parent) if (artifact.path.parent / "personas.jsonl").is_file() else {}
    length = artifact.config.get("persona_length", "short")
    for d in domains:
        if d not in texts and run_personas.get(d, {}).get(length):
            texts[d] = run_personas[d][length]
    missing = [d for d in domains if d not in texts]
    if missing:
        raise PrismError(
            f"no persona for held-out domain(s) {', '.join(missing)}: the artifact's run has none; "
            "give --persona-file DOMAIN=PATH"
        )
    return texts


def artifact_fingerprint(artifact) -> str:
    """A hash of the gate and adapter weights (answers made with another artifact are not reused)."""
    h = hashlib.sha1()
    for path in (
        artifact.path / "gate.safetensors",
        artifact.path / "gate_config.json",
        *(adapter / "adapter_model.safetensors" for _, adapter in artifact.adapters),  # one per persona
    ):
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


# -------------------------------------------------------------------------------------------- work


def persona_name(meta: dict, names: Sequence[str]) -> str:
    """The persona a routed answer went to, for ``answers.jsonl``: the name the engine gives, or the name
    of the index it gives (a K-way artifact; ``names``: its personas), or the one persona of an artifact
    that lists one; '' where it was not routed or the artifact names none (one adapter for all domains)."""
    k = meta.get("persona")
    if not meta.get("routed"):
        return ""
    if isinstance(k, str):
        return k
    if isinstance(k, int) and not isinstance(k, bool) and 0 <= k < len(names):
        return names[k]
    return names[0] if k is None and len(names) == 1 else ""


def write_answers(
    gm,
    items: Sequence[HeldoutQuery],
    personas: dict,
    placement: str,
    store,
    max_new_tokens: int,
    batch_size: int,
    quiet: bool,
) -> None:
    """Answer every query with every system (greedy); append to ``store`` as batches finish."""
    from ..engines.base import SamplingParams
    from ..models import user_chat, with_persona
    from ..progress import progress

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    force = {"base": False, "lora": True, "persona": False, "prism": None}
    todo = [(s, q) for s in SYSTEMS for q in items if f"{s}:{q.key}" not in store]
    info = getattr(getattr(gm, "gate_bundle", None), "info", None) or {}
    names = [str(p.get("name", "")) if isinstance(p, dict) else str(p) for p in info.get("personas") or []]
    bar = progress(total=len(todo), desc="check answers", disable=quiet, unit="answer")
    for system in SYSTEMS:
        rows = [q for s, q in todo if s == system]
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            chats = [user_chat(q.query) for q in batch]
            if system == "persona":
                chats = [with_persona(c, personas[q.domain], placement) for c, q in zip(chats, batch)]
            outs = gm.generate(chats, params, force=force[system])
            store.extend(
                {
                    "key": f"{system}:{q.key}",
                    "system": system,
                    "query_key": q.key,
                    "text": o.text,
                    "finish": o.finish_reason,
                    "routed": bool(o.meta.get("routed")),
                    "gate_prob": float(o.meta.get("gate_prob", 0.0)),
                    # the gate said route but the query is outside its training region (gate.ood): base model
                    "abstained": bool(o.meta.get("abstained", False)),
                    "persona": persona_name(o.meta, names),
                }
                for q, o in zip(batch, outs)
            )
            bar.update(len(batch))
    bar.close()


def write_verdicts(
    judge, items: Sequence[HeldoutQuery], answers, personas: dict, store, batch_size: int, quiet: bool
) -> None:
    """Judge LoRA vs base and persona vs base for every query, in both orders."""
    from ..judges import judge_swapped_batch
    from ..progress import progress

    todo = [(pair, q) for pair in PAIRS for q in items if f"{pair}:{q.key}" not in store]
    bar = progress(total=len(todo), desc="check verdicts", disable=quiet, unit="pair")
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        triples = []
        for pair, q in batch:
            x, y = PAIRS[pair]
            triples.append(
                (
                    q.query,
                    answers.get(f"{x}:{q.key}")["text"],
                    answers.get(f"{y}:{q.key}")["text"],
                    q.domain,
                    personas.get(q.domain, ""),
                )
            )
        results = judge_swapped_batch(judge, triples)
        store.extend(
            {
                "key": f"{pair}:{q.key}",
                "pair": pair,
                "query_key": q.key,
                "winner": r.winner,
                "x_wins": r.x_wins,
                "orders": [r.first.winner, r.second.winner],
            }
            for (pair, q), r in zip(batch, results)
        )
        bar.update(len(batch))
    bar.close()


# -------------------------------------------------------------------------------------------- summary


def _rate(num: int, den: int) -> Optional[float]:
    return num / den if den else None


def paired_loops(base: Sequence[bool], other: Sequence[bool]) -> dict:
    """Loops a system adds or removes against the base model on the same queries: ``added`` (it
    loops, base does not), ``removed`` (the reverse) and the exact two-sided McNemar p-value of that
    difference (1.0 = no evidence either way; small = a real change, not noise)."""
    from ..stats import exact_mcnemar_p

    added = sum(1 for b, o in zip(base, other) if o and not b)
    removed = sum(1 for b, o in zip(base, other) if b and not o)
    return {"added": added, "removed": removed, "p": exact_mcnemar_p(added, removed)}


def loops_vs_base_text(loops_vs_base: dict) -> str:
    """``"LoRA forced on +4 / -0 (p = 0.12); PRISM +2 / -0 (p = 0.50)"`` from a report's ``loops_vs_base``."""
    return "; ".join(
        f"{name} +{lv['added']} / -{lv['removed']} (p = {lv['p']:.2f})"
        for s, name in (("lora", "LoRA forced on"), ("prism", "PRISM"))
        for lv in [loops_vs_base.get(s)]
        if lv
    )


def summarise(items: Sequence[HeldoutQuery], answers, verdicts, threshold: float) -> dict:
    """Per-domain and overall metrics (see the module docstring)."""
    from ..train.gate import binary_metrics

    def block(qs: Sequence[HeldoutQuery]) -> dict:
        prism = [answers.get(f"prism:{q.key}") for q in qs]
        unrouted = [(q, a) for q, a in zip(qs, prism) if not a["routed"]]
        same = sum(1 for q, a in unrouted if a["text"] == answers.get(f"base:{q.key}")["text"])
        wins = {p: sum(1 for q in qs if verdicts.get(f"{p}:{q.key}")["x_wins"]) for p in PAIRS}
        lora_rate, persona_rate = _rate(wins["lora_vs_base"], len(qs)), _rate(wins["persona_vs_base"], len(qs))
        out = {
            "n": len(qs),
            "routing_rate": _rate(sum(a["routed"] for a in prism), len(qs)),
            "mean_gate_prob": _rate(sum(a["gate_prob"] for a in prism), len(qs)),
            "abstained": sum(bool(a.get("abstained")) for a in prism),
            "expected_route_rate": _rate(sum(1 for q in qs if q.route), sum(1 for q in qs if q.route is not None)),
            "lora_win_rate": lora_rate,
            "persona_win_rate": persona_rate,
            "transfer_ratio": lora_rate / persona_rate if persona_rate else None,
            "unrouted": len(unrouted),
            "base_identity": _rate(same, len(unrouted)),
            "loop_rate": {
                s: _rate(sum(is_loop(answers.get(f"{s}:{q.key}")["text"]) for q in qs), len(qs)) for s in SYSTEMS
            },
            "loops_vs_base": {
                s: paired_loops(
                    [is_loop(answers.get(f"base:{q.key}")["text"]) for q in qs],
                    [is_loop(answers.get(f"{s}:{q.key}")["text"]) for q in qs],
                )
                for s in ("lora", "prism")
            },
        }
        return out

    domains = sorted({q.domain for q in items}, key=[q.domain for q in items].index)
    report = {
        "threshold": threshold,
        "overall": block(items),
        "domains": {d: block([q for q in items if q.domain == d]) for d in domains},
    }
    labelled = [q for q in items if q.route is not None]
    if labelled:
        probs = [answers.get(f"prism:{q.key}")["gate_prob"] for q in labelled]
        m = binary_metrics(probs, [int(q.route) for q in labelled], threshold)
        report["gate_vs_expected_route"] = {k: m[k] for k in ("n", "positives", "accuracy", "balanced_accuracy", "auc")}
    return report


def persona_confusion(gated, items: Sequence[HeldoutQuery]) -> Optional[dict]:
    """A K-way gate's confusion matrix on the held-out queries with an expected route: rows = the
    expected class (the persona of the query's domain where it should be routed, else base), columns =
    the gate's decision (:meth:`GatedModel.decisions`, abstain rules included). ``None`` for a binary gate
    or without labelled queries; queries of a domain no persona of the gate lists are left out (counted)."""
    from ..models import user_chat

    listed = gated.gate_bundle.info.get("personas") or []
    if gated.gate.personas < 2 or len(listed) != gated.gate.personas:
        return None
    of_domain = {d: i + 1 for i, p in enumerate(listed) for d in p.get("domains", ())}
    labelled = [q for q in items if q.route is not None and (not q.route or q.domain in of_domain)]
    if not labelled:
        return None
    names = ["base"] + [str(p.get("name", i)) for i, p in enumerate(listed)]
    matrix = [[0] * len(names) for _ in names]
    for q, d in zip(labelled, gated.decisions([user_chat(q.query) for q in labelled])):
        matrix[of_domain[q.domain] if q.route else 0][d.get("persona", -1) + 1] += 1
    routed_right = {names[c]: _rate(matrix[c][c], sum(matrix[c])) for c in range(1, len(names))}
    return {
        "classes": names,
        "matrix": matrix,
        "routed_to_own_persona": routed_right,
        "base_routed": _rate(sum(matrix[0][1:]), sum(matrix[0])),
        "left_out": sum(1 for q in items if q.route and q.domain not in of_domain),
    }


def fmt(x, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.0f}%" if pct else f"{x:.2f}"


def check_markdown(report: dict) -> str:
    o, g = report["overall"], report.get("gate_vs_expected_route")
    lines = [
        f"# PRISM held-out check: {report['artifact']}",
        "",
        f"{o['n']} held-out queries from `{report['heldout']}`; judge `{report['judge']}`; greedy answers of "
        f"at most {report['max_new_tokens']} tokens; gate threshold {report['threshold']:.3f}.",
        "",
    ]
    if g:
        lines += [
            f"**Gate vs expected route** ({g['n']} labelled, {g['positives']} expected routed): "
            f"AUC {fmt(g['auc'])}, balanced accuracy {fmt(g['balanced_accuracy'])}, accuracy {fmt(g['accuracy'])}.",
            "",
        ]
    lines += [
        f"**Behaviour transfer** (LoRA without persona vs base, over persona prompt vs base): "
        f"{fmt(o['transfer_ratio'])} ({fmt(o['lora_win_rate'], True)} / {fmt(o['persona_win_rate'], True)}).",
        f"**Base identity** (unrouted PRISM answers equal to the base model's): {fmt(o['base_identity'], True)} "
        f"of {o['unrouted']}.",
        f"**Abstained** (the gate probability said route, but the query lies outside the gate's training "
        f"queries, so it went to the base model; gate.ood): {o.get('abstained', 0)} of {o['n']}.",
        "",
    ]
    header = ["domain", "n", "expected route", "routed", "mean gate p", "LoRA wins", "persona wins", "transfer"]
    header += ["base identity", "loops base / LoRA / persona / PRISM"]
    rows = [
        [name, b["n"], fmt(b["expected_route_rate"], True), fmt(b["routing_rate"], True), fmt(b["mean_gate_prob"])]
        + [fmt(b["lora_win_rate"], True), fmt(b["persona_win_rate"], True), fmt(b["transfer_ratio"])]
        + [
            f"{fmt(b['base_identity'], True)} ({b['unrouted']})",
            " / ".join(fmt(b["loop_rate"][s], True) for s in SYSTEMS),
        ]
        for name, b in [*report["domains"].items(), ("**all**", o)]
    ]
    lines.append(md_table(header, rows))
    lines += [
        "",
        "**Loops against the base model** (same queries; added = the system loops where the base model "
        "does not, removed = the reverse; p = paired exact McNemar test): "
        + loops_vs_base_text(o["loops_vs_base"])
        + ".",
    ]
    pc = report.get("persona_confusion")
    if pc:
        names = pc["classes"]
        lines += ["", "**Per persona** (K-way gate; rows: expected, columns: the gate's decision):", ""]
        lines.append(md_table(["expected \\ decided", *names], [[n, *row] for n, row in zip(names, pc["matrix"])]))
    lines += ["", "![check](check.png)", ""]
    return "\n".join(lines)


def check_figure(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doms = list(report["domains"])
    rows = [report["domains"][d] for d in doms]
    fig, axes = plt.subplots(1, 2, figsize=(min(12, 4 + 1.2 * len(doms)), 3.6), dpi=110)
    x = range(len(doms))
    ax = axes[0]
    ax.bar(x, [r["routing_rate"] or 0 for r in rows], color="#4c72b0", label="routed by the gate")
    exp = [r["expected_route_rate"] for r in rows]
    if any(e is not None for e in exp):
        ax.scatter(
            list(x),
            [e if e is not None else float("nan") for e in exp],
            color="black",
            marker="_",
            s=400,
            zorder=3,
            label="expected",
        )
    ax.set_xticks(list(x), doms, rotation=20)
    ax.set_ylim(0, 1.05)
    ax.set_title("routing rate on held-out queries")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
    ax = axes[1]
    w = 0.38
    ax.bar(
        [i - w / 2 for i in x],
        [r["persona_win_rate"] or 0 for r in rows],
        w,
        color="#dd8452",
        label="persona prompt vs base",
    )
    ax.bar(
        [i + w / 2 for i in x],
        [r["lora_win_rate"] or 0 for r in rows],
        w,
        color="#55a868",
        label="LoRA, no persona, vs base",
    )
    ax.set_xticks(list(x), doms, rotation=20)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"judge win rate (transfer {fmt(report['overall']['transfer_ratio'])})")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


# -------------------------------------------------------------------------------------------- entry


def run_check(
    artifact_dir: str | Path,
    check,
    judge_cfg,
    out: Optional[str | Path] = None,
    persona_files: Optional[dict] = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: Optional[int] = None,
    quiet: bool = False,
    gated=None,
) -> dict:
    """Run (or resume) the held-out check of an artifact with the settings of ``check`` (CheckConfig:
    the queries file, rewarded domains, answer length) and ``judge_cfg`` (JudgeConfig: judge and mode);
    return the report (also written to ``out``, default ``<artifact>/../check``). ``gated`` = an
    already loaded :class:`GatedModel` to use."""
    from ..gated.artifact import Artifact
    from ..judges import check_judge_spec, judge_from_spec
    from ..store import RunDir, RunLock

    heldout, rewarded, max_new_tokens = check.queries, check.rewarded, check.max_new_tokens
    judge, judge_mode = judge_cfg.judge, judge_cfg.mode
    if max_new_tokens < 1:
        raise PrismError("--max-new-tokens must be at least 1")
    art = Artifact.read(artifact_dir)
    items = load_heldout(heldout, rewarded, per_domain=getattr(check, "per_domain", 0))
    personas = persona_texts(art, sorted({q.domain for q in items}), persona_files)
    check_judge_spec(judge)
    out_dir = Path(os.path.abspath(Path(out or art.path.parent / "check").expanduser()))  # a link is not followed
    # one writer: the run whose check this is (a `prism run` on it holds the same lock), else --out
    with RunLock(art.path.parent if out_dir == art.path.parent / "check" else out_dir):
        run = RunDir(out_dir)
        answer_settings = {
            "artifact": artifact_fingerprint(art),
            "max_new_tokens": max_new_tokens,
            "personas": {d: hashlib.sha1(t.encode()).hexdigest()[:16] for d, t in sorted(personas.items())},
        }
        answers = run.store("answers", depends_on=answer_settings)
        verdicts = run.store(
            "verdicts", depends_on={"answers": answer_settings, "judge": judge, "judge_mode": judge_mode}
        )
        if gated is None:
            from ..gated.model import GatedModel

            gated = GatedModel.from_pretrained(art.path, device=device, dtype=dtype, batch_size=batch_size)
        bs = batch_size or gated.batch_size
        write_answers(gated, items, personas, art.config.get("placement", "system"), answers, max_new_tokens, bs, quiet)
        the_judge = judge_from_spec(judge, gated.as_engine(force=False), judge_mode)
        try:
            write_verdicts(the_judge, items, answers, personas, verdicts, bs, quiet)
        finally:
            the_judge.close()
        report = summarise(items, answers, verdicts, gated.threshold)
        confusion = persona_confusion(gated, items)
        if confusion is not None:
            report["persona_confusion"] = confusion
        report.update(
            artifact=str(art.path),
            heldout=str(heldout),
            judge=judge,
            judge_mode=getattr(the_judge, "mode", judge_mode),
            max_new_tokens=max_new_tokens,
            rewarded=list(rewarded),
        )
        run.write_json("check.json", report)
        check_figure(report, run.path("check.png"))
        run.path("check.md").write_text(check_markdown(report), encoding="utf-8")
        report["out"] = str(run.root)
        return report
