"""Built-in model names (presets) and what each brings besides its weights.

A preset maps a name (`--model tiny`, `--model mini`) to a diffusers folder that the ordinary
`from_pretrained` path reads, plus the defaults of every command run on it (its own judges,
prompts and sampler settings, each still overridable) and, optionally, judges of its own
(`--dino-model mini`). The tiny presets (random weights, built offline) are registered here;
other presets register themselves through the `rewardbooth.presets` entry-point group (the
MiniBench world does), so loading a hub model or folder imports none of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rewardbooth.plugins import load_entry_points
from rewardbooth.models.tiny import TINY_PRESETS, tiny_model_path
from rewardbooth.models.tiny_flow import flow_model_path

ENTRY_POINT_GROUP = "rewardbooth.presets"
# The tiny presets' judges are random-weight encoders too, named "tiny" (rewards/encoders.py builds them).
TINY_DEFAULTS: dict[str, Any] = {"evaluation.dino_model": "tiny", "evaluation.clip_model": "tiny", "evaluation.align_model": "tiny"}


@dataclass(frozen=True)
class Preset:
    name: str
    path: Callable[[], Path]  # the diffusers pipeline folder (built on first use where needed)
    defaults: Callable[[], dict[str, Any]] = dict  # settings the preset implies
    judge_path: Callable[[str], Path] | None = None  # kind (dino, clip, align, ...) -> judge folder, for judges named like the preset
    quiet: bool = False  # built locally: the libraries' load bars say nothing useful
    summary: str = ""


_REGISTRY: dict[str, Preset] = {}
_entry_points_loaded = False


def register_preset(preset: Preset) -> Preset:
    _REGISTRY[preset.name] = preset
    return preset


for _name in TINY_PRESETS:
    register_preset(Preset(_name, lambda name=_name: tiny_model_path(name), lambda: dict(TINY_DEFAULTS), quiet=True))
# The flow families' classes at toy sizes, 64 px (FLUX's native 1024 px is far too big for a CPU test), sampled at
# their family's guidance (models/sampling_defaults.py) but with the config's 25 steps (tests stay quick).
TINY_FLOW_DEFAULTS: dict[str, Any] = {**TINY_DEFAULTS, "data.resolution": 64, "validation.steps": 25, "prior.generation_steps": 25,
                                      "rpo.negative_steps": 25}
# FLUX.1-dev-like (guidance embedding), SD3.5-like, FLUX.2 [klein] base-like, Z-Image-Turbo-like, Qwen-Image-like
for _name in ("tiny-flux", "tiny-sd3", "tiny-flux2", "tiny-zimage", "tiny-qwenimage"):
    register_preset(Preset(_name, lambda name=_name: flow_model_path(name), lambda: dict(TINY_FLOW_DEFAULTS), quiet=True))


def _load_entry_points() -> None:
    """Import the presets installed packages announce (once, and only when a name is not known yet)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for preset in load_entry_points(ENTRY_POINT_GROUP, "rewardbooth Preset", lambda obj: isinstance(obj, Preset), skip=_REGISTRY).values():
        register_preset(preset)


def find_preset(name: str | None) -> Preset | None:
    """The preset called `name`, or None (hub ids, folders and files are never presets)."""
    if not name or "/" in name or "\\" in name or name.startswith((".", "~")):
        return None
    if name not in _REGISTRY:
        _load_entry_points()
    return _REGISTRY.get(name)


def preset_names() -> list[str]:
    _load_entry_points()
    return list(_REGISTRY)


def preset_defaults(model_name: str) -> dict[str, Any]:
    """Settings a preset model implies (empty for hub ids and folders)."""
    preset = find_preset(model_name)
    return preset.defaults() if preset is not None else {}


def preset_judge_path(name: str, kind: str) -> Path | None:
    """The judge folder a preset ships for `kind` when a judge is named like it (e.g. --dino-model mini)."""
    preset = find_preset(name)
    return preset.judge_path(kind) if preset is not None and preset.judge_path is not None else None
