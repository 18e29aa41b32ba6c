"""The gate without the model behind it: a PRISM artifact's base model cut to decoder layer 0, which is all
the gate reads (``prism serve --route-only`` and the vLLM engines of :mod:`.remote`)."""

from __future__ import annotations


def load_router(artifact: str, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False):
    """A ``GatedModel`` that can only :meth:`route`: the base model is loaded with one decoder layer
    (embeddings + layer 0 + the small head weights; layer 0's output does not depend on later layers)
    and no adapter. Falls back to loading the whole base model if the truncated load fails."""
    import logging

    from ..errors import PrismError
    from .artifact import Artifact
    from .model import GatedModel

    log = logging.getLogger(__name__)
    art = Artifact.read(artifact, need_adapter=False)
    cfg = art.config
    trust = art.check_trust(trust_remote_code)
    gate = art.gate()
    try:
        model, tok = load_layer0_model(art.base_model, device, dtype, trust)
    except PrismError:
        raise
    except Exception as exc:  # an architecture that cannot be cut to one layer
        log.warning("route-only: loading only layer 0 failed (%s); loading the whole base model", exc)
        from ..models import load_model

        model, tok = load_model(art.base_model, dtype=dtype, device=device, trust_remote_code=trust)
    art.check_base(model)
    return GatedModel(model, tok, gate, batch_size=art.batch_size, config=cfg)


def load_layer0_model(spec: str, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False):
    """``(model, tokenizer)`` of ``spec`` cut to its first decoder layer (for computing the gate)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models import load_tokenizer, pick_device, pick_dtype, resolve_model

    src = resolve_model(spec)
    dev = pick_device(device)
    config = AutoConfig.from_pretrained(src.path_or_id, gguf_file=src.gguf_file, trust_remote_code=trust_remote_code)
    config.num_hidden_layers = 1
    for key in ("layer_types", "sliding_window_pattern_layers"):
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)):
            setattr(config, key, list(value)[:1])
    tok = load_tokenizer(src, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        src.path_or_id,
        gguf_file=src.gguf_file,
        config=config,
        dtype=pick_dtype(dtype, dev),
        trust_remote_code=trust_remote_code,
    )
    model.to(dev)
    model.eval()
    return model, tok
