"""Shared fixtures: tiny models saved locally, a small slice of real data, isolated stores.

Everything a test writes goes under a temporary directory: caches (VITFLOW_WORK_DIR),
the MLflow store (MLFLOW_TRACKING_URI) and Prefect's home.
"""

import os
import tempfile
from pathlib import Path

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="vitflow-tests-"))
os.environ["VITFLOW_WORK_DIR"] = str(_SESSION_DIR / "work")
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SESSION_DIR / 'mlflow.db'}"
os.environ["PREFECT_HOME"] = str(_SESSION_DIR / "prefect")
os.environ["HF_HUB_OFFLINE"] = "1"  # no hub here: fail at once instead of retrying

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
PNEUMONIA_NPZ = SHARED_DATASETS / "pneumoniamnist.npz"
TINY_IMAGE_SIZE = 32


def save_tiny_hf_vit(directory: Path, num_labels: int = 3) -> Path:
    """A randomly initialised 2-block ViT (32x32 input) saved with `save_pretrained`."""
    import torch
    from transformers import BitImageProcessor, ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=TINY_IMAGE_SIZE, patch_size=8, num_labels=num_labels)
    ViTForImageClassification(config).save_pretrained(directory)
    BitImageProcessor(size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE,
                      "width": TINY_IMAGE_SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(directory)
    return directory


TIMM_ARCHITECTURES = {  # timm model name -> what makes it tiny (32x32 input, 2 blocks)
    "vit_tiny_patch16_224": {"patch_size": 8, "embed_dim": 32},
    "deit_tiny_distilled_patch16_224": {"patch_size": 8, "embed_dim": 32},  # class + distillation token, two heads
    "vit_tiny_r_s16_p8_224": {"embed_dim": 32},  # hybrid: a ResNet stem feeds the transformer
}


def save_tiny_timm_vit(directory: Path, num_classes: int = 3, architecture: str = "vit_tiny_patch16_224") -> Path:
    """A randomly initialised 2-block timm vision transformer saved as a local timm checkpoint."""
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(architecture, pretrained=False, img_size=TINY_IMAGE_SIZE, depth=2, num_heads=2,
                              num_classes=num_classes, **TIMM_ARCHITECTURES[architecture])
    timm.models.save_for_hf(model, str(directory), safe_serialization=True)
    return directory


def write_pneumonia_folder(directory: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """A slice of the real PneumoniaMNIST arrays written as an image folder: <split>/<class>/*.png."""
    arrays = np.load(PNEUMONIA_NPZ)
    rng = np.random.default_rng(seed)
    names = {0: "normal", 1: "pneumonia"}
    for split, count in per_class.items():
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"][:, 0]
        for label, name in names.items():
            (directory / split / name).mkdir(parents=True, exist_ok=True)
            for index in rng.choice(np.flatnonzero(labels == label), size=count, replace=False):
                Image.fromarray(images[index], mode="L").save(directory / split / name / f"{index}.png")
    return directory


def pneumonia_npz(path: Path, per_split: dict[str, int]) -> Path:
    """The first `count` images of each class of each split of the real PneumoniaMNIST arrays, as a smaller .npz."""
    arrays = np.load(PNEUMONIA_NPZ)
    sliced = {}
    for split, count in per_split.items():
        labels = arrays[f"{split}_labels"][:, 0]
        chosen = np.sort(np.concatenate([np.flatnonzero(labels == label)[:count] for label in (0, 1)]))
        sliced.update({f"{split}_images": arrays[f"{split}_images"][chosen],
                       f"{split}_labels": arrays[f"{split}_labels"][chosen]})
    np.savez(path, **sliced)
    return path


def write_cache(cache_dir: Path, split: str, images, labels) -> Path:
    """A preprocessed cache holding exactly these uint8 images [N, 3, S, S] and class indices, made the way
    the flow makes one: saved as PNGs, then preprocessed at their own size (so nothing is resampled)."""
    import pandas as pd

    from vitflow.data.cache import preprocess_dataset
    from vitflow.models import DataConfig

    folder = cache_dir.with_name(f"{cache_dir.name}-images")
    folder.mkdir(parents=True)
    names = [str(index) for index in range(int(labels.max()) + 1)]
    rows = []
    for index, (image, label) in enumerate(zip(images, labels.tolist(), strict=True)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{index:05d}.png")
        rows.append({"path": f"{index:05d}.png", "label": names[label], "split": split, "status": "ok"})
    side = images.shape[-1]
    return preprocess_dataset(pd.DataFrame(rows), folder, DataConfig(side, side, (0.5,) * 3, (0.5,) * 3), names,
                              cache_dir, workers=0, progress=False)


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return _SESSION_DIR


@pytest.fixture(scope="session")
def tiny_hf_model(session_dir) -> Path:
    return save_tiny_hf_vit(session_dir / "tiny-hf-vit")


@pytest.fixture(scope="session")
def tiny_timm_model(session_dir) -> Path:
    return save_tiny_timm_vit(session_dir / "tiny-timm-vit")


@pytest.fixture(scope="session")
def tiny_deit_distilled(session_dir) -> Path:
    return save_tiny_timm_vit(session_dir / "tiny-deit-distilled", architecture="deit_tiny_distilled_patch16_224")


@pytest.fixture(scope="session")
def tiny_hybrid(session_dir) -> Path:
    return save_tiny_timm_vit(session_dir / "tiny-hybrid", architecture="vit_tiny_r_s16_p8_224")


@pytest.fixture(scope="session")
def tiny_dinov2(session_dir) -> Path:
    """DINOv2 like the default foundation model (position embeddings interpolated to any input size); 32x32."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2ForImageClassification

    directory = session_dir / "tiny-dinov2"
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                          image_size=TINY_IMAGE_SIZE, patch_size=8, num_labels=3)
    Dinov2ForImageClassification(config).save_pretrained(directory)
    BitImageProcessor(size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE,
                      "width": TINY_IMAGE_SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def pneumonia_folder(session_dir) -> Path:
    """train 60 + val 20 + test 30 images per class of real chest X-rays (28x28 grayscale)."""
    return write_pneumonia_folder(session_dir / "pneumonia", {"train": 60, "val": 20, "test": 30})


def preprocess_folder(folder: Path, model_dir: Path, cache_dir: Path):
    """Every image of a <split>/<class>/ folder preprocessed for the model in `model_dir`: (the cache directory,
    the manifest rows, the model's data config)."""
    import pandas as pd

    from vitflow.data.cache import preprocess_dataset
    from vitflow.models import load_model

    rows = [{"path": str(path.relative_to(folder)), "label": path.parent.name, "split": path.parts[-3],
             "checksum": "", "status": "ok"} for path in sorted(folder.rglob("*.png"))]
    labels = sorted({row["label"] for row in rows})
    config = load_model(str(model_dir), labels).data_config
    cache = preprocess_dataset(pd.DataFrame(rows), folder, config, labels, cache_dir, workers=0, progress=False)
    return cache, rows, config


@pytest.fixture(scope="session")
def pneumonia_cache(pneumonia_folder, tiny_hf_model, session_dir) -> Path:
    """`pneumonia_folder` preprocessed for `tiny_hf_model`, shared: tests only read it."""
    return preprocess_folder(pneumonia_folder, tiny_hf_model, session_dir / "pneumonia-cache")[0]


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory) -> str:
    """A `prefect server start` of the session's own, on a free loopback port; its API URL."""
    import sys

    from servers import free_port, running

    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": url}
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
               "--no-ui"]
    with running(command, env, home / "server.log", health_url=f"{url}/health", timeout=120):
        yield url
