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


def _export_suffix(dtype: str | None) -> str:
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ConfigError(f"export dtype {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    return f"_{dtype}" if dtype else ""


def _lora_run(run_dir: Path, weights_dir: Path | None = None) -> tuple[RunConfig, Path, dict]:
    """A finished LoRA run's config, LoRA file and base model's model_index.json, or a one-line error."""
    cfg = load_run_config(run_dir)
    source = Path(weights_dir or run_dir) / LORA_WEIGHTS_NAME
    if cfg.adapter.kind != "lora":
        raise ConfigError(f"run {run_dir} fine-tuned the full model (adapter.kind={cfg.adapter.kind}); only LoRA runs export LoRA files")
    if not source.is_file():
        raise ConfigError(f"run {run_dir} has no {LORA_WEIGHTS_NAME} yet: did training finish?")
    return cfg, source, read_model_config(cfg.model.name, cfg.model.revision, "model_index.json")


def _export_formats(index: dict) -> tuple[str, ...]:
    """The layouts a model's LoRA exports to: all for U-Nets, kohya and diffusers for FLUX.1, diffusers for SD3 and FLUX.2."""
    if "unet" in index:
        return EXPORT_FORMATS
    return ("kohya", "diffusers") if index.get("_class_name") == FLUX_PIPELINE else ("diffusers",)


def _default_target(run_dir: Path, fmt: str, suffix: str) -> Path:
    name = {"peft": "peft", "diffusers": LORA_WEIGHTS_NAME, "kohya": KOHYA_WEIGHTS_NAME}[fmt]
    return run_dir / (name.replace(".safetensors", f"{suffix}.safetensors") if name.endswith(".safetensors") else f"{name}{suffix}")


def export_lora(run_dir: Path, fmt: str, output: Path | None = None, dtype: str | None = None, weights_dir: Path | None = None) -> Path:
    """Convert a finished LoRA run's result (or `weights_dir`, e.g. a budget) into `fmt`; returns what was written.

    Never overwrites: an existing output is an error naming it.
    """

    run_dir = Path(run_dir)
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"export format {fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")
    suffix = _export_suffix(dtype)
    cfg, source, index = _lora_run(run_dir, weights_dir)
    rank = cfg.adapter.rank
    alpha = float(cfg.adapter.alpha if cfg.adapter.alpha is not None else rank)
    torch_dtype = EXPORT_DTYPES[dtype] if dtype else None
    state = load_file(str(source))
    flux = index.get("_class_name") == FLUX_PIPELINE
    if fmt not in _export_formats(index):  # SD3, FLUX.2, FLUX.1 peft
        made_for = "U-Net models and FLUX.1 (FluxPipeline)" if fmt == "kohya" else "U-Net models"
        raise ConfigError(f"run {run_dir} trained a {index.get('_class_name')}: --format {fmt} is for {made_for}; its LoRA "
                          f"is in the diffusers layout ({LORA_WEIGHTS_NAME}, which ComfyUI and Forge read): use --format diffusers")
    sdxl = not flux and "text_encoder_2" in index
    target = Path(output) if output else _default_target(run_dir, fmt, suffix)

    if fmt == "peft":
        return write_peft(cfg, state, target, torch_dtype, rank, alpha)
    refuse_existing(target)
    if fmt == "diffusers":
        with safe_open(str(source), "pt") as f:
            metadata = f.metadata() or {}
        save_file(cast_state(state, torch_dtype), str(target), metadata=metadata)
        return target
    layers_per_block = 0 if flux else int(read_model_config(cfg.model.name, cfg.model.revision, "unet/config.json")["layers_per_block"])
    return write_kohya(source, cfg, sdxl, layers_per_block, target, torch_dtype, flux=flux)


def export_missing(run_dir: Path, dtype: str | None = None) -> list[tuple[str, Path, bool]]:
    """`rewardbooth export RUN` without --format: every layout the run's model takes, written beside the run's weights
    unless the run folder has it already (a finished LoRA run holds diffusers' file, and kohya's for SD, SDXL and FLUX.1).
    Returns (format, path, written now) per layout; nothing is overwritten."""
    run_dir = Path(run_dir)
    suffix = _export_suffix(dtype)
    _, _, index = _lora_run(run_dir)
    done = []
    for fmt in _export_formats(index):
        target = _default_target(run_dir, fmt, suffix)
        done.append((fmt, target, False) if target.exists() else (fmt, export_lora(run_dir, fmt, dtype=dtype), True))
    return done
