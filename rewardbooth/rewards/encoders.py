"""Frozen image/text encoders used as judges: DINO (image only), CLIP and ALIGN (image and text).

Every checkpoint, the built-in `tiny` preset included, goes through the same `from_pretrained`
calls. PIL images are preprocessed by the checkpoint's own image processor (so DreamBench numbers
match the usual protocol); float tensors in [0, 1] go through a torch re-implementation of the
same steps, read from that processor, so gradients reach the input pixels.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import threading
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from rewardbooth.errors import ConfigError
from rewardbooth.models.presets import preset_judge_path
from rewardbooth.models.tiny import _byte_level_vocab, cache_root

# diffusers / transformers / peft / accelerate are imported inside the functions that use them, so importing this
# module (registries, --help, the web app) does not pay their start-up cost.

ENCODER_KINDS = ("dino", "clip", "align")
DEFAULT_ENCODER_MODELS: dict[str, str] = {
    "dino": "facebook/dino-vits16",
    "clip": "openai/clip-vit-base-patch16",
    "align": "kakaobrain/align-base",
}
# model_type values each kind accepts (read from config.json before loading any weights).
# An image-text CLIP checkpoint can also fill ALIGN's role (the mini judges do).
_MODEL_TYPES = {"dino": ("vit", "dinov2"), "clip": ("clip",), "align": ("align", "clip")}

# Bump when a tiny encoder's architecture or seed changes, so stale caches are rebuilt.
TINY_ENCODER_VERSION = 1
TINY_MODEL = "tiny"

ImageBatch = Sequence[Image.Image] | torch.Tensor

# PIL resample codes -> torch interpolate modes. The others (NEAREST, LANCZOS, BOX, HAMMING) map to
# bicubic: nearest would send gradients to a sparse subset of pixels, the rest have no torch twin.
_RESAMPLE_MODES = {2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class TensorPreprocess:
    """The checkpoint processor's resize / crop / rescale / normalize steps, in torch.

    Works on float images in [0, 1]; `rescale_factor` is applied to the 0-255 values the
    processor would have seen, so outputs match the processor up to resampling differences.
    """

    resize: dict[str, int] | None  # {"height","width"} or {"shortest_edge"[, "longest_edge"]}
    mode: str
    crop: tuple[int, int] | None
    rescale_factor: float | None
    rescale_offset: bool
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    extra_std: tuple[float, ...] | None  # EfficientNet's include_top divides by std once more

    @classmethod
    def from_processor(cls, processor: Any) -> TensorPreprocess:
        def get(name: str, default: Any = None) -> Any:
            return getattr(processor, name, default)

        resize = None
        if get("do_resize", False) and get("size") is not None:
            size = get("size")
            keys = ("height", "width", "shortest_edge", "longest_edge")
            if isinstance(size, int):  # legacy configs: one number
                raw = {"shortest_edge": size}
            else:  # a dict, or transformers 5's SizeDict
                raw = dict(size) if isinstance(size, dict) else {k: getattr(size, k, None) for k in keys}
            resize = {k: int(v) for k, v in raw.items() if k in keys and v}
            if not ({"height", "width"} <= resize.keys() or "shortest_edge" in resize):
                raise ConfigError(f"image processor size {size} is not supported (need height/width or shortest_edge)")
        crop = None
        if get("do_center_crop", False) and get("crop_size") is not None:
            c = get("crop_size")
            crop = (int(c["height"]), int(c["width"])) if isinstance(c, dict) else (int(c.height), int(c.width))
        std = tuple(float(s) for s in _triple(get("image_std"))) if get("image_std") is not None else None
        normalize = bool(get("do_normalize", False))
        resample = get("resample")
        return cls(
            resize=resize,
            mode=_RESAMPLE_MODES.get(int(resample) if resample is not None else 3, "bicubic"),
            crop=crop,
            rescale_factor=float(get("rescale_factor", 1 / 255)) if get("do_rescale", True) else None,
            rescale_offset=bool(get("rescale_offset", False)),
            mean=tuple(float(m) for m in _triple(get("image_mean"))) if normalize else None,
            std=std if normalize else None,
            extra_std=std if get("include_top", False) else None,
        )

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        if self.resize is None:
            return height, width
        if "shortest_edge" not in self.resize:
            return self.resize["height"], self.resize["width"]
        short, long = sorted((height, width))
        new_short, new_long = self.resize["shortest_edge"], int(self.resize["shortest_edge"] * long / short)
        if "longest_edge" in self.resize and new_long > self.resize["longest_edge"]:
            new_short, new_long = int(self.resize["longest_edge"] * new_short / new_long), self.resize["longest_edge"]
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        size = self.output_size(x.shape[-2], x.shape[-1])
        if size != tuple(x.shape[-2:]):
            # antialias: PIL filters over the whole footprint when shrinking, and so must we
            x = F.interpolate(x, size=size, mode=self.mode, align_corners=False, antialias=True)
            x = x.clamp(0, 1)  # the processor resizes 8-bit images, which cannot overshoot
        if self.crop is not None:
            top, left = (x.shape[-2] - self.crop[0]) // 2, (x.shape[-1] - self.crop[1]) // 2
            if top < 0 or left < 0:
                raise ValueError(f"image of size {tuple(x.shape[-2:])} is smaller than the crop {self.crop}")
            x = x[..., top : top + self.crop[0], left : left + self.crop[1]]
        if self.rescale_factor is not None:
            x = x * (255.0 * self.rescale_factor)
            if self.rescale_offset:
                x = x - 1.0
        if self.mean is not None and self.std is not None:
            x = (x - x.new_tensor(self.mean)[:, None, None]) / x.new_tensor(self.std)[:, None, None]
        if self.extra_std is not None:
            x = x / x.new_tensor(self.extra_std)[:, None, None]
        return x


def _triple(value: Any) -> list[float]:
    return [value] * 3 if isinstance(value, (int, float)) else list(value)


class ImageTextEncoder:
    """A frozen judge model: L2-normalized image (and, when `has_text`, text) embeddings."""

    kind: str = ""
    has_text: bool = False

    def __init__(self, name: str, path: str, model: Any, processor: Any, tokenizer: Any = None,
                 device: str = "cpu", dtype: torch.dtype | None = None, batch_size: int = 32):
        self.name = name  # what the user asked for (hub id, folder or "tiny"); printed in reports
        self.path = path  # what from_pretrained read
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = dtype or next(model.parameters()).dtype
        self.batch_size = batch_size
        self.preprocess = TensorPreprocess.from_processor(processor)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, device={self.device}, dtype={self.dtype})"

    # -- parking -------------------------------------------------------------------------------
    parked = False

    def park(self) -> None:
        """Move the weights to CPU memory until the next encode: a judge used only for labels and
        validations (RPO's ALIGN, selection) then takes no accelerator memory during training steps."""
        with _PARKING_LOCK:  # threads sharing a judge (train-many) never move it at the same time
            if self.device.type != "cpu" and not self.parked:
                self.model.to("cpu")
                self.parked = True

    def _unpark(self) -> None:
        if self.parked:
            with _PARKING_LOCK:
                if self.parked:  # another thread may have brought it back while this one waited
                    self.model.to(self.device)
                    self.parked = False

    @property
    def dim(self) -> int:
        raise NotImplementedError

    # -- images --------------------------------------------------------------------------------
    def pixel_values(self, images: ImageBatch) -> torch.Tensor:
        """Model inputs for a batch: the processor for PIL images, the torch mirror for tensors."""
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
                raise ValueError(f"image tensors must be float (N, 3, H, W) in [0, 1], got {tuple(images.shape)} {images.dtype}")
            pixels = self.preprocess(images.to(self.device))
        else:
            rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
            pixels = self.processor(images=rgb, return_tensors="pt")["pixel_values"].to(self.device)
        return pixels.to(self.dtype)

    def encode_images(self, images: ImageBatch) -> torch.Tensor:
        """(N, D) unit-norm image embeddings; differentiable when `images` is a tensor needing grad.

        The last batch of PIL images is remembered: CLIP-I and CLIP-T (or ALIGN's two) score the
        same images with the same encoder one after the other, and need its features once."""
        if len(images) == 0:
            return torch.empty(0, self.dim, device=self.device)
        track = isinstance(images, torch.Tensor) and images.requires_grad and torch.is_grad_enabled()
        if not isinstance(images, torch.Tensor):
            images = list(images)
            last = getattr(self, "_last_batch", None)
            if last is not None and len(last[0]) == len(images) and all(a is b for a, b in zip(last[0], images)):
                return last[1]
            features = self._encode_image_chunks(images, track)
            self._last_batch = (images, features)  # holds the images, so identity cannot be reused
            return features
        return self._encode_image_chunks(images, track)

    def _encode_image_chunks(self, images: ImageBatch, track: bool) -> torch.Tensor:
        self._unpark()
        chunks = []
        with torch.set_grad_enabled(track):
            for start in range(0, len(images), self.batch_size):
                features = self._image_features(self.pixel_values(images[start : start + self.batch_size]))
                chunks.append(F.normalize(features.float(), dim=-1))
        return torch.cat(chunks)

    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- texts ---------------------------------------------------------------------------------
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) unit-norm text embeddings (never differentiable: the inputs are strings)."""
        if not self.has_text:
            raise TypeError(f"the {self.kind} encoder {self.name!r} embeds images only; it has no text tower")
        if isinstance(texts, str):
            raise TypeError("encode_texts takes a list of strings, not one string")
        if len(texts) == 0:
            return torch.empty(0, self.dim, device=self.device)
        max_length = min(int(self.tokenizer.model_max_length), self._max_text_positions())
        self._unpark()
        chunks = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                tokens = self.tokenizer(list(texts[start : start + self.batch_size]), padding=True, truncation=True,
                                        max_length=max_length, return_tensors="pt").to(self.device)
                chunks.append(F.normalize(self._text_features(tokens).float(), dim=-1))
        return torch.cat(chunks)

    def _text_features(self, tokens: Any) -> torch.Tensor:
        raise NotImplementedError

    def _max_text_positions(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)


def _pooled(output: Any) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output holds the projected features;
    # 4.x returned the tensor itself.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class DinoEncoder(ImageTextEncoder):
    """DreamBench DINO: the CLS token of the last hidden state (after the final layer norm)."""

    kind = "dino"

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]

    def encode_patches(self, images: ImageBatch) -> torch.Tensor:
        """(N, P, D) unit-norm patch tokens of the last hidden state (the CLS token dropped): where in the
        image each feature is, which one global vector averages away. Differentiable like encode_images."""
        track = isinstance(images, torch.Tensor) and images.requires_grad and torch.is_grad_enabled()
        self._unpark()
        chunks = []
        with torch.set_grad_enabled(track):
            for start in range(0, len(images), self.batch_size):
                tokens = self.model(pixel_values=self.pixel_values(images[start : start + self.batch_size])).last_hidden_state
                chunks.append(F.normalize(tokens[:, 1:].float(), dim=-1))
        return torch.cat(chunks)


class ClipEncoder(ImageTextEncoder):
    """CLIP's projected image and text embeddings (get_image_features / get_text_features)."""

    kind = "clip"
    has_text = True

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_image_features(pixel_values=pixel_values))

    def _text_features(self, tokens: Any) -> torch.Tensor:
        return _pooled(self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]))


