"""Many subjects at once (`rewardbooth train-many`): K subjects trained together in one process, each with its own
adapter (LoRA, or its own weights), data, seeds, optimizer, method state and run folder, while the frozen base runs
one batched forward and one backward per step for all of them.

How. Every subject gets the one training loop's Trainer (loop.py), unchanged: its own config, run folder, method,
optimizer, checkpoints, selection, validation and exports. The base model is loaded once; each subject's denoiser is
a copy that shares the base's frozen tensors and carries its own trained ones. The subjects' loops run in one thread
each, in lockstep: a subject's denoiser call waits until every subject still stepping has made its call (or waits at
its backward); the coordinator (the calling thread) then computes all calls of one kind in one stacked call
(models/batched.py: vmap over the subjects, the shared tensors entering once), and when every subject waits at its
backward it sums their losses and backpropagates once. The subjects' trained tensors are disjoint, so each one's
gradient is its own loss's gradient. Calls that cannot be stacked (other shapes, another module state, a family
vmap cannot run) run one per subject, each in its subject's thread.

Exactness. A subject trained here sees the batches, noise and timesteps of its solo run (the loop seeds its
generators per subject, step and micro-batch), and set-up, where a critic and an adapter draw their initial weights
from the global generators, runs subject after subject, each seeded as in its solo run. What differs is rounding:
stacked matmuls and grouped convolutions sum in another order than the solo kernels (tests/test_training_many.py
states the tolerance and where it comes from).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
import signal
import threading
import types
import warnings
from collections import defaultdict
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rewardbooth.config import RunConfig
from rewardbooth.errors import ConfigError, RewardboothError, Stopped
from rewardbooth.methods import Method
from rewardbooth.models.batched import call_key, run_stacked
from rewardbooth.models.loading import Components
from rewardbooth.rewards.encoders import park_encoders, parking_held
from rewardbooth.training.loop import Trainer, TrainResult, stop_signals
from rewardbooth.training.preflight import check_training_inputs
from rewardbooth.training.setup import first_line

SETUP, RUNNING, BLOCKED, DONE = "setup", "running", "blocked", "done"
_RUN_ALONE = object()  # a call's answer: run your forward yourself (it could not be stacked with another)


@dataclass
class SubjectRun:
    """One subject of a train-many group: its name (reports), its full run config and its run folder."""

    name: str
    cfg: RunConfig
    run_dir: Path
    method: Method | None = None  # a Method instance to train with; None: cfg.train.method's


@dataclass
class SubjectOutcome:
    name: str
    run_dir: Path
    result: TrainResult | None = None
    error: str | None = None  # one line: why this subject has no result (bad input, a failure, a stop)
    exception: BaseException | None = None  # what was raised (the library caller may want its traceback)
    deferred: bool = False  # subjects_per_batch="auto": did not fit beside the others; trains in a later batch

    @property
    def ok(self) -> bool:
        return self.result is not None


def check_many_settings(cfg: RunConfig) -> None:
    """Settings that cannot work when subjects share a process and a step (ConfigError naming the setting)."""
    if cfg.train.gradient_accumulation_steps != 1:
        raise ConfigError("train-many needs train.gradient_accumulation_steps=1: accelerate keeps one accumulation state per "
                          "process, which the subjects would share (raise train.batch_size instead)")
    if getattr(cfg.train, "fsdp", False):
        raise ConfigError("train-many trains whole subjects side by side; train.fsdp shards one subject over processes: drop it "
                          "(train-many spreads subjects over processes instead)")
    if cfg.adapter.kind == "lora" and cfg.adapter.dropout > 0:
        raise ConfigError("train-many needs adapter.dropout=0: LoRA dropout draws from the process's global generator, which "
                          "the subjects share, so their runs would not repeat")


def base_key(cfg: RunConfig) -> tuple:
    """Subjects with equal keys share one loaded base model (and train in one group)."""
    m = cfg.model
    return m.name, m.revision, m.variant, m.vae, m.quantize, cfg.train.mixed_precision, m.offload_text_encoders


def subject_view(components: Components, cfg: RunConfig) -> Components:
    """A subject's components over a shared base: its own denoiser module (and trained text encoders) that holds
    the base's frozen tensors themselves (LoRA is added to it) or, for a full fine-tune, copies of them; the rest
    (VAE, frozen encoders, tokenizers, scheduler) shared. The denoiser's calls go through the engine."""
    full = cfg.adapter.kind == "full"
    changes = {"unet": _own_copy(components.unet, full)}
    if cfg.adapter.train_text_encoder:
        for attr in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            encoder = getattr(components, attr)
            if encoder is not None and any(encoder is e for e in components.trainable_text_encoders):
                changes[attr] = _own_copy(encoder, full)
    view = dataclasses.replace(components, **changes)
    view.unet.forward = types.MethodType(_routed_forward, view.unet)  # before accelerate wraps it (autocast)
    return view


