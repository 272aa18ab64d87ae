"""Plug-ins: what installed packages announce under an entry-point group (methods, presets)."""

from __future__ import annotations

from collections.abc import Callable, Container
from importlib.metadata import entry_points

from rewardbooth.errors import ConfigError


def load_entry_points(group: str, what: str, accept: Callable[[object], bool], skip: Container[str] = ()) -> dict[str, object]:
    """name -> loaded object for each entry point of `group` not in `skip`; a plug-in that fails to
    load, or is not a `what`, is a one-line error naming it."""
    loaded = {}
    for point in entry_points(group=group):
        if point.name in skip:
            continue
        try:
            obj = point.load()
        except Exception as exc:
            raise ConfigError(f"{point.name!r}: entry point {point.value!r} failed to load: {exc}".splitlines()[0]) from exc
        if not accept(obj):
            raise ConfigError(f"{point.name!r}: entry point {point.value!r} is not a {what}")
        loaded[point.name] = obj
    return loaded
