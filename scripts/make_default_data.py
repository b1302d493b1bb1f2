"""Build the shipped default dataset (ants vs bees) as a compact copy in data/.

In:  the hymenoptera tarball (`hymenoptera_data/{train,val}/{ants,bees}`).
Out: `data/train/{ants,bees}` from its train and `data/test/{ants,bees}` from its val, every image
     shrunk so its short side is at most 256 px (aspect kept, LANCZOS, JPEG quality 85); images already
     that small, and the palette-mode placeholder `train/ants/imageNotFound.gif`, are copied byte for byte.
Deterministic: members are processed in sorted order and re-encoded with fixed settings.

Usage: uv run python scripts/make_default_data.py [--source TARBALL] [--out DIR]
"""

import argparse
import io
import sys
import tarfile
from collections import Counter
from pathlib import Path, PurePosixPath

from PIL import Image

from vitflow.errors import VitflowError
from vitflow.paths import PROJECT_ROOT

DEFAULT_SOURCE = Path("/work/shared/datasets/hymenoptera_data.tar.gz")
SPLIT_RENAME = {"train": "train", "val": "test"}  # the tutorial's val becomes our held-out test split
MAX_SHORT_SIDE = 256
JPEG_QUALITY = 85


def shrink(data: bytes) -> bytes:
    """Return the image bytes with the short side at most MAX_SHORT_SIDE (JPEG); small or non-JPEG files as they are."""
    with Image.open(io.BytesIO(data)) as image:
        if image.format != "JPEG" or min(image.size) <= MAX_SHORT_SIDE:
            return data
        scale = MAX_SHORT_SIDE / min(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        icc = image.info.get("icc_profile")
        small = image.convert("RGB").resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    small.save(out, format="JPEG", quality=JPEG_QUALITY, optimize=True, icc_profile=icc)
    return out.getvalue()


def build(source: Path, out_dir: Path) -> Counter:
    """Write the compact copy of `source` into `out_dir`; return image counts per (split, class)."""
    if not source.is_file():
        raise VitflowError(f"{source}: dataset tarball not found; pass --source PATH")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise VitflowError(f"{out_dir}: already exists and is not empty; remove it first (or `dvc pull` it instead)")
    counts: Counter = Counter()
    with tarfile.open(source) as tar:
        for member in sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name):
            parts = PurePosixPath(member.name).parts  # hymenoptera_data/<split>/<class>/<file>
            if len(parts) != 4 or parts[1] not in SPLIT_RENAME:
                raise VitflowError(f"{source}: unexpected member {member.name}; expected <root>/<split>/<class>/<file>")
            _, split, label, name = parts
            target = out_dir / SPLIT_RENAME[split] / label / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(shrink(tar.extractfile(member).read()))
            counts[(SPLIT_RENAME[split], label)] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="hymenoptera_data.tar.gz")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "data", help="output folder (must not exist)")
    args = parser.parse_args(argv)
    try:
        counts = build(args.source, args.out)
    except VitflowError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for (split, label), count in sorted(counts.items()):
        print(f"{split}/{label}: {count} images")
    total = sum(path.stat().st_size for path in args.out.rglob("*") if path.is_file())
    print(f"{sum(counts.values())} images, {total / 1e6:.2f} MB in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
