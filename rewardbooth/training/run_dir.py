"""The run folder: its layout (RunFolder), result.json (RunResult), creation rules (never clobber a
user's files), the lock, checkpoints and metrics. Everyone who reads or writes a run folder (the
loop, the web app, the bench, the report, the demo) goes through here."""

from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from rewardbooth.errors import ConfigError, OutputExistsError
from rewardbooth.methods import method_registry

CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"
RESULT_NAME = "result.json"
HISTORY_NAME = "history.jsonl"  # one line per start and resume of the run (training/resume.py)
REPORT_NAME = "report.html"
CHECKPOINT_DIR = "checkpoints"
SAMPLES_DIR = "samples"  # validation images, samples/step-000100/
BEST_DIR = "best"  # the best validated weights under model selection
BEST_RECORD = "best.json"  # beside them: the step and score they were selected with
BUDGETS_DIR = "budgets"  # the result as it stood at train.save_steps, budgets/step-000200/
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_MARKER = "step.json"  # written last: a checkpoint without it was interrupted and is ignored
RUN_MARKER = ".rewardbooth-run"  # written only by rewardbooth, when it creates a run folder
LOCK_NAME = ".rewardbooth-lock"
STAGING_NAME = ".export-tmp"  # weights are written here, then moved into place
# The weights a run writes, and what `rewardbooth export` writes beside them by default.
WEIGHT_ENTRIES = {f"{stem}{dtype}{ext}" for stem, ext in (("pytorch_lora_weights", ".safetensors"), ("lora_kohya", ".safetensors"), ("peft", ""))
                  for dtype in ("", "_fp32", "_fp16", "_bf16")} | {"unet", "transformer", "text_encoder", "text_encoder_2"}
# What a run folder may hold; --overwrite refuses a folder with anything else in it.
# (and what methods write into it: Method.run_files, e.g. class images, negatives).
RUN_ENTRIES = {RUN_MARKER, LOCK_NAME, STAGING_NAME, CONFIG_NAME, METRICS_NAME, CHECKPOINT_DIR, SAMPLES_DIR, BEST_DIR, BUDGETS_DIR,
               REPORT_NAME, "report_assets", RESULT_NAME, HISTORY_NAME, "generated", "reference", "logs", *WEIGHT_ENTRIES}


def run_entries() -> set[str]:
    """Every name a run folder may hold: the loop's and each registered method's."""
    return RUN_ENTRIES | {name for cls in method_registry().values() for name in cls.run_files}


def step_folder(step: int) -> str:
    return f"step-{step:06d}"


@dataclass
class RunResult:
    """result.json: what a finished run trained and where its weights are."""

    method: str
    last_step: int  # the last step trained (earlier than `steps` after early stopping)
    steps: int  # train.steps the run was asked for
    selected_step: int  # the step whose weights are the result (the best validated one under selection)
    weights: str  # relative to the run folder: the LoRA file, or the folder holding the fine-tuned denoiser
    base_model: str
    resolution: int
    num_processes: int = 1
    cpu_threads: int | None = None
    flow_matching: bool | None = None  # the base is a flow model (None: written before this was recorded)

    @classmethod
    def from_json(cls, text: str) -> RunResult:
        values = json.loads(text)
        values.setdefault("steps", values.get("last_step"))  # written by versions before `steps` was recorded
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


class RunFolder:
    """The layout of one run folder; paths only, plus result.json and metrics.jsonl readers."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    config = property(lambda self: self.root / CONFIG_NAME)
    metrics = property(lambda self: self.root / METRICS_NAME)
    result = property(lambda self: self.root / RESULT_NAME)
    report = property(lambda self: self.root / REPORT_NAME)
    checkpoints = property(lambda self: self.root / CHECKPOINT_DIR)
    samples = property(lambda self: self.root / SAMPLES_DIR)
    best = property(lambda self: self.root / BEST_DIR)

    def sample_dir(self, step: int) -> Path:
        return self.samples / step_folder(step)

    def budget_dir(self, step: int) -> Path:
        return self.root / BUDGETS_DIR / step_folder(step)

    def sample_grids(self) -> list[Path]:
        """Validation grids, oldest step first."""
        return sorted(self.samples.glob("step-*/grid.png")) if self.samples.is_dir() else []

    def is_finished(self) -> bool:
        return self.result.is_file()

    def read_result(self) -> RunResult | None:
        return RunResult.from_json(self.result.read_text()) if self.result.is_file() else None

    def write_result(self, result: RunResult) -> None:
        atomic_write_text(self.result, result.to_json())

    def read_metrics(self) -> list[dict]:
        return read_metrics(self.metrics) if self.metrics.is_file() else []

    def lock_holder(self) -> str | None:
        return lock_holder(self.root) if self.root.is_dir() else None


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename: a crash or full disk leaves the old file or none, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def replace_into(source: Path, folder: Path) -> None:
    """Move every entry of `source` into `folder` (replacing same-named ones), then remove `source`."""
    for item in Path(source).iterdir():
        target = Path(folder) / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(item, target)
    shutil.rmtree(source, ignore_errors=True)


def is_run_dir(folder: Path) -> bool:
    """A folder rewardbooth made for a run (its marker), or a run of an older version (config.yaml)."""
    return (folder / RUN_MARKER).is_file() or (folder / CONFIG_NAME).is_file()


def lock_holder(run_dir: Path) -> str | None:
    """The pid holding the run folder's lock, or None when no live process holds it."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no locking
        return None
    path = run_dir / LOCK_NAME
    if not path.is_file():
        return None
    with path.open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            return f.read().strip() or "unknown"
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def _in_use(run_dir: Path, holder: str) -> OutputExistsError:
    return OutputExistsError(f"folder {run_dir} is in use by another rewardbooth process (pid {holder}); "
                             "wait for it to finish or choose another --output")


