"""Guards on the methods' loss formulas, checked on what the loss actually sees.

Each test trains a step or two on the tiny preset, spies on the diffusion primitives (or plants
a known policy / timesteps / critic recorder) and recomputes the loss by hand from the same
inputs:
- RPO's reference errors come from the frozen base weights (full: a frozen copy; LoRA: adapters
  off), never from the policy being trained;
- RPO's reference image and negative share t and eps under `rpo.shared_noise`, and do not without;
- `prior.weight` scales DreamBooth's and DPG's prior loss: L = instance part + weight * prior part;
- DPG's actor term (default weighting) is mean_t gamma^t * cost(Q(x0_hat)).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from rewardbooth import diffusion
from rewardbooth.methods import load_config
from rewardbooth.methods.dpg import DPG, RELEASED_CRITIC
from rewardbooth.methods.dreambooth import DreamBooth
from rewardbooth.methods.rpo import RPO
from rewardbooth.models.loading import load_components
from rewardbooth.training.loop import train
from rewardbooth.training.run_dir import prepare_run_dir


def run(cfg, tmp_path, method, name="run"):
    folder = tmp_path / name
    prepare_run_dir(folder, resume=False, overwrite=False)
    train(cfg, folder, progress=False, method=method)
    return folder


@pytest.fixture
def denoising_calls(monkeypatch):
    """Every denoising-error call of any model family: (denoiser, batch, text, per-sample errors)."""
    from rewardbooth.models.family import ModelFamily

    calls = []
    real = ModelFamily.denoising_error

    def spy(family, unet, batch, text_embeddings):
        errors = real(family, unet, batch, text_embeddings)
        calls.append((unet, batch, text_embeddings.detach(), errors.detach().clone()))
        return errors

    monkeypatch.setattr(ModelFamily, "denoising_error", spy)
    return calls


@pytest.fixture
def noised_batches(monkeypatch):
    """Every NoisedBatch a model family's noising returns (DDPM or flow matching), in order."""
    from rewardbooth.models.family import FlowFamily

    batches = []
    real, real_flow = diffusion.add_noise, FlowFamily.add_noise

    def spy(scheduler, x0, generator=None, **kw):
        batch = real(scheduler, x0, generator, **kw)
        batches.append(batch)
        return batch

    def flow_spy(family, x0, generator=None, **kw):
        batch = real_flow(family, x0, generator, **kw)
        batches.append(batch)
        return batch

    monkeypatch.setattr(diffusion, "add_noise", spy)
    monkeypatch.setattr(FlowFamily, "add_noise", flow_spy)
    return batches


def eps_errors(unet, scheduler, batch, text, family=None) -> torch.Tensor:
    """Per-sample ||unet(x_t, t, c) - eps||^2 computed here, for an epsilon-prediction model; on a flow
    model (`family`) ||v(x_t, s, c) - (eps - x0)||^2, the velocity error."""
    with torch.no_grad():
        if family is not None and family.flow_matching:
            prediction, target = family.predict(unet, batch.noisy, batch.timesteps, text), batch.noise - batch.x0
        else:
            assert scheduler.config.prediction_type == "epsilon"
            prediction, target = diffusion.unet_output(unet, batch.noisy, batch.timesteps, text), batch.noise
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)


# --- RPO ---------------------------------------------------------------------------------------

@pytest.fixture
def rpo_overrides(tiny_overrides):
    return dict(tiny_overrides, **{
        "train.method": "rpo", "model.name": "tiny", "data.resolution": 32, "train.learning_rate": 1e-3,
        "train.batch_size": 2, "validation.every": 0, "rpo.negatives_per_prompt": 1, "rpo.negative_steps": 2,
        "evaluation.align_model": "tiny", "evaluation.clip_model": "tiny",
    })


def rpo_loss_by_hand(e_model, e_ref, labels, beta):
    """L = mean e(ref) - mean[l logsig(beta d) + (1 - l) logsig(-beta d)], first half = references."""
    b = labels.shape[0]
    d = (e_ref[:b] - e_model[:b]) - (e_ref[b:] - e_model[b:])
    logsig = F.logsigmoid
    return (e_model[:b].mean() - (labels * logsig(beta * d) + (1 - labels) * logsig(-beta * d)).mean()).item()


