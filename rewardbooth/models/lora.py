"""LoRA adapters through peft, saved in the diffusers format (`pipe.load_lora_weights`)."""

from __future__ import annotations

from pathlib import Path

import torch

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default file name
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def add_lora(model: torch.nn.Module, rank: int, alpha: float | None, dropout: float, target_modules: list[str]) -> None:
    """Attach a trainable LoRA adapter; base weights stay frozen."""
    from peft import LoraConfig

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=target_modules,
    )
    model.add_adapter(config)


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
