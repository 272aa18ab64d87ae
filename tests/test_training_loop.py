"""The training loop and DreamBooth on the tiny preset: resume, LoRA export, prior preservation."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import metric_series
from safetensors.torch import load_file

from rewardbooth import diffusion
from rewardbooth.methods import get_method, load_config
from rewardbooth.methods.dreambooth import DreamBooth
from rewardbooth.models.loading import load_components, make_pipeline
from rewardbooth.models.lora import LORA_WEIGHTS_NAME
from rewardbooth.training.finished_run import load_run_pipeline
from rewardbooth.training.loop import train
from rewardbooth.training.run_dir import list_checkpoints, prepare_run_dir


def read_losses(run_dir):
    return metric_series(run_dir, "loss")


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_run(tmp_path, tiny_overrides, straight_and_resumed):
    overrides = dict(tiny_overrides, **{"train.checkpoint_every": 3, "train.lr_scheduler": "cosine",
                                        "train.gradient_accumulation_steps": 2})
    cfg = load_config(overrides=overrides)

    def after_crash(broken):
        assert [step for step, _ in list_checkpoints(broken)] == [3]
        return [p.stat().st_mtime_ns for p in sorted((broken / "class_images").glob("*.png"))]

    # crash during step 5 (2 micro-batches per step)
    straight, broken, stamps = straight_and_resumed(cfg, tmp_path, DreamBooth, 2 * 4 + 1, after_crash)

    # Cached class images are reused, not regenerated.
    assert [p.stat().st_mtime_ns for p in sorted((broken / "class_images").glob("*.png"))] == stamps
    a, b = read_losses(straight), read_losses(broken)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-7), step
    wa, wb = load_file(straight / LORA_WEIGHTS_NAME), load_file(broken / LORA_WEIGHTS_NAME)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_lora_file_loads_into_fresh_pipeline_and_changes_output(tmp_path, tiny_overrides):
    cfg = load_config(overrides=tiny_overrides)
    run = tmp_path / "run"
    prepare_run_dir(run, resume=False, overwrite=False)
    result = train(cfg, run, progress=False)
    assert result.weights == run / LORA_WEIGHTS_NAME
    state = load_file(result.weights)
    assert state and all(k.startswith("unet.") for k in state)

    components = load_components("tiny")
    pipe = make_pipeline(components)
    prompt = cfg.instance_prompt

    def sample(p):
        return p(prompt, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images

    before = sample(pipe)
    pipe.load_lora_weights(str(run), weight_name=LORA_WEIGHTS_NAME)  # diffusers' own loader
    after = sample(pipe)
    assert (after - before).abs().max() > 1e-4

    # The CLI's loader goes through the same file and gives the same images.
    _, run_pipe = load_run_pipeline(run)
    torch.testing.assert_close(sample(run_pipe), after)


def test_prior_preservation_batches_contain_class_images(tmp_path, tiny_overrides, monkeypatch):
    cfg = load_config(overrides=dict(tiny_overrides, **{"train.steps": 2, "train.batch_size": 2}))
    method = DreamBooth()
    seen = []
    real_add_noise = diffusion.add_noise

    def spy_add_noise(scheduler, x0, generator=None, **kw):
        seen.append(x0.detach().clone())
        return real_add_noise(scheduler, x0, generator, **kw)

    monkeypatch.setattr(diffusion, "add_noise", spy_add_noise)
    run = tmp_path / "run"
    prepare_run_dir(run, resume=False, overwrite=False)
    train(cfg, run, progress=False, method=method)

    class_files = sorted((run / "class_images").glob("class_*.png"))
    assert len(class_files) == 3 and len(method.classes) == 3
    # The second half of every batch is drawn from the class images' latent posteriors.
    class_means = method.classes.moments.chunk(2, dim=1)[0] * method.classes.ctx.components.latent_scaling
    instance_means = method.instance.moments.chunk(2, dim=1)[0] * method.instance.ctx.components.latent_scaling
    for x0 in seen:
        assert x0.shape[0] == 4
        for row, pool in ((x0[0], instance_means), (x0[1], instance_means), (x0[2], class_means), (x0[3], class_means)):
            other = class_means if pool is instance_means else instance_means
            nearest_own = (pool - row).flatten(1).norm(dim=1).min()
            nearest_other = (other - row).flatten(1).norm(dim=1).min()
            assert nearest_own < nearest_other
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_prior" in r for r in records)


def test_v_prediction_and_full_finetune_train_and_reload(tmp_path, tiny_overrides):
    cfg = load_config(overrides=dict(tiny_overrides, **{"model.name": "tiny-v", "adapter.kind": "full",
                                                        "train.learning_rate": 1e-4, "prior.enabled": False}))
    run = tmp_path / "run"
    prepare_run_dir(run, resume=False, overwrite=False)
    result = train(cfg, run, progress=False)
    assert result.weights == run / "unet"
    _, pipe = load_run_pipeline(run)
    base = make_pipeline(load_components("tiny-v"))
    assert base.scheduler.config.prediction_type == "v_prediction"
    trained_params = dict(pipe.unet.named_parameters())
    changed = [n for n, p in base.unet.named_parameters() if not torch.equal(p, trained_params[n])]
    assert changed


@pytest.mark.slow
def test_training_lowers_instance_loss(tmp_path, tiny_overrides):
    """Sanity of the whole loop: fitting five images drives their denoising loss down."""
    cfg = load_config(overrides=dict(tiny_overrides, **{"train.steps": 60, "prior.enabled": False, "adapter.kind": "full",
                                                        "train.batch_size": 4, "train.log_every": 10}))
    run = tmp_path / "run"
    prepare_run_dir(run, resume=False, overwrite=False)
    train(cfg, run, progress=False)
    losses = read_losses(run)
    assert losses[60] < 0.8 * losses[10]


def close_transformers_peft_gate(monkeypatch):
    """transformers' peft integration refusing the installed peft, as transformers 5.24 did with peft 0.21."""
    import transformers.integrations.peft as integration

    def refuse(min_version):
        raise ValueError(f"The version of PEFT you are using is not compatible, please use a version >= {min_version}")

    monkeypatch.setattr(integration, "check_peft_version", refuse)


