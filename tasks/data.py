import pandas as pd
from prefect import task
from prefect.artifacts import create_table_artifact

from vitflow.config import DataConfigSection
from vitflow.data.manifest import build_manifest, summarise_manifest, write_manifest
from vitflow.data.sources import versioned_path
from vitflow.data.versioning import DataVersion, restore_data, version_data
from vitflow.paths import PROJECT_ROOT


@task(name="version-data", log_prints=True)
def version_data_task(data_path: str) -> DataVersion:
    """Restore the data at `data_path` from DVC if it is missing, then version it: the file or folder its
    source says DVC tracks (a table: the table's folder)."""
    versioned = versioned_path(data_path)
    if restore_data(versioned, PROJECT_ROOT):
        print(f"restored {versioned} from DVC")
    version = version_data(versioned, PROJECT_ROOT)
    print(f"data version {version.hash} (tracked={version.tracked}, dirty={version.dirty})")
    return version


@task(name="build-manifest", log_prints=True)
def build_manifest_task(data_path: str, data: DataConfigSection, out_csv: str) -> pd.DataFrame:
    """The manifest, written to `out_csv` and summarised in the table artifact `data-manifest`."""
    manifest = build_manifest(data_path, data.val_fraction, data.test_fraction, data.seed, data.label_names,
                              data.duplicates)
    write_manifest(manifest, out_csv)
    summary = summarise_manifest(manifest, data.min_per_class)
    print(f"manifest {out_csv}: {summary['images']} images, {summary['skipped']} skipped "
          f"({summary['dropped_copies']} val/test copies of training images), {summary['splits']}")
    for warning in summary["warnings"]:
        print(f"warning: {warning}")
    table = [{"split": split, "class": label, "images": n}
             for split, counts in summary["splits"].items() for label, n in counts.items()]
    create_table_artifact(table + [{"split": "skipped", "class": "", "images": summary["skipped"]}],
                          key="data-manifest", description=f"{data_path}: images per split and class")
    return manifest