def _own_copy(module: torch.nn.Module, full: bool) -> torch.nn.Module:
    memo: dict[int, Any] = {} if full else {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo)


_ACTIVE: ManyEngine | None = None  # the engine running now (one per process)


def _routed_forward(module: torch.nn.Module, *args, **kwargs):
    """A subject denoiser's forward: inside its subject's training steps, through the engine; otherwise (set-up,
    the final validation and export, the engine's own stacked call) the module's own forward."""
    engine = _ACTIVE
    slot = engine.slot_here() if engine is not None else None
    if slot is not None and slot.stepping():
        result = engine.call(slot, module, args, kwargs)
        if result is not _RUN_ALONE:
            return result
    return type(module).forward(module, *args, **kwargs)


def _autocast_state(module: torch.nn.Module) -> tuple:
    device = next(module.parameters()).device.type
    return device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device), torch.is_autocast_cache_enabled()


def _autocast(state: tuple):
    device, enabled, dtype, cache = state
    return torch.autocast(device, dtype=dtype, enabled=enabled, cache_enabled=cache) if enabled else nullcontext()


class _Request:
    def __init__(self, kind: str, module=None, args=(), kwargs=None, loss=None):
        self.kind, self.module, self.args, self.kwargs, self.loss = kind, module, args, kwargs or {}, loss
        self.key = None
        self.grad, self.autocast = torch.is_grad_enabled(), None
        if kind == "call":
            self.autocast = _autocast_state(module)
            key = call_key(module, args, self.kwargs)
            self.key = None if key is None else (key, self.grad, self.autocast)
        self.done, self.result, self.error = False, None, None


class _Slot:
    def __init__(self, index: int, run: SubjectRun):
        self.index, self.run = index, run
        self.trainer: _SubjectTrainer | None = None
        self.state = SETUP
        self.request: _Request | None = None
        self.outcome = SubjectOutcome(run.name, Path(run.run_dir))
        self.view: Components | None = None  # its components over the shared base

    def stepping(self) -> bool:
        return self.trainer is not None and self.trainer.stepping


class _SubjectTrainer(Trainer):
    """The loop's Trainer with its base model from the engine and its backward through it."""

    owns_process_clock = False  # its subjects share the process: its CPU time is no one subject's (no cpu_seconds)

    def __init__(self, engine: ManyEngine, slot: _Slot):
        self.engine = engine
        super().__init__(slot.run.cfg, Path(slot.run.run_dir), method=slot.run.method, progress=False)
        own_backward = self.accelerator.backward
        self.accelerator.backward = lambda loss, **kwargs: engine.backward(slot, loss, own_backward, **kwargs)

    def frozen_base(self) -> tuple[Components, torch.dtype]:
        return self.engine.base_view(self)

    def validate(self, ctx, step: int) -> None:
        """The loop's validation, its closing park_encoders held: the judges are shared, and another subject (its
        DPG critic, its own validation) may be encoding on the device in its thread right now. The engine parks them
        once the group is done."""
        with parking_held():
            super().validate(ctx, step)


