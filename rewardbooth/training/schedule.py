"""Learning-rate schedules shared by the recipes that train rewardbooth's shipped assets."""

from __future__ import annotations

import math


def warmup_cosine_lr(step: int, total: int, base: float, warmup: int, floor: float = 0.0) -> float:
    """The learning rate at `step` (0-based) of `total`: linear warm-up to `base` over `warmup`
    steps (base / warmup at step 0, base at step warmup - 1), then a half cosine from `base` down
    to `floor * base` at step `total`, held there after."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
