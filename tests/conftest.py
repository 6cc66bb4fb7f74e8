import os
from pathlib import Path

import pytest

os.environ.setdefault("LATHE_NO_PROGRESS", "1")
# Tiny test models gain nothing from intra-op threads, and on a busy 2-core machine spinning
# OpenMP workers slow them down by 10x or more. Set before torch is imported; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout: skipped where absent, a failure under CI=true."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"shared data missing at {SHARED_DATA} (required under CI=true)")
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA
