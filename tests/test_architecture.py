"""The import order of the package (docs/ARCHITECTURE.md), checked on the source: no module imports one that comes
later in the order, imports inside functions included, and no command imports another command."""

from __future__ import annotations

import ast
from pathlib import Path

import prism_persona

PACKAGE = Path(prism_persona.__file__).resolve().parent

LAYERS = (
    {"errors", "formats", "stats", "stages", "userfiles", "options"},
    {"config"},
    {"command_settings", "how_to_run"},
    {"models", "store", "progress", "text"},
    {"engines"},
    {"judges", "bootstrap"},
    {"gated"},
    {"train"},
    {"serve", "evals", "kits"},
    {"commands"},
    {"cli", "__main__"},
)
"""Lowest first: a module may import its own layer and the ones before it."""


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = ("prism_persona", *path.relative_to(package).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, package_dir: Path = PACKAGE) -> list[tuple[str, int]]:
    """(imported module, line) of every ``prism_persona`` import of the file, wherever it stands.
    ``from .x import y`` counts as importing ``x.y`` when ``x.y`` is a module, else ``x``."""
    name = module_name(path, package_dir)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("prism_persona")]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if not target.startswith("prism_persona"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((sub if is_module(sub, package_dir) else target, node.lineno))
    return out


def is_module(name: str, package_dir: Path = PACKAGE) -> bool:
    path = package_dir.joinpath(*name.split(".")[1:])
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def layer(name: str) -> int | None:
    """The layer of a module; ``None`` for the package itself and testing.py (test doubles)."""
    top = name.split(".")[1] if "." in name else None
    return next((i for i, names in enumerate(LAYERS) if top in names), None)


def violations(package_dir: Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted(package_dir.rglob("*.py")):
        importer = module_name(path, package_dir)
        for imported, line in imports(path, package_dir):
            where = f"{path.relative_to(package_dir)}:{line}: {importer} imports {imported}"
            if imported == "prism_persona.testing" and not importer.startswith("prism_persona.testing"):
                found.append(where + " (test doubles are for tests only)")
            mine, theirs = layer(importer), layer(imported)
            if mine is not None and theirs is not None and theirs > mine:
                found.append(where + " (a later layer)")
            if is_command(importer) and is_command(imported) and imported != "prism_persona.commands.common":
                found.append(where + " (a command imports another command)")
    return found


def is_command(name: str) -> bool:
    return name.startswith("prism_persona.commands.") and name != "prism_persona.commands"


def test_every_import_follows_the_layer_order():
    assert not violations(), "\n".join(violations())


def test_every_top_level_module_has_a_layer():
    """A new module or package gets a place in LAYERS (or the test would silently skip it)."""
    tops = {p.stem for p in PACKAGE.glob("*.py")} | {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert tops - {"__init__", "testing"} <= set().union(*LAYERS)


def test_no_two_packages_import_each_other():
    """Modules of one layer may import each other, but never both ways between two packages (a cycle)."""
    edges = set()
    for path in PACKAGE.rglob("*.py"):
        mine = module_name(path).split(".")[:2]
        for imported, _ in imports(path):
            theirs = imported.split(".")[:2]
            if mine != theirs and len(mine) == len(theirs) == 2:
                edges.add((mine[1], theirs[1]))
    assert not {(a, b) for a, b in edges if (b, a) in edges}


def test_the_check_sees_imports_inside_functions(tmp_path):
    """Function-level imports against the order are found (so the test above can fail)."""
    fake = tmp_path / "prism_persona"
    for sub in ("", "train", "evals", "commands"):
        (fake / sub).mkdir(parents=True, exist_ok=True)
        (fake / sub / "__init__.py").write_text("")
    (fake / "evals" / "check.py").write_text("")
    (fake / "commands" / "run.py").write_text("")
    (fake / "commands" / "common.py").write_text("")
    (fake / "train" / "pipeline.py").write_text("def run():\n    from ..evals.check import run_check\n")
    (fake / "commands" / "gate.py").write_text("from . import common\n\n\ndef run():\n    from .run import x\n")
    assert violations(fake) == [
        "commands/gate.py:5: prism_persona.commands.gate imports prism_persona.commands.run (a command imports another command)",
        "train/pipeline.py:2: prism_persona.train.pipeline imports prism_persona.evals.check (a later layer)",
    ]
