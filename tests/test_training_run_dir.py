"""Run folders: --overwrite deletes only rewardbooth's own runs, one process per folder, and a
finished run resumed is finished (or continues with more steps)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from rewardbooth.cli import main
from rewardbooth.errors import CheckpointError, OutputExistsError
from rewardbooth.methods import load_config
from rewardbooth.models.lora import LORA_WEIGHTS_NAME
from rewardbooth.training.loop import train
from rewardbooth.training.run_dir import RUN_MARKER, lock_holder, prepare_run_dir, run_lock


def test_overwrite_refuses_a_user_folder_that_merely_has_a_config_yaml(tmp_path, capsys):
    project = tmp_path / "thesis"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('hi')\n")
    (project / "thesis.tex").write_text("\\documentclass{article}\n")
    (project / "config.yaml").write_text("train: {steps: 1}\n")
    with pytest.raises(OutputExistsError, match="not a rewardbooth run folder"):
        prepare_run_dir(project, resume=False, overwrite=True)
    assert main(["train", "--model", "tiny", "--output", str(project), "--overwrite", "--instance-dir", str(tmp_path),
                 "--class-noun", "toy"]) != 0
    assert (project / "thesis.tex").is_file() and (project / "src" / "main.py").is_file()


def test_overwrite_refuses_a_run_folder_holding_user_files(tmp_path):
    run = tmp_path / "run"
    prepare_run_dir(run, resume=False, overwrite=False)
    assert (run / RUN_MARKER).is_file()
    (run / "config.yaml").write_text("x: 1\n")
    (run / "my_notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="my_notes.txt"):
        prepare_run_dir(run, resume=False, overwrite=True)
    assert (run / "my_notes.txt").read_text() == "keep me"
    (run / "my_notes.txt").unlink()
    prepare_run_dir(run, resume=False, overwrite=True)  # only rewardbooth's own files: replaced
    assert not (run / "config.yaml").exists() and (run / RUN_MARKER).is_file()


HOLD_LOCK = """
import sys, time
from pathlib import Path
from rewardbooth.training.run_dir import run_lock
with run_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(60)
"""


@pytest.mark.slow
def test_a_second_process_on_the_same_run_folder_is_refused(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    prepare_run_dir(run, resume=False, overwrite=False)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg = load_config(overrides=dict(tiny_overrides, **{"train.steps": 1}))
        for attempt in (lambda: prepare_run_dir(run, resume=True, overwrite=False),
                        lambda: prepare_run_dir(run, resume=False, overwrite=True),
                        lambda: train(cfg, run, progress=False)):
            with pytest.raises(OutputExistsError, match=f"in use by another rewardbooth process \\(pid {holder.pid}\\)"):
                attempt()
    finally:
        holder.kill()
        holder.wait()
    # The lock died with its process (kill -9 leaves no stale lock).
    time.sleep(0.1)
    train(load_config(overrides=dict(tiny_overrides, **{"train.steps": 1})), run, progress=False)


def test_shared_holders_work_in_a_folder_together_and_keep_an_exclusive_one_out(tmp_path):
    """A DreamBench bench's shards share its folder; a training run (or a mini bench) holds its own alone."""
    folder = tmp_path / "bench"
    with run_lock(folder, shared=True), run_lock(folder, shared=True):
        assert lock_holder(folder) == str(os.getpid())
        with pytest.raises(OutputExistsError, match="in use by another rewardbooth process"):
            with run_lock(folder):
                pass
    assert lock_holder(folder) is None
    with run_lock(folder):
        with pytest.raises(OutputExistsError, match="in use"):
            with run_lock(folder, shared=True):
                pass


