"""The PRISM model: base weights + a gate + a LoRA that is switched on per row, inside one forward.

How routing costs nothing extra
-------------------------------
The target ``nn.Linear`` modules of decoder layers 1..L-1 are replaced by :class:`GatedLoRALinear`,
which computes ``base(x) + scaling * B(A(x))`` only for the rows whose routing flag is set. A forward
hook on decoder layer 0 reads the layer-0 hidden states of each row's prompt during the prefill (their
mean over real tokens, or the last token, as the gate was trained), runs the gate (a logistic
regression or a small MLP), and writes the per-row flags before layer 1 runs. Decode
steps (one new token per row) keep the flags of their prefill. So a request costs one ordinary forward
pass: no second pass to route, no splitting of the batch.

* all rows off: the LoRA modules return ``base(x)`` untouched (base-model speed, base-model logits);
* all rows on: the delta is added to the whole batch (same maths as PEFT's LoRA);
* mixed: the routed rows are gathered (``index_select``), get their delta, and it is scattered back
  with ``index_add``; unrouted rows never pay for the LoRA matmuls.

Routing is decided once per conversation from its first user turn. A chat that is exactly one user
turn is routed inside its own prefill (the prompt is then rendered exactly as the gate was trained on).
Any other chat (multi-turn, or with its own system message) is routed from its first user turn by a
layer-0-only pass (:meth:`GatedModel.route`), so a conversation keeps its decision on every turn.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from ..engines.base import Completion, Engine, SamplingParams
from ..engines.hf import HFEngine
from ..models import decoder_layers, encode_prompts, load_model, render_chat
from .artifact import Artifact
from .features import last_token_index, layer_output, pool_states, position_ids_from_mask, query_features
from .gate import GateBundle, decide, persona_choice
from .layers import DEFAULT_ADAPTER, RoutingState, install_adapters

log = logging.getLogger(__name__)

Force = Optional[Any]  # None | bool | persona name | list[bool | persona name | None]


# --------------------------------------------------------------------------------------------------
# the gated model


def first_user_turn(chat: Sequence[dict]) -> str:
    for m in chat:
        if m.get("role") == "user":
            return str(m.get("content", ""))
    raise ValueError("chat has no user message")


def is_single_user_turn(chat: Sequence[dict]) -> bool:
    """True when the prompt the model reads is exactly what the gate was trained on."""
    return len(chat) == 1 and chat[0].get("role") == "user"


def normalise_force(force: Force, n: int) -> list[Optional[bool | str]]:
    """``None`` | bool | persona name | list of (bool | persona name | None) -> one entry per row.
    True = routed (to the gate's most probable persona), False = the base model, a name = routed to
    that persona's adapter."""
    if force is None or isinstance(force, (bool, str)):
        return [force] * n
    force = list(force)
    if len(force) != n:
        raise ValueError(f"force has {len(force)} entries for {n} rows")
    return [f if f is None or isinstance(f, str) else bool(f) for f in force]


def persona_names(gate: GateBundle, config: Optional[dict] = None) -> list[Optional[str]]:
    """The name of each of the gate's personas (index = :attr:`Decision.persona`), as responses report it:
    a K-way gate's persona names; for a binary gate the one persona's name when the artifact's
    ``personas`` names it, else ``None`` (an artifact with one unnamed adapter reports no name: its
    routed answers say ``routed`` and ``persona: null``)."""
    if gate.gate.personas > 1:
        return list(gate.personas)
    listed = (config or {}).get("personas")
    if isinstance(listed, list) and len(listed) == 1 and listed[0] != DEFAULT_ADAPTER:
        return [str(listed[0])]
    return [None]


def persona_of_force(names: Sequence[Optional[str]], name: str) -> int:
    """The index of the persona ``name`` (a forced route); a one-line ValueError naming the known ones."""
    if name in names:
        return list(names).index(name)
    known = [n for n in names if n]
    if not known:
        raise ValueError(f"unknown persona {name!r}: this artifact's one adapter has no name; force it with 'on'")
    raise ValueError(f"unknown persona {name!r}; this artifact's personas: {', '.join(known)}")


class GatedModel:
    """A base model that routes every query itself: gate on layer 0, gated LoRA on layers 1..L-1.

    See the module docstring for the routing design. Build with :meth:`from_pretrained` (an artifact
    dir) or :meth:`from_parts`. ``model`` and ``tokenizer`` stay usable as plain transformers objects:
    a direct ``model(...)`` call routes itself too (the layer-0 hook runs on every prefill).
    """

    def __init__(self, model, tokenizer, gate: GateBundle, batch_size: int = 8, config: Optional[dict] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.gate_bundle = gate
        self.gate = gate.gate.to(device=self.device, dtype=torch.float32).eval()
        self.threshold = float(gate.threshold)
        self.engine = HFEngine(model, tokenizer, batch_size=max(1, int(batch_size)), quiet=True)
        self.config = dict(config or {})
        self.state = RoutingState()
        self.lora_modules: list[str] = []
        self._overrides: Optional[list[Optional[bool | str]]] = None
        # rows decided before the forward (not a lone user turn): (gate_prob, abstained, class_probs,
        # outside) from their first user turn (decisions())
        self._prob_overrides: Optional[list[Optional[tuple]]] = None
        # per row of the last decision: the gate said route, but the query lay outside its training
        # region, so it went to the base model (gate.decide)
        self.abstained: Optional[torch.Tensor] = None
        # per row of the last decision: the query lies outside the gate's region, whatever its probability
        # (Decision.outside: it goes to the base model at every threshold)
        self.outside: Optional[torch.Tensor] = None
        self.persona: Optional[torch.Tensor] = None  # per row of the last decision: persona index, -1 = base
        self.class_probs: Optional[torch.Tensor] = None  # per row of the last decision: [K + 1] class probs
        # the name of each gate persona, as responses report it (None: a binary artifact's unnamed adapter)
        self.persona_names: list[Optional[str]] = persona_names(gate, config)
        # gate persona k -> adapter index (None: one adapter serves every routed row)
        self._adapter_of_persona: Optional[torch.Tensor] = None
        self._last_index: Optional[torch.Tensor] = None
        self._decided = False
        self._in_call = False
        self._suspended = False  # route(): the layer-0-only pass must not touch the routing flags
        self._hook = decoder_layers(model)[0].register_forward_hook(self._layer0_hook)
        # the attention mask of the current forward, for the gate's pooling over the prompt's real tokens
        self._mask: Optional[torch.Tensor] = None
        self._mask_hook = model.register_forward_pre_hook(self._capture_mask, with_kwargs=True)

    # ---------------------------------------------------------------------------------------- build

    @classmethod
    def from_parts(
        cls,
        model,
        tokenizer,
        gate: GateBundle,
        adapter_dir: str | Path | Sequence[tuple[str, str | Path]] | None = None,
        batch_size: int = 8,
        config: Optional[dict] = None,
    ) -> GatedModel:
        """Wrap an already loaded ``model`` (modified in place) with ``gate`` and a PEFT adapter dir (or
        ``[(persona name, adapter dir), ...]``: one adapter per persona, adapter k = persona k)."""
        gm = cls(model, tokenizer, gate, batch_size=batch_size, config=config)
        if adapter_dir is not None:
            named = [(DEFAULT_ADAPTER, adapter_dir)] if isinstance(adapter_dir, (str, Path)) else list(adapter_dir)
            gm.lora_modules = install_adapters(model, named, gm.state)
            bad = [n for n in gm.lora_modules if _layer_index(n) == 0]
            if bad:
                raise ValueError(f"the adapter touches decoder layer 0 ({bad[0]}); the gate reads that layer")
            gm._adapter_of_persona = adapter_index(gate, [str(name) for name, _ in named], gm.device)
            if gate.gate.personas == 1 and str(named[0][0]) != DEFAULT_ADAPTER:
                gm.persona_names = [str(named[0][0])]
        model.eval()
        return gm

    @classmethod
    def from_pretrained(
        cls,
        artifact_dir: str | Path,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: Optional[int] = None,
        base=None,
        trust_remote_code: bool = False,
    ) -> GatedModel:
        """Load ``RUN/prism``: the base model named in ``prism_config.json``, the gate, the adapter.

        ``base`` = an already loaded ``(model, tokenizer)`` to use instead of loading (it is modified).
        ``trust_remote_code`` comes from the user only (``--trust-remote-code``); an artifact asking for
        it without the flag is refused, as is a base model other than the one it was trained on.
        """
        from ..errors import PrismError

        art = Artifact.read(artifact_dir)
        trust = art.check_trust(trust_remote_code)
        gate = art.gate()  # a corrupt gate is refused before the model loads
        try:  # each adapter named by the gate's personas, before the model loads
            adapter_index(gate, art.personas)
        except ValueError as e:
            raise PrismError(f"{artifact_dir}: {e}") from None
        if base is None:
            model, tok = load_model(art.base_model, dtype=dtype, device=device, trust_remote_code=trust)
        else:
            model, tok = base
        art.check_base(model)
        hidden = int(getattr(model.config, "hidden_size", gate.gate.hidden_size))
        if hidden != gate.gate.hidden_size:
            raise PrismError(f"gate expects hidden size {gate.gate.hidden_size}, model has {hidden}")
        for _, adapter in art.adapters:
            check_adapter_fits(model, adapter)
        return cls.from_parts(
            model, tok, gate, art.adapters, batch_size=batch_size or art.batch_size, config=art.config
        )

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def batch_size(self) -> int:
        """Rows per forward of :meth:`generate` / :meth:`score_choices` (the owned engine's batch size)."""
        return self.engine.batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self.engine.batch_size = max(1, int(value))

    # ---------------------------------------------------------------------------------------- routing

    def _capture_mask(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        return None

    def _layer0_hook(self, module, args, out):
        """Runs after decoder layer 0 and before layer 1: decide the routing of each row."""
        if self._suspended:
            return None
        h = layer_output(out)
        if self._in_call and self._decided:
            return None  # decode step of a generate call: keep the prefill's flags
        if (
            not self._in_call
            and h.shape[1] <= 1
            and self.state.routed is not None
            and self.state.routed.numel() == h.shape[0]
        ):
            return None  # decode step of a direct model.generate(): keep the flags
        n = h.shape[0]
        idx = self._last_index if self._last_index is not None else torch.full((n,), h.shape[1] - 1, device=h.device)
        with torch.no_grad():
            if self.gate.pooling == "last":
                feats = h[torch.arange(n, device=h.device), idx.to(h.device)].float()
            else:
                feats = pool_states(h, self._mask, self.gate.pooling)
            d = decide(self.gate, self.threshold, feats)
        probs, routed, abstained, class_probs, outside = d.probs, d.routed, d.abstained, d.class_probs, d.outside
        if self._prob_overrides is not None and any(o is not None for o in self._prob_overrides):
            # rows decided from their first user turn (_prerouted): that decision, not this prompt's
            po = self._prob_overrides

            def first_turn(values: torch.Tensor, field: int, cast) -> torch.Tensor:
                """``values`` with each pre-routed row's ``field`` of its first-turn decision."""
                rows = [cast(v if po[i] is None else po[i][field]) for i, v in enumerate(values.tolist())]
                return torch.tensor(rows, device=h.device)

            probs, abstained, outside = (
                first_turn(probs, 0, float),
                first_turn(abstained, 1, bool),
                first_turn(outside, 3, bool),
            )
            routed = (probs >= self.threshold) & ~abstained
            class_probs = class_probs.clone()
            for i, o in enumerate(po):  # the first user turn's class probabilities pick the persona
                if o is not None:
                    class_probs[i] = o[2].to(class_probs)
        self.abstained, self.outside = abstained, outside
        forced_persona = None
        if self._overrides is not None:
            ov = torch.tensor([o is not None and o is not False for o in self._overrides], device=h.device)
            has = torch.tensor([o is not None for o in self._overrides], device=h.device)
            routed = torch.where(has, ov, routed)
            if any(isinstance(o, str) for o in self._overrides):
                forced_persona = [
                    persona_of_force(self.persona_names, o) if isinstance(o, str) else None for o in self._overrides
                ]
        self.persona = persona_choice(class_probs, routed)  # per row: the routed persona's index, -1 = base
        if forced_persona is not None:
            for i, k in enumerate(forced_persona):
                if k is not None:
                    self.persona[i] = k
        self.class_probs = class_probs
        adapters = None
        if self._adapter_of_persona is not None:  # one adapter per persona: row -> its persona's adapter
            index = self._adapter_of_persona.to(self.persona.device)
            adapters = torch.where(self.persona >= 0, index[self.persona.clamp_min(0)], -1)
        self.state.set(routed, probs, feats, persona=adapters)
        self._decided = True
        return None

    @contextlib.contextmanager
    def _call(
        self,
        overrides: Sequence[Optional[bool]],
        prob_overrides: Sequence[Optional[tuple]],
        last_index: Optional[torch.Tensor] = None,
    ):
        self._overrides, self._prob_overrides = list(overrides), list(prob_overrides)
        self._last_index, self._decided, self._in_call = last_index, False, True
        try:
            yield self.state
        finally:
            self._overrides = self._prob_overrides = self._last_index = None
            self._decided = self._in_call = False

    def routing(self, force: Sequence[Optional[bool]]):
        """Context manager for driving ``self.model`` yourself (e.g. a custom decode loop): within it
        the first forward (the prefill) routes each row - ``force[i]`` overrides row i - and later
        forwards (decode steps) keep the flags. Yields the :class:`RoutingState` (``routed``, ``probs``)."""
        force = list(force)
        self.check_force(force)
        return self._call(force, [None] * len(force))

    def check_force(self, force: Force) -> None:
        """A one-line ValueError for a forced persona name this artifact does not have (before any work)."""
        entries = [force] if force is None or isinstance(force, (bool, str)) else list(force)
        for f in entries:
            if isinstance(f, str):
                persona_of_force(self.persona_names, f)

    @property
    def has_abstain(self) -> bool:
        """True when the gate can abstain - it holds an abstain region (``gate.ood``), or it is a K-way gate
        with a ``min_confidence`` - so route reports say ``abstained``."""
        return self.gate.ood is not None or (self.gate.personas > 1 and self.gate.min_confidence > 0)

    @torch.no_grad()
    def _decide(self, chats: Sequence[list], threshold: Optional[float] = None):
        """:func:`~prism_persona.gated.gate.decide` on each chat's first user turn (embeddings + layer 0), at
        ``threshold`` (default: the artifact's)."""
        queries = [first_user_turn(c) for c in chats]
        self._suspended = True
        try:
            feats = query_features(self.model, self.tokenizer, queries, self.batch_size, self.gate.pooling).to(
                self.device
            )
        finally:
            self._suspended = False
        return decide(self.gate, self.threshold if threshold is None else threshold, feats)

    def decisions(self, chats: Sequence[list], threshold: Optional[float] = None) -> list[dict]:
        """``{"gate_prob", "routed", "abstained", "outside", "persona_name", "persona_prob", "persona_probs"}``
        (and ``persona``, the routed persona's index or -1, for a K-way gate) per chat, from its first user
        turn, with embeddings + layer 0 only (:func:`prism_persona.gated.gate.decide`: the same rule as
        the prefill hook). ``outside``: the query lies outside the gate's region (:attr:`Decision.outside`;
        always False for a gate that cannot abstain).
        ``persona_name`` / ``persona_prob``: as :meth:`generate` reports them (:func:`persona_report`);
        ``persona_probs``: the gate's probability of each persona (in :attr:`persona_names` order).
        ``threshold`` (default: the artifact's) decides at another threshold (``outside`` does not depend
        on it)."""
        if not chats:
            return []
        d = self._decide(chats, threshold)
        rows = []
        for i, (p, r, a, o, k) in enumerate(
            zip(d.probs.tolist(), d.routed.tolist(), d.abstained.tolist(), d.outside.tolist(), d.persona.tolist())
        ):
            name, prob = persona_report(self.persona_names, int(k), d.class_probs[i])
            rows.append(
                {
                    "gate_prob": float(p),
                    "routed": bool(r),
                    "abstained": bool(a),
                    "outside": bool(o),
                    "persona_name": name,
                    "persona_prob": prob,
                    "persona_probs": [round(float(x), 6) for x in d.class_probs[i, 1:].tolist()],
                }
            )
        if self.gate.personas > 1:  # K-way gate: the routed persona's index (-1 = base)
            for row, k in zip(rows, d.persona.tolist()):
                row["persona"] = int(k)
        return rows

    def route(self, chats: Sequence[list]) -> list[tuple[float, bool]]:
        """(gate_prob, routed) per chat (:meth:`decisions`; routed is False where the gate abstained)."""
        return [(d["gate_prob"], d["routed"]) for d in self.decisions(chats)]

    def _prerouted(self, chats: Sequence[list]) -> list[Optional[tuple]]:
        """(gate_prob, abstained, class_probs, outside) for chats that are not a lone user turn (from the
        first user turn)."""
        todo = [i for i, c in enumerate(chats) if not is_single_user_turn(c)]
        out: list[Optional[tuple]] = [None] * len(chats)
        if todo:
            d = self._decide([chats[i] for i in todo])
            for j, i in enumerate(todo):
                out[i] = (float(d.probs[j]), bool(d.abstained[j]), d.class_probs[j], bool(d.outside[j]))
        return out

    def _meta(self) -> list[dict]:
        """The route report of each row of the last decision: ``routed``, ``gate_prob``, ``persona`` and
        ``persona_prob`` (:func:`persona_report`), and ``abstained`` and ``outside`` when the gate can abstain."""
        out = []
        rows = zip(self.state.probs.tolist(), self.state.routed.tolist(), self.persona.tolist())
        for i, (p, r, k) in enumerate(rows):
            name, prob = persona_report(self.persona_names, int(k) if r else -1, self.class_probs[i])
            out.append({"routed": bool(r), "gate_prob": float(p), "persona": name, "persona_prob": prob})
        if self.has_abstain:
            for key, flags in (("abstained", self.abstained), ("outside", self.outside)):
                for row, flag in zip(out, flags.tolist() if flags is not None else []):
                    row[key] = bool(flag)
        return out

    # ---------------------------------------------------------------------------------------- forward

    @torch.no_grad()
    def forward_logits(
        self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, force: Force = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One forward: ``(logits [B, T, V], gate_probs [B], routed [B] bool)``.

        Each row is routed from its prompt's layer-0 states, pooled as the gate was trained (any padding side).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        overrides = normalise_force(force, input_ids.shape[0])
        self.check_force(overrides)
        return self._forward(input_ids, attention_mask, overrides, [None] * input_ids.shape[0])

    def _forward(self, input_ids, attention_mask, overrides, prob_overrides):
        with self._call(overrides, prob_overrides, last_token_index(attention_mask)):
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),
                use_cache=False,
            )
            probs, routed = self.state.probs.detach().clone(), self.state.routed.clone()
        return out.logits, probs, routed

    # ---------------------------------------------------------------------------------------- generate

    @torch.no_grad()
    def generate(
        self, chats: Sequence[list], params: Optional[SamplingParams] = None, force: Force = None
    ) -> list[Completion]:
        """One completion per chat; ``meta = {"routed", "gate_prob", "persona", "persona_prob"}`` (and
        ``"abstained"`` and ``"outside"`` when the gate can abstain: ``abstained`` is true where the
        probability said route but the query lay outside the gate's training queries, or no persona was
        confident enough, so it went to the base model; ``outside`` is true where the query lies there
        whatever its probability, :attr:`~prism_persona.gated.gate.Decision.outside`). ``persona``: the routed persona's name (``None`` on the base model, and for a binary
        artifact's unnamed adapter), ``persona_prob`` its calibrated probability (:func:`persona_report`).
        ``force`` (True / False / a persona name, or a list of those or None per chat) overrides the gate's
        decision (True: the gate's most probable persona); the gate probability is reported anyway."""
        params = params or SamplingParams()
        if not chats:
            return []
        overrides = normalise_force(force, len(chats))
        self.check_force(overrides)
        pre = self._prerouted(chats)

        @contextlib.contextmanager
        def routed_batch(rows):
            with self._call([overrides[i] for i in rows], [pre[i] for i in rows]):
                yield self._meta

        return self.engine.run_batches(chats, params, batch_context=routed_batch)

    @torch.no_grad()
    def score_choices(self, chats: Sequence[list], choices: Sequence[str], force: Force = None) -> list[dict]:
        """log P(first token of each choice) after the generation prompt, routed as in :meth:`generate`."""
        return self.score_choices_meta(chats, choices, force)[0]

    @torch.no_grad()
    def score_choices_meta(
        self, chats: Sequence[list], choices: Sequence[str], force: Force = None
    ) -> tuple[list[dict], list[dict]]:
        """(:meth:`score_choices`, the routing meta of each row as :meth:`generate` reports it): the decision
        the scoring forward routed by, so nothing asks the gate a second time."""
        choice_ids = {c: self.engine.choice_token_ids(c) for c in choices}
        overrides = normalise_force(force, len(chats))
        self.check_force(overrides)
        pre = self._prerouted(chats)
        texts = [render_chat(self.tokenizer, c) for c in chats]
        out: list[dict] = []
        metas: list[dict] = []
        for start in range(0, len(texts), self.batch_size):
            sl = slice(start, start + self.batch_size)
            enc = encode_prompts(self.tokenizer, texts[sl], self.device)
            logits, _, _ = self._forward(enc["input_ids"], enc["attention_mask"], overrides[sl], pre[sl])
            metas.extend(self._meta())  # the decision of this forward's prefill hook
            logp = torch.log_softmax(logits[:, -1, :].float(), dim=-1)
            for row in range(logp.shape[0]):
                out.append({c: float(torch.logsumexp(logp[row, ids], dim=0)) for c, ids in choice_ids.items()})
        return out, metas

    def as_engine(self, force: Force = None) -> GatedEngine:
        """An :class:`Engine` over this model (for the judge, evals, the server)."""
        return GatedEngine(self, force)

    def close(self) -> None:
        self._hook.remove()
        self._mask_hook.remove()


def persona_report(
    names: Sequence[Optional[str]], k: int, class_probs: torch.Tensor
) -> tuple[Optional[str], Optional[float]]:
    """``(persona, persona_prob)`` of one row as responses report them: the routed persona's name (``None``
    for a binary artifact's unnamed adapter) and the gate's calibrated probability of that persona
    (K = 1: the gate probability); ``(None, None)`` where the row went to the base model (``k`` = -1)."""
    if k < 0:
        return None, None
    return names[k] if k < len(names) else None, round(float(class_probs[k + 1]), 6)


def adapter_index(gate: GateBundle, adapters: Sequence[str], device=None) -> Optional[torch.Tensor]:
    """Gate persona k -> the index of its adapter among ``adapters`` (matched by name); ``None`` when one
    adapter serves every routed row (a binary gate, or a K-way gate over a single adapter). Several
    adapters need a K-way gate naming each of them: a mismatch is a one-line ValueError at load."""
    if len(adapters) <= 1:
        return None
    names = gate.personas
    if gate.gate.personas < 2:
        raise ValueError(f"{len(adapters)} adapters ({', '.join(adapters)}) need a K-way gate; this gate is binary")
    missing = [n for n in names if n not in adapters]
    if missing:
        raise ValueError(f"the gate's persona {missing[0]!r} has no adapter (adapters: {', '.join(adapters)})")
    return torch.tensor([list(adapters).index(n) for n in names], dtype=torch.long, device=device)


def check_adapter_fits(model, adapter_dir: str | Path) -> None:
    """Every tensor of a received adapter fits ``model`` before anything is installed: it is a LoRA A or
    B weight of a ``Linear`` layer of the model (not an embedding, a norm, a missing module or decoder
    layer 0, which the gate reads), ``lora_A`` is ``[r, in_features]`` and ``lora_B`` ``[out_features, r]``
    of the same ``r``, and each module has both. Reads only the safetensors header (shapes); a problem
    is one :class:`PrismError` naming the tensor, never a traceback from the copy."""
    import json

    from safetensors import safe_open
    from torch import nn

    from ..errors import PrismError

    d = Path(adapter_dir)
    weights = d / "adapter_model.safetensors"
    fix = "re-assemble the artifact from a run of this base model"
    try:
        dora = json.loads((d / "adapter_config.json").read_text(encoding="utf-8")).get("use_dora")
    except (OSError, ValueError, AttributeError):
        return  # Artifact.read reports an unreadable config
    if dora:
        raise PrismError(f"{d / 'adapter_config.json'}: DoRA adapters are not supported by the gated model")
    try:
        with safe_open(str(weights), framework="pt") as fh:
            shapes = {k: list(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except Exception:  # noqa: BLE001 - Artifact.read checked the file; nothing more to say here
        return
    modules = dict(model.named_modules())
    pairs: dict[str, dict[str, tuple[str, list]]] = {}
    for key, shape in shapes.items():
        if ".lora_" not in key:
            continue
        name, part = key.removeprefix("base_model.model."), ""
        for p in ("A", "B"):
            for suffix in (f".lora_{p}.weight", f".lora_{p}.default.weight"):
                if name.endswith(suffix):
                    name, part = name[: -len(suffix)], p
        if not part:
            raise PrismError(f"{weights}: tensor {key} is not a LoRA A/B weight of a Linear layer; {fix}")
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            what = "no module of this model" if module is None else f"a {type(module).__name__}, not a Linear layer"
            raise PrismError(f"{weights}: tensor {key} targets {name!r}, {what}; {fix}")
        if _layer_index(name) == 0:
            raise PrismError(f"{weights}: tensor {key} touches decoder layer 0, which the gate reads; {fix}")
        pairs.setdefault(name, {})[part] = (key, shape)
    for name, ab in sorted(pairs.items()):
        module = modules[name]
        if set(ab) != {"A", "B"}:
            have = next(iter(ab))
            raise PrismError(f"{weights}: {name} has a lora_{have} but no lora_{'B' if have == 'A' else 'A'}; {fix}")
        (ka, sa), (kb, sb) = ab["A"], ab["B"]
        r = sa[0] if len(sa) == 2 else None
        if len(sa) != 2 or sa[1] != module.in_features:
            raise PrismError(
                f"{weights}: tensor {ka} has shape {sa}; {name} takes {module.in_features} inputs "
                f"(want [r, {module.in_features}]); {fix}"
            )
        if sb != [module.out_features, r]:
            raise PrismError(
                f"{weights}: tensor {kb} has shape {sb}; {name} has {module.out_features} outputs "
                f"(want [{module.out_features}, {r}]); {fix}"
            )


def _layer_index(module_name: str) -> Optional[int]:
    parts = module_name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a in ("layers", "h", "blocks") and b.isdigit():
            return int(b)
    return None


class GatedEngine(Engine):
    """Engine view of a :class:`GatedModel`; every completion carries ``meta = {"routed", "gate_prob"}``."""

    name = "prism"

    def __init__(self, gated: GatedModel, force: Force = None):
        self.gated = gated
        self.force = force
        self.model_name = str(gated.config.get("base_model", "prism"))
        self.tokens_generated = 0
        self.generate_seconds = 0.0

    def generate(self, chats, params: SamplingParams, desc: str = "") -> list[Completion]:
        t0 = time.perf_counter()
        out = self.gated.generate(chats, params, self.force)
        self.generate_seconds += time.perf_counter() - t0
        self.tokens_generated += sum(c.num_tokens for c in out)
        return out

    def score_choices(self, chats, choices):
        return self.gated.score_choices(chats, choices, self.force)

    def score_choices_meta(self, chats, choices):
        """(scores, routing meta per row) of one scoring pass (:meth:`GatedModel.score_choices_meta`)."""
        return self.gated.score_choices_meta(chats, choices, self.force)
