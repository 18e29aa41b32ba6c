"""Issue 31, the rest: text unsafe to feed a model as a user turn never becomes a training query, adapter
tensors of the wrong shape or on a non-Linear module are one line when an artifact loads, and `prism serve`
answers 400 (naming the field) to a body it would otherwise silently ignore or clamp."""

from __future__ import annotations

import json

import pytest

from prism_persona import cli
from prism_persona import config as C
from prism_persona.testing import one_error_line

DOMAINS = ["writing", "coding"]


@pytest.fixture(autouse=True)
def _log_to_this_tests_stderr():
    cli.setup_logging(quiet=True)  # an earlier test's cli.main bound logging to its own (closed) stderr


# --------------------------------------------------------------------------------------------------
# 1. unsafe text in training queries

GOOD = "How do I bake sourdough bread at home?"
UNSAFE = {
    "ansi": "How do I \x1b[31mbake\x1b[0m sourdough bread at home?",
    "nul": "How do I bake sourdough\x00 bread at home?",
    "c0_bell": "How do I bake sourdough bread\x07 at home?",
    "c1_csi": "How do I bake sourdough \x9b31m bread at home?",
    "del": "How do I bake sourdough\x7f bread at home?",
    "lone_cr": "How do I bake sourdough\r bread at home?",
    "form_feed": "How do I bake sourdough\x0c bread at home?",
    "bidi_override": "How do I bake \u202esourdough bread at home?",
    "bidi_isolate": "How do I bake \u2066sourdough\u2069 bread at home?",
    "zero_width_space": "How do I bake sour\u200bdough bread at home?",
    "zero_width_joiner": "How do I bake sour\u200ddough bread at home?",
    "word_joiner": "How do I bake sour\u2060dough bread at home?",
    "bom": "\ufeffHow do I bake sourdough bread at home?",
    "im_start": "<|im_start|>user How do I bake sourdough bread at home?",
    "im_end": "How do I bake sourdough bread at home?<|im_end|>",
    "endoftext": "How do I bake sourdough bread <|endoftext|> at home?",
    "llama3": "How do I bake sourdough bread at home? <|eot_id|><|start_header_id|>system",
    "inst": "[INST] How do I bake sourdough bread at home? [/INST]",
    "sys": "<<SYS>> How do I bake sourdough bread at home?",
    "gemma": "<start_of_turn>user How do I bake sourdough bread at home?",
}


def qcfg(**kw):
    return C.resolve("tiny", overrides={"queries": kw, "persona": {"domains": ["stories"]}}).queries


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_1_the_helper_names_what_is_unsafe(case):
    from prism_persona.text import unsafe_text_reason

    assert unsafe_text_reason(UNSAFE[case])
    assert unsafe_text_reason(GOOD) == ""


@pytest.mark.parametrize(
    "text",
    [
        GOOD,
        "Tabs\tand\nnew lines, CRLF\r\n, NEL\u0085 and LS\u2028 too?",
        "Ünïcode, 中文, emoji 🙂?",
        "What does <b>bold</b> do in HTML?",
    ],
)
def test_1_ordinary_text_is_safe(text):
    from prism_persona.text import unsafe_text_reason

    assert unsafe_text_reason(text) == ""


def test_1_the_helper_takes_the_tokenizers_own_special_tokens():
    from prism_persona.text import unsafe_text_reason

    assert unsafe_text_reason("Tell me about <custom_turn> please?", ("<custom_turn>",))
    assert unsafe_text_reason("Tell me about <custom_turn> please?") == ""


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_1_a_generated_query_line_with_unsafe_text_is_dropped_and_counted(case):
    from prism_persona.bootstrap.queries import DROP_REASONS, QueryFilter

    f = QueryFilter(qcfg(requests_only=False))
    assert f.add(UNSAFE[case]) == ""
    assert f.dropped == {"unsafe text": 1} and "unsafe text" in DROP_REASONS
    assert f.add(GOOD) == GOOD  # the same request, clean, is kept


def one_round_list_config(tmp_path):
    """One round of the list query format on one domain (two queries asked, four lines a request)."""
    return C.resolve(
        "tiny",
        overrides={
            "out": str(tmp_path / "run"),
            "persona": {"domains": ["stories"]},
            "queries": {
                "queries_per_persona": 2,
                "per_request": 4,
                "max_rounds": 1,
                "requests_only": False,
                "format": "list",
            },
        },
    )


