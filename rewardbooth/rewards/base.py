"""Rewards: one score per image for (images, prompts, subject), built from a name or a setting.

Built-ins (docs/methods.md#rpo, DreamBench metrics): `dino`, `clip_i`, `clip_t`, `align_i`, `align_t`
and RPO's `lambda_harmonic`. Users add their own with `register_reward`, the `rewardbooth.rewards`
entry-point group, or a `"module.path:function"` spec.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import inspect
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import numpy as np
import torch
from PIL import Image

from rewardbooth.errors import ConfigError
from rewardbooth.rewards.encoders import (
    DEFAULT_ENCODER_MODELS,
    ImageBatch,
    ImageTextEncoder,
    load_encoder,
)

ENTRY_POINT_GROUP = "rewardbooth.rewards"


def strip_identifier(prompt: str, identifier: str) -> str:
    """Remove the identifier as a whole word ("a sks dog" -> "a dog"; "sksa" is left alone)."""
    if identifier:
        # Lookarounds instead of \b so identifiers like "[V]" (non-word characters) work too.
        prompt = re.sub(rf"(?<!\w){re.escape(identifier)}(?!\w)", "", prompt)
    return re.sub(r"\s+", " ", prompt).strip()


@dataclass
class Subject:
    """What a reward compares generated images against."""
    name: str
    references: list[Image.Image]
    identifier: str = "sks"
    class_noun: str = ""


class Reward:
    """Scores a batch: `reward(images, prompts, subject) -> Tensor[N]`, one value per image.

    `images` is a list of PIL images or a float tensor (N, 3, H, W) in [0, 1]. When
    `differentiable` is true and the tensor requires grad, the scores carry gradients to it.
    """

    name: str = "reward"
    differentiable: bool = False

    def __call__(self, images: ImageBatch, prompts: Sequence[str], subject: Subject) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _check_batch(name: str, images: ImageBatch, prompts: Sequence[str]) -> None:
    if isinstance(prompts, str):
        raise TypeError(f"reward {name!r}: prompts must be a list of strings, one per image, not one string")
    if len(prompts) != len(images):
        raise ValueError(f"reward {name!r}: got {len(images)} images but {len(prompts)} prompts")


def _fingerprint(references: Sequence[Any]) -> str:
    """Content hash of the reference images, so a reused subject name never serves stale features."""
    digest = hashlib.blake2b(digest_size=16)
    for ref in references:
        if isinstance(ref, torch.Tensor):
            data, shape = ref.detach().cpu().contiguous().numpy().tobytes(), tuple(ref.shape)
        else:
            data, shape = ref.tobytes(), (ref.mode, ref.size)
        digest.update(repr(shape).encode())
        digest.update(data)
    return digest.hexdigest()


class EncoderReward(Reward):
    """Base for the built-ins: one shared encoder, reference features cached per subject."""
    differentiable = True
    max_cached_subjects = 64

    def __init__(self, encoder: ImageTextEncoder):
        self.encoder = encoder
        self._reference_cache: OrderedDict[tuple[str, str, str], torch.Tensor] = OrderedDict()

    def reference_features(self, subject: Subject) -> torch.Tensor:
        """(R, D) unit-norm features of the subject's references, computed once per subject."""
        if len(subject.references) == 0:
            raise ValueError(f"reward {self.name!r}: subject {subject.name!r} has no reference images")
        key = (subject.name, f"{self.encoder.kind}:{self.encoder.name}", _fingerprint(subject.references))
        cached = self._reference_cache.get(key)
        if cached is None:
            refs = subject.references
            refs = refs.detach() if isinstance(refs, torch.Tensor) else list(refs)
            with torch.no_grad():
                cached = self.encoder.encode_images(refs)
            self._reference_cache[key] = cached
            while len(self._reference_cache) > self.max_cached_subjects:
                self._reference_cache.popitem(last=False)
        else:
            self._reference_cache.move_to_end(key)
        return cached

    def image_similarity(self, images: ImageBatch, subject: Subject) -> torch.Tensor:
        """Mean cosine over references, in [-1, 1]."""
        references = self.reference_features(subject)  # first: the encoder then remembers `images` for the text score
        return (self.encoder.encode_images(images) @ references.T).mean(dim=1)

    def text_similarity(self, images: ImageBatch, prompts: Sequence[str], subject: Subject) -> torch.Tensor:
        """Cosine with the prompt, identifier removed, in [-1, 1]."""
        features = self.encoder.encode_images(images)
        texts = self.encoder.encode_texts([strip_identifier(p, subject.identifier) for p in prompts])
        return (features * texts).sum(dim=-1)


