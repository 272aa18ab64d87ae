"""DPG: deterministic policy gradient with a learned critic and look-forward (Wei et al., ECCV 2024).

Algorithm (specs/METHODS.md section 2), per step on DreamBooth's batch (instance + class images):
    eps_theta = U-Net(x_t, t, c);  x0_hat = look_forward(x_t, eps_theta, t)          (one U-Net call)
    critic:  r = reward of the detached look-forward sample; store (input, r) in the replay;
             phi <- phi - lr * grad_phi MSE(Q_phi(input), r) on replayed pairs
    actor:   L = lambda_prior L_prior + w_inst L_inst + mean_t w(t) * cost(Q_phi(x0_hat))
             with gradients through x0_hat into the U-Net, none into phi; w(t) = gamma^t (released code).
Two critics: "recon" (released code) Q(R), R = (x0_hat - x0_ref)^2, predicts the cost
MSE(x0_hat, x0_ref); a reward critic Q(x0_hat or its image features, t, c) predicts any reward of
the decoded image (DINO to the references by default), so a non-differentiable reward supervises
the actor too. dpg.actor=direct drops the critic and backpropagates a differentiable reward of the
decoded x0_hat; dpg.look_forward=false judges the one-step-denoised x_{t-1} instead (the ablation).
"""

from __future__ import annotations

import warnings

import torch

from rewardbooth import diffusion
from rewardbooth.methods.critics import (
    FeatureCritic,
    ReconstructionCritic,
    Replay,
    RewardCritic,
    critic_regression_loss,
    live_fraction,
)
from rewardbooth.errors import ConfigError
from rewardbooth.methods.dreambooth import DreamBooth
from rewardbooth.rewards import Subject, build_reward
from rewardbooth.training.context import TrainContext

DEAD_CHECK_EVERY = 50  # critic steps between checks for a dead critic
STEP_BACK_STRIDE = 20  # without look-forward: judge x_{t-20}, one step of a 50-step DDIM sampler