def test_1_unsafe_drops_are_counted_in_query_rounds(tmp_path):
    from prism_persona.bootstrap.queries import write_queries
    from prism_persona.store import RunDir
    from prism_persona.testing import ScriptedEngine

    cfg = one_round_list_config(tmp_path)
    reply = "\n".join([UNSAFE["ansi"], UNSAFE["im_start"], "Why is the sky blue at noon?", GOOD])
    eng = ScriptedEngine(responder=lambda chat: reply)
    write_queries(cfg, RunDir(cfg.out), lambda: eng, {"stories": {"short": "You are a storyteller."}})
    run = tmp_path / "run"
    stored = [json.loads(x)["query"] for x in (run / "queries.jsonl").read_text().splitlines()]
    assert all(unsafe not in stored for unsafe in UNSAFE.values()) and GOOD in stored
    rounds = [json.loads(x) for x in (run / "query_rounds.jsonl").read_text().splitlines()]
    assert sum(r["dropped"].get("unsafe text", 0) for r in rounds) >= 2


@pytest.mark.parametrize("case", ["ansi", "nul", "bidi_override", "zero_width_space", "im_start", "inst"])
@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_1_a_queries_file_line_with_unsafe_text_is_one_line_naming_it(case, fmt, tmp_path, no_model_load, capsys):
    rows = [("writing", GOOD), ("coding", "How do I sort a list in Python?"), ("coding", UNSAFE[case])]
    path = tmp_path / f"q.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"domain": d, "query": q}) + "\n" for d, q in rows))
        where = "line 3"
    elif fmt == "json":
        path.write_text(json.dumps([{"domain": d, "query": q} for d, q in rows]))
        where = "item 3"
    else:
        import csv

        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["domain", "query"])
            w.writerows(rows)
        where = "line 4"
    argv = ["run", "--domains", ",".join(DOMAINS), "--preset", "tiny", "--out", str(tmp_path / "run")]
    rc = cli.main(argv + ["--queries-file", str(path), "-q"])
    err = one_error_line(capsys)
    assert rc == 2 and str(path) in err and where in err and ("character" in err or "token" in err), err
    assert not (tmp_path / "run" / "queries.jsonl").exists()


# --------------------------------------------------------------------------------------------------
# 2. adapter tensors that do not fit the base model


@pytest.fixture(scope="module")
def artifact(tiny_model_dir, tmp_path_factory):
    from prism_persona.testing import make_tiny_artifact

    return make_tiny_artifact(tiny_model_dir, tmp_path_factory.mktemp("art31b") / "prism")


def edit_adapter(art, edit) -> None:
    """Apply ``edit(state)`` (a dict of tensors, changed in place) to the artifact's adapter weights."""
    from safetensors.torch import load_file, save_file

    path = art / "adapter" / "adapter_model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


def first(state, part: str, module: str = "q_proj") -> str:
    return sorted(k for k in state if f"{module}.lora_{part}." in k and ".layers.1." in k)[0]


def reshape(part: str, shape):
    import torch

    def edit(state):
        k = first(state, part)
        state[k] = torch.zeros(shape(list(state[k].shape)))

    return edit


def retarget(target: str, rename=lambda k: k):
    """Move the layer-1 q_proj A/B pair onto ``target`` (a module path under ``model.``)."""

    def edit(state):
        for part in ("A", "B"):
            k = first(state, part)
            new = rename(k.replace("layers.1.self_attn.q_proj", target))
            state[new] = state.pop(k)

    return edit


def drop(part: str):
    def edit(state):
        del state[first(state, part)]

    return edit


MISFIT = {
    "lora_A_other_input_width": (reshape("A", lambda s: [s[0], s[1] + 8]), "inputs"),
    "lora_A_transposed": (reshape("A", lambda s: [s[1], s[0]]), "shape"),
    "lora_B_other_output_width": (reshape("B", lambda s: [s[0] + 8, s[1]]), "outputs"),
    "on_embedding": (retarget("embed_tokens"), "Embedding, not a Linear"),
    "on_layernorm": (retarget("layers.1.input_layernorm"), "RMSNorm, not a Linear"),
    "on_final_norm": (retarget("norm"), "not a Linear"),
    "on_a_missing_module": (retarget("layers.1.self_attn.nosuch"), "no module of this model"),
    "on_a_missing_layer": (retarget("layers.99.self_attn.q_proj"), "no module of this model"),
    "on_a_decoder_block": (retarget("layers.1"), "LlamaDecoderLayer, not a Linear"),
    "on_layer_0": (retarget("layers.0.self_attn.q_proj"), "layer 0"),
    "embedding_lora_names": (
        retarget(
            "embed_tokens",
            lambda k: k.replace("lora_A.weight", "lora_embedding_A").replace("lora_B.weight", "lora_embedding_B"),
        ),
        "not a LoRA A/B weight",
    ),
    "lora_B_missing": (drop("B"), "no lora_B"),
    "lora_A_missing": (drop("A"), "no lora_A"),
}


