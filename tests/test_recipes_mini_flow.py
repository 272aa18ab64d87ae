"""mini-flow's recipe on a tiny transformer: it learns, resumes exactly, saves a folder that loads as the SD3 family
without T5 and trains a rewardbooth step; `--model mini-flow` without shipped weights is a one-line error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rewardbooth.cli import main as cli
from rewardbooth.errors import ConfigError
from rewardbooth.methods import load_config
from rewardbooth.mini import assets
from rewardbooth.mini.measure import main as measure
from rewardbooth.mini.preset import FLOW_SAMPLER_GUIDANCE, FLOW_SAMPLER_STEPS
from rewardbooth.mini.world import pretraining_batch
from rewardbooth.models.loading import load_components, make_pipeline
from rewardbooth.recipes.mini_flow_pretrain import FlowTrainer, build_flow_pipeline, main
from rewardbooth.recipes.mini_pretrain import images_to_tensor
from rewardbooth.sampling import SampleSettings, generate
from rewardbooth.training.loop import train
from rewardbooth.training.run_dir import prepare_run_dir

ARGS = ["--size", "xs", "--steps", "6", "--batch", "4", "--warmup", "2", "--lr", "2e-3", "--log-every", "1",
        "--save-every", "3", "--sample-every", "100", "--seed", "1"]
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


def _losses(run) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["phase"] == "flow"}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run = tmp_path_factory.mktemp("mini-flow") / "straight"
    assert main(["--out", str(run), *ARGS]) == 0
    return run


def test_flow_matching_steps_fit_a_fixed_batch():
    trainer = FlowTrainer(build_flow_pipeline("xs"), lr=2e-3, ema=0.9, seed=0)
    images, captions, _ = pretraining_batch(0, 4, 32)
    x, losses = images_to_tensor(images), []
    for _ in range(12):
        trainer.gen.manual_seed(0)  # the same latents, noise and sigmas every step: a fixed regression
        losses.append(trainer.step(x, captions, 2e-3))
    # the velocity eps - x0 of unit-variance latents: E|v|^2 = 2 before any learning (an x0 or eps target: about 1)
    assert 1.8 < losses[0] < 3.0 and losses[-1] < 0.7 * losses[0], losses


def test_pretraining_resumes_exactly(straight, tmp_path, monkeypatch):
    run, step, calls = tmp_path / "broken", FlowTrainer.step, []

    def crash_at_step_5(self, *args):
        calls.append(1)
        if len(calls) == 5:  # after the save at step 3 and one more step
            raise KeyboardInterrupt
        return step(self, *args)

    monkeypatch.setattr(FlowTrainer, "step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        main(["--out", str(run), *ARGS])
    monkeypatch.setattr(FlowTrainer, "step", step)
    assert main(["--out", str(run), *ARGS, "--resume"]) == 0
    assert _losses(run) == _losses(straight) and len(_losses(run)) == 6
    a, b = load_file(straight / WEIGHTS), load_file(run / WEIGHTS)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_the_folder_loads_as_sd3_without_t5_samples_and_trains(straight, tmp_path, subject_dir, monkeypatch):
    monkeypatch.setattr(assets, "FLOW_DIR", straight)  # as if shipped: `--model mini-flow` reads it
    components = load_components("mini-flow")
    family = components.family()
    assert family.name == "sd3" and components.text_encoder_3 is None and components.native_resolution == 32
    assert isinstance(components.vae.config.shift_factor, float)  # the flow pipelines decode z / scale + shift
    # conditioned on mini's 16 CLIP tokens alone, in training and in sampling (no block of zero T5 tokens)
    assert family.encode_prompts(components.text_encoders, ["a red ball"], 32).hidden.shape[1] == 16
    seen = []
    components.unet.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["encoder_hidden_states"].shape[1]),
                                              with_kwargs=True)
    [[image]] = generate(make_pipeline(components), ["a red ball on the beach"], 1, SampleSettings(steps=2, guidance_scale=4.0))
    assert image.size == (32, 32) and set(seen) == {16}

    cfg = load_config(overrides={"model.name": "mini-flow", "data.instance_dir": str(subject_dir), "data.class_noun": "ball",
                                 "train.method": "dreambooth", "train.steps": 1, "train.batch_size": 1, "train.log_every": 1,
                                 "train.checkpoint_every": 0, "prior.num_class_images": 1, "prior.generation_steps": 1,
                                 "validation.every": 0})
    # the preset's sampler beats the SD3 family's (28 steps, guidance 3.5: 1024 px models)
    assert (cfg.validation.steps, cfg.validation.guidance_scale) == (FLOW_SAMPLER_STEPS, FLOW_SAMPLER_GUIDANCE)
    run = tmp_path / "run"
    prepare_run_dir(run, resume=False, overwrite=False)
    assert train(cfg, run, progress=False).weights.exists()


def test_mini_flow_without_its_weights_is_a_one_line_error(tmp_path, monkeypatch, subject_dir, capsys):
    monkeypatch.setattr(assets, "FLOW_DIR", tmp_path / "flow")
    with pytest.raises(ConfigError, match=r"^mini-flow is not pretrained yet: python -m rewardbooth.recipes.mini_flow_pretrain "):
        load_components("mini-flow")
    assert cli(["train", "--model", "mini-flow", "--instance-dir", str(subject_dir), "--class-noun", "ball",
                "--output", str(tmp_path / "run")]) == 2
    assert measure(["--model", "mini-flow", "--scenes", "1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("mini-flow is not pretrained yet" in line for line in err)
