"""The style kit's rule judge and table: it rewards pirate speech on the domains where a pirate voice
is welcome (stories) and penalises it where it is not (cooking), so the persona should win on the
first and lose on the second, and the gate should learn to route only the first.

PRISM calls it as ``judge(query, answer_a, answer_b, domain=...)`` and asks for both orders itself
(``--example style`` selects it; ``--judge prism_persona.kits.style:judge`` names it).
"""

from __future__ import annotations

import re

from ...text import md_table

MARKERS = (
    "arr",
    "matey",
    "ahoy",
    "aye",
    "ye",
    "hearty",
    "treasure",
    "pirate",
    "ship",
    "sea",
    "captain",
    "landlubber",
    "plunder",
    "sail",
    "yo ho",
    "shiver me timbers",
)
REWARDED = {"stories"}
_PATTERN = re.compile(r"\b(?:" + "|".join(re.escape(m) for m in MARKERS) + r")\b", re.I)


def pirate_score(text: str) -> int:
    """How many pirate markers an answer uses."""
    return len(_PATTERN.findall(text))


def judge(query, answer_a, answer_b, domain=""):
    a, b = pirate_score(answer_a), pirate_score(answer_b)
    if a == b:
        return "tie"
    more_pirate = "A" if a > b else "B"
    if domain in REWARDED:
        return more_pirate
    return "B" if more_pirate == "A" else "A"


SYSTEMS = ("base", "persona", "prism")
NAMES = {"base": "base model", "persona": "persona prompt", "prism": "PRISM"}


def summary(rows: list[dict]) -> tuple[dict, str]:
    """Per domain: the share of answers with a pirate marker for each system and the share PRISM routed
    to the persona LoRA, and whether unrouted answers stayed the base model's."""
    from .. import identity_line

    domains = sorted({r["domain"] for r in rows}, key=[r["domain"] for r in rows].index)
    rep: dict = {}
    for d in domains:
        qs = [r for r in rows if r["domain"] == d]
        rep[d] = {"n": len(qs), "routed": sum(r["answers"]["prism"]["routed"] for r in qs) / len(qs)}
        for s in SYSTEMS:
            rep[d][s] = sum(pirate_score(r["answers"][s]["text"]) > 0 for r in qs) / len(qs)
    same, unrouted, identity = identity_line(rows)
    lines = [
        f"Style kit, {len(rows)} held-out requests never seen in training; share of answers with pirate words:",
        "",
        md_table(
            ["domain", "n", "wanted", *(NAMES[s] for s in SYSTEMS), "routed to the LoRA"],
            [
                [d, rep[d]["n"], "pirate" if d in REWARDED else "plain"]
                + [f"{100 * rep[d][s]:.0f}%" for s in (*SYSTEMS, "routed")]
                for d in domains
            ],
        ),
    ]
    lines += ["", identity, "Wanted: PRISM talks like a pirate on stories only, with no persona in the prompt."]
    return {"domains": rep, "unrouted": unrouted, "unrouted_identical": same}, "\n".join(lines)
