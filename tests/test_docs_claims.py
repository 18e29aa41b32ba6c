"""What README.md and docs/ARCHITECTURE.md state that the code can confirm, checked against the code:

* every ``prism <command> --flag`` they show is a command of ``prism`` with that flag (the parser is
  built in process, as ``prism --help`` builds it);
* every file or folder path they name exists (in the repository, the package or ``benchmarks/``);
* every ``module.name`` they name from the package root is a module with that name in it;
* a "where to add things" entry whose count (one module and one line) a toy-extension test proves
  (``tests/extension/test_toy_<kind>.py``) states that count.

Only what the text states in code spans and code blocks is read; prose is left to the reader.
"""

from __future__ import annotations

import argparse
import ast
import re
import shlex
from pathlib import Path

import pytest

import prism_persona

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(prism_persona.__file__).resolve().parent
DOCS = {"README.md": ROOT / "README.md", "docs/ARCHITECTURE.md": ROOT / "docs" / "ARCHITECTURE.md"}
SUBPACKAGES = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
TOP_MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
PATH_ROOTS = (ROOT, PACKAGE, ROOT / "benchmarks")
PLACEHOLDER_STARTS = ("RUN/", "OUT/", "ART/", "runs/", "data/", "~", "/", "http")
EXAMPLE_FILES = {"file.py", "my_judge.py", "judge.py", "q.jsonl", "in.jsonl", "out.jsonl", "heldout.jsonl"}


def text(doc: str) -> str:
    return DOCS[doc].read_text(encoding="utf-8")


def spans(doc: str) -> list[str]:
    """Every inline code span (code blocks excluded)."""
    body = re.sub(r"```.*?```", "", text(doc), flags=re.S)
    return [s.strip() for s in re.findall(r"`([^`\n]+)`", body)]


def block_lines(doc: str) -> list[str]:
    """The lines of every fenced code block, continuation lines (``\\``) joined."""
    out = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text(doc), flags=re.S):
        out += block.replace("\\\n", " ").splitlines()
    return out


# --------------------------------------------------------------------------------------------------
# the command line


def parser_commands() -> tuple[dict[str, set[str]], set[str]]:
    """``{command: its option strings}`` and the top-level option strings of ``prism``'s parser."""
    from prism_persona.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = {name: set(p._option_string_actions) for name, p in sub.choices.items()}
    return commands, set(parser._option_string_actions)


def prism_commands(doc: str) -> list[str]:
    """Every ``prism ...`` command line the document shows (code spans and code-block lines)."""
    found = []
    for chunk in spans(doc) + block_lines(doc):
        for m in re.finditer(r"(?:^|[\s;&(])prism (\S.*)", chunk):
            found.append("prism " + m.group(1).split("#")[0].split("|")[0])
    return found


def words(command: str) -> list[str]:
    try:
        return shlex.split(command)
    except ValueError:  # an unbalanced quote in a shortened example
        return command.split()


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_every_prism_command_and_flag_shown_exists(doc):
    commands, top = parser_commands()
    shown = prism_commands(doc)
    assert shown, f"{doc} shows no prism command (the extraction is broken)"
    bad = []
    for line in shown:
        w = [t.strip("[]") for t in words(line)]
        name = w[1].rstrip(",.:;)`") if len(w) > 1 else ""
        if not re.fullmatch(r"[a-z]+", name):
            continue  # "prism --help", a placeholder
        if name not in commands:
            bad.append(f"{doc}: `{line}`: no command '{name}'")
            continue
        for token in w[2:]:
            flag = token.split("=", 1)[0].rstrip(",.:;)`")
            if flag.startswith("--") and re.fullmatch(r"--[a-z][a-z0-9-]*", flag):
                if flag not in commands[name] and flag not in top:
                    bad.append(f"{doc}: `{line}`: prism {name} has no {flag}")
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------------------------------
# paths and modules


def named_paths(doc: str) -> list[str]:
    """File and folder paths named in code spans (placeholders such as ``RUN/...`` left out)."""
    out = []
    for span in spans(doc):
        first = span.split()[0] if span.split() else ""
        first = first.split(":", 1)[0] if first.count(":") == 1 and ".py:" in first else first
        if not re.fullmatch(r"[\w./<>*-]+", first) or first.startswith(PLACEHOLDER_STARTS):
            continue
        if first in EXAMPLE_FILES or first.startswith("--"):
            continue
        head = first.split("/")[0]
        if "/" in first and (head in SUBPACKAGES or (ROOT / head).is_dir()):
            out.append(first)
        elif re.fullmatch(r"\w+\.py", first) and (first[:-3] in TOP_MODULES or first.startswith("bench_")):
            out.append(first)
    return out


