"""The PRISM artifact directory (``RUN/prism/``): what is in it and how it is written.

* ``prism_config.json`` - base model (the embedded default by name, else its id or path), persona
  placement, library version, file names;
* ``gate.safetensors`` + ``gate_config.json`` - the routing gate and its threshold and metrics;
* ``adapter/`` - a standard PEFT LoRA adapter (decoder layers 1..L-1), loadable with
  ``PeftModel.from_pretrained(base, "RUN/prism/adapter")``.

One adapter per persona (K >= 2): ``adapter/`` is the standard PEFT multi-adapter directory that
``save_pretrained`` writes for several adapters - the first persona's adapter at its root (PEFT's
``default``), every other one in a sub-folder named by its persona (``adapter/<name>/``), loadable with
``PeftModel.from_pretrained(base, "adapter")`` + ``load_adapter("adapter/<name>", adapter_name=<name>)``.
``prism_config.json``'s ``personas`` names them in order (adapter k = persona k); an artifact without it
holds one adapter.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config import RunConfig
from ..formats import ARTIFACT_CONFIG, SINGLE_ADAPTER_VERSION, stamp, upgrade
from .gate import GATE_CONFIG, GATE_WEIGHTS, GateBundle

log = logging.getLogger(__name__)

PRISM_CONFIG = "prism_config.json"
ADAPTER_DIR = "adapter"
PERSONAS_KEY = "personas"  # prism_config.json: the adapters' (personas') names, in order
PERSONA_ADAPTERS = "distill/personas.json"  # in the run: one adapter per persona (train/personas.py)
FINGERPRINT_FILE = "base_fingerprint.json"  # in the run directory, written when the model is loaded
MAX_ADAPTER_ABS = 1e3  # a trained LoRA's weights are O(1); larger ones only overflow the base model's activations
MAX_GATE_ABS = 1e6  # the gate's weights and its feature standardisation (layer-0 states reach the thousands)
MAX_LORA_ALPHA = 1e4  # lora_alpha (and alpha_pattern values): the LoRA scale is alpha / r


@dataclass(frozen=True)
class Artifact:
    """A PRISM artifact directory, read and checked once: every reader goes through :meth:`read`.

    ``config`` is ``prism_config.json`` as written (unknown keys are kept: newer artifacts load).
    """

    path: Path
    config: dict

    @classmethod
    def read(cls, directory: str | Path, need_adapter: bool = True) -> Artifact:
        """Check ``directory`` is a complete artifact; a one-line :class:`PrismError` otherwise.

        ``need_adapter=False`` for readers that only route (the gate is all they load).
        """
        from ..errors import PrismError

        d = Path(directory).expanduser().resolve()
        cfg_path = d / PRISM_CONFIG
        if not cfg_path.is_file():
            raise PrismError(f"{d} is not a PRISM artifact (no {PRISM_CONFIG}); point --prism at RUN/prism")
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise PrismError(f"{cfg_path} is not valid JSON ({exc}); re-assemble the artifact") from None
        if isinstance(cfg, dict):
            cfg = upgrade(cfg, ARTIFACT_CONFIG, str(cfg_path))
        if not isinstance(cfg, dict) or not cfg.get("base_model"):
            raise PrismError(f"{cfg_path} names no base_model; re-assemble the artifact")
        for name in (GATE_WEIGHTS, GATE_CONFIG):
            if not (d / name).is_file():
                raise PrismError(f"{d} has no {name}: the artifact is incomplete; re-assemble it")
        art = cls(d, cfg)
        _check_number(cfg, "batch_size", cfg_path, at_least=1, integer=True)
        _check_number(cfg, "threshold", cfg_path, at_least=0, at_most=1)
        _check_gate_config(d / GATE_CONFIG)
        _check_safetensors(d / GATE_WEIGHTS)
        _check_tensors(d / GATE_WEIGHTS, MAX_GATE_ABS)
        art._check_personas()
        if need_adapter:
            for _, adapter in art.adapters:
                art._check_adapter(adapter)
        return art

    def _check_personas(self) -> None:
        from ..errors import PrismError
        from .layers import ADAPTER_NAME, DEFAULT_ADAPTER

        names = self.config.get(PERSONAS_KEY)
        if names is None:
            return
        where = f"{self.path / PRISM_CONFIG}: {PERSONAS_KEY}"
        if not isinstance(names, list) or not names:
            raise PrismError(f"{where} must be a non-empty list of names, got {names!r}; re-assemble the artifact")
        for name in names:
            if not isinstance(name, str) or not ADAPTER_NAME.match(name):
                raise PrismError(
                    f"{where}: {name!r} is not a persona name (letters, digits, _ and -, at most 64); "
                    "re-assemble the artifact"
                )
        if len(set(names)) != len(names):
            raise PrismError(f"{where} names a persona twice ({names}); re-assemble the artifact")
        if DEFAULT_ADAPTER in names[1:]:
            raise PrismError(
                f"{where}: only the first persona may be named {DEFAULT_ADAPTER!r} (PEFT's root adapter); "
                "re-assemble the artifact"
            )

    def _check_adapter(self, adapter: Path) -> None:
        from ..errors import PrismError

        if self.path not in adapter.resolve().parents:
            raise PrismError(
                f"{self.path / PRISM_CONFIG}: adapter {self.config.get('adapter')!r} is not a folder inside "
                "the artifact; re-assemble the artifact"
            )
        if not (adapter / "adapter_config.json").is_file():
            raise PrismError(
                f"{self.path} has no LoRA adapter ({adapter}/adapter_config.json is missing); re-assemble the artifact"
            )
        acfg = _json_object(adapter / "adapter_config.json")
        _check_number(acfg, "r", adapter / "adapter_config.json", at_least=1, integer=True)
        _check_number(acfg, "lora_alpha", adapter / "adapter_config.json", above=0, at_most=MAX_LORA_ALPHA)
        for key, bounds in (
            ("alpha_pattern", {"above": 0, "at_most": MAX_LORA_ALPHA}),
            ("rank_pattern", {"at_least": 1}),
        ):
            pattern = acfg.get(key) or {}
            if not isinstance(pattern, dict):
                raise PrismError(f"{adapter / 'adapter_config.json'}: {key} is not an object; re-assemble the artifact")
            for module in pattern:
                _check_number(pattern, module, adapter / "adapter_config.json", integer=key == "rank_pattern", **bounds)
        weights = adapter / "adapter_model.safetensors"
        if not weights.exists() and (adapter / "adapter_model.bin").is_file():
            raise PrismError(
                f"{adapter} holds adapter_model.bin, a pickle, which PRISM never loads (it can run code); "
                "re-assemble the artifact (PRISM writes adapter_model.safetensors)"
            )
        _check_safetensors(weights)
        _check_tensors(weights, MAX_ADAPTER_ABS, lora_rank=_lora_rank(acfg))

    def check_trust(self, trust_remote_code: bool) -> bool:
        """Custom modelling code runs only when the user typed ``--trust-remote-code``: an artifact
        that asks for it without the flag is refused (a received artifact never turns it on)."""
        from ..errors import PrismError

        if self.config.get("trust_remote_code") and not trust_remote_code:
            raise PrismError(
                f"{self.path} was built from a model that runs its own code (trust_remote_code); "
                "PRISM runs that code only when you pass --trust-remote-code"
            )
        return bool(trust_remote_code)

    def check_base(self, model) -> None:
        """Refuse a base model other than the one the artifact was trained on (its config fingerprint
        and a checksum of the embeddings + decoder layer 0, which the gate reads); an artifact written
        before fingerprints existed loads with a logged note."""
        from ..errors import PrismError

        saved = self.config.get("base_fingerprint")
        if not isinstance(saved, dict):
            log.info(
                "%s records no base-model fingerprint (an older artifact): the base model is not checked", self.path
            )
            return
        problem = fingerprint_mismatch(saved, base_fingerprint(model))
        if problem:
            raise PrismError(
                f"{self.base_model} is not the base model {self.path} was trained on ({problem}); "
                "use the model it was trained on"
            )

    @property
    def base_model(self) -> str:
        return str(self.config["base_model"])

    @property
    def adapter_dir(self) -> Path:
        return self.path / str(self.config.get("adapter", ADAPTER_DIR))

    @property
    def personas(self) -> list[str]:
        """The adapters' names in order (adapter k = persona k); ``['default']`` for a one-adapter artifact
        that names none."""
        from .layers import DEFAULT_ADAPTER

        return [str(n) for n in self.config.get(PERSONAS_KEY) or [DEFAULT_ADAPTER]]

    @property
    def adapters(self) -> list[tuple[str, Path]]:
        """``(name, adapter directory)`` per persona: the first at ``adapter/``, the others in
        ``adapter/<name>/`` (PEFT's multi-adapter layout)."""
        names, root = self.personas, self.adapter_dir
        return [(names[0], root)] + [(n, root / n) for n in names[1:]]

    @property
    def batch_size(self) -> int:
        return int(self.config.get("batch_size", 8))

    def gate(self) -> GateBundle:
        from ..errors import PrismError

        try:
            return GateBundle.load(self.path)
        except (KeyError, ValueError, RuntimeError, OSError) as exc:
            raise PrismError(
                f"{self.path / GATE_WEIGHTS} does not hold a gate this version can load "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                "re-assemble the artifact"
            ) from None


def _json_object(path: Path) -> dict:
    from ..errors import PrismError

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise PrismError(f"{path} is not valid JSON ({exc}); re-assemble the artifact") from None
    if not isinstance(data, dict):
        raise PrismError(f"{path} is not a JSON object; re-assemble the artifact")
    return data


def _check_number(data: dict, key: str, path: Path, integer: bool = False, **bounds) -> None:
    """``data[key]``, when present, is a finite number (an integer with ``integer``) within ``bounds``
    (the keywords of config's bound checker); else one line naming the file."""
    import math

    from ..errors import PrismError
    from ..options import bound_error

    if key not in data:
        return
    value = data[key]
    kind = int if integer else (int, float)
    problem = None
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        problem = "must be an integer" if integer else "must be a finite number"
    problem = problem or bound_error(value, bounds)
    if problem:
        raise PrismError(f"{path}: {key} {problem}, got {value!r}; re-assemble the artifact")


def _check_gate_config(path: Path) -> None:
    from ..errors import PrismError
    from .features import POOLINGS

    gcfg = _json_object(path)
    _check_number(gcfg, "threshold", path, at_least=0, at_most=1)
    _check_number(gcfg, "hidden_size", path, at_least=1, integer=True)
    pooling = gcfg.get("pooling", "last")
    if pooling not in POOLINGS:
        raise PrismError(
            f"{path}: pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}; re-assemble the artifact"
        )


def _check_safetensors(path: Path) -> None:
    """Missing, empty, truncated or random bytes: a one-line error (the header and the file size are
    checked, which reads a few KiB, before any model loads)."""
    from ..errors import PrismError

    if not path.is_file():
        raise PrismError(f"{path} is missing: the artifact is incomplete; re-assemble it")
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("the file is empty or shorter than a safetensors header")
            n = int.from_bytes(head, "little")
            if n <= 1 or n > min(size - 8, 100 * 2**20):
                raise ValueError("the header length is not plausible")
            header = json.loads(fh.read(n).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not an object")
        end = max([int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"] or [0])
        if 8 + n + end > size:
            raise ValueError(f"truncated ({size} bytes, the header describes {8 + n + end})")
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError, OSError) as exc:
        raise PrismError(f"{path} is not a valid safetensors file ({exc}); re-assemble the artifact") from None


def _lora_rank(acfg: dict):
    """``module name -> rank`` of an adapter config (``rank_pattern`` keys matched as name suffixes)."""
    r, pattern = int(acfg.get("r", 8)), acfg.get("rank_pattern") or {}

    def rank(tensor_name: str) -> int:
        module = tensor_name.split(".lora_")[0]
        for key, value in pattern.items():
            if module == key or module.endswith("." + key) or module.endswith(key):
                return int(value)
        return r

    return rank


def _check_tensors(path: Path, max_abs: float, lora_rank=None) -> None:
    """Every tensor of a (header-checked) safetensors file is finite and within ``max_abs``: a NaN or
    huge weight is one line naming the tensor, never a model that answers garbage. ``lora_rank``
    (adapters): each ``lora_A`` is a matrix of that many rows, each ``lora_B`` of that many columns."""
    import torch
    from safetensors import safe_open

    from ..errors import PrismError

    try:
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():
                t = fh.get_tensor(name)
                if lora_rank is not None and (".lora_A." in name or ".lora_B." in name):
                    want, axis = lora_rank(name), 0 if ".lora_A." in name else 1
                    if t.dim() != 2 or t.shape[axis] != want:
                        raise PrismError(
                            f"{path}: tensor {name} has shape {list(t.shape)}, not a rank-{want} LoRA matrix; "
                            "re-assemble the artifact"
                        )
                if not (t.is_floating_point() and t.numel()):
                    continue
                if not bool(torch.isfinite(t).all()):
                    raise PrismError(f"{path}: tensor {name} holds NaN or infinite values; re-assemble the artifact")
                peak = float(t.abs().max())
                if peak > max_abs:
                    raise PrismError(
                        f"{path}: tensor {name} holds a value of magnitude {peak:.3g} (at most {max_abs:g} in a "
                        "trained PRISM artifact); re-assemble the artifact"
                    )
    except PrismError:
        raise
    except Exception as exc:  # safetensors' own errors (dtype, layout) are not one class
        raise PrismError(f"{path} is not a valid safetensors file ({exc}); re-assemble the artifact") from None


# --------------------------------------------------------------------------------------------------
# the base model's fingerprint

FINGERPRINT_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rope_theta",
    "rms_norm_eps",
    "tie_word_embeddings",
)
PROBE_RTOL = 1e-2  # loose enough for bfloat16 / float16 loads of the same weights


def content_id(directory: str | Path) -> str:
    """A short hash of every file of an artifact (relative path and bytes, in sorted order): what names
    the artifact in caches (``prism eval``'s responses), so an artifact re-assembled at the same path
    (``prism run --redo gate``, another threshold) is not mistaken for the one before. Reads the regular
    files once (a 7B artifact's ~80 MB adapter: well under a second); a link is hashed by the path it
    names, never followed, so an artifact someone sent cannot make this read a file outside it."""
    import hashlib
    import stat

    root = Path(directory)
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):  # links are never followed, into folders or files
        entries += [Path(dirpath, name) for name in dirnames + filenames]
    digest = hashlib.sha1()
    for path in sorted(entries):
        mode = os.lstat(path).st_mode
        digest.update(path.relative_to(root).as_posix().encode("utf-8") + b"\0")
        if stat.S_ISLNK(mode):  # a link is named by its target's path: nothing outside the artifact is read
            digest.update(b"link:" + os.fsencode(os.readlink(path)))
        elif stat.S_ISREG(mode):  # a FIFO or device is never opened (it could block or never end)
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def base_fingerprint(model) -> dict:
    """What identifies a base model for the gate: a hash of its architecture config (layer count left
    out, so the route-only loader's one-layer model matches) and float sums (|x| and x^2) of the embedding matrix
    and decoder layer 0 (the gate's input), which a different checkpoint of the same shape changes."""
    import hashlib

    import torch

    from ..models import decoder_layers

    conf = model.config.to_dict()
    text_conf = conf.get("text_config") if isinstance(conf.get("text_config"), dict) else conf
    arch = {k: text_conf.get(k) for k in FINGERPRINT_KEYS}
    config_sha = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode()).hexdigest()
    tensors = [model.get_input_embeddings().weight] + [
        p for _, p in sorted(decoder_layers(model)[0].named_parameters())
    ]
    probe = []
    with torch.no_grad():
        for t in tensors:
            flat = t.detach().reshape(-1)
            l1 = l2 = 0.0
            for start in range(0, flat.numel(), 1 << 24):  # float32 in chunks: no full-size copy of a 7B embedding
                x = flat[start : start + (1 << 24)].float()
                l1 += float(x.abs().sum(dtype=torch.float64))
                l2 += float((x * x).sum(dtype=torch.float64))
            probe += [l1, l2]  # positive sums: stable across dtypes
    return {"config_sha256": config_sha, "layer0_probe": [round(v, 6) for v in probe]}


