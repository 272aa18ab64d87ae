"""DPG on the tiny presets: critic learning, gradient routing, reward improvement, any reward."""

from __future__ import annotations

import json

import pytest
import torch

from rewardbooth import diffusion
from rewardbooth.methods import load_config
from rewardbooth.methods.critics import ReconstructionCritic, Replay, RewardCritic, critic_regression_loss, live_fraction
from rewardbooth.methods.dpg import FEATURE_CRITIC, RELEASED_CRITIC, DPG
from rewardbooth.models.loading import load_components
from rewardbooth.training.finished_run import load_run_pipeline
from rewardbooth.training.loop import train
from rewardbooth.training.run_dir import prepare_run_dir


@pytest.fixture
def dpg_overrides(tiny_overrides):
    return dict(tiny_overrides, **{
        "train.method": "dpg", "model.name": "tiny", "adapter.kind": "lora", "adapter.train_text_encoder": False,
        "data.resolution": 32, "data.center_crop": True, "train.learning_rate": 1e-3,
        "evaluation.dino_model": "tiny", "evaluation.clip_model": "tiny", "evaluation.align_model": "tiny",
        **RELEASED_CRITIC,  # these tests take the released critic apart; the default is the feature critic
    })


@pytest.mark.slow
def test_critics_learn_a_fixed_stream():
    g = torch.Generator().manual_seed(0)
    residuals = [torch.rand(2, 4, 16, 16, generator=g) * s for s in torch.linspace(0.1, 3.0, 20).tolist()]
    critic = ReconstructionCritic(4, 16)
    optimizer = torch.optim.SGD(critic.parameters(), lr=0.01)

    def stream_loss():
        with torch.no_grad():
            return sum(critic_regression_loss(critic(r), r.flatten(1).mean(1)).item() for r in residuals)

    before = stream_loss()
    for _ in range(30):
        for r in residuals:
            optimizer.zero_grad()
            critic_regression_loss(critic(r), r.flatten(1).mean(1)).backward()
            torch.nn.utils.clip_grad_norm_(critic.parameters(), 1.0)
            optimizer.step()
    assert stream_loss() < 0.1 * before
    assert live_fraction(critic) > 0.5

    reward_critic = RewardCritic(4, 32)
    optimizer = torch.optim.Adam(reward_critic.parameters(), lr=3e-3)
    x = torch.randn(64, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (64,), generator=g)
    text = torch.randn(64, 5, 32, generator=g)
    target = x[:, 0].mean((1, 2)) + 0.5 * text[:, :, 0].mean(1)  # a function of image and prompt
    first = critic_regression_loss(reward_critic(x, t, text), target).item()
    for _ in range(300):
        optimizer.zero_grad()
        critic_regression_loss(reward_critic(x, t, text), target).backward()
        optimizer.step()
    assert critic_regression_loss(reward_critic(x, t, text), target).item() < 0.2 * first


def test_replay_keeps_newest_and_capacity():
    replay = Replay(4)
    for i in range(6):
        replay.add((torch.full((1, 2), float(i)),), torch.tensor([float(i)]))
    assert len(replay.items) == 4
    (inputs,), targets = replay.sample(3, newest=1, generator=torch.Generator().manual_seed(0))
    assert targets[0].item() == 5.0 and set(targets.tolist()) <= {2.0, 3.0, 4.0, 5.0} and inputs.shape == (3, 2)


class Probe(DPG):
    """DPG that checks, at every step, how the actor and critic gradients are routed."""

    def __init__(self):
        self.grad_norms, self.critic_unchanged = [], []
        self.snapshot = None

    def prepare(self, ctx):
        super().prepare(ctx)
        actor_term = self.actor.term

        def probed(ctx, *args):
            term, active, logs = actor_term(ctx, *args)
            params = [p for p in ctx.accelerator.unwrap_model(ctx.unet).parameters() if p.requires_grad]
            grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
            self.grad_norms.append(sum(float(g.norm()) for g in grads if g is not None))
            critic = ctx.accelerator.unwrap_model(self.actor.critic_train)
            assert all(p.grad is None for p in critic.parameters())  # the actor term leaves phi alone
            return term, active, logs

        self.actor.term = probed

    def loss(self, ctx, generator):
        critic = ctx.accelerator.unwrap_model(self.actor.critic_train) if self.snapshot is not None else None
        if critic is not None:  # between two loss() calls only the actor optimizer stepped
            self.critic_unchanged.append(all(torch.equal(a, b) for a, b in zip(self.snapshot, critic.parameters())))
        result = super().loss(ctx, generator)
        self.snapshot = [p.detach().clone() for p in ctx.accelerator.unwrap_model(self.actor.critic_train).parameters()]
        return result