class ImageReward(EncoderReward):
    """Mean cosine between each image and the subject's references (DINO, CLIP-I, ALIGN-I)."""
    def __init__(self, encoder: ImageTextEncoder, name: str):
        super().__init__(encoder)
        self.name = name

    def __call__(self, images: ImageBatch, prompts: Sequence[str], subject: Subject) -> torch.Tensor:
        _check_batch(self.name, images, prompts)
        return self.image_similarity(images, subject)


class TextReward(EncoderReward):
    """Cosine between each image and its prompt with the identifier removed (CLIP-T, ALIGN-T)."""
    def __init__(self, encoder: ImageTextEncoder, name: str):
        if not encoder.has_text:
            raise ConfigError(f"reward {name!r} needs an encoder with a text tower; {encoder.kind} has none")
        super().__init__(encoder)
        self.name = name

    def __call__(self, images: ImageBatch, prompts: Sequence[str], subject: Subject) -> torch.Tensor:
        _check_batch(self.name, images, prompts)
        return self.text_similarity(images, prompts, subject)


def _encoder_for(kind: str, models: Mapping[str, str] | None, device: str, dtype: Any) -> ImageTextEncoder:
    return load_encoder(kind, {**DEFAULT_ENCODER_MODELS, **(models or {})}[kind], device=device, dtype=dtype)


class DinoReward(ImageReward):
    def __init__(self, *, models: Mapping[str, str] | None = None, device: str = "cpu", dtype: Any = None):
        super().__init__(_encoder_for("dino", models, device, dtype), "dino")


class DinoPatchReward(ImageReward):
    """Fine detail: each patch of the image matched to its most similar patch of any reference (DINO patch tokens),
    the cosines averaged over the image's patches, in [-1, 1]. A global feature (`dino`) averages a pattern or a
    small part away; a patch match keeps it. Not in the papers: a rewardbooth variant (`dpg-patch`)."""

    def __init__(self, *, models: Mapping[str, str] | None = None, device: str = "cpu", dtype: Any = None):
        super().__init__(_encoder_for("dino", models, device, dtype), "dino_patch")
        self._patch_cache: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()

    def reference_patches(self, subject: Subject) -> torch.Tensor:
        """(R * P, D) unit-norm patch tokens of the subject's references, computed once per subject."""
        key = (subject.name, _fingerprint(subject.references))
        if key not in self._patch_cache:
            refs = subject.references
            with torch.no_grad():
                self._patch_cache[key] = self.encoder.encode_patches(refs.detach() if isinstance(refs, torch.Tensor) else list(refs)).flatten(0, 1)
            while len(self._patch_cache) > self.max_cached_subjects:
                self._patch_cache.popitem(last=False)
        return self._patch_cache[key]

    def __call__(self, images: ImageBatch, prompts: Sequence[str], subject: Subject) -> torch.Tensor:
        _check_batch(self.name, images, prompts)
        references = self.reference_patches(subject)
        patches = self.encoder.encode_patches(images if isinstance(images, torch.Tensor) else list(images))
        return (patches @ references.T).amax(dim=-1).mean(dim=-1)


class ClipImageReward(ImageReward):
    def __init__(self, *, models: Mapping[str, str] | None = None, device: str = "cpu", dtype: Any = None):
        super().__init__(_encoder_for("clip", models, device, dtype), "clip_i")


