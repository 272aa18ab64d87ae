"""Personalization methods: each the algorithm box of its paper over the shared primitives."""

from __future__ import annotations

from rewardbooth.errors import ConfigError
from rewardbooth.methods.base import Method


def method_registry() -> dict[str, type[Method]]:
    from rewardbooth.methods.dpg import DPG
    from rewardbooth.methods.dreambooth import DreamBooth
    from rewardbooth.methods.rpo import RPO

    return {cls.name: cls for cls in (DreamBooth, RPO, DPG)}


def get_method(name: str) -> type[Method]:
    registry = method_registry()
    if name not in registry:
        raise ConfigError(f"unknown method {name!r} (available: {', '.join(registry)})")
    return registry[name]
