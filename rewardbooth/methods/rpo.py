"""RPO: reward preference optimization with the lambda-Harmonic reward (Miao et al., NeurIPS 2024).

Algorithm (docs/methods.md#rpo):
    once:  negatives  y_j ~ base model(training prompt p_j), a few per prompt
           rewards    r(ref_i), r(y_j) with the lambda-Harmonic reward (lambda_train)
    step:  pair (ref_i with the instance prompt, y_j with p_j), label l ~ Bernoulli(sigmoid((r(ref_i) - r(y_j)) / T))
           (rpo.labels=soft: l = the probability itself)
           one t and eps for both images; e(.) = per-sample denoising error of the trained U-Net,
           e_ref(.) the same for the frozen reference (base weights)
           d = (e_ref(ref) - e(ref)) - (e_ref(y) - e(y))
           L = mean e(ref) - mean[ l logsig(beta d) + (1 - l) logsig(-beta d) ]
    every validation: mean lambda-Harmonic reward (validation.select_lambda) of samples; keep the best
           weights (the loop's model selection, on for RPO by default).
"""

from __future__ import annotations

import copy
import json
import shutil
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from rewardbooth.config import RunConfig, ensure
from rewardbooth.data.images import load_image
from rewardbooth.methods.base import Method
from rewardbooth.methods.context import LatentImageSet, TrainContext
from rewardbooth.rewards import Subject, build_reward, park_encoders
from rewardbooth.sampling import METADATA_NAME, SampleSettings, generate, save_generated

# The 8 training prompts of the paper / official code ("[V]" is our {identifier}).
OBJECT_PROMPTS = [
    "a {identifier} {class_noun} in Vincent Van Gogh rendition",
    "a {identifier} {class_noun} on the Moon",
    "a green {identifier} {class_noun}",
    "a {identifier} {class_noun} with a China Great Wall in the background",
    "a {identifier} {class_noun} on top of wooden roof",
    "a {identifier} {class_noun} with the Statue of Liberty in the background",
    "a {identifier} {class_noun} with a volcano in the background",
    "a {identifier} {class_noun} on a subway platform",
]
LIVE_PROMPTS = [
    "a {identifier} {class_noun} wearing a green outfit",
    "a {identifier} {class_noun} in Vincent Van Gogh rendition",
    "a {identifier} {class_noun} with a China Great Wall in the background",
    "a {identifier} {class_noun} is swimming in a pool",
    "a {identifier} {class_noun} on a subway platform",
    "a {identifier} {class_noun} with the Statue of Liberty in the background",
    "a {identifier} {class_noun} on the Moon",
    "a green {identifier} {class_noun}",
]
LIVE_CLASSES = {"dog", "cat"}
NEGATIVES_FOLDER = "negatives"


