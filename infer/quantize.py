"""Low-bit weights for inference (`--quantize`): int8 weight-only on CPU and GPU, FP8 on Ada/Hopper GPUs.

torchao swaps the weight of every Linear layer of the language model (attention, MLP, vocabulary
head) for a quantised tensor; embeddings, norms, the vision tower and the projector keep their
precision. int8 weight-only stores one int8 per weight and one scale per output row, and computes
in the activations' dtype: a quarter of fp32's bytes, half of bf16's, which is what a batch-1
forward, bound by reading the weights, pays for. FP8 (e4m3 weights and activations, one scale per
row, torch._scaled_mm) needs compute capability 8.9. The quality change on the demo model is in
the README (VQA accuracy, CIDEr); tests/test_quantize.py bounds the logits' error on a tiny one.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from mmdlm.errors import UserError

Quantize = Literal["none", "int8", "fp8"]
QUANTIZE = ("none", "int8", "fp8")


class QuantizeError(UserError):
    """A --quantize choice this machine or install cannot run; the message says what to do instead."""


def quantize_lm(lm: nn.Module, kind: Quantize) -> nn.Module:
    """Return `lm` with its Linear weights quantised in place to `kind` ("none" leaves it as it is)."""
    if kind == "none":
        return lm
    if kind not in QUANTIZE:
        raise QuantizeError(f"--quantize {kind}: choose one of {', '.join(QUANTIZE)}")
    device = next(lm.parameters()).device
    if kind == "fp8" and (device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9)):
        raise QuantizeError(f"--quantize fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); the "
                            f"model is on {device}: use --quantize int8")
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int8WeightOnlyConfig,
            PerRow,
            quantize_,
        )
    except ImportError as error:
        raise QuantizeError(f"--quantize {kind} needs torchao: pip install -e '.[quant]'") from error
    if kind == "int8":
        config = Int8WeightOnlyConfig()
    else:
        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    quantize_(lm, config, filter_fn=lambda module, name: isinstance(module, nn.Linear))
    return lm


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Return the bytes a tensor holds; a quantised one (a tensor subclass) counts its data and scales."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def weight_bytes(module: nn.Module) -> int:
    """Return the bytes of a module's parameters and buffers (a tied weight counted once)."""
    seen, total = set(), 0
    for tensor in (*module.parameters(), *module.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor_bytes(tensor)
    return total