def test_actor_gradient_reaches_unet_and_not_critic(tmp_path, dpg_overrides):
    cfg = load_config(overrides=dict(dpg_overrides, **{"train.steps": 3}))
    run = tmp_path / "run"
    prepare_run_dir(run, resume=False, overwrite=False)
    probe = Probe()
    train(cfg, run, progress=False, method=probe)
    assert len(probe.grad_norms) == 3 and all(g > 0 for g in probe.grad_norms)
    assert probe.critic_unchanged == [True, True]


def lookforward_cost(unet, run_cfg, subject_latents, scheduler, text_embeddings):
    """Mean MSE(x0_hat, x0) over a fixed set of timesteps and noise: minus the recon reward."""
    g = torch.Generator().manual_seed(7)
    x0 = subject_latents.repeat(4, 1, 1, 1)
    t = torch.randint(0, 1000, (x0.shape[0],), generator=g)
    noised = diffusion.add_noise(scheduler, x0, g, timesteps=t)
    with torch.no_grad():
        eps = unet(noised.noisy, noised.timesteps, text_embeddings.expand(x0.shape[0], -1, -1)).sample
    return diffusion.per_sample_mse(diffusion.predict_x0(scheduler, noised.noisy, eps, t), x0).mean().item()


@pytest.mark.slow
def test_recon_reward_of_lookforward_samples_rises(tmp_path, dpg_overrides):
    # No prior loss and no plain instance loss: the critic is the only thing the actor learns from.
    cfg = load_config(overrides=dict(dpg_overrides, **{"train.steps": 60, "prior.enabled": False, "dpg.instance_weight": 0.0,
                                                       "train.batch_size": 2, "train.log_every": 10, "adapter.kind": "full",
                                                       "train.learning_rate": 1e-4}))
    run = tmp_path / "run"
    prepare_run_dir(run, resume=False, overwrite=False)
    method = DPG()
    train(cfg, run, progress=False, method=method)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["critic_loss"] < records[0]["critic_loss"]
    assert all(r["critic_live_fraction"] > 0 for r in records)

    base = load_components("tiny")
    _, pipe = load_run_pipeline(run)
    latents = method.instance.moments.chunk(2, dim=1)[0] * base.latent_scaling
    text = diffusion.encode_prompts(base.tokenizer, base.text_encoder, [cfg.instance_prompt])
    before = lookforward_cost(base.unet, cfg, latents, base.noise_scheduler, text)
    after = lookforward_cost(pipe.unet, cfg, latents, base.noise_scheduler, text)
    assert after < 0.7 * before, (before, after)  # measured: 34.4 -> 14.7


PLUGIN = """
import numpy as np
import torch

def redness(images, prompts, subject):
    if isinstance(images, torch.Tensor) and (images.requires_grad or images.grad_fn is not None):
        raise RuntimeError("autograd reached the reward")
    array = images.detach().cpu().numpy()  # leaves autograd for good
    return torch.from_numpy(array[:, 0].mean(axis=(1, 2)) - array[:, 1:].mean(axis=(1, 2, 3)))
"""


def test_non_differentiable_reward_trains_the_actor(tmp_path, dpg_overrides, monkeypatch):
    (tmp_path / "my_dpg_rewards.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(overrides=dict(dpg_overrides, **{"train.steps": 4, "dpg.reward": "my_dpg_rewards:redness",
                                                       "dpg.critic_optimizer": "adam", "dpg.critic_lr": 1e-3}))
    run = tmp_path / "run"
    prepare_run_dir(run, resume=False, overwrite=False)
    probe = Probe()
    train(cfg, run, progress=False, method=probe)
    assert probe.actor.judge is not None and all(g > 0 for g in probe.grad_norms)  # the critic's gradient reached the U-Net
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(abs(r["reward_true"]) < 2 and r["critic_loss"] >= 0 for r in records)


