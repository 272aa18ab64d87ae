"""Resuming a run under other settings: what changes the training is refused (one line, exit 2, the run
folder untouched); bookkeeping settings may change and are recorded in the run's history."""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path

import pytest
from conftest import crashing
from PIL import Image

from rewardbooth.cli import main
from rewardbooth.errors import ConfigError
from rewardbooth.methods import load_config
from rewardbooth.methods.dreambooth import DreamBooth
from rewardbooth.training import loop
from rewardbooth.training.loop import train
from rewardbooth.training.resume import resume_changes
from rewardbooth.training.run_dir import CONFIG_NAME, HISTORY_NAME, LOCK_NAME, prepare_run_dir, read_metrics, seconds_at


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def interrupted_run(root: Path, photos: Path, **settings) -> Path:
    """A DreamBooth run on `photos` stopped after step 2 of 4 (checkpoint at step 2, no result yet)."""
    overrides = {"model.name": "tiny", "data.instance_dir": str(photos), "data.class_noun": "toy", "train.steps": 4,
                 "train.learning_rate": 1e-3, "train.log_every": 1, "train.checkpoint_every": 2, "prior.num_class_images": 2,
                 "prior.generation_steps": 2, "validation.every": 0, **settings}
    run = root / "run"
    prepare_run_dir(run, resume=False, overwrite=False)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, overrides), run, progress=False, method=crashing(DreamBooth, 3))
    return run


@pytest.fixture(scope="module")
def photos(tmp_path_factory, subject_dir) -> Path:
    folder = tmp_path_factory.mktemp("photos") / "toy"
    shutil.copytree(subject_dir, folder)
    return folder


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, photos) -> Path:
    """Shared by the refusals, which must leave it as it is; tests that resume work on a copy."""
    return interrupted_run(tmp_path_factory.mktemp("stopped"), photos)


def refused(capsys, run: Path, *flags: str) -> str:
    before = snapshot(run)
    code = main(["train", "--resume", "--output", str(run), "--quiet", *flags])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert snapshot(run) == before  # config.yaml, checkpoints, metrics.jsonl: nothing written or changed
    return lines[0]


def test_another_method_is_refused_naming_old_and_new(capsys, stopped):
    line = refused(capsys, stopped, "--method", "rpo")
    assert "train.method" in line and "dreambooth" in line and "rpo" in line


def test_another_learning_rate_or_rank_is_refused(capsys, stopped):
    line = refused(capsys, stopped, "--lr", "0.01", "--rank", "8")
    assert "train.learning_rate 0.001 -> 0.01" in line and "adapter.rank 4 -> 8" in line


def test_the_library_refuses_too_before_writing(stopped):
    """bench and library users resume through train(): the same check, before config.yaml is rewritten."""
    before = snapshot(stopped)
    with pytest.raises(ConfigError, match="train.method dreambooth -> rpo"):
        train(load_config(stopped / CONFIG_NAME, {"train.method": "rpo"}), stopped, resume=True, progress=False)
    assert {k: v for k, v in snapshot(stopped).items() if k != LOCK_NAME} == {k: v for k, v in before.items() if k != LOCK_NAME}


def test_photos_are_compared_by_content_not_by_folder(capsys, tmp_path, stopped, photos):
    first = min(photos.iterdir())
    kept = first.read_bytes()
    try:  # the same folder, other photos: a changed, an added and a removed one
        Image.new("RGB", (64, 64), "red").save(first)
        assert "the photos of data.instance_dir" in refused(capsys, stopped)
        first.write_bytes(kept)
        shutil.copy(first, photos / "zz-extra.png")
        line = refused(capsys, stopped)
        assert "5 images" in line and "-> 6 images" in line
        (photos / "zz-extra.png").unlink()
        first.unlink()
        assert "-> 4 images" in refused(capsys, stopped)
    finally:
        first.write_bytes(kept)
        (photos / "zz-extra.png").unlink(missing_ok=True)
    # The same photos in another folder: the same run.
    moved, run = tmp_path / "moved", tmp_path / "run"
    shutil.copytree(photos, moved)
    shutil.copytree(stopped, run)
    assert main(["train", "--resume", "--output", str(run), "--instance-dir", str(moved), "--quiet"]) == 0
    assert history(run)[-1]["changed"] == {"data.instance_dir": [str(photos.resolve()), str(moved.resolve())]}
    assert load_config(run / CONFIG_NAME).data.instance_dir == str(moved.resolve())


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / HISTORY_NAME).read_text().splitlines()]


