"""Paired statistics with bootstrap intervals, training budgets kept from one run, loop-level
model selection for any method, and disjoint MiniBench subject sets."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rewardbooth.errors import ConfigError
from rewardbooth.evaluation.paired import (bootstrap_interval, compare, interpolate_at, paired_at_equal_seconds,
                                          paired_differences, verdict)
from rewardbooth.methods import load_config
from rewardbooth.models.lora import LORA_WEIGHTS_NAME
from rewardbooth.training.loop import train
from rewardbooth.training.run_dir import RunFolder, prepare_run_dir


def test_bootstrap_interval_brackets_the_mean_and_is_reproducible():
    diffs = [0.10, 0.05, 0.20, -0.02, 0.08, 0.12, 0.03, 0.15]
    low, high = bootstrap_interval(diffs)
    mean = sum(diffs) / len(diffs)
    assert low < mean < high
    assert (low, high) == bootstrap_interval(diffs)  # fixed seed
    # Within the range of the data, and narrower than it.
    assert min(diffs) < low and high < max(diffs)
    # Twice the subjects with the same spread: a narrower interval.
    low2, high2 = bootstrap_interval(diffs * 2)
    assert high2 - low2 < high - low


def test_verdict_follows_the_interval():
    assert compare([0.1, 0.2, 0.15, 0.12, 0.18])["verdict"] == "better"
    assert compare([-0.1, -0.2, -0.15, -0.12, -0.18])["verdict"] == "worse"
    assert compare([0.3, -0.3, 0.2, -0.25, 0.01, -0.02])["verdict"] == "no detectable difference"
    assert verdict(0.01, 0.2) == "better" and verdict(-0.2, -0.01) == "worse" and verdict(-0.1, 0.1) == "no detectable difference"
    one = compare([0.5])
    assert one["verdict"] == "too few subjects" and one["won"] == 1


def test_paired_differences_pair_by_subject():
    rows = {
        "dreambooth": [{"subject": "a", "m": 0.5}, {"subject": "b", "m": 0.2}, {"subject": "c", "m": 0.9}],
        # listed in another order: pairing is by subject name, not position
        "dpg": [{"subject": "c", "m": 1.0}, {"subject": "a", "m": 0.6}, {"subject": "b", "m": 0.1}],
    }
    result = paired_differences(rows, ("m",), baseline="dreambooth")
    d = result["differences"]["dpg"]["m"]
    assert d["mean"] == pytest.approx((0.1 - 0.1 + 0.1) / 3)
    assert (d["won"], d["lost"], d["subjects"]) == (2, 1, 3)
    assert "dreambooth" not in result["differences"]


@pytest.mark.slow
def test_equal_seconds_pairs_each_subject_with_the_baseline_interpolated_at_its_seconds():
    assert interpolate_at([(10.0, 0.2), (30.0, 0.6)], 20.0) == pytest.approx(0.4)
    assert interpolate_at([(30.0, 0.6), (10.0, 0.2)], 10.0) == pytest.approx(0.2)  # order does not matter; ends included
    assert interpolate_at([(10.0, 0.2), (30.0, 0.6)], 40.0) != interpolate_at([(10.0, 0.2), (30.0, 0.6)], 40.0)  # NaN: no extrapolation
    # DreamBooth at two budgets per subject (seconds, identity); the method's one budget took other seconds.
    baseline = [[{"subject": "a", "seconds": 10.0, "identity_kept": 0.2}, {"subject": "b", "seconds": 12.0, "identity_kept": 0.5},
                 {"subject": "c", "seconds": 10.0, "identity_kept": 0.1}],
                [{"subject": "a", "seconds": 30.0, "identity_kept": 0.6}, {"subject": "b", "seconds": 32.0, "identity_kept": 0.9},
                 {"subject": "c", "seconds": 20.0, "identity_kept": 0.3}]]
    method = [{"subject": "a", "seconds": 20.0, "identity_kept": 0.5}, {"subject": "b", "seconds": 22.0, "identity_kept": 0.6},
              {"subject": "c", "seconds": 25.0, "identity_kept": 0.9}]  # c took longer than DreamBooth's longest run
    table = paired_at_equal_seconds(method, baseline, ("identity_kept",), "dpg", "dreambooth")
    d = table["differences"]["dpg"]["identity_kept"]
    assert table["outside"] == 1 and d["subjects"] == 2  # c is left out, not extrapolated
    assert d["mean"] == pytest.approx(((0.5 - 0.4) + (0.6 - 0.7)) / 2) and (d["won"], d["lost"]) == (1, 1)
    # The table names its clock: rows from before clocks were recorded are wall seconds; CPU rows say CPU; mixed, mixed.
    assert table["clock"] == "wall" and "interpolated linearly in wall seconds" in table["how"]
    on_cpu = [[dict(row, seconds_clock="cpu") for row in rows] for rows in [method, *baseline]]
    cpu = paired_at_equal_seconds(on_cpu[0], on_cpu[1:], ("identity_kept",), "dpg", "dreambooth")
    assert cpu["clock"] == "cpu" and "in CPU seconds" in cpu["how"] and cpu["differences"] == table["differences"]
    assert paired_at_equal_seconds(on_cpu[0], baseline, ("identity_kept",), "dpg", "dreambooth")["clock"] == "mixed"


def test_runs_log_their_wall_and_cpu_seconds_and_a_pause_is_no_cpu_seconds(tmp_path, tiny_overrides, monkeypatch):
    """Both clocks cumulative from set-up on; a 0.5 s sleep in the fourth step counts on the wall clock only (summed
    across a resume: tests/test_training_resume_config.py)."""
    import time

    from rewardbooth.training import loop
    from rewardbooth.training.run_dir import seconds_at

    real_generator = loop.step_generator

    def step_generator(seed, step, micro, process):
        if step == 3:
            time.sleep(0.5)
        return real_generator(seed, step, micro, process)

    monkeypatch.setattr(loop, "step_generator", step_generator)
    cfg = load_config(overrides=dict(tiny_overrides, **{"train.steps": 4, "train.checkpoint_every": 2, "train.log_every": 1,
                                                        "validation.every": 0}))
    run = tmp_path / "run"
    prepare_run_dir(run, resume=False, overwrite=False)
    train(cfg, run, progress=False)
    wall = [seconds_at(run, step) for step in (1, 2, 3, 4)]
    cpu = [seconds_at(run, step, clock="cpu") for step in (1, 2, 3, 4)]
    for seconds in (wall, cpu):
        assert all(s > 0 for s in seconds) and seconds == sorted(seconds)  # cumulative, set-up included from the first step
    assert seconds_at(run, 2) == seconds_at(run, 2) and seconds_at(run, 5) is None
    assert wall[3] - wall[2] >= 0.5 and cpu[3] - cpu[2] < wall[3] - wall[2] - 0.4  # a pause is no compute


def test_budgets_keep_the_weights_a_shorter_run_would_give(tmp_path, tiny_overrides):
    long_cfg = load_config(overrides=dict(tiny_overrides, **{"train.steps": 4, "train.save_steps": [2]}))
    short_cfg = load_config(overrides=dict(tiny_overrides, **{"train.steps": 2}))
    runs = {}
    for name, cfg in (("long", long_cfg), ("short", short_cfg)):
        runs[name] = tmp_path / name
        prepare_run_dir(runs[name], resume=False, overwrite=False)
        train(cfg, runs[name], progress=False)
    kept = load_file(RunFolder(runs["long"]).budget_dir(2) / LORA_WEIGHTS_NAME)
    short = load_file(runs["short"] / LORA_WEIGHTS_NAME)
    final = load_file(runs["long"] / LORA_WEIGHTS_NAME)
    assert kept.keys() == short.keys()
    for key in kept:
        torch.testing.assert_close(kept[key], short[key])
    assert any(not torch.equal(kept[k], final[k]) for k in kept)
    assert json.loads((RunFolder(runs["long"]).budget_dir(2) / "budget.json").read_text()) == {"step": 2, "selected_step": 2}


def test_save_steps_outside_the_run_are_refused(tiny_overrides):
    with pytest.raises(ConfigError, match="train.save_steps"):
        load_config(overrides=dict(tiny_overrides, **{"train.steps": 4, "train.save_steps": [8]}))


@pytest.mark.slow
def test_loop_selection_works_for_dreambooth_and_respects_min_step(tmp_path, tiny_overrides):
    overrides = dict(tiny_overrides, **{
        "train.steps": 6, "validation.every": 2, "validation.steps": 1, "validation.num_images": 1,
        "validation.select": True, "evaluation.align_model": "tiny", "train.save_steps": [4]})
    for min_step in (0, 4):
        cfg = load_config(overrides=dict(overrides, **{"validation.select_min_step": min_step}))
        run = tmp_path / f"min{min_step}"
        prepare_run_dir(run, resume=False, overwrite=False)
        result = train(cfg, run, progress=False)
        curve = {r["step"]: r["val_reward"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                 if r.get("validation")}
        assert sorted(curve) == [2, 4, 6] and all(0 < v <= 1 for v in curve.values())
        candidates = {s: v for s, v in curve.items() if s >= min_step}
        assert result.selected_step == max(candidates, key=candidates.get)
        at_budget = {s: v for s, v in candidates.items() if s <= 4}
        kept = json.loads((RunFolder(run).budget_dir(4) / "budget.json").read_text())
        assert kept["selected_step"] == max(at_budget, key=at_budget.get)


def test_subject_sets_of_different_seeds_share_no_subject(tmp_path):
    from rewardbooth.mini.bench import prepare_subjects

    first = prepare_subjects(tmp_path / "a", 24, 0)
    second = prepare_subjects(tmp_path / "b", 24, 1)
    assert len({s.name for s in first}) == len({s.name for s in second}) == 24
    assert not {s.name for s in first} & {s.name for s in second}
    # Within a set every subject is its own combination.
    combos = {(s.subject.shape, s.subject.colour, s.subject.pattern) for s in first}
    assert len(combos) == 24
