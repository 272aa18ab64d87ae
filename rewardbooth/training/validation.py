"""Validation images: the same prompts and seeds at every validation, saved with a grid."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rewardbooth.data.images import save_image_grid
from rewardbooth.methods import Method
from rewardbooth.methods.context import TrainContext
from rewardbooth.models.loading import make_pipeline
from rewardbooth.sampling import SampleSettings, generate


@torch.no_grad()
def sample_validation(ctx: TrainContext, method: Method, text_encoders: list | None, folder: Path) -> tuple[list[str], list[list]]:
    """Sample the method's validation prompts with the weights being trained; write PNGs, grid.png, prompts.json."""
    v, acc = ctx.cfg.validation, ctx.accelerator
    prompts = method.validation_prompts(ctx)
    settings = SampleSettings(steps=v.steps, guidance_scale=v.guidance_scale, seed=ctx.cfg.train.seed, resolution=ctx.resolution,
                              batch_size=v.batch_size)
    unet = acc.unwrap_model(ctx.unet)
    was_training = unet.training
    unet.eval()
    with acc.autocast():
        images = generate(make_pipeline(ctx.components, unet=unet, text_encoders=text_encoders), prompts, v.num_images, settings)
    unet.train(was_training)
    if not acc.is_main_process:  # train.fsdp: every process ran the sampler's forward passes; the main one writes
        return prompts, images
    folder.mkdir(parents=True, exist_ok=True)
    for j, row in enumerate(images):
        for k, image in enumerate(row):
            image.save(folder / f"{j:02d}_{k:02d}.png")
    save_image_grid([im for row in images for im in row], folder / "grid.png", cols=v.num_images)
    (folder / "prompts.json").write_text(json.dumps(prompts))
    return prompts, images
