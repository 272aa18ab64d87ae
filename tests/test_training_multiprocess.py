"""Data-parallel training: `rewardbooth train --num-processes 2` (accelerate launch, gloo on CPU)."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from rewardbooth.cli import main

COMMON = ["--model", "tiny", "--steps", "4", "--checkpoint-every", "2", "--set", "train.log_every=1", "--quiet",
          "--set", "validation.every=0", "--set", "data.resolution=32"]
METHODS = {
    "dreambooth": ["--num-class-images", "2", "--set", "prior.generation_steps=2"],
    "dpg": ["--num-class-images", "2", "--set", "prior.generation_steps=2", "--set", "adapter.kind=lora", "--lr", "1e-4",
            "--gradient-accumulation", "2"],
    "rpo": ["--set", "adapter.kind=lora", "--lr", "1e-4", "--set", "rpo.negatives_per_prompt=1", "--set", "rpo.negative_steps=2",
            "--set", "evaluation.align_model=tiny", "--set", "evaluation.clip_model=tiny"],
}


def tensor_shapes(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_processes_match_one_in_structure_and_log_once(tmp_path, subject_dir, method):
    runs = {}
    for processes in (1, 2):
        run = tmp_path / f"{method}-{processes}"
        argv = ["train", "--method", method, "--instance-dir", str(subject_dir), "--class-noun", "toy", "--output", str(run),
                *COMMON, *METHODS[method], "--num-processes", str(processes)]
        assert main(argv) == 0
        runs[processes] = run
    single, double = runs[1], runs[2]
    assert json.loads((double / "result.json").read_text())["num_processes"] == 2

    # Only the main process logs: one line per step, no duplicates.
    steps = [json.loads(line)["step"] for line in (double / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]

    one, two = single / "checkpoints" / "checkpoint-000002", double / "checkpoints" / "checkpoint-000002"
    names_one = {p.name for p in one.iterdir()}
    names_two = {p.name for p in two.iterdir()}
    assert names_two == names_one | {"random_states_1.pkl"}  # each process keeps its RNG state
    assert tensor_shapes(two / "trainable_0.safetensors") == tensor_shapes(one / "trainable_0.safetensors")
    assert tensor_shapes(double / "pytorch_lora_weights.safetensors") == tensor_shapes(single / "pytorch_lora_weights.safetensors")
