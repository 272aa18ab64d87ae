"""A quantized frozen base: the denoiser's weights stored in int8 (or fp8) by torchao, LoRA trained
on top in full precision; what fits FLUX.1-dev's 12 B transformer on a 24 GB card."""

from __future__ import annotations

import torch

from rewardbooth.config import QUANTIZATIONS
from rewardbooth.errors import ConfigError


def quantize_frozen(module: torch.nn.Module, kind: str) -> torch.nn.Module:
    """Quantize `module`'s linear weights in place (weight-only: activations stay in the compute dtype)."""
    if kind not in QUANTIZATIONS:
        raise ConfigError(f"model.quantize must be one of {', '.join(QUANTIZATIONS)}, got {kind!r}")
    try:  # deferred: torchao is an optional dependency (rewardbooth[quant]) and slow to import
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise ConfigError(f"model.quantize={kind} needs torchao: pip install 'rewardbooth[quant]'") from None
    quantize_(module, Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig())
    return module
