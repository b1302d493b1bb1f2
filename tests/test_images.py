import numpy as np
import pytest
import torch
from PIL import Image

from vitflow.data.images import augmentation, normalize, resize_and_crop, to_rgb
from vitflow.models import DataConfig

CONFIG = DataConfig(image_size=16, resize_size=20, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA", "1", "RGB"])
def test_every_mode_becomes_rgb(mode):
    image = Image.new(mode, (30, 20))
    converted = to_rgb(image)
    assert converted.mode == "RGB" and converted.size == (30, 20)


def test_sixteen_bit_images_keep_their_contrast():
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    image = Image.fromarray(ramp)
    assert image.mode == "I;16"
    converted = np.asarray(to_rgb(image))
    assert converted.min() == 0 and converted.max() == 255


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert np.asarray(to_rgb(image))[0, 0].tolist() == [255, 255, 255]


def test_resize_short_side_then_center_crop():
    image = Image.new("RGB", (100, 50), (0, 0, 0))
    image.paste((255, 255, 255), (45, 0, 55, 50))  # a white stripe in the middle
    pixels = resize_and_crop(image, CONFIG)
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.uint8
    assert pixels[:, :, 8].float().mean() > 200  # the stripe stays centered
    assert pixels[:, :, 0].float().mean() < 10


def test_normalize_uses_the_model_statistics():
    pixels = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    normalized = normalize(pixels, CONFIG)
    expected = [(1 - m) / s for m, s in zip(CONFIG.mean, CONFIG.std, strict=True)]
    torch.testing.assert_close(normalized[0, :, 0, 0], torch.tensor(expected))


def test_augmentation_keeps_shape_and_varies():
    torch.manual_seed(0)
    image = torch.randint(0, 255, (3, 16, 16), dtype=torch.uint8)
    augment = augmentation(CONFIG, crop_scale_min=0.3)
    outputs = [augment(image) for _ in range(5)]
    assert all(output.shape == (3, 16, 16) for output in outputs)
    assert any(not torch.equal(outputs[0], output) for output in outputs[1:])
