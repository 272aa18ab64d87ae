"""The `mini` preset: MiniBench's shipped base model and judges, and the settings of its world.

`mini` lives in its own world (32 px scenes, a world-word vocabulary, guidance 4), so the paper's
prompts ("Van Gogh rendition") and the hub's judges mean nothing to it. Registered through the
`rewardbooth.presets` entry point (pyproject.toml), so the core never imports mini/.
"""

from __future__ import annotations

from typing import Any

from rewardbooth.mini.assets import FLOW_NAME, MINI_NAME, mini_flow_model_path, mini_judge_path, mini_model_path
from rewardbooth.mini.world import CONTEXT_PHRASES
from rewardbooth.models.presets import Preset
from rewardbooth.models.sampling_defaults import SAMPLER_KEYS

# mini-flow's sampler (flow-matching Euler steps, classifier-free guidance): the fewest steps of 10/20/30/50 at which
# `python -m rewardbooth.mini.measure --model mini-flow --steps N` reads every attribute within 0.03 of mini's
# (docs/mini-flow.md, "The quality bar").
FLOW_SAMPLER_STEPS, FLOW_SAMPLER_GUIDANCE = 10, 4.0


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


def mini_flow_defaults() -> dict[str, Any]:
    """mini's world, prompts and judges; its own sampler (the SD3 family's 28 steps at 3.5 are for 1024 px)."""
    return {**mini_defaults(), **dict.fromkeys(SAMPLER_KEYS["steps"], FLOW_SAMPLER_STEPS),
            **dict.fromkeys(SAMPLER_KEYS["guidance"], FLOW_SAMPLER_GUIDANCE)}


PRESET = Preset(MINI_NAME, mini_model_path, mini_defaults, judge_path=mini_judge_path,
                summary="pretrained on the MiniBench world (32 px), with its judges")
FLOW_PRESET = Preset(FLOW_NAME, mini_flow_model_path, mini_flow_defaults, judge_path=mini_judge_path,
                     summary="an SD3-style flow-matching transformer pretrained on the MiniBench world, with mini's judges")
