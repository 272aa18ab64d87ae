"""Personalization methods: each the algorithm box of its paper over the shared primitives.

The registry below is the one place a method is known: method lists, help text, report
sections, web-app curves, named variants and config checks all derive from it. Plug-in methods
announce themselves through the `rewardbooth.methods` entry-point group (like plug-in rewards).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rewardbooth.config import RunConfig, build_config
from rewardbooth.errors import ConfigError
from rewardbooth.methods.base import Method
from rewardbooth.methods.dpg import DPG
from rewardbooth.methods.dreambooth import DreamBooth
from rewardbooth.methods.rpo import RPO
from rewardbooth.models.presets import preset_defaults
from rewardbooth.models.sampling_defaults import family_sampling_defaults
from rewardbooth.plugins import load_entry_points

ENTRY_POINT_GROUP = "rewardbooth.methods"
BUILTIN_METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (DreamBooth, DPG, RPO)}
BASELINE: type[Method] = DreamBooth  # the method every other is compared with (a class attribute would be inherited)
# The reward method the demo shows beside the baseline: on MiniBench's reported sets 0 and 1 (docs/minibench.md) it beat
# DreamBooth on identity_kept (+0.092, +0.165) and on prompt_ok both times (+0.061, +0.071; RPO +0.059, +0.007) at about
# 0.6x RPO's seconds per subject.
SHOWCASE: type[Method] = DPG


def method_registry() -> dict[str, type[Method]]:
    """Built-in methods, then those installed packages announce (a plug-in cannot shadow a built-in)."""
    plugins = load_entry_points(ENTRY_POINT_GROUP, "rewardbooth Method subclass",
                                lambda cls: isinstance(cls, type) and issubclass(cls, Method), skip=BUILTIN_METHODS)
    return {**BUILTIN_METHODS, **plugins}


def method_names() -> list[str]:
    return list(method_registry())


def baseline_method() -> type[Method]:
    """The method every other is compared with (DreamBooth)."""
    return BASELINE


def showcase_method() -> type[Method]:
    """The reward method `rewardbooth demo` runs beside the baseline (DPG)."""
    return SHOWCASE


def get_method(name: str) -> type[Method]:
    registry = method_registry()
    if name not in registry:
        raise ConfigError(f"train.method: unknown method {name!r} (available: {', '.join(registry)})")
    return registry[name]


def variant_names() -> list[str]:
    return [name for cls in method_registry().values() for name in cls.variants]


def resolve_variant(name: str) -> tuple[type[Method], dict[str, Any]]:
    """A method name or a named variant (e.g. dpg-recon) -> its method and the settings it changes."""
    registry = method_registry()
    if name in registry:
        return registry[name], {}
    for cls in registry.values():
        if name in cls.variants:
            return cls, dict(cls.variants[name])
    raise ConfigError(f"train.method: unknown method or variant {name!r} (methods: {', '.join(registry)}; "
                      f"variants: {', '.join(variant_names())})")


def methods_help() -> str:
    """One line per method for --help and the web app."""
    return "; ".join(f"{name}: {cls.summary}" for name, cls in method_registry().items())


def _method_defaults(cfg: RunConfig, explicit: set[str]) -> dict[str, Any]:
    name = cfg.train.method or baseline_method().name  # unset: the baseline, written into the config like any default
    defaults = {"train.method": name, **get_method(name).defaults}
    if "model.name" in explicit:  # a paper's resolution belongs to the paper's model: yours keeps its native size
        defaults.pop("data.resolution", None)
    return defaults


def _family_defaults(cfg: RunConfig, explicit: set[str]) -> dict[str, Any]:
    return family_sampling_defaults(cfg.model.name, cfg.model.revision)  # FLUX.1-dev samples at guidance 3.5, not SD's 7.5


def _preset_defaults(cfg: RunConfig, explicit: set[str]) -> dict[str, Any]:
    return preset_defaults(cfg.model.name)  # a preset's own world beats a paper's defaults


def _method_checks(cfg: RunConfig) -> None:
    get_method(cfg.train.method).check(cfg)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """A run's full configuration: defaults, the method's settings, the model family's sampler and the
    preset's world on the keys the YAML file and the overrides leave unset; validated, with the method's
    checks. `train.method` may name a variant (`dpg-recon`: DPG as released), whose settings the
    overrides then beat."""
    overrides = dict(overrides or {})
    named = overrides.get("train.method")
    if named and named not in method_registry():  # a named variant (e.g. dpg-recon): its method, its settings under the user's
        cls, changes = resolve_variant(named)
        overrides = {**changes, **overrides, "train.method": cls.name}
    return build_config(path, overrides, defaults=(_method_defaults, _family_defaults, _preset_defaults), checks=(_method_checks,))


__all__ = ["BUILTIN_METHODS", "ENTRY_POINT_GROUP", "Method", "baseline_method", "get_method", "load_config", "method_names",
           "method_registry", "methods_help", "resolve_variant", "showcase_method", "variant_names"]
