"""The import order of the package (docs/ARCHITECTURE.md), checked on the source: no module imports one that comes
later in the order, imports inside functions included, and no command imports another command."""

from __future__ import annotations

import ast
from pathlib import Path

import prism_persona

PACKAGE = Path(prism_persona.__file__).resolve().parent

LAYERS = (
    {"errors", "formats", "plugins", "stats", "stages", "userfiles", "options"},
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


SETTINGS_MODULES = ("config", "command_settings", "how_to_run")
"""config.py was split by job (options < config < command_settings, how_to_run): a name is imported from
the module that defines it, never through one that only imports it (no silent re-export)."""


def defined_names(path: Path) -> set[str]:
    """The names a module defines at its top level (functions, classes, assignments)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        for target in targets:
            names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return names


def borrowed_names(path: Path, homes: dict[str, set[str]], package: str = "", label: str = "") -> list[str]:
    """``from prism_persona.<m> import NAME`` and ``<alias>.NAME`` (``from prism_persona import <m> as alias``)
    where ``<m>`` is a module of ``homes`` that does not define NAME."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    label = label or path.name
    aliases: dict[str, str] = {}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
        target = ".".join(base + ([node.module] if node.module else []))
        for alias in node.names:
            if target == "prism_persona" and alias.name in homes:
                aliases[alias.asname or alias.name] = alias.name
            elif target.startswith("prism_persona.") and target[14:] in homes and alias.name not in homes[target[14:]]:
                found.append(f"{label}:{node.lineno}: {alias.name} from {target}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            module = aliases[node.value.id]
            if node.attr not in homes[module]:
                found.append(f"{label}:{node.lineno}: {node.value.id}.{node.attr} from prism_persona.{module}")
    return found


def test_settings_names_come_from_their_own_module():
    homes = {m: defined_names(PACKAGE / f"{m}.py") for m in SETTINGS_MODULES}
    root = PACKAGE.parents[1]
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found += borrowed_names(path, homes, package, str(path.relative_to(root)))
    for folder in ("tests", "scripts", "benchmarks"):
        for path in sorted((root / folder).rglob("*.py")) if (root / folder).is_dir() else []:
            found += borrowed_names(path, homes, label=str(path.relative_to(root)))
    assert not found, "\n".join(found)


def test_the_borrowed_name_check_sees_both_forms(tmp_path):
    user = tmp_path / "user.py"
    user.write_text(
        "from prism_persona import config as C\nfrom prism_persona.config import merge, resolve\nC.merge\nC.resolve\n"
    )
    homes = {"config": {"resolve"}}
    assert borrowed_names(user, homes) == [
        "user.py:2: merge from prism_persona.config",
        "user.py:3: C.merge from prism_persona.config",
    ]


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
