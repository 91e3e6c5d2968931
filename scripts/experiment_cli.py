"""What the experiment scripts share: `-c CONFIG [--set key=value ...]`, and the
experiment's output directory beside the config's."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedit.config import RunConfig, load_config


def experiment_config(doc: str, suffix: str) -> tuple[RunConfig, Path]:
    """(the config the command line names, <output_dir>-<suffix>)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("-c", "--config", type=Path, required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    return cfg, Path(f"{cfg.output_dir}-{suffix}")
