"""Writing the trained weights: the result, the best validated ones, budgets; written beside, then
moved into place, so a full disk mid-export leaves the previous weights whole."""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

from rewardbooth.config import RunConfig
from rewardbooth.errors import ConfigError
from rewardbooth.methods.context import TrainContext
from rewardbooth.models.export import KOHYA_WEIGHTS_NAME, write_kohya
from rewardbooth.models.loading import FLUX_PIPELINE
from rewardbooth.models.lora import LORA_WEIGHTS_NAME, TEXT_ENCODER_FOLDERS, save_lora
from rewardbooth.training import sharding
from rewardbooth.training.run_dir import BEST_RECORD, STAGING_NAME, atomic_write_text, replace_into

BUDGET_RECORD = "budget.json"


class WeightWriter:
    """Writes on the main process. Under train.fsdp every process must call export / write_result / save_budget: the
    sharded weights are gathered (one tensor at a time, into the main process's CPU memory) and written there."""
    def __init__(self, accelerator, cfg: RunConfig, ema_applied: Callable):
        self.accelerator, self.cfg, self.ema_applied = accelerator, cfg, ema_applied
        self.collective = cfg.train.fsdp

    def text_encoders(self, ctx: TrainContext) -> list | None:
        """Every text encoder as the pipeline takes them, the trained ones unwrapped (None: none trained)."""
        return [self.accelerator.unwrap_model(e) for e in ctx.text_encoders] if ctx.text_encoders else None

    def trained_text_encoders(self, ctx: TrainContext) -> list | None:
        encoders = self.text_encoders(ctx)
        return encoders[: len(ctx.components.trainable_text_encoders)] if encoders else None

    def export(self, ctx: TrainContext, folder: Path) -> Path:
        """The trained weights (the EMA's under train.ema_decay) in the diffusers format: a LoRA file, or unet/ (+ text_encoder/)."""
        with self.ema_applied():
            unet = self.accelerator.unwrap_model(ctx.unet)
            text_encoders = self.trained_text_encoders(ctx)
            if self.collective:  # whole copies on the main process, built from every process's shards
                main = self.accelerator.is_main_process
                unet = sharding.gathered(unet, main)
                text_encoders = [sharding.gathered(e, main) for e in text_encoders or []] or None
                if not main:
                    return self._result_path(folder, ctx)
            staging = self._staging(folder)
            if self.cfg.adapter.kind == "lora":
                save_lora(staging, unet, text_encoders, sdxl=ctx.components.is_sdxl, pipeline_class=ctx.components.pipeline_class)
            else:
                unet.save_pretrained(staging / ctx.components.denoiser_folder, safe_serialization=True)
                for encoder, name in zip(text_encoders or [], TEXT_ENCODER_FOLDERS):
                    encoder.save_pretrained(staging / name, safe_serialization=True)
            return self._place(staging, folder, ctx)

    def _staging(self, folder: Path) -> Path:
        staging = folder / STAGING_NAME
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        return staging

    def _place(self, staging: Path, folder: Path, ctx: TrainContext) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        replace_into(staging, folder)
        return self._result_path(folder, ctx)

    def _result_path(self, folder: Path, ctx: TrainContext) -> Path:
        return folder / (LORA_WEIGHTS_NAME if self.cfg.adapter.kind == "lora" else ctx.components.denoiser_folder)

    def write_result(self, ctx: TrainContext, folder: Path, best_dir: Path | None) -> Path:
        """The run's result as of now into `folder`: the best validated weights (`best_dir`) under selection, else the current ones."""
        if best_dir is None:
            return self.export(ctx, folder)
        if not self.accelerator.is_main_process:  # train.fsdp: nothing to gather, the best weights are a copy
            return self._result_path(folder, ctx)
        staging = self._staging(folder)
        shutil.copytree(best_dir, staging, ignore=shutil.ignore_patterns(BEST_RECORD), dirs_exist_ok=True)
        return self._place(staging, folder, ctx)

    def save_budget(self, ctx: TrainContext, folder: Path, step: int, selected_step: int, best_dir: Path | None) -> Path:
        """budgets/step-N/: the result a run of N steps would have given (same weights, same selection)."""
        if self.accelerator.is_main_process or self.collective:
            self.write_result(ctx, folder, best_dir)
        if self.accelerator.is_main_process:
            atomic_write_text(folder / BUDGET_RECORD, json.dumps({"step": step, "selected_step": selected_step}))
        self.accelerator.wait_for_everyone()
        return folder

    def write_kohya_copy(self, ctx: TrainContext, weights: Path, run_dir: Path) -> None:
        """The same LoRA for A1111 / ComfyUI / kohya tools (U-Nets and FLUX.1; kohya has no layout here for SD3 / FLUX.2)."""
        flux = ctx.components.pipeline_class == FLUX_PIPELINE
        if self.cfg.adapter.kind != "lora" or (ctx.family.flow_matching and not flux):
            return
        layers_per_block = 0 if flux else int(ctx.components.unet.config.layers_per_block)
        try:
            write_kohya(Path(weights), self.cfg, ctx.components.is_sdxl, layers_per_block, Path(run_dir) / KOHYA_WEIGHTS_NAME, flux=flux)
        except ConfigError as exc:  # a module kohya has no name for: the diffusers file is the result; say why there is no copy
            warnings.warn(f"no {KOHYA_WEIGHTS_NAME} written: {exc}", stacklevel=2)
