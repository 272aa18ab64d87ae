"""A diverging run stops at the step it diverges (or skips it): never a success, never NaN weights or NaN JSON."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from rewardbooth.cli import main
from rewardbooth.errors import Stopped, TrainingDiverged
from rewardbooth.methods import dpg as dpg_module
from rewardbooth.methods import load_config
from rewardbooth.methods import rpo as rpo_module
from rewardbooth.methods.dreambooth import DreamBooth
from rewardbooth.training.loop import Trainer, train
from rewardbooth.training.run_dir import list_checkpoints, prepare_run_dir


def strict_records(run_dir) -> list[dict]:
    """metrics.jsonl as strict JSON: Python's json accepts NaN and Infinity, which JSON does not."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_args(overrides: dict, run_dir) -> list[str]:
    return ["train", "--output", str(run_dir), "--quiet", *(a for k, v in overrides.items() for a in ("--set", f"{k}={v}"))]


def nan_at(monkeypatch, owner, name: str, steps: set[int], poison):
    """Replace owner.name by a wrapper whose arguments `poison` turns NaN on the given calls (one call per step
    here: no accumulation), so a test knows the step a run diverges at."""
    original, calls = getattr(owner, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        return original(*poison(*args), **kwargs) if len(calls) in steps else original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


@pytest.fixture
def nan_instance_loss_at(monkeypatch):
    """DreamBooth's instance errors NaN at these steps; the prior half stays finite."""
    def poison(self, ctx, errors, timesteps, b):
        return self, ctx, torch.cat([errors[:b] * float("nan"), errors[b:]]), timesteps, b

    return lambda *steps: nan_at(monkeypatch, DreamBooth, "combine", set(steps), poison)


@pytest.mark.parametrize("model", ["tiny", "tiny-flux"])
def test_a_nan_stops_the_run_at_its_step_keeping_the_last_finite_checkpoint(tmp_path, capsys, tiny_overrides,
                                                                             nan_instance_loss_at, model):
    overrides = dict(tiny_overrides, **{"model.name": model, "data.resolution": 64 if model == "tiny-flux" else 32,
                                        "train.steps": 8, "train.checkpoint_every": 2, "train.checkpoints_total_limit": 5})
    nan_instance_loss_at(6)  # a checkpoint step: its state is never saved
    run = tmp_path / "run"
    code = main(train_args(overrides, run))
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 3, captured
    assert len(lines) == 1 and lines[0].startswith("rewardbooth: error: training diverged at step 6: "), lines
    assert "loss_instance nan" in lines[0] and "loss_prior " in lines[0] and "(step 4)" in lines[0], lines[0]
    assert "trained" not in captured.out
    assert [step for step, _ in list_checkpoints(run)] == [2, 4]  # the finite ones
    # No result: no weights file or folder, no result.json claiming success.
    assert not any((run / name).exists() for name in ("result.json", "pytorch_lora_weights.safetensors", "unet", "transformer",
                                                      "lora_kohya.safetensors"))

    records = strict_records(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) for r in records[:5]) and "nonfinite" not in records[4]
    last = records[-1]
    assert last["loss"] is None and last["loss_instance"] is None and math.isfinite(last["loss_prior"])
    assert set(last["nonfinite"]) == {"loss", "loss_instance", "grad_norm"}


class Snapshots(DreamBooth):
    """DreamBooth that keeps the trained weights as they are at the start of each step."""

    def __init__(self):
        self.seen = []

    def loss(self, ctx, generator):
        unet = ctx.accelerator.unwrap_model(ctx.unet)
        self.seen.append({n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad})
        return super().loss(ctx, generator)