class AlignEncoder(ClipEncoder):
    """ALIGN: pooled EfficientNet features and the projected BERT [CLS] state, as AlignModel does."""

    kind = "align"

    def _text_features(self, tokens: Any) -> torch.Tensor:
        return _pooled(self.model.get_text_features(**{k: tokens[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in tokens}))


_ENCODER_CLASSES: dict[str, type[ImageTextEncoder]] = {"dino": DinoEncoder, "clip": ClipEncoder, "align": AlignEncoder}


# -- loading ---------------------------------------------------------------------------------------

def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}
    resolved = getattr(torch, names.get(str(dtype), str(dtype)), None)
    if not isinstance(resolved, torch.dtype):
        raise ConfigError(f"encoder dtype {dtype!r} is not a torch dtype (float32, float16, bfloat16)")
    return resolved


def load_encoder(kind: str, model: str | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype | str | None = None) -> ImageTextEncoder:
    """Load (once per process) a frozen judge of `kind` from a hub id, a local folder or "tiny"."""
    if kind not in ENCODER_KINDS:
        raise ConfigError(f"encoder kind {kind!r} is unknown; use one of {', '.join(ENCODER_KINDS)}")
    model = str(model or DEFAULT_ENCODER_MODELS[kind])
    return _load_encoder_cached(kind, model, str(torch.device(device)), _dtype(dtype))


