"""The MLflow pyfunc model that wraps a saved vitflow checkpoint for loading and serving.

Input: a DataFrame with an `image` column of encoded image bytes (JPEG, PNG, ...).
Output: a DataFrame with the top `label` and its `score` per row.
The weights travel in the model's `model_dir` artifact (safetensors, or ONNX for int8) and run at
the precision they were exported in; nothing is unpickled.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import mlflow.artifacts
import mlflow.pyfunc
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from PIL import Image

SIGNATURE = ModelSignature(inputs=Schema([ColSpec("binary", "image")]),
                           outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score")]))


class VitflowImageClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from vitflow.precision import load_exported

        self.model_dir = context.artifacts["model_dir"]
        self.model = load_exported(self.model_dir)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from vitflow.data.images import normalize, resize_and_crop, to_rgb

        images = [resize_and_crop(to_rgb(Image.open(io.BytesIO(data))), self.model.data_config)
                  for data in model_input["image"]]
        probabilities = self.model(normalize(torch.stack(images), self.model.data_config)).softmax(1)
        scores, indices = probabilities.max(1)
        return pd.DataFrame({"label": [self.model.labels[i] for i in indices.tolist()], "score": scores.tolist()})


def _load_pyfunc(model_uri: str) -> VitflowImageClassifier:
    """Load a logged vitflow model in this process, where vitflow is already importable.

    MLflow prepends the model's bundled code copy to `sys.path`; processes started later
    (Dask workers, torchrun) would then import that stale copy instead of the project, so
    the path is put back as it was.
    """
    saved_path = list(sys.path)
    try:
        return mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    finally:
        sys.path[:] = saved_path


def logged_model_dir(model_uri: str) -> Path:
    """The checkpoint directory inside a logged vitflow model, downloaded; the model is not loaded."""
    from mlflow.models import Model

    local = Path(mlflow.artifacts.download_artifacts(model_uri))
    return local / Model.load(str(local)).flavors["python_function"]["artifacts"]["model_dir"]["path"]


def load_logged_model(model_uri: str):
    """The `ImageClassifier` (FP32 torch) inside a logged vitflow model, e.g. "models:/vitflow-classifier@champion"."""
    from vitflow.models import load_model

    return load_model(str(logged_model_dir(model_uri)))


def load_logged_runner(model_uri: str):
    """The model inside a logged vitflow model as an `ExportedModel`, running at its exported precision."""
    return _load_pyfunc(model_uri).model
