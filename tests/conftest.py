"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Tests never reach a model hub: models come from local folders or packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def shared_data_path() -> Path:
    """The real benchmark folder: ``$DSOM_DATA`` if set, else ``../shared/data`` next to the repository."""
    env = os.environ.get("DSOM_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of the read-only real datasets (DB15K, MKG-W, ...); skips the test when they are absent."""
    path = shared_data_path()
    if not (path / "DB15K").is_dir():
        if os.environ.get("DSOM_REQUIRE_DATA", "") not in ("", "0"):
            pytest.fail(f"DSOM_REQUIRE_DATA is set but the real datasets are not at {path}: set DSOM_DATA to the "
                        "folder holding DB15K, MKG-W, ... (CI must check the real data, not skip it)", pytrace=False)
        pytest.skip(f"real datasets not found at {path} (set DSOM_DATA to the folder holding DB15K, MKG-W, ...)")
    return path
