"""Write every task-world dataset to a directory: `python -m alignkit.tasks.build --out DIR [--seed S]`.

`--scale` multiplies every default size (0.1 for a quick look). The lead's `alignkit data build`
will call `build_datasets` the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from alignkit.tasks.datasets import DatasetSizes, build_datasets


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m alignkit.tasks.build", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every default dataset size")
    args = parser.parse_args(argv)
    defaults = DatasetSizes()
    sizes = DatasetSizes(
        **{f.name: max(1, round(getattr(defaults, f.name) * args.scale)) for f in dataclasses.fields(DatasetSizes)}
    )
    paths = build_datasets(args.out, args.seed, sizes)
    manifest = json.loads(paths["manifest"].read_text())
    for name, count in manifest["counts"].items():
        print(f"{count:7d}  {paths[name]}")
    print(f"built in {manifest['seconds']} s")


if __name__ == "__main__":
    main()