def clear_encoder_cache() -> None:
    """Forget the loaded encoders (tests; freeing memory)."""
    _load_encoder_cached.cache_clear()
    _LOADED.clear()


def park_encoders() -> None:
    """Park every loaded judge (see ImageTextEncoder.park); each returns to its device when next used. A no-op while
    parking is held (parking_held)."""
    if _PARKING_HELD:
        return
    for encoder in _LOADED:
        encoder.park()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


_LOADED: list[ImageTextEncoder] = []  # what _load_encoder_cached holds, for park_encoders
_PARKING_HELD = 0  # > 0: park_encoders does nothing (parking_held)
_PARKING_LOCK = threading.Lock()  # guards parking_held's count and every park / unpark move


@contextmanager
def parking_held():
    """Keep the loaded judges where they are: park_encoders is a no-op inside. Training threads that share the judges
    (train-many: one subject validates while another's DPG critic encodes) must not move them off the device under
    each other; the holder parks once when none of them needs the judges."""
    global _PARKING_HELD
    with _PARKING_LOCK:
        _PARKING_HELD += 1
    try:
        yield
    finally:
        with _PARKING_LOCK:
            _PARKING_HELD -= 1


@functools.cache
def _load_encoder_cached(kind: str, model: str, device: str, dtype: torch.dtype | None) -> ImageTextEncoder:
    import transformers

    transformers.utils.logging.disable_progress_bar()  # per-file loading bars are noise here
    path = resolve_encoder_path(kind, model)
    try:
        loaded, processor, tokenizer = _from_pretrained(kind, path)
    except ConfigError:
        raise
    except Exception as exc:  # OSError (missing/offline), ValueError, safetensors errors, ...
        raise ConfigError(f"could not load {kind} model {model!r}: {_first_line(exc)}") from exc
    loaded = loaded.to(device=device, dtype=dtype) if dtype is not None else loaded.to(device)
    encoder_class = ClipEncoder if loaded.config.model_type == "clip" else _ENCODER_CLASSES[kind]
    encoder = encoder_class(model, path, loaded, processor, tokenizer, device=device, dtype=dtype)
    _LOADED.append(encoder)
    return encoder