class ManyEngine:
    """Runs groups of subjects: one thread per subject, this thread coordinating their batched calls."""

    def __init__(self, progress: bool = True):
        self.cond = threading.Condition()
        self.bases: dict[tuple, tuple[Components, torch.dtype]] = {}
        self.slots: list[_Slot] = []
        self.by_thread: dict[int, _Slot] = {}
        self.aborted = False
        self.stop_requested = False
        self.unbatchable: dict[Any, str] = {}  # module structure -> why vmap failed on it
        self.stats = {"stacked_calls": 0, "alone_calls": 0, "backwards": 0}
        self.progress = progress
        self.bar = None
        self.capacity: int | None = None  # subjects_per_batch="auto": the device's bytes the subjects must fit in
        self.last_estimate = None

    # --- set-up --------------------------------------------------------------------------------------------------
    def base_view(self, trainer: Trainer) -> tuple[Components, torch.dtype]:
        key = base_key(trainer.cfg)
        if key not in self.bases:  # the first subject loads it exactly as a solo run does
            self.bases[key] = Trainer.frozen_base(trainer)
        components, weight_dtype = self.bases[key]
        view = subject_view(components, trainer.cfg)
        slot = next((s for s in self.slots if s.trainer is trainer), None)
        if slot is not None:
            slot.view = view
        return view, weight_dtype

    def slot_here(self) -> _Slot | None:
        return self.by_thread.get(threading.get_ident())

    # --- what the subjects' threads call ------------------------------------------------------------------------
    def call(self, slot: _Slot, module: torch.nn.Module, args: tuple, kwargs: dict):
        return self._submit(slot, _Request("call", module, args, kwargs))

    def backward(self, slot: _Slot, loss: torch.Tensor, own_backward, **kwargs) -> None:
        if kwargs or self.slot_here() is not slot or not slot.stepping():
            return own_backward(loss, **kwargs)
        acc = slot.trainer.accelerator  # what Accelerator.backward does to the loss, then the backward here
        loss = loss / acc.gradient_accumulation_steps
        if acc.scaler is not None:
            loss = acc.scaler.scale(loss)
        self._submit(slot, _Request("backward", loss=loss))
        return None

    def _submit(self, slot: _Slot, request: _Request):
        with self.cond:
            if self.aborted:
                raise KeyboardInterrupt("train-many aborted")
            if slot.state == SETUP and self.capacity is not None:  # its set-up is done: does one more subject fit?
                self._fit_next(slot)
            slot.state, slot.request = BLOCKED, request  # (a first call also ends the subject's set-up)
            self.cond.notify_all()
            while not request.done:
                self.cond.wait()
        if request.error is not None:
            raise request.error
        return request.result

    # --- the subjects' threads ------------------------------------------------------------------------------------
    def _subject_main(self, slot: _Slot, resume: bool) -> None:
        self.by_thread[threading.get_ident()] = slot
        try:
            with self.cond:  # set-up runs subject after subject: each seeds the global generators as its solo run
                while any(s.state == SETUP for s in self.slots[: slot.index]) and not self.aborted:
                    self.cond.wait()
                if self.aborted:
                    raise KeyboardInterrupt("train-many aborted")
                if slot.outcome.deferred:
                    return
            slot.outcome.result = slot.trainer.run(resume=resume)
        except Stopped as exc:
            slot.outcome.error, slot.outcome.exception = str(exc), exc
        except RewardboothError as exc:
            slot.outcome.error, slot.outcome.exception = " ".join(str(exc).split()), exc
        except BaseException as exc:  # noqa: BLE001 - one subject's failure is its own; the others train on
            slot.outcome.error, slot.outcome.exception = f"{type(exc).__name__}: {first_line(exc)}", exc
        finally:
            with self.cond:
                slot.state = DONE
                self.cond.notify_all()

    # --- the coordinator ------------------------------------------------------------------------------------------
    def _ready(self) -> list[_Request] | None:
        """The requests to serve now: once no subject is setting up and every subject still stepping waits, the
        waiting calls (or, when all wait at their backward, the backwards)."""
        if any(s.state == SETUP for s in self.slots):
            return None
        active = [s for s in self.slots if s.state == BLOCKED or (s.state == RUNNING and s.stepping())]
        if not active or any(s.state != BLOCKED for s in active):
            return None
        requests = [s.request for s in active]
        return [r for r in requests if r.kind == "call"] or requests

    def coordinate(self) -> None:
        while True:
            with self.cond:
                while True:
                    if all(s.state == DONE for s in self.slots):
                        return
                    work = self._ready()
                    if work:
                        break
                    self.cond.wait(timeout=0.05)  # a subject leaving its steps (stepping goes false) sends no notice
            try:
                self._serve(work)
            except Exception as exc:  # noqa: BLE001 - handed to the subjects whose requests these were
                for request in work:
                    request.error = exc
            with self.cond:
                for request in work:
                    self._answered(request)
                self.cond.notify_all()

    def _serve(self, work: list[_Request]) -> None:
        if work[0].kind == "backward":
            self._backward(work)
            return
        groups: dict[Any, list[_Request]] = defaultdict(list)
        alone = []
        for request in work:
            if request.key is None or request.key[0][0] in self.unbatchable:
                alone.append(request)
            else:
                groups[request.key].append(request)
        for key, requests in groups.items():
            if len(requests) == 1:
                alone.extend(requests)
                continue
            try:
                with torch.set_grad_enabled(requests[0].grad), _autocast(requests[0].autocast):
                    outputs = run_stacked([r.module for r in requests], [(r.args, r.kwargs) for r in requests])
            except Exception as exc:  # noqa: BLE001 - a model vmap cannot run: its subjects' calls run one by one
                structure = key[0][0]
                self.unbatchable[structure] = first_line(exc)
                warnings.warn(f"train-many: {structure[0].__name__} does not run batched under torch.func.vmap "
                              f"({first_line(exc)}); its subjects' calls run one after another", stacklevel=2)
                alone.extend(requests)
                continue
            for request, output in zip(requests, outputs):
                request.result = output
            self.stats["stacked_calls"] += 1
        for request in alone:
            request.result = _RUN_ALONE
            self.stats["alone_calls"] += 1

    def _backward(self, work: list[_Request]) -> None:
        trainable = []
        for request in work:
            if request.loss.requires_grad:
                trainable.append(request)
            else:  # as loss.backward() would say
                request.error = RuntimeError("element 0 of tensors does not require grad and does not have a grad_fn")
        if trainable:
            try:
                torch.autograd.backward([r.loss for r in trainable])  # the sum's gradient: each subject's own
            except Exception as exc:  # noqa: BLE001
                for request in trainable:
                    request.error = exc
        self.stats["backwards"] += 1
        if self.bar is not None:
            self.bar.update(1)

    def estimate(self, subjects: int | None = None):
        """The memory estimate of the subjects set up so far (or of `subjects` like them): None if one has none."""
        from rewardbooth.training import memory

        ready = [s for s in self.slots if s.trainer is not None and s.view is not None and s.state != SETUP]
        if not ready or any(s.trainer.memory_estimate is None for s in ready):
            return None
        device = ready[0].trainer.accelerator.device

        def weights(slots) -> int:
            return memory.weight_bytes(memory.resident_modules([m for s in slots for m in (s.view, s.trainer.method)]), device)

        base = memory.weight_bytes(memory.resident_modules([self.bases[base_key(ready[0].run.cfg)][0]]), device)
        own = weights(ready) - (weights(ready[:-1]) if len(ready) > 1 else base)  # the last subject's own weights
        single = max((s.trainer.memory_estimate for s in ready), key=lambda e: e.total)
        stacked = single.gradients  # the trained tensors, float32, as the stacked call copies them
        combined = memory.for_subjects(single, len(ready), own, stacked)
        combined = dataclasses.replace(combined, weights=weights(ready))
        if subjects is None or subjects == len(ready):
            return combined
        return dataclasses.replace(memory.for_subjects(single, subjects, own, stacked), weights=weights(ready) + (subjects - len(ready)) * own)

    def _fit_next(self, slot: _Slot) -> None:
        """(Holding the lock, as `slot` ends its set-up.) If one subject more would not fit the device, the subjects not
        set up yet wait for a later batch."""
        slot.state = RUNNING  # counted as set up
        try:
            grown = self.estimate(slot.index + 2)
        finally:
            slot.state = SETUP
        if grown is None or grown.total <= self.capacity:
            return
        for later in self.slots[slot.index + 1:]:
            if later.state == SETUP:
                later.outcome.deferred, later.outcome.error, later.state = True, "deferred to a later batch (memory)", DONE
        self.cond.notify_all()

    def _answered(self, request: _Request) -> None:
        """Mark a request served (holding the lock); its subject runs again from here, so the next look for ready
        requests never sees this one again, even before its thread wakes."""
        slot = next(s for s in self.slots if s.request is request)
        request.done, slot.state, slot.request = True, RUNNING, None

    def abort(self) -> None:
        with self.cond:
            self.aborted = True
            for slot in self.slots:
                if slot.request is not None and not slot.request.done:
                    slot.request.error = KeyboardInterrupt("train-many aborted")
                    self._answered(slot.request)
            self.cond.notify_all()

    @contextmanager
    def _signals(self):
        """Ctrl-C / SIGTERM: every subject stops after its current step, checkpointed (resumable); a second Ctrl-C aborts."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):
            if signum == signal.SIGINT and self.stop_requested:
                raise KeyboardInterrupt
            if not self.stop_requested:
                os.write(2, b"\nrewardbooth: stopping every subject after this step (Ctrl-C again aborts)\n")
            self.stop_requested = True
            for slot in self.slots:
                if slot.trainer is not None:
                    slot.trainer.stop_requested = True

        with stop_signals(request_stop):
            yield

    def run_group(self, runs: Sequence[SubjectRun], resume: bool) -> list[SubjectOutcome]:
        """Train these subjects together (they share a base_key); one outcome per subject."""
        global _ACTIVE
        if _ACTIVE is not None:
            raise ConfigError("one train-many runs per process at a time")
        from tqdm.auto import tqdm

        self.slots = [_Slot(i, run) for i, run in enumerate(runs)]
        self.aborted = False
        # On the CPU attention has no vmap rule and runs per subject inside the stacked call: correct, and said here once.
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented the batching rule")
        for slot in self.slots:  # accelerators are made in this thread, one after another (accelerate's state is global)
            try:
                slot.trainer = _SubjectTrainer(self, slot)
            except Exception as exc:  # noqa: BLE001
                slot.outcome.error, slot.outcome.exception, slot.state = f"{type(exc).__name__}: {first_line(exc)}", exc, DONE
        threads = [threading.Thread(target=self._subject_main, args=(slot, resume), name=f"train-many {slot.run.name}", daemon=True)
                   for slot in self.slots if slot.state != DONE]
        self.bar = tqdm(desc=f"train-many ({len(threads)} subjects)", unit="step", disable=not self.progress)
        _ACTIVE = self
        try:
            with self._signals():
                for thread in threads:
                    thread.start()
                self.coordinate()
        except BaseException:
            self.abort()
            raise
        finally:
            for thread in threads:
                thread.join()
            _ACTIVE = None
            self.by_thread.clear()
            self.bar.close()
            park_encoders()  # what the subjects' validations held back (training/loop.py parks after each)
        outcomes = [slot.outcome for slot in self.slots]
        self.last_estimate = self.estimate()  # of the subjects that trained together (None if one had none)
        self.slots = []  # the subjects' models go; the base stays for the next group
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return outcomes


def check_subjects(runs: Sequence[SubjectRun], check_inputs: bool = True) -> tuple[list[SubjectRun], list[SubjectOutcome]]:
    """The subjects that may train, and an outcome naming the problem for each that may not (bad settings, missing or
    unreadable images, a name or run folder given twice), found before anything loads or trains."""
    ready, failed = [], []
    names, folders = set(), set()
    for run in runs:
        try:
            if run.name in names:
                raise ConfigError(f"the subject name {run.name!r} is given twice")
            folder = Path(run.run_dir).resolve()
            if folder in folders:
                raise ConfigError(f"run folder {run.run_dir} is given to two subjects")
            names.add(run.name)
            folders.add(folder)
            if check_inputs:
                check_training_inputs(run.cfg)
            check_many_settings(run.cfg)
            ready.append(run)
        except RewardboothError as exc:
            failed.append(SubjectOutcome(run.name, Path(run.run_dir), error=" ".join(str(exc).split()), exception=exc))
    return ready, failed


AUTO_FILL = 0.9  # subjects_per_batch="auto" fills the device's memory up to this fraction of the estimate


def subjects_per_batch(value: str | int | None) -> int | str | None:
    """--subjects-per-batch: a positive count, "auto", or None (all subjects of a group at once)."""
    if value is None or value == "auto":
        return value
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = 0
    if count < 1:
        raise ConfigError(f"--subjects-per-batch must be a positive count or auto, got {value!r}")
    return count


def train_many(runs: Sequence[SubjectRun], resume: bool = False, progress: bool = True, subjects_per_batch: int | str | None = None,
               check_inputs: bool = True, engine: ManyEngine | None = None) -> list[SubjectOutcome]:
    """Train every subject, `subjects_per_batch` at a time (None: all of a group at once; "auto": as many as the memory
    estimate fits in AUTO_FILL of the device, decided as each subject's set-up gives its estimate), subjects sharing a base
    model (base_key) together. One outcome per subject, in order; a subject's bad input or failure is its own
    outcome, and the others train on. Run folders must exist (training/run_dir.prepare_run_dir). `engine`: one to
    run on (its stats say how many calls were stacked)."""
    auto = subjects_per_batch == "auto"
    if not auto and subjects_per_batch is not None and (not isinstance(subjects_per_batch, int) or subjects_per_batch < 1):
        raise ConfigError(f"subjects per batch must be a positive count or auto, got {subjects_per_batch!r}")
    ready, failed = check_subjects(runs, check_inputs)
    outcomes = {o.name: o for o in failed}
    groups: dict[tuple, list[SubjectRun]] = defaultdict(list)
    for run in ready:
        groups[base_key(run.cfg)].append(run)
    engine = engine or ManyEngine(progress)
    if auto:
        from rewardbooth.training import memory

        capacity = memory.device_capacity(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        engine.capacity = int(capacity * AUTO_FILL) if capacity else None
    for group in groups.values():
        pending = list(group)
        while pending:
            size = len(pending) if auto else (subjects_per_batch or len(pending))
            batch, pending = pending[:size], pending[size:]
            if engine.stop_requested:
                outcomes.update((r.name, SubjectOutcome(r.name, Path(r.run_dir), error="not started (stopped)")) for r in batch)
                continue
            done = engine.run_group(batch, resume)
            outcomes.update((o.name, o) for o in done if not o.deferred)
            pending = [r for r, o in zip(batch, done) if o.deferred] + pending  # the first subject of a batch is never deferred
        engine.bases.clear()  # the next group's base model replaces this one
    return [outcomes[run.name] for run in runs]


# --- SUBJECTS.yaml, or a folder of subject folders ---------------------------------------------------------------------

# What a subject entry may say besides `settings` (any setting, dotted or in sections): shortcuts for its data.
SUBJECT_SHORTCUTS = {"instance_dir": "data.instance_dir", "class_noun": "data.class_noun", "identifier": "data.identifier",
                     "instance_prompt": "data.instance_prompt", "class_prompt": "data.class_prompt", "class_dir": "prior.class_dir"}
SUBJECT_KEYS = {"name", "run_dir", "settings", *SUBJECT_SHORTCUTS}
PATH_SETTINGS = ("data.instance_dir", "prior.class_dir")
DEFAULT_OUTPUT = "runs-many"


@dataclass
class SubjectEntry:
    """One subject as a subjects file names it: its settings (dotted keys) and run folder, or why it cannot train."""

    name: str
    settings: dict[str, Any]
    run_dir: Path
    error: str | None = None


def flatten_settings(values: dict, where: str, prefix: str = "") -> dict[str, Any]:
    """{"train": {"steps": 4}, "data.identifier": "zwx"} -> {"train.steps": 4, "data.identifier": "zwx"}."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: settings must be a mapping, got {values!r}")
    flat = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_settings(value, where, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"subjects file {path} cannot be read: {first_line(exc)}") from None


