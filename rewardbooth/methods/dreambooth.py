"""DreamBooth with prior preservation (Ruiz et al., CVPR 2023).

    L = E ||eps_theta(x_t, t, c_inst) - eps||^2  +  lambda_prior * E ||eps_theta(x'_t, t', c_class) - eps'||^2

over reference images x with the instance prompt and class images x' (generated once by the
frozen base model from the class prompt) with the class prompt.
"""

from __future__ import annotations

import torch
from PIL import Image

from rewardbooth import diffusion
from rewardbooth.config import RunConfig
from rewardbooth.data.images import list_image_files, load_image
from rewardbooth.methods.base import Method
from rewardbooth.methods.context import LatentImageSet, TrainContext
from rewardbooth.sampling import SampleSettings, generate

CLASS_IMAGE_FOLDER = "class_images"
CLASS_LATENTS_NAME = "class_latents.safetensors"  # data.cache_latents: the class images' VAE moments


def class_image_settings(cfg: RunConfig, already_made: int = 0, resolution: int | None = None) -> SampleSettings:
    """How the base model draws class images; seeds continue after the `already_made` ones."""
    prior = cfg.prior
    return SampleSettings(steps=prior.generation_steps, guidance_scale=prior.generation_guidance,
                          seed=cfg.train.seed + 1_000_003 + already_made, batch_size=prior.generation_batch_size,
                          resolution=resolution)


def prepare_class_images(ctx: TrainContext) -> list[Image.Image]:
    """Class images for prior preservation: the user's folder first, then generated ones.

    Generated images are cached in the run folder and reused on resume; the user's folder is
    only read, never written.
    """
    prior = ctx.cfg.prior
    wanted = prior.num_class_images
    user_files = list_image_files(prior.class_dir, role="class-image folder")[:wanted] if prior.class_dir else []
    cache = ctx.run_dir / CLASS_IMAGE_FOLDER
    cached = sorted(cache.glob("class_*.png")) if cache.is_dir() else []
    missing = wanted - len(user_files) - len(cached)
    if missing > 0 and ctx.accelerator.is_main_process:
        cache.mkdir(parents=True, exist_ok=True)
        settings = class_image_settings(ctx.cfg, len(cached), ctx.resolution)  # new seeds for images added on resume
        pipe = ctx.base_pipeline()
        images = generate(pipe, [ctx.cfg.class_prompt], missing, settings, progress=ctx.progress, description="class images")[0]
        for offset, image in enumerate(images):
            image.save(cache / f"class_{len(cached) + offset:05d}.png")
    ctx.accelerator.wait_for_everyone()
    generated = sorted(cache.glob("class_*.png"))[: max(wanted - len(user_files), 0)]
    return [load_image(path) for path in [*user_files, *generated]]


class DreamBooth(Method):
    name = "dreambooth"
    summary = "the baseline: denoising loss on your photos + prior preservation on class images"
    # MiniBench (docs/minibench.md): full U-Net, 400 steps at batch 1, the learning rate bracket round 2 chose at batch 1 (set 101).
    minibench = {"adapter.kind": "full", "train.learning_rate": 4e-4, "train.steps": 400, "train.batch_size": 1,
                 "validation.every": 0}
    minibench_models = {"mini-flow": {"train.learning_rate": 2e-4}}  # the flow bracket's choice (docs/minibench.md, set 103)
    minibench_lora = {"train.learning_rate": 2e-3}  # the LoRA bracket's choice (docs/minibench.md, set 102)
    # selection alone: DreamBooth keeping its best validated weights by RPO's reward
    variants = {"dreambooth-select": {"validation.every": 40, "validation.num_images": 2, "validation.select": True}}
    variant_minibench_models = {"dreambooth-select": {"mini-flow": {"train.learning_rate": 1e-4}}}  # its own flow bracket's choice
    variant_minibench_lora = {"dreambooth-select": {"train.learning_rate": 4e-3}}  # its own LoRA bracket's choice (set 102)
    curves = ("loss", "loss_instance", "loss_prior")
    run_files = (CLASS_IMAGE_FOLDER, CLASS_LATENTS_NAME)

    def prepare(self, ctx: TrainContext) -> None:
        self.instance = LatentImageSet(ctx.instance_images(), ctx)
        self.prior = ctx.cfg.prior.enabled
        if self.prior:
            cache = ctx.run_dir / CLASS_LATENTS_NAME if ctx.cfg.data.cache_latents else None
            self.classes = LatentImageSet(prepare_class_images(ctx), ctx, cache=cache)

    def unet_batch(self, ctx: TrainContext) -> int:
        return ctx.cfg.train.batch_size * (2 if self.prior else 1)

    def sample_batch(self, ctx: TrainContext, generator: torch.Generator) -> tuple[diffusion.NoisedBatch, torch.Tensor, int]:
        """Noised instance latents (first `b` rows), then class latents; and their text embeddings."""
        b = ctx.cfg.train.batch_size
        x0 = self.instance.latents(self.instance.sample_indices(b, generator), generator)
        prompts = [ctx.cfg.instance_prompt] * b
        if self.prior:
            x0 = torch.cat([x0, self.classes.latents(self.classes.sample_indices(b, generator), generator)])
            prompts += [ctx.cfg.class_prompt] * b
        return ctx.add_noise(x0, generator), ctx.encode_prompts(prompts), b

    def combine(self, ctx: TrainContext, errors: torch.Tensor, timesteps: torch.Tensor, b: int, instance_weight: float = 1.0):
        """instance_weight * instance loss + lambda_prior * prior loss, from per-sample errors (min-SNR weighted if set)."""
        errors = ctx.weight_errors(errors, timesteps)
        instance_loss = errors[:b].mean()
        logs = {"loss_instance": instance_loss.detach()}
        loss = instance_weight * instance_loss
        if self.prior:
            prior_loss = errors[b:].mean()
            loss = loss + ctx.cfg.prior.weight * prior_loss
            logs["loss_prior"] = prior_loss.detach()
        return loss, logs

    def loss(self, ctx: TrainContext, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        noised, text, b = self.sample_batch(ctx, generator)
        return self.combine(ctx, ctx.denoising_error(ctx.unet, noised, text), noised.timesteps, b)
