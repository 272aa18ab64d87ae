"""LoRA adapters through peft, saved in the diffusers format (`pipe.load_lora_weights`)."""

from __future__ import annotations

from pathlib import Path

import torch

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default file name
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
TEXT_ENCODER_PREFIX = "text_encoder."


def lora_config(rank: int, alpha: float | None, dropout: float, target_modules: list[str]):
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=target_modules,
    )


def add_lora(model: torch.nn.Module, rank: int, alpha: float | None, dropout: float, target_modules: list[str]) -> None:
    """Attach a trainable LoRA adapter; base weights stay frozen."""
    config = lora_config(rank, alpha, dropout, target_modules)
    if hasattr(model, "disable_adapters") and hasattr(model, "set_adapters"):
        model.add_adapter(config)  # diffusers' own peft integration (enables disable_adapters for RPO's reference)
    else:
        # Text encoders: peft directly, so we never depend on transformers' peft-version gate.
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, model)


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def save_lora(folder: Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None) -> Path:
    """Write unet (and text encoder) LoRA weights as diffusers-format safetensors."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    unet_layers = convert_state_dict_to_diffusers(lora_state_dict(unet))
    text_layers = convert_state_dict_to_diffusers(lora_state_dict(text_encoder)) if text_encoder is not None else None
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(folder),
        unet_lora_layers=unet_layers,
        text_encoder_lora_layers=text_layers,
        safe_serialization=True,
    )
    return Path(folder) / LORA_WEIGHTS_NAME


def load_lora_into_pipeline(pipe, weights: Path, rank: int, alpha: float | None) -> None:
    """Load a run's LoRA file: the U-Net part through diffusers, the text-encoder part through peft.

    diffusers hands text-encoder LoRA to transformers' peft integration, which refuses peft
    versions it was not released with; the file stays loadable by `pipe.load_lora_weights`.
    """
    from diffusers.utils import convert_state_dict_to_peft
    from peft import inject_adapter_in_model
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(weights))
    text_state = {k[len(TEXT_ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(TEXT_ENCODER_PREFIX)}
    unet_state = {k: v for k, v in state.items() if not k.startswith(TEXT_ENCODER_PREFIX)}
    if unet_state:
        pipe.load_lora_weights(unet_state)
    if text_state:
        text_state = convert_state_dict_to_peft(text_state)
        targets = sorted({key.split(".lora_")[0].rsplit(".", 1)[-1] for key in text_state})
        inject_adapter_in_model(lora_config(rank, alpha, 0.0, targets), pipe.text_encoder)
        result = set_peft_model_state_dict(pipe.text_encoder, text_state)
        if result.unexpected_keys:
            raise RuntimeError(f"{weights}: text-encoder LoRA keys not loaded: {result.unexpected_keys[:3]}")
