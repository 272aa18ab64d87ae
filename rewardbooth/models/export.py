"""A run's LoRA in the layouts other tools read.

- `diffusers`: `pytorch_lora_weights.safetensors` (what every LoRA run writes; `pipe.load_lora_weights`).
- `kohya`: `lora_unet_*` / `lora_te_*` (SDXL: `lora_te1_*`, `lora_te2_*`) modules with `lora_down`,
  `lora_up` and `alpha`, plus kohya's `ss_*` metadata: what AUTOMATIC1111/Forge, ComfyUI and
  diffusers' own non-diffusers loader read. SDXL U-Net modules use the original (SGM) block
  names, `input_blocks.4.1...`, as kohya's sdxl scripts write them. FLUX.1 transformer modules use
  the original (BFL) names sd-scripts' `networks.lora_flux` writes (`double_blocks_0_img_attn_qkv`,
  `single_blocks_0_linear1`, ...), where one kohya module covers diffusers' separate q, k, v (and
  proj_mlp); CLIP-L is `lora_te1_*`. SD3 and FLUX.2 runs have no kohya export.
- `peft`: one folder per trained model (`adapter_config.json` + `adapter_model.safetensors`),
  for `PeftModel.from_pretrained`.

A U-Net's alpha is written as trained, so every tool applies the same scale alpha / rank. A transformer's diffusers
file holds alpha / rank in its weights (header alpha = rank; `save_lora`), and its FLUX.1 kohya file takes the file's
alpha (FLUX's fused and final-layer modules adjust it so that the scale stays true; see `flux_kohya_modules`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
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


# FLUX.1: diffusers' FluxTransformer2DModel module -> the original (BFL) module kohya names it by, and which part of a
# fused BFL module it is (None: not fused). A fused module's parts stack along its output in this order.
_FLUX_DOUBLE = {  # transformer_blocks.{i}.* -> double_blocks_{i}_*
    "attn.to_q": ("img_attn_qkv", 0), "attn.to_k": ("img_attn_qkv", 1), "attn.to_v": ("img_attn_qkv", 2),
    "attn.add_q_proj": ("txt_attn_qkv", 0), "attn.add_k_proj": ("txt_attn_qkv", 1), "attn.add_v_proj": ("txt_attn_qkv", 2),
    "attn.to_out.0": ("img_attn_proj", None), "attn.to_add_out": ("txt_attn_proj", None),
    "ff.net.0.proj": ("img_mlp_0", None), "ff.net.2": ("img_mlp_2", None), "norm1.linear": ("img_mod_lin", None),
    "ff_context.net.0.proj": ("txt_mlp_0", None), "ff_context.net.2": ("txt_mlp_2", None),
    "norm1_context.linear": ("txt_mod_lin", None),
}
_FLUX_SINGLE = {  # single_transformer_blocks.{i}.* -> single_blocks_{i}_*; linear1 = q, k, v and the MLP's input
    "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2), "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None), "norm.linear": ("modulation_lin", None),
}
_FLUX_BLOCKS = {"transformer_blocks": ("double_blocks", _FLUX_DOUBLE), "single_transformer_blocks": ("single_blocks", _FLUX_SINGLE)}
_FLUX_OUTSIDE_BLOCKS = {
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer", "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer", "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in_in_layer", "time_text_embed.text_embedder.linear_2": "vector_in_out_layer",
    "proj_out": "final_layer_linear", "norm_out.linear": "final_layer_adaLN_modulation_1",
}
_FLUX_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
_FLUX_MLP_RATIO = 4  # FluxSingleTransformerBlock's proj_mlp width / hidden width (fixed in diffusers)


def flux_module_name(module: str) -> tuple[str, int | None]:
    """kohya's name of a FluxTransformer2DModel module, and the module's part of a fused kohya module (or None)."""
    match = _FLUX_BLOCK.match(module)
    if match and match.group(3) in _FLUX_BLOCKS[match.group(1)][1]:
        kind, table = _FLUX_BLOCKS[match.group(1)]
        name, part = table[match.group(3)]
        return f"lora_unet_{kind}_{match.group(2)}_{name}", part
    if not match and module in _FLUX_OUTSIDE_BLOCKS:
        return "lora_unet_" + _FLUX_OUTSIDE_BLOCKS[module], None
    raise ConfigError(f"LoRA module {module} has no kohya FLUX name; export with --format diffusers")


def flux_kohya_modules(modules: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """kohya module name -> (down, up, alpha) of a FLUX.1 transformer's LoRA (`lora_modules` of its state)."""
    out, fused = {}, {}
    for module, (down, up) in modules.items():
        name, part = flux_module_name(module.removeprefix("transformer."))
        if part is not None:
            fused.setdefault(name, {})[part] = (down, up)
        elif name.startswith("lora_unet_final_layer_"):
            if name.endswith("adaLN_modulation_1"):  # BFL's final modulation is (shift, scale), diffusers' (scale, shift)
                up = torch.cat(up.chunk(2)[::-1])
            # diffusers' kohya reader drops these two modules' alpha (scale 1): fold alpha / rank into up, write alpha = rank
            out[name] = (down, up * (alpha / down.shape[0]), float(down.shape[0]))
        else:
            out[name] = (down, up, alpha)
    for name, parts in fused.items():
        count = 4 if name.endswith("_linear1") else 3
        like = next(iter(parts.values()))[0]
        rank, width = like.shape
        rows = [width * (_FLUX_MLP_RATIO if i == 3 else 1) for i in range(count)]  # q, k, v keep the hidden width
        # Untrained parts get zero blocks, so each part keeps rank r and readers split the module back evenly.
        downs = [parts[i][0] if i in parts else like.new_zeros(rank, width) for i in range(count)]
        ups = [parts[i][1] if i in parts else like.new_zeros(rows[i], rank) for i in range(count)]
        # Stacked downs and block-diagonal ups give each part's rows exactly its own up @ down. Readers scale by
        # alpha / (rows of lora_down) = alpha / (count * r): alpha grows by `count` to keep each part's alpha / r.
        out[name] = (torch.cat(downs), torch.block_diag(*ups), alpha * count)
    return out


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
             text_alpha: float | None = None, flux: bool = False) -> dict[str, torch.Tensor]:
    """A diffusers-format LoRA state dict (as our runs write it) in kohya's key layout (`flux`: FLUX.1's)."""
    unet_state, encoder_states = split_lora_state(diffusers_state)
    out: dict[str, torch.Tensor] = {}

    def put(name: str, down: torch.Tensor, up: torch.Tensor, module_alpha: float) -> None:
        name = name.replace(".", "_")
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(module_alpha))

    if flux:
        for name, (down, up, module_alpha) in flux_kohya_modules(lora_modules(unet_state), alpha).items():
            put(name, down, up, module_alpha)
    else:
        for module, (down, up) in lora_modules(unet_state).items():
            module = module.removeprefix("unet.")
            put("lora_unet_" + (sgm_module_name(module, layers_per_block) if sdxl else module), down, up, alpha)
    # sd-scripts' FLUX names its CLIP-L (and T5) as SDXL's two CLIPs
    prefixes = ("lora_te1_", "lora_te2_") if sdxl or flux else ("lora_te_",)
    for prefix, state in zip(prefixes, encoder_states):
        for module, (down, up) in lora_modules(state).items() if state else ():
            # Checkpoints (and so A1111/ComfyUI) name CLIP layers text_model.encoder...
            module = module if module.startswith("text_model.") else "text_model." + module
            put(prefix + module, down, up, text_alpha if text_alpha is not None else alpha)
    return out


