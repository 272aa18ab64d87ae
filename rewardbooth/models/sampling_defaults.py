"""How each model family samples by default (validation, class images, RPO's negatives, `generate`).

The config's sampler defaults (25 steps, guidance 7.5) are Stable Diffusion's. Flow models ship with
their own: FLUX.1-dev is guidance-distilled and samples at an embedded guidance of about 3.5 (its
model card; schnell: 4 steps, no guidance), SD3.5 at 28 steps and guidance 3.5 (the Large model
card), FLUX.2 [klein] base at 50 steps and classifier-free guidance 4 (its pipeline's defaults; the
step-distilled klein at 4 steps, guidance 1), Z-Image-Turbo at 8 steps and guidance 0 (distilled: no CFG; the
pipeline's example), Z-Image base at ZImagePipeline's defaults, 50 steps and guidance 5 (its CFG adds
guidance x (cond - uncond) to the conditional prediction: 0 is off), Qwen-Image at QwenImagePipeline's defaults and its
model card's, 50 steps and true CFG 4 (with the negative prompt " "). These apply only to settings the user leaves unset.
"""

from __future__ import annotations

from typing import Any

from rewardbooth.errors import ConfigError
from rewardbooth.models.loading import (FLUX2_PIPELINE, FLUX_PIPELINE, QWENIMAGE_PIPELINE, SD3_PIPELINE, ZIMAGE_PIPELINE,
                                        read_model_config)

SAMPLER_KEYS = {  # (steps, guidance) -> every setting that samples from the base or trained model
    "steps": ("validation.steps", "prior.generation_steps", "rpo.negative_steps"),
    "guidance": ("validation.guidance_scale", "prior.generation_guidance", "rpo.negative_guidance"),
}


def family_sampler(model: str, revision: str | None = None) -> tuple[int, float] | None:
    """(steps, guidance) a model family samples with by default; None: the config's own (U-Nets)."""
    index = read_model_config(model, revision, "model_index.json")
    pipeline_class = index.get("_class_name", "")
    if pipeline_class == FLUX_PIPELINE:
        distilled_guidance = read_model_config(model, revision, "transformer/config.json").get("guidance_embeds", False)
        return (28, 3.5) if distilled_guidance else (4, 0.0)  # dev / schnell
    if pipeline_class == SD3_PIPELINE:
        return 28, 3.5
    if pipeline_class == FLUX2_PIPELINE:
        step_distilled = index.get("is_distilled", False)
        return (4, 1.0) if step_distilled else (50, 4.0)
    if pipeline_class == ZIMAGE_PIPELINE:
        return (8, 0.0) if zimage_turbo(read_model_config(model, revision, "scheduler/scheduler_config.json")) else (50, 5.0)
    if pipeline_class == QWENIMAGE_PIPELINE:
        return (50, 4.0)
    return None


def zimage_turbo(scheduler_config: dict) -> bool:
    """Whether a Z-Image checkpoint is Turbo (distilled: few steps, no CFG), told by its scheduler's shift: Turbo ships
    3.0, the base model 6.0 (one transformer architecture for both; model_index.json has no flag for it)."""
    return float(scheduler_config.get("shift", 1.0)) < 4.5


def family_sampling_defaults(model: str, revision: str | None = None) -> dict[str, Any]:
    """The config keys of `family_sampler`; empty where the model cannot be read here (the run's own
    loading then says why, in one line)."""
    try:
        sampler = family_sampler(model, revision)
    except ConfigError:
        return {}
    if sampler is None:
        return {}
    steps, guidance = sampler
    return {**dict.fromkeys(SAMPLER_KEYS["steps"], steps), **dict.fromkeys(SAMPLER_KEYS["guidance"], guidance)}
