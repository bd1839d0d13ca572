"""Locate the real SA-1B samples in ``../shared/sa1b`` (beside the repository)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
SA1B = SHARED / "sa1b"


def sa1b_path(name: str) -> Path:
    p = SA1B / name
    if not p.exists():
        pytest.skip(f"real SA-1B sample {name} not found: expected ../shared/sa1b beside the repo")
    return p


def real_records() -> list[dict]:
    """Every real per-image record we have (the excerpt plus the three others)."""
    recs = [json.loads(sa1b_path("sa_226381.excerpt.json").read_text())]
    recs += json.loads(sa1b_path("other_real_excerpts.json").read_text())
    return recs