class ClipTextReward(TextReward):
    def __init__(self, *, models: Mapping[str, str] | None = None, device: str = "cpu", dtype: Any = None):
        super().__init__(_encoder_for("clip", models, device, dtype), "clip_t")


class AlignImageReward(ImageReward):
    def __init__(self, *, models: Mapping[str, str] | None = None, device: str = "cpu", dtype: Any = None):
        super().__init__(_encoder_for("align", models, device, dtype), "align_i")


class AlignTextReward(TextReward):
    def __init__(self, *, models: Mapping[str, str] | None = None, device: str = "cpu", dtype: Any = None):
        super().__init__(_encoder_for("align", models, device, dtype), "align_t")


def harmonic_reward(s_i2i: torch.Tensor, s_t2i: torch.Tensor, lam: float) -> torch.Tensor:
    """RPO's r = 1 / (lam / s_i2i + (1 - lam) / s_t2i) on scores already mapped to [0, 1].

    lam = 1 returns s_i2i and lam = 0 returns s_t2i exactly (no 0 * inf when a score is 0).
    """
    if lam == 1:
        return s_i2i.clone()
    if lam == 0:
        return s_t2i.clone()
    tiny = torch.finfo(s_i2i.dtype).tiny  # a score of exactly 0 gives r = 0 instead of nan
    return 1.0 / (lam / s_i2i.clamp_min(tiny) + (1.0 - lam) / s_t2i.clamp_min(tiny))


class LambdaHarmonicReward(EncoderReward):
    """RPO's lambda-Harmonic reward (docs/methods.md#rpo), ALIGN features by default."""
    def __init__(self, *, lam: float = 0.5, encoder: str = "align", models: Mapping[str, str] | None = None,
                 device: str = "cpu", dtype: Any = None):
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= float(lam) <= 1.0:
            raise ConfigError(f"reward 'lambda_harmonic': lam must be a number in [0, 1], got {lam!r}")
        if encoder not in ("align", "clip"):
            raise ConfigError(f"reward 'lambda_harmonic': encoder must be 'align' or 'clip', got {encoder!r}")
        super().__init__(_encoder_for(encoder, models, device, dtype))
        self.name = "lambda_harmonic"
        self.lam = float(lam)

    def components(self, images: ImageBatch, prompts: Sequence[str], subject: Subject) -> tuple[torch.Tensor, torch.Tensor]:
        """(s_i2i, s_t2i), each mapped to [0, 1] by (s + 1) / 2."""
        _check_batch(self.name, images, prompts)
        features = self.encoder.encode_images(images)  # one image pass serves both sides
        s_i2i = (features @ self.reference_features(subject).T).mean(dim=1)
        texts = self.encoder.encode_texts([strip_identifier(p, subject.identifier) for p in prompts])
        s_t2i = (features * texts).sum(dim=-1)
        return (s_i2i + 1) / 2, (s_t2i + 1) / 2

    def __call__(self, images: ImageBatch, prompts: Sequence[str], subject: Subject) -> torch.Tensor:
        return harmonic_reward(*self.components(images, prompts, subject), self.lam)


# -- user rewards ----------------------------------------------------------------------------------

ScoreFunction = Callable[[ImageBatch, Sequence[str], Subject], Any]


class FunctionReward(Reward):
    """Wraps f(images, prompts, subject, **settings) -> Tensor | list | ndarray into a Reward.

    Non-differentiable unless the function has `differentiable = True`.
    """

    def __init__(self, fn: ScoreFunction, name: str, settings: Mapping[str, Any] | None = None, spec: str | None = None):
        self.fn = fn
        self.name = name
        self.spec = spec or name
        self.settings = dict(settings or {})
        self.differentiable = bool(getattr(fn, "differentiable", False))
        try:
            inspect.signature(fn).bind(None, None, None, **self.settings)
        except TypeError as exc:
            raise ConfigError(f"reward {self.spec!r}: {fn.__qualname__ if hasattr(fn, '__qualname__') else fn} "
                              f"cannot take (images, prompts, subject{''.join(', ' + k for k in self.settings)}): {exc}") from None
        except ValueError:  # builtins without a signature: find out when called
            pass

    def __call__(self, images: ImageBatch, prompts: Sequence[str], subject: Subject) -> torch.Tensor:
        _check_batch(self.name, images, prompts)
        return _as_scores(self.spec, self.fn(images, prompts, subject, **self.settings), len(images), self.differentiable)


