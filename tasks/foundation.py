from prefect import task

from vitflow.data.versioning import run_dvc
from vitflow.paths import PROJECT_ROOT


@task(name="foundation")
def foundation_task() -> None:
    """Bring the default backbone up to date through DVC's `foundation` stage (`vitflow.stages foundation`).

    DVC restores it from its cache, rebuilds it when its code or params changed, or does nothing,
    and keeps dvc.lock in step so `dvc status` stays clean.
    """
    run_dvc(PROJECT_ROOT, "repro", "foundation")
