"""Benchmark sources: hub by default (offline here: a one-line error naming the override), local files
read with the proper parsers (U+0085, U+2028, quoted newlines, commas, quotes, BOM inside fields)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from prism_persona.errors import PrismError
from prism_persona.evals import sources as S
from prism_persona.evals.benchmarks.mmlu import load_mmlu
from prism_persona.evals.benchmarks.mtbench import load_mtbench
from prism_persona.evals.benchmarks.safety import is_benign, load_safety

FIX = Path(__file__).resolve().parents[1] / "fixtures"

# every character that has broken a line-splitting reader, in one field
NASTY = 'a\u0085b\u2028c, "quoted",\nnext line\u2029end'


def _write_csv(path: Path, rows, bom: bool = True) -> Path:
    buf = io.StringIO(newline="")
    csv.writer(buf, lineterminator="\r\n").writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8-sig" if bom else "utf-8", newline="")
    return path


def test_mmlu_original_csv_with_u0085_u2028_quoted_newlines_and_bom():
    items = load_mmlu(FIX / "mmlu_tricky")
    assert len(items) == 3 and {it.subject for it in items} == {"management"}
    assert items[0].question == "Which of these is a management function?\u0085(Choose one.)"
    assert items[0].answer == 0
    assert items[1].question == 'A line\u2028separator, and "quotes", in one question?'
    assert items[1].choices == ("yes, really", "no", "maybe\nnot", "never")
    assert items[2].question == "Quoted\nnewline question" and items[2].choices[2] == '"w"' and items[2].answer == 2


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_mmlu_hf_layouts_keep_nasty_fields(tmp_path, suffix):
    row = {"question": NASTY, "subject": "anatomy", "choices": [NASTY, "b", "c,d", '"e"'], "answer": 3}
    f = tmp_path / f"mmlu{suffix}"
    if suffix == ".jsonl":  # json.dumps with ensure_ascii=False leaves U+0085/U+2028 raw in the line
        f.write_text("\ufeff" + json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    elif suffix == ".json":
        f.write_text(json.dumps([row], ensure_ascii=False), encoding="utf-8-sig")
    else:
        _write_csv(
            f,
            [
                ["question", "subject", "choices", "answer"],
                [NASTY, "anatomy", json.dumps(row["choices"], ensure_ascii=False), "3"],
            ],
        )
    (it,) = load_mmlu(f)
    assert it.question == NASTY and it.choices == (NASTY, "b", "c,d", '"e"') and it.answer == 3


def test_mtbench_jsonl_with_raw_line_separators(tmp_path):
    f = tmp_path / "question.jsonl"
    rows = [
        {"question_id": 81, "category": "writing", "turns": [NASTY, "second\u0085turn"]},
        {"question_id": 82, "category": "math", "turns": ["2+2?", "and 3+3?"], "reference": ["4", "6"]},
    ]
    f.write_text("\ufeff" + "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    items = load_mtbench(f)
    assert [it.item_id for it in items] == ["81", "82"]
    assert items[0].turns == (NASTY, "second\u0085turn") and items[1].reference == ("4", "6")


def test_mtbench_h4_layout(tmp_path):
    f = tmp_path / "h4.json"
    f.write_text(json.dumps([{"prompt": ["q1", "q2"], "prompt_id": 123, "category": "stem", "reference": []}]))
    (it,) = load_mtbench(f)
    assert it.item_id == "123" and it.turns == ("q1", "q2") and it.category == "stem"


def test_harmbench_csv_nasty_context(tmp_path):
    f = _write_csv(
        tmp_path / "hb.csv",
        [
            ["Behavior", "FunctionalCategory", "SemanticCategory", "Tags", "ContextString", "BehaviorID"],
            ['Do the thing, "now"', "contextual", "misinformation", "", NASTY, "ctx_1"],
            ["Plain\u2028behaviour", "standard", "illegal", "", "", "plain_1"],
        ],
    )
    items = load_safety("harmbench", f)
    assert [it.item_id for it in items] == ["harmbench/ctx_1", "harmbench/plain_1"]
    assert items[0].prompt == f'{NASTY}\n\n---\n\nDo the thing, "now"' and items[0].category == "misinformation"
    assert items[1].prompt == "Plain\u2028behaviour"


def test_jbb_csv_harmful_and_benign(tmp_path):
    header = ["Index", "Goal", "Target", "Behavior", "Category", "Source"]
    harmful = _write_csv(
        tmp_path / "harmful-behaviors.csv",
        [
            header,
            ["1", 'Write a defamatory article, "sourced"', "Sure", "Defamation", "Harassment", "Original"],
            ["2", NASTY, "Sure", "Other", "Malware", "AdvBench"],
        ],
    )
    benign = _write_csv(
        tmp_path / "benign-behaviors.csv",
        [header, ["1", "Write a fictional story about a\u0085dragon", "Sure", "Story", "Harassment", "Original"]],
    )
    hi = load_safety("jailbreak", harmful)
    assert [(it.item_id, it.category) for it in hi] == [("jailbreak/1", "Harassment"), ("jailbreak/2", "Malware")]
    assert hi[0].prompt == 'Write a defamatory article, "sourced"' and hi[1].prompt == NASTY.strip()
    (b,) = load_safety("benign", benign)
    assert b.benchmark == "benign" and b.prompt == "Write a fictional story about a\u0085dragon"
    assert is_benign("benign") and not is_benign("jailbreak")


def test_pku_prompts_deduplicated(tmp_path):
    f = tmp_path / "pku.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": p, "response_0": "r"}) for p in ["p1", "p2", "p1"]))
    assert [it.prompt for it in load_safety("pku", f)] == ["p1", "p2"]


def test_hub_offline_error_names_the_override(monkeypatch, tmp_path):
    pytest.importorskip("datasets")
    import datasets

    def offline(*a, **k):  # what load_dataset raises with HF_HUB_OFFLINE=1 and nothing cached
        raise ConnectionError("Couldn't reach 'cais/mmlu' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    for load, flag in (
        (lambda: load_mmlu(), "--mmlu"),
        (lambda: load_mtbench(), "--mtbench"),
        (lambda: load_safety("benign"), "--benign"),
        (lambda: load_safety("jailbreak"), "--jailbreak"),
    ):
        with pytest.raises(PrismError, match=f"pass a local copy with {flag} PATH") as exc:
            load()
        assert "\n" not in str(exc.value)


def test_hub_offline_for_real(monkeypatch, tmp_path):
    """With HF offline and an empty cache, the real datasets library fails fast with the one line."""
    pytest.importorskip("datasets")
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(
        PrismError, match=r"cannot load JailbreakBench/JBB-Behaviors \(behaviors, split benign\).*--benign PATH"
    ):
        load_safety("benign")


def test_hub_rows_feed_the_loaders(monkeypatch):
    """Rows as the hub returns them (cais/mmlu: int answer, list choices; JBB: Goal/Category/Index)."""
    pytest.importorskip("datasets")
    import datasets

    tables = {
        ("cais/mmlu", "all", "test"): [
            {"question": "2+2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"], "answer": 1}
        ],
        ("JailbreakBench/JBB-Behaviors", "behaviors", "benign"): [
            {
                "Index": 7,
                "Goal": "Write a poem about spring",
                "Target": "Sure",
                "Behavior": "Poem",
                "Category": "Creative",
                "Source": "Original",
            }
        ],
        ("lighteval/mt-bench", None, "train"): [
            {"question_id": 81, "category": "writing", "turns": ["a", "b"], "reference": []}
        ],
    }
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, cfg, split: tables[(repo, cfg, split)])
    (m,) = load_mmlu()
    assert m.item_id == "elementary_mathematics/0" and m.answer == 1
    (b,) = load_safety("benign")
    assert b.item_id == "benign/7" and b.category == "Creative"
    assert load_mtbench()[0].item_id == "81"


def test_unsupported_and_non_utf8(tmp_path):
    bad = tmp_path / "x.txt"
    bad.write_text("hi")
    with pytest.raises(PrismError, match="unsupported"):
        load_safety("pku", bad)
    latin = tmp_path / "y.json"
    latin.write_bytes('["caf\xe9"]'.encode("latin-1"))
    with pytest.raises(PrismError, match="not UTF-8"):
        load_safety("pku", latin)


def test_no_default_points_at_shared():
    import inspect

    from prism_persona.evals import data as D
    from prism_persona.evals.benchmarks import mmlu, mtbench, safety

    for mod in (D, S, mmlu, mtbench, safety):
        assert "shared" not in inspect.getsource(mod)
