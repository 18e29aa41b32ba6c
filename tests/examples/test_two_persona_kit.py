"""The two-persona kit ``--example safety+style`` (issue 29, item 5), fast: its files are the two kits'
files, its settings resolve to each domain's own persona file, its judge gives each kit's own verdict,
its summary is a confusion matrix of expected persona against where PRISM sent each held-out query
(for today's binary artifact and for answers that name the persona), and a misspelt name is one line."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import pytest

from prism_persona import cli
from prism_persona.kits import example_settings, kit_path, write_summary
from prism_persona.store import content_key

NAME = "safety+style"
REFUSAL = "I'm sorry, but I can't help with that."
PLAIN = "Sure, here is how you do it."
PIRATE = "Arr matey, a tale of the sea and a captain's treasure!"
SOME_PIRATE = "Ahoy, the cake rises."


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _config(argv: list[str]):
    from prism_persona.commands import run as run_command
    from prism_persona.commands.common import config_from_args, resume_from_saved_config

    parser = argparse.ArgumentParser()
    run_command.add_parser(parser.add_subparsers())
    args = parser.parse_args(["run", *argv])
    resume_from_saved_config(args)
    return config_from_args(args)


@pytest.mark.parametrize("filename", ["train_queries.jsonl", "heldout.jsonl"])
def test_the_kit_files_are_the_two_kits_files_in_order(filename):
    # regenerate with: cat kits/safety/F kits/style/F > kits/safety_style/F
    both = (kit_path(NAME) / filename).read_bytes()
    assert both == (kit_path("safety") / filename).read_bytes() + (kit_path("style") / filename).read_bytes()


def test_the_settings_resolve_to_each_domains_own_persona_file_and_the_dispatching_judge(tmp_path):
    cfg = _config(["--example", NAME, "--out", str(tmp_path / "r")])
    assert cfg.example == NAME and cfg.preset == "tiny"
    assert cfg.persona.domains == ["chemistry", "computers", "medicine", "stories", "cooking"]
    files = {d: Path(p) for d, p in cfg.persona.persona_files.items()}
    assert {d: (p.parent.name, p.name) for d, p in files.items()} == {
        "chemistry": ("safety", "safety_monitor.txt"),
        "computers": ("safety", "safety_monitor.txt"),
        "medicine": ("safety", "safety_monitor.txt"),
        "stories": ("style", "pirate.txt"),
        "cooking": ("style", "pirate.txt"),
    }
    assert all(p.is_file() for p in files.values())
    assert cfg.judge.judge == "prism_persona.kits.safety_style:judge"
    assert Path(cfg.queries.queries_file) == kit_path(NAME, "train_queries.jsonl")
    assert Path(cfg.check.queries) == kit_path(NAME, "heldout.jsonl")
    # every domain of the training and held-out files is a domain of the run
    for path in (cfg.queries.queries_file, cfg.check.queries):
        assert {r["domain"] for r in _rows(Path(path))} == set(cfg.persona.domains)
    # a flag still overrides the kit, and the kit's files drop with the domains left out
    small = _config(["--example", NAME, "--domains", "stories,medicine", "--out", str(tmp_path / "s")])
    assert sorted(small.persona.persona_files) == ["medicine", "stories"]


def test_the_judge_gives_each_kits_own_verdict_by_domain():
    from prism_persona.kits import safety, safety_style, style

    answers = [REFUSAL, PLAIN, PIRATE, SOME_PIRATE, ""]
    rows = _rows(kit_path(NAME, "train_queries.jsonl"))[::7] + _rows(kit_path(NAME, "heldout.jsonl"))[::5]
    seen = set()
    for row in rows:
        for a, b in itertools.permutations(answers, 2):
            got = safety_style.judge(row["query"], a, b, domain=row["domain"])
            if row["domain"] in ("stories", "cooking"):
                want = style.judge(row["query"], a, b, domain=row["domain"])
            else:
                want = safety.judge(row["query"], a, b)
            assert got == want, (row, a, b)
            seen.add((row["domain"], got))
    # the verdicts differ by kit: the dispatch is not one judge for all (A and B both occur everywhere)
    assert {(d, v) for d in ("chemistry", "stories", "cooking") for v in ("A", "B")} <= seen
    harmful = next(r for r in rows if r.get("intent") == "harmful")
    assert safety_style.judge(harmful["query"], REFUSAL, PLAIN, domain=harmful["domain"]) == "A"
    assert safety_style.judge("a tale", PIRATE, PLAIN, domain="stories") == "A"
    assert safety_style.judge("a soup", PIRATE, PLAIN, domain="cooking") == "B"
    assert safety_style.judge(harmful["query"], REFUSAL, PLAIN, domain="law") == "tie"  # no kit's domain


def _scripted_check(tmp_path: Path, per_domain: int, route, persona=None, abstain=lambda r: False) -> Path:
    """A check directory whose answers.jsonl holds the first ``per_domain`` held-out rows of each
    domain: PRISM routed where ``route(row)``, naming ``persona(row)`` when given; scripted texts."""
    out = tmp_path / "check"
    out.mkdir()
    seen: dict = {}
    lines = []
    for row in _rows(kit_path(NAME, "heldout.jsonl")):
        seen[row["domain"]] = seen.get(row["domain"], 0) + 1
        if seen[row["domain"]] > per_domain:
            continue
        key = content_key("heldout", row["domain"], row["query"].strip())
        harmful, story = row.get("intent") == "harmful", row["domain"] == "stories"
        abstained = bool(abstain(row))
        routed = bool(route(row)) and not abstained
        texts = {
            "base": PLAIN,
            "persona": PIRATE if row["domain"] in ("stories", "cooking") else REFUSAL,
            # the LoRA forced on refuses stories (one adapter carrying both personas) and is a pirate on cooking
            "lora": REFUSAL if story else PIRATE if row["domain"] == "cooking" else REFUSAL,
            "prism": (REFUSAL if harmful else PIRATE if story else "Plain but routed.") if routed else PLAIN,
        }
        for system, text in texts.items():
            ans = {"key": f"{system}:{key}", "system": system, "text": text, "routed": system == "lora"}
            if system == "prism":
                ans.update(routed=routed, gate_prob=0.9 if routed else 0.1, abstained=abstained)
                if persona is not None:
                    ans["persona"] = persona(row) if routed else ""
            lines.append(json.dumps(ans))
    (out / "answers.jsonl").write_text("\n".join(lines) + "\n")
    return out


def test_the_summary_of_a_binary_artifact_counts_any_persona(tmp_path):
    # one gate, one adapter: routed on harmful requests and stories, and on 1 cooking query of 4
    cooking = []

    def route(row):
        if row["domain"] == "cooking":
            cooking.append(row)
            return len(cooking) == 1
        return row.get("intent") == "harmful" or row["domain"] == "stories"

    check = _scripted_check(tmp_path, 4, route)
    text = write_summary(NAME, check)
    numbers = json.loads((check / "summary.json").read_text())
    assert numbers["columns"] == ["safety_monitor", "pirate", "any persona", "base", "abstained"]
    conf = numbers["confusion"]
    # 3 safety domains x 4 rows alternate harmful / benign: 6 harmful, 6 benign; 4 stories, 4 cooking
    assert conf["safety_monitor"] == {"safety_monitor": 0, "pirate": 0, "any persona": 6, "base": 0, "abstained": 0}
    assert conf["pirate"]["any persona"] == 4 and conf["pirate"]["base"] == 0
    assert conf["base"]["any persona"] == 1 and conf["base"]["base"] == 9
    assert numbers["expected_class_routed"] == 9  # the base row's 9; a binary artifact names no persona
    assert "| safety_monitor | 6 | 0 (0%) | 0 (0%) | 6 (100%) | 0 (0%) | 0 (0%) |" in text
    assert "'any persona' counts every routed query" in text
    assert numbers["safety"]["harmful"]["prism"] == 1.0 and numbers["safety"]["benign"]["prism"] == 0.0
    assert numbers["safety"]["harmful"]["base"] == 0.0 and numbers["safety"]["benign"]["lora"] == 1.0
    assert numbers["style"]["stories"]["prism"] == 1.0 and numbers["style"]["cooking"]["prism"] == 0.0
    assert numbers["style"]["cooking"]["routed"] == 0.25 and numbers["style"]["cooking"]["persona"] == 1.0
    assert numbers["unrouted"] == 9 and numbers["unrouted_identical"] == 9
    assert numbers["expected_class_routed_any_persona"] == 9 + 6 + 4 and "right on a persona's row: 19/20" in text
    assert numbers["leak"]["refused_on_style"] == {"base": 0.0, "persona": 0.0, "lora": 0.5, "prism": 0.0}
    assert numbers["leak"]["pirate_on_safety"] == {"base": 0.0, "persona": 0.0, "lora": 0.0, "prism": 0.0}
    assert "| refusals on stories + cooking | 8 | 0% | 0% | 50% | 0% |" in text
    assert (check / "summary.md").read_text().strip() == text


def test_the_summary_reads_the_persona_each_answer_names_and_abstentions(tmp_path):
    # a K-way artifact: right on harmful requests and cooking; stories sent to the wrong persona once,
    # one benign request routed to the pirate, one harmful request abstained
    stories, benign, harmful = [], [], []

    def persona(row):
        if row["domain"] == "stories":
            stories.append(row)
            return "safety_monitor" if len(stories) == 1 else "pirate"
        if row.get("intent") == "benign":
            return "pirate"
        return "safety_monitor"

    def route(row):
        if row.get("intent") == "benign":
            benign.append(row)
            return len(benign) == 1
        return row["domain"] != "cooking"

    def abstain(row):
        if row.get("intent") == "harmful":
            harmful.append(row)
            return len(harmful) == 2
        return False

    check = _scripted_check(tmp_path, 2, route, persona, abstain)
    text = write_summary(NAME, check)
    conf = json.loads((check / "summary.json").read_text())["confusion"]
    assert json.loads((check / "summary.json").read_text())["columns"] == [
        "safety_monitor",
        "pirate",
        "base",
        "abstained",
    ]
    assert conf["safety_monitor"] == {"safety_monitor": 2, "pirate": 0, "base": 0, "abstained": 1}
    assert conf["pirate"] == {"safety_monitor": 1, "pirate": 1, "base": 0, "abstained": 0}
    assert conf["base"] == {"safety_monitor": 0, "pirate": 1, "base": 4, "abstained": 0}
    assert "| pirate | 2 | 1 (50%) | 1 (50%) | 0 (0%) | 0 (0%) |" in text
    assert "Routed to the expected class: 7/10 (70%)." in text and "any persona" not in text


def test_a_check_of_other_queries_is_one_line(tmp_path):
    from prism_persona.errors import PrismError

    (tmp_path / "answers.jsonl").write_text(json.dumps({"key": "base:x", "text": ""}) + "\n")
    with pytest.raises(PrismError, match="holds no answers"):
        write_summary(NAME, tmp_path)


@pytest.mark.parametrize("name", ["safety_style", "both", "safety+pirate", "style+safety", "safety,style"])
def test_misspelt_example_names_are_one_line(tmp_path, capsys, name):
    assert cli.main(["run", "--example", name, "--out", str(tmp_path / "r")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"unknown example '{name}'" in err
    assert "safety, style, safety+style" in err
    assert not (tmp_path / "r").exists()


def test_example_settings_of_the_two_kits_are_unchanged():
    for name, persona in (("safety", "safety_monitor.txt"), ("style", "pirate.txt")):
        files = example_settings(name)["persona"]["persona_files"]
        assert {Path(p).name for p in files.values()} == {persona}
        assert example_settings(name)["judge"]["judge"] == f"prism_persona.kits.{name}:judge"


def test_a_two_persona_run_ends_with_the_confusion_matrix(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "--example", NAME, "--model", str(tiny_model_dir), "--out", str(out), "-q"]
    argv += ["--queries-per-persona", "2", "--answer-tokens", "3", "--set", "check.per_domain=2"]
    argv += ["--set", "check.max_new_tokens=3", "--set", "distill.min_steps=2", "--set", "gate.epochs=5"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())
    assert saved["example"] == NAME and saved["judge"]["judge"] == "prism_persona.kits.safety_style:judge"
    table = (out / "check" / "summary.md").read_text()
    assert table.strip() in printed and "| expected \\ routed to |" in table
    numbers = json.loads((out / "check" / "summary.json").read_text())
    assert {c: sum(v.values()) for c, v in numbers["confusion"].items()} == {
        "safety_monitor": 3,
        "pirate": 2,
        "base": 5,
    }
    answers = _rows(out / "check" / "answers.jsonl")
    prism = [a for a in answers if a["system"] == "prism"]
    assert len(prism) == 10 and all(a["persona"] == "" for a in prism if not a["routed"])
    # today's binary artifact names no persona ('any persona'); a K-way one names its persona files' stems
    assert {a["persona"] for a in prism if a["routed"]} <= {"", "safety_monitor", "pirate"}
    routed_columns = [col for col in numbers["columns"] if col not in ("base", "abstained")]
    conf = numbers["confusion"]
    assert sum(conf[c][col] for c in numbers["classes"] for col in routed_columns) == sum(a["routed"] for a in prism)
    assert sum(conf[c]["abstained"] for c in numbers["classes"]) == sum(a["abstained"] for a in prism)


def test_check_answers_name_the_persona_a_query_was_routed_to():
    from prism_persona.train.check import persona_name

    names = ["safety_monitor", "pirate"]
    assert persona_name({"routed": True, "persona": 1}, names) == "pirate"  # a K-way engine's index
    assert persona_name({"routed": True, "persona": 0}, names) == "safety_monitor"
    assert persona_name({"routed": True, "persona": "pirate"}, []) == "pirate"  # an engine that names it
    assert persona_name({"routed": False, "persona": 1}, names) == ""  # not routed: no persona
    assert persona_name({"routed": True, "persona": -1}, names) == ""
    assert persona_name({"routed": True}, ["safety_monitor"]) == "safety_monitor"  # the one persona listed
    assert persona_name({"routed": True}, []) == ""  # one adapter for all domains: 'any persona'
    assert persona_name({"routed": True, "persona": True}, names) == ""
