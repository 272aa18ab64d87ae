"""The `mini` preset: MiniBench's shipped base model and judges, and the settings of its world.

`mini` lives in its own world (32 px scenes, a world-word vocabulary, guidance 4), so the paper's
prompts ("Van Gogh rendition") and the hub's judges mean nothing to it. Registered through the
`rewardbooth.presets` entry point (pyproject.toml), so the core never imports mini/.
"""

from __future__ import annotations

from typing import Any

from rewardbooth.mini.assets import MINI_NAME, mini_judge_path, mini_model_path
from rewardbooth.mini.world import CONTEXT_PHRASES
from rewardbooth.models.presets import Preset


def mini_defaults() -> dict[str, Any]:
    return {
        "data.instance_prompt": "a {identifier} {class_noun}",  # the world's captions carry no "photo of"
        "data.class_prompt": "a {class_noun}",
        "evaluation.dino_model": MINI_NAME,
        "evaluation.clip_model": MINI_NAME,
        "evaluation.align_model": MINI_NAME,
        "prior.generation_steps": 20,
        "prior.generation_guidance": 4.0,
        "validation.steps": 20,
        "validation.guidance_scale": 4.0,  # the mini model's samples are cleanest around 3-5
        # RPO's training prompts: four of the world's seven scene contexts
        "rpo.prompts": [f"a {{identifier}} {{class_noun}} {CONTEXT_PHRASES[c]}" for c in ("beach", "snow", "city", "night")],
        "rpo.negative_steps": 20,
        "rpo.negative_guidance": 4.0,
    }


PRESET = Preset(MINI_NAME, mini_model_path, mini_defaults, judge_path=mini_judge_path,
                summary="pretrained on the MiniBench world (32 px), with its judges")
