"""The one warm-up + cosine schedule reproduces the two the recipes had before it, value for value
(to rounding: the judges' old formula multiplied by pi before dividing, which can move the last bit)."""

from __future__ import annotations

import pytest

from rewardbooth.training.schedule import warmup_cosine_lr


def same(value: float) -> object:
    return pytest.approx(value, rel=1e-12, abs=0.0)

# Computed with the former rewardbooth/mini/pretrain.py lr_at(step, total=1000, base=1e-3, warmup=200):
# cosine from base down to 5% of base.
PRETRAIN = [(0, 5e-06), (1, 1e-05), (99, 0.0005), (199, 0.001), (200, 0.001), (201, 0.0009999963374561986),
            (450, 0.0007888958606843111), (600, 0.0005250000000000001), (999, 5.000366254380149e-05),
            (1000, 5e-05), (1500, 5e-05)]
# ... and with total=3, base=2e-3, warmup=1 (a VAE run of a few steps)
PRETRAIN_SHORT = [(0, 0.002), (1, 0.002), (2, 0.0010500000000000002)]
# Computed with the former rewardbooth/mini/judges.py lr_at(step, total=1500, base=1e-3), warmup 100:
# cosine from base down to 0.
JUDGES = [(0, 1e-05), (1, 2e-05), (50, 0.00051), (99, 0.001), (100, 0.001), (101, 0.0009999987411224158),
          (800, 0.0005000000000000001), (1499, 1.2588775841204659e-09)]
# ... and with total=3 (shorter than the warm-up), base=2e-3
JUDGES_SHORT = [(0, 2e-05), (1, 4e-05), (2, 6e-05)]


@pytest.mark.parametrize("step, expected", PRETRAIN)
def test_pretraining_schedule(step, expected):
    assert warmup_cosine_lr(step, 1000, 1e-3, 200, floor=0.05) == same(expected)


@pytest.mark.parametrize("step, expected", PRETRAIN_SHORT)
def test_short_pretraining_schedule(step, expected):
    assert warmup_cosine_lr(step, 3, 2e-3, 1, floor=0.05) == same(expected)


@pytest.mark.parametrize("step, expected", JUDGES)
def test_judges_schedule(step, expected):
    assert warmup_cosine_lr(step, 1500, 1e-3, 100) == same(expected)


@pytest.mark.parametrize("step, expected", JUDGES_SHORT)
def test_short_judges_schedule(step, expected):
    assert warmup_cosine_lr(step, 3, 2e-3, 100) == same(expected)