def test_dino_reward_critic_runs(tmp_path, dpg_overrides):
    cfg = load_config(overrides=dict(dpg_overrides, **{"train.steps": 2, "dpg.reward": "dino"}))
    run = tmp_path / "run"
    prepare_run_dir(run, resume=False, overwrite=False)
    train(cfg, run, progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(-1.0 <= r["reward_true"] <= 1.0 for r in records)


def _dpg_settings(cfg) -> dict:
    return {key: getattr(cfg.dpg, key.removeprefix("dpg.")) for key in FEATURE_CRITIC}


def test_defaults_are_the_released_training_with_the_critic_that_won():
    """`--method dpg`: the released script's model and training, the feature critic MiniBench chose (DINO reward on
    the decoded look-forward image's features); `--method dpg-recon`: the released code's critic, one name away."""
    cfg = load_config(overrides={"train.method": "dpg"})
    assert cfg.model.name == "CompVis/stable-diffusion-v1-4"
    assert (cfg.train.learning_rate, cfg.train.steps, cfg.train.batch_size, cfg.data.resolution) == (1e-6, 1000, 1, 512)
    assert cfg.prior.enabled and cfg.adapter.train_text_encoder and cfg.adapter.kind == "full"
    assert _dpg_settings(cfg) == FEATURE_CRITIC and cfg.dpg.reward == "dino" and cfg.dpg.critic_input == "features"
    released = load_config(overrides={"train.method": "dpg-recon"})
    assert released.train.method == "dpg" and _dpg_settings(released) == RELEASED_CRITIC
    assert (released.dpg.gamma, released.dpg.critic_lr, released.dpg.critic_optimizer, released.dpg.instance_weight) == (0.9986, 0.01, "sgd", 0.0)
    mine = load_config(overrides={"train.method": "dpg-recon", "dpg.critic_lr": 0.05})  # the user's settings beat the variant's
    assert mine.dpg.critic_lr == 0.05 and mine.dpg.reward == "recon"
    from rewardbooth.errors import ConfigError

    with pytest.raises(ConfigError, match="dpg.critic_input=latent"):  # a plain function has no features: refused up front
        load_config(overrides={"train.method": "dpg", "dpg.reward": "mypkg.rewards:aesthetic"})


def test_cli_train_writes_the_default_dpg_into_its_config(tmp_path, subject_dir):
    import yaml

    from rewardbooth.cli import main

    run = tmp_path / "run"
    assert main(["train", "--method", "dpg", "--model", "tiny", "--instance-dir", str(subject_dir), "--class-noun", "toy",
                 "--output", str(run), "--steps", "1", "--num-class-images", "1", "--set", "prior.generation_steps=1",
                 "--set", "validation.every=0", "--set", "evaluation.dino_model=tiny", "--set", "evaluation.clip_model=tiny",
                 "--set", "evaluation.align_model=tiny", "--set", "adapter.kind=lora", "--set", "adapter.train_text_encoder=false",
                 "--quiet"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert {f"dpg.{k}": v for k, v in saved["dpg"].items() if f"dpg.{k}" in FEATURE_CRITIC} == FEATURE_CRITIC


@pytest.mark.slow
def test_dpg_resume_restores_critic_and_replay(tmp_path, dpg_overrides, straight_and_resumed, metric_series):
    cfg = load_config(overrides=dict(dpg_overrides, **{"train.steps": 6, "train.checkpoint_every": 3}))
    straight, broken, _ = straight_and_resumed(cfg, tmp_path, DPG, 5)
    for key in ("loss", "critic_loss", "reward_predicted"):
        assert metric_series(broken, key) == pytest.approx(metric_series(straight, key), rel=1e-5), key


class DeadCritic(Probe):
    """DPG whose ReLU critic starts dead, as the released critic can end up after SGD."""

    def prepare(self, ctx):
        super().prepare(ctx)
        with torch.no_grad():
            self.actor.critic.fc1.bias.fill_(-1e4)


def test_dead_critic_is_reported(tmp_path, dpg_overrides):
    cfg = load_config(overrides=dict(dpg_overrides, **{"train.steps": 2, "dpg.critic_activation": "relu"}))
    run = tmp_path / "run"
    prepare_run_dir(run, resume=False, overwrite=False)
    method = DeadCritic()
    with pytest.warns(UserWarning, match="critic is dead"):
        train(cfg, run, progress=False, method=method)
    assert method.grad_norms == [0.0, 0.0]  # what the warning is about: no signal reaches the U-Net
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["critic_live_fraction"] == 0.0 for r in records)


class _Trap:
    """A pickle that creates a file when unpickled: what a tampered checkpoint could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.slow
def test_resume_never_unpickles_checkpoint_files(tmp_path, dpg_overrides, straight_and_resumed, metric_series):
    import pickle

    from rewardbooth.errors import CheckpointError

    marker = tmp_path / "pwned"

    def booby_trap(broken):
        checkpoint = sorted((broken / "checkpoints").iterdir())[-1]
        # DPG's replay and counter are safetensors now: no pickle of ours holds method state.
        assert not list(checkpoint.glob("custom_checkpoint_*.pkl"))
        assert (checkpoint / "method_state.safetensors").is_file()
        (checkpoint / "random_states_0.pkl").write_bytes(pickle.dumps(_Trap(marker)))  # read with weights_only=True
        return checkpoint

    cfg = load_config(overrides=dict(dpg_overrides, **{"train.steps": 6, "train.checkpoint_every": 3}))
    straight, broken, checkpoint = straight_and_resumed(cfg, tmp_path, DPG, 5, booby_trap)
    assert not marker.exists()
    # ...and the resumed run still reproduces the uninterrupted one (replay and counter restored).
    for key in ("loss", "critic_loss", "reward_predicted"):
        assert metric_series(broken, key) == pytest.approx(metric_series(straight, key), rel=1e-5), key

    # A pickle that accelerate would load unsafely is refused before anything reads it (resuming
    # the finished run for more steps loads its newest checkpoint).
    newest = sorted((broken / "checkpoints").iterdir())[-1]
    (newest / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_Trap(marker)))
    more = load_config(overrides=dict(dpg_overrides, **{"train.steps": 9, "train.checkpoint_every": 3}))
    with pytest.raises(CheckpointError, match="custom_checkpoint_0.pkl"):
        train(more, broken, resume=True, progress=False, method=DPG())
    assert not marker.exists()


@pytest.mark.slow
def test_checkpointing_recomputes_the_vae_decode_and_changes_no_number(tmp_path, dpg_overrides, metric_series):
    """The default critic backpropagates through the decoded look-forward image: with gradient checkpointing the VAE
    decoder is recomputed too (the big activations at 1024 px), and the run's numbers stay the same."""
    from rewardbooth.methods.dpg import DPG

    seen = []

    class Probe(DPG):
        def loss(self, ctx, generator):
            seen.append(ctx.components.vae.is_gradient_checkpointing)
            return super().loss(ctx, generator)

    runs = {}
    for checkpointing in (False, True):
        cfg = load_config(overrides={**dpg_overrides, **FEATURE_CRITIC, "dpg.critic_warmup_steps": 0, "train.steps": 3,
                                     "train.gradient_checkpointing": checkpointing, "train.checkpoint_every": 0,
                                     "validation.every": 0})
        runs[checkpointing] = tmp_path / f"run-{checkpointing}"
        prepare_run_dir(runs[checkpointing], resume=False, overwrite=False)
        train(cfg, runs[checkpointing], progress=False, method=Probe())
    assert seen == [False] * 3 + [True] * 3
    for key in ("loss", "actor_q_term"):
        assert metric_series(runs[True], key) == pytest.approx(metric_series(runs[False], key), rel=1e-4, abs=1e-6)
