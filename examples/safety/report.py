"""Refusal rates, routing per intent and the gate's AUC within each domain, from a finished
held-out check of the safety kit (``prism run --heldout`` or ``prism check``).

    python examples/safety/report.py runs/safety/check [examples/safety/heldout.jsonl]

Reads the check's stored answers (``CHECK/answers.jsonl``: base model, LoRA forced on, persona prompt,
PRISM) and prints, overall and per domain: per intent (harmful / benign) the share of answers of each
system that refuse (the rule in judge.py) and the share of queries PRISM's gate routed; and the AUC of
the gate probability for harmful vs benign requests (within a domain, the domain cannot decide).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from prism_persona.stats import auc
from prism_persona.store import content_key

sys.path.insert(0, str(Path(__file__).resolve().parent))
from judge import refuses  # noqa: E402

SYSTEMS = ("base", "persona", "lora", "prism")
NAMES = {"base": "base model", "persona": "persona prompt", "lora": "LoRA forced on", "prism": "PRISM"}
INTENTS = ("harmful", "benign")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def intent_report(check_dir: str | Path, heldout: str | Path) -> dict:
    """``{"all" | domain: {"gate_auc": AUC, intent: {"n", "routed", system: refusal rate, ...}}}``."""
    answers = {a["key"]: a for a in read_jsonl(Path(check_dir) / "answers.jsonl")}
    rows = read_jsonl(Path(heldout))
    out: dict = {}
    for scope in ["all"] + sorted({r["domain"] for r in rows}):
        out[scope] = {}
        probs, harmful = [], []
        for intent in INTENTS:
            qs = [r for r in rows if r["intent"] == intent and scope in ("all", r["domain"])]
            keys = [content_key("heldout", r["domain"], r["query"].strip()) for r in qs]
            probs += [answers[f"prism:{k}"]["gate_prob"] for k in keys]
            harmful += [int(intent == "harmful")] * len(keys)
            cell = {"n": len(qs), "routed": sum(answers[f"prism:{k}"]["routed"] for k in keys) / len(qs)}
            for s in SYSTEMS:
                cell[s] = sum(refuses(answers[f"{s}:{k}"]["text"]) for k in keys) / len(qs)
            out[scope][intent] = cell
        out[scope]["gate_auc"] = auc(probs, harmful)
    return out


def markdown(report: dict) -> str:
    head = "| scope | gate AUC | intent | n | routed | " + " | ".join(f"refused: {NAMES[s]}" for s in SYSTEMS) + " |"
    lines = [head, "|" + "---|" * (5 + len(SYSTEMS))]
    for scope, rep in report.items():
        for intent in INTENTS:
            c = rep[intent]
            cells = " | ".join(f"{100 * c[s]:.0f}%" for s in SYSTEMS)
            lines.append(
                f"| {scope} | {rep['gate_auc']:.2f} | {intent} | {c['n']} | {100 * c['routed']:.0f}% | {cells} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    default = Path(__file__).resolve().parent / "heldout.jsonl"
    print(markdown(intent_report(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else default)))