def process_clock_marks(monkeypatch) -> dict:
    """Filled as training runs: this process's CPU clock as a run starts ("start") and as each step (its index) begins."""
    marks, real_start, real_generator = {}, loop.record_run_start, loop.step_generator

    def record_run_start(*args, **kwargs):
        marks["start"] = time.process_time()
        return real_start(*args, **kwargs)

    def step_generator(seed, step, micro, process):
        marks[step] = time.process_time()
        return real_generator(seed, step, micro, process)

    monkeypatch.setattr(loop, "record_run_start", record_run_start)
    monkeypatch.setattr(loop, "step_generator", step_generator)
    return marks


def test_more_steps_are_allowed_and_recorded(capsys, tmp_path, stopped, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    marks = process_clock_marks(monkeypatch)
    assert main(["train", "--resume", "--output", str(run), "--steps", "6", "--quiet"]) == 0
    # CPU seconds go on from the stopped process's share: at step 3 that share plus this process's CPU time from its
    # start (set-up, the checkpoint's restore) into step 3, not this process's alone.
    cpu = [seconds_at(run, step, clock="cpu") for step in range(1, 7)]
    assert all(s > 0 for s in cpu) and cpu == sorted(cpu) and cpu[2] - cpu[1] >= marks[2] - marks["start"]
    assert json.loads((run / "result.json").read_text())["last_step"] == 6
    assert max(r["step"] for r in read_metrics(run / "metrics.jsonl")) == 6
    start, resume = history(run)
    assert start["event"] == "start" and start["inputs"]["data.instance_dir"]["images"] == 5
    assert (resume["event"], resume["from_step"], resume["changed"]) == ("resume", 2, {"train.steps": [4, 6]})
    assert load_config(run / CONFIG_NAME).train.steps == 6
    # A finished run is no door to another method either.
    capsys.readouterr()
    assert "train.method dreambooth -> rpo" in refused(capsys, run, "--method", "rpo")


def test_a_resume_by_other_code_warns_and_each_start_records_its_code(tmp_path, stopped):
    """Resuming after an upgrade is allowed, but the run's numbers then come from two versions: said out loud."""
    from rewardbooth.provenance import code_version

    same, run = tmp_path / "same", tmp_path / "run"
    shutil.copytree(stopped, same)
    shutil.copytree(stopped, run)
    [start] = history(run)
    assert start["code"] == code_version() and start["code"]["version"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["train", "--resume", "--output", str(same), "--quiet"]) == 0
    assert not [w for w in seen if "mix the two" in str(w.message)]  # the same code: no warning
    older = {**start, "code": {"version": "0.0.9", "commit": "0123456789abcdef"}}
    (run / HISTORY_NAME).write_text(json.dumps(older) + "\n")
    with pytest.warns(UserWarning, match="was trained so far by rewardbooth 0.0.9 \\(commit 0123456789\\).*mix the two"):
        assert main(["train", "--resume", "--output", str(run), "--quiet"]) == 0
    assert history(run)[-1]["code"] == code_version()


def test_validation_samples_may_change_unless_they_pick_the_result(tmp_path, stopped):
    """Without selection validation's prompts are only looked at; under it they score the kept step, so refused."""
    change = {"validation.prompts": ["a {identifier} {class_noun} in the snow"], "validation.guidance_scale": 3.0}
    cfg = load_config(stopped / CONFIG_NAME, change)
    assert set(resume_changes(cfg, stopped)) == set(change)
    selecting = tmp_path / "run"
    shutil.copytree(stopped, selecting)
    (selecting / CONFIG_NAME).write_text(load_config(stopped / CONFIG_NAME, {"validation.select": True}).to_yaml())
    with pytest.raises(ConfigError, match=r"validation.prompts .* validation.guidance_scale 7.5 -> 3.0 \(selection scores"):
        resume_changes(load_config(selecting / CONFIG_NAME, change), selecting)


def test_resume_alone_reuses_the_runs_config(tmp_path, stopped):
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    assert main(["train", "--resume", "--output", str(run), "--quiet"]) == 0
    assert json.loads((run / "result.json").read_text())["last_step"] == 4
    assert history(run)[-1]["changed"] == {} and (run / CONFIG_NAME).read_bytes() == (stopped / CONFIG_NAME).read_bytes()


def test_a_flow_model_run_is_guarded_alike(capsys, tmp_path, photos):
    run = interrupted_run(tmp_path, photos, **{"model.name": "tiny-flux", "data.resolution": 64, "prior.enabled": False})
    line = refused(capsys, run, "--set", "flow.weighting=uniform", "--rank", "8")
    assert "flow.weighting logit_normal -> uniform" in line and "adapter.rank 4 -> 8" in line
