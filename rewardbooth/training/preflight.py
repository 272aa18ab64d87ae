"""Pre-flight: everything checkable about a training run, checked before any model loads or anything
is written (`rewardbooth train` and the web app both ask here)."""

from __future__ import annotations

from pathlib import Path

from rewardbooth.config import RunConfig, require_training_inputs
from rewardbooth.data.images import list_image_files, load_image_folder
from rewardbooth.models.loading import model_native_resolution
from rewardbooth.training.options import check_optional_packages


def check_training_inputs(cfg: RunConfig) -> None:
    """Required settings, optional packages, the model's configs (a bad name fails in a second) and
    the image folders, each refused with a one-line error naming the culprit."""
    require_training_inputs(cfg)
    check_optional_packages(cfg.train)
    resolution = cfg.data.resolution or model_native_resolution(cfg.model.name, cfg.model.revision)
    min_size = cfg.data.min_image_size if cfg.data.min_image_size is not None else resolution // 2
    load_image_folder(cfg.data.instance_dir, min_size=min_size)
    if cfg.prior.enabled and cfg.prior.class_dir:
        list_image_files(cfg.prior.class_dir, role="class-image folder")


def input_folders(cfg: RunConfig) -> list[Path]:
    """The user's folders a run reads and must never write into (the output may not overlap them)."""
    return [Path(p) for p in (cfg.data.instance_dir, cfg.prior.class_dir) if p]
