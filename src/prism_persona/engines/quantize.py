"""Int8 linear layers for the in-process engine on a CPU (``engine.hf_quantize``; opt-in: it changes outputs).

:func:`quantized_copy` gives a copy of a causal LM for inference whose ``nn.Linear`` layers run int8
matmuls; every other tensor (the embedding -- the weight a tied LM head shares --, the norms, the rotary
buffers) and every linear left in fp32 is the original's own tensor, shared, not copied: the original
model is unchanged (it keeps training, sharing and serving fp32), and the copy adds only the int8
weights.

Modes (measured on SmolLM2-135M in docs/performance.md, "The engine end to end at the main command's
shapes"):

- ``int8-dynamic``: ``torch.ao``'s dynamic quantized linear (fbgemm / x86 backend): per-output-channel
  int8 weights, activations quantized per call with one scale per tensor -- 8 bits on a CPU with
  AVX-512-VNNI (its int8 dot product accumulates in int32), 7 elsewhere (``torch.ao``'s default:
  AVX2's int16 pair sums could saturate). 2-5x the fp32 GFLOP/s of a single linear on this CPU. The
  MLP's ``down_proj`` layers stay fp32: their inputs hold outlier channels hundreds of times the
  median, and one scale for the whole tensor leaves the other channels a few levels (quantized too,
  the logits' relative error on SmolLM2-135M was 0.48 instead of 0.17; with 7-bit activations 0.73
  and 0.29). The scale is the whole input's, all rows of the batch: a row's output depends on the
  rows batched with it.
- ``int8-weight``: weight-only int8 (``aten._weight_int8pack_mm``, per-output-channel scales), bf16
  activations: closer to fp32's outputs, but no faster than fp32 end to end on this CPU (its kernel
  reaches half fp32's GFLOP/s at 16-72 rows), so it is not an ``engine.hf_quantize`` choice; the
  benchmark (``bench_cpu_engine.py --quantize``) measures it. (With fp32 activations the kernel ran at
  ~2 GFLOP/s: a reference loop.)
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from ..errors import PrismError

FP32_LINEARS = {"int8-dynamic": ("down_proj",), "int8-weight": ()}
"""Per mode, the linear layers (names' last part) kept in fp32."""


def check_quantizable(model, mode: str) -> None:
    """A one-line error where ``mode`` cannot apply to ``model``: an unknown mode, a model off the CPU,
    a model that is not float32, or one carrying PEFT adapters (their LoRA layers would be frozen into the copy)."""
    modes = ("off", *FP32_LINEARS)
    if mode not in modes:
        raise PrismError(f"engine.hf_quantize: unknown mode {mode!r}; choose one of: {', '.join(modes)}")
    if mode == "off":
        return
    param = next(model.parameters())
    if param.device.type != "cpu":
        raise PrismError(f"engine.hf_quantize={mode} runs on a CPU only (the model is on {param.device.type})")
    if param.dtype != torch.float32:
        raise PrismError(f"engine.hf_quantize={mode} quantizes a float32 model (this one is {param.dtype})")
    if getattr(model, "peft_config", None) or any(hasattr(m, "lora_A") for m in model.modules()):
        raise PrismError(
            f"engine.hf_quantize={mode}: the model carries LoRA adapters; quantize the base model (the gated "
            "model's engine runs fp32)"
        )


def quantized_copy(model, mode: str):
    """``model`` for inference with its ``nn.Linear`` layers in int8 (``mode``: see the module), every other
    tensor shared with ``model`` (not copied); ``model`` itself is not changed. ``mode="off"``: ``model``."""
    check_quantizable(model, mode)
    if mode == "off":
        return model
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    out = copy.deepcopy(model, shared)  # new modules, the original's tensors
    keep = FP32_LINEARS[mode]
    for name, module in list(out.named_modules()):
        if not isinstance(module, nn.Linear) or name.rpartition(".")[2] in keep:
            continue
        parent, _, attr = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, attr, _int8_linear(module, mode))
    return out.eval()  # the copy's modules only: the shared tensors keep their requires_grad


def _int8_linear(linear, mode: str):
    if mode == "int8-dynamic":
        from torch.ao.quantization import per_channel_dynamic_qconfig

        linear = copy.copy(linear)  # the qconfig attribute goes on a copy: the original module stays as it was
        linear.qconfig = per_channel_dynamic_qconfig
        with warnings.catch_warnings():  # torch.ao.quantization's deprecation notice
            warnings.simplefilter("ignore")
            return _dynamic_class().from_float(linear)
    return WeightInt8Linear(linear)


def has_vnni() -> bool:
    """Whether this CPU has AVX-512-VNNI (``/proc/cpuinfo``; ``False`` where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512_vnni" in line for line in f)
    except OSError:
        return False


_DYNAMIC: list = []


def _dynamic_class():
    """``torch.ao``'s dynamic int8 linear, with 8-bit activations where the CPU has VNNI (see the module)."""
    if not _DYNAMIC:
        import torch.ao.nn.quantized.dynamic as nnqd

        reduce_range = not has_vnni()

        class DynamicInt8Linear(nnqd.Linear):
            def forward(self, x):
                packed = self._packed_params._packed_params
                return torch.ops.quantized.linear_dynamic(x, packed, reduce_range=reduce_range).to(x.dtype)

        _DYNAMIC.append(DynamicInt8Linear)
    return _DYNAMIC[0]


class WeightInt8Linear(nn.Module):
    """Weight-only int8 linear: per-output-channel int8 weights and scales, bf16 activations
    (``aten._weight_int8pack_mm``), fp32 output."""

    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scale).to(x.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias
