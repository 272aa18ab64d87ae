"""LoRA adapters through peft, saved in the diffusers format (`pipe.load_lora_weights`)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

# diffusers / transformers / peft / accelerate are imported inside the functions that use them, so importing this
# module (registries, --help, the web app) does not pay their start-up cost.

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default file name
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
UNET_ATTENTION_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # diffusers' DreamBooth LoRA scripts' list
_IN_BLOCK = re.compile(r"^(?:.*blocks\.\d+|mid_block)\.(?P<inner>.+)$")  # a repeated block's module path, and its path inside it
_ATTENTION = re.compile(r"(?:^|\.)attn\d?\.")
TEXT_ENCODER_FOLDERS = ("text_encoder", "text_encoder_2")  # pipeline folder (and LoRA key prefix) of each encoder


def block_linear_targets(denoiser: torch.nn.Module, attention_only: bool, block: re.Pattern = _IN_BLOCK,
                         attention: re.Pattern = _ATTENTION) -> list[str]:
    """peft target names for the linear layers inside the denoiser's repeated blocks (all of them, or
    only the attention projections `attn.*`): their paths inside a block when those name exactly the
    chosen modules (peft matches by suffix), else the full paths. `block` and `attention`: a model whose
    blocks or attention modules are named otherwise (Z-Image's `layers.N`, `attention`)."""
    chosen, inner = set(), set()
    for name, module in denoiser.named_modules():
        match = block.match(name)
        if isinstance(module, torch.nn.Linear) and match and (not attention_only or attention.search(match["inner"])):
            chosen.add(name)
            inner.add(match["inner"])
    by_suffix = {name for name, _ in denoiser.named_modules() if any(name == s or name.endswith("." + s) for s in inner)}
    return sorted(inner) if by_suffix == chosen else sorted(chosen)


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


def _adapter_metadata(model: torch.nn.Module) -> dict:
    """The adapter's LoraConfig as diffusers stores it in the file header (rank, alpha, targets), so
    `load_lora_weights` scales by alpha / rank instead of assuming alpha == rank."""
    config = model.peft_config["default"].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def scale_folded(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The adapter's state with each module's scale (alpha / rank) folded into its lora_B, and its LoraConfig saying
    alpha = rank: the same update for every reader, also those that ignore the header's lora_alpha and apply
    up @ down as it is (ComfyUI and Forge, given no `.alpha` keys)."""
    from peft.tuners.lora import LoraLayer

    state = lora_state_dict(model)
    folded = set()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.scaling:
            key = f"{name}.lora_B.weight"
            state[key] = state[key] * module.scaling["default"]
            folded.add(key)
    unfolded = {k for k in state if ".lora_B." in k} - folded
    if unfolded:  # a key named otherwise than its module would keep its scale only in the header: wrong in those tools
        raise RuntimeError(f"LoRA weights without their module's scale: {sorted(unfolded)[:3]}")
    config = model.peft_config["default"]
    return state, {**_adapter_metadata(model), "lora_alpha": config.r, "alpha_pattern": dict(config.rank_pattern), "use_rslora": False}


def save_lora(folder: Path, unet: torch.nn.Module, text_encoders: list[torch.nn.Module] | None = None, sdxl: bool = False,
              pipeline_class: str = "") -> Path:
    """Write the denoiser's (and text-encoder) LoRA weights as diffusers-format safetensors, as the
    pipeline's own save_lora_weights writes them (SDXL: `text_encoder.` and `text_encoder_2.` keys;
    FLUX: `transformer.` keys, which ComfyUI and Forge read too)."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers

    denoiser = "unet" if pipeline_class in ("", "StableDiffusionPipeline", "StableDiffusionXLPipeline") else "transformer"
    # U-Nets keep alpha in the header (their kohya file carries it to the other tools). A transformer's diffusers file
    # is what ComfyUI and Forge load, and they ignore the header: alpha / rank is folded into the weights.
    adapters = [(unet, denoiser), *zip(text_encoders or [], TEXT_ENCODER_FOLDERS)]
    parts = {argument: scale_folded(model) if denoiser == "transformer" else (lora_state_dict(model), _adapter_metadata(model))
             for model, argument in adapters}
    # U-Nets: diffusers' own layout (lora.down/up). Transformers: peft's lora_A/B as diffusers' FLUX/SD3 scripts save
    # them; converting would rename only the attention projections, and a mixed file loads half (the loader picks
    # one layout from the first key). Text encoders: diffusers' layout.
    layers = {}
    for argument, (state, metadata) in parts.items():
        layers[f"{argument}_lora_layers"] = state if argument == "transformer" else convert_state_dict_to_diffusers(state)
        layers[f"{argument}_lora_adapter_metadata"] = metadata
    pipeline_cls = getattr(diffusers, pipeline_class or ("StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"))
    pipeline_cls.save_lora_weights(save_directory=str(folder), safe_serialization=True, **layers)
    return Path(folder) / LORA_WEIGHTS_NAME


def split_lora_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A diffusers-format LoRA state's U-Net keys, and each text encoder's keys without their prefix."""
    encoders = [{k[len(f) + 1:]: v for k, v in state.items() if k.startswith(f + ".")} for f in TEXT_ENCODER_FOLDERS]
    unet = {k: v for k, v in state.items() if not k.startswith(tuple(f + "." for f in TEXT_ENCODER_FOLDERS))}
    return unet, encoders


def load_lora_into_pipeline(pipe, weights: Path, rank: int, alpha: float | None) -> None:
    """Load a LoRA file (diffusers or kohya layout): the U-Net part through diffusers, the
    text-encoder part(s) through peft.

    diffusers hands text-encoder LoRA to transformers' peft integration, which refuses peft
    versions it was not released with; the file stays loadable by `pipe.load_lora_weights`.
    `rank` / `alpha` describe the text-encoder adapters when the file does not.
    """
    from diffusers.utils import convert_state_dict_to_peft
    from peft import inject_adapter_in_model
    from peft.utils import set_peft_model_state_dict

    if hasattr(pipe, "transformer"):  # FLUX: the transformer's LoRA through diffusers' own loader
        pipe.load_lora_weights(str(weights))
        return
    state, network_alphas, metadata = pipe.lora_state_dict(str(weights), return_lora_metadata=True)
    unet_state, encoder_states = split_lora_state(state)
    if unet_state:
        pipe.load_lora_into_unet({f"unet.{k}" if not k.startswith("unet.") else k: v for k, v in unet_state.items()},
                                 network_alphas=network_alphas, unet=pipe.unet, metadata=metadata, _pipeline=pipe)
    for name, encoder, text_state in zip(TEXT_ENCODER_FOLDERS, (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)),
                                         encoder_states):
        if not text_state:
            continue
        text_state = convert_state_dict_to_peft(text_state)
        text_state = {_strip_text_model(k, encoder): v for k, v in text_state.items()}
        targets = sorted({key.split(".lora_")[0].rsplit(".", 1)[-1] for key in text_state})
        config = lora_config(rank, alpha, 0.0, targets)
        file_config = {k[len(name) + 1:]: v for k, v in (metadata or {}).items() if k.startswith(name + ".")}
        if file_config:
            config.r, config.lora_alpha = int(file_config["r"]), float(file_config["lora_alpha"])
        elif network_alphas:  # kohya: one alpha per module, the same for all of ours
            alphas = {v for k, v in network_alphas.items() if k.startswith(name + ".")}
            if alphas:
                config.r, config.lora_alpha = _rank_of(text_state), float(alphas.pop())
        inject_adapter_in_model(config, encoder)
        result = set_peft_model_state_dict(encoder, text_state)
        if result.unexpected_keys:
            raise RuntimeError(f"{weights}: text-encoder LoRA keys not loaded: {result.unexpected_keys[:3]}")


def _rank_of(peft_state: dict[str, torch.Tensor]) -> int:
    return int(next(v.shape[0] for k, v in peft_state.items() if ".lora_A." in k))


def _strip_text_model(key: str, encoder: torch.nn.Module) -> str:
    """Checkpoints name CLIP layers `text_model.encoder...`; transformers 5's CLIPTextModel has no
    `text_model` wrapper (CLIPTextModelWithProjection keeps it)."""
    if key.startswith("text_model.") and not hasattr(encoder, "text_model"):
        return key[len("text_model."):]
    return key
