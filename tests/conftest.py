import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
SHARED_SEEDS = SHARED / "data" / "self_instruct_seed_tasks.jsonl"

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory) -> str:
    """Built-in presets are built once per test session, offline."""
    return str(tmp_path_factory.mktemp("builtin"))


@pytest.fixture
def shared_seeds() -> Path:
    if not SHARED_SEEDS.exists():
        pytest.skip("../shared/data is not present (a user's clone has no shared/)")
    return SHARED_SEEDS