class PlantedPolicyRPO(RPO):
    """RPO whose policy is moved away from the base weights before its first loss.

    (LoRA B matrices start at zero and a full fine-tune starts at the base weights, so without
    this the policy and the reference coincide at the first step.) After each loss() it records
    the loss and the per-sample errors of the policy and of the base model on the U-Net's inputs.
    """

    def __init__(self, base_unet, calls, scale):
        self.base_unet, self.calls, self.scale, self.records, self.planted = base_unet, calls, scale, [], False

    def loss(self, ctx, generator):
        if not self.planted:
            g = torch.Generator().manual_seed(11)
            with torch.no_grad():
                for p in ctx.accelerator.unwrap_model(ctx.unet).parameters():
                    if p.requires_grad:
                        p.add_(torch.randn(p.shape, generator=g).to(p) * self.scale)
            self.planted = True
        start = len(self.calls)
        loss, logs = super().loss(ctx, generator)
        _, batch, text, _ = self.calls[start]  # what the U-Net was asked to denoise this step
        e_policy = eps_errors(ctx.unet, ctx.noise_scheduler, batch, text, ctx.family)
        e_base = eps_errors(self.base_unet, ctx.noise_scheduler, batch, text, ctx.family)
        self.records.append((loss.detach().item(), e_policy, e_base))
        return loss, logs


@pytest.mark.slow
@pytest.mark.parametrize("kind, model", [("lora", "tiny"), ("full", "tiny"), ("lora", "tiny-flux"), ("full", "tiny-flux")])
def test_rpo_reference_errors_come_from_the_frozen_base_model(tmp_path, rpo_overrides, denoising_calls, kind, model):
    beta = 20.0
    overrides = dict(rpo_overrides, **{"adapter.kind": kind, "train.steps": 2, "rpo.beta": beta, "model.name": model})
    if model != "tiny":
        overrides["data.resolution"] = 64
    if kind == "full":
        overrides["train.learning_rate"] = 1e-4
    cfg = load_config(overrides=overrides)
    base_unet = load_components(model).unet.eval()
    method = PlantedPolicyRPO(base_unet, denoising_calls, scale=0.3 if kind == "lora" else 0.05)
    run(cfg, tmp_path, method)
    assert len(method.records) == 2
    b = cfg.train.batch_size
    for loss, e_policy, e_base in method.records:
        # The planted policy really differs from the base model on these inputs.
        assert (e_policy - e_base).abs().max() > 1e-3, (e_policy, e_base)
        # Labels are drawn inside the loss: accept any labelling, but only with the base model as reference.
        candidates = [rpo_loss_by_hand(e_policy, e_base, torch.tensor(ls), beta)
                      for ls in itertools.product([0.0, 1.0], repeat=b)]
        assert min(abs(loss - c) for c in candidates) < 1e-4 * max(1.0, abs(loss)), (loss, candidates)
        # The policy as its own reference gives d = 0: L = mean e(ref) + log 2, whatever the labels.
        policy_as_reference = e_policy[:b].mean().item() + math.log(2)
        assert abs(loss - policy_as_reference) > 1e-2, (loss, policy_as_reference)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny", "tiny-flux"])
