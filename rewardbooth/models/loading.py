"""Load a Stable Diffusion model from a hub id, a local diffusers folder or a built-in preset.

Every source goes through the same `from_pretrained` calls; the built-in presets only decide
which folder those calls read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rewardbooth.errors import ConfigError
from rewardbooth.models.presets import find_preset, preset_names
from rewardbooth.models.tiny import TINY_PRESETS, build_tiny_pipeline

# diffusers / transformers / peft / accelerate are imported inside the functions that use them, so importing this
# module (registries, --help, the web app) does not pay their start-up cost.

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
SDXL_PIPELINE = "StableDiffusionXLPipeline"


@dataclass
class Components:
    """The parts of a Stable Diffusion pipeline that training and sampling use."""
    source: str  # what the user passed (hub id, folder or preset name)
    path: str  # what from_pretrained read
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any  # DDPM scheduler used to noise latents in training
    text_encoder_2: Any = None  # SDXL's second encoder (CLIPTextModelWithProjection)
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = True  # SDXL: unconditional embeddings are zeros, as the checkpoint says

    @classmethod
    def from_pipeline(cls, source: str, pipe) -> Components:
        """The components of a pipeline object built in memory (benchmarks' random-weight models)."""
        return cls(source, "", pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler,
                   getattr(pipe, "text_encoder_2", None), getattr(pipe, "tokenizer_2", None))

    @classmethod
    def random_on(cls, preset: str, device: str) -> Components:
        """A tiny/random preset built with its seeded random weights directly on `device`, with no
        disk round trip (benchmarks at real sizes: sd15-random, sdxl-random)."""

        with torch.device(device):
            pipe = build_tiny_pipeline(TINY_PRESETS[preset])
        return cls.from_pipeline(preset, pipe)

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def text_encoders(self) -> list:
        return [self.text_encoder] + ([self.text_encoder_2] if self.is_sdxl else [])

    @property
    def tokenizers(self) -> list:
        return [self.tokenizer] + ([self.tokenizer_2] if self.is_sdxl else [])

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def latent_scaling(self) -> float:
        return float(self.vae.config.scaling_factor)


def resolve_model_path(name: str) -> str:
    """Map a preset name to its folder; pass hub ids and local folders through unchanged."""
    preset = find_preset(name)
    if preset is not None:
        if preset.quiet:
            quiet_library_progress()
        return str(preset.path())
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise ConfigError(f"model folder {local} has no model_index.json (expected a diffusers pipeline folder)")
        pipeline_class = json.loads((local / "model_index.json").read_text()).get("_class_name", "")
        if pipeline_class not in SUPPORTED_PIPELINES:
            raise ConfigError(f"model {name} is a {pipeline_class}; supported: {', '.join(SUPPORTED_PIPELINES)} (SD 1.x / 2.x, SDXL)")
        return str(local)
    if name.count("/") != 1 or name.startswith(("/", ".", "~")):
        raise ConfigError(f"model {name!r} is neither an existing folder, a hub id (owner/name) nor a preset ({', '.join(preset_names())})")
    return name


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def quiet_library_progress() -> None:
    """Hide diffusers'/transformers' per-file loading bars; our own bars show the real work."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def load_components(name: str, revision: str | None = None, variant: str | None = None, dtype: torch.dtype | None = None,
                    vae: str | None = None) -> Components:
    """Load U-Net, VAE, text encoder(s), tokenizer(s) and the training noise scheduler.

    `vae`: another AutoencoderKL (hub id or folder), e.g. an fp16-safe SDXL VAE.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    quiet_library_progress()

    path = resolve_model_path(name)
    index = read_model_config(name, revision, "model_index.json")
    sdxl = index.get("_class_name") == SDXL_PIPELINE or "text_encoder_2" in index
    common: dict[str, Any] = {"revision": revision}
    weights = dict(common, variant=variant, torch_dtype=dtype) if dtype is not None else dict(common, variant=variant)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **common)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **weights)
        second = {}
        if sdxl:
            second = dict(tokenizer_2=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **common),
                          text_encoder_2=CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **weights),
                          force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)))
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **weights)
        noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **common)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ConfigError(f"could not load model {name!r}: {_one_line(exc)}") from None
    try:
        if vae:
            vae_model = AutoencoderKL.from_pretrained(vae, **({"torch_dtype": dtype} if dtype is not None else {}))
        else:
            vae_model = AutoencoderKL.from_pretrained(path, subfolder="vae", **weights)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ConfigError(f"could not load VAE {vae or name!r}: {_one_line(exc)}") from None
    return Components(name, path, unet, vae_model, text_encoder, tokenizer, noise_scheduler, **second)


def read_model_config(name: str, revision: str | None, file: str) -> dict:
    """One small JSON file of a model (folder, preset or hub id) without loading any weights,
    so a bad name or an unreachable hub id fails in a second, before anything is written."""
    path = resolve_model_path(name)
    local = Path(path) / file
    if local.is_file():
        return json.loads(local.read_text())
    if Path(path).exists():
        raise ConfigError(f"model folder {path} has no {file}")
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(path, file, revision=revision)).read_text())
    except Exception as exc:  # noqa: BLE001 - offline, not found, gated, no network: one line naming the model
        raise ConfigError(f"cannot get model {name!r} from the hub (or its cache): {_one_line(exc)}") from None


def model_native_resolution(name: str, revision: str | None = None) -> int:
    """The U-Net's sample size times the VAE's downsampling, from the configs alone."""
    unet = read_model_config(name, revision, "unet/config.json")
    vae = read_model_config(name, revision, "vae/config.json")
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def make_pipeline(components: Components, unet=None, text_encoders: list | None = None, scheduler: str = "dpm"):
    """A StableDiffusion(XL)Pipeline over (possibly training) components, for sampling."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler_cls = {"dpm": DPMSolverMultistepScheduler, "ddim": DDIMScheduler}[scheduler]
    encoders = text_encoders or components.text_encoders
    parts = dict(vae=components.vae, text_encoder=encoders[0], tokenizer=components.tokenizer,
                 unet=unet if unet is not None else components.unet,
                 scheduler=scheduler_cls.from_config(components.noise_scheduler.config))
    if components.is_sdxl:
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=encoders[1], tokenizer_2=components.tokenizer_2,
                                         force_zeros_for_empty_prompt=components.force_zeros_for_empty_prompt, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def default_device(requested: str | None = None) -> str:
    """The one rule for where work runs unless the user says: the GPU when there is one, else the CPU."""
    return requested or ("cuda" if torch.cuda.is_available() else "cpu")