def preference_loss(e_model: torch.Tensor, e_ref: torch.Tensor, labels: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
    """RPO's loss from per-sample errors; the first half of each tensor is the references."""
    b = labels.shape[0]
    d = (e_ref[:b] - e_model[:b]) - (e_ref[b:] - e_model[b:])
    preference = -(labels * F.logsigmoid(beta * d) + (1 - labels) * F.logsigmoid(-beta * d)).mean()
    reconstruction = e_model[:b].mean()
    return reconstruction + preference, {"loss_reconstruction": reconstruction.detach(), "loss_preference": preference.detach(),
                                         "margin": d.detach().mean()}


@contextmanager
def reference_unet(ctx: TrainContext, frozen_copy):
    """The frozen reference model: a stored copy, or (LoRA) the same U-Net with adapters off."""
    if frozen_copy is not None:
        yield frozen_copy
        return
    unet = ctx.accelerator.unwrap_model(ctx.unet)
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def preference_labels(r_reference: torch.Tensor, r_negative: torch.Tensor, temperature: float, kind: str,
                      generator: torch.Generator) -> torch.Tensor:
    """Bradley-Terry: P(reference preferred) = sigmoid((r_ref - r_neg) / T); a Bernoulli draw or the probability."""
    p_prefer_reference = torch.sigmoid((r_reference - r_negative) / temperature)
    return p_prefer_reference if kind == "soft" else torch.bernoulli(p_prefer_reference, generator=generator)


class RPO(Method):
    name = "rpo"
    summary = ("the paper's preference loss against base-model negatives, labelled by the lambda-Harmonic reward, "
               "with model selection (paper defaults: SD 2.1, full U-Net, lr 5e-6, 400 steps)")
    section = "rpo"
    curves = ("loss", "loss_preference")
    run_files = (NEGATIVES_FOLDER,)
    # MiniBench (docs/minibench.md): full U-Net, 400 steps at batch 1, validation (and selection) every 40 steps; the
    # learning rate bracket round 2's rule chose at batch 1 (set 101; the bracket's smallest rate).
    minibench = {"adapter.kind": "full", "train.learning_rate": 1e-4, "train.steps": 400, "train.batch_size": 1,
                 "validation.every": 40, "validation.num_images": 2, "rpo.negative_steps": 10}
    # mini-flow: negatives drawn as its bench samples (FLOW_SAMPLER_STEPS in mini/preset.py; a test keeps them equal), the
    # rate the flow bracket chose (docs/minibench.md, set 103)
    minibench_models = {"mini-flow": {"rpo.negative_steps": 10, "train.learning_rate": 2e-4}}
    minibench_lora = {"train.learning_rate": 2e-3}  # the LoRA bracket's choice (docs/minibench.md, set 102)
    # the preference term off; labels that carry signal; the official prompt pairing; selection that waits
    variants = {
        "rpo-beta0": {"rpo.beta": 0.0},
        "rpo-soft": {"rpo.labels": "soft", "rpo.label_temperature": 0.05, "rpo.lambda_train": 0.5},
        "rpo-official-pairs": {"rpo.reference_prompt": "negative"},
        "rpo-late-select": {"validation.select_min_step": 200, "validation.select_lambda": 0.7},
    }
    defaults = {
        "model.name": "stabilityai/stable-diffusion-2-1",
        "data.resolution": 512,
        "adapter.kind": "full",  # the official code fine-tunes the whole U-Net
        "train.learning_rate": 5e-6,
        "train.batch_size": 1,
        "train.steps": 400,
        "prior.enabled": False,  # RPO's negatives replace DreamBooth's class images
        "validation.every": 40,
        "validation.select": True,  # keep the best validated weights (lambda-Harmonic, select_lambda 0.5)
        "validation.num_images": 4,
        "validation.prompts": [],  # empty: the 8 training prompts, as the official code validates
    }

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        r = cfg.rpo
        ensure(cfg.train.snr_gamma is None,
               "train.snr_gamma weights denoising losses (dreambooth, dpg); RPO's loss compares likelihoods and is left as its paper has it")
        ensure(r.negatives_per_prompt > 0, "rpo.negatives_per_prompt must be positive")
        ensure(0.0 <= r.lambda_train <= 1.0, "rpo.lambda_train must be in [0, 1]")
        ensure(r.beta >= 0, "rpo.beta must be >= 0")
        ensure(r.label_temperature > 0, "rpo.label_temperature must be positive")
        ensure(r.labels in ("bernoulli", "soft"), f"rpo.labels must be bernoulli or soft, got {r.labels!r}")
        ensure(r.reference_prompt in ("instance", "negative"), f"rpo.reference_prompt must be instance or negative, got {r.reference_prompt!r}")
        ensure(r.reward_encoder in ("align", "clip"), f"rpo.reward_encoder must be align or clip, got {r.reward_encoder!r}")

    def training_prompts(self, ctx: TrainContext) -> list[str]:
        cfg = ctx.cfg
        live = cfg.rpo.live if cfg.rpo.live is not None else cfg.data.class_noun.strip().lower() in LIVE_CLASSES
        templates = cfg.rpo.prompts or (LIVE_PROMPTS if live else OBJECT_PROMPTS)
        return [cfg.format_prompt(p) for p in templates]

    def reward(self, ctx: TrainContext, lam: float):
        cfg = ctx.cfg
        models = {"align": cfg.evaluation.align_model, "clip": cfg.evaluation.clip_model}
        spec = {"name": "lambda_harmonic", "lam": lam, "encoder": cfg.rpo.reward_encoder}
        return build_reward(spec, models=models, device=str(ctx.device))

    def prepare(self, ctx: TrainContext) -> None:
        cfg = ctx.cfg
        references = ctx.instance_images()
        self.subject = Subject("subject", references, cfg.data.identifier, cfg.data.class_noun)
        self.references = LatentImageSet(references, ctx)
        negative_images, self.negative_prompts = self.prepare_negatives(ctx)
        self.negatives = LatentImageSet(negative_images, ctx)

        label_reward = self.reward(ctx, cfg.rpo.lambda_train)
        # Reference rewards per scoring prompt: column 0 the instance prompt, then each negative's prompt
        # (rpo.reference_prompt=negative scores a pair's reference under its negative's prompt).
        self.scoring_prompts = [cfg.instance_prompt, *dict.fromkeys(self.negative_prompts)]
        with torch.no_grad():
            columns = [label_reward(references, [p] * len(references), self.subject).float().cpu() for p in
                       (self.scoring_prompts if cfg.rpo.reference_prompt == "negative" else self.scoring_prompts[:1])]
            self.reference_rewards = torch.stack(columns, dim=1)
            self.negative_rewards = label_reward(negative_images, self.negative_prompts, self.subject).float().cpu()
        self.negative_prompt_column = torch.tensor([self.scoring_prompts.index(p) for p in self.negative_prompts])
        park_encoders()  # the labels are made: the judge is not needed again until a validation
        # Full fine-tuning needs a frozen copy; LoRA reuses the base weights with adapters off.
        self.frozen_copy = None
        if cfg.adapter.kind == "full":
            self.frozen_copy = copy.deepcopy(ctx.components.unet).requires_grad_(False).eval()

    def prepare_negatives(self, ctx: TrainContext):
        """Negatives from the frozen base model, generated once and cached in the run folder."""
        cfg = ctx.cfg
        folder = ctx.run_dir / NEGATIVES_FOLDER
        prompts = self.training_prompts(ctx)
        wanted = len(prompts) * cfg.rpo.negatives_per_prompt
        metadata = folder / METADATA_NAME
        entries = [json.loads(line) for line in metadata.read_text().splitlines()] if metadata.is_file() else []
        if len(entries) != wanted and ctx.accelerator.is_main_process:
            if folder.exists():

                shutil.rmtree(folder)  # an interrupted or differently-sized set: make it again
            settings = SampleSettings(steps=cfg.rpo.negative_steps, guidance_scale=cfg.rpo.negative_guidance,
                                      seed=cfg.train.seed + 2_000_003, resolution=ctx.resolution,
                                      batch_size=cfg.prior.generation_batch_size)
            images = generate(ctx.base_pipeline(), prompts, cfg.rpo.negatives_per_prompt, settings, progress=ctx.progress,
                              description="negatives")
            save_generated(folder, prompts, images, settings.seed)
        ctx.accelerator.wait_for_everyone()
        entries = [json.loads(line) for line in metadata.read_text().splitlines()]
        return [load_image(folder / e["file"]) for e in entries], [e["prompt"] for e in entries]

    def pair_rewards(self, ctx: TrainContext, ref_index: torch.Tensor, neg_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Label rewards of each (reference, negative) pair."""
        column = self.negative_prompt_column[neg_index] if ctx.cfg.rpo.reference_prompt == "negative" else torch.zeros_like(neg_index)
        return self.reference_rewards[ref_index, column], self.negative_rewards[neg_index]

    def loss(self, ctx: TrainContext, generator: torch.Generator):
        cfg = ctx.cfg
        b = cfg.train.batch_size
        ref_index = self.references.sample_indices(b, generator)
        neg_index = self.negatives.sample_indices(b, generator)
        labels = preference_labels(*self.pair_rewards(ctx, ref_index, neg_index), cfg.rpo.label_temperature, cfg.rpo.labels,
                                   generator).to(ctx.device)

        x0 = torch.cat([self.references.latents(ref_index, generator), self.negatives.latents(neg_index, generator)])
        prompts = [cfg.instance_prompt] * b + [self.negative_prompts[j] for j in neg_index.tolist()]
        if cfg.rpo.shared_noise:
            one = ctx.add_noise(x0[:b], generator)
            noised = ctx.add_noise(x0, timesteps=one.timesteps.repeat(2), noise=one.noise.repeat(2, 1, 1, 1))
        else:
            noised = ctx.add_noise(x0, generator)
        text = ctx.encode_prompts(prompts)
        e_model = ctx.denoising_error(ctx.unet, noised, text)
        with torch.no_grad(), reference_unet(ctx, self.frozen_copy) as reference:
            e_ref = ctx.denoising_error(reference, noised, text)
        loss, logs = preference_loss(e_model, e_ref, labels, cfg.rpo.beta)
        return loss, {**logs, "label_mean": labels.float().mean()}

    def unet_batch(self, ctx: TrainContext) -> int:
        return 2 * ctx.cfg.train.batch_size  # references and negatives

    def validation_prompts(self, ctx: TrainContext) -> list[str]:
        return super().validation_prompts(ctx) or self.training_prompts(ctx)
