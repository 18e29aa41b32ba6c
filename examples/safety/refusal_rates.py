"""Refusal rates and routing per intent from a finished held-out check of the safety kit.

    python examples/safety/refusal_rates.py runs/safety/check [examples/safety/heldout.jsonl]

Reads the check's stored answers (``CHECK/answers.jsonl``: base model, LoRA forced on, persona prompt,
PRISM) and prints, per system and intent (harmful / benign), the share of answers that refuse (the
rule in judge.py) and, for PRISM, the share of queries the gate routed; overall and per domain.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from prism_persona.store import content_key

sys.path.insert(0, str(Path(__file__).resolve().parent))
from judge import refuses  # noqa: E402

SYSTEMS = ("base", "persona", "lora", "prism")
NAMES = {"base": "base model", "persona": "persona prompt", "lora": "LoRA forced on", "prism": "PRISM"}
INTENTS = ("harmful", "benign")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def refusal_rates(check_dir: str | Path, heldout: str | Path) -> dict:
    """``{"all" | domain: {intent: {"n", "routed", system: refusal rate, ...}}}``."""
    answers = {a["key"]: a for a in read_jsonl(Path(check_dir) / "answers.jsonl")}
    rows = read_jsonl(Path(heldout))
    out: dict = {}
    for scope in ["all"] + sorted({r["domain"] for r in rows}):
        out[scope] = {}
        for intent in INTENTS:
            qs = [r for r in rows if r["intent"] == intent and scope in ("all", r["domain"])]
            keys = [content_key("heldout", r["domain"], r["query"].strip()) for r in qs]
            cell = {"n": len(qs), "routed": sum(answers[f"prism:{k}"]["routed"] for k in keys) / len(qs)}
            for s in SYSTEMS:
                cell[s] = sum(refuses(answers[f"{s}:{k}"]["text"]) for k in keys) / len(qs)
            out[scope][intent] = cell
    return out


def markdown(rates: dict) -> str:
    head = "| scope | intent | n | routed | " + " | ".join(NAMES[s] for s in SYSTEMS) + " |"
    lines = [head, "|" + "---|" * (4 + len(SYSTEMS))]
    for scope, by_intent in rates.items():
        for intent, c in by_intent.items():
            cells = " | ".join(f"{100 * c[s]:.0f}%" for s in SYSTEMS)
            lines.append(f"| {scope} | {intent} | {c['n']} | {100 * c['routed']:.0f}% | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    default = Path(__file__).resolve().parent / "heldout.jsonl"
    print("refusal rate per system (share of answers that refuse), and the share PRISM routed:\n")
    print(markdown(refusal_rates(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else default)))
