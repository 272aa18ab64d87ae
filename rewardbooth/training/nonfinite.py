"""NaN/inf losses and gradients, caught at the step they happen (train.on_nonfinite): a diverged run
stops with its last finite checkpoint kept and no result, or (skip) its bad steps leave the weights alone."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from rewardbooth.config import TrainConfig
from rewardbooth.errors import TrainingDiverged
from rewardbooth.training.run_dir import list_checkpoints

GRAD_NORM = "grad_norm"
# --resume refuses a changed learning rate (training/resume.py), so the way on is a new run.
RETRY_HINT = "train again with a lower train.learning_rate"


class NonFiniteGuard:
    def __init__(self, t: TrainConfig, accelerator, run_dir: Path):
        self.skip, self.limit = t.on_nonfinite == "skip", t.max_nonfinite_steps
        self.accelerator, self.run_dir = accelerator, run_dir
        self.in_row = 0  # skipped steps in a row
        self.skipped = 0  # skipped since the last metrics line

    def check(self, terms: list[dict], grad_norm) -> dict[str, float] | None:
        """This step's mean of every logged term (over micro-batches and processes) when one of them, or the
        gradient norm, is NaN/inf; None when all are finite. The step's one host sync."""
        device = self.accelerator.device
        if hasattr(grad_norm, "full_tensor"):  # train.fsdp: the norm over every process's shards, as a DTensor
            grad_norm = grad_norm.full_tensor()
        names = list(dict.fromkeys(n for micro in terms for n in micro))
        values = torch.stack([torch.stack([torch.as_tensor(m[n], device=device).float().mean() for m in terms if n in m]).mean()
                              for n in names])
        # fp16's grad scaler makes inf norms on purpose (it then skips the step and lowers the scale): not divergence.
        if grad_norm is not None and self.accelerator.scaler is None:
            names.append(GRAD_NORM)
            values = torch.cat([values, torch.as_tensor(grad_norm, device=device).float().reshape(1)])
        values = self.accelerator.reduce(values, reduction="mean")  # NaN anywhere is NaN everywhere: all processes agree
        host = dict(zip(names, values.tolist()))
        if all(math.isfinite(v) for v in host.values()):
            self.in_row = 0
            return None
        return host

    def must_stop(self) -> bool:
        """After a non-finite step: stop now, or (skip) count it and go on until `limit` in a row."""
        if not self.skip:
            return True
        self.in_row, self.skipped = self.in_row + 1, self.skipped + 1
        return self.in_row >= self.limit

    def error(self, step: int, values: dict[str, float]) -> TrainingDiverged:
        bad = [n for n, v in values.items() if not math.isfinite(v)]
        shown = ", ".join(f"{n} {v:.4g}" for n, v in values.items() if n != bad[0])
        what = f"{bad[0]} is {values[bad[0]]}" + (f" ({shown})" if shown else "")
        if self.skip:
            what += f", {self.in_row} steps in a row (train.max_nonfinite_steps)"
        return self._error(step, what)

    def check_weights(self, parameters: list[torch.Tensor], step: int) -> None:
        """Before a checkpoint or the result: finite losses can still overflow a weight (fp16)."""
        sharded = [p for p in parameters if hasattr(p, "to_local")]  # train.fsdp: each process checks its shards
        local = [p.to_local() if hasattr(p, "to_local") else p for p in parameters]
        bad = torch.stack([~torch.isfinite(t.detach()).all() for t in local]).any().float().reshape(1)
        if sharded:
            bad = self.accelerator.reduce(bad.to(self.accelerator.device), reduction="sum")
        if bad.item():
            raise self._error(step, "the trained weights are NaN/inf")

    def _error(self, step: int, what: str) -> TrainingDiverged:
        saved = list_checkpoints(self.run_dir)
        kept = f"the last finite checkpoint (step {saved[-1][0]}) is kept" if saved else "no checkpoint was saved before it"
        return TrainingDiverged(f"{TrainingDiverged.opening} {step}: {what}; {kept}; {RETRY_HINT}"
                                + ("" if self.skip else " or train.on_nonfinite=skip"))