def read_subjects(source: Path | str, output: Path | str | None = None, class_noun: str | None = None) -> list[SubjectEntry]:
    """The subjects of SUBJECTS.yaml or of a folder of subject folders (a DreamBench folder: its class nouns).

    SUBJECTS.yaml:   output: runs            (optional; else `output`, else runs-many beside the file)
                     settings: {...}         (every subject's settings, dotted or in sections)
                     subjects:
                       - name: dog           (optional: the instance folder's name)
                         instance_dir: photos/dog
                         class_noun: dog
                         run_dir: runs/dog   (optional: OUTPUT/NAME)
                         settings: {train.seed: 1}
    Paths are relative to the file. A folder: each sub-folder is a subject (its name, its images), its class noun from
    the folder's prompts_and_classes.txt (DreamBench) or `class_noun`. A bad entry becomes an entry with an error."""
    source = Path(source)
    if source.is_dir():
        return _folder_subjects(source, Path(output) if output else source.parent / DEFAULT_OUTPUT, class_noun)
    if not source.is_file():
        raise ConfigError(f"subjects {source} is neither a subjects file nor a folder of subject folders")
    data = _read_yaml(source)
    if isinstance(data, list):
        data = {"subjects": data}
    if not isinstance(data, dict) or not isinstance(data.get("subjects"), list) or not data["subjects"]:
        raise ConfigError(f"subjects file {source} must hold a list `subjects:` of subject entries")
    unknown = set(data) - {"subjects", "settings", "output"}
    if unknown:
        raise ConfigError(f"subjects file {source}: unknown key(s) {', '.join(sorted(unknown))} (valid: output, settings, subjects)")
    here = source.resolve().parent
    shared = flatten_settings(data.get("settings") or {}, f"subjects file {source}")
    root = Path(output) if output else here / str(data.get("output") or DEFAULT_OUTPUT)
    entries = []
    for i, item in enumerate(data["subjects"]):
        name = f"#{i + 1}"
        try:
            if not isinstance(item, dict):
                raise ConfigError(f"must be a mapping, got {item!r}")
            unknown = set(item) - SUBJECT_KEYS
            if unknown:
                raise ConfigError(f"unknown key(s) {', '.join(sorted(unknown))} (valid: {', '.join(sorted(SUBJECT_KEYS))})")
            settings = dict(shared)
            settings.update(flatten_settings(item.get("settings") or {}, "settings"))
            settings.update((SUBJECT_SHORTCUTS[k], v) for k, v in item.items() if k in SUBJECT_SHORTCUTS)
            for key in PATH_SETTINGS:
                if settings.get(key):
                    settings[key] = str(here / Path(str(settings[key])).expanduser())
            default_name = Path(settings["data.instance_dir"]).name if settings.get("data.instance_dir") else name
            name = str(item.get("name") or default_name)
            run_dir = here / str(item["run_dir"]) if item.get("run_dir") else root / name
            entries.append(SubjectEntry(name, settings, run_dir))
        except ConfigError as exc:
            entries.append(SubjectEntry(name, {}, root / name, error=f"subjects file {source}, subject {name}: {exc}"))
    return entries


