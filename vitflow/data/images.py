"""Image decoding and preparation shared by training, evaluation and serving.

Any image file becomes 8-bit RGB, resized and center-cropped as the model's `DataConfig`
says (uint8 [3, S, S]); `normalize` applies the model's own mean and std.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

from vitflow.errors import VitflowError
from vitflow.models import DataConfig

RESAMPLING = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
              "bicubic": Image.Resampling.BICUBIC}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image (grayscale, palette, RGBA, CMYK, 16-bit, EXIF-rotated) as 8-bit RGB."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        pixels = np.asarray(image, dtype=np.float64)
        low, high = pixels.min(), pixels.max()
        scaled = (pixels - low) / (high - low) * 255 if high > low else np.zeros_like(pixels)
        image = Image.fromarray(scaled.astype(np.uint8), mode="L")
    if image.mode in ("P", "PA", "LA", "RGBA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def resize_and_crop(image: Image.Image, data_config: DataConfig) -> torch.Tensor:
    """Resize the short side to `resize_size`, center-crop `image_size`; uint8 tensor [3, S, S].

    The long side is rounded down, as transformers' image processors and torchvision's Resize do, and the
    crop centred as the model's library does it, so the pixels match the model's own preprocessing.
    """
    width, height = image.size
    short, long = sorted((width, height))
    resized = (data_config.resize_size, max(data_config.image_size, int(data_config.resize_size * long / short)))
    new_size = resized if width <= height else resized[::-1]
    image = image.resize(new_size, RESAMPLING[data_config.interpolation])
    centre = (lambda margin: margin // 2) if data_config.crop_offset == "floor" else (lambda margin: round(margin / 2))
    left, top = (centre(side - data_config.image_size) for side in new_size)
    image = image.crop((left, top, left + data_config.image_size, top + data_config.image_size))
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def load_image(image_file: Path | str | BinaryIO, data_config: DataConfig) -> torch.Tensor:
    """One encoded image (a file path or a binary stream), ready for the model apart from normalisation:
    uint8 [3, S, S]. A file that is missing or not a readable image is a VitflowError naming it."""
    try:
        with Image.open(image_file) as image:
            return resize_and_crop(to_rgb(image), data_config)
    except OSError as error:
        raise VitflowError(f"{getattr(image_file, 'name', image_file)}: not a readable image ({error})") from None


def inspect_image(image_file: Path | BinaryIO, decode: bool = True) -> tuple[str, int, int, str, str]:
    """(md5, width, height, mode, reason) of one encoded image; fully decodes it when `decode`.

    An empty reason means usable; otherwise it says why the image cannot be read.
    """
    data = image_file.read_bytes() if isinstance(image_file, Path) else image_file.read()
    checksum = hashlib.md5(data).hexdigest()
    if not decode:
        return checksum, 0, 0, "", ""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return checksum, image.width, image.height, image.mode, ""
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return checksum, 0, 0, "", " ".join(f"unreadable image: {type(error).__name__}: {error}".split())


def normalize(images: torch.Tensor, data_config: DataConfig) -> torch.Tensor:
    """uint8 [N, 3, S, S] -> float32 normalised with the model's own mean and std."""
    mean = torch.tensor(data_config.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(data_config.std, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def augmentation(data_config: DataConfig, crop_scale_min: float) -> torch.nn.Module:
    """Training-time augmentation on uint8 tensors: random resized crop and horizontal flip."""
    from torchvision.transforms import v2  # imported here: torchvision takes seconds to import

    return v2.Compose([
        v2.RandomResizedCrop(data_config.image_size, scale=(crop_scale_min, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
    ])