def kohya_metadata(cfg, sdxl: bool, rank: int, alpha: float, flux: bool = False) -> dict[str, str]:
    """kohya's ss_* header fields (all strings), which UIs show and some use to pick a base model."""
    return {
        "ss_network_module": "networks.lora_flux" if flux else "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": "flux1" if flux else "sdxl_base_v1-0" if sdxl else "sd_v1",
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


def write_kohya(lora_file: Path, cfg, sdxl: bool, layers_per_block: int, target: Path, dtype: torch.dtype | None = None,
                flux: bool = False) -> Path:
    """`lora_file` (diffusers layout) as a kohya file at `target`, written beside and renamed into place."""
    rank = cfg.adapter.rank
    alpha = float(cfg.adapter.alpha if cfg.adapter.alpha is not None else rank)
    if flux:  # the alpha the file's weights were saved at: rank where save_lora folded alpha / rank into them
        alpha = header_alpha(lora_file, "transformer", alpha)
    kohya = to_kohya(load_file(str(lora_file)), alpha, sdxl, layers_per_block, flux=flux)
    staging = target.with_name(target.name + ".tmp")
    save_file(cast_state(kohya, dtype), str(staging), metadata=kohya_metadata(cfg, sdxl, rank, alpha, flux))
    os.replace(staging, target)
    return target


def header_alpha(lora_file: Path, component: str, default: float) -> float:
    """The lora_alpha a diffusers LoRA file's header gives `component` ("transformer", "unet"), else `default`."""
    with safe_open(str(lora_file), "pt") as f:
        header = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    return float(header.get(f"{component}.lora_alpha", default))


def refuse_existing(target: Path) -> None:
    if target.exists():
        raise ConfigError(f"{target} already exists; choose another --output or move it away")


def write_peft(cfg, state: dict[str, torch.Tensor], folder: Path, dtype, rank: int, alpha: float) -> Path:
    """peft adapter folders: unet/ (and text_encoder/, text_encoder_2/), each for `PeftModel.from_pretrained`."""
    refuse_existing(folder)
    unet_state, encoder_states = split_lora_state(state)
    unet_part = {k.removeprefix("unet."): v for k, v in unet_state.items()}
    parts = {"unet": (unet_part, sorted(lora_modules(unet_part)))}  # the adapted modules, by full path (what was trained)
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
