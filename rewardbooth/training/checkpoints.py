"""Checkpoints: only trainable tensors and method state, as safetensors (no pickles), written so an
interrupted save is ignored, and read back from the newest intact one."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rewardbooth.errors import CheckpointError
from rewardbooth.methods import Method
from rewardbooth.training import sharding
from rewardbooth.training.run_dir import (
    CHECKPOINT_DIR,
    CHECKPOINT_MARKER,
    atomic_write_text,
    checkpoint_path,
    list_checkpoints,
    prune_checkpoints,
)
from rewardbooth.training.setup import first_line

METHOD_STATE_NAME = "method_state.safetensors"
EMA_STATE_NAME = "ema_state.safetensors"


class Checkpoints:
    """Saves and restores a run's trainable state through accelerate's save_state / load_state.

    Under train.fsdp every process writes its own shards of the sharded modules and of `sharded_optimizer`
    (training/sharding.py: safetensors with the layout in their headers); the rest is written as without sharding."""
    def __init__(self, accelerator, run_dir: Path, method: Method, ema: Callable[[], object | None], keep: int | None,
                 sharded_optimizer=None):
        self.accelerator, self.run_dir, self.method, self.ema, self.keep = accelerator, Path(run_dir), method, ema, keep
        self.sharded_optimizer = sharded_optimizer
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)

    def _save_hook(self, models, weights, output_dir):
        """Checkpoints hold only trainable tensors: with LoRA, megabytes instead of a model copy."""
        acc = self.accelerator
        for i, model in enumerate(models):
            module = acc.unwrap_model(model)
            if sharding.is_sharded(module):  # each process its shard
                sharding.save_shards(module, Path(output_dir), f"trainable_{i}", acc.num_processes, acc.process_index)
            elif acc.is_main_process:
                state = {n: p.detach().contiguous() for n, p in module.named_parameters() if p.requires_grad}
                save_file(state, str(Path(output_dir) / f"trainable_{i}.safetensors"))
        if self.sharded_optimizer is not None:  # accelerate would write the main process's part only, as a pickle
            sharding.save_optimizer_shards(self.sharded_optimizer, Path(output_dir), acc.num_processes, acc.process_index)
        if acc.is_main_process:
            # Method state (DPG's replay, counters) as tensors: accelerate would pickle it.
            save_file({k: v.detach().cpu().contiguous() for k, v in self.method.state_tensors().items()},
                      str(Path(output_dir) / METHOD_STATE_NAME))
            if (ema := self.ema()) is not None:
                save_file({k: v.cpu() for k, v in ema.state_tensors().items()}, str(Path(output_dir) / EMA_STATE_NAME))
        weights.clear()

    def _load_hook(self, models, input_dir):
        acc = self.accelerator
        for i, model in enumerate(models):
            module = acc.unwrap_model(model)
            if sharding.is_sharded(module):
                sharding.load_shards(module, Path(input_dir), f"trainable_{i}", acc.num_processes, acc.process_index)
                continue
            if not (Path(input_dir) / f"trainable_{i}.safetensors").is_file() and any(Path(input_dir).glob(f"trainable_{i}.rank*")):
                raise CheckpointError(f"checkpoint {input_dir} holds sharded weights (train.fsdp) and this run is not sharded")
            state = load_file(str(Path(input_dir) / f"trainable_{i}.safetensors"))
            params = dict(module.named_parameters())
            if set(state) != {n for n, p in params.items() if p.requires_grad}:
                raise RuntimeError(f"checkpoint {input_dir} does not match this run's trainable parameters")
            with torch.no_grad():
                for name, tensor in state.items():
                    params[name].copy_(tensor)
        if self.sharded_optimizer is not None:
            sharding.load_optimizer_shards(self.sharded_optimizer, Path(input_dir), acc.num_processes, acc.process_index)
        models.clear()
        method_state = Path(input_dir) / METHOD_STATE_NAME
        if method_state.is_file():
            self.method.load_state_tensors(load_file(str(method_state), device=file_device(acc)))
        if (ema := self.ema()) is not None:
            ema_state = Path(input_dir) / EMA_STATE_NAME
            if not ema_state.is_file():
                raise RuntimeError(f"checkpoint {input_dir} has no {EMA_STATE_NAME}, but train.ema_decay is set")
            ema.load_state_tensors(load_file(str(ema_state), device=file_device(acc)))

    def save(self, step: int) -> Path:
        acc = self.accelerator
        path = checkpoint_path(self.run_dir, step)
        acc.save_state(str(path))
        acc.wait_for_everyone()  # every process's files (its shards, its RNG state) are written before the marker
        if acc.is_main_process:
            atomic_write_text(path / CHECKPOINT_MARKER, json.dumps({"step": step}))
            prune_checkpoints(self.run_dir, self.keep)
        acc.wait_for_everyone()
        return path

    def restore_latest(self, finished: bool) -> int:
        """Load the newest intact checkpoint; returns its step (0: nothing saved yet, start over).
        `finished`: the run already has a result, so there must be a checkpoint to continue from."""
        checkpoints = list_checkpoints(self.run_dir)
        if not checkpoints:
            if finished:  # finished, and asked for more steps
                raise CheckpointError(f"run {self.run_dir} finished without a checkpoint to continue from "
                                      "(train.checkpoint_every was 0); train a new run with more steps instead")
            return 0
        for step, path in reversed(checkpoints):  # the newest intact one
            foreign = sorted(p.name for p in path.glob("custom_checkpoint_*.pkl"))
            if foreign:  # accelerate would unpickle these with weights_only=False, i.e. run whatever they hold
                raise CheckpointError(f"checkpoint {path} holds {', '.join(foreign)}, pickles rewardbooth never writes; "
                                      "refusing to load it (delete the file if you trust it, or the checkpoint)")
            problem = None
            try:
                self.accelerator.load_state(str(path))  # extra modules are prepared, so restored here too
            except CheckpointError:
                raise
            except Exception as exc:  # noqa: BLE001 - any unreadable file: name it and fall back
                problem = damaged_file(path) or first_line(exc)
            if self._everyone_loaded(problem is None):  # one process's damaged shard: all fall back together
                return step
            warnings.warn(f"checkpoint {path} is damaged ({problem or damaged_file(path) or 'on another process'}); "
                          "falling back to the previous checkpoint", stacklevel=2)
        raise CheckpointError(f"no intact checkpoint in {self.run_dir / CHECKPOINT_DIR} to resume from")

    def _everyone_loaded(self, loaded: bool) -> bool:
        acc = self.accelerator
        if acc.num_processes == 1:
            return loaded
        failed = acc.reduce(torch.tensor([0.0 if loaded else 1.0], device=acc.device), reduction="sum")
        return failed.item() == 0


def file_device(accelerator) -> str:
    """Where safetensors puts what it reads: the device, named as it accepts it (accelerate's CPU processes say cpu:0)."""
    return "cpu" if accelerator.device.type == "cpu" else str(accelerator.device)


def damaged_file(checkpoint: Path) -> str | None:
    """The first file of a checkpoint that does not read back (safetensors header, torch state)."""
    for file in sorted(checkpoint.iterdir()):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), "pt") as f:
                    for key in f.keys():
                        f.get_tensor(key)
            elif file.suffix == ".bin":
                torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            return f"{file.name}: {first_line(exc)}"
    return None