def train_text_encoder_lora(tmp_path, tiny_overrides):
    cfg = load_config(overrides=dict(tiny_overrides, **{"adapter.train_text_encoder": True, "train.steps": 3}))
    run = tmp_path / "run"
    prepare_run_dir(run, resume=False, overwrite=False)
    result = train(cfg, run, progress=False)
    keys = load_file(result.weights).keys()
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)
    _, pipe = load_run_pipeline(run)
    tokens = pipe.tokenizer([cfg.instance_prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    return run, pipe, tokens


def unet_output(pipe, tokens):
    with torch.no_grad():
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        return pipe.unet(latents, 500, encoder_hidden_states=pipe.text_encoder(tokens)[0]).sample


@pytest.mark.slow
def test_text_encoder_lora_is_saved_and_loaded_without_transformers_peft(tmp_path, tiny_overrides, monkeypatch):
    close_transformers_peft_gate(monkeypatch)
    _, pipe, tokens = train_text_encoder_lora(tmp_path, tiny_overrides)
    base = load_components("tiny").text_encoder
    with torch.no_grad():
        assert (pipe.text_encoder(tokens)[0] - base(tokens)[0]).abs().max() > 1e-6


@pytest.mark.slow
def test_text_encoder_lora_file_matches_diffusers_loader(tmp_path, tiny_overrides):
    run, ours, tokens = train_text_encoder_lora(tmp_path, tiny_overrides)
    theirs = make_pipeline(load_components("tiny"))
    theirs.load_lora_weights(str(run), weight_name=LORA_WEIGHTS_NAME)  # diffusers' own loader
    with torch.no_grad():
        torch.testing.assert_close(ours.text_encoder(tokens)[0], theirs.text_encoder(tokens)[0])
    torch.testing.assert_close(unet_output(ours, tokens), unet_output(theirs, tokens))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_mixed_precision_and_gradient_checkpointing_run(tmp_path, tiny_overrides, precision):
    cfg = load_config(overrides=dict(tiny_overrides, **{"train.mixed_precision": precision, "train.gradient_checkpointing": True,
                                                        "train.steps": 2}))
    run = tmp_path / "run"
    prepare_run_dir(run, resume=False, overwrite=False)
    result = train(cfg, run, progress=False)
    losses = read_losses(run)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert all(v.dtype == torch.float32 for v in load_file(result.weights).values())


class PlantedSelection(DreamBooth):
    """DreamBooth whose validation 'reward' is a planted sequence, to test model selection."""

    selection_metric = "val_reward"

    def __init__(self, rewards):
        self.rewards = list(rewards)
        self.snapshots = {}

    def validation_metrics(self, ctx, step, prompts, images):
        unet = ctx.accelerator.unwrap_model(ctx.unet)
        self.snapshots[step] = {k: v.detach().clone() for k, v in unet.named_parameters() if v.requires_grad}
        return {"val_reward": self.rewards.pop(0)}


@pytest.mark.slow
def test_model_selection_keeps_best_validated_step_and_stops_early(tmp_path, tiny_overrides):
    cfg = load_config(overrides=dict(tiny_overrides, **{
        "train.steps": 20, "validation.every": 2, "validation.patience": 2, "validation.steps": 1, "validation.num_images": 1}))
    method = PlantedSelection([0.1, 0.5, 0.3, 0.2, 0.9, 0.9])
    run = tmp_path / "run"
    prepare_run_dir(run, resume=False, overwrite=False)
    result = train(cfg, run, progress=False, method=method)
    # best at step 4; no improvement at 6 and 8 -> patience 2 exhausted at step 8
    assert (result.final_step, result.selected_step) == (8, 4)
    recorded = json.loads((run / "result.json").read_text())
    assert recorded["selected_step"] == 4 and recorded["flow_matching"] is False  # a U-Net: its report leaves flow.* out
    assert sorted(method.snapshots) == [2, 4, 6, 8]
    # The run's LoRA file holds the step-4 weights, not the last ones.
    _, pipe = load_run_pipeline(run)
    loaded = {k: v for k, v in pipe.unet.named_parameters() if "lora" in k}
    best, last = method.snapshots[4], method.snapshots[8]
    lora_a = sorted(k for k in best if "lora_A" in k)[0]
    # peft names the adapter "default" in training and "default_0" after load_lora_weights
    loaded_key = lora_a.replace(".default.", ".default_0.")
    torch.testing.assert_close(loaded[loaded_key], best[lora_a])
    assert not torch.allclose(best[lora_a], last[lora_a])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_reward"] for r in records if r.get("validation")] == [0.1, 0.5, 0.3, 0.2]


METHOD_OVERRIDES = {
    "dreambooth": {},
    "dpg": {"dpg.critic_optimizer": "adam", "dpg.critic_lr": 1e-3, "adapter.train_text_encoder": True},
    "rpo": {"rpo.negatives_per_prompt": 1, "rpo.negative_steps": 2, "evaluation.align_model": "tiny", "evaluation.clip_model": "tiny"},
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHOD_OVERRIDES))
def test_every_method_honours_accumulation_precision_and_checkpointing(tmp_path, tiny_overrides, method):
    """bf16 autocast, gradient checkpointing and accumulation together, for each method."""
    cfg = load_config(overrides=dict(tiny_overrides, **{
        "train.method": method, "model.name": "tiny", "adapter.kind": "lora", "data.resolution": 32, "train.steps": 2,
        "train.learning_rate": 1e-3, "train.mixed_precision": "bf16", "train.gradient_checkpointing": True,
        "train.gradient_accumulation_steps": 2, **METHOD_OVERRIDES[method]}))
    run = tmp_path / "run"
    prepare_run_dir(run, resume=False, overwrite=False)
    calls = []
    trainer_method = get_method(method)()
    original = trainer_method.loss

    def counting_loss(ctx, generator):
        calls.append(ctx.unet.training)
        assert ctx.accelerator.unwrap_model(ctx.unet).is_gradient_checkpointing
        return original(ctx, generator)

    trainer_method.loss = counting_loss
    result = train(cfg, run, progress=False, method=trainer_method)
    assert len(calls) == 2 * 2  # steps x micro-batches
    assert all(torch.isfinite(torch.tensor(v)) for v in read_losses(run).values())
    # LoRA B matrices start at zero: non-zero ones mean the optimizer stepped.
    ups = [v for k, v in load_file(result.weights).items() if "lora_B" in k or "lora.up" in k]
    assert ups and any(v.abs().max() > 0 for v in ups)
