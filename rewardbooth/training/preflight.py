"""Pre-flight: everything checkable about a training run, checked before any model loads or anything
is written (`rewardbooth train` and the web app both ask here)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rewardbooth.config import FlowConfig, RunConfig, require_training_inputs
from rewardbooth.data.images import list_image_files, load_image_folder
from rewardbooth.errors import ConfigError
from rewardbooth.models.loading import FLOW_PIPELINES, FLUX_PIPELINE, TRAINABLE_TEXT_ENCODERS, model_native_resolution, read_model_config
from rewardbooth.training.options import check_optional_packages


def check_training_inputs(cfg: RunConfig) -> None:
    """Required settings, optional packages, the model's configs (a bad name fails in a second) and
    the image folders, each refused with a one-line error naming the culprit."""
    require_training_inputs(cfg)
    check_optional_packages(cfg.train)
    check_family_settings(cfg, read_model_config(cfg.model.name, cfg.model.revision, "model_index.json").get("_class_name", ""))
    resolution = cfg.data.resolution or model_native_resolution(cfg.model.name, cfg.model.revision)
    min_size = cfg.data.min_image_size if cfg.data.min_image_size is not None else resolution // 2
    load_image_folder(cfg.data.instance_dir, min_size=min_size)
    if cfg.prior.enabled and cfg.prior.class_dir:
        list_image_files(cfg.prior.class_dir, role="class-image folder")


def check_family_settings(cfg: RunConfig, pipeline_class: str) -> None:
    """Settings that only mean something for the other family of models are refused by name."""
    flow_model = pipeline_class in FLOW_PIPELINES
    if flow_model and cfg.train.snr_gamma is not None:
        raise ConfigError("train.snr_gamma (min-SNR weighting) is for U-Net models; a flow-matching model weights its "
                          "velocity errors with flow.loss_weighting (none, sigma_sqrt, cosmap)")
    if flow_model and cfg.data.resolution is not None and cfg.data.resolution % 16:
        raise ConfigError(f"data.resolution must be a multiple of 16 for {pipeline_class} (its transformer takes 2x2 latent "
                          f"patches), got {cfg.data.resolution}")
    changed = [f"flow.{f.name}" for f in dataclasses.fields(FlowConfig) if getattr(cfg.flow, f.name) != f.default]
    if flow_model and pipeline_class != FLUX_PIPELINE and "flow.guidance" in changed:
        raise ConfigError(f"flow.guidance is the embedded guidance of guidance-distilled FLUX.1 (dev); {pipeline_class} has none "
                          "(set the sampler's guidance with validation.guidance_scale)")
    if cfg.adapter.train_text_encoder and TRAINABLE_TEXT_ENCODERS.get(pipeline_class, 1) == 0:
        raise ConfigError(f"adapter.train_text_encoder: {pipeline_class}'s text encoder (a language model) stays frozen here; "
                          "set adapter.train_text_encoder=false")
    if not flow_model and changed:
        raise ConfigError(f"{', '.join(changed)} only apply to flow-matching models (FLUX.1); {cfg.model.name} is a {pipeline_class or 'U-Net model'}")


def input_folders(cfg: RunConfig) -> list[Path]:
    """The user's folders a run reads and must never write into (the output may not overlap them)."""
    return [Path(p) for p in (cfg.data.instance_dir, cfg.prior.class_dir) if p]
