"""Resuming a run under other settings. A resume continues the weights trained so far, so only settings
that leave those weights the same run's may differ from the run's own (its config.yaml, and its input
photos by content); anything else is refused, by default, before anything is written. Every start and
resume of a run is one line of its history.jsonl: when, from which step, which allowed settings changed, and
which rewardbooth (a resume by another version warns)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from rewardbooth.config import RunConfig
from rewardbooth.data.images import list_image_files
from rewardbooth.errors import ConfigError
from rewardbooth.methods import load_config, method_registry
from rewardbooth.provenance import code_version, warn_other_code
from rewardbooth.training.run_dir import CONFIG_NAME, HISTORY_NAME, list_checkpoints, read_metrics

# What a resume MAY change, and why that leaves the run the same; every other setting is refused (a new
# setting too, until it is listed here).
MAY_CHANGE = {
    "train.steps": "how long to train: the usual reason to resume",
    "validation.patience": "when to stop early, like train.steps",
    "train.checkpoint_every": "when the state is saved, not what it is",
    "train.checkpoints_total_limit": "how many checkpoints are kept",
    "train.save_steps": "which intermediate results are copied out",
    "train.log_every": "how often losses are written down",
    "train.report_to": "where losses are also written",
    "validation.every": "how often samples are looked at; the weights never see them",
    "validation.num_images": "how many samples are looked at",
    "validation.batch_size": "images per sampler call; each image keeps its seed",
    "train.on_nonfinite": "what a NaN step does; finite steps train the same",
    "train.max_nonfinite_steps": "likewise",
    "train.gradient_checkpointing": "memory traded for compute; the same numbers",
    "model.offload_text_encoders": "where the frozen encoders wait; the same numbers",
    "data.cache_latents": "class latents kept on disk or encoded again; the same numbers",
    "data.min_image_size": "a check of the photos, which are compared by content",
    "data.instance_dir": "the folder may move: its photos are compared by content (INPUT_FOLDERS)",
    "prior.class_dir": "the folder may move: its photos are compared by content (INPUT_FOLDERS)",
    "evaluation.extra_rewards": "rewards reported beside the scores, never trained on",
}
# What a resume may change while no validation picks the run's result: validation's samples are then only looked at.
# Under selection (validation.select or a method's own selection metric) they are scored against the samples
# before the resume, so these are refused there like any setting that changes the result.
MAY_CHANGE_UNLESS_SELECTING = {
    "validation.prompts": "what the samples show; the weights never see them",
    "validation.steps": "how the samples are drawn",
    "validation.guidance_scale": "how the samples are drawn",
}
INPUT_FOLDERS = ("data.instance_dir", "prior.class_dir")


def folder_content(folder: str | None) -> dict | None:
    """An input folder's images by content (not by name or place): their count and a hash in file-name order."""
    if not folder or not Path(folder).is_dir():
        return None
    files = list_image_files(folder)
    digest = hashlib.sha256(b"".join(hashlib.sha256(path.read_bytes()).digest() for path in files))
    return {"images": len(files), "sha256": digest.hexdigest()}


def input_contents(cfg: RunConfig) -> dict[str, dict | None]:
    settings = cfg.to_flat_dict()
    return {key: folder_content(settings[key]) for key in INPUT_FOLDERS}


def last_recorded(run_dir: Path, key: str) -> Any:
    """`key` of the run's latest start or resume that recorded it in history.jsonl (None: none did)."""
    path = Path(run_dir) / HISTORY_NAME
    records = read_metrics(path) if path.is_file() else []  # JSON lines, as metrics.jsonl
    return next((r[key] for r in reversed(records) if key in r), None)


def recorded_inputs(run_dir: Path) -> dict[str, dict | None] | None:
    """The input contents the run last started or resumed with (None: a run from before history.jsonl)."""
    return last_recorded(run_dir, "inputs")


def _shown(content: dict | None) -> str:
    return f"{content['images']} images sha256 {content['sha256'][:12]}" if content else "no images"


def resume_changes(cfg: RunConfig, run_dir: Path) -> dict[str, list]:
    """The allowed settings `cfg` changes from the run in `run_dir` ({key: [old, new]}); a ConfigError naming
    every other difference, old and new. Nothing to compare (no config.yaml yet): {}."""
    saved = Path(run_dir) / CONFIG_NAME
    if not saved.is_file():
        return {}
    run_cfg = load_config(saved)
    old, new = run_cfg.to_flat_dict(), cfg.to_flat_dict()
    # Another method's section is read by no one in this run.
    unused = tuple(f"{cls.section}." for cls in method_registry().values() if cls.section and cls.name != run_cfg.train.method)
    changed = {key: [old.get(key), value] for key, value in new.items() if old.get(key) != value and not key.startswith(unused)}
    selecting = bool(method_registry()[run_cfg.train.method].selection_metric or run_cfg.validation.select)
    allowed = MAY_CHANGE if selecting else {**MAY_CHANGE, **MAY_CHANGE_UNLESS_SELECTING}
    refused = [f"{key} {was} -> {now}" + (" (selection scores the samples)" if key in MAY_CHANGE_UNLESS_SELECTING else "")
               for key, (was, now) in changed.items() if key not in allowed]
    before, after = recorded_inputs(run_dir) or input_contents(run_cfg), input_contents(cfg)
    refused += [f"the photos of {key} {_shown(before.get(key))} -> {_shown(after[key])}" for key in INPUT_FOLDERS
                if before.get(key) != after[key]]
    if refused:
        refused.sort(key=lambda text: not text.startswith("train.method "))  # the method first: the largest change
        raise ConfigError(f"--resume: {run_dir} was trained with other settings: {'; '.join(refused)} (they change what is "
                          "trained: start a new --output, or resume with the run's settings)")
    return changed


def record_run_start(cfg: RunConfig, run_dir: Path, resume: bool, write: bool = True) -> None:
    """Refuse a resume under other settings (resume_changes), then add this start or resume to history.jsonl
    (`write`: this process keeps the run folder)."""
    changed = resume_changes(cfg, run_dir) if resume else {}
    if not write:
        return
    record: dict[str, Any] = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": "resume" if resume else "start"}
    if resume:
        checkpoints = list_checkpoints(Path(run_dir))
        record.update(from_step=checkpoints[-1][0] if checkpoints else 0, changed=changed)
        warn_other_code(last_recorded(run_dir, "code"), f"--resume: {run_dir} was trained so far by")
    record["inputs"] = input_contents(cfg)
    record["code"] = code_version()
    with (Path(run_dir) / HISTORY_NAME).open("a") as f:
        f.write(json.dumps(record) + "\n")
