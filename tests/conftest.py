import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def shared_data_dir() -> Path | None:
    """The real public data beside the checkout (`../shared/data`), or `$CURATION_TEST_DATA`; None when absent."""
    configured = os.environ.get("CURATION_TEST_DATA")
    candidate = Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of the shared real data; the test is skipped when it is absent (a user's machine)."""
    path = shared_data_dir()
    if path is None:
        pytest.skip("shared real data (../shared/data or $CURATION_TEST_DATA) is absent")
    return path
