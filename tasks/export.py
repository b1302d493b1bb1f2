from pathlib import Path

from prefect import task

from vitflow.config import ExportConfig
from vitflow.export import export_and_verify


@task(name="export")
def export_task(model_dir: str, cache_dir: str, export: ExportConfig, batch_size: int, device: str) -> list[dict]:
    """Export and verify each precision, on `device` (`train.device`), beside the model, in `exports/`; returns
    the records (with each "path")."""
    return export_and_verify(model_dir, cache_dir, Path(model_dir).parent / "exports", export.precisions, batch_size,
                             device)