def _folder_subjects(folder: Path, root: Path, class_noun: str | None) -> list[SubjectEntry]:
    from rewardbooth.data.dreambench import PROMPTS_FILE, load_dreambench

    nouns = {name: s.class_noun for name, s in load_dreambench(folder).subjects.items()} if (folder / PROMPTS_FILE).is_file() else {}
    entries = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        settings = {"data.instance_dir": str(sub.resolve())}
        noun = nouns.get(sub.name, class_noun)
        if noun:
            settings["data.class_noun"] = noun
        error = None if noun else f"subject {sub.name}: no class noun (give --class-noun, or a prompts_and_classes.txt in {folder})"
        entries.append(SubjectEntry(sub.name, settings, root / sub.name, error=error))
    if not entries:
        raise ConfigError(f"subjects folder {folder} has no subject folders")
    return entries


# --- subjects spread over processes (accelerate launch, torchrun) ---------------------------------------------------

PROCESS_GROUP_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "NODE_RANK",
                           "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def process_share() -> tuple[int, int]:
    """(this process's index, how many) under accelerate launch or torchrun; (0, 1) alone."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class Share:
    """This process's share of the subjects under accelerate launch / torchrun (index, count; alone: 0, 1)."""

    def __init__(self):
        self.index, self.count = process_share()
        self.group = {v: os.environ[v] for v in PROCESS_GROUP_VARIABLES if v in os.environ}

    def take(self) -> Share:
        """Train this share alone: no process group while training (the subjects' gradients are their own; DDP would
        average different subjects), its own GPU (the local rank's, made the only visible one before CUDA starts)."""
        if self.count > 1:
            local, visible = os.environ.get("LOCAL_RANK"), os.environ.get("CUDA_VISIBLE_DEVICES")
            if local is not None and not torch.cuda.is_initialized():  # (device_count() would cache the count: not asked)
                devices = visible.split(",") if visible else None
                os.environ["CUDA_VISIBLE_DEVICES"] = devices[int(local) % len(devices)] if devices else local
            for variable in self.group:
                os.environ.pop(variable)
        return self

    def all_ok(self, ok: bool) -> bool:
        """Whether every process's subjects trained (each waits for the others here, so none is stopped by the launcher
        while another still writes: a launcher ends the rest when one process exits with an error)."""
        if self.count == 1:
            return ok
        import torch.distributed as dist

        os.environ.update(self.group)
        dist.init_process_group("gloo", rank=self.index, world_size=self.count)
        try:
            failed = torch.tensor([0 if ok else 1])
            dist.all_reduce(failed)
            return int(failed) == 0
        finally:
            dist.destroy_process_group()


