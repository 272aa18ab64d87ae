"""benchmarks/bench_sampling.py end to end on the tiny preset: both sides timed, the ratio printed."""

from __future__ import annotations

import json

from conftest import load_script


def test_bench_sampling_prints_both_rates_and_their_ratio(capsys):
    bench = load_script("benchmarks/bench_sampling.py")
    assert bench.main(["--model", "tiny", "--prompts", "2", "--images-per-prompt", "1", "--batch-size", "2", "--steps", "2",
                       "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    rates = json.loads(next(line for line in out.splitlines() if line.startswith(bench.RESULT_TAG))[len(bench.RESULT_TAG):])
    assert rates["ours"] > 0 and rates["diffusers"] > 0
    ratio = float(next(line for line in out.splitlines() if line.startswith("ratio")).rsplit(" ", 1)[1])
    assert abs(ratio - rates["ours"] / rates["diffusers"]) < 0.01


def test_the_diffusers_side_draws_what_a_user_gets(capsys):
    """The reference side is a plain pipeline call: same images as calling the pipeline directly."""
    import torch

    bench = load_script("benchmarks/bench_sampling.py")
    from rewardbooth.models.loading import load_components, make_pipeline

    pipe = make_pipeline(load_components("tiny"))
    images = bench.diffusers_call(pipe, ["a toy"], 2, 2, 2, 4.0, 0)
    direct = pipe(["a toy", "a toy"], num_inference_steps=2, guidance_scale=4.0, generator=torch.Generator("cpu").manual_seed(0)).images
    assert [im.tobytes() for im in images] == [im.tobytes() for im in direct]
