"""Offline, seeded, tiny: every test runs on the CPU without a network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative_path: str, module_name: str | None = None) -> ModuleType:
    """A script outside the package (e.g. benchmarks/bench_memory.py) loaded fresh as a module; registered in
    sys.modules first because dataclasses in it look their module up."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(module_name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    # Tiny presets are built once per session, outside the user's real cache.
    if "REWARDBOOTH_CACHE" not in os.environ:
        os.environ["REWARDBOOTH_CACHE"] = str(tmp_path_factory.mktemp("rewardbooth-cache"))
    yield


@pytest.fixture(scope="session")
def subject_dir(tmp_path_factory) -> Path:
    """Five 64 px images of a MiniBench subject."""
    from rewardbooth.mini.world import make_subject

    folder = tmp_path_factory.mktemp("subject") / "toy"
    make_subject(seed=3, num_images=5, size=64).save(folder)
    return folder


@pytest.fixture
def tiny_overrides(subject_dir) -> dict:
    """A DreamBooth-LoRA run on the tiny preset small enough for seconds on a CPU."""
    return {
        "model.name": "tiny",
        "data.instance_dir": str(subject_dir),
        "data.class_noun": "toy",
        "train.steps": 6,
        "train.batch_size": 1,
        "train.learning_rate": 1e-3,
        "train.log_every": 1,
        "train.checkpoint_every": 0,
        "prior.num_class_images": 3,
        "prior.generation_steps": 2,
        "validation.every": 0,
    }


@pytest.fixture(scope="session")
def dreambench_root() -> Path:
    """The shared DreamBench copy beside the checkout (or $REWARDBOOTH_DREAMBENCH)."""
    override = os.environ.get("REWARDBOOTH_DREAMBENCH")
    root = Path(override) if override else Path(__file__).resolve().parents[2] / "shared" / "dreambench" / "dataset"
    if not (root / "prompts_and_classes.txt").is_file():
        pytest.skip(f"DreamBench not found at {root}")
    return root


def crashing(method_cls, crash_at_call: int):
    """An instance of `method_cls` that dies like a killed job on its `crash_at_call`-th loss()."""

    class Crashing(method_cls):
        def __init__(self):
            self.calls = 0

        def loss(self, ctx, generator):
            self.calls += 1
            if self.calls == crash_at_call:
                raise KeyboardInterrupt("simulated crash")
            return super().loss(ctx, generator)

    return Crashing()


def straight_and_resumed(cfg, tmp_path: Path, method_cls, crash_at_call: int, between=None):
    """Train once uninterrupted, and once crashed at `crash_at_call` then resumed.

    `between(run_dir)` runs after the crash, before the resume (e.g. to stamp cached files).
    Returns (straight run, resumed run, what `between` returned).
    """
    from rewardbooth.training.loop import train
    from rewardbooth.training.run_dir import prepare_run_dir

    straight, broken = tmp_path / "straight", tmp_path / "broken"
    for run in (straight, broken):
        prepare_run_dir(run, resume=False, overwrite=False)
    train(cfg, straight, progress=False, method=method_cls())
    with pytest.raises(KeyboardInterrupt):
        train(cfg, broken, progress=False, method=crashing(method_cls, crash_at_call))
    seen = between(broken) if between else None
    train(cfg, broken, resume=True, progress=False, method=method_cls())
    return straight, broken, seen


@pytest.fixture(name="straight_and_resumed")
def straight_and_resumed_fixture():
    return straight_and_resumed


def metric_series(run_dir: Path, key: str) -> dict[int, float]:
    """step -> value of one key in a run's metrics.jsonl."""
    from rewardbooth.training.run_dir import read_metrics

    return {r["step"]: r[key] for r in read_metrics(run_dir / "metrics.jsonl") if key in r}


@pytest.fixture(name="metric_series")
def metric_series_fixture():
    return metric_series


def recording_saved_tensors(saved: dict):
    """A saved-tensor hook context recording what autograd keeps into `saved` (storage address -> tensor), each tensor
    held until counted: a storage freed early would otherwise leave its address to a later one (training/memory.py)."""
    def pack(t):
        saved.setdefault(t.untyped_storage()._cdata, t)
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def resident_storages(ctx, method) -> set[int]:
    """The storages of the run's resident weights (the components' and the method's own modules)."""
    from rewardbooth.training import memory

    return {t.untyped_storage()._cdata for t in memory._tensors(memory.resident_modules([ctx.components, method]))}


def saved_bytes(saved: dict, excluded: set[int]) -> int:
    """Bytes of the recorded saved tensors, those in `excluded` (weights) left out."""
    return sum(t.untyped_storage().nbytes() for key, t in saved.items() if key not in excluded)