@pytest.mark.parametrize("shared", [True, False])
def test_rpo_shared_noise_pairs_reference_and_negative(tmp_path, rpo_overrides, denoising_calls, shared, model):
    cfg = load_config(overrides=dict(rpo_overrides, **{"adapter.kind": "lora", "train.steps": 2, "train.batch_size": 3,
                                                       "rpo.shared_noise": shared, "model.name": model,
                                                       "data.resolution": 64 if model == "tiny-flux" else 32}))
    run(cfg, tmp_path, RPO())
    b = cfg.train.batch_size
    family = load_components(model).family()
    assert len(denoising_calls) >= 2  # the policy's and the reference's errors, each step
    for _, batch, _, _ in denoising_calls:
        assert batch.x0.shape[0] == 2 * b
        # x_t is formed from this batch's own x0, eps and t (DDPM, or flow matching's (1 - s) x0 + s eps).
        torch.testing.assert_close(batch.noisy, family.add_noise(batch.x0, timesteps=batch.timesteps, noise=batch.noise).noisy)
        assert not torch.allclose(batch.x0[:b], batch.x0[b:])  # a reference and a negative, not one image twice
        same_t = torch.equal(batch.timesteps[:b], batch.timesteps[b:])
        same_eps = torch.equal(batch.noise[:b], batch.noise[b:])
        if shared:
            assert same_t and same_eps, (batch.timesteps, same_eps)
        else:
            assert not same_t and not same_eps, (batch.timesteps, same_eps)
            assert (batch.noise[:b] - batch.noise[b:]).abs().flatten(1).max(1).values.min() > 0.1


# --- prior preservation weight (DreamBooth, DPG) --------------------------------------------

class FirstLoss:
    """Mixin: record the first loss and its instance / prior parts, recomputed by hand.

    The batch is the last NoisedBatch add_noise returned during the loss: the first b rows
    instance images (instance prompt), the next b class images (class prompt).
    """

    def __init__(self, batches):
        self.batches, self.first = batches, None

    def loss(self, ctx, generator):
        start = len(self.batches)
        loss, logs = super().loss(ctx, generator)
        if self.first is None:
            cfg, b = ctx.cfg, ctx.cfg.train.batch_size
            batch = self.batches[-1]
            assert len(self.batches) > start and batch.x0.shape[0] == 2 * b
            c = ctx.components
            prompts = [cfg.instance_prompt] * b + [cfg.class_prompt] * b
            if ctx.family.flow_matching:  # the velocity error, its target written out here
                text = ctx.family.encode_prompts(c.text_encoders, prompts, ctx.resolution).detach()
                with torch.no_grad():
                    prediction = ctx.family.predict(ctx.unet, batch.noisy, batch.timesteps, text)
                errors = (prediction.float() - (batch.noise - batch.x0).float()).pow(2).flatten(1).mean(1)
            else:
                text = diffusion.encode_prompts(c.tokenizer, c.text_encoder, prompts)
                errors = eps_errors(ctx.unet, ctx.noise_scheduler, batch, text.detach())
            self.first = (loss.detach().item(), errors[:b].mean().item(), errors[b:].mean().item())
        return loss, logs


class FirstLossDreamBooth(FirstLoss, DreamBooth):
    pass


class FirstLossDPG(FirstLoss, DPG):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny", "tiny-flux"])
@pytest.mark.parametrize("method_name", ["dreambooth", "dpg"])
def test_prior_weight_scales_the_prior_loss(tmp_path, tiny_overrides, noised_batches, method_name, model):
    overrides = dict(tiny_overrides, **{"train.method": method_name, "adapter.kind": "lora", "train.steps": 1, "train.batch_size": 2,
                                        "prior.enabled": True, "model.name": model, "data.resolution": 64 if model == "tiny-flux" else 32})
    if method_name == "dpg":
        overrides.update({"adapter.train_text_encoder": False, "data.center_crop": True, "dpg.instance_weight": 0.5})
    cls = FirstLossDreamBooth if method_name == "dreambooth" else FirstLossDPG
    results = {}
    for weight in (0.25, 3.0):
        cfg = load_config(overrides=dict(overrides, **{"prior.weight": weight}))
        method = cls(noised_batches)
        run(cfg, tmp_path, method, name=f"w{weight}")
        results[weight] = method.first
    (loss_a, inst_a, prior_a), (loss_b, inst_b, prior_b) = results[0.25], results[3.0]
    # Same seed, same first batch: only the weight differs between the two runs.
    assert inst_a == pytest.approx(inst_b, rel=1e-6) and prior_a == pytest.approx(prior_b, rel=1e-6)
    assert prior_a > 1e-2
    # The loss moves by exactly the weight change times the prior part.
    assert loss_b - loss_a == pytest.approx((3.0 - 0.25) * prior_a, rel=1e-4)
    if method_name == "dreambooth":
        for weight, (loss, inst, prior) in results.items():
            assert loss == pytest.approx(inst + weight * prior, rel=1e-5), weight


