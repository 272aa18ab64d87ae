"""A run's LoRA in the layouts other tools read.

- `diffusers`: `pytorch_lora_weights.safetensors` (what every LoRA run writes; `pipe.load_lora_weights`).
- `kohya`: `lora_unet_*` / `lora_te_*` (SDXL: `lora_te1_*`, `lora_te2_*`) modules with `lora_down`,
  `lora_up` and `alpha`, plus kohya's `ss_*` metadata: what AUTOMATIC1111/Forge, ComfyUI and
  diffusers' own non-diffusers loader read. SDXL U-Net modules use the original (SGM) block
  names, `input_blocks.4.1...`, as kohya's sdxl scripts write them.
- `peft`: one folder per trained model (`adapter_config.json` + `adapter_model.safetensors`),
  for `PeftModel.from_pretrained`.

alpha is written as trained, so every tool applies the same scale alpha / rank.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rewardbooth import __version__
from rewardbooth.errors import ConfigError
from rewardbooth.models.lora import TEXT_ENCODER_TARGETS, lora_config, split_lora_state

EXPORT_FORMATS = ("kohya", "diffusers", "peft")
KOHYA_WEIGHTS_NAME = "lora_kohya.safetensors"
EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_UNET_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.(.+)$")


def sgm_module_name(module: str, layers_per_block: int) -> str:
    """diffusers' SDXL U-Net module path in the original (SGM) layout kohya's SDXL LoRAs use.

    Each down level holds `layers_per_block` (resnet, transformer) pairs then a downsampler, each
    up level one pair more; the transformer is item 1 of its SGM block.
    """
    if module.startswith("mid_block.attentions.0."):
        return "middle_block.1." + module[len("mid_block.attentions.0."):]
    match = _UNET_BLOCK.match(module)
    if match is None:
        raise ConfigError(f"LoRA module {module} has no kohya SDXL name (only attention blocks are mapped); "
                          "export with --format diffusers")
    kind, level, index, rest = match.group(1), int(match.group(2)), int(match.group(3)), match.group(4)
    if kind == "down_blocks":
        return f"input_blocks.{1 + level * (layers_per_block + 1) + index}.1.{rest}"
    return f"output_blocks.{level * (layers_per_block + 1) + index}.1.{rest}"


_LORA_SUFFIXES = {  # the layouts diffusers writes and reads, per matrix
    "down": (".lora.down.weight", ".lora_linear_layer.down.weight", ".lora_A.weight"),
    "up": (".lora.up.weight", ".lora_linear_layer.up.weight", ".lora_B.weight"),
}


def lora_modules(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module path -> (down, up) of a diffusers- or peft-format LoRA state dict."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        for matrix, suffixes in _LORA_SUFFIXES.items():
            suffix = next((s for s in suffixes if key.endswith(s)), None)
            if suffix is not None:
                modules.setdefault(key[: -len(suffix)], {})[matrix] = value
                break
        else:
            raise ConfigError(f"LoRA key {key} is neither a down nor an up matrix")
    return {m: (pair["down"], pair["up"]) for m, pair in modules.items()}


def to_kohya(diffusers_state: dict[str, torch.Tensor], alpha: float, sdxl: bool, layers_per_block: int,
             text_alpha: float | None = None) -> dict[str, torch.Tensor]:
    """A diffusers-format LoRA state dict (as our runs write it) in kohya's key layout."""
    unet_state, encoder_states = split_lora_state(diffusers_state)
    out: dict[str, torch.Tensor] = {}

    def put(name: str, down: torch.Tensor, up: torch.Tensor, module_alpha: float) -> None:
        name = name.replace(".", "_")
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(module_alpha))

    for module, (down, up) in lora_modules(unet_state).items():
        module = module.removeprefix("unet.")
        put("lora_unet_" + (sgm_module_name(module, layers_per_block) if sdxl else module), down, up, alpha)
    prefixes = ("lora_te1_", "lora_te2_") if sdxl else ("lora_te_",)
    for prefix, state in zip(prefixes, encoder_states):
        for module, (down, up) in lora_modules(state).items() if state else ():
            # Checkpoints (and so A1111/ComfyUI) name CLIP layers text_model.encoder...
            module = module if module.startswith("text_model.") else "text_model." + module
            put(prefix + module, down, up, text_alpha if text_alpha is not None else alpha)
    return out


def kohya_metadata(cfg, sdxl: bool, rank: int, alpha: float) -> dict[str, str]:
    """kohya's ss_* header fields (all strings), which UIs show and some use to pick a base model."""
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": "sdxl_base_v1-0" if sdxl else "sd_v1",
        "ss_sd_model_name": cfg.model.name,
        "ss_v2": "False",
        "ss_resolution": str(cfg.data.resolution) if cfg.data.resolution else "",
        "ss_max_train_steps": str(cfg.train.steps),
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_training_comment": f"rewardbooth {__version__}, method {cfg.train.method}",
        "ss_network_args": json.dumps({"method": cfg.train.method, "train_text_encoder": cfg.adapter.train_text_encoder}),
        "rewardbooth_method": cfg.train.method,
        "rewardbooth_identifier": cfg.data.identifier,
        "rewardbooth_class_noun": cfg.data.class_noun or "",
        "rewardbooth_instance_prompt": cfg.instance_prompt,
    }


def cast_state(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() and v.ndim > 0 else v for k, v in state.items()}


def write_kohya(lora_file: Path, cfg, sdxl: bool, layers_per_block: int, target: Path, dtype: torch.dtype | None = None) -> Path:
    """`lora_file` (diffusers layout) as a kohya file at `target`, written beside and renamed into place."""
    rank = cfg.adapter.rank
    alpha = float(cfg.adapter.alpha if cfg.adapter.alpha is not None else rank)
    kohya = to_kohya(load_file(str(lora_file)), alpha, sdxl, layers_per_block)
    staging = target.with_name(target.name + ".tmp")
    save_file(cast_state(kohya, dtype), str(staging), metadata=kohya_metadata(cfg, sdxl, rank, alpha))
    os.replace(staging, target)
    return target


def refuse_existing(target: Path) -> None:
    if target.exists():
        raise ConfigError(f"{target} already exists; choose another --output or move it away")


def write_peft(cfg, state: dict[str, torch.Tensor], folder: Path, dtype, rank: int, alpha: float) -> Path:
    """peft adapter folders: unet/ (and text_encoder/, text_encoder_2/), each for `PeftModel.from_pretrained`."""
    refuse_existing(folder)
    unet_state, encoder_states = split_lora_state(state)
    parts = {"unet": ({k.removeprefix("unet."): v for k, v in unet_state.items()}, cfg.adapter.target_modules)}
    for name, encoder_state in zip(("text_encoder", "text_encoder_2"), encoder_states):
        if encoder_state:
            parts[name] = (encoder_state, TEXT_ENCODER_TARGETS)
    for name, (part, targets) in parts.items():
        sub = folder / name
        sub.mkdir(parents=True)
        lora_config(rank, alpha, 0.0, list(targets)).save_pretrained(str(sub))
        peft_state = {}
        for module, (down, up) in lora_modules(part).items():  # peft's file layout: base_model.model.<module>.lora_A/B
            peft_state[f"base_model.model.{module}.lora_A.weight"] = down.contiguous()
            peft_state[f"base_model.model.{module}.lora_B.weight"] = up.contiguous()
        save_file(cast_state(peft_state, dtype), str(sub / "adapter_model.safetensors"))
    return folder
