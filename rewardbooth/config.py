"""The typed run configuration: dataclass sections, YAML files, dotted overrides, validation.

A run is fully described by one `RunConfig`; its resolved form is written to the run folder as
config.yaml, so `rewardbooth train --config RUN/config.yaml` repeats the run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rewardbooth.errors import ConfigError

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
TRACKERS = ("tensorboard", "wandb")


@dataclass
class ModelConfig:
    name: str = DEFAULT_MODEL  # hub id, local diffusers folder, or a built-in preset ("tiny")
    revision: str | None = None
    variant: str | None = None  # e.g. "fp16" weight files on the hub
    vae: str | None = None  # another AutoencoderKL (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in fp16
    quantize: str | None = None  # int8 | fp8: the frozen denoiser's weights quantized by torchao (LoRA only; rewardbooth[quant])
    # The frozen language-model text encoders (T5-XXL: 9.5 GB in bf16; FLUX.2's Qwen3) kept in CPU memory and streamed to
    # the GPU layer by layer when a prompt is encoded (training caches its prompts' embeddings, so that is rare).
    # None: on for flow models on a GPU. CLIP encoders and U-Net models are unaffected.
    offload_text_encoders: bool | None = None


@dataclass
class DataConfig:
    instance_dir: str | None = None
    class_noun: str | None = None
    identifier: str = "sks"
    instance_prompt: str = "a photo of {identifier} {class_noun}"
    class_prompt: str = "a photo of {class_noun}"
    resolution: int | None = None  # None: the model's native size (U-Net sample size x VAE factor)
    center_crop: bool = True  # False: random crops, re-encoded every step
    random_flip: bool = False
    min_image_size: int | None = None  # None: half the resolution
    cache_latents: bool = False  # keep class images' VAE latents on disk (run folder), encoded once across resumes


@dataclass
class PriorConfig:
    enabled: bool = True
    weight: float = 1.0
    num_class_images: int = 100
    class_dir: str | None = None  # user-provided class images; missing ones are generated
    generation_steps: int = 25
    generation_guidance: float = 7.5
    generation_batch_size: int = 4  # also RPO's negatives


@dataclass
class AdapterConfig:
    kind: str = "lora"  # "lora" or "full" (full U-Net fine-tuning)
    rank: int = 4
    alpha: float | None = None  # None: equal to rank (scale 1)
    dropout: float = 0.0
    # What LoRA adapts in the denoiser: "attention" (the attention projections: SD's to_q/k/v/out, and on flow
    # transformers both streams' projections, as diffusers' scripts) or "all-linear" (every linear layer of the
    # transformer / U-Net blocks, as kohya and ai-toolkit). target_modules, when set, names the modules instead.
    targets: str = "attention"
    target_modules: list[str] | None = None
    train_text_encoder: bool = False


@dataclass
class TrainConfig:
    method: str | None = None  # a registered method's name; None: the registry's baseline (see rewardbooth.methods)
    steps: int = 400
    learning_rate: float | None = None  # None: 1e-4 with LoRA, 5e-6 for full fine-tuning
    text_encoder_learning_rate: float | None = None  # None: same as learning_rate
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    lr_scheduler: str = "constant"  # any diffusers.optimization scheduler name
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    # A NaN/inf loss or gradient norm: stop (the last finite checkpoint is kept, no result is written), or
    # skip that optimizer step, stopping after max_nonfinite_steps skipped in a row.
    on_nonfinite: str = "stop"  # stop | skip
    max_nonfinite_steps: int = 10
    mixed_precision: str = "no"  # "no", "fp16" or "bf16"
    gradient_checkpointing: bool = False
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100  # 0: only the final weights
    checkpoints_total_limit: int | None = 2  # keep the newest N checkpoints
    # Budgets: also keep the result as it stood at these steps (budgets/step-N/), so one run to the
    # largest budget gives every smaller one (the best validated weights so far under selection).
    save_steps: list[int] = field(default_factory=list)
    # Options of common trainers (kohya, diffusers' examples); off by default, as the papers trained.
    snr_gamma: float | None = None  # min-SNR-gamma weighting of the denoising losses (Hang et al. 2023; 5.0 is theirs)
    noise_offset: float = 0.0  # offset noise: + offset * N(0, 1) per image and channel, for darker/brighter images
    ema_decay: float | None = None  # e.g. 0.999: an EMA of the trained weights is validated, selected and saved
    optimizer: str = "adamw"  # adamw | adamw8bit (rewardbooth[bnb]) | prodigy (rewardbooth[prodigy]; use learning_rate 1.0)
    report_to: str | None = None  # tensorboard | wandb (accelerate trackers); metrics.jsonl is written either way
    # Full fine-tuning past one card: shard the trained weights, their gradients and optimizer state (and RPO's frozen
    # reference) over the processes of --num-processes / accelerate launch, per block (PyTorch FSDP2; training/sharding.py).
    fsdp: bool = False


@dataclass
class ValidationConfig:
    prompts: list[str] = field(default_factory=lambda: ["a {identifier} {class_noun} on the beach"])
    every: int = 100  # steps; 0 disables validation during training
    num_images: int = 2
    steps: int = 25
    batch_size: int = 4  # images per sampler call
    guidance_scale: float = 7.5
    # Model selection (any method): keep the validated weights with the best lambda-Harmonic reward
    # (select_lambda: 1 = image fidelity only, 0 = text only) as the result. None: the method's default
    # (RPO on, as its paper; DreamBooth and DPG off).
    select: bool | None = None
    select_lambda: float = 0.5
    select_encoder: str = "align"  # "align" (RPO's paper) or "clip"
    select_min_step: int = 0  # validations before this step are never selected (the subject is not learned yet)
    # Under selection: stop after this many validations without improvement (0: never stop early).
    patience: int = 0


@dataclass
class EvaluationConfig:
    dino_model: str = "facebook/dino-vits16"
    clip_model: str = "openai/clip-vit-base-patch16"  # RPO's choice; DreamBooth's paper also used ViT-B/32, L/14
    align_model: str = "kakaobrain/align-base"  # RPO's lambda-Harmonic encoder
    # More rewards to report beside DINO / CLIP-I / CLIP-T: registered names or "module:function".
    extra_rewards: list[str] = field(default_factory=list)


@dataclass
class RPOConfig:
    negatives_per_prompt: int = 4  # the paper's 4; the official train.py makes 16
    negative_steps: int = 50
    negative_guidance: float = 7.5
    beta: float = 1.0  # 0: the preference term carries no gradient (the reconstruction-only ablation)
    # lambda of the lambda-Harmonic reward behind the preference labels. The paper speaks of
    # lambda_train; the official code scores labels with 0.0 (text side only): that is our default.
    lambda_train: float = 0.0
    reward_encoder: str = "align"  # "align" (paper) or "clip"
    # P(reference preferred) = sigmoid((r_ref - r_neg) / label_temperature): rewards live in [0, 1], so at
    # temperature 1 (paper, code) the labels are near coin flips.
    label_temperature: float = 1.0
    labels: str = "bernoulli"  # "bernoulli" (paper: a label drawn per pair) or "soft" (the probability itself)
    # The prompt the reference image is scored with for its label: "instance" (ours) or "negative"
    # (official code: the paired negative's own prompt, both images under the same condition).
    reference_prompt: str = "instance"
    shared_noise: bool = True  # the paper: one t and eps per (reference, negative) pair
    live: bool | None = None  # live-subject prompt list; None: class noun is dog or cat
    prompts: list[str] = field(default_factory=list)  # training prompts; empty: the paper's 8 (object or live list)


@dataclass
class DPGConfig:
    # "recon": the released code's reconstruction critic over (x0_hat - x0_ref)^2; any other value
    # is a reward spec (registered name or "module:function") for the paper's reward-model critic.
    reward: str = "recon"
    # How the actor term is weighted over timesteps: "gamma" (released code: gamma ** t; on an x0-space
    # cost this puts almost all weight on t >= 500, see docs/minibench.md), "snr" (abar / (1 - abar),
    # capped at snr_cap: the weight DreamBooth's epsilon loss gives x0 errors, favouring detail steps), "uniform".
    weighting: str = "gamma"
    gamma: float = 0.9986
    snr_cap: float = 5.0
    actor_max_timestep: int | None = None  # the actor term only for t below this (None: every t)
    # False: the paper's ablation, judging x_{t-20} (one deterministic DDIM step back, methods/dpg.py STEP_BACK_STRIDE:
    # one step of a 50-step sampler) instead of x0_hat
    look_forward: bool = True
    # "critic": the paper's DPG, the actor follows a learned critic's gradient; "direct": backpropagate a
    # differentiable reward of the decoded look-forward image (no critic; the reference point for the critic).
    actor: str = "critic"
    reward_weight: float = 1.0  # scale of the actor term
    # Reward critic input: "latent" (x0_hat, t, text) or "features" (the reward encoder's features of the
    # decoded look-forward image, t, text: what the reward is computed from).
    critic_input: str = "latent"
    instance_weight: float = 0.0  # weight of the plain instance loss; 0 as in the released code
    critic_optimizer: str = "sgd"  # "sgd" (released code) or "adam"
    critic_lr: float = 0.01
    # Not in the released code: without it SGD on large early residuals can blow the critic up (NaN).
    critic_max_grad_norm: float = 1.0
    critic_activation: str = "leaky_relu"  # "relu" reproduces the released critic, whose units can die
    critic_hidden: int = 64
    critic_warmup_steps: int = 0  # critic-only steps before its gradient reaches the actor
    replay_size: int = 64  # recent (critic input, reward) pairs kept for critic regression
    critic_batch_size: int = 8  # pairs per critic step, newest included


@dataclass
class FlowConfig:
    """Flow-matching models (FLUX.1): how training draws sigma and weights the velocity errors."""

    weighting: str = "logit_normal"  # sigma density: uniform | logit_normal | mode (diffusers' training utilities)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    # s' = k s / (1 + (k - 1) s); None: the model's own (FLUX.1: exp(mu) from the image's token count, as it samples)
    shift: float | None = None
    loss_weighting: str = "none"  # none | sigma_sqrt | cosmap (diffusers' compute_loss_weighting_for_sd3)
    # The guidance value a guidance-distilled transformer (FLUX.1-dev) is fed in training: 1.0 as ai-toolkit,
    # SimpleTuner and OneTrainer (no guidance baked into the LoRA); diffusers' and kohya's scripts use 3.5.
    guidance: float = 1.0


LORA_TARGET_PRESETS = ("attention", "all-linear")
QUANTIZATIONS = ("int8", "fp8")  # model.quantize: torchao weight-only configs; fp8 needs a GPU with fp8 support
FLOW_WEIGHTINGS = ("uniform", "logit_normal", "mode")
FLOW_LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
# `bench --suite` names of MiniBench -> what each method trains there (the whole denoiser or a LoRA); here, the leaf
# both the CLI and the web app import cheaply, so the two never disagree.
MINIBENCH_SUITES = {"mini": "full", "mini-lora": "lora"}


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    rpo: RPOConfig = field(default_factory=RPOConfig)
    dpg: DPGConfig = field(default_factory=DPGConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)

    # --- derived values -------------------------------------------------------------------
    def format_prompt(self, template: str) -> str:
        return template.format(identifier=self.data.identifier, class_noun=self.data.class_noun)

    @property
    def instance_prompt(self) -> str:
        return self.format_prompt(self.data.instance_prompt)

    @property
    def class_prompt(self) -> str:
        return self.format_prompt(self.data.class_prompt)

    @property
    def learning_rate(self) -> float:
        if self.train.learning_rate is not None:
            return self.train.learning_rate
        return 1e-4 if self.adapter.kind == "lora" else 5e-6

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_flat_dict(self) -> dict[str, Any]:
        """Every setting under its dotted key, e.g. {"train.steps": 400, ...}."""
        return {f"{section}.{key}": value for section, values in self.to_dict().items() for key, value in values.items()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --- building a config from YAML and overrides -----------------------------------------------


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise a ConfigError naming the key."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"setting {key} must be a list, got {value!r}")
        return [_coerce(v, item_type, key) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"setting {key} must be true or false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"setting {key} must be a number, got {value!r}")
        try:
            number = float(value) if annotation is float else int(str(value), 0) if isinstance(value, str) else value
        except (TypeError, ValueError):
            raise ConfigError(f"setting {key} must be {'a number' if annotation is float else 'an integer'}, got {value!r}") from None
        if annotation is int and (not isinstance(number, int) and not float(number).is_integer()):
            raise ConfigError(f"setting {key} must be an integer, got {value!r}")
        return annotation(number)
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"setting {key} must be text, got {value!r}")
        return str(value)
    return value


def _apply(section: Any, values: dict[str, Any], prefix: str, explicit: set[str] | None = None) -> None:
    """Set values on a (nested) section; `explicit` collects the dotted keys that were set."""
    names = {f.name for f in dataclasses.fields(section)}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in names:
            raise ConfigError(f"unknown setting {key} (valid: {', '.join(sorted(names))})")
        current = getattr(section, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"setting {key} must be a section (a mapping), got {value!r}")
            _apply(current, value, key, explicit)
        else:
            setattr(section, name, _coerce(value, _field_type(type(section), name), key))
            if explicit is not None:
                explicit.add(key)


def set_value(cfg: RunConfig, dotted_key: str, value: Any, explicit: set[str] | None = None) -> None:
    """Set one dotted setting, e.g. set_value(cfg, "train.lr", "1e-4")."""
    *path, name = dotted_key.split(".")
    nested: Any = {name: value}
    for part in reversed(path):
        nested = {part: nested}
    _apply(cfg, nested, "", explicit)


def parse_override(text: str) -> tuple[str, Any]:
    """Parse a `--set key=value` override; the value is read as YAML (numbers, lists, bools)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