def _as_scores(spec: str, out: Any, n: int, differentiable: bool) -> torch.Tensor:
    """A user's output as a float tensor with one value per image."""
    try:
        if isinstance(out, torch.Tensor):
            scores = out if out.is_floating_point() else out.float()
        else:
            scores = torch.as_tensor(np.asarray(out, dtype=np.float64), dtype=torch.float32)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"reward {spec!r} returned {type(out).__name__}, not numbers: {exc}") from None
    if scores.ndim == 2 and scores.shape[1] == 1:
        scores = scores[:, 0]
    elif scores.ndim == 0 and n == 1:
        scores = scores.reshape(1)
    if tuple(scores.shape) != (n,):
        raise ConfigError(f"reward {spec!r} returned shape {tuple(scores.shape)} for {n} images; expected one value per image ({n},)")
    return scores if differentiable else scores.detach()


# -- registry and construction ---------------------------------------------------------------------

# A target is a Reward subclass (instantiated with the settings, plus models/device when its
# constructor takes them), a Reward instance (used as is) or a plain scoring function (wrapped).
RewardTarget = type | Reward | ScoreFunction

_REGISTRY: dict[str, RewardTarget] = {
    "dino": DinoReward,
    "dino_patch": DinoPatchReward,
    "clip_i": ClipImageReward,
    "clip_t": ClipTextReward,
    "align_i": AlignImageReward,
    "align_t": AlignTextReward,
    "lambda_harmonic": LambdaHarmonicReward,
}
BUILTIN_REWARDS = tuple(_REGISTRY)


def register_reward(name: str, factory: RewardTarget, *, overwrite: bool = False) -> None:
    """Make `name` usable in settings: a Reward subclass, a Reward instance or f(images, prompts, subject)."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][\w.\-]*", name):
        raise ConfigError(f"reward name {name!r} must be a word (letters, digits, _ . -), without ':'")
    if not callable(factory):
        raise ConfigError(f"reward {name!r}: {factory!r} is not callable")
    if name in _REGISTRY and not overwrite and _REGISTRY[name] is not factory:
        raise ConfigError(f"reward {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = factory


def unregister_reward(name: str) -> None:
    if name in BUILTIN_REWARDS:
        raise ConfigError(f"reward {name!r} is built in and cannot be removed")
    _REGISTRY.pop(name, None)


def available_rewards() -> list[str]:
    """Registered names and those announced by installed packages' entry points."""
    return sorted({*_REGISTRY, *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))})


def _resolve_target(name: str) -> tuple[RewardTarget, str]:
    """The target behind a spec name and the display name of the reward it makes."""
    if name in _REGISTRY:
        return _REGISTRY[name], name
    if ":" in name:
        module_name, _, attr = name.partition(":")
        if not module_name or not attr:
            raise ConfigError(f"reward {name!r}: write a custom reward as 'module.path:function'")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # ImportError, or the user's module failing while it imports
            raise ConfigError(f"reward {name!r}: cannot import {module_name!r}: {exc}".splitlines()[0]) from exc
        target: Any = module
        for part in attr.split("."):
            if not hasattr(target, part):
                raise ConfigError(f"reward {name!r}: module {module_name!r} has no attribute {attr!r}")
            target = getattr(target, part)
        return target, attr.rsplit(".", 1)[-1]
    matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if matches:
        try:
            return matches[0].load(), name
        except Exception as exc:
            raise ConfigError(f"reward {name!r}: entry point {matches[0].value!r} failed to load: {exc}".splitlines()[0]) from exc
    raise ConfigError(f"unknown reward {name!r}; known: {', '.join(available_rewards())} "
                      f"(or 'module.path:function' for your own)")


