"""Load a Stable Diffusion model from a hub id, a local diffusers folder, a built-in preset or a single file.

Every source goes through the same `from_pretrained` calls; the built-in presets only decide
which folder those calls read. A single `.safetensors` file in its original layout goes through
diffusers' `from_single_file`, with a base model for what the file does not hold.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from rewardbooth.diffusion import vae_downsampling, vae_latent_channels
from rewardbooth.errors import ConfigError
from rewardbooth.models.family import Flux2Family, FluxFamily, QwenImageFamily, SD3Family, UNetFamily, ZImageFamily
from rewardbooth.models.presets import find_preset, preset_names
from rewardbooth.models.tiny import TINY_PRESETS, build_tiny_pipeline
from rewardbooth.models.tiny_flow import FLOW_PRESETS, build_flow_pipeline

# diffusers / transformers / peft / accelerate are imported inside the functions that use them, so importing this
# module (registries, --help, the web app) does not pay their start-up cost.

SD_PIPELINE, SDXL_PIPELINE = "StableDiffusionPipeline", "StableDiffusionXLPipeline"
FLUX_PIPELINE, SD3_PIPELINE, FLUX2_PIPELINE = "FluxPipeline", "StableDiffusion3Pipeline", "Flux2KleinPipeline"
ZIMAGE_PIPELINE, QWENIMAGE_PIPELINE = "ZImagePipeline", "QwenImagePipeline"
# Flow-matching transformers, by pipeline class
FLOW_FAMILIES = {FLUX_PIPELINE: FluxFamily, SD3_PIPELINE: SD3Family, FLUX2_PIPELINE: Flux2Family, ZIMAGE_PIPELINE: ZImageFamily,
                 QWENIMAGE_PIPELINE: QwenImageFamily}
FLOW_PIPELINES = tuple(FLOW_FAMILIES)
# How many of a pipeline's text encoders (a prefix) adapter.train_text_encoder trains: the CLIP ones; T5 and
# FLUX.2's and Z-Image's Qwen3 and Qwen-Image's Qwen2.5-VL stay frozen (language models: large, and their cached
# embeddings serve every step). U-Nets: all (SDXL: 2).
TRAINABLE_TEXT_ENCODERS = {FLUX_PIPELINE: 1, SD3_PIPELINE: 2, FLUX2_PIPELINE: 0, ZIMAGE_PIPELINE: 0, QWENIMAGE_PIPELINE: 0}
SUPPORTED_PIPELINES = (SD_PIPELINE, SDXL_PIPELINE, *FLOW_PIPELINES)
FLUX_SAMPLE_SIZE = 128  # FluxPipeline's, Flux2KleinPipeline's, ZImagePipeline's and QwenImagePipeline's default latent side:
# 1024 px with their 8x VAE


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
    def from_pipeline(cls, source: str, pipe, path: str = "") -> Components:
        """The components of a pipeline object (built in memory for the benchmarks, or loaded): U-Net or transformer."""
        return cls(source, path, getattr(pipe, "unet", None) or pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                   pipe.scheduler, getattr(pipe, "text_encoder_2", None), getattr(pipe, "tokenizer_2", None),
                   pipeline_class=type(pipe).__name__, text_encoder_3=getattr(pipe, "text_encoder_3", None),
                   tokenizer_3=getattr(pipe, "tokenizer_3", None))

    @classmethod
    def random_on(cls, preset: str, device: str, dtype: torch.dtype | None = None) -> Components:
        """A tiny/random preset built with its seeded random weights directly on `device` (meta: shapes
        only), in `dtype`, with no disk round trip (benchmarks at real sizes: sd15-random, flux-random, ...).
        torch.device, not accelerate's init_empty_weights, which would untie T5's two embedding tables."""
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype or default)  # a 12B transformer is built in bf16, never in float32 first
        try:
            with torch.device(device):
                pipe = build_flow_pipeline(preset) if preset in FLOW_PRESETS else build_tiny_pipeline(TINY_PRESETS[preset])
        finally:
            torch.set_default_dtype(default)
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
        return self.text_encoders[: TRAINABLE_TEXT_ENCODERS.get(self.pipeline_class, 2)]

    @property
    def frozen_text_encoders(self) -> list:
        """The rest of text_encoders, never trained here: FLUX's and SD3's T5, the flow models' language models."""
        return self.text_encoders[len(self.trainable_text_encoders):]

    @property
    def tokenizers(self) -> list:
        return [t for t in (self.tokenizer, self.tokenizer_2, self.tokenizer_3) if t is not None]

    @property
    def vae_scale_factor(self) -> int:
        return vae_downsampling(self.vae.config)

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
    """Map a preset name to its folder; pass hub ids, local folders and single files through unchanged."""
    spec = single_file(name)
    if spec is not None:
        return str(spec.file)
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
            raise ConfigError(f"model {name} is a {pipeline_class}; supported: {', '.join(SUPPORTED_PIPELINES)} (SD 1.x / 2.x, SDXL, FLUX.1, SD3 / SD3.5, FLUX.2 [klein], Z-Image, Qwen-Image)")
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

    `vae`: another VAE of the model's class (hub id or folder), e.g. an fp16-safe SDXL VAE; its latent channels
    must be the model's (a one-line error otherwise).
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    quiet_library_progress()

    spec = single_file(name)
    if spec is not None:
        return _load_single_file(name, spec, revision, variant, dtype, vae)
    path = resolve_model_path(name)
    index = read_model_config(name, revision, "model_index.json")
    if index.get("_class_name") in FLOW_FAMILIES:
        absent = {part: None for part, kind in index.items() if kind == [None, None]}  # e.g. SD3 without T5 (mini-flow)
        other_vae = {"vae": _other_vae(vae, dtype, name, revision)} if vae else {}
        return _load_flow(name, path, index["_class_name"], revision, variant, dtype, **absent, **other_vae)
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
    vae_model = _other_vae(vae, dtype, name, revision) if vae else _load_vae(path, dtype, name, subfolder="vae", **weights)
    return Components(name, path, unet, vae_model, text_encoder, tokenizer, noise_scheduler, **second)


