"""What every benchmark loader shares: the round-robin limit over categories.

The loaders themselves live with their benchmark (``evals/benchmarks/``). By default each reads the
benchmark's Hugging Face hub dataset (its class's ``hub``); a path (file or folder) replaces it. Every
loader returns plain dataclass items and raises :class:`~prism_persona.errors.PrismError` naming the
file and line (or item) for a missing, empty or malformed input. Files are read with the proper
parsers (:mod:`.sources`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional


def take_stratified(items: Sequence, key: Callable, limit: Optional[int]) -> list:
    """At most ``limit`` items, taken round-robin over the groups of ``key`` (so every group shows up).

    Order inside a group is kept; ``None`` or a limit >= len(items) returns everything.
    """
    items = list(items)
    if limit is None or limit >= len(items):
        return items
    if limit <= 0:
        return []
    groups: dict = {}
    for it in items:
        groups.setdefault(key(it), []).append(it)
    out: list = []
    depth = 0
    while len(out) < limit:
        for g in groups.values():
            if depth < len(g) and len(out) < limit:
                out.append(g[depth])
        depth += 1
    chosen = set(map(id, out))
    return [it for it in items if id(it) in chosen]