def prepare_subjects(entries: Sequence[SubjectEntry], config_file: Path | str | None = None, overrides: dict | None = None,
                     resume: bool = False, overwrite: bool = False, class_noun: str | None = None,
                     create_folders: bool = True) -> tuple[list[SubjectRun], list[SubjectOutcome]]:
    """Each entry's full config (the config file, the entry's settings, `overrides` on top; on resume the run folder's
    saved config.yaml instead of the first two), checked like `train` checks one run, and its run folder created: the
    subjects that may train, and an outcome naming the problem for each one that may not."""
    from rewardbooth.methods import load_config
    from rewardbooth.training.preflight import input_folders
    from rewardbooth.training.resume import resume_changes
    from rewardbooth.training.run_dir import CONFIG_NAME, prepare_run_dir

    runs, failed = [], []
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}  # unset flags leave the subjects' settings
    for entry in entries:
        try:
            if entry.error:
                raise ConfigError(entry.error)
            saved = Path(entry.run_dir) / CONFIG_NAME
            settings = dict(entry.settings)
            if class_noun and not settings.get("data.class_noun"):
                settings["data.class_noun"] = class_noun
            if resume and config_file is None and saved.is_file():  # resume repeats each saved run
                cfg = load_config(saved, overrides)
            else:
                cfg = load_config(config_file, {**settings, **overrides})
            check_training_inputs(cfg)
            check_many_settings(cfg)
            if resume:
                resume_changes(cfg, Path(entry.run_dir))
            if create_folders:
                prepare_run_dir(Path(entry.run_dir), resume=resume, overwrite=overwrite, protected=input_folders(cfg))
            runs.append(SubjectRun(entry.name, cfg, Path(entry.run_dir)))
        except RewardboothError as exc:
            message = " ".join(str(exc).split())
            failed.append(SubjectOutcome(entry.name, Path(entry.run_dir), error=message, exception=exc))
    ready, refused = check_subjects(runs, check_inputs=False)  # names or folders given twice
    return ready, failed + refused
