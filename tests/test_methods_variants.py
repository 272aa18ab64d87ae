"""The tuning variants do what their settings say: RPO's labels (temperature, soft, official
pairing, beta 0), DPG's weightings, direct reward actor, feature critic and the look-forward ablation."""

from __future__ import annotations

import json

import pytest
import torch

from rewardbooth import diffusion
from rewardbooth.errors import ConfigError
from rewardbooth.methods import load_config
from rewardbooth.methods.dpg import DPG, RELEASED_CRITIC
from rewardbooth.methods.rpo import RPO, preference_labels, preference_loss
from rewardbooth.models.loading import load_components
from rewardbooth.training.loop import train
from rewardbooth.training.run_dir import prepare_run_dir

TINY_JUDGES = {"evaluation.dino_model": "tiny", "evaluation.clip_model": "tiny", "evaluation.align_model": "tiny"}


def run(cfg, tmp_path, method=None, name="run"):
    folder = tmp_path / name
    prepare_run_dir(folder, resume=False, overwrite=False)
    train(cfg, folder, progress=False, method=method)
    return folder


def records(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


# --- RPO ---------------------------------------------------------------------------------------
def test_label_temperature_sharpens_and_soft_labels_are_the_probability():
    r_ref, r_neg = torch.tensor([0.62, 0.50]), torch.tensor([0.60, 0.55])
    g = torch.Generator().manual_seed(0)
    soft_1 = preference_labels(r_ref, r_neg, 1.0, "soft", g)
    soft_cold = preference_labels(r_ref, r_neg, 0.01, "soft", g)
    assert torch.allclose(soft_1, torch.sigmoid(r_ref - r_neg))
    assert 0.48 < soft_1.min() and soft_1.max() < 0.52  # the paper's temperature: near coin flips
    assert soft_cold[0] > 0.85 and soft_cold[1] < 0.01  # a small temperature: the sign of the difference
    draws = torch.stack([preference_labels(r_ref, r_neg, 0.01, "bernoulli", g) for _ in range(200)])
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    assert draws[:, 0].mean() > 0.8 and draws[:, 1].mean() < 0.05


def test_beta_zero_leaves_only_the_reconstruction_gradient():
    e_model = torch.tensor([0.5, 0.7], requires_grad=True)
    loss, logs = preference_loss(e_model, torch.tensor([0.6, 0.6]), torch.tensor([1.0]), 0.0)
    loss.backward()
    assert e_model.grad.tolist() == [1.0, 0.0]  # d/d e(ref) of mean e(ref); nothing on the negative
    with pytest.raises(ConfigError, match="rpo.beta"):
        load_config(overrides={"train.method": "rpo", "rpo.beta": -1.0})


@pytest.fixture
def rpo_overrides(tiny_overrides):
    return dict(tiny_overrides, **TINY_JUDGES, **{
        "train.method": "rpo", "adapter.kind": "lora", "data.resolution": 32, "train.steps": 2, "validation.every": 0,
        "rpo.negatives_per_prompt": 1, "rpo.negative_steps": 2})


class PairSpy(RPO):
    def __init__(self):
        self.pairs = []

    def pair_rewards(self, ctx, ref_index, neg_index):
        result = super().pair_rewards(ctx, ref_index, neg_index)
        self.pairs.append((ref_index.clone(), neg_index.clone(), result))
        return result


@pytest.mark.slow
def test_official_pairing_scores_the_reference_under_the_negatives_prompt(tmp_path, rpo_overrides):
    from rewardbooth.rewards import build_reward

    for mode in ("instance", "negative"):
        cfg = load_config(overrides=dict(rpo_overrides, **{"rpo.reference_prompt": mode, "train.batch_size": 3}))
        method = PairSpy()
        run(cfg, tmp_path, method, name=mode)
        reward = build_reward({"name": "lambda_harmonic", "lam": cfg.rpo.lambda_train, "encoder": "align"}, models={"align": "tiny"})
        ref_index, neg_index, (r_ref, _) = method.pairs[0]
        for i, j, value in zip(ref_index.tolist(), neg_index.tolist(), r_ref.tolist()):
            prompt = cfg.instance_prompt if mode == "instance" else method.negative_prompts[j]
            expected = reward([method.subject.references[i]], [prompt], method.subject).item()
            assert value == pytest.approx(expected, abs=1e-5), (mode, i, j)


# --- DPG ---------------------------------------------------------------------------------------
@pytest.fixture
def dpg_overrides(tiny_overrides):
    return dict(tiny_overrides, **TINY_JUDGES, **RELEASED_CRITIC, **{  # variants are defined on the released critic
        "train.method": "dpg", "adapter.kind": "lora", "adapter.train_text_encoder": False, "data.resolution": 32,
        "train.learning_rate": 1e-3, "prior.enabled": False})


def test_actor_weightings(dpg_overrides):
    components = load_components("tiny")
    scheduler = components.noise_scheduler
    t = torch.tensor([10, 300, 900])
    method = DPG()

    class Ctx:
        family = components.family()

    for settings, expected in [
        ({}, 0.9986 ** t.float()),
        ({"dpg.weighting": "uniform"}, torch.ones(3)),
        ({"dpg.weighting": "snr", "dpg.snr_cap": 5.0}, diffusion.snr(scheduler, t).clamp(max=5.0)),
        ({"dpg.weighting": "uniform", "dpg.actor_max_timestep": 300}, torch.tensor([1.0, 0.0, 0.0])),
    ]:
        Ctx.cfg = load_config(overrides=dict(dpg_overrides, **settings))
        torch.testing.assert_close(method.actor_weight(Ctx, t), expected)
    snr = diffusion.snr(scheduler, t)
    assert snr[0] > snr[1] > snr[2]  # detail (small t) steps weigh more under snr, unlike gamma^t on x0 errors
    abar = scheduler.alphas_cumprod[t]
    torch.testing.assert_close(snr, abar / (1 - abar))


def test_step_back_is_a_ddim_step():
    from diffusers import DDIMScheduler

    components = load_components("tiny")
    ddim = DDIMScheduler.from_config(components.noise_scheduler.config)
    ddim.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    t = int(ddim.timesteps[10])
    expected = ddim.step(eps, t, x_t, eta=0.0).prev_sample
    ours = diffusion.step_back(components.noise_scheduler, x_t, eps, torch.tensor([t]), stride=1000 // 50)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_direct_actor_raises_the_reward_of_look_forward_images(tmp_path, dpg_overrides):
    # No instance loss, no prior: the reward's own gradient is all the U-Net learns from.
    cfg = load_config(overrides=dict(dpg_overrides, **{
        "dpg.reward": "dino", "dpg.actor": "direct", "dpg.instance_weight": 0.0, "dpg.weighting": "uniform",
        "dpg.reward_weight": 10.0, "train.steps": 24, "train.batch_size": 4, "train.log_every": 8}))
    rewards = [r["reward_true"] for r in records(run(cfg, tmp_path))]
    assert rewards[-1] > rewards[0] + 0.01, rewards
    # With the reward weighted 0 nothing is learned: the reward stays where it was.
    flat = load_config(overrides=dict(dpg_overrides, **{
        "dpg.reward": "dino", "dpg.actor": "direct", "dpg.instance_weight": 0.0, "dpg.reward_weight": 0.0,
        "train.steps": 24, "train.batch_size": 4, "train.log_every": 8}))
    still = [r["reward_true"] for r in records(run(flat, tmp_path, name="flat"))]
    assert abs(still[-1] - still[0]) < abs(rewards[-1] - rewards[0])


def test_direct_actor_needs_a_differentiable_reward(dpg_overrides):
    with pytest.raises(ConfigError, match="dpg.actor=direct"):
        load_config(overrides=dict(dpg_overrides, **{"dpg.actor": "direct"}))  # the recon critic is no reward


class CriticProbe(DPG):
    """Records the critic's inputs and whether the actor term reaches the U-Net."""

    def __init__(self):
        self.inputs, self.grad_norms = [], []

    def prepare(self, ctx):
        super().prepare(ctx)
        actor_term, predicted_cost = self.actor.term, self.actor.predicted_cost

        def recorded_cost(ctx, inputs):  # the critic's inputs on the actor's side (with gradients)
            self.inputs.append(inputs)
            return predicted_cost(ctx, inputs)

        def probed(ctx, *args):
            term, active, logs = actor_term(ctx, *args)
            params = [p for p in ctx.accelerator.unwrap_model(ctx.unet).parameters() if p.requires_grad]
            grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
            self.grad_norms.append(sum(float(g.norm()) for g in grads if g is not None))
            return term, active, logs

        self.actor.predicted_cost, self.actor.term = recorded_cost, probed


@pytest.mark.slow
def test_feature_critic_sees_encoder_features_and_learns_them(tmp_path, dpg_overrides):
    cfg = load_config(overrides=dict(dpg_overrides, **{
        "dpg.reward": "dino", "dpg.critic_input": "features", "dpg.critic_optimizer": "adam", "dpg.critic_lr": 3e-3,
        "dpg.critic_warmup_steps": 30, "train.steps": 40, "train.batch_size": 2, "train.log_every": 10}))
    probe = CriticProbe()
    folder = run(cfg, tmp_path, probe)
    features, t, _ = probe.inputs[0]
    assert features.shape == (2, probe.actor.judge.encoder.dim)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(2))  # unit-norm encoder embeddings
    assert all(g > 0 for g in probe.grad_norms)  # the critic's gradient reaches the U-Net through the features
    errors = [r["critic_abs_error"] for r in records(folder)]
    assert errors[-1] < 0.5 * errors[0], errors  # its prediction error falls during the warm-up


def test_without_look_forward_the_critic_judges_x_t_minus_one(tmp_path, dpg_overrides, monkeypatch):
    judged = []
    real = diffusion.step_back

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        judged.append(out.detach())
        return out

    monkeypatch.setattr(diffusion, "step_back", spy)
    probe = CriticProbe()
    run(load_config(overrides=dict(dpg_overrides, **{"dpg.look_forward": False, "train.steps": 2})), tmp_path, probe)
    assert len(judged) == 2
    # recon critic: its input is the residual of the stepped-back latent
    residual = probe.inputs[0][0]
    assert residual.shape == judged[0].shape
    judged.clear()
    run(load_config(overrides=dict(dpg_overrides, **{"train.steps": 2})), tmp_path, CriticProbe(), name="with")
    assert judged == []  # look-forward on: x0_hat, no step back


@pytest.mark.slow
def test_ceiling_variants_train_as_named(tmp_path, dpg_overrides):
    """dpg-select keeps its best validated weights; dpg-patch regresses its critic on the patch-matching reward."""
    from rewardbooth.methods import resolve_variant
    from rewardbooth.training.run_dir import RunFolder

    for name in ("dpg-select", "dpg-patch"):
        cls, changes = resolve_variant(name)
        cfg = load_config(overrides={**dpg_overrides, **changes, "train.method": cls.name, "train.steps": 4,
                                     "validation.every": 2 if name == "dpg-select" else 0, "dpg.critic_warmup_steps": 1})
        folder = run(cfg, tmp_path, cls(), name=name)
        assert cfg.dpg.critic_input == "features" and RunFolder(folder).read_result() is not None
        if name == "dpg-select":
            assert cfg.validation.select and (folder / "best").is_dir()
        else:
            assert cfg.dpg.reward == "dino_patch" and any("reward_true" in r for r in records(folder))