def resolve_encoder_path(kind: str, model: str) -> str:
    """The folder or hub id from_pretrained reads; builds the tiny preset on first use."""
    if model == TINY_MODEL:
        return str(tiny_encoder_path(kind))
    if (judge := preset_judge_path(model, kind)) is not None:  # e.g. mini: the MiniBench judges
        return str(judge)
    local = Path(model).expanduser()
    return str(local) if local.exists() else model


def _from_pretrained(kind: str, path: str) -> tuple[Any, Any, Any]:
    import transformers
    from transformers import (
        AlignModel,
        AutoConfig,
        AutoImageProcessor,
        AutoTokenizer,
        CLIPModel,
        Dinov2Model,
        ViTModel,
    )

    # Read config.json first: loading a CLIP checkpoint into ViTModel would "work" with random weights.
    model_type = AutoConfig.from_pretrained(path, trust_remote_code=False).model_type
    if model_type not in _MODEL_TYPES[kind]:
        raise ConfigError(f"{kind} model {path!r} is a {model_type!r} checkpoint; expected {' or '.join(_MODEL_TYPES[kind])}")
    if kind == "dino":
        cls, extra = (ViTModel, {"add_pooling_layer": False}) if model_type == "vit" else (Dinov2Model, {})
    else:
        cls, extra = {"clip": CLIPModel, "align": AlignModel}[model_type], {}
    model, info = cls.from_pretrained(path, output_loading_info=True, trust_remote_code=False, **extra)
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        warnings.warn(f"{kind} model {path!r}: {len(missing)} weights were not in the checkpoint and are random "
                      f"(e.g. {missing[0]}); its scores are not meaningful", stacklevel=3)
    # The processors warn that torchvision is absent and fall back to PIL, which is what we want.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False) if kind != "dino" else None
    finally:
        transformers.logging.set_verbosity(verbosity)
    return model, processor, tokenizer


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else type(exc).__name__


