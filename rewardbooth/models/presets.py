"""What a built-in preset brings besides its weights: its own judges, reward encoders, prompts and
sampler settings, the defaults of every command run on it (each still overridable).

`mini` lives in its own world (32 px scenes, a world-word vocabulary, guidance 4), so the paper's
prompts ("Van Gogh rendition") and the hub's judges mean nothing to it; the `tiny` presets have
random weights and must never reach for a hub.
"""

from __future__ import annotations

from typing import Any


def mini_defaults() -> dict[str, Any]:
    from rewardbooth.mini.world import CONTEXT_PHRASES

    return {
        "data.instance_prompt": "a {identifier} {class_noun}",  # the world's captions carry no "photo of"
        "data.class_prompt": "a {class_noun}",
        "evaluation.dino_model": "mini",
        "evaluation.clip_model": "mini",
        "evaluation.align_model": "mini",
        "prior.generation_steps": 20,
        "prior.generation_guidance": 4.0,
        "validation.steps": 20,
        "validation.guidance_scale": 4.0,  # the mini model's samples are cleanest around 3-5
        # RPO's training prompts: four of the world's seven scene contexts
        "rpo.prompts": [f"a {{identifier}} {{class_noun}} {CONTEXT_PHRASES[c]}" for c in ("beach", "snow", "city", "night")],
        "rpo.negative_steps": 20,
        "rpo.negative_guidance": 4.0,
    }


TINY_DEFAULTS: dict[str, Any] = {"evaluation.dino_model": "tiny", "evaluation.clip_model": "tiny", "evaluation.align_model": "tiny"}


def preset_defaults(model_name: str) -> dict[str, Any]:
    """Settings a preset model implies (empty for hub ids and folders)."""
    from rewardbooth.mini.assets import MINI_NAME
    from rewardbooth.models.tiny import TINY_PRESETS

    if model_name == MINI_NAME:
        return mini_defaults()
    if model_name in TINY_PRESETS:
        return dict(TINY_DEFAULTS)
    return {}
