"""torchvision.transforms.functional's `crop`, the one function diffusers' FLUX / SD3 DreamBooth scripts import."""

from PIL import Image


def crop(image: Image.Image, top: int, left: int, height: int, width: int) -> Image.Image:
    return image.crop((left, top, left + width, top + height))
