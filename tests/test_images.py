import io

import numpy as np
import pytest
import torch
from PIL import Image

from vitflow.data.images import augmentation, load_image, normalize, resize_and_crop, to_rgb
from vitflow.models import DataConfig, load_model

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


def odd_shaped_images() -> list[Image.Image]:
    """Noise at sizes and aspect ratios where resize rounding and crop offsets show."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
            for width, height in [(97, 61), (61, 97), (300, 201), (45, 45), (33, 120)]]


def grey_levels(pixels: torch.Tensor, data_config: DataConfig) -> torch.Tensor:
    """Normalised pixels [.., 3, S, S] back on the 0-255 scale."""
    mean, std = (torch.tensor(values).view(3, 1, 1) for values in (data_config.mean, data_config.std))
    return (pixels * std + mean) * 255


@pytest.mark.parametrize("backend", ["pil", "torchvision"])
def test_pixels_match_the_image_processor_saved_with_a_transformers_model(tiny_hf_model, tmp_path, backend):
    from transformers import AutoImageProcessor

    model = load_model(str(tiny_hf_model), ["a", "b"], image_size=48)  # fine-tuned at another size than its own
    saved = model.save(tmp_path / "model")
    processor = AutoImageProcessor.from_pretrained(saved, backend=backend)
    for image in odd_shaped_images():
        ours = load_image(to_png(image), model.data_config).float()
        theirs = grey_levels(processor(image, return_tensors="pt")["pixel_values"][0], model.data_config)
        assert ours.shape == theirs.shape == (3, 48, 48)
        assert (ours - theirs).abs().max() <= 1.0 + 1e-3, image.size  # within one grey level


def test_a_saved_transformers_model_gives_the_same_probabilities_through_pipeline(tiny_dinov2, tmp_path):
    from transformers import pipeline

    model = load_model(str(tiny_dinov2), ["ant", "bee", "wasp"], image_size=48).eval()
    saved = model.save(tmp_path / "model")
    classify = pipeline("image-classification", model=str(saved), top_k=None)
    for image in odd_shaped_images():
        with torch.no_grad():
            ours = model(normalize(load_image(to_png(image), model.data_config)[None], model.data_config)).softmax(1)[0]
        theirs = {row["label"]: row["score"] for row in classify(image)}
        assert [theirs[label] for label in model.labels] == pytest.approx(ours.tolist(), abs=2e-3)


def test_pixels_match_timms_own_transforms(tiny_timm_model):
    import timm

    model = load_model(str(tiny_timm_model), ["a", "b"])
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model.model))
    for image in odd_shaped_images():
        ours = load_image(to_png(image), model.data_config).float()
        theirs = grey_levels(transform(image), model.data_config)
        assert (ours - theirs).abs().max() <= 1.0 + 1e-3, image.size


def to_png(image: Image.Image) -> io.BytesIO:
    encoded = io.BytesIO()
    image.save(encoded, format="png")
    encoded.seek(0)
    return encoded