def fingerprint_mismatch(saved: dict, now: dict) -> Optional[str]:
    """None when ``now`` matches ``saved``, else what differs."""
    if saved.get("config_sha256") != now.get("config_sha256"):
        return "its architecture config differs"
    a, b = saved.get("layer0_probe") or [], now.get("layer0_probe") or []
    if len(a) != len(b):
        return "its layer-0 weights differ in shape"
    for x, y in zip(a, b):
        if abs(x - y) > PROBE_RTOL * max(abs(x), abs(y), 1e-3):
            return "its embedding / layer-0 weights differ"
    return None


def model_reference(spec: Optional[str]) -> tuple[str, str]:
    """(what to store as ``base_model``, its kind): the embedded default by name, paths made absolute."""
    from ..models import resolve_model

    src = resolve_model(spec)
    if src.kind == "embedded":
        return src.display, "embedded"
    if src.kind == "gguf":
        return str(Path(src.path_or_id) / src.gguf_file), "gguf"
    return src.path_or_id, src.kind


def write_artifact(
    directory: str | Path,
    *,
    model_spec: Optional[str],
    gate: GateBundle,
    adapter_dir: str | Path | None = None,
    extra: Optional[dict] = None,
    adapters: Optional[Sequence[tuple[str, str | Path]]] = None,
) -> Path:
    """Assemble the artifact: gate files, a copy of the adapter dir and ``prism_config.json`` (last,
    so a directory with a config is complete). ``adapters`` = ``[(persona name, adapter dir), ...]`` instead
    of ``adapter_dir``: one adapter per persona (PEFT's multi-adapter layout, the names in ``personas``)."""
    from .. import __version__
    from .layers import ADAPTER_NAME, DEFAULT_ADAPTER

    if (adapter_dir is None) == (adapters is None):
        raise ValueError("write_artifact takes adapter_dir or adapters, not both or neither")
    named = [(str(n), Path(p)) for n, p in adapters] if adapters is not None else [(DEFAULT_ADAPTER, Path(adapter_dir))]
    names = [n for n, _ in named]
    if not names or len(set(names)) != len(names) or not all(ADAPTER_NAME.match(n) for n in names):
        raise ValueError(f"persona names must be distinct folder names (letters, digits, _ and -), got {names}")
    if DEFAULT_ADAPTER in names[1:]:
        raise ValueError(f"only the first persona may be named {DEFAULT_ADAPTER!r}")
    d = Path(directory)
    d.parent.mkdir(parents=True, exist_ok=True)
    base, kind = model_reference(model_spec)
    tmp = Path(tempfile.mkdtemp(dir=d.parent, prefix=f".{d.name}.tmp-"))
    try:
        gate.save(tmp)
        skip = shutil.ignore_patterns("optimizer.pt", "trainer_state.json")
        for k, (name, src) in enumerate(named):
            shutil.copytree(src, tmp / ADAPTER_DIR / name if k else tmp / ADAPTER_DIR, ignore=skip)
        cfg = {
            "base_model": base,
            "model_kind": kind,
            "adapter": ADAPTER_DIR,
            "gate_weights": GATE_WEIGHTS,
            "gate_config": GATE_CONFIG,
            "threshold": gate.threshold,
            "prism_version": __version__,
        }
        if adapters is not None:
            cfg[PERSONAS_KEY] = names
        cfg.update(extra or {})
        cfg = stamp(cfg, ARTIFACT_CONFIG, version=None if PERSONAS_KEY in cfg else SINGLE_ADAPTER_VERSION)
        (tmp / PRISM_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _fsync_tree(tmp)
        _swap_into_place(tmp, d)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return d


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def _swap_into_place(tmp: Path, dst: Path) -> None:
    """Rename the finished ``tmp`` to ``dst``. An old ``dst`` is renamed aside first and removed after:
    a reader (or a kill) sees the old complete artifact, the new complete one, or none - never a mix."""
    old = None
    if dst.exists() or dst.is_symlink():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
    os.replace(tmp, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    remove_leftovers(dst)


def remove_leftovers(dst: Path) -> None:
    """Remove what killed earlier assemblies of ``dst`` left beside it: every temporary directory
    (the caller holds the run lock) and the set-aside old artifacts of processes no longer running."""
    from ..store import pid_alive

    for leftover in dst.parent.glob(f".{dst.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in dst.parent.glob(f".{dst.name}.old-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def is_artifact(directory: str | Path) -> bool:
    d = Path(directory)
    return (d / PRISM_CONFIG).is_file() and (d / GATE_WEIGHTS).is_file()


def assemble(run, cfg: RunConfig) -> Path:
    """Build ``RUN/prism`` from the finished gate (``RUN/gate``) and distillation (``RUN/distill/adapter``,
    or one adapter per persona when ``RUN/distill/personas.json`` lists them)."""
    from ..errors import PrismError

    gate_dir, adapter = run.path("gate"), run.path("distill") / "adapter"
    listing = run.read_json(PERSONA_ADAPTERS)
    adapters = None
    if isinstance(listing, dict) and isinstance(listing.get("personas"), list):
        adapters = [(str(p["name"]), run.root / str(p["adapter"])) for p in listing["personas"]]
    if not (gate_dir / GATE_WEIGHTS).is_file():
        raise PrismError(f"{run.root} has no trained gate; run `prism gate --run {run.root}` first")
    for _, a in adapters or [("", adapter)]:
        if not (a / "adapter_config.json").is_file():
            raise PrismError(f"{run.root} has no distilled adapter ({a}); run `prism distill --run {run.root}` first")
    gate = GateBundle.load(gate_dir)
    names = [n for n, _ in adapters or []]
    # persona k of the gate = adapter k; one adapter serves a binary gate. They differ where gate.classes
    # changed after the distillation (`--redo gate --set gate.classes=...`): no single --redo trains both
    if gate.personas != names and (adapters or gate.gate.personas > 1):

        def plan(k: list) -> str:
            return f"{len(k)} personas ({', '.join(k)})" if len(k) > 1 else "one adapter for all personas"

        raise PrismError(
            f"{run.root}: the gate routes to {plan(gate.personas)} but the distillation trained "
            f"{plan(names)} (gate.classes changed after it?); the gate and the adapters must both be trained "
            "again: pass --redo verdicts (judges again, then trains both) or use a new --out"
        )
    extra = {
        "domains": list(cfg.persona.domains),
        "placement": cfg.persona.placement,
        "persona_length": cfg.persona.use_length,
        "batch_size": int(cfg.model.batch_size),
        "distill": {
            "loss": cfg.distill.loss,
            "r": cfg.distill.r,
            "alpha": cfg.distill.alpha,
            "target_modules": list(cfg.distill.target_modules),
        },
        "trust_remote_code": bool(cfg.model.trust_remote_code),
    }
    fingerprint = run.read_json(FINGERPRINT_FILE)
    if fingerprint:
        extra["base_fingerprint"] = fingerprint
    return write_artifact(
        run.path("prism"),
        model_spec=cfg.model.model,
        gate=gate,
        adapter_dir=None if adapters else adapter,
        adapters=adapters,
        extra=extra,
    )