def _load_vae(source: str, dtype: torch.dtype | None, label: str | None = None, vae_class: str = "AutoencoderKL", **kwargs):
    """A VAE (AutoencoderKL unless the model names another class): the model's own, or `--vae` (hub id or folder)."""
    import diffusers

    try:
        return getattr(diffusers, vae_class).from_pretrained(source, **{**({"torch_dtype": dtype} if dtype is not None else {}),
                                                                         **kwargs})
    except (OSError, ValueError) as exc:
        raise ConfigError(f"could not load VAE {label or source!r}: {_one_line(exc)}") from None


def _other_vae(source: str, dtype: torch.dtype | None, base: str, revision: str | None):
    """`--vae` for the model `base` (a folder, hub id or preset): loaded as the VAE class `base` names (FLUX.2's is not an
    AutoencoderKL), refused in one line when its latents have another channel count than the model's VAE."""
    vae_class = read_model_config(base, revision, "model_index.json").get("vae", [None, "AutoencoderKL"])[1]
    vae = _load_vae(source, dtype, vae_class=vae_class)
    expected = vae_latent_channels(read_model_config(base, revision, "vae/config.json"))
    channels = vae_latent_channels(vae.config)
    if expected is not None and channels != expected:
        raise ConfigError(f"--vae {source}: its latents have {channels} channels, {base}'s VAE has {expected} "
                          "(a VAE made for another model family)")
    return vae


def _load_flow(name: str, path: str, pipeline_class: str, revision: str | None, variant: str | None,
               dtype: torch.dtype | None, **parts) -> Components:
    """FLUX.1, SD3, FLUX.2 [klein], Z-Image, Qwen-Image: the pipeline's own from_pretrained (transformer, VAE, text encoders, flow-matching
    scheduler).

    `parts`: components loaded elsewhere (a single file's transformer), not read from `path`."""
    import diffusers

    try:
        pipe = getattr(diffusers, pipeline_class).from_pretrained(path, revision=revision, variant=variant,
                                                                  **({"torch_dtype": dtype} if dtype else {}), **parts)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ConfigError(f"could not load model {name!r}: {_one_line(exc)}") from None
    return Components.from_pipeline(name, pipe, path)


