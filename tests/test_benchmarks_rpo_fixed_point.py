"""benchmarks/rpo_fixed_point.py: where RPO's preference term pushes the margin, from logged metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from conftest import load_script

from rewardbooth.methods.rpo import preference_loss


def test_the_fixed_point_is_where_the_expected_preference_gradient_vanishes():
    script = load_script("benchmarks/rpo_fixed_point.py")
    for p, beta in ((0.52, 1.0), (0.8, 0.25)):
        d = torch.tensor([script.fixed_point(p, beta)], requires_grad=True)
        e_model = torch.zeros(2)  # d enters through the reference model's error on the reference image
        for label, weight in ((1.0, p), (0.0, 1 - p)):  # the expectation over the Bernoulli label
            loss, _ = preference_loss(e_model, torch.cat([d, torch.zeros(1)]), torch.tensor([label]), beta)
            (weight * loss).backward()
        assert abs(d.grad.item()) < 1e-6, (p, beta)
    assert script.fixed_point(0.5, 0.0) == math.inf


def test_the_share_of_steps_past_the_fixed_point_is_read_per_run(tmp_path, capsys):
    script = load_script("benchmarks/rpo_fixed_point.py")
    for name, beta, margins in (("a", 1.0, [0.0, 0.5, 0.5, 0.5]), ("b", 0.1, [0.5, 0.5, 0.5, 9.0])):
        run = tmp_path / "rpo" / name
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump({"rpo": {"beta": beta}}))
        (run / "metrics.jsonl").write_text("\n".join(json.dumps({"step": 10 * (i + 1), "label_mean": 0.6, "margin": m})
                                                     for i, m in enumerate(margins)))
    # d* = logit(0.6) / beta: 0.405 for a (2 of its 3 steps up to 30 past it), 4.05 for b (none of its 3)
    row = script.summarize_runs(tmp_path / "rpo", max_step=30)
    assert row["runs"] == 2 and row["steps"] == 6 and row["past_fixed_point"] == pytest.approx(2 / 6)
    assert row["fixed_point"] == pytest.approx((math.log(1.5) + math.log(1.5) / 0.1) / 2)
    assert script.main([str(tmp_path / "rpo")]) == 0 and "| 2 | 0.600 |" in capsys.readouterr().out
    assert script.main([str(tmp_path / "nothing")]) == 2