def _instantiate(target: RewardTarget, name: str, spec: str, settings: dict[str, Any],
                 models: Mapping[str, str] | None, device: str) -> Reward:
    if isinstance(target, type):
        params = inspect.signature(target).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        context = {k: v for k, v in (("models", models), ("device", device)) if takes_any or k in params}
        accepted = sorted(k for k, p in params.items() if k not in ("self", "models", "device") and p.kind in
                          (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))
        unknown = sorted(set(settings) - set(accepted)) if not takes_any else []
        if unknown:
            raise ConfigError(f"reward {spec!r}: unknown setting(s) {', '.join(unknown)} "
                              f"(accepted: {', '.join(accepted) or 'none'})")
        try:
            reward = target(**settings, **context)
        except ConfigError:
            raise
        except TypeError as exc:
            raise ConfigError(f"reward {spec!r}: bad settings: {exc}") from None
        if isinstance(reward, Reward) or (callable(reward) and hasattr(reward, "name")):
            return reward
        if callable(reward):
            return FunctionReward(reward, name, spec=spec)
        raise ConfigError(f"reward {spec!r}: {target.__name__}(...) did not make a reward")
    if isinstance(target, Reward):
        if settings:
            raise ConfigError(f"reward {spec!r} is a ready-made instance and takes no settings ({', '.join(settings)})")
        return target
    if callable(target):
        return FunctionReward(target, getattr(target, "name", name), settings, spec=spec)
    raise ConfigError(f"reward {spec!r}: {target!r} is neither a Reward nor a function")


def build_reward(spec: str | Mapping[str, Any], *, models: Mapping[str, str] | None = None,
                 device: str = "cpu") -> Reward:
    """A reward from a name ("dino"), a dict ({"name": "lambda_harmonic", "lam": 0.5}) or "module:function".

    `models` maps encoder kind ("dino", "clip", "align") to a checkpoint (hub id, folder or "tiny");
    missing kinds use DEFAULT_ENCODER_MODELS. A dict may carry "label" to rename the reward
    (e.g. two lambda_harmonic rewards with different lam in one report).
    """
    if isinstance(spec, str):
        name, settings = spec.strip(), {}
    elif isinstance(spec, Mapping):
        settings = dict(spec)
        name = settings.pop("name", None)
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"reward spec {dict(spec)!r} needs a 'name' (a registered reward or 'module:function')")
        name = name.strip()
    else:
        raise ConfigError(f"reward spec {spec!r} must be a name or a mapping with a 'name', not {type(spec).__name__}")
    if not name:
        raise ConfigError("reward spec is empty; use a registered name or 'module.path:function'")
    label = settings.pop("label", None)
    if label is not None and (not isinstance(label, str) or not label.strip()):
        raise ConfigError(f"reward {name!r}: label must be a non-empty string, got {label!r}")
    target, display = _resolve_target(name)
    reward = _instantiate(target, display, name, settings, models, device)
    if label:
        if isinstance(target, Reward):  # a shared registered instance: rename a copy, not the original
            reward = copy.copy(reward)
        reward.name = label.strip()
    for attr in ("name", "differentiable"):
        if not hasattr(reward, attr):
            raise ConfigError(f"reward {name!r} made {type(reward).__name__}, which has no {attr!r} attribute")
    return reward


__all__ = [
    "BUILTIN_REWARDS", "ENTRY_POINT_GROUP", "AlignImageReward", "AlignTextReward", "ClipImageReward", "ClipTextReward",
    "DinoReward", "EncoderReward", "FunctionReward", "ImageReward", "LambdaHarmonicReward", "Reward", "Subject",
    "TextReward", "available_rewards", "build_reward", "harmonic_reward", "register_reward", "strip_identifier",
    "unregister_reward",
]