# A source of defaults: (config so far, dotted keys the file and overrides set) -> {dotted key: value}.
DefaultsSource = Callable[["RunConfig", set[str]], dict[str, Any]]


def build_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                 defaults: Sequence[DefaultsSource] = (), checks: Sequence[Callable[["RunConfig"], None]] = ()) -> RunConfig:
    """Dataclass defaults, then the YAML file (if any), then overrides; then each source of
    `defaults` in order, on the keys the file and overrides leave unset; validated, then `checks`.

    The library's resolver (`rewardbooth.methods.load_config`) passes the method's and the
    preset's defaults and the method's checks; a saved config.yaml sets every key, so it
    always reproduces its run.
    """
    cfg = RunConfig()
    explicit: set[str] = set()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0] if str(exc) else "invalid YAML"
            raise ConfigError(f"config file {path} is not valid YAML: {first}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        _apply(cfg, values, "", explicit)
    for key, value in (overrides or {}).items():
        if value is not None:
            set_value(cfg, key, value, explicit)
    for source in defaults:
        for key, value in source(cfg, explicit).items():
            if key not in explicit:
                set_value(cfg, key, value)
    validate(cfg)
    for check in checks:
        check(cfg)
    return cfg


FLOAT32_MAX = 3.4028234663852886e38


def ensure(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(cfg: RunConfig) -> None:
    """Reject settings that cannot work, each with a message naming the setting."""
    t, d, a, p, v = cfg.train, cfg.data, cfg.adapter, cfg.prior, cfg.validation
    ensure(bool(t.method), "train.method must name a method")
    ensure(t.steps > 0, f"train.steps must be positive, got {t.steps}")
    ensure(t.batch_size > 0, f"train.batch_size must be positive, got {t.batch_size}")
    ensure(t.gradient_accumulation_steps > 0, "train.gradient_accumulation_steps must be positive")
    for key, lr in (("learning_rate", cfg.learning_rate), ("text_encoder_learning_rate", t.text_encoder_learning_rate)):
        # The optimizers' float32 arithmetic overflows past FLOAT32_MAX: a traceback mid-step, not a message.
        ensure(lr is None or 0 < lr <= FLOAT32_MAX, f"train.{key} must be positive and finite in float32, got {lr}")
    ensure(t.mixed_precision in ("no", "fp16", "bf16"), f"train.mixed_precision must be no, fp16 or bf16, got {t.mixed_precision!r}")
    ensure(t.log_every > 0, "train.log_every must be positive")
    ensure(a.targets in LORA_TARGET_PRESETS, f"adapter.targets must be one of {', '.join(LORA_TARGET_PRESETS)}, got {a.targets!r}")
    ensure(t.checkpoint_every >= 0, "train.checkpoint_every must be 0 (off) or positive")
    ensure(t.max_grad_norm > 0, "train.max_grad_norm must be positive")
    ensure(t.on_nonfinite in ("stop", "skip"), f"train.on_nonfinite must be stop or skip, got {t.on_nonfinite!r}")
    ensure(t.max_nonfinite_steps > 0, f"train.max_nonfinite_steps must be positive, got {t.max_nonfinite_steps}")
    ensure(t.snr_gamma is None or t.snr_gamma > 0, f"train.snr_gamma must be positive (or unset), got {t.snr_gamma}")
    ensure(t.noise_offset >= 0, f"train.noise_offset must be >= 0, got {t.noise_offset}")
    ensure(not (d.cache_latents and not d.center_crop), "data.cache_latents needs center crops (random crops change the pixels every "
           "step; DPG's defaults crop at random, as its released script): add --center-crop (data.center_crop=true)")
    ensure(t.ema_decay is None or 0 < t.ema_decay < 1, f"train.ema_decay must be in (0, 1) (or unset), got {t.ema_decay}")
    ensure(t.optimizer in OPTIMIZERS, f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got {t.optimizer!r}")
    ensure(t.report_to in (None, *TRACKERS), f"train.report_to must be one of {', '.join(TRACKERS)} (or unset), got {t.report_to!r}")
    ensure(a.kind in ("lora", "full"), f"adapter.kind must be lora or full, got {a.kind!r}")
    ensure(a.rank > 0, f"adapter.rank must be positive, got {a.rank}")
    ensure(0.0 <= a.dropout < 1.0, "adapter.dropout must be in [0, 1)")
    ensure(d.resolution is None or (d.resolution >= 8 and d.resolution % 8 == 0), f"data.resolution must be a multiple of 8, got {d.resolution}")
    ensure(bool(d.identifier.strip()), "data.identifier must not be empty")
    ensure(p.weight >= 0, "prior.weight must be non-negative")
    ensure(p.num_class_images > 0 or not p.enabled, "prior.num_class_images must be positive when prior preservation is on")
    ensure(v.every >= 0 and v.num_images > 0 and v.steps > 0, "validation.every must be >= 0, num_images and steps positive")
    ensure(v.patience >= 0, "validation.patience must be 0 (off) or positive")
    ensure(0.0 <= v.select_lambda <= 1.0, "validation.select_lambda must be in [0, 1]")
    ensure(v.select_encoder in ("align", "clip"), f"validation.select_encoder must be align or clip, got {v.select_encoder!r}")
    ensure(v.select_min_step >= 0, "validation.select_min_step must be >= 0")
    ensure(all(0 < s <= t.steps for s in t.save_steps), f"train.save_steps must lie in [1, train.steps={t.steps}], got {t.save_steps}")
    ensure(cfg.model.quantize in (None, *QUANTIZATIONS),
           f"model.quantize must be one of {', '.join(QUANTIZATIONS)} (or unset), got {cfg.model.quantize!r}")
    ensure(cfg.model.quantize is None or a.kind == "lora",
           "model.quantize freezes the base in int8/fp8: train it with LoRA (adapter.kind=lora), not a full fine-tune")
    ensure(not t.fsdp or a.kind == "full",
           "train.fsdp shards full fine-tuning (adapter.kind=full); a LoRA's trained weights are megabytes and its frozen base "
           "is not sharded, so sharding buys nothing: drop --fsdp (a base too big for one card: model.quantize=int8)")
    ensure(not t.fsdp or t.mixed_precision != "fp16",
           "train.fsdp trains in fp32 or bf16 (fp16's gradient scaler is not wired to sharded gradients): use --mixed-precision bf16")
    ensure(not t.fsdp or t.optimizer == "adamw",
           f"train.fsdp shards AdamW's state; train.optimizer={t.optimizer} is not supported with it: use adamw")
    ensure(not t.fsdp or t.ema_decay is None,
           "train.ema_decay is not supported with train.fsdp yet (its float32 copy would not be sharded): drop one of them")
    f = cfg.flow
    ensure(f.weighting in FLOW_WEIGHTINGS, f"flow.weighting must be one of {', '.join(FLOW_WEIGHTINGS)}, got {f.weighting!r}")
    ensure(f.loss_weighting in FLOW_LOSS_WEIGHTINGS,
           f"flow.loss_weighting must be one of {', '.join(FLOW_LOSS_WEIGHTINGS)}, got {f.loss_weighting!r}")
    ensure(f.logit_std > 0 and f.mode_scale >= 0, "flow.logit_std must be positive and flow.mode_scale >= 0")
    ensure(f.shift is None or f.shift > 0, f"flow.shift must be positive (or unset), got {f.shift}")
    for template in (d.instance_prompt, d.class_prompt, *v.prompts):
        try:
            template.format(identifier="x", class_noun="y")
        except (KeyError, IndexError, ValueError):
            raise ConfigError(f"prompt template {template!r} may only use {{identifier}} and {{class_noun}}") from None


def require_training_inputs(cfg: RunConfig) -> None:
    """Settings that `train` needs but that have no sensible default."""
    ensure(cfg.data.instance_dir is not None, "missing --instance-dir (data.instance_dir): the folder of subject images")
    ensure(cfg.data.class_noun is not None and cfg.data.class_noun.strip() != "", "missing --class-noun (data.class_noun), e.g. dog")