@pytest.mark.parametrize("case", sorted(MISFIT))
def test_2_an_adapter_that_does_not_fit_the_base_model_is_one_line(case, artifact, tmp_path, capsys):
    import shutil

    art = tmp_path / "prism"
    shutil.copytree(artifact, art)
    edit, needle = MISFIT[case]
    edit_adapter(art, edit)
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "hello"}) + "\n")
    out = tmp_path / "o.jsonl"
    rc = cli.main(["generate", "--prism", str(art), "--input", str(tmp_path / "p.jsonl"), "--output", str(out), "-q"])
    line = one_error_line(capsys)
    assert rc == 2 and needle in line and "adapter_model.safetensors" in line, line
    assert not out.exists()


def test_2_the_untouched_adapter_fits(artifact, tiny_model_dir):
    from prism_persona.gated.model import check_adapter_fits
    from prism_persona.models import load_model

    model, _ = load_model(str(tiny_model_dir), device="cpu")
    check_adapter_fits(model, artifact / "adapter")  # no error


# --------------------------------------------------------------------------------------------------
# 3. prism serve: a field the server would silently ignore is 400 naming it


def chat_body(**kw):
    return {"model": "prism", "messages": [{"role": "user", "content": "hi"}], **kw}


REFUSED = {
    # body extras -> the param the 400 names
    "tools": ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    "tool_choice_required": ({"tool_choice": "required"}, "tool_choice"),
    "functions": ({"functions": [{"name": "f"}]}, "functions"),
    "function_call": ({"function_call": "auto"}, "function_call"),
    "response_format_json": ({"response_format": {"type": "json_object"}}, "response_format"),
    "response_format_schema": ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
    "logit_bias": ({"logit_bias": {"50256": -100}}, "logit_bias"),
    "presence_penalty": ({"presence_penalty": 1.5}, "presence_penalty"),
    "frequency_penalty": ({"frequency_penalty": -0.5}, "frequency_penalty"),
    "frequency_penalty_type": ({"frequency_penalty": "high"}, "frequency_penalty"),
    "presence_penalty_range": ({"presence_penalty": 0.0 + 3}, "presence_penalty"),
    "audio": ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    "modalities": ({"modalities": ["text", "audio"]}, "modalities"),
    "prediction": ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    "best_of": ({"best_of": 3}, "best_of"),
    "echo": ({"echo": True}, "echo"),
    "max_tokens_differ": ({"max_tokens": 5, "max_completion_tokens": 7}, "max_tokens"),
    "max_tokens_bad_beside_completion": ({"max_tokens": "many", "max_completion_tokens": 7}, "max_tokens"),
    "stream_options_without_stream": ({"stream_options": {"include_usage": True}}, "stream_options"),
    "include_usage_not_bool": (
        {"stream": True, "stream_options": {"include_usage": "yes"}},
        "stream_options.include_usage",
    ),
    "prism_unknown_key": ({"prism": {"forse": True}}, "prism.forse"),
    # refused before this change too (kept here so each OpenAI field of the brief has its test)
    "n_2": ({"n": 2}, "n"),
    "temperature_high": ({"temperature": 2.5}, "temperature"),
    "temperature_nan": ({"temperature": float("nan")}, "temperature"),
    "top_p_string": ({"top_p": "0.9"}, "top_p"),
    "stop_number": ({"stop": 3}, "stop"),
    "stop_five": ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    "logprobs_string": ({"logprobs": "yes"}, "logprobs"),
    "top_logprobs_without_logprobs": ({"top_logprobs": 3}, "top_logprobs"),
    "max_tokens_zero": ({"max_tokens": 0}, "max_tokens"),
    "max_tokens_float": ({"max_tokens": 10.5}, "max_tokens"),
}

ACCEPTED = {
    "bookkeeping": {"user": "u1", "metadata": {"a": "b"}, "store": False, "parallel_tool_calls": True},
    "unused_values": {
        "tool_choice": "none",
        "tools": [],
        "response_format": {"type": "text"},
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "modalities": ["text"],
        "n": 1,
    },
    "both_budgets_agree": {"max_tokens": 4, "max_completion_tokens": 4},
    "stream_with_usage": {"stream": True, "stream_options": {"include_usage": True}},
    "unknown_extra": {"my_client_field": 1},
}


