"""Setting up the trained model: the frozen base on the device, the trained weights (LoRA or full)
and their optimizer groups, the CPU thread count, and the memory estimate before the first step."""

from __future__ import annotations

import warnings

import torch

from rewardbooth.config import RunConfig
from rewardbooth.methods import Method
from rewardbooth.methods.context import TrainContext
from rewardbooth.models.lora import TEXT_ENCODER_TARGETS, add_lora
from rewardbooth.training import memory, sharding
from rewardbooth.training.memory import MemoryEstimate
from rewardbooth.training.threads import choose_cpu_threads, should_choose_threads

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def place_frozen(components, device, mixed_precision: str, offload_text_encoders: bool | None = None) -> torch.dtype:
    """Freeze the base model on the device: frozen parts run in the low-precision dtype (the VAE
    stays float32 under fp16, where SD's VAE overflows); trained weights stay float32 (autocast).
    The frozen language-model encoders stay in CPU memory, streamed to the device per call, where
    `offload_text_encoders` says (None: flow models on a GPU)."""
    weight_dtype = DTYPES[mixed_precision]
    components.vae.requires_grad_(False).to(device, dtype=torch.float32 if weight_dtype == torch.float16 else weight_dtype)
    language_models = offloadable_text_encoders(components)
    if offload_text_encoders is None:
        offload_text_encoders = torch.device(device).type == "cuda"
    for encoder in components.text_encoders:
        encoder.requires_grad_(False)
        if offload_text_encoders and any(encoder is lm for lm in language_models):
            from accelerate import cpu_offload  # deferred: accelerate's import cost

            cpu_offload(encoder.to("cpu", dtype=weight_dtype), execution_device=torch.device(device))
        else:
            encoder.to(device, dtype=weight_dtype)
    components.unet.requires_grad_(False).to(device, dtype=weight_dtype)
    return weight_dtype


def offloadable_text_encoders(components) -> list[torch.nn.Module]:
    """The encoders never trained here and too big to keep resident for a few calls: T5, Qwen3 (flow models)."""
    if not components.family().flow_matching:
        return []
    return components.frozen_text_encoders


def attach_trainable(components, cfg: RunConfig) -> list[dict]:
    """Make the trained weights (LoRA adapters, or the whole U-Net / text encoders) and return
    their optimizer parameter groups."""
    a = cfg.adapter
    groups = []
    if a.kind == "lora":
        targets = a.target_modules or components.family().lora_targets(a.targets)
        add_lora(components.unet, a.rank, a.alpha, a.dropout, targets)
    else:
        components.unet.requires_grad_(True)
    # Trained weights in float32 even when the frozen base is half precision (train.fsdp: block by block as they are
    # sharded, so the whole model is never held in float32 on one device: training/sharding.py).
    upcast = not cfg.train.fsdp
    for p in _trainable_parameters(components.unet) if upcast else []:
        p.data = p.data.float()
    groups.append({"params": _trainable_parameters(components.unet), "lr": cfg.learning_rate})
    for encoder in components.trainable_text_encoders if a.train_text_encoder else []:  # SDXL: both encoders
        if a.kind == "lora":
            add_lora(encoder, a.rank, a.alpha, a.dropout, TEXT_ENCODER_TARGETS)
        else:
            encoder.requires_grad_(True)
        for p in _trainable_parameters(encoder) if upcast else []:
            p.data = p.data.float()
        lr = cfg.train.text_encoder_learning_rate or cfg.learning_rate
        groups.append({"params": _trainable_parameters(encoder), "lr": lr})
        if cfg.train.gradient_checkpointing:
            encoder.gradient_checkpointing_enable()
    if cfg.train.gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
        # DPG's decoded look-forward image backpropagates through the frozen VAE decoder: at 1024 px its activations
        # dwarf a LoRA step's (FLUX.1-dev, int8 base: 27.0 GiB estimated without this); recomputed like the denoiser's.
        if getattr(components.vae, "_supports_gradient_checkpointing", False):
            components.vae.enable_gradient_checkpointing()
    return groups


def choose_threads(ctx: TrainContext) -> int:
    """Small models on the CPU: the measured-fastest thread count (see training/threads.py)."""
    unet = ctx.components.unet
    if ctx.accelerator.num_processes > 1 or not should_choose_threads(ctx.device, sum(p.numel() for p in unet.parameters())):
        return torch.get_num_threads()
    side = ctx.latent_size
    latents = torch.randn(2 * ctx.cfg.train.batch_size, ctx.family.latent_channels, side, side, device=ctx.device,
                          dtype=ctx.weight_dtype, requires_grad=True)
    text = ctx.encode_prompts([ctx.cfg.instance_prompt] * latents.shape[0])
    timesteps = torch.full((latents.shape[0],), 500, device=ctx.device)

    def step():  # forward + backward to the input: a training step's work, no weight touched
        ctx.family.predict(unet, latents, timesteps, text).sum().backward()

    return choose_cpu_threads(step)


def estimate_memory(ctx: TrainContext, method: Method, groups: list[dict], show: bool) -> MemoryEstimate | None:
    """Print the estimated peak memory before the first step (`show`); warn when the device is smaller."""
    acc, t = ctx.accelerator, ctx.cfg.train
    trained = [p for group in groups for p in group["params"]] + [p for m in method.extra_modules() for p in m.parameters()]
    sharded = sharding.sharded_modules(ctx.components, method, ctx.cfg.adapter.train_text_encoder) if t.fsdp else []
    try:
        result = memory.estimate(resident=memory.resident_modules([ctx.components, method]), trained=trained,
                                 probes=method.memory_probes(ctx), optimizer=t.optimizer, ema=t.ema_decay is not None,
                                 mixed_precision=t.mixed_precision, device=ctx.device, processes=acc.num_processes,
                                 sharded=sharded)
    except Exception as exc:  # an estimate must never stop a run
        if acc.is_main_process and show:
            print(f"estimated peak memory: unavailable ({first_line(exc)})")
        return None
    capacity = memory.device_capacity(ctx.device)
    if acc.is_main_process:
        if show:  # with the progress bars: not in benches, the demo's summary or --quiet
            print(result.line(ctx.device, capacity))
        if result.exceeds(capacity):
            warnings.warn(f"the estimated peak memory ({result.total / memory.GIB:.1f} GiB) exceeds {ctx.device}'s "
                          f"{capacity / memory.GIB:.1f} GiB; to fit, try {memory.MEMORY_ADVICE}", stacklevel=2)
    return result


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