class DPG(DreamBooth):
    name = "dpg"
    defaults = {  # the released script's command (train_dpg.sh)
        "model.name": "CompVis/stable-diffusion-v1-4",
        "data.resolution": 512,
        "data.center_crop": False,
        "adapter.kind": "full",
        "adapter.train_text_encoder": True,
        "train.learning_rate": 1e-6,
        "train.batch_size": 1,
        "train.steps": 1000,
        "prior.enabled": True,
        "prior.weight": 1.0,
        "prior.num_class_images": 8,
    }

    def prepare(self, ctx: TrainContext) -> None:
        super().prepare(ctx)
        cfg = ctx.cfg.dpg
        unet_cfg = ctx.components.unet.config
        latent_size = ctx.latent_size
        self.recon = cfg.reward == "recon"
        self.direct = cfg.actor == "direct"
        self.features = cfg.critic_input == "features" and not self.recon
        if not self.recon:
            evaluation = ctx.cfg.evaluation
            models = {"dino": evaluation.dino_model, "clip": evaluation.clip_model, "align": evaluation.align_model}
            self.reward = build_reward(cfg.reward, models=models, device=str(ctx.device))
            self.subject = Subject("subject", self.instance.images, ctx.cfg.data.identifier, ctx.cfg.data.class_noun)
            if self.direct and not self.reward.differentiable:
                raise ConfigError(f"dpg.actor=direct needs a differentiable reward; {cfg.reward!r} is not (use dpg.actor=critic)")
            if self.features and not hasattr(self.reward, "encoder"):
                raise ConfigError(f"dpg.critic_input=features needs a reward with an image encoder; {cfg.reward!r} has none")
        text_dim = unet_cfg.cross_attention_dim  # SDXL: both encoders' widths
        if self.recon:
            self.critic = ReconstructionCritic(unet_cfg.in_channels, latent_size, cfg.critic_hidden, cfg.critic_activation)
        elif self.features:
            self.critic = FeatureCritic(self.reward.encoder.dim, text_dim, cfg.critic_hidden, cfg.critic_activation)
        else:
            self.critic = RewardCritic(unet_cfg.in_channels, text_dim, cfg.critic_hidden, cfg.critic_activation)
        self.critic.to(ctx.device)
        optimizer_cls = torch.optim.SGD if cfg.critic_optimizer == "sgd" else torch.optim.Adam
        self.critic_optimizer = optimizer_cls(self.critic.parameters(), lr=cfg.critic_lr)
        self.replay = Replay(cfg.replay_size)
        self.critic_steps = 0
        self.warned_dead = False

    def extra_modules(self):
        return [self.critic]

    def extra_optimizers(self):
        return [self.critic_optimizer]

    def use_prepared(self, modules, optimizers):
        self.critic_train, self.critic_optimizer = modules[0], optimizers[0]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {**self.replay.state_tensors("replay."), "critic_steps": torch.tensor(self.critic_steps)}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.replay.load_state_tensors(state, "replay.")
        self.critic_steps = int(state["critic_steps"])

    # --- what is judged, and by whom ----------------------------------------------------------
    def decode(self, ctx: TrainContext, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] of latents; differentiable (the VAE is frozen, not detached)."""
        vae = ctx.components.vae
        images = vae.decode((latents / ctx.components.latent_scaling).to(vae.dtype)).sample
        return ((images.float() + 1) / 2).clamp(0, 1)

    def image_reward(self, ctx: TrainContext, images: torch.Tensor) -> torch.Tensor:
        return self.reward(images, [ctx.cfg.instance_prompt] * images.shape[0], self.subject).float().to(images.device)

    def critic_inputs(self, judged, x0_ref, timesteps, text, features=None) -> tuple[torch.Tensor, ...]:
        if self.recon:
            return ((judged - x0_ref) ** 2,)
        return (features if self.features else judged, timesteps, text)

    @torch.no_grad()
    def true_reward(self, ctx: TrainContext, judged: torch.Tensor, x0_ref: torch.Tensor, images=None) -> torch.Tensor:
        """What the critic regresses to. recon: the cost MSE(judged, x0_ref); else the reward of the image."""
        if self.recon:
            return diffusion.per_sample_mse(judged, x0_ref)
        return self.image_reward(ctx, images if images is not None else self.decode(ctx, judged)).detach()

    def actor_weight(self, ctx: TrainContext, t: torch.Tensor) -> torch.Tensor:
        """w(t) of the actor term: gamma^t (released code), capped SNR, or uniform; zero above actor_max_timestep."""
        cfg = ctx.cfg.dpg
        if cfg.weighting == "gamma":
            weight = cfg.gamma ** t.float()
        elif cfg.weighting == "snr":
            weight = diffusion.snr(ctx.noise_scheduler, t).clamp(max=cfg.snr_cap)
        else:
            weight = torch.ones_like(t, dtype=torch.float32)
        if cfg.actor_max_timestep is not None:
            weight = weight * (t < cfg.actor_max_timestep).float()
        return weight

    def actor_cost(self, q: torch.Tensor) -> torch.Tensor:
        """The actor minimises a cost: Q itself for recon (a predicted cost), -Q for a reward."""
        return q if self.recon else -q

    def actor_term(self, ctx: TrainContext, inputs: tuple[torch.Tensor, ...], t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """mean_t w(t) cost(Q(x0_hat)): grad flows through x0_hat into the U-Net, not into phi."""
        critic = ctx.accelerator.unwrap_model(self.critic_train)
        critic.requires_grad_(False)
        try:
            q = critic(*inputs)
        finally:
            critic.requires_grad_(True)
        live = live_fraction(critic)
        # Checking needs a host sync, so look only now and then.
        if self.critic_steps % DEAD_CHECK_EVERY == 1 and not self.warned_dead and live.item() == 0.0:
            warnings.warn("DPG critic is dead (no active hidden unit): its gradient no longer reaches the U-Net; "
                          "use dpg.critic_activation=leaky_relu or a lower dpg.critic_lr", stacklevel=2)
            self.warned_dead = True
        return (self.actor_weight(ctx, t) * self.actor_cost(q)).mean(), q, live

    def memory_probes(self, ctx: TrainContext) -> list:
        probes = super().memory_probes(ctx)
        if self.direct or self.features:  # the look-forward image is decoded and judged with gradients
            b, channels = ctx.cfg.train.batch_size, ctx.components.unet.config.in_channels

            def judge():
                latents = torch.zeros(b, channels, ctx.latent_size, ctx.latent_size, device=ctx.device, requires_grad=True)
                images = self.decode(ctx, latents)
                # The encoder, not the whole reward: a reward may cache its references on first use,
                # and this runs on fake tensors. The comparison after the encoder saves next to nothing.
                encoder = getattr(self.reward, "encoder", None)
                return encoder.encode_images(images) if encoder is not None else images

            probes.append(judge)
        return probes

    # --- one step ----------------------------------------------------------------------------
    def loss(self, ctx: TrainContext, generator: torch.Generator):
        cfg = ctx.cfg.dpg
        noised, text, b = self.sample_batch(ctx, generator)
        prediction = diffusion.unet_output(ctx.unet, noised.noisy, noised.timesteps, text)
        errors = diffusion.per_sample_mse(prediction, diffusion.training_target(ctx.noise_scheduler, noised))
        loss, logs = self.combine(ctx, errors, noised.timesteps, b, instance_weight=cfg.instance_weight)

        # Look-forward on the instance half: where this trajectory would end (or, ablated, one step on).
        t = noised.timesteps[:b]
        if cfg.look_forward:
            judged = diffusion.predict_x0(ctx.noise_scheduler, noised.noisy[:b], prediction[:b], t).float()
        else:
            judged = diffusion.step_back(ctx.noise_scheduler, noised.noisy[:b], prediction[:b], t, STEP_BACK_STRIDE).float()
        x0_ref = noised.x0[:b].float()
        text_b = text.hidden[:b].detach().float()
        images = self.decode(ctx, judged) if (self.direct or self.features) else None
        # Encoder features of the judged image, computed once: the actor's (with grad) and, detached, the replay's.
        features = self.reward.encoder.encode_images(images) if self.features else None

        if self.direct:  # no critic: the reward's own gradient
            reward = self.image_reward(ctx, images)
            actor_term = -(self.actor_weight(ctx, t) * reward).mean()
            return loss + cfg.reward_weight * actor_term, {**logs, "actor_reward_term": actor_term.detach(),
                                                           "reward_true": reward.detach().mean()}

        # Critic step on detached samples (replayed with recent ones).
        target = self.true_reward(ctx, judged.detach(), x0_ref, images.detach() if images is not None else None)
        detached_features = features.detach() if features is not None else None
        self.replay.add(self.critic_inputs(judged.detach(), x0_ref, t, text_b, detached_features), target)
        inputs, targets = self.replay.sample(cfg.critic_batch_size, newest=b, generator=generator)
        self.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss = critic_regression_loss(self.critic_train(*inputs), targets)
        critic_loss.backward()
        torch.nn.utils.clip_grad_norm_(self.critic_train.parameters(), cfg.critic_max_grad_norm)
        self.critic_optimizer.step()
        self.critic_optimizer.zero_grad(set_to_none=True)
        self.critic_steps += 1

        actor_term, q, live = self.actor_term(ctx, self.critic_inputs(judged, x0_ref, t, text_b, features), t)
        if self.critic_steps > cfg.critic_warmup_steps:
            loss = loss + cfg.reward_weight * actor_term
        reward_true = target if not self.recon else -target  # log rewards (higher is better) for both kinds
        q_reward = q.detach() if not self.recon else -q.detach()
        return loss, {**logs, "actor_q_term": actor_term.detach(), "critic_loss": critic_loss.detach(),
                      "critic_live_fraction": live, "reward_true": reward_true.mean(),
                      "reward_predicted": q_reward.mean(), "critic_abs_error": (q_reward - reward_true).abs().mean()}
