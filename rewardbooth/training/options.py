"""Trainer options users expect from kohya / diffusers' examples: optimizers, EMA, trackers.

Optional packages are checked when a Trainer is built, before anything is written, with a
one-line error naming the extra to install.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager

import torch

from rewardbooth.errors import ConfigError

# Optional packages (bitsandbytes, prodigyopt) are imported only when their option is chosen.

# setting -> (module to import, extra that installs it)
OPTIONAL_PACKAGES = {
    ("optimizer", "adamw8bit"): ("bitsandbytes", "bnb"),
    ("optimizer", "prodigy"): ("prodigyopt", "prodigy"),
    ("report_to", "tensorboard"): ("tensorboard", "tensorboard"),
    ("report_to", "wandb"): ("wandb", "wandb"),
}


def check_optional_packages(train_cfg) -> None:
    for (key, value), (module, extra) in OPTIONAL_PACKAGES.items():
        if getattr(train_cfg, key) == value and importlib.util.find_spec(module) is None:
            raise ConfigError(f"train.{key}={value} needs the {module} package: pip install 'rewardbooth[{extra}]'")


def make_optimizer(groups: list[dict], t) -> torch.optim.Optimizer:
    """AdamW, bitsandbytes' 8-bit AdamW (optimizer state in 8 bits: ~4x less memory), or Prodigy
    (learning-rate free: learning_rate is a multiplier, 1.0 as its authors recommend)."""
    betas, decay, eps = (t.adam_beta1, t.adam_beta2), t.adam_weight_decay, t.adam_epsilon
    if t.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, betas=betas, weight_decay=decay, eps=eps)
    if t.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups, betas=betas, weight_decay=decay, eps=eps, safeguard_warmup=True, use_bias_correction=True)
    return torch.optim.AdamW(groups, betas=betas, weight_decay=decay, eps=eps)


def tracker_config(cfg) -> dict:
    """The run's settings flattened to the scalars trackers accept (lists and None as text)."""
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in cfg.to_flat_dict().items()}


class WeightEMA:
    """Exponential moving average of the trained parameters (diffusers' EMAModel, with its
    1 + n / 10 + n warm-up), swapped in for validation and export so the EMA is the result."""

    def __init__(self, parameters: list[torch.nn.Parameter], decay: float):
        from diffusers.training_utils import EMAModel

        self.parameters = parameters
        self.ema = EMAModel(parameters, decay=decay)
        self._applied = 0

    def step(self) -> None:
        self.ema.step(self.parameters)

    @contextmanager
    def applied(self):
        """The EMA weights in place of the trained ones (re-entrant: nested uses swap once)."""
        if self._applied == 0:
            self.ema.store(self.parameters)
            self.ema.copy_to(self.parameters)
        self._applied += 1
        try:
            yield
        finally:
            self._applied -= 1
            if self._applied == 0:
                self.ema.restore(self.parameters)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        state = {f"shadow.{i}": p.detach().contiguous() for i, p in enumerate(self.ema.shadow_params)}
        return {**state, "optimization_step": torch.tensor(self.ema.optimization_step)}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, shadow in enumerate(self.ema.shadow_params):
                shadow.copy_(state[f"shadow.{i}"])
        self.ema.optimization_step = int(state["optimization_step"])


@contextmanager
def nothing_applied():
    yield