def exists(path: str) -> bool:
    pattern = re.sub(r"<[^>]+>", "*", path.rstrip("/"))
    return any(any(base.glob(pattern)) if "*" in pattern else (base / pattern).exists() for base in PATH_ROOTS)


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_every_path_named_exists(doc):
    paths = named_paths(doc)
    assert paths, f"{doc} names no path (the extraction is broken)"
    missing = [p for p in paths if not exists(p)]
    assert not missing, f"{doc} names paths that do not exist: {missing}"


def top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def resolves(dotted: str) -> bool:
    """``train.pipeline.run_pipeline``: the longest module prefix is a file of the package and the next
    name is defined at its top level (a deeper name, ``Class.method``, is a ``def`` in that file)."""
    parts = dotted.removeprefix("prism_persona.").split(".")
    for n in range(len(parts), 0, -1):
        base = PACKAGE.joinpath(*parts[:n])
        file = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        if file.is_file():
            rest = parts[n:]
            if not rest:
                return True
            if rest[0] not in top_level_names(file):
                return False
            source = file.read_text(encoding="utf-8")
            return all(
                re.search(rf"\b(def|class)\s+{re.escape(r)}\b|\b{re.escape(r)}\s*[:=]", source) for r in rest[1:]
            )
    return False


def named_modules(doc: str) -> list[str]:
    roots = "|".join(SUBPACKAGES + TOP_MODULES)
    out = []
    for span in spans(doc):
        m = re.fullmatch(rf"((?:prism_persona\.)?(?:{roots})(?:\.\w+)+)(?:\(.*\))?", span)
        if m and not span.endswith((".py", ".md", ".json", ".jsonl")):
            out.append(m.group(1))
    return out


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_every_module_name_named_exists(doc):
    bad = [name for name in named_modules(doc) if not resolves(name)]
    assert not bad, f"{doc} names what the package does not have: {bad}"


def test_the_checks_catch_a_wrong_claim():
    """The extraction and the lookups find what they must (a check that cannot fail is no check)."""
    commands, _ = parser_commands()
    assert {"run", "eval", "serve", "config"} <= set(commands) and "--benchmarks" in commands["eval"]
    assert "--no-such-flag" not in commands["eval"]
    assert exists("evals/benchmarks/<name>.py") and exists("tests/conftest.py") and not exists("evals/nosuch.py")
    assert resolves("train.pipeline.run_pipeline") and resolves("evals.base.Benchmark")
    assert not resolves("evals.base.NoSuchThing") and not resolves("nosuch.module")


# --------------------------------------------------------------------------------------------------
# "where to add things"


def add_entries() -> dict[str, str]:
    """``{kind: its entry}`` of ARCHITECTURE's "Where to add things" list (``- **A benchmark** ...``)."""
    section = text("docs/ARCHITECTURE.md").split("## Where to add things", 1)[1].split("\n## ", 1)[0]
    entries = re.findall(r"^- \*\*An? ([a-z ]+?)\*\*(.*?)(?=^- \*\*|\Z)", section, flags=re.S | re.M)
    return {kind.strip(): body for kind, body in entries}


@pytest.mark.parametrize("kind", ["engine", "judge", "benchmark", "stage"])
def test_an_add_count_a_toy_extension_proves_is_the_one_stated(kind):
    entries = add_entries()
    assert kind in entries, f"ARCHITECTURE's 'Where to add things' has no entry for {kind}"
    toy = ROOT / "tests" / "extension" / f"test_toy_{kind}.py"
    if not toy.is_file():
        pytest.skip(f"no toy-extension test proves the count for '{kind}' yet")
    entry = " ".join(entries[kind].split())
    assert re.search(r"\b(one|1) (new )?module\b", entry) and re.search(r"\b(one|1) (registration )?line\b", entry), (
        f"tests/extension/{toy.name} proves one module + one line; the {kind} entry states otherwise: {entry[:200]}"
    )