@contextmanager
def run_lock(run_dir: Path, shared: bool = False):
    """Hold the run folder for one process: an OS lock (flock), released when the process dies. `shared`: processes
    that may work in the folder together (a DreamBench bench's shards) share it; lock_holder sees any of them."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / LOCK_NAME).open("a+") as f:
        try:
            fcntl.flock(f, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            raise _in_use(run_dir, f.read().strip() or "unknown") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool, protected: list[Path] = ()) -> None:
    """Create the run folder, or refuse with a one-line reason.

    --overwrite only ever deletes a previous rewardbooth run (a folder with config.yaml), so a
    mistyped path cannot wipe a folder of photos.
    """
    run_dir = run_dir.resolve()
    for path in protected:
        path = Path(path).resolve()
        if run_dir == path or path.is_relative_to(run_dir) or run_dir.is_relative_to(path):
            raise ConfigError(f"output folder {run_dir} overlaps the input folder {path}; choose another --output")
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputExistsError(f"output {run_dir} is a file, not a folder")
    non_empty = run_dir.is_dir() and any(run_dir.iterdir())
    if run_dir.is_dir() and (holder := lock_holder(run_dir)):
        raise _in_use(run_dir, holder)
    if resume:
        if not (run_dir / CONFIG_NAME).is_file():
            raise OutputExistsError(f"cannot resume: {run_dir} is not a rewardbooth run folder (no {CONFIG_NAME})")
        (run_dir / RUN_MARKER).touch()
        return
    if non_empty:
        if not overwrite:
            raise OutputExistsError(f"output folder {run_dir} is not empty; pass --resume to continue it or --overwrite to replace it")
        if not (run_dir / RUN_MARKER).is_file():
            raise OutputExistsError(f"refusing to overwrite {run_dir}: it is not a rewardbooth run folder (no {RUN_MARKER} marker); "
                                    "delete it yourself if it is one")
        foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in run_entries())
        if foreign:
            raise OutputExistsError(f"refusing to overwrite {run_dir}: it holds {', '.join(foreign[:3])}, which rewardbooth "
                                    "never writes; move them out or choose another --output")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_MARKER).write_text(json.dumps({"rewardbooth": "run"}) + "\n")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"{CHECKPOINT_PREFIX}{step:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Completed checkpoints, oldest first (a checkpoint is complete once its step.json exists)."""
    folder = run_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        if path.name.startswith(CHECKPOINT_PREFIX) and (path / CHECKPOINT_MARKER).is_file():
            found.append((int(path.name[len(CHECKPOINT_PREFIX):]), path))
    return sorted(found)


def prune_checkpoints(run_dir: Path, keep: int | None, protect: set[int] = frozenset()) -> None:
    if keep is None:
        return
    checkpoints = [c for c in list_checkpoints(run_dir) if c[0] not in protect]
    for _, path in checkpoints[: max(len(checkpoints) - keep, 0)]:
        shutil.rmtree(path, ignore_errors=True)


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step, flushed line by line."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so the log matches the weights."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short when the run was killed
            if record.get("step", 0) <= step:
                kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        """Strict JSON: a NaN/inf value is written as null and its key listed under "nonfinite"."""
        if not self.enabled:
            return
        bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            record = {**{k: None if k in bad else v for k, v in record.items()}, "nonfinite": bad}
        with self.path.open("a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")


def seconds_at(run_dir: Path, step: int, clock: str = "wall") -> float | None:
    """Seconds the run had spent when it reached `step` (set-up, training and validation, summed over resumes), on
    `clock`: "wall" (metrics' `wall_seconds`) or "cpu" (`cpu_seconds`: the process's CPU time, logged only where the
    process trained the run alone on the CPU), at the first logged step at or after it; None where not logged."""
    records = [r for r in RunFolder(run_dir).read_metrics() if "wall_seconds" in r and not r.get("validation")]
    after = [r for r in records if r["step"] >= step]
    value = min(after, key=lambda r: r["step"]).get(f"{clock}_seconds") if after else None
    return None if value is None else float(value)


def read_metrics(path: Path) -> list[dict]:
    """Read metrics.jsonl; a corrupt last line (run killed mid-write) is skipped."""
    path = Path(path)
    lines = [(i, line) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    records: list[dict] = []
    for index, (lineno, line) in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:  # JSONDecodeError is a ValueError
            if index == len(lines) - 1:
                break
            raise ValueError(f"{path}:{lineno}: not a valid metrics record ({exc})") from exc
        records.append(record)
    return records
