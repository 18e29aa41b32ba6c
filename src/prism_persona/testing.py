"""Test doubles that ship with the library: a scripted engine, tiny random causal LMs, a tiny PRISM
artifact, a scriptable OpenAI-compatible server and a fake gated model for serving tests.

Users can test their own judges and pipelines with them too; nothing here touches the network.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional

from .engines.base import Completion, Engine, SamplingParams
from .store import content_key

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

NO_SYSTEM_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ScriptedEngine(Engine):
    """An engine that returns queued outputs (or a function's), and records every call.

    >>> eng = ScriptedEngine(["first", "second"])
    >>> [c.text for c in eng.generate([[{"role": "user", "content": "q"}]] * 2, SamplingParams())]
    ['first', 'second']

    ``responder(chat) -> str`` answers when the queue is empty. ``scorer(chat, choices) -> dict``
    enables :meth:`score_choices` (log-prob verdicts); without it the engine cannot score.
    """

    name = "scripted"

    def __init__(
        self,
        outputs: Sequence[str] = (),
        responder: Optional[Callable] = None,
        scorer: Optional[Callable] = None,
        model_name: str = "scripted",
    ):
        self.queue = collections.deque(outputs)
        self.responder = responder
        self.scorer = scorer
        self.model_name = model_name
        self.calls: list[tuple[list, SamplingParams]] = []
        self.score_calls: list[tuple[list, tuple]] = []
        self.tokens_generated = 0

    def enqueue(self, *outputs: str) -> ScriptedEngine:
        self.queue.extend(outputs)
        return self

    def generate(self, chats, params: SamplingParams, desc: str = "") -> list[Completion]:
        out = []
        for chat in chats:
            self.calls.append((chat, params))
            if self.queue:
                text = self.queue.popleft()
            elif self.responder is not None:
                text = self.responder(chat)
            else:
                raise AssertionError("ScriptedEngine: no output queued for this call")
            n = len(text.split())
            self.tokens_generated += n
            out.append(Completion(text=text, num_tokens=n))
        return out

    def score_choices(self, chats, choices):
        if self.scorer is None:
            return None
        res = []
        for chat in chats:
            self.score_calls.append((chat, tuple(choices)))
            res.append(dict(self.scorer(chat, list(choices))))
        return res

    @property
    def can_score(self) -> bool:
        return self.scorer is not None


def first_per_domain(src: str | Path, dst: str | Path, per_domain: int) -> Path:
    """Write the first ``per_domain`` rows of each domain of the JSON Lines file ``src`` to ``dst``
    (a smaller copy of an example kit's queries for a test); returns ``dst``."""
    import json

    rows, seen = [], collections.Counter()
    for line in Path(src).read_text(encoding="utf-8").splitlines():
        domain = json.loads(line)["domain"]
        seen[domain] += 1
        if seen[domain] <= per_domain:
            rows.append(line)
    Path(dst).write_text("\n".join(rows) + "\n", encoding="utf-8")
    return Path(dst)


def kit_run_overrides(
    out: str | Path,
    kit: Path,
    persona: str,
    domains: Sequence[str],
    queries_file: str | Path,
    per_domain: int,
    heldout: str | Path,
    tokens: int,
) -> dict:
    """The settings an example kit's ``prism run`` command gives (``--persona-file`` for every domain,
    ``--queries-file``, the kit's built-in judge ``prism_persona.kits.NAME:judge``, ``--answer-tokens``,
    ``--heldout``), for the kit directory ``kit`` (``prism_persona.kits.kit_path(NAME)``), as
    overrides for ``config.resolve``; merge a test's own settings into it with ``options.merge``."""
    persona_file = str(kit / persona)
    return {
        "out": str(out),
        "quiet": True,
        "persona": {"domains": list(domains), "persona_files": {d: persona_file for d in domains}},
        "queries": {"queries_file": str(queries_file), "queries_per_persona": per_domain},
        "answers": {"max_new_tokens": tokens},
        "judge": {"judge": f"prism_persona.kits.{kit.name}:judge"},
        "check": {"queries": str(heldout), "max_new_tokens": tokens},  # prism run --heldout
    }


def make_tokenizer(system_role: bool = True):
    """A byte-level tokenizer (256 byte tokens + ChatML specials) built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHATML_TEMPLATE if system_role else NO_SYSTEM_TEMPLATE
    tok.padding_side = "left"
    return tok


def make_tiny_model(
    path: str | Path,
    num_layers: int = 3,
    hidden_size: int = 64,
    seed: int = 0,
    system_role: bool = True,
    arch: str = "llama",
) -> Path:
    """Save a tiny randomly initialised causal LM + tokenizer to ``path`` and return it.

    ``arch`` is ``llama`` or ``qwen2`` (the two families PRISM is most used with).
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    path = Path(path)
    tok = make_tokenizer(system_role)
    common = dict(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    cfg = Qwen2Config(**common) if arch == "qwen2" else LlamaConfig(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    # Larger-than-default init so the random model's next-token distribution is far from uniform
    # and depends on the prompt (a persona then changes it, as in a real model).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# --------------------------------------------------------------------------------------------------
# a scripted engine for the bootstrap

PERSONA_REPLY = (
    'Sure! Here is the persona:\n\n## Persona\n"You are a seasoned {d} specialist with twenty years '
    'of practice. You give precise, practical advice and explain trade-offs clearly."'
)


def bootstrap_config(out, **sections):
    """A tiny-preset run config for scripted bootstraps: quiet, writing and coding, run directory
    ``out``; ``sections`` (e.g. ``queries={...}``) are merged over it."""
    from . import config as C
    from .options import merge

    base = {"out": str(out), "quiet": True, "persona": {"domains": ["writing", "coding"]}}
    return C.resolve("tiny", overrides=merge(base, sections))


def verdict_stub(domain: str, first: str, second: str, winner: str, margins=None) -> dict:
    """A ``verdicts.jsonl`` record: the judge's letters in the persona-first and persona-second orders,
    the pair's ``winner`` and, for a log-prob judge, ``margins`` = ((logp_A, logp_B), (logp_A, logp_B))."""
    verdicts = [
        {"order": "persona_first", "winner": first, "detail": {}},
        {"order": "persona_second", "winner": second, "detail": {}},
    ]
    for v, (a, b) in zip(verdicts, margins or ()):
        v["detail"] = {"logp_A": a, "logp_B": b}
    return {"domain": domain, "verdicts": verdicts, "winner": winner, "persona_chars": 10, "base_chars": 12}


def blind_verdicts(n: int, domain: str = "writing") -> list[dict]:
    """``n`` verdict records of a judge that always answers "A" (orders disagree on every pair)."""
    return [verdict_stub(domain, "A", "A", "mixed") for _ in range(n)]


def seeing_verdicts(n: int, domain: str = "writing") -> list[dict]:
    """``n`` verdict records of a judge that sees the answers: the persona wins every other pair, in
    both orders, and loses the rest in both orders."""
    return [
        verdict_stub(domain, "A", "B", "persona") if i % 2 else verdict_stub(domain, "B", "A", "base") for i in range(n)
    ]


_FAKE_WORDS = (
    "budget",
    "deadline",
    "garden",
    "invoice",
    "recipe",
    "backup",
    "essay",
    "ladder",
    "password",
    "river",
    "tenant",
    "engine",
    "poster",
    "vaccine",
    "printer",
    "lecture",
    "harbor",
    "pension",
    "sensor",
    "quilt",
    "bicycle",
    "kettle",
    "mortgage",
    "violin",
    "compost",
    "router",
    "glacier",
    "sonnet",
    "ferry",
    "tariff",
)


def fake_request(*parts) -> str:
    """A deterministic request tail built from ``parts``: different parts give requests that share few
    words (so the near-duplicate filter keeps them)."""
    h = int(content_key("fake-request", *[str(p) for p in parts]), 16)
    w = [_FAKE_WORDS[(h >> (7 * i)) % len(_FAKE_WORDS)] for i in range(3)]
    return f"{' '.join(w)} {h % 99991} {(h >> 40) % 99991}?"


class BootstrapEngine(ScriptedEngine):
    """A scripted engine for the whole bootstrap: answers every prompt kind deterministically (from the
    sampling seed), so pipelines can be tested end to end without a real model.

    Persona answers contain EXPERT; the judge prefers the answer with EXPERT, position-consistently.
    ``fail_after`` raises after that many generate calls (a simulated kill).
    """

    def __init__(self, fail_after=None, judge_reply=None, queries_per_reply=4):
        super().__init__()
        self.fail_after = fail_after
        self.judge_reply = judge_reply
        self.qpr = queries_per_reply
        self.n_generate = 0

    def generate(self, chats, params, desc=""):
        if self.fail_after is not None and self.n_generate >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.n_generate += 1
        self.responder = lambda chat: self.reply(chat, params)
        return super().generate(chats, params)

    def reply(self, chat, params):
        text = chat[-1]["content"]
        if "Write a description of an expert in" in text:
            dom = text.split("expert in ")[1].split(",")[0]
            return PERSONA_REPLY.format(d=dom)
        if "Write the topics of the next field" in text:  # the 'shots' query format: topics, then requests
            return "Topics: basics, tools, common mistakes"
        if "Write the request for the next field and topic" in text:
            return f"Request: How do I {fake_request(text, params.seed)}"
        if "might send to an AI assistant about" in text:  # the 'one' query format
            opener = text.split('Begin it with "')[1].split('"')[0] if "Begin it with" in text else "How do I"
            return f"{opener} {fake_request(text, params.seed)}"
        if "questions or requests" in text:
            base = params.seed % 1000
            return "Here are some questions:\n" + "\n".join(
                f"{i + 1}. How should I {fake_request(base, i)}" for i in range(self.qpr)
            )
        if "[Response A]" in text:
            if self.judge_reply:
                return self.judge_reply(chat)
            a = text.split("[Response A]")[1].split("[Response B]")[0]
            return "A" if "EXPERT" in a else "B"
        has_persona = any(m["role"] == "system" for m in chat) or "You are" in text
        return ("EXPERT answer, detailed: " if has_persona else "plain answer: ") + text[:30]


# --------------------------------------------------------------------------------------------------
# a tiny PRISM artifact

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SPLIT_QUERIES = ("hi", "write a poem", "fix my code", "as an expert, explain tides")
_ARTIFACTS: dict = {}


def make_tiny_artifact(
    model_dir: str | Path,
    out: str | Path,
    r: int = 4,
    seed: int = 0,
    target_modules: Sequence[str] = ALL_PROJECTIONS,
    queries: Sequence[str] = SPLIT_QUERIES,
    cache: bool = True,
    pooling: Optional[str] = None,
    ood: bool = False,
    personas: Sequence[str] = (),
) -> Path:
    """A real PRISM artifact on a tiny model: a PEFT LoRA on decoder layers 1..L-1 (random, non-zero B)
    and a random gate whose threshold splits ``queries`` in half (so both routes are exercised).

    The gate is the product's: the shape and feature of the default :class:`~prism_persona.config.GateConfig`
    (``pooling`` overrides the default pooling, so tests can run on every pooling the gate supports).
    ``ood``: also fit the default abstain region (``gate.ood``) on ``queries``, as training does; off by
    default, since a region of four queries leaves most other queries outside it.
    ``personas`` (two or more names): a K-way artifact instead - a random K-way gate over those names
    (its last layer fitted so ``queries[i]`` goes to class ``i mod (K + 1)``, 0 = base, so each persona and
    the base get queries) and one random adapter per persona
    (PEFT's multi-adapter layout, ``personas`` in prism_config.json).

    With ``cache`` (the default) it is built once per process for the same model and settings, at the
    first ``out``; later calls return that directory, so treat it as read-only.
    """
    from .config import GateConfig

    gcfg = GateConfig()
    pooling = gcfg.pooling if pooling is None else pooling
    key = (str(model_dir), int(r), int(seed), tuple(target_modules), tuple(queries), pooling, ood, tuple(personas))
    if cache and key in _ARTIFACTS:
        return _ARTIFACTS[key]
    import torch
    from peft import LoraConfig, get_peft_model

    from .gated.artifact import write_artifact
    from .gated.features import query_features
    from .gated.gate import Gate, GateBundle
    from .models import load_model

    out = Path(out)
    base, tok = load_model(str(model_dir), dtype="float32", device="cpu")
    feats = query_features(base, tok, list(queries), 16, pooling)
    torch.manual_seed(seed)
    kway = len(personas) >= 2
    gate = Gate(feats.shape[1], gcfg.hidden_sizes, dropout=0.0, pooling=pooling, personas=max(1, len(personas)))
    gate.set_standardisation(feats)
    gate.eval()
    if kway:  # query i -> class i mod (K + 1) (0 = base): every persona gets queries, and the base too
        with torch.no_grad():
            hidden = gate.mlp[:-1](gate.standardise(feats))
            hidden = torch.cat([hidden, torch.ones(len(hidden), 1)], dim=1)
            target = torch.full((len(hidden), len(personas) + 1), -4.0)
            target[torch.arange(len(hidden)), torch.arange(len(hidden)) % (len(personas) + 1)] = 4.0
            solved = torch.linalg.lstsq(hidden, target).solution  # [h + 1, K + 1]
            gate.mlp[-1].weight.copy_(solved[:-1].T)
            gate.mlp[-1].bias.copy_(solved[-1])
    if ood:
        from .train.gate import fit_ood

        gate.ood, _ = fit_ood(gate, feats, gcfg.ood, gcfg.ood_quantile, gcfg.ood_k)
    probs = sorted(gate(feats).tolist())
    mid = len(probs) // 2
    info: dict = {"metrics": {}}
    if kway:
        info["personas"] = [{"name": str(name)} for name in personas]
    bundle = GateBundle(gate=gate, threshold=(probs[mid - 1] + probs[mid]) / 2, info=info)
    n = base.config.num_hidden_layers
    lcfg = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        lora_dropout=0.0,
        layers_to_transform=list(range(1, n)),
        target_modules=list(target_modules),
        init_lora_weights=False,
    )
    pm = get_peft_model(base, lcfg)
    named = []
    for name in personas if kway else ["default"]:
        with torch.no_grad():
            for pname, p in pm.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0.0, 0.05)
        adapter = out.parent / f"{out.name}-adapter" / (str(name) if kway else "")
        pm.save_pretrained(adapter)
        named.append((str(name), adapter))
    if kway:
        art = write_artifact(out, model_spec=str(model_dir), gate=bundle, adapters=named)
    else:
        art = write_artifact(out, model_spec=str(model_dir), gate=bundle, adapter_dir=named[0][1])
    if cache:
        _ARTIFACTS[key] = art
    return art


# --------------------------------------------------------------------------------------------------
# a scriptable OpenAI-compatible server on 127.0.0.1


class FakeOpenAIServer:
    """A chat-completions server for tests: answers each request with the next scripted
    ``(status, body)``, then with ``reply(body)`` (default: ``"echo " + last message``); a request for
    a model in ``down_models`` gets 503; ``stream: true`` gets server-sent events ending in ``[DONE]``.

    Records ``bodies``, ``headers`` and the most requests in flight at once (``max_inflight``).
    Serving starts at construction; use it as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        script: Sequence = (),
        delay: float = 0.0,
        logprobs: bool = False,
        reply=None,
        down_models: Sequence[str] = (),
    ):
        import threading
        from http.server import ThreadingHTTPServer

        self.script = list(script)
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.delay = delay
        self.logprobs = logprobs
        self.reply = reply or (lambda body: "echo " + body["messages"][-1]["content"])
        self.down_models = set(down_models)
        self.inflight = 0
        self.max_inflight = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _fake_handler(self))
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @property
    def auth(self) -> list[str]:
        return [h.get("Authorization", "") for h in self.headers]

    def answer(self, body: dict) -> tuple[int, dict]:
        if body.get("model") in self.down_models:
            return 503, {"error": {"message": "overloaded", "type": "server_error", "param": None, "code": None}}
        choice = {
            "index": 0,
            "finish_reason": "stop",
            "logprobs": None,
            "message": {"role": "assistant", "content": self.reply(body)},
        }
        if self.logprobs and body.get("logprobs"):
            top = [{"token": t, "logprob": lp} for t, lp in (("B", -0.5), (" A", -1.5), ("A", -2.0), ("x", -3.0))]
            choice["logprobs"] = {"content": [{"token": "B", "logprob": -0.5, "top_logprobs": top}]}
        return 200, {
            "id": "fake-1",
            "object": "chat.completion",
            "created": 1,
            "model": body.get("model"),
            "choices": [choice],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        }

    def stream_events(self, body: dict) -> list[dict]:
        text = self.reply(body)
        words = text.split(" ")
        deltas = [({"role": "assistant", "content": ""}, None)]
        deltas += [({"content": w if i == 0 else " " + w}, None) for i, w in enumerate(words)]
        deltas.append(({}, "stop"))
        return [
            {
                "id": "fake-2",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": body.get("model"),
                "choices": [{"index": 0, "delta": d, "finish_reason": fin}],
            }
            for d, fin in deltas
        ]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> FakeOpenAIServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fake_handler(server: FakeOpenAIServer):
    import json
    import time
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with server.lock:
                server.bodies.append(body)
                server.headers.append(dict(self.headers))
                server.inflight += 1
                server.max_inflight = max(server.max_inflight, server.inflight)
                step = server.script.pop(0) if server.script else None
            done = False

            def finished() -> None:  # counted out before the reply is written: a client that has read it
                nonlocal done  # may send its next request before this thread runs again
                if not done:
                    done = True
                    with server.lock:
                        server.inflight -= 1

            try:
                time.sleep(server.delay)
                if step is None and body.get("stream") and body.get("model") not in server.down_models:
                    return self._stream(server.stream_events(body))
                reply = step if step else server.answer(body)
                finished()
                self._json(*reply)
            finally:
                finished()

        def _json(self, status: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _stream(self, events: list[dict]) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            for ev in events:
                self.wfile.write(f"data: {json.dumps(ev)}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            self.close_connection = True

    return Handler


# --------------------------------------------------------------------------------------------------
# serving test doubles


class FakeGatedModel:
    """GatedModel's serving interface: generate(chats, params, force), route(chats), tokenizer.

    The gate fires (prob 0.9) when the last user message contains "expert", else 0.1. Generation
    echoes the message; a message containing "boom" raises; ``gate`` (an Event) blocks generate
    until set, and ``started`` is set when generate is entered.
    """

    def __init__(self, tokenizer=None, gate=None, vocab: int = 0):
        import threading

        self.tokenizer = tokenizer
        self.batches: list[dict] = []
        self.route_calls: list[int] = []
        self.gate = gate
        self.started = threading.Event()
        self.lock = threading.Lock()
        self.vocab = vocab

    @staticmethod
    def prob(chat) -> float:
        last = [m["content"] for m in chat if m["role"] == "user"][-1]
        return 0.9 if "expert" in last else 0.1

    def generate(self, chats, params, force=None):
        forces = force if isinstance(force, list) else [force] * len(chats)
        with self.lock:
            self.batches.append({"n": len(chats), "params": params, "force": list(forces)})
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never released"
        out = []
        for chat, f in zip(chats, forces):
            last = chat[-1]["content"]
            if "boom" in last:
                raise RuntimeError("boom requested")
            p = self.prob(chat)
            routed = f if f is not None else p >= 0.5
            words = f"{'EXPERT' if routed else 'base'} answer to: {last}".split()[: params.max_new_tokens]
            out.append(
                Completion(
                    " ".join(words),
                    len(words),
                    "length" if len(words) == params.max_new_tokens else "stop",
                    {"routed": routed, "gate_prob": p},
                )
            )
        return out

    def route(self, chats):
        self.route_calls.append(len(chats))
        return [(self.prob(c), self.prob(c) >= 0.5) for c in chats]

    def forward_logits(self, input_ids, attention_mask, force=None):
        import torch

        n, t = input_ids.shape
        logits = torch.zeros(n, t, self.vocab)
        logits[:, -1, ord("B")] = 20.0  # some byte token; its text is whatever the tokenizer decodes
        logits[:, -1, :10] += torch.arange(10, dtype=torch.float32)
        return logits, torch.full((n,), 0.5), torch.zeros(n, dtype=torch.bool)


def serve_fake(model, **options):
    """A started :class:`~prism_persona.serve.http.PrismServer` on a free loopback port around ``model``
    (e.g. a :class:`FakeGatedModel`); ``options`` are :class:`ServeOptions` fields. Use it as a context
    manager (it shuts down on exit)."""
    from .serve.app import ServeOptions
    from .serve.backend import GatedBackend
    from .serve.http import PrismServer

    opts = ServeOptions(port=0, **options)
    return PrismServer(GatedBackend(model, name=opts.model_name), opts).start()


def http_request(server, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
    """One HTTP request to ``server`` (anything with a ``port``) on loopback; returns (status, headers
    (case-insensitive), parsed JSON or text)."""
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        text = resp.read().decode()
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text
        return resp.status, resp.headers, parsed  # HTTPMessage: header names case-insensitive, as in HTTP
    finally:
        conn.close()


def vllm_server_pids(needle: str) -> list[str]:
    """PIDs of running vLLM API servers (real or stand-in) started with ``--enable-lora`` whose command
    line mentions ``needle`` (a model path, or the cache an adapter was exported to): tests use it to
    check that no server outlives the command that started it."""
    from pathlib import Path

    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            b"vllm.entrypoints.openai.api_server" in argv
            and b"--enable-lora" in argv
            and any(needle.encode() in arg for arg in argv)
        ):
            out.append(cmdline.parent.name)
    return out


def one_error_line(capsys) -> str:
    """The one non-blank line a command wrote to stderr (pytest's ``capsys``); fails if there are more."""
    err = [x for x in capsys.readouterr().err.strip().splitlines() if x.strip()]
    assert len(err) == 1, err
    return err[0]


def small_run_overrides(model_dir, out, domains: Sequence[str] = ("writing", "coding")) -> dict:
    """Settings (a ``config.resolve`` overrides dict, on the ``tiny`` preset) of a run on a tiny model
    that the scripted :class:`BootstrapEngine` finishes in seconds."""
    return {
        "out": str(out),
        "quiet": True,
        "persona": {"domains": list(domains)},
        "model": {"model": str(model_dir), "batch_size": 4},
        "queries": {"queries_per_persona": 4, "per_request": 4},
        "gate": {"epochs": 20},
        "distill": {"epochs": 1, "r": 4, "max_length": 160},
    }
