"""The MLflow pyfunc model that wraps a saved vitflow checkpoint for loading and serving.

Input: a DataFrame with an `image` column of encoded image bytes (JPEG, PNG, ...; base64 in a JSON request),
and optionally the parameter `top_k`.
Output per image: the top `label`, its `probability`, and `probabilities`, a mapping of every class (or the
`top_k` most probable) to its probability, most probable first. Input the model cannot score is an HTTP 400
from MLflow's scoring server with a one-line message.
The weights travel in the model's `model_dir` artifact (safetensors, or ONNX for int8) and run at
the precision they were exported in; nothing is unpickled.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlflow.artifacts
import mlflow.pyfunc
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Map

from vitflow.errors import VitflowError

# `image` is not required so that a request without it reaches `predict`, which says so in one line.
SIGNATURE = ModelSignature(inputs=Schema([ColSpec(DataType.binary, "image", required=False)]),
                           outputs=Schema([ColSpec(DataType.string, "label"), ColSpec(DataType.double, "probability"),
                                           ColSpec(Map(DataType.double), "probabilities")]),
                           params=ParamSchema([ParamSpec("top_k", DataType.long, 0)]))  # 0: every class


class BadRequest(MlflowException):
    """Input the model cannot score: MLflow's scoring server answers HTTP 400 with this one-line message.

    The server puts the request's data (several lines) before the message of an MlflowException raised by
    `predict`; this one's JSON reply carries its own message only.
    """

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)
        self.reason = message

    def serialize_as_json(self) -> str:
        return json.dumps({"error_code": self.error_code, "message": self.reason})


class VitflowImageClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from vitflow.precision import load_exported

        self.model_dir = context.artifacts["model_dir"]
        self.model = load_exported(self.model_dir)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from vitflow.inference import predict_logits
        from vitflow.prediction import BATCH_SIZE, decode_image, rank

        if "image" not in model_input.columns:
            raise BadRequest("no 'image' column: send the encoded image files (base64 in JSON) in a column 'image'")
        if model_input.empty:
            raise BadRequest("no image in the request")
        top_k = (params or {}).get("top_k") or len(self.model.labels)
        if top_k < 0:
            raise BadRequest(f"top_k {top_k}: must be 0 (every class) or more")
        images = []
        for row, data in enumerate(model_input["image"]):
            try:
                images.append(decode_image(data, self.model.data_config))
            except VitflowError as error:
                raise BadRequest(f"image {row}: {error}") from None
        probabilities = predict_logits(self.model, torch.stack(images), BATCH_SIZE).softmax(1)
        rankings = rank(probabilities, self.model.labels, top_k)
        return pd.DataFrame({"label": [next(iter(ranking)) for ranking in rankings],
                             "probability": [next(iter(ranking.values())) for ranking in rankings],
                             "probabilities": rankings})


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