# -- the tiny preset -------------------------------------------------------------------------------

def tiny_encoder_path(kind: str) -> Path:
    """A from_pretrained folder holding the tiny `kind` encoder, written on first use."""
    folder = cache_root() / "encoders" / f"{kind}-tiny-v{TINY_ENCODER_VERSION}"
    marker = folder / "rewardbooth_tiny.json"
    if marker.exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with torch.random.fork_rng(devices=[]):  # seeded weights without disturbing the caller's RNG
        torch.manual_seed(TINY_ENCODER_VERSION * 1000 + ENCODER_KINDS.index(kind))
        parts = _TINY_BUILDERS[kind]()
    for part in parts:
        part.save_pretrained(tmp)
    (tmp / "rewardbooth_tiny.json").write_text(json.dumps({"kind": kind, "version": TINY_ENCODER_VERSION}))
    try:  # atomic publish: concurrent workers may race to build the same preset
        tmp.rename(folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _build_tiny_dino() -> list[Any]:
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    # dino-vits16 shape in miniature: 32 px, 8 px patches -> 16 tokens + CLS. The wider init
    # (0.3, not 0.02) keeps the CLS token from ignoring the image, so scores spread out.
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, qkv_bias=True, initializer_range=0.3)
    processor = ViTImageProcessorPil(size={"height": 32, "width": 32}, resample=2,  # bilinear, like dino-vits16
                                     image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    return [ViTModel(config, add_pooling_layer=False), processor]


def _build_tiny_clip() -> list[Any]:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    vocab = _byte_level_vocab()
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 77, "bos_token_id": vocab["<|startoftext|>"],
                     "eos_token_id": vocab["<|endoftext|>"], "pad_token_id": vocab["<|endoftext|>"]},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 4},
        projection_dim=32,
    )
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return [CLIPModel(config), processor, tokenizer]


def _build_tiny_align() -> list[Any]:
    from transformers import (
        AlignConfig,
        AlignModel,
        BertTokenizer,
        EfficientNetImageProcessorPil,
    )

    # WordPiece over single characters: every word splits into "c" + "##c" pieces, no hub vocab.
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars)]
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, model_max_length=64)
    config = AlignConfig(
        text_config={"vocab_size": len(tokens), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "intermediate_size": 64, "max_position_embeddings": 64},
        # Two EfficientNet stages (32 -> 16 -> 32 channels, stride 2 each) after the 32-channel stem;
        # the last stage's width is the image embedding size, so it must equal projection_dim.
        vision_config={"image_size": 32, "width_coefficient": 1.0, "depth_coefficient": 1.0, "kernel_sizes": [3, 3],
                       "in_channels": [32, 16], "out_channels": [16, 32], "strides": [2, 2], "num_block_repeats": [1, 1],
                       "expand_ratios": [1, 2], "hidden_dim": 64, "depthwise_padding": []},
        projection_dim=32,
    )
    # align-base style preprocessing: square resize, pixels scaled to [-1, 1], no mean/std.
    processor = EfficientNetImageProcessorPil(size={"height": 32, "width": 32}, resample=3, do_center_crop=False,
                                              rescale_factor=1 / 127.5, rescale_offset=True, do_normalize=False,
                                              include_top=False)
    return [AlignModel(config), processor, tokenizer]


_TINY_BUILDERS = {"dino": _build_tiny_dino, "clip": _build_tiny_clip, "align": _build_tiny_align}
