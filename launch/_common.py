"""Shared bits of the single-stage launch scripts: load a finished run's config from its workdir."""

import json
import sys
from pathlib import Path

import ml_collections

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    f = Path(workdir) / "config.json"
    if not f.exists():
        sys.exit(f"error: {f} not found: point --workdir at a directory made by launch/train.py")
    return ml_collections.ConfigDict(json.loads(f.read_text()))
