"""vitflow: transfer learning for Vision Transformers, orchestrated by Prefect, tracked by MLflow, versioned by DVC.

The `vitflow` package is the library; `tasks/` wraps its calls as Prefect tasks, `flows/` chains them
and `vitflow.cli` is the command line on top. Importing the library writes nothing and sets no
environment variable: `vitflow.environment.set_up` does that when a command or flow starts.
"""
