"""PIL / torch versions of the torchvision transforms the research scripts call (see __init__)."""

from __future__ import annotations

import enum
import random

import numpy as np
import torch
from PIL import Image


class InterpolationMode(enum.Enum):
    NEAREST = Image.NEAREST
    BILINEAR = Image.BILINEAR
    BICUBIC = Image.BICUBIC
    LANCZOS = Image.LANCZOS


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class Resize:
    """Shorter side to `size` (an int), or exactly (h, w)."""

    def __init__(self, size, interpolation=InterpolationMode.BILINEAR, antialias=True):
        self.size, self.interpolation = size, interpolation

    def __call__(self, image: Image.Image) -> Image.Image:
        resample = self.interpolation.value if isinstance(self.interpolation, InterpolationMode) else self.interpolation
        if isinstance(self.size, int):
            w, h = image.size
            scale = self.size / min(w, h)
            return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample)
        return image.resize((self.size[1], self.size[0]), resample)


def _pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)


class CenterCrop:
    def __init__(self, size):
        self.size = _pair(size)

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        th, tw = self.size
        left, top = int(round((w - tw) / 2)), int(round((h - th) / 2))
        return image.crop((left, top, left + tw, top + th))


class RandomCrop(CenterCrop):
    @staticmethod
    def get_params(image: Image.Image, output_size) -> tuple[int, int, int, int]:
        """(top, left, height, width) of a random crop, as torchvision's; the FLUX scripts crop with it."""
        w, h = image.size
        th, tw = output_size
        return random.randint(0, max(0, h - th)), random.randint(0, max(0, w - tw)), th, tw

    def __call__(self, image: Image.Image) -> Image.Image:
        top, left, th, tw = self.get_params(image, self.size)
        return image.crop((left, top, left + tw, top + th))


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.transpose(Image.FLIP_LEFT_RIGHT) if random.random() < self.p else image


class ToTensor:
    def __call__(self, image: Image.Image) -> torch.Tensor:
        array = np.asarray(image.convert("RGB") if image.mode not in ("RGB", "L") else image, dtype=np.float32) / 255.0
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array.transpose(2, 0, 1).copy())


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
