"""A rule judge for the "see it work" example: it rewards pirate speech on the domains where a pirate
voice is welcome (stories) and penalises it where it is not (cooking), so the persona should win on
the first and lose on the second, and the gate should learn to route only the first.

PRISM calls it as ``judge(query, answer_a, answer_b, domain=...)`` and asks for both orders itself.
"""

import re

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