# `--model FILE.safetensors[+BASE]`: one weights file in its original layout (LDM / SGM for SD and SDXL, BFL's for FLUX.1
# and FLUX.2, Stability's for SD3, Z-Image's own, ComfyUI's for Qwen-Image), as model sites ship them. BASE (diffusers
# folder, hub id or preset) gives the configs, tokenizers and scheduler, and for the flow models every part but the
# transformer; it defaults to the official model of the family.
WEIGHT_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# diffusers' single-file model types (loaders/single_file_utils.py) that train here, and their pipelines; FLUX.2 [klein]
# and Qwen-Image (diffusers has no type for either) are named here.
SINGLE_FILE_TYPES = {"v1": SD_PIPELINE, "v2": SD_PIPELINE, "xl_base": SDXL_PIPELINE, "flux-dev": FLUX_PIPELINE,
                     "flux-schnell": FLUX_PIPELINE, "sd3": SD3_PIPELINE, "sd35_medium": SD3_PIPELINE, "sd35_large": SD3_PIPELINE,
                     "flux-2-klein-4b": FLUX2_PIPELINE, "flux-2-klein-9b": FLUX2_PIPELINE, "z-image-turbo": ZIMAGE_PIPELINE,
                     "qwen-image": QWENIMAGE_PIPELINE}
# diffusers tells real models apart by their layer sizes and calls whatever it does not know "v1"; a file at other
# sizes (pruned, or the tiny test models) is known by its family's marker key in diffusers' table instead, or by
# keys named here (Qwen-Image ships in diffusers' own names, which diffusers' table does not list).
SINGLE_FILE_MARKERS = (("sd3", "sd35_medium"), ("flux", "flux-dev"), ("open_clip_sdxl", "xl_base"), ("open_clip", "v2"),
                       ("clip", "v1"), (("img_in.weight", "txt_norm.weight", "transformer_blocks.0.img_mod.1.weight"), "qwen-image"))
ORIGINAL_PREFIX = "model.diffusion_model."  # how ComfyUI-saved transformers name their keys
# diffusers calls every FLUX.2 file FLUX.2-dev; the klein sizes are told by the transformer's width (BFL's image input).
FLUX2_WIDTHS = {3072: "flux-2-klein-4b", 4096: "flux-2-klein-9b", 6144: "flux-2-dev"}
# the official base of a type whose diffusers default is missing or another pipeline (FLUX.2-dev for every FLUX.2 file):
# klein's base models, the ones made for fine-tuning (a step-distilled file names its own folder: FILE+BASE)
SINGLE_FILE_BASES = {"flux-2-klein-4b": "black-forest-labs/FLUX.2-klein-base-4B",
                     "flux-2-klein-9b": "black-forest-labs/FLUX.2-klein-base-9B", "qwen-image": "Qwen/Qwen-Image"}


@dataclass(frozen=True)
class SingleFile:
    file: Path
    base: str | None  # None: the official model of the file's family


def single_file(name: str) -> SingleFile | None:
    """The single file `name` names (FILE or FILE+BASE), None for presets, folders and hub ids.
    A missing file or one that is not safetensors is a one-line error naming it."""
    suffixes = "|".join(re.escape(s) for s in WEIGHT_FILE_SUFFIXES)
    match = re.fullmatch(rf"(.+?({suffixes}))(?:\+(.+))?", name, flags=re.IGNORECASE)
    if match is None:
        return None
    file, suffix, base = Path(match[1]).expanduser(), match[2].lower(), match[3]
    if suffix != ".safetensors":  # the others are pickles, which run code when loaded
        raise ConfigError(f"model file {file}: only .safetensors single files are loaded, not {suffix} (a pickle); convert it first")
    if not file.is_file():
        raise ConfigError(f"model file {file} does not exist")
    if base is not None and single_file(base) is not None:
        raise ConfigError(f"model file {file}: its base {base} must be a diffusers folder, a hub id or a preset")
    return SingleFile(file, base)


class _LazyTensors(Mapping):
    """A safetensors file's tensors by name, each read only when asked: the model-type table reads a few shapes."""

    def __init__(self, handle):
        self.handle, self.names = handle, set(handle.keys())

    def __getitem__(self, key):
        if key not in self.names:
            raise KeyError(key)
        return self.handle.get_tensor(key)

    def __contains__(self, key):
        return key in self.names

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)