@pytest.mark.slow
def test_resuming_a_finished_run_trains_nothing_and_more_steps_continue(tmp_path, tiny_overrides, metric_series):
    common = dict(tiny_overrides, **{"train.checkpoint_every": 2})
    run, straight = tmp_path / "run", tmp_path / "straight"
    for folder in (run, straight):
        prepare_run_dir(folder, resume=False, overwrite=False)
    train(load_config(overrides=dict(common, **{"train.steps": 4})), run, progress=False)
    weights = (run / LORA_WEIGHTS_NAME).read_bytes()
    result = train(load_config(overrides=dict(common, **{"train.steps": 4})), run, resume=True, progress=False)
    assert result.already_finished and result.final_step == 4
    assert (run / LORA_WEIGHTS_NAME).read_bytes() == weights  # not retrained from step 0

    # More steps: continues from step 4 and ends where one uninterrupted 6-step run ends.
    more = train(load_config(overrides=dict(common, **{"train.steps": 6})), run, resume=True, progress=False)
    assert not more.already_finished and more.final_step == 6
    train(load_config(overrides=dict(common, **{"train.steps": 6})), straight, progress=False)
    assert sorted(metric_series(run, "loss")) == list(range(1, 7))
    assert metric_series(run, "loss") == pytest.approx(metric_series(straight, "loss"), rel=1e-5)
    a, b = load_file(run / LORA_WEIGHTS_NAME), load_file(straight / LORA_WEIGHTS_NAME)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_a_finished_run_without_checkpoints_cannot_silently_restart(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    prepare_run_dir(run, resume=False, overwrite=False)
    train(load_config(overrides=dict(tiny_overrides, **{"train.steps": 2})), run, progress=False)  # checkpoint_every 0
    weights = (run / LORA_WEIGHTS_NAME).read_bytes()
    with pytest.raises(CheckpointError, match="without a checkpoint"):
        train(load_config(overrides=dict(tiny_overrides, **{"train.steps": 4})), run, resume=True, progress=False)
    assert (run / LORA_WEIGHTS_NAME).read_bytes() == weights


def test_cli_resume_of_a_finished_run_says_so(tmp_path, subject_dir, capsys):
    run = tmp_path / "run"
    argv = ["train", "--model", "tiny", "--instance-dir", str(subject_dir), "--class-noun", "toy", "--output", str(run),
            "--steps", "2", "--num-class-images", "2", "--quiet", "--set", "prior.generation_steps=2", "--set", "validation.every=0"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    assert "already finished (2 steps" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated trainable_0.safetensors", "garbage optimizer.bin"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, tiny_overrides, straight_and_resumed, metric_series, damage):
    cfg = load_config(overrides=dict(tiny_overrides, **{"train.steps": 6, "train.checkpoint_every": 2,
                                                       "train.checkpoints_total_limit": 3}))
    from rewardbooth.methods.dreambooth import DreamBooth

    def break_newest(broken):
        newest = sorted((broken / "checkpoints").iterdir())[-1]
        assert newest.name == "checkpoint-000004"
        if damage.startswith("truncated"):
            path = newest / "trainable_0.safetensors"
            path.write_bytes(path.read_bytes()[:100])
        else:
            (newest / "optimizer.bin").write_bytes(b"not a torch file at all")

    with pytest.warns(UserWarning, match=damage.split()[1]):
        straight, broken, _ = straight_and_resumed(cfg, tmp_path, DreamBooth, 5, break_newest)
    assert metric_series(broken, "loss") == pytest.approx(metric_series(straight, "loss"), rel=1e-5)


@pytest.mark.slow
def test_a_full_disk_at_the_final_save_is_one_line_and_resumable(tmp_path, subject_dir, capsys, monkeypatch):
    import errno

    import rewardbooth.training.weights as loop

    run = tmp_path / "run"
    argv = ["train", "--model", "tiny", "--instance-dir", str(subject_dir), "--class-noun", "toy", "--output", str(run),
            "--steps", "2", "--num-class-images", "2", "--quiet", "--checkpoint-every", "1",
            "--set", "prior.generation_steps=2", "--set", "validation.every=0"]
    real = loop.save_lora

    def full_disk(folder, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / LORA_WEIGHTS_NAME))

    monkeypatch.setattr(loop, "save_lora", full_disk)
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and LORA_WEIGHTS_NAME in err
    assert not (run / LORA_WEIGHTS_NAME).exists()
    monkeypatch.setattr(loop, "save_lora", real)
    assert main([*argv, "--resume"]) == 0  # the final checkpoint survived: only the export is redone
    assert (run / LORA_WEIGHTS_NAME).is_file()
