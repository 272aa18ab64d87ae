"""The CPU thread count for small models is picked by measurement, and explicit choices win."""

from __future__ import annotations

import pytest

import torch

from rewardbooth.training.threads import choose_cpu_threads, should_choose_threads


def test_the_fastest_thread_count_is_kept():
    now = [0.0]
    cost = {1: 0.15, 2: 1.1}  # the busy-machine case: 2 threads far slower for a tiny U-Net

    def step():
        now[0] += cost[torch.get_num_threads()]

    before = torch.get_num_threads()
    try:
        assert choose_cpu_threads(step, [1, 2], clock=lambda: now[0]) == 1
        assert torch.get_num_threads() == 1
        cost.update({1: 1.0, 2: 0.4})
        assert choose_cpu_threads(step, [1, 2], clock=lambda: now[0]) == 2
    finally:
        torch.set_num_threads(before)


def test_only_small_models_on_the_cpu_without_an_explicit_setting(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert should_choose_threads(torch.device("cpu"), 3_000_000)
    assert not should_choose_threads(torch.device("cpu"), 860_000_000)  # SD's U-Net: threads pay
    assert not should_choose_threads(torch.device("cuda"), 3_000_000)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert not should_choose_threads(torch.device("cpu"), 3_000_000)


@pytest.mark.slow
def test_training_a_small_model_records_the_chosen_count(tmp_path, tiny_overrides, monkeypatch):
    import json

    from rewardbooth.methods import load_config
    from rewardbooth.training.loop import train
    from rewardbooth.training.run_dir import prepare_run_dir
    from rewardbooth.training.threads import thread_candidates

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        run = tmp_path / "run"
        prepare_run_dir(run, resume=False, overwrite=False)
        train(load_config(overrides=dict(tiny_overrides, **{"train.steps": 1})), run, progress=False)
        assert json.loads((run / "result.json").read_text())["cpu_threads"] in thread_candidates()
    finally:
        torch.set_num_threads(before)