@functools.lru_cache(maxsize=8)
def _file_model_type(file: str, _stamp: tuple) -> str | None:
    """diffusers' model type of a single file (`_stamp`: its mtime and size, so a changed file is read again)."""
    from diffusers.loaders.single_file_utils import (
        CHECKPOINT_KEY_NAMES,
        infer_diffusers_model_type,
    )
    from safetensors import safe_open

    def marked(marker: str | tuple) -> bool:
        if isinstance(marker, tuple):  # keys of our own: every one, with or without ComfyUI's prefix
            return all(key in tensors or ORIGINAL_PREFIX + key in tensors for key in marker)
        keys = CHECKPOINT_KEY_NAMES[marker]
        return any(key in tensors for key in ([keys] if isinstance(keys, str) else keys))

    try:
        with safe_open(file, "pt") as handle:
            tensors = _LazyTensors(handle)
            try:
                model_type = infer_diffusers_model_type(tensors)
            except Exception:  # noqa: BLE001 - its size checks assume real models (unbound names, missing keys)
                model_type = None
            if model_type in (None, "v1"):
                model_type = next((t for marker, t in SINGLE_FILE_MARKERS if marked(marker)), None)
            if model_type == "flux-2-dev":
                image_in = next((k for k in ("img_in.weight", ORIGINAL_PREFIX + "img_in.weight") if k in tensors), None)
                width = handle.get_slice(image_in).get_shape()[0] if image_in else None  # None: refused later, as partial
                model_type = FLUX2_WIDTHS.get(width, "flux-2-klein-4b")
            return model_type
    except Exception as exc:  # noqa: BLE001 - safetensors' own error type or OSError: not a readable safetensors file
        raise ConfigError(f"model file {file} is not a readable safetensors file: {_one_line(exc)}") from None


