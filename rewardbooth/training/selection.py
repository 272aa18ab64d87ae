"""Model selection, early stopping and budgets' bookkeeping.

Under selection the run's result is the validated weights with the best score: a method's own
validation number (Method.selection_metric) or, with validation.select, a pluggable scorer of the
validation images (by default the lambda-Harmonic reward, as RPO's paper selects).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from rewardbooth.config import RunConfig
from rewardbooth.methods import Method
from rewardbooth.methods.context import TrainContext
from rewardbooth.rewards import Subject, build_reward
from rewardbooth.training.run_dir import BEST_DIR, BEST_RECORD, atomic_write_text

# diffusers / transformers / peft / accelerate are imported inside the functions that use them, so importing this
# module (registries, --help, the web app) does not pay their start-up cost.

SELECTION_REWARD = "val_reward"


class SelectionScorer(Protocol):
    def __call__(self, ctx: TrainContext, prompts: list[str], images: list[list]) -> float: ...


class LambdaHarmonicScorer:
    """Mean lambda-Harmonic reward (validation.select_lambda, validation.select_encoder) of the validation images."""

    def __init__(self):
        self.reward = self.subject = None

    def __call__(self, ctx: TrainContext, prompts: list[str], images: list[list]) -> float:
        cfg = ctx.cfg
        if self.reward is None:  # built on first use: the judge loads only when a validation needs it
            models = {"align": cfg.evaluation.align_model, "clip": cfg.evaluation.clip_model}
            spec = {"name": "lambda_harmonic", "lam": cfg.validation.select_lambda, "encoder": cfg.validation.select_encoder}
            self.subject = Subject("subject", ctx.instance_images(), cfg.data.identifier, cfg.data.class_noun)
            self.reward = build_reward(spec, models=models, device=str(ctx.device))
        flat = [im for row in images for im in row]
        flat_prompts = [p for p, row in zip(prompts, images) for _ in row]
        return float(self.reward(flat, flat_prompts, self.subject).mean())


class Selection:
    """The best validation so far, and whether to stop early."""

    def __init__(self, cfg: RunConfig, method: Method, run_dir: Path, scorer: SelectionScorer | None = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.key = method.selection_metric or (SELECTION_REWARD if cfg.validation.select else None)
        self.scorer = scorer or LambdaHarmonicScorer()
        self.best: tuple[int, float] | None = None  # (step, score)

    @property
    def best_dir(self) -> Path:
        return self.run_dir / BEST_DIR

    def score(self, ctx: TrainContext, prompts: list[str], images: list[list], metrics: dict[str, float]) -> dict[str, float]:
        """The validation's numbers, with the scorer's when selection needs it and the method gave none."""
        if self.key == SELECTION_REWARD and SELECTION_REWARD not in metrics:
            metrics = {**metrics, SELECTION_REWARD: self.scorer(ctx, prompts, images)}
        return metrics

    def offer(self, step: int, metrics: dict[str, float]) -> bool:
        """Record a validation; True when it is the new best (its weights become the result)."""
        if self.key is None or step < self.cfg.validation.select_min_step:
            return False
        if self.best is None or metrics[self.key] > self.best[1]:
            self.best = (step, metrics[self.key])
            return True
        return False

    def write_record(self) -> None:
        atomic_write_text(self.best_dir / BEST_RECORD, json.dumps({"step": self.best[0], self.key: self.best[1]}))

    def restore(self, checkpoint_step: int) -> None:
        """On resume: the best found up to the checkpoint (a later one is not part of this history)."""
        record = self.best_dir / BEST_RECORD
        if record.is_file() and self.key:
            saved = json.loads(record.read_text())
            if saved["step"] <= checkpoint_step:
                self.best = (saved["step"], saved[self.key])

    def selected_step(self, last_step: int) -> int:
        return self.best[0] if self.best else last_step

    def should_stop(self, step: int, accelerator) -> bool:
        """Early stopping: no better validation score for `patience` validations in a row."""
        from accelerate.utils import broadcast_object_list

        patience, every = self.cfg.validation.patience, self.cfg.validation.every
        stop = [bool(patience) and self.best is not None and (step - self.best[0]) // every >= patience]
        if accelerator.num_processes > 1:
            broadcast_object_list(stop)  # only the main process validates; all must stop together
        return stop[0]