# --- DPG actor weighting ---------------------------------------------------------------------

class RecordingCritic(torch.nn.Module):
    """Wraps the real critic and records each output, flagged by whether an input carries a
    gradient (the actor's look-forward sample does; the critic's replayed samples do not)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.outputs: list[tuple[bool, torch.Tensor]] = []

    def forward(self, *inputs):
        out = self.inner(*inputs)
        self.outputs.append((any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs), out.detach().clone()))
        return out

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


class ActorProbeDPG(DPG):
    def __init__(self):
        self.records = []

    def prepare(self, ctx):
        super().prepare(ctx)
        self.actor.critic = RecordingCritic(self.actor.critic)

    def loss(self, ctx, generator):
        critic = self.actor.critic
        start = len(critic.outputs)
        loss, logs = super().loss(ctx, generator)
        actor_q = [q for through_actor, q in critic.outputs[start:] if through_actor]
        assert len(actor_q) == 1, "expected one critic call on the look-forward sample per loss"
        self.records.append((loss.detach().item(), actor_q[0]))
        return loss, logs


PLANTED_TIMESTEPS = [[20, 600], [900, 5], [300, 150]]


@pytest.mark.parametrize("reward", ["recon", "reward_critic"])
def test_dpg_actor_term_is_gamma_to_the_t_weighted_cost(tmp_path, tiny_overrides, monkeypatch, reward):
    gamma = 0.99
    planted = iter(PLANTED_TIMESTEPS)
    used = []
    real_add_noise = diffusion.add_noise

    def planted_add_noise(scheduler, x0, generator=None, timesteps=None, noise=None, **kw):
        if timesteps is None:
            timesteps = torch.tensor(next(planted), device=x0.device)
            used.append(timesteps.clone())
        return real_add_noise(scheduler, x0, generator, timesteps=timesteps, noise=noise, **kw)

    monkeypatch.setattr(diffusion, "add_noise", planted_add_noise)
    overrides = dict(tiny_overrides, **{**RELEASED_CRITIC, **{  # the released critic, gamma^t weighting, on latents
        "train.method": "dpg", "adapter.kind": "lora", "adapter.train_text_encoder": False, "data.resolution": 32,
        "data.center_crop": True, "train.steps": len(PLANTED_TIMESTEPS), "train.batch_size": 2,
        # Only the actor term is left in the loss.
        "prior.enabled": False, "dpg.instance_weight": 0.0, "dpg.critic_warmup_steps": 0, "dpg.gamma": gamma,
        "evaluation.dino_model": "tiny", "evaluation.clip_model": "tiny", "evaluation.align_model": "tiny",
    }})
    if reward == "reward_critic":
        overrides.update({"dpg.reward": "dino", "dpg.critic_optimizer": "adam", "dpg.critic_lr": 1e-3})
    cfg = load_config(overrides=overrides)
    method = ActorProbeDPG()
    run(cfg, tmp_path, method)
    assert len(method.records) == len(PLANTED_TIMESTEPS) == len(used)
    T = load_components("tiny").noise_scheduler.config.num_train_timesteps
    sign = 1.0 if reward == "recon" else -1.0  # recon's Q is a cost; a reward critic's Q is a reward
    for (loss, q), t in zip(method.records, used):
        t = t.double()
        cost = sign * q.double()
        expected = (gamma ** t * cost).mean().item()
        reversed_weighting = (gamma ** (T - t) * cost).mean().item()
        assert abs(expected - reversed_weighting) > 1e-2 * max(abs(expected), 1e-6)
        assert loss == pytest.approx(expected, rel=1e-4, abs=1e-7), (loss, expected, reversed_weighting)
