"""The MLflow pyfunc model that wraps a saved vitflow checkpoint for loading and serving.

Input: a DataFrame with an `image` column of encoded image bytes (JPEG, PNG, ...).
Output: a DataFrame with the top `label` and its `score` per row.
The weights travel as safetensors in the model's `model_dir` artifact; nothing is unpickled.
"""

from __future__ import annotations

import io

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
        from vitflow.models import load_model

        self.model = load_model(context.artifacts["model_dir"]).eval()

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from vitflow.images import normalize, resize_and_crop, to_rgb

        images = [resize_and_crop(to_rgb(Image.open(io.BytesIO(data))), self.model.data_config)
                  for data in model_input["image"]]
        with torch.no_grad():
            probabilities = self.model(normalize(torch.stack(images), self.model.data_config)).softmax(1)
        scores, indices = probabilities.max(1)
        return pd.DataFrame({"label": [self.model.labels[i] for i in indices.tolist()], "score": scores.tolist()})


def load_logged_model(model_uri: str):
    """The `ImageClassifier` inside a logged vitflow model (e.g. "models:/vitflow-classifier@champion")."""
    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().model