@pytest.fixture(scope="module")
def serve_tokenizer():
    from prism_persona.testing import make_tokenizer

    return make_tokenizer()


@pytest.fixture(scope="module")
def local_server(serve_tokenizer):
    from prism_persona.serve.api import Limits
    from prism_persona.testing import FakeGatedModel, serve_fake

    fake = FakeGatedModel(serve_tokenizer)
    with serve_fake(fake, limits=Limits(max_new_tokens=8)) as srv:
        yield srv, fake


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_3_a_body_the_server_would_ignore_or_misread_is_400_naming_the_field(case, local_server):
    from prism_persona.testing import http_request

    srv, fake = local_server
    before = len(fake.batches)
    extra, param = REFUSED[case]
    status, _, reply = http_request(srv, "POST", "/v1/chat/completions", chat_body(**extra))
    assert status == 400, reply
    err = reply["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error", err
    assert err["param"] == param and param.split(".")[-1] in err["message"], err
    assert len(fake.batches) == before  # refused before the model worker saw it


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_3_fields_that_change_nothing_are_accepted(case, local_server):
    from prism_persona.testing import http_request

    srv, _ = local_server
    status, _, reply = http_request(srv, "POST", "/v1/chat/completions", chat_body(**ACCEPTED[case]))
    assert status == 200, reply


def test_3_max_tokens_above_the_limit_is_clamped_and_says_so(local_server):
    from prism_persona.testing import http_request

    srv, fake = local_server
    status, headers, reply = http_request(srv, "POST", "/v1/chat/completions", chat_body(max_tokens=10_000))
    assert status == 200 and headers["X-Prism-Max-Tokens-Clamped"] == "8", (headers, reply)
    assert reply["usage"]["completion_tokens"] <= 8


def test_3_route_only_passes_upstream_fields_through(serve_tokenizer):
    from prism_persona.serve.app import ServeOptions
    from prism_persona.serve.backend import GatedBackend
    from prism_persona.serve.http import PrismServer
    from prism_persona.serve.upstream import Forwarder
    from prism_persona.testing import FakeGatedModel, FakeOpenAIServer, http_request

    with FakeOpenAIServer() as up:
        opts = ServeOptions(port=0, base_name="base", lora_name="lora", upstream=up.url)
        backend = GatedBackend(FakeGatedModel(serve_tokenizer))
        with PrismServer(backend, opts, Forwarder(up.url, timeout_s=20)).start() as srv:
            body = chat_body(response_format={"type": "json_object"}, presence_penalty=0.5)
            status, _, reply = http_request(srv, "POST", "/v1/chat/completions", body)
            assert status == 200, reply
            status, _, reply = http_request(srv, "POST", "/v1/chat/completions", chat_body(prism={"nope": 1}))
            assert status == 400 and reply["error"]["param"] == "prism.nope", reply
    assert up.bodies[0]["response_format"] == {"type": "json_object"} and up.bodies[0]["presence_penalty"] == 0.5
    assert len(up.bodies) == 1


def test_1_the_writing_engines_own_special_tokens_are_dropped_too(tmp_path):
    from types import SimpleNamespace

    from prism_persona.bootstrap.queries import tokenizer_specials, write_queries
    from prism_persona.store import RunDir
    from prism_persona.testing import ScriptedEngine

    cfg = one_round_list_config(tmp_path)
    tricky = "Tell me a story about <repo_name> and dragons please?"
    reply = "\n".join([tricky, "Why is the sky blue at noon?", GOOD])
    eng = ScriptedEngine(responder=lambda chat: reply)
    eng.tokenizer = SimpleNamespace(all_special_tokens=["<repo_name>", "<|im_end|>", "a", "user"])
    assert tokenizer_specials(eng) == ("<repo_name>", "<|im_end|>")  # plain words are never special here
    write_queries(cfg, RunDir(cfg.out), lambda: eng, {"stories": {"short": "You are a storyteller."}})
    stored = [json.loads(x)["query"] for x in (tmp_path / "run" / "queries.jsonl").read_text().splitlines()]
    assert tricky not in stored and GOOD in stored
    rounds = [json.loads(x) for x in (tmp_path / "run" / "query_rounds.jsonl").read_text().splitlines()]
    assert rounds[0]["dropped"].get("unsafe text") == 1
