"""The modules an object graph keeps alive (a method's critic, reward encoders, frozen copies): what the memory
estimate counts as resident and what sharding looks through for frozen copies of the denoiser."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def resident_modules(roots: Iterable[object], depth: int = 3) -> list[torch.nn.Module]:
    """The nn.Modules reachable from `roots` through attributes, lists and dicts (a method's
    critic, reward encoders, frozen copies), without looking inside the modules themselves."""
    found: dict[int, torch.nn.Module] = {}
    seen: set[int] = set()
    frontier = list(roots)
    for _ in range(depth + 1):
        nxt = []
        for obj in frontier:
            if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, torch.Tensor)):
                continue
            seen.add(id(obj))
            if isinstance(obj, torch.nn.Module):
                found.setdefault(id(obj), obj)
            elif isinstance(obj, (list, tuple, set)):
                nxt.extend(obj)
            elif isinstance(obj, dict):
                nxt.extend(obj.values())
            elif hasattr(obj, "__dict__") and not isinstance(obj, type):
                nxt.extend(vars(obj).values())
        frontier = nxt
    # A module inside another found one (a wrapped critic and the critic itself) is held once:
    # functional_call cannot swap one tensor in through two names and restore it.
    inner = {id(sub) for m in found.values() for sub in m.modules() if sub is not m}
    return [m for key, m in found.items() if key not in inner]
