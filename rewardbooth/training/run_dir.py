"""The run folder: creation rules (never clobber a user's files), checkpoints, metrics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from rewardbooth.errors import ConfigError, OutputExistsError

CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"


def is_run_dir(folder: Path) -> bool:
    return (folder / CONFIG_NAME).is_file()


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
    if resume:
        if not is_run_dir(run_dir):
            raise OutputExistsError(f"cannot resume: {run_dir} is not a rewardbooth run folder (no {CONFIG_NAME})")
        return
    if non_empty:
        if not overwrite:
            raise OutputExistsError(f"output folder {run_dir} is not empty; pass --resume to continue it or --overwrite to replace it")
        if not is_run_dir(run_dir):
            raise OutputExistsError(f"refusing to overwrite {run_dir}: it is not a rewardbooth run folder (no {CONFIG_NAME})")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINT_DIR / f"{CHECKPOINT_PREFIX}{step:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Completed checkpoints, oldest first (a checkpoint is complete once its step.json exists)."""
    folder = run_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        if path.name.startswith(CHECKPOINT_PREFIX) and (path / "step.json").is_file():
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
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
