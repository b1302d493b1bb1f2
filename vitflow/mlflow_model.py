"""MLflow "models from code" entry point: MLflow runs this file to build the pyfunc model.

Logging the model as code instead of a pickled object means loading it never unpickles anything.
"""

from mlflow.models import set_model

from vitflow.serving import VitflowImageClassifier

set_model(VitflowImageClassifier())
