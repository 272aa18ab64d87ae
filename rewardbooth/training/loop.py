"""The one training loop (accelerate): every method plugs its loss into it.

Randomness is drawn from a generator seeded by (seed, step, micro-batch, process), not from a
global stream, so a resumed run sees exactly the batches, noise and timesteps the uninterrupted
run would have seen. Set-up, checkpoints, selection, validation and weight files live in their
own modules beside this one; this file is the order of things.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rewardbooth.config import RunConfig
from rewardbooth.errors import Stopped
from rewardbooth.methods import Method, get_method
from rewardbooth.methods.context import TrainContext
from rewardbooth.models.loading import Components, load_components
from rewardbooth.models.quantize import quantize_frozen
from rewardbooth.training.preflight import check_family_settings
from rewardbooth.rewards.encoders import park_encoders
from rewardbooth.training import memory, sharding
from rewardbooth.training.checkpoints import Checkpoints
from rewardbooth.training.memory import MemoryEstimate
from rewardbooth.training.nonfinite import GRAD_NORM, NonFiniteGuard
from rewardbooth.training.options import WeightEMA, check_optional_packages, make_optimizer, nothing_applied, tracker_config
from rewardbooth.training.resume import record_run_start
from rewardbooth.training.run_dir import MetricsLog, RunFolder, RunResult, atomic_write_text, run_lock
from rewardbooth.training.selection import Selection, SelectionScorer
from rewardbooth.training.setup import attach_trainable, choose_threads, estimate_memory, place_frozen
from rewardbooth.training.validation import sample_validation
from rewardbooth.training.weights import WeightWriter

# diffusers / transformers / peft / accelerate are imported inside the functions that use them, so importing this
# module (registries, --help, the web app) does not pay their start-up cost.

TRACKER_LOGS = "logs"


@dataclass
class TrainResult:
    run_dir: Path
    final_step: int  # the last step trained (earlier than train.steps after early stopping)
    weights: Path  # LoRA safetensors file, or the folder holding the fine-tuned denoiser (unet/ or transformer/)
    selected_step: int  # the step whose weights are the result (the best validated one under selection)
    already_finished: bool = False  # resumed a finished run: nothing was trained


def step_generator(seed: int, step: int, micro: int, process: int) -> torch.Generator:
    # Large odd multipliers keep (step, micro, process) triples from colliding.
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 7_919 + micro * 104_729 + process * 15_485_863)


@contextmanager
def stop_signals(handler):
    """SIGTERM and SIGINT go to `handler` inside the block, to what they went to before outside it."""
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, before in previous.items():
            signal.signal(s, before)


class Trainer:
    # Whether this process trains only this run, so the process's CPU time is the run's (train-many: several at once).
    owns_process_clock = True

    def __init__(self, cfg: RunConfig, run_dir: Path, method: Method | None = None, progress: bool = True,
                 scorer: SelectionScorer | None = None):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import ProjectConfiguration, parse_flag_from_env

        check_optional_packages(cfg.train)  # before anything is written
        self.cfg, self.folder, self.progress = cfg, RunFolder(run_dir), progress
        self.run_dir = self.folder.root
        self.method = method or get_method(cfg.train.method)()
        self.ema: WeightEMA | None = None
        self.memory_estimate: MemoryEstimate | None = None
        self.stop_requested = False
        self.stepping = False  # inside the training steps, where a stop waits for the step's checkpoint
        # accelerate keeps one global state per process; a library that runs several trainings in
        # one process (bench, tests) must clear its precision settings between them.
        AcceleratorState._reset_state()
        self.accelerator = acc = Accelerator(
            cpu=parse_flag_from_env("ACCELERATE_USE_CPU"),
            gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
            mixed_precision=cfg.train.mixed_precision,
            project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / TRACKER_LOGS),
                                                automatic_checkpoint_naming=False),
            log_with=cfg.train.report_to,
        )
        sharding.check_processes(cfg.train.fsdp, acc.num_processes)
        self.sharding = sharding.Sharding(acc) if cfg.train.fsdp else None  # train.fsdp: full fine-tuning sharded per block
        self.metrics = MetricsLog(self.folder.metrics, enabled=acc.is_main_process)
        self.selection = Selection(cfg, self.method, self.run_dir, scorer)
        self.weights = WeightWriter(acc, cfg, self.ema_applied)
        self.nonfinite = NonFiniteGuard(cfg.train, acc, self.run_dir)

    def ema_applied(self):
        """With train.ema_decay, the EMA weights stand in for the trained ones (validation, selection, export)."""
        return self.ema.applied() if self.ema is not None else nothing_applied()

    def _stop_on_signals(self):
        """Ctrl-C and SIGTERM (the web UI's Stop) finish the current step, checkpoint it and raise Stopped;
        outside the steps (set-up, the final writes) nothing is half done, so they interrupt at once, as does
        a second Ctrl-C. A library caller in another thread, or several processes, keep the default handling."""
        if threading.current_thread() is not threading.main_thread() or self.accelerator.num_processes > 1:
            return nullcontext()

        def request_stop(signum, frame):
            if not self.stepping or (signum == signal.SIGINT and self.stop_requested):
                raise KeyboardInterrupt
            if signum == signal.SIGINT and not self.stop_requested:
                os.write(2, b"\nrewardbooth: stopping after this step (Ctrl-C again aborts)\n")  # print() is unsafe here
            self.stop_requested = True

        return stop_signals(request_stop)

    def run(self, resume: bool = False) -> TrainResult:
        """Train (holding the run folder's lock), or on resume of a finished run return its result."""
        if resume and (finished := self.finished_result()) is not None:
            return finished
        with run_lock(self.run_dir) if self.accelerator.is_main_process else nullcontext(), self._stop_on_signals():
            return self._run(resume)

    def finished_result(self) -> TrainResult | None:
        """The result of this folder's earlier run if it already trained train.steps steps (or stopped early)."""
        done = self.folder.read_result()
        if done is None or self.cfg.train.steps > done.steps:
            return None  # not finished, or asked for more steps: continue from the last checkpoint
        return TrainResult(self.run_dir, done.last_step, self.run_dir / done.weights, done.selected_step, already_finished=True)

    def frozen_base(self) -> tuple[Components, torch.dtype]:
        """The base model, loaded, frozen and placed on the device, and the frozen weights' dtype (train-many hands each
        subject a view of one base shared by all: training/many.py)."""
        cfg, t = self.cfg, self.cfg.train
        components = load_components(cfg.model.name, cfg.model.revision, cfg.model.variant, vae=cfg.model.vae)
        check_family_settings(cfg, components.pipeline_class)  # the library and the bench reach here without the CLI's pre-flight
        weight_dtype = place_frozen(components, self.accelerator.device, t.mixed_precision, cfg.model.offload_text_encoders)
        if cfg.model.quantize:
            quantize_frozen(components.unet, cfg.model.quantize)
        return components, weight_dtype

    def _setup(self) -> tuple[TrainContext, list, torch.optim.Optimizer, object]:
        """Load and place the model, let the method prepare its data, attach the trained weights; prepared by accelerate."""
        from accelerate.utils import set_seed
        from diffusers.optimization import get_scheduler

        cfg, acc, t = self.cfg, self.accelerator, self.cfg.train
        # Critic and adapter initialisation draw from the global generators: seed before each.
        set_seed(t.seed)
        components, weight_dtype = self.frozen_base()
        ctx = TrainContext(cfg, self.run_dir, acc, components, cfg.data.resolution or components.native_resolution, weight_dtype,
                           unet=components.unet, progress=self.progress and acc.is_main_process)
        self.cpu_threads = choose_threads(ctx)
        self.method.prepare(ctx)
        set_seed(t.seed)
        groups = attach_trainable(components, cfg)
        self.memory_estimate = estimate_memory(ctx, self.method, groups, show=self.progress)
        if self.sharding:  # in place, per block, with RPO's frozen reference; the optimizer is built on the shards
            groups = self.sharding.shard(components, self.method, cfg.adapter.train_text_encoder, groups)
        optimizer = make_optimizer(groups, t)
        # Schedulers count optimizer steps; accelerate steps them once per process per step.
        lr_scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps * acc.num_processes,
                                     num_training_steps=t.steps * acc.num_processes)
        trained = sharding.trained_modules(components, cfg.adapter.train_text_encoder)
        extra, extra_optimizers = self.method.extra_modules(), self.method.extra_optimizers()
        if self.sharding:  # the same list, the shards kept out of DDP
            prepared = self.sharding.prepare(trained, [*extra, *extra_optimizers], optimizer, lr_scheduler)
        else:
            prepared = list(acc.prepare(*trained, *extra, *extra_optimizers, optimizer, lr_scheduler))
        n, k = len(trained), len(extra)
        ctx.unet = prepared[0]
        if cfg.adapter.train_text_encoder:
            ctx.text_encoders = prepared[1:n] + components.frozen_text_encoders  # the frozen rest as it is
        self.method.use_prepared(prepared[n : n + k], prepared[n + k : n + k + len(extra_optimizers)])
        optimizer, lr_scheduler = prepared[-2], prepared[-1]
        if t.ema_decay is not None:
            self.ema = WeightEMA([p for group in optimizer.param_groups for p in group["params"]], t.ema_decay)
        if t.report_to:
            acc.init_trackers("rewardbooth", config=tracker_config(cfg))
        # accumulate() must see the DDP wrappers to skip syncs between micro-batches.
        return ctx, prepared[:n], optimizer, lr_scheduler

    def _run(self, resume: bool) -> TrainResult:
        cfg, acc, t = self.cfg, self.accelerator, self.cfg.train
        # Absolute input paths, so resume, generate and reports work from any directory.
        for section, key in ((cfg.data, "instance_dir"), (cfg.prior, "class_dir")):
            if getattr(section, key):
                setattr(section, key, str(Path(getattr(section, key)).expanduser().resolve()))
        started, cpu_started = time.perf_counter(), time.process_time()
        record_run_start(cfg, self.run_dir, resume, write=acc.is_main_process)  # refuses resuming under other settings
        if acc.is_main_process:
            atomic_write_text(self.folder.config, cfg.to_yaml())
        ctx, trained, optimizer, lr_scheduler = self._setup()
        params_to_clip = [p for group in optimizer.param_groups for p in group["params"]]
        checkpoints = Checkpoints(acc, self.run_dir, self.method, lambda: self.ema, t.checkpoints_total_limit,
                                  sharded_optimizer=self.sharding.optimizer if self.sharding else None)
        start_step = 0
        if resume:
            start_step = checkpoints.restore_latest(finished=self.folder.is_finished())
            self.selection.restore(start_step)
        self.metrics.truncate_after(start_step)
        # Seconds spent on this run so far (set-up included; earlier processes' share from the log), so a bench can
        # compare methods at equal compute. CPU seconds leave out pauses and other jobs on shared cores, but are the
        # run's own only on the CPU in one process training it alone (every earlier process too).
        earlier = [r for r in self.folder.read_metrics() if "wall_seconds" in r and r["step"] <= start_step]
        self.wall_start = started - max((r["wall_seconds"] for r in earlier), default=0.0)
        own_cpu = self.owns_process_clock and acc.device.type == "cpu" and acc.num_processes == 1
        self.cpu_start = (cpu_started - max((r["cpu_seconds"] for r in earlier), default=0.0)
                          if own_cpu and all("cpu_seconds" in r for r in earlier) else None)

        bar = tqdm(range(start_step, t.steps), initial=start_step, total=t.steps, desc=f"train {self.method.name}",
                   disable=not (self.progress and acc.is_main_process), unit="step")
        sums: dict[str, torch.Tensor] = {}
        count, done = 0, start_step  # done: steps finished (a resumed, already finished run trains none)
        tick = time.perf_counter()
        memory.take_device_peak(acc.device)  # set-up's peak (class images, labels) is not the steps'
        self.stepping = True
        for step in bar:
            terms, bad = [], None  # this step's logged values per micro-batch; the non-finite step's values
            for micro in range(t.gradient_accumulation_steps):
                with acc.accumulate(*trained):
                    loss, logs = self.method.loss(ctx, step_generator(t.seed, step, micro, acc.process_index))
                    terms.append({"loss": loss.detach(), **logs})
                    acc.backward(loss)
                    if acc.sync_gradients:
                        bad = self.nonfinite.check(terms, acc.clip_grad_norm_(params_to_clip, t.max_grad_norm))
                        if bad is not None:
                            optimizer.zero_grad(set_to_none=True)  # no update from it: the weights stay finite
                    optimizer.step()  # accelerate steps (and zeroes) only on the micro-batch that syncs
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    if self.ema is not None and acc.sync_gradients:
                        self.ema.step()
                for key, value in terms[-1].items():
                    sums[key] = sums.get(key, 0) + torch.as_tensor(value, device=acc.device).float()
                count += 1
            done = step + 1
            if bad is not None and self.nonfinite.must_stop():
                self._log(done, sums, count, tick, lr_scheduler, bad)  # the bad step's line: null and flagged
                bar.close()
                raise self.nonfinite.error(done, bad)
            if done % t.log_every == 0 or done == t.steps or done in t.save_steps:  # budgets get their own line (and seconds)
                self._log(done, sums, count, tick, lr_scheduler)
                sums, count, tick = {}, 0, time.perf_counter()
                bar.set_postfix(loss=f"{self.last_loss:.4f}")
            if cfg.validation.every and done % cfg.validation.every == 0:
                self.validate(ctx, done)
                if self.selection.should_stop(done, acc):
                    break
            if done in t.save_steps and done != t.steps:
                self.weights.save_budget(ctx, self.folder.budget_dir(done), done, self.selection.selected_step(done), self._best_dir())
            # The last step is checkpointed too, so a finished run can continue with a larger --steps;
            # Ctrl-C / SIGTERM stop at this step boundary, resumable from here.
            if (t.checkpoint_every and (done % t.checkpoint_every == 0 or done == t.steps)) or self.stop_requested:
                self.nonfinite.check_weights(params_to_clip, done)
                checkpoints.save(done)
            if self.stop_requested:
                bar.close()
                raise Stopped(done)
        self.stepping = False
        bar.close()
        self.nonfinite.check_weights(params_to_clip, done)  # before the result is written
        if cfg.validation.every and done % cfg.validation.every != 0:
            self.validate(ctx, done)
        return self._finish(ctx, done)

    def _log(self, step: int, sums: dict, count: int, tick: float, lr_scheduler, nonfinite: dict | None = None) -> None:
        acc, t = self.accelerator, self.cfg.train
        record = {key: acc.reduce(value / count, reduction="mean").item() for key, value in sums.items()}
        record.update(step=step, lr=lr_scheduler.get_last_lr()[0],
                      seconds_per_step=(time.perf_counter() - tick) * t.gradient_accumulation_steps / count,
                      wall_seconds=round(time.perf_counter() - self.wall_start, 3))
        if self.cpu_start is not None:
            record["cpu_seconds"] = round(time.process_time() - self.cpu_start, 3)
        if self.nonfinite.skipped:
            record["skipped_nonfinite"], self.nonfinite.skipped = self.nonfinite.skipped, 0
        if nonfinite and GRAD_NORM in nonfinite:  # the step that stops the run: its gradient norm too
            record[GRAD_NORM] = nonfinite[GRAD_NORM]
        if (peak := memory.take_device_peak(acc.device)) is not None:
            record["peak_memory_gib"] = round(peak, 3)
        self.metrics.write(record)
        if t.report_to:
            acc.log({k: v for k, v in record.items() if k != "step"}, step=step)
        self.last_loss = record["loss"]

    def _best_dir(self) -> Path | None:
        return self.selection.best_dir if self.selection.best is not None else None

    @torch.no_grad()
    def validate(self, ctx: TrainContext, step: int) -> None:
        """Sample, score (the method's numbers, the selection score), keep the best weights under selection.
        train.fsdp: every process runs the sampler (the sharded forward passes are collective) and learns the main
        process's numbers, so all keep the same best and gather its weights together."""
        main, everyone = self.accelerator.is_main_process, self.weights.collective
        if not (main or everyone):
            return
        with self.ema_applied():
            prompts, images = sample_validation(ctx, self.method, self.weights.text_encoders(ctx), self.folder.sample_dir(step))
            numbers = None
            if main:
                numbers = self.selection.score(ctx, prompts, images, self.method.validation_metrics(ctx, step, prompts, images))
                self.metrics.write({"step": step, "validation": True, **numbers})
            if everyone:
                from accelerate.utils import broadcast_object_list

                numbers = broadcast_object_list([numbers])[0]
            if self.selection.offer(step, numbers):
                self.weights.export(ctx, self.selection.best_dir)
                if main:
                    self.selection.write_record()
        park_encoders()  # judges scored this validation; training steps do not need them on the device

    def _finish(self, ctx: TrainContext, last_step: int) -> TrainResult:
        acc = self.accelerator
        acc.wait_for_everyone()
        weights = self.run_dir
        selected = self.selection.selected_step(last_step)
        if acc.is_main_process or self.weights.collective:  # train.fsdp: all gather, the main process writes
            weights = self.weights.write_result(ctx, self.run_dir, self._best_dir())
        if acc.is_main_process:
            self.weights.write_kohya_copy(ctx, weights, self.run_dir)
            self.folder.write_result(RunResult(
                method=self.method.name, last_step=last_step, steps=self.cfg.train.steps, selected_step=selected,
                weights=str(Path(weights).relative_to(self.run_dir)), base_model=self.cfg.model.name, resolution=ctx.resolution,
                num_processes=acc.num_processes, cpu_threads=self.cpu_threads if acc.device.type == "cpu" else None,
                flow_matching=ctx.family.flow_matching))
        acc.wait_for_everyone()
        acc.end_training()
        return TrainResult(self.run_dir, last_step, Path(weights), selected)


def train(cfg: RunConfig, run_dir: Path, resume: bool = False, progress: bool = True, method: Method | None = None) -> TrainResult:
    return Trainer(cfg, run_dir, method=method, progress=progress).run(resume=resume)
