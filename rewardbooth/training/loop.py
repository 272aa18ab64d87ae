"""The one training loop (accelerate): every method plugs its loss into it.

Randomness is drawn from a generator seeded by (seed, step, micro-batch, process), not from a
global stream, so a resumed run sees exactly the batches, noise and timesteps the uninterrupted
run would have seen.
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rewardbooth.config import RunConfig
from rewardbooth.errors import CheckpointError
from rewardbooth.methods import get_method
from rewardbooth.methods.base import Method
from rewardbooth import diffusion
from rewardbooth.models.loading import TEXT_ENCODER_FOLDERS, load_components, make_pipeline
from rewardbooth.models.lora import LORA_WEIGHTS_NAME, TEXT_ENCODER_TARGETS, add_lora, save_lora
from rewardbooth.rewards.encoders import park_encoders
from rewardbooth.sampling import SampleSettings, generate
from rewardbooth.training.context import TrainContext
from rewardbooth.training.run_dir import (
    CONFIG_NAME,
    METRICS_NAME,
    STAGING_NAME,
    MetricsLog,
    atomic_write_text,
    checkpoint_path,
    list_checkpoints,
    prune_checkpoints,
    replace_into,
    run_lock,
)
from rewardbooth.training import memory
from rewardbooth.training.memory import MemoryEstimate
from rewardbooth.training.options import WeightEMA, check_optional_packages, make_optimizer, nothing_applied, tracker_config
from rewardbooth.training.threads import choose_cpu_threads, should_choose_threads

BEST_DIR = "best"
BUDGETS_DIR = "budgets"
METHOD_STATE_NAME = "method_state.safetensors"
EMA_STATE_NAME = "ema_state.safetensors"
TRACKER_LOGS = "logs"
RESULT_NAME = "result.json"
SELECTION_REWARD = "val_reward"
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainResult:
    run_dir: Path
    final_step: int  # the last step trained (earlier than train.steps after early stopping)
    weights: Path  # LoRA safetensors file, or the folder holding the fine-tuned U-Net
    selected_step: int  # the step whose weights are the result (the best validated one under selection)
    already_finished: bool = False  # resumed a finished run: nothing was trained


def step_generator(seed: int, step: int, micro: int, process: int) -> torch.Generator:
    # Large odd multipliers keep (step, micro, process) triples from colliding.
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 7_919 + micro * 104_729 + process * 15_485_863)


def _trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def place_frozen(components, device, mixed_precision: str) -> torch.dtype:
    """Freeze the base model on the device: frozen parts run in the low-precision dtype (the VAE
    stays float32 under fp16, where SD's VAE overflows); trained weights stay float32 (autocast)."""
    weight_dtype = DTYPES[mixed_precision]
    components.vae.requires_grad_(False).to(device, dtype=torch.float32 if weight_dtype == torch.float16 else weight_dtype)
    for encoder in components.text_encoders:
        encoder.requires_grad_(False).to(device, dtype=weight_dtype)
    components.unet.requires_grad_(False).to(device, dtype=weight_dtype)
    return weight_dtype


def attach_trainable(components, cfg: RunConfig) -> list[dict]:
    """Make the trained weights (LoRA adapters, or the whole U-Net / text encoders) and return
    their optimizer parameter groups."""
    a = cfg.adapter
    groups = []
    if a.kind == "lora":
        add_lora(components.unet, a.rank, a.alpha, a.dropout, a.target_modules)
    else:
        components.unet.requires_grad_(True)
    # Trained weights in float32 even when the frozen base is half precision.
    for p in _trainable_parameters(components.unet):
        p.data = p.data.float()
    groups.append({"params": _trainable_parameters(components.unet), "lr": cfg.learning_rate})
    for encoder in components.text_encoders if a.train_text_encoder else []:  # SDXL: both encoders
        if a.kind == "lora":
            add_lora(encoder, a.rank, a.alpha, a.dropout, TEXT_ENCODER_TARGETS)
        else:
            encoder.requires_grad_(True)
        for p in _trainable_parameters(encoder):
            p.data = p.data.float()
        lr = cfg.train.text_encoder_learning_rate or cfg.learning_rate
        groups.append({"params": _trainable_parameters(encoder), "lr": lr})
        if cfg.train.gradient_checkpointing:
            encoder.gradient_checkpointing_enable()
    if cfg.train.gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
    return groups


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path, method: Method | None = None, progress: bool = True):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        check_optional_packages(cfg.train)  # before anything is written
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.method = method or get_method(cfg.train.method)()
        self.ema: WeightEMA | None = None
        self.memory_estimate: MemoryEstimate | None = None
        self.stop_requested = False
        self.progress = progress
        # accelerate keeps one global state per process; a library that runs several trainings in
        # one process (bench, tests) must clear its precision settings between them.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
        from accelerate.utils import parse_flag_from_env

        self.accelerator = Accelerator(
            cpu=parse_flag_from_env("ACCELERATE_USE_CPU"),
            gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
            mixed_precision=cfg.train.mixed_precision,
            project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / TRACKER_LOGS),
                                                automatic_checkpoint_naming=False),
            log_with=cfg.train.report_to,
        )
        self.metrics = MetricsLog(self.run_dir / METRICS_NAME, enabled=self.accelerator.is_main_process)
        self.best: tuple[int, float] | None = None  # (step, score) of the best validation so far
        # What model selection maximises: the method's own validation number, or the loop's
        # lambda-Harmonic selection reward when validation.select is on (any method).
        self.selection_key = self.method.selection_metric or (SELECTION_REWARD if cfg.validation.select else None)
        self._selection_reward = None

    # --- setup ------------------------------------------------------------------------------
    def _load(self) -> TrainContext:
        cfg, acc = self.cfg, self.accelerator
        components = load_components(cfg.model.name, cfg.model.revision, cfg.model.variant, vae=cfg.model.vae)
        weight_dtype = place_frozen(components, acc.device, cfg.train.mixed_precision)
        resolution = cfg.data.resolution or components.native_resolution
        ctx = TrainContext(cfg, self.run_dir, acc, components, resolution, weight_dtype, progress=self.progress and acc.is_main_process)
        ctx.unet = components.unet
        return ctx

    def _choose_threads(self, ctx: TrainContext) -> int:
        """Small models on the CPU: the measured-fastest thread count (see training/threads.py)."""
        unet = ctx.components.unet
        if self.accelerator.num_processes > 1 or not should_choose_threads(ctx.device, sum(p.numel() for p in unet.parameters())):
            return torch.get_num_threads()
        side = ctx.latent_size
        latents = torch.randn(2 * self.cfg.train.batch_size, unet.config.in_channels, side, side, device=ctx.device,
                              dtype=ctx.weight_dtype, requires_grad=True)
        text = ctx.encode_prompts([self.cfg.instance_prompt] * latents.shape[0])
        timesteps = torch.full((latents.shape[0],), 500, device=ctx.device)

        def step():  # forward + backward to the input: a training step's work, no weight touched
            diffusion.unet_output(unet, latents, timesteps, text).sum().backward()

        return choose_cpu_threads(step)

    def _estimate_memory(self, ctx: TrainContext, groups: list[dict]) -> MemoryEstimate | None:
        """Print the estimated peak memory before the first step; warn when the device is smaller."""
        acc, t = self.accelerator, self.cfg.train
        extra = self.method.extra_modules()
        trained = [p for group in groups for p in group["params"]] + [p for m in extra for p in m.parameters()]
        try:
            result = memory.estimate(resident=memory.resident_modules([ctx.components, self.method]), trained=trained,
                                     probes=self.method.memory_probes(ctx), optimizer=t.optimizer, ema=t.ema_decay is not None,
                                     mixed_precision=t.mixed_precision, device=ctx.device, processes=acc.num_processes)
        except Exception as exc:  # an estimate must never stop a run
            if acc.is_main_process and self.progress:
                print(f"estimated peak memory: unavailable ({_first_line(exc)})")
            return None
        capacity = memory.device_capacity(ctx.device)
        if acc.is_main_process:
            if self.progress:  # with the progress bars: not in benches, the demo's summary or --quiet
                print(result.line(ctx.device, capacity))
            if result.exceeds(capacity):
                warnings.warn(f"the estimated peak memory ({result.total / memory.GIB:.1f} GiB) exceeds {ctx.device}'s "
                              f"{capacity / memory.GIB:.1f} GiB; to fit, try {memory.MEMORY_ADVICE}", stacklevel=2)
        return result

    def _register_checkpoint_hooks(self) -> None:
        """Checkpoints hold only trainable tensors: with LoRA, megabytes instead of a model copy."""
        from safetensors.torch import load_file, save_file

        acc = self.accelerator

        def save_hook(models, weights, output_dir):
            if acc.is_main_process:
                for i, model in enumerate(models):
                    state = {n: p.detach().contiguous() for n, p in acc.unwrap_model(model).named_parameters() if p.requires_grad}
                    save_file(state, str(Path(output_dir) / f"trainable_{i}.safetensors"))
                # Method state (DPG's replay, counters) as tensors: accelerate would pickle it.
                save_file({k: v.detach().cpu().contiguous() for k, v in self.method.state_tensors().items()},
                          str(Path(output_dir) / METHOD_STATE_NAME))
                if self.ema is not None:
                    save_file({k: v.cpu() for k, v in self.ema.state_tensors().items()}, str(Path(output_dir) / EMA_STATE_NAME))
            weights.clear()

        def load_hook(models, input_dir):
            for i, model in enumerate(models):
                state = load_file(str(Path(input_dir) / f"trainable_{i}.safetensors"))
                params = dict(acc.unwrap_model(model).named_parameters())
                if set(state) != {n for n, p in params.items() if p.requires_grad}:
                    raise RuntimeError(f"checkpoint {input_dir} does not match this run's trainable parameters")
                with torch.no_grad():
                    for name, tensor in state.items():
                        params[name].copy_(tensor)
            models.clear()
            method_state = Path(input_dir) / METHOD_STATE_NAME
            if method_state.is_file():
                self.method.load_state_tensors(load_file(str(method_state), device=str(acc.device)))
            if self.ema is not None:
                ema_state = Path(input_dir) / EMA_STATE_NAME
                if not ema_state.is_file():
                    raise RuntimeError(f"checkpoint {input_dir} has no {EMA_STATE_NAME}, but train.ema_decay is set")
                self.ema.load_state_tensors(load_file(str(ema_state), device=str(acc.device)))

        acc.register_save_state_pre_hook(save_hook)
        acc.register_load_state_pre_hook(load_hook)

    # --- the loop ---------------------------------------------------------------------------
    def _stop_on_sigterm(self):
        """SIGTERM (the web UI's Stop) finishes the current step, checkpoints and exits; a
        library caller in another thread, or several processes, keep the default handling."""
        if threading.current_thread() is not threading.main_thread() or self.accelerator.num_processes > 1:
            return nullcontext()

        @contextmanager
        def handler():
            def request_stop(signum, frame):
                self.stop_requested = True

            previous = signal.signal(signal.SIGTERM, request_stop)
            try:
                yield
            finally:
                signal.signal(signal.SIGTERM, previous)

        return handler()

    def run(self, resume: bool = False) -> TrainResult:
        """Train (holding the run folder's lock), or on resume of a finished run return its result."""
        if resume and (finished := self.finished_result()) is not None:
            return finished
        with run_lock(self.run_dir) if self.accelerator.is_main_process else nullcontext(), self._stop_on_sigterm():
            return self._run(resume)

    def finished_result(self) -> TrainResult | None:
        """The result of this folder's earlier run if it already trained train.steps steps (or stopped early)."""
        path = self.run_dir / RESULT_NAME
        if not path.is_file():
            return None
        done = json.loads(path.read_text())
        if self.cfg.train.steps > done.get("steps", done["last_step"]):
            return None  # asked for more steps: continue from the last checkpoint
        return TrainResult(self.run_dir, done["last_step"], self.run_dir / done["weights"], done["selected_step"], already_finished=True)

    def _run(self, resume: bool) -> TrainResult:
        from accelerate.utils import set_seed
        from diffusers.optimization import get_scheduler

        cfg, acc = self.cfg, self.accelerator
        # Absolute input paths, so resume, generate and reports work from any directory.
        for section, key in ((cfg.data, "instance_dir"), (cfg.prior, "class_dir")):
            if getattr(section, key):
                setattr(section, key, str(Path(getattr(section, key)).expanduser().resolve()))
        if acc.is_main_process:
            atomic_write_text(self.run_dir / CONFIG_NAME, cfg.to_yaml())
        # Critic and adapter initialisation draw from the global generators: seed before each.
        set_seed(cfg.train.seed)
        ctx = self._load()
        self.cpu_threads = self._choose_threads(ctx)
        self.method.prepare(ctx)
        set_seed(cfg.train.seed)
        groups = attach_trainable(ctx.components, cfg)
        self.memory_estimate = self._estimate_memory(ctx, groups)
        t = cfg.train
        optimizer = make_optimizer(groups, t)
        # Schedulers count optimizer steps; accelerate steps them once per process per step.
        lr_scheduler = get_scheduler(
            t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps * acc.num_processes,
            num_training_steps=t.steps * acc.num_processes,
        )
        trained = [ctx.components.unet] + (ctx.components.text_encoders if cfg.adapter.train_text_encoder else [])
        extra, extra_optimizers = self.method.extra_modules(), self.method.extra_optimizers()
        prepared = list(acc.prepare(*trained, *extra, *extra_optimizers, optimizer, lr_scheduler))
        n = len(trained)
        ctx.unet = prepared[0]
        if cfg.adapter.train_text_encoder:
            ctx.text_encoders = prepared[1:n]
        trained = prepared[:n]  # accumulate() must see the DDP wrappers to skip syncs between micro-batches
        self.method.use_prepared(prepared[n : n + len(extra)], prepared[n + len(extra) : n + len(extra) + len(extra_optimizers)])
        optimizer, lr_scheduler = prepared[-2], prepared[-1]
        params_to_clip = [p for group in optimizer.param_groups for p in group["params"]]
        if t.ema_decay is not None:
            self.ema = WeightEMA(params_to_clip, t.ema_decay)
        if t.report_to:
            acc.init_trackers("rewardbooth", config=tracker_config(cfg))
        self._register_checkpoint_hooks()

        start_step = 0
        if resume:
            start_step = self._resume()
        self.metrics.truncate_after(start_step)

        bar = tqdm(range(start_step, t.steps), initial=start_step, total=t.steps, desc=f"train {self.method.name}",
                   disable=not (self.progress and acc.is_main_process), unit="step")
        sums: dict[str, torch.Tensor] = {}
        count, done = 0, start_step  # done: steps finished (a resumed, already finished run trains none)
        tick = time.perf_counter()
        memory.take_device_peak(acc.device)  # set-up's peak (class images, labels) is not the steps'
        for step in bar:
            for micro in range(t.gradient_accumulation_steps):
                generator = step_generator(t.seed, step, micro, acc.process_index)
                with acc.accumulate(*trained):
                    loss, logs = self.method.loss(ctx, generator)
                    acc.backward(loss)
                    if acc.sync_gradients:
                        acc.clip_grad_norm_(params_to_clip, t.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    if self.ema is not None and acc.sync_gradients:
                        self.ema.step()
                # Sums stay on the device: no host sync until a log line is written.
                for key, value in {"loss": loss.detach(), **logs}.items():
                    sums[key] = sums.get(key, 0) + torch.as_tensor(value, device=acc.device).float()
                count += 1
            done = step + 1
            if done % t.log_every == 0 or done == t.steps:
                record = {key: acc.reduce(value / count, reduction="mean").item() for key, value in sums.items()}
                record.update(step=done, lr=lr_scheduler.get_last_lr()[0], seconds_per_step=(time.perf_counter() - tick) * t.gradient_accumulation_steps / count)
                if (peak := memory.take_device_peak(acc.device)) is not None:
                    record["peak_memory_gib"] = round(peak, 3)
                self.metrics.write(record)
                if t.report_to:
                    acc.log({k: v for k, v in record.items() if k != "step"}, step=done)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                sums, count, tick = {}, 0, time.perf_counter()
            if cfg.validation.every and done % cfg.validation.every == 0:
                self.validate(ctx, done)
                if self.should_stop(done):
                    break
            if done in t.save_steps and done != t.steps:
                self.save_budget(ctx, done)
            # The last step is checkpointed too, so a finished run can continue with a larger --steps.
            if t.checkpoint_every and (done % t.checkpoint_every == 0 or done == t.steps):
                self.save_checkpoint(done)
            elif self.stop_requested:  # SIGTERM: stop at this step boundary, resumable from here
                self.save_checkpoint(done)
            if self.stop_requested:
                bar.close()
                raise KeyboardInterrupt(f"stopped at step {done}; continue with --resume")
        bar.close()
        if cfg.validation.every and done % cfg.validation.every != 0:
            self.validate(ctx, done)
        return self._finish(ctx, done)

    def _resume(self) -> int:
        checkpoints = list_checkpoints(self.run_dir)
        if not checkpoints:
            if (self.run_dir / RESULT_NAME).is_file():  # finished, and asked for more steps
                raise CheckpointError(f"run {self.run_dir} finished without a checkpoint to continue from "
                                      "(train.checkpoint_every was 0); train a new run with more steps instead")
            return 0  # nothing saved yet: start over in the same folder
        for step, path in reversed(checkpoints):  # the newest intact one
            foreign = sorted(p.name for p in path.glob("custom_checkpoint_*.pkl"))
            if foreign:  # accelerate would unpickle these with weights_only=False, i.e. run whatever they hold
                raise CheckpointError(f"checkpoint {path} holds {', '.join(foreign)}, pickles rewardbooth never writes; "
                                      "refusing to load it (delete the file if you trust it, or the checkpoint)")
            try:
                self.accelerator.load_state(str(path))  # extra modules are prepared, so restored here too
                break
            except Exception as exc:  # noqa: BLE001 - any unreadable file: name it and fall back
                warnings.warn(f"checkpoint {path} is damaged ({_damaged_file(path) or _first_line(exc)}); "
                              "falling back to the previous checkpoint", stacklevel=2)
        else:
            raise CheckpointError(f"no intact checkpoint in {self.run_dir / 'checkpoints'} to resume from")
        best = self.run_dir / BEST_DIR / "best.json"
        if best.is_file() and self.selection_key:
            saved = json.loads(best.read_text())
            if saved["step"] <= step:  # a best found after the checkpoint is not part of this history
                self.best = (saved["step"], saved[self.selection_key])
        return step

    def save_checkpoint(self, step: int) -> Path:
        acc = self.accelerator
        path = checkpoint_path(self.run_dir, step)
        acc.save_state(str(path))
        if acc.is_main_process:
            # Written last: a checkpoint without step.json was interrupted and is ignored.
            atomic_write_text(path / "step.json", json.dumps({"step": step}))
            prune_checkpoints(self.run_dir, self.cfg.train.checkpoints_total_limit)
        acc.wait_for_everyone()
        return path

    # --- validation and export --------------------------------------------------------------
    def validation_pipeline(self, ctx: TrainContext):
        acc = self.accelerator
        return make_pipeline(ctx.components, unet=acc.unwrap_model(ctx.unet), text_encoders=self._text_encoders(ctx))

    def _text_encoders(self, ctx: TrainContext) -> list | None:
        return [self.accelerator.unwrap_model(e) for e in ctx.text_encoders] if ctx.text_encoders else None

    def ema_applied(self):
        """With train.ema_decay, the EMA weights stand in for the trained ones (validation, selection, export)."""
        return self.ema.applied() if self.ema is not None else nothing_applied()

    @torch.no_grad()
    def validate(self, ctx: TrainContext, step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        with self.ema_applied():
            self._validate(ctx, step)

    def _validate(self, ctx: TrainContext, step: int) -> None:
        from rewardbooth.evaluation.report import save_image_grid

        v = self.cfg.validation
        prompts = self.method.validation_prompts(ctx)
        settings = SampleSettings(steps=v.steps, guidance_scale=v.guidance_scale, seed=self.cfg.train.seed, resolution=ctx.resolution,
                                  batch_size=v.batch_size)
        unet = self.accelerator.unwrap_model(ctx.unet)
        was_training = unet.training
        unet.eval()
        with self.accelerator.autocast():
            images = generate(self.validation_pipeline(ctx), prompts, v.num_images, settings)
        unet.train(was_training)
        folder = self.run_dir / "samples" / f"step-{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        for j, row in enumerate(images):
            for k, image in enumerate(row):
                image.save(folder / f"{j:02d}_{k:02d}.png")
        save_image_grid([im for row in images for im in row], folder / "grid.png", cols=v.num_images)
        (folder / "prompts.json").write_text(json.dumps(prompts))
        extra = self.method.validation_metrics(ctx, step, prompts, images)
        if self.selection_key == SELECTION_REWARD and SELECTION_REWARD not in extra:
            extra[SELECTION_REWARD] = self.selection_score(ctx, prompts, images)
        self.metrics.write({"step": step, "validation": True, **extra})
        key = self.selection_key
        if key is not None and step >= v.select_min_step:
            if self.best is None or extra[key] > self.best[1]:
                self.best = (step, extra[key])
                self.export_weights(ctx, self.run_dir / BEST_DIR)
                atomic_write_text(self.run_dir / BEST_DIR / "best.json", json.dumps({"step": self.best[0], key: self.best[1]}))
        park_encoders()  # judges scored this validation; training steps do not need them on the device

    def selection_score(self, ctx: TrainContext, prompts: list[str], images: list[list]) -> float:
        """Mean lambda-Harmonic reward (validation.select_lambda) of the validation images."""
        from rewardbooth.methods.dreambooth import instance_images
        from rewardbooth.rewards import Subject, build_reward

        cfg = self.cfg
        if self._selection_reward is None:
            models = {"align": cfg.evaluation.align_model, "clip": cfg.evaluation.clip_model}
            spec = {"name": "lambda_harmonic", "lam": cfg.validation.select_lambda, "encoder": cfg.validation.select_encoder}
            subject = Subject("subject", instance_images(ctx), cfg.data.identifier, cfg.data.class_noun)
            self._selection_reward = (build_reward(spec, models=models, device=str(ctx.device)), subject)
        reward, subject = self._selection_reward
        flat = [im for row in images for im in row]
        flat_prompts = [p for p, row in zip(prompts, images) for _ in row]
        return float(reward(flat, flat_prompts, subject).mean())

    def should_stop(self, step: int) -> bool:
        """Early stopping: no better validation score for `patience` validations in a row."""
        from accelerate.utils import broadcast_object_list

        patience = self.cfg.validation.patience
        stop = [bool(patience) and self.best is not None and (step - self.best[0]) // self.cfg.validation.every >= patience]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(stop)  # only the main process validates; all must stop together
        return stop[0]

    def export_weights(self, ctx: TrainContext, folder: Path) -> Path:
        """Write the trained weights in the diffusers format: a LoRA file, or unet/ (+ text_encoder/).
        Written beside, then moved into place: a full disk mid-export leaves the previous weights whole."""
        with self.ema_applied():
            return self._export_weights(ctx, folder)

    def _export_weights(self, ctx: TrainContext, folder: Path) -> Path:
        unet = self.accelerator.unwrap_model(ctx.unet)
        text_encoders = self._text_encoders(ctx)
        staging = self._staging(folder)
        if self.cfg.adapter.kind == "lora":
            save_lora(staging, unet, text_encoders, sdxl=ctx.components.is_sdxl)
        else:
            unet.save_pretrained(staging / "unet", safe_serialization=True)
            for encoder, name in zip(text_encoders or [], TEXT_ENCODER_FOLDERS):
                encoder.save_pretrained(staging / name, safe_serialization=True)
        return self._place(staging, folder)

    def _staging(self, folder: Path) -> Path:
        staging = folder / STAGING_NAME
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        return staging

    def _place(self, staging: Path, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        replace_into(staging, folder)
        return folder / (LORA_WEIGHTS_NAME if self.cfg.adapter.kind == "lora" else "unet")

    def write_result_weights(self, ctx: TrainContext, folder: Path) -> Path:
        """The run's result as of now into `folder`: the best validated weights under selection, else the current ones."""
        if self.best is None:
            return self.export_weights(ctx, folder)
        staging = self._staging(folder)
        shutil.copytree(self.run_dir / BEST_DIR, staging, ignore=shutil.ignore_patterns("best.json"), dirs_exist_ok=True)
        return self._place(staging, folder)

    def save_budget(self, ctx: TrainContext, step: int) -> Path:
        """budgets/step-N/: the result a run of N steps would have given (same weights, same selection)."""
        folder = budget_dir(self.run_dir, step)
        if self.accelerator.is_main_process:
            self.write_result_weights(ctx, folder)
            atomic_write_text(folder / "budget.json", json.dumps({"step": step, "selected_step": self.best[0] if self.best else step}))
        self.accelerator.wait_for_everyone()
        return folder

    def _finish(self, ctx: TrainContext, last_step: int) -> TrainResult:
        acc = self.accelerator
        acc.wait_for_everyone()
        weights = self.run_dir
        if acc.is_main_process:
            weights = self.write_result_weights(ctx, self.run_dir)
            if self.cfg.adapter.kind == "lora":  # the same LoRA for A1111 / ComfyUI / kohya tools
                from rewardbooth.models.export import KOHYA_WEIGHTS_NAME, write_kohya

                write_kohya(Path(weights), self.cfg, ctx.components.is_sdxl, int(ctx.components.unet.config.layers_per_block),
                            self.run_dir / KOHYA_WEIGHTS_NAME)
            atomic_write_text(self.run_dir / RESULT_NAME, json.dumps({
                "method": self.method.name, "last_step": last_step, "steps": self.cfg.train.steps,
                "selected_step": self.best[0] if self.best else last_step,
                "weights": str(Path(weights).relative_to(self.run_dir)),
                "base_model": self.cfg.model.name, "resolution": ctx.resolution, "num_processes": acc.num_processes,
                "cpu_threads": self.cpu_threads if acc.device.type == "cpu" else None,
            }, indent=2))
        acc.wait_for_everyone()
        acc.end_training()
        return TrainResult(self.run_dir, last_step, Path(weights), self.best[0] if self.best else last_step)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _damaged_file(checkpoint: Path) -> str | None:
    """The first file of a checkpoint that does not read back (safetensors header, torch state)."""
    from safetensors import safe_open

    for file in sorted(checkpoint.iterdir()):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), "pt") as f:
                    for key in f.keys():
                        f.get_tensor(key)
            elif file.suffix == ".bin":
                torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            return f"{file.name}: {_first_line(exc)}"
    return None


def budget_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / BUDGETS_DIR / f"step-{step:06d}"


def train(cfg: RunConfig, run_dir: Path, resume: bool = False, progress: bool = True, method: Method | None = None) -> TrainResult:
    return Trainer(cfg, run_dir, method=method, progress=progress).run(resume=resume)
