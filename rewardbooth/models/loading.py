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
from rewardbooth.models.family import FluxFamily, SD3Family, UNetFamily
from rewardbooth.models.presets import find_preset, preset_names
from rewardbooth.models.tiny import TINY_PRESETS, build_tiny_pipeline

# diffusers / transformers / peft / accelerate are imported inside the functions that use them, so importing this
# module (registries, --help, the web app) does not pay their start-up cost.

SD_PIPELINE, SDXL_PIPELINE = "StableDiffusionPipeline", "StableDiffusionXLPipeline"
FLUX_PIPELINE, SD3_PIPELINE = "FluxPipeline", "StableDiffusion3Pipeline"
FLOW_FAMILIES = {FLUX_PIPELINE: FluxFamily, SD3_PIPELINE: SD3Family}  # flow-matching transformers, by pipeline class
FLOW_PIPELINES = tuple(FLOW_FAMILIES)
SUPPORTED_PIPELINES = (SD_PIPELINE, SDXL_PIPELINE, *FLOW_PIPELINES)
FLUX_SAMPLE_SIZE = 128  # FluxPipeline's default latent side: 1024 px with its 8x VAE


@dataclass
class Components:
    """The parts of a text-to-image pipeline that training and sampling use. `unet` is the
    denoiser: the U-Net of SD / SDXL, the transformer of FLUX."""
    source: str  # what the user passed (hub id, folder or preset name)
    path: str  # what from_pretrained read
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any  # the training noise schedule: DDPM (U-Nets) or flow matching
    text_encoder_2: Any = None  # SDXL's and SD3's second CLIP encoder; FLUX's T5
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = True  # SDXL: unconditional embeddings are zeros, as the checkpoint says
    pipeline_class: str = ""  # model_index.json's _class_name ("": SD or SDXL, told by their encoders)
    text_encoder_3: Any = None  # SD3's T5
    tokenizer_3: Any = None

    @property
    def denoiser_folder(self) -> str:
        return denoiser_folder(self.pipeline_class)

    def family(self, flow_settings=None):
        """How this model is trained and sampled (models/family.py)."""
        if self.pipeline_class in FLOW_FAMILIES:
            return FLOW_FAMILIES[self.pipeline_class](self, flow_settings)
        return UNetFamily(self, sdxl=self.is_sdxl)

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
        return self.text_encoder_2 is not None and self.pipeline_class in ("", SDXL_PIPELINE)

    @property
    def text_encoders(self) -> list:
        return [e for e in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if e is not None]

    @property
    def trainable_text_encoders(self) -> list:
        """The encoders adapter.train_text_encoder trains, a prefix of text_encoders: the CLIP ones (T5 stays frozen)."""
        return self.text_encoders[: {FLUX_PIPELINE: 1, SD3_PIPELINE: 2}.get(self.pipeline_class, 2)]

    @property
    def tokenizers(self) -> list:
        return [t for t in (self.tokenizer, self.tokenizer_2, self.tokenizer_3) if t is not None]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        return native_side(self.pipeline_class, self.unet.config) * self.vae_scale_factor

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
            raise ConfigError(f"model {name} is a {pipeline_class}; supported: {', '.join(SUPPORTED_PIPELINES)} (SD 1.x / 2.x, SDXL, FLUX.1, SD3 / SD3.5)")
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
    if index.get("_class_name") in FLOW_FAMILIES:
        return _load_flow(name, path, index["_class_name"], revision, variant, dtype)
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


def _load_flow(name: str, path: str, pipeline_class: str, revision: str | None, variant: str | None,
               dtype: torch.dtype | None) -> Components:
    """FLUX.1, SD3: the pipeline's own from_pretrained (transformer, 16-channel VAE, CLIP + T5, flow-matching scheduler)."""
    import diffusers

    try:
        pipe = getattr(diffusers, pipeline_class).from_pretrained(path, revision=revision, variant=variant,
                                                                  **({"torch_dtype": dtype} if dtype else {}))
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ConfigError(f"could not load model {name!r}: {_one_line(exc)}") from None
    return Components(name, path, pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler,
                      pipe.text_encoder_2, pipe.tokenizer_2, pipeline_class=pipeline_class,
                      text_encoder_3=getattr(pipe, "text_encoder_3", None), tokenizer_3=getattr(pipe, "tokenizer_3", None))


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


def native_side(pipeline_class: str, denoiser_config) -> int:
    """The denoiser's native latent side: its sample_size (U-Nets, SD3), FluxPipeline's default for FLUX."""
    return FLUX_SAMPLE_SIZE if pipeline_class == FLUX_PIPELINE else int(denoiser_config["sample_size"])


def denoiser_folder(pipeline_class: str) -> str:
    """The pipeline folder of the denoiser (also where a full fine-tune is saved)."""
    return "transformer" if pipeline_class in FLOW_FAMILIES else "unet"


def model_native_resolution(name: str, revision: str | None = None) -> int:
    """The denoiser's sample size times the VAE's downsampling, from the configs alone."""
    vae = read_model_config(name, revision, "vae/config.json")
    pipeline_class = read_model_config(name, revision, "model_index.json").get("_class_name", "")
    denoiser = read_model_config(name, revision, f"{denoiser_folder(pipeline_class)}/config.json")
    return native_side(pipeline_class, denoiser) * 2 ** (len(vae["block_out_channels"]) - 1)


def make_pipeline(components: Components, unet=None, text_encoders: list | None = None, scheduler: str = "dpm"):
    """The family's sampling pipeline over (possibly training) components: StableDiffusion(XL)Pipeline, FluxPipeline."""
    pipe = components.family().pipeline(unet, text_encoders, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def default_device(requested: str | None = None) -> str:
    """The one rule for where work runs unless the user says: the GPU when there is one, else the CPU."""
    return requested or ("cuda" if torch.cuda.is_available() else "cpu")
