"""What a finished run gives: its pipeline (base model + trained weights) and its LoRA in other layouts."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rewardbooth.config import RunConfig
from rewardbooth.errors import ConfigError
from rewardbooth.methods import load_config
from rewardbooth.models.export import (
    EXPORT_DTYPES,
    EXPORT_FORMATS,
    KOHYA_WEIGHTS_NAME,
    cast_state,
    refuse_existing,
    write_kohya,
    write_peft,
)
from rewardbooth.models.loading import FLOW_PIPELINES, FLUX_PIPELINE, load_components, make_pipeline, read_model_config
from rewardbooth.models.lora import LORA_WEIGHTS_NAME, TEXT_ENCODER_FOLDERS, load_lora_into_pipeline
from rewardbooth.training.run_dir import CONFIG_NAME

# diffusers / transformers / peft / accelerate are imported inside the functions that use them, so importing this
# module (registries, --help, the web app) does not pay their start-up cost.


def load_run_config(run_dir: Path) -> RunConfig:
    """The resolved config.yaml of a run folder, or a one-line error naming the folder."""
    if not (Path(run_dir) / CONFIG_NAME).is_file():
        raise ConfigError(f"{run_dir} is not a rewardbooth run folder (no {CONFIG_NAME})")
    return load_config(Path(run_dir) / CONFIG_NAME)


def load_run_pipeline(run_dir: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                      weights_dir: Path | None = None):
    """The pipeline a finished run produced: its base model plus the trained weights (from
    `weights_dir` if given, e.g. a budget folder of the run, else the run's result)."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    if dtype == torch.float16 and read_model_config(cfg.model.name, cfg.model.revision, "model_index.json").get("_class_name") in FLOW_PIPELINES:
        dtype = torch.bfloat16  # FLUX's and SD3's T5 overflow in fp16
    components = load_components(cfg.model.name, cfg.model.revision, cfg.model.variant, dtype=dtype, vae=cfg.model.vae)
    weights = Path(weights_dir) if weights_dir is not None else run_dir
    if (weights / LORA_WEIGHTS_NAME).is_file():
        import diffusers

        pipe = make_pipeline(components)
        level = diffusers.utils.logging.get_verbosity()
        diffusers.utils.logging.set_verbosity_error()  # "no text-encoder LoRA keys" is expected, not news
        try:
            load_lora_into_pipeline(pipe, weights / LORA_WEIGHTS_NAME, cfg.adapter.rank, cfg.adapter.alpha)
        finally:
            diffusers.utils.logging.set_verbosity(level)
    elif (weights / components.denoiser_folder).is_dir():
        unet = type(components.unet).from_pretrained(weights / components.denoiser_folder, torch_dtype=dtype)
        encoders = list(components.text_encoders)
        for i, folder in enumerate(TEXT_ENCODER_FOLDERS):
            if i < len(encoders) and (weights / folder).is_dir():
                encoders[i] = type(encoders[i]).from_pretrained(weights / folder, torch_dtype=dtype)
        pipe = make_pipeline(components, unet=unet, text_encoders=encoders)
    else:
        raise ConfigError(f"run {weights} has no trained weights yet (no {LORA_WEIGHTS_NAME} or {components.denoiser_folder}/): did training finish?")
    return cfg, pipe.to(device)


def export_lora(run_dir: Path, fmt: str, output: Path | None = None, dtype: str | None = None, weights_dir: Path | None = None) -> Path:
    """Convert a finished LoRA run's result (or `weights_dir`, e.g. a budget) into `fmt`; returns what was written.

    Never overwrites: an existing output is an error naming it.
    """

    run_dir = Path(run_dir)
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"export format {fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ConfigError(f"export dtype {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    cfg = load_run_config(run_dir)
    source = Path(weights_dir or run_dir) / LORA_WEIGHTS_NAME
    if cfg.adapter.kind != "lora":
        raise ConfigError(f"run {run_dir} fine-tuned the full model (adapter.kind={cfg.adapter.kind}); only LoRA runs export LoRA files")
    if not source.is_file():
        raise ConfigError(f"run {run_dir} has no {LORA_WEIGHTS_NAME} yet: did training finish?")
    rank = cfg.adapter.rank
    alpha = float(cfg.adapter.alpha if cfg.adapter.alpha is not None else rank)
    torch_dtype = EXPORT_DTYPES[dtype] if dtype else None
    suffix = f"_{dtype}" if dtype else ""
    state = load_file(str(source))
    index = read_model_config(cfg.model.name, cfg.model.revision, "model_index.json")
    flux = index.get("_class_name") == FLUX_PIPELINE
    if fmt != "diffusers" and "unet" not in index and not (flux and fmt == "kohya"):  # SD3, FLUX.2, FLUX.1 peft
        made_for = "U-Net models and FLUX.1 (FluxPipeline)" if fmt == "kohya" else "U-Net models"
        raise ConfigError(f"run {run_dir} trained a {index.get('_class_name')}: --format {fmt} is for {made_for}; its LoRA "
                          f"is in the diffusers layout ({LORA_WEIGHTS_NAME}, which ComfyUI and Forge read): use --format diffusers")
    sdxl = not flux and "text_encoder_2" in index

    if fmt == "peft":
        return write_peft(cfg, state, Path(output) if output else run_dir / f"peft{suffix}", torch_dtype, rank, alpha)
    if fmt == "diffusers":
        target = Path(output) if output else run_dir / f"pytorch_lora_weights{suffix}.safetensors"
        refuse_existing(target)

        with safe_open(str(source), "pt") as f:
            metadata = f.metadata() or {}
        save_file(cast_state(state, torch_dtype), str(target), metadata=metadata)
        return target
    layers_per_block = 0 if flux else int(read_model_config(cfg.model.name, cfg.model.revision, "unet/config.json")["layers_per_block"])
    target = Path(output) if output else run_dir / KOHYA_WEIGHTS_NAME.replace(".safetensors", f"{suffix}.safetensors")
    refuse_existing(target)
    return write_kohya(source, cfg, sdxl, layers_per_block, target, torch_dtype, flux=flux)
