"""The gated model: layer-0 features, gated LoRA layers, GatedModel, the artifact, export, fast decoding."""