def test_skip_leaves_the_weights_counts_and_stops_after_max_in_a_row(tmp_path, tiny_overrides, nan_instance_loss_at):
    cfg = load_config(overrides=dict(tiny_overrides, **{"train.steps": 10, "train.checkpoint_every": 5, "train.on_nonfinite": "skip",
                                                        "train.max_nonfinite_steps": 3}))
    nan_instance_loss_at(3, 6, 7, 8)
    run = tmp_path / "run"
    prepare_run_dir(run, resume=False, overwrite=False)
    method = Snapshots()
    with pytest.raises(TrainingDiverged, match=r"^training diverged at step 8: loss is nan .*3 steps in a row.*step 5\) is kept"):
        train(cfg, run, progress=False, method=method)
    weights = method.seen  # before steps 1..8

    def unchanged(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    assert unchanged(weights[2], weights[3]) and not unchanged(weights[1], weights[2])  # step 3 skipped, step 2 stepped
    assert unchanged(weights[5], weights[6]) and unchanged(weights[6], weights[7])
    assert all(torch.isfinite(v).all() for w in weights for v in w.values())
    assert [step for step, _ in list_checkpoints(run)] == [5]
    assert not (run / "result.json").exists() and not (run / "pytorch_lora_weights.safetensors").exists()
    records = {r["step"]: r for r in strict_records(run)}
    assert sorted(records) == list(range(1, 9))
    assert [s for s, r in records.items() if r.get("skipped_nonfinite")] == [3, 6, 7, 8]
    assert records[3]["loss_instance"] is None and "loss_instance" in records[3]["nonfinite"] and "nonfinite" not in records[4]


class NaNGradient(DreamBooth):
    """Finite losses, but a NaN gradient on the step `at` (as a bad backward would give)."""

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def loss(self, ctx, generator):
        self.calls += 1
        if self.calls == self.at:
            first = next(p for p in ctx.accelerator.unwrap_model(ctx.unet).parameters() if p.requires_grad)
            handle = first.register_hook(lambda grad: (handle.remove(), grad * float("nan"))[1])
        return super().loss(ctx, generator)


def test_a_nan_gradient_norm_stops_the_run_too(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    prepare_run_dir(run, resume=False, overwrite=False)
    with pytest.raises(TrainingDiverged, match=r"^training diverged at step 3: grad_norm is nan \(loss \d"):
        train(load_config(overrides=tiny_overrides), run, progress=False, method=NaNGradient(3))
    last = strict_records(run)[-1]
    assert last["step"] == 3 and last["nonfinite"] == ["grad_norm"] and math.isfinite(last["loss"])


def test_weights_that_overflow_after_a_finite_step_are_never_checkpointed(tmp_path, tiny_overrides):
    def overflow(optimizer, args, kwargs):
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].fill_(float("inf"))

    calls = []
    handle = register_optimizer_step_post_hook(overflow)
    run = tmp_path / "run"
    prepare_run_dir(run, resume=False, overwrite=False)
    try:
        with pytest.raises(TrainingDiverged, match=r"^training diverged at step 2: the trained weights are NaN/inf; no checkpoint"):
            train(load_config(overrides=dict(tiny_overrides, **{"train.checkpoint_every": 2})), run, progress=False)
    finally:
        handle.remove()
    assert list_checkpoints(run) == [] and not (run / "result.json").exists()


def test_one_skipped_step_still_finishes_the_run(tmp_path, tiny_overrides, nan_instance_loss_at):
    cfg = load_config(overrides=dict(tiny_overrides, **{"train.on_nonfinite": "skip"}))
    nan_instance_loss_at(2)
    run = tmp_path / "run"
    prepare_run_dir(run, resume=False, overwrite=False)
    result = train(cfg, run, progress=False)
    assert result.final_step == 6 and (run / "result.json").is_file()
    assert [r["step"] for r in strict_records(run) if r.get("skipped_nonfinite")] == [2]


@pytest.mark.parametrize("setting", ["train.on_nonfinite=ignore", "train.max_nonfinite_steps=0"])
def test_bad_settings_are_refused(tmp_path, capsys, tiny_overrides, setting):
    assert main(train_args(tiny_overrides, tmp_path / "run") + ["--set", setting]) == 2
    assert setting.split("=")[0] in capsys.readouterr().err


# --- each method's own losses ------------------------------------------------------------------------
DPG = {"train.method": "dpg", "adapter.kind": "lora", "data.resolution": 32, "data.center_crop": True, "train.steps": 4,
       "evaluation.dino_model": "tiny", "evaluation.clip_model": "tiny", "evaluation.align_model": "tiny"}
RPO = {"train.method": "rpo", "adapter.kind": "lora", "data.resolution": 32, "train.steps": 4, "rpo.negatives_per_prompt": 1,
       "rpo.negative_steps": 2, "evaluation.align_model": "tiny", "evaluation.clip_model": "tiny"}


def nan_prediction(prediction, target):
    return prediction * float("nan"), target


def test_a_nan_critic_loss_stops_dpg(tmp_path, tiny_overrides, monkeypatch):
    nan_at(monkeypatch, dpg_module, "critic_regression_loss", {3}, nan_prediction)
    run = tmp_path / "run"
    prepare_run_dir(run, resume=False, overwrite=False)
    with pytest.raises(TrainingDiverged, match=r"^training diverged at step 3: critic_loss is nan \(loss \d"):
        train(load_config(overrides=dict(tiny_overrides, **DPG)), run, progress=False)
    assert strict_records(run)[-1]["nonfinite"] == ["critic_loss"]


def test_a_skipped_nan_critic_loss_leaves_the_critic_finite(tmp_path, tiny_overrides, monkeypatch):
    nan_at(monkeypatch, dpg_module, "critic_regression_loss", {2}, nan_prediction)
    run = tmp_path / "run"
    prepare_run_dir(run, resume=False, overwrite=False)
    trainer = Trainer(load_config(overrides=dict(tiny_overrides, **DPG, **{"train.on_nonfinite": "skip"})), run, progress=False)
    assert trainer.run().final_step == 4
    assert all(torch.isfinite(p).all() for p in trainer.method.actor.critic.parameters())
    assert trainer.method.actor.critic_steps == 3  # the NaN one was not stepped
    assert [r["step"] for r in strict_records(run) if r.get("skipped_nonfinite")] == [2]


def test_a_nan_preference_term_stops_rpo(tmp_path, tiny_overrides, monkeypatch):
    nan_at(monkeypatch, rpo_module, "preference_loss", {2}, lambda e_model, e_ref, labels, beta: (e_model, e_ref, labels, float("nan")))
    run = tmp_path / "run"
    prepare_run_dir(run, resume=False, overwrite=False)
    with pytest.raises(TrainingDiverged, match=r"^training diverged at step 2: loss is nan \(.*loss_preference nan"):
        train(load_config(overrides=dict(tiny_overrides, **RPO)), run, progress=False)
    assert not (run / "result.json").exists()


# --- the bench ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_bench_counts_a_diverged_subject_as_failed(tmp_path, capsys, dreambench_root, monkeypatch):
    """dog diverges, backpack trains: one scored subject, one failed one, shown as failed and never retried."""
    original = DreamBooth.combine

    def combine(self, ctx, errors, timesteps, b):
        if ctx.cfg.data.instance_dir.endswith("dog"):
            errors = errors * float("nan")
        return original(self, ctx, errors, timesteps, b)

    monkeypatch.setattr(DreamBooth, "combine", combine)
    out = tmp_path / "bench"
    args = ["bench", "--dreambench", str(dreambench_root), "--subjects", "backpack,dog", "-k", "1", "--sample-steps", "2",
            "--model", "tiny", "--steps", "2", "--set", "prior.num_class_images=2", "--set", "prior.generation_steps=2",
            "--output", str(out), "--quiet", "--dino-model", "tiny", "--clip-model", "tiny", "--device", "cpu"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "2 subject(s) computed" in printed and "1 failed, training diverged: dog" in printed
    assert (out / "subjects" / "dog" / "failed.json").is_file() and not (out / "subjects" / "dog" / "scores.json").exists()
    results = json.loads((out / "results.json").read_text())
    assert results["subjects"] == 1 and [row["subject"] for row in results["per_subject"]] == ["backpack"]
    assert [f["subject"] for f in results["failed"]] == ["dog"] and "training diverged at step 1" in results["failed"][0]["error"]
    html = (out / "report.html").read_text()
    assert "Failed subjects" in html and "training diverged at step 1" in html
    assert main(args) == 0  # the rerun retries nothing: dog would diverge again
    assert "0 subject(s) computed, 2 already finished" in capsys.readouterr().out


# --- Ctrl-C ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ctrl_c_finishes_the_step_checkpoints_and_exits_130(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    overrides = dict(tiny_overrides, **{"train.steps": 500, "train.checkpoint_every": 0})
    child = subprocess.Popen([sys.executable, "-m", "rewardbooth", *train_args(overrides, run)], stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 120
        while not ((run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= 2):
            assert child.poll() is None and time.time() < deadline, "the run did not start training"
            time.sleep(0.1)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    step = strict_records(run)[-1]["step"]
    assert child.returncode == 130, err
    assert err.strip().splitlines()[-1] == f"rewardbooth: interrupted: stopped at step {step}; continue with --resume", err
    assert "Traceback" not in err
    assert [s for s, _ in list_checkpoints(run)] == [step] and not (run / "result.json").exists()


def test_a_second_ctrl_c_aborts_and_outside_the_steps_the_first_does(tmp_path, tiny_overrides):
    trainer = Trainer(load_config(overrides=tiny_overrides), tmp_path / "run", progress=False)
    before = signal.getsignal(signal.SIGINT)
    with trainer._stop_on_signals():
        with pytest.raises(KeyboardInterrupt):  # set-up: nothing to checkpoint yet
            os.kill(os.getpid(), signal.SIGINT)
        trainer.stepping = True
        os.kill(os.getpid(), signal.SIGINT)
        assert trainer.stop_requested  # the loop stops at the end of its step
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("command, hint", [("bench", "run the same command again to continue"), ("demo", "run it again (the stopped training starts over)")])
def test_bench_and_demo_say_how_to_carry_on_after_a_stop(tmp_path, capsys, monkeypatch, dreambench_root, command, hint):
    def stop(*args, **kwargs):
        raise Stopped(3)

    monkeypatch.setattr("rewardbooth.evaluation.bench.BenchRunner.run", stop)
    monkeypatch.setattr("rewardbooth.demo.run_demo", stop)
    argv = {"bench": ["bench", "--dreambench", str(dreambench_root), "--subjects", "dog", "--model", "tiny", "--dino-model", "tiny",
                      "--clip-model", "tiny", "--device", "cpu", "--output", str(tmp_path / "b")],
            "demo": ["demo", "--output", str(tmp_path / "d")]}[command]
    assert main(argv) == 130
    assert capsys.readouterr().err.strip() == f"rewardbooth: interrupted: stopped at step 3; {hint}"