def _single_file_base(spec: SingleFile, revision: str | None) -> tuple[str, str]:
    """(pipeline class, base model) of a single file: the family from its keys, the base checked to be of that family."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS

    stat = spec.file.stat()
    model_type = _file_model_type(str(spec.file), (stat.st_mtime_ns, stat.st_size))
    if model_type not in SINGLE_FILE_TYPES:
        what = f"a {model_type} checkpoint" if model_type else "in no layout diffusers knows"
        raise ConfigError(f"model file {spec.file} is {what}; single files load for SD 1.x / 2.x, SDXL, FLUX.1, SD3 / SD3.5, "
                          "FLUX.2 [klein], Z-Image and Qwen-Image")
    pipeline_class = SINGLE_FILE_TYPES[model_type]
    base = spec.base or SINGLE_FILE_BASES.get(model_type) or DIFFUSERS_DEFAULT_PIPELINE_PATHS[model_type]["pretrained_model_name_or_path"]
    try:
        base_class = read_model_config(base, revision, "model_index.json").get("_class_name")
    except ConfigError as exc:
        raise ConfigError(f"model file {spec.file}: its base {base} is not available ({str(exc).rstrip('.')}); name a local "
                          f"diffusers folder or a reachable hub id as its base: --model {spec.file}+BASE") from None
    if base_class != pipeline_class:
        raise ConfigError(f"model file {spec.file} holds a {pipeline_class} model but its base {base} is a {base_class}")
    return pipeline_class, base


def _load_single_file(name: str, spec: SingleFile, revision: str | None, variant: str | None, dtype: torch.dtype | None,
                      vae: str | None) -> Components:
    """Flow models: the transformer from the file (model sites ship it alone), every other part from the base.
    SD / SDXL: the whole pipeline from the file (U-Net, VAE, text encoders); configs, tokenizers, scheduler from the base."""
    import diffusers
    from diffusers import DDPMScheduler
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    pipeline_class, base = _single_file_base(spec, revision)
    path = resolve_model_path(base)
    flow = pipeline_class in FLOW_FAMILIES
    weights = {"torch_dtype": dtype} if dtype is not None else {}
    other_vae = {"vae": _other_vae(vae, dtype, base, revision)} if vae else {}
    try:
        if flow:
            denoiser = getattr(diffusers, read_model_config(base, revision, "model_index.json")["transformer"][1])
            transformer = denoiser.from_single_file(_transformer_tensors(spec.file), config=path, subfolder="transformer",
                                                    config_revision=revision, **weights)
        else:
            pipe = getattr(diffusers, pipeline_class).from_single_file(str(spec.file), config=path, revision=revision,
                                                                       **weights, **other_vae)
    # diffusers' converters fail in many ways on a damaged file or one of another size than its base
    except (OSError, ValueError, KeyError, IndexError, RuntimeError, SingleFileComponentError) as exc:
        if "meta tensor" in str(exc):  # diffusers leaves what the file lacks unloaded, then fails to move it
            raise ConfigError(f"model file {spec.file} lacks tensors its base {base}'s {denoiser_folder(pipeline_class)} has: "
                              "a file of another model or size, or a partial one") from None
        raise ConfigError(f"could not load model file {spec.file} on its base {base}: {_one_line(exc)}") from None
    if flow:
        return _load_flow(name, path, pipeline_class, revision, variant, dtype, transformer=transformer, **other_vae)
    return replace(Components.from_pipeline(name, pipe), path=path, pipeline_class=pipeline_class,
                   noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
                   force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", True)))


FLOAT8 = {torch.float8_e4m3fn, torch.float8_e5m2}
# how fp8 files with per-tensor scales mark them (ComfyUI's scaled_fp8, BFL's and others' weight_scale / input_scale):
# their weights are the true ones only once multiplied by a scale diffusers' converters do not apply
SCALED_FP8_KEYS = re.compile(r"(^|\.)(scaled_fp8|scale_weight|weight_scale|input_scale)$")


def _transformer_tensors(file: Path) -> dict:
    """A transformer file's tensors, ComfyUI's key prefix dropped (diffusers' FLUX.2 and Qwen-Image loaders expect none);
    plain fp8 weights (ComfyUI's fp8_e4m3fn files) load with a warning, scaled fp8 ones are refused (their scales
    would be dropped as unknown names and the weights silently wrong)."""
    import warnings

    from safetensors.torch import load_file

    tensors = load_file(str(file))
    if tensors and all(key.startswith(ORIGINAL_PREFIX) for key in tensors):
        tensors = {key.removeprefix(ORIGINAL_PREFIX): value for key, value in tensors.items()}
    scaled = [key for key in tensors if SCALED_FP8_KEYS.search(key)]
    if scaled:
        raise ConfigError(f"model file {file} holds scaled fp8 weights ({scaled[0]}, ...), which diffusers' loader reads "
                          "without their scales; use the file's bf16 or fp16 release")
    fp8 = [key for key, value in tensors.items() if value.dtype in FLOAT8]
    if fp8:  # diffusers casts them to the model's dtype on loading
        warnings.warn(f"model file {file} stores {len(fp8)} tensors in fp8: training starts from the fp8-rounded weights "
                      "(the file's bf16 release is the better base)", stacklevel=2)
    return tensors


def read_model_config(name: str, revision: str | None, file: str) -> dict:
    """One small JSON file of a model (folder, preset or hub id) without loading any weights,
    so a bad name or an unreachable hub id fails in a second, before anything is written.
    A single file's configs are its base model's (checked to be of the file's family)."""
    spec = single_file(name)
    if spec is not None:
        return read_model_config(_single_file_base(spec, revision)[1], revision, file)
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
    """The denoiser's native latent side (VAE latents): its sample_size (U-Nets, SD3), the pipeline's default for FLUX.1 /
    FLUX.2 / Z-Image / Qwen-Image."""
    if pipeline_class in (FLUX_PIPELINE, FLUX2_PIPELINE, ZIMAGE_PIPELINE, QWENIMAGE_PIPELINE):
        return FLUX_SAMPLE_SIZE
    return int(denoiser_config["sample_size"])


def denoiser_folder(pipeline_class: str) -> str:
    """The pipeline folder of the denoiser (also where a full fine-tune is saved)."""
    return "transformer" if pipeline_class in FLOW_FAMILIES else "unet"


def model_native_resolution(name: str, revision: str | None = None) -> int:
    """The denoiser's sample size times the VAE's downsampling, from the configs alone."""
    vae = read_model_config(name, revision, "vae/config.json")
    pipeline_class = read_model_config(name, revision, "model_index.json").get("_class_name", "")
    denoiser = read_model_config(name, revision, f"{denoiser_folder(pipeline_class)}/config.json")
    return native_side(pipeline_class, denoiser) * vae_downsampling(vae)


def make_pipeline(components: Components, unet=None, text_encoders: list | None = None, scheduler: str = "dpm"):
    """The family's sampling pipeline over (possibly training) components: StableDiffusion(XL)Pipeline, FluxPipeline."""
    pipe = components.family().pipeline(unet, text_encoders, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def default_device(requested: str | None = None) -> str:
    """The one rule for where work runs unless the user says: the GPU when there is one, else the CPU."""
    return requested or ("cuda" if torch.cuda.is_available() else "cpu")
